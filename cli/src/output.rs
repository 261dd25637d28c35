//! How the CLI reports: tables for people, one JSON document with --json,
//! and the exit status (0 done, 1 the operation failed, 2 bad usage).

use std::process::ExitCode;

use serde::Serialize;

/// Why a command did not succeed.
#[derive(Debug)]
pub enum Failure {
    /// The operation was tried and failed: exit 1.
    Operation(String),
    /// The command line or configuration is wrong: exit 2.
    Usage(String),
}

impl Failure {
    pub fn report(self) -> ExitCode {
        match self {
            Failure::Operation(message) => {
                eprintln!("walbridge: {message}");
                ExitCode::from(1)
            }
            Failure::Usage(message) => {
                eprintln!("walbridge: {message}");
                ExitCode::from(2)
            }
        }
    }
}

pub fn print_json(value: &impl Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("walbridge: cannot write JSON: {e}"),
    }
}

pub fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// A controller's timestamp (milliseconds since the epoch) in RFC 3339.
pub fn local_time(unix_ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}
