//! The migration commands: `preflight`, `start`, `status`, `verify`.

use std::time::Duration;

use serde::Serialize;
use walbridge_proto::v1 as wire;

use crate::client::{ApiAddress, connect};
use crate::output::{Failure, print_json, print_table};

/// How often `start` and `status --watch` ask the controller.
const POLL: Duration = Duration::from_millis(500);

fn call_failed(status: tonic::Status) -> Failure {
    match status.code() {
        tonic::Code::InvalidArgument => Failure::Usage(status.message().to_owned()),
        _ => Failure::Operation(status.message().to_owned()),
    }
}

fn selection(tables: &[String], exclude: &[String]) -> Option<wire::TableSelection> {
    Some(wire::TableSelection {
        tables: tables.to_vec(),
        exclude: exclude.to_vec(),
    })
}

#[derive(Debug, Serialize)]
struct FindingView<'a> {
    severity: &'a str,
    side: &'a str,
    check: &'a str,
    object: &'a str,
    message: &'a str,
    fix: &'a str,
}

pub async fn preflight(
    address: &ApiAddress,
    agent: String,
    tables: &[String],
    exclude: &[String],
    json: bool,
) -> Result<(), Failure> {
    let mut client = connect(address).await.map_err(Failure::Operation)?;
    let findings = client
        .preflight(wire::PreflightRequest {
            agent,
            selection: selection(tables, exclude),
        })
        .await
        .map_err(call_failed)?
        .into_inner()
        .findings;
    let errors = findings.iter().filter(|f| f.severity == "error").count();
    if json {
        let views: Vec<FindingView> = findings
            .iter()
            .map(|f| FindingView {
                severity: &f.severity,
                side: &f.side,
                check: &f.check,
                object: &f.object,
                message: &f.message,
                fix: &f.fix,
            })
            .collect();
        print_json(&serde_json::json!({ "errors": errors, "findings": views }));
    } else if findings.is_empty() {
        println!("Preflight found nothing to fix.");
    } else {
        let rows: Vec<[String; 5]> = findings
            .iter()
            .map(|f| {
                [
                    f.severity.to_uppercase(),
                    f.side.clone(),
                    f.check.clone(),
                    f.object.clone(),
                    f.message.clone(),
                ]
            })
            .collect();
        print_table(&["SEVERITY", "SIDE", "CHECK", "OBJECT", "WHY"], &rows);
        println!();
        for f in findings.iter().filter(|f| !f.fix.is_empty()) {
            let object = if f.object.is_empty() { &f.check } else { &f.object };
            println!("fix {object}: {}", f.fix);
        }
    }
    if errors > 0 {
        return Err(Failure::Operation(format!("preflight found {errors} error(s)")));
    }
    Ok(())
}

pub struct StartOptions {
    pub agent: String,
    pub tables: Vec<String>,
    pub exclude: Vec<String>,
    pub parallel: u32,
    pub no_verify: bool,
    pub json: bool,
}

/// Starts the migration, then follows it until the copy is done.
pub async fn start(address: &ApiAddress, options: StartOptions) -> Result<(), Failure> {
    let mut client = connect(address).await.map_err(Failure::Operation)?;
    let started = client
        .start(wire::StartRequest {
            agent: options.agent,
            selection: selection(&options.tables, &options.exclude),
            parallel: options.parallel,
            no_verify: options.no_verify,
        })
        .await
        .map_err(call_failed)?
        .into_inner();
    if !options.json {
        println!("migration {} started: {} tables", started.migration, started.tables);
    }
    let mut last_phase = String::new();
    loop {
        let status = client
            .status(wire::StatusRequest {})
            .await
            .map_err(call_failed)?
            .into_inner();
        if status.phase != last_phase && !options.json {
            println!("phase: {}", status.phase);
            last_phase = status.phase.clone();
        }
        match status.phase.as_str() {
            "copied" => {
                if options.json {
                    print_json(&StatusView::from(&status));
                } else {
                    print_status(&status);
                }
                return Ok(());
            }
            "failed" => {
                if options.json {
                    print_json(&StatusView::from(&status));
                }
                return Err(Failure::Operation(format!(
                    "the migration failed: {}",
                    status.errors.join("; ")
                )));
            }
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

#[derive(Debug, Serialize)]
struct TableView {
    name: String,
    state: String,
    rows: u64,
    bytes: u64,
    copy_seconds: f64,
    rows_per_second: f64,
    copy_attempts: u32,
    ranges: u32,
    wire_bytes: u64,
}

#[derive(Debug, Serialize)]
struct StatusView {
    phase: String,
    migration: String,
    agent: String,
    slot: String,
    consistent_lsn: String,
    tables: Vec<TableView>,
    errors: Vec<String>,
    events: Vec<String>,
    copy_restarts: u32,
}

impl From<&wire::StatusResponse> for StatusView {
    fn from(status: &wire::StatusResponse) -> Self {
        StatusView {
            phase: status.phase.clone(),
            migration: status.migration.clone(),
            agent: status.agent.clone(),
            slot: status.slot.clone(),
            consistent_lsn: status.consistent_lsn.clone(),
            tables: status
                .tables
                .iter()
                .map(|t| TableView {
                    name: t.name.clone(),
                    state: t.state.clone(),
                    rows: t.rows,
                    bytes: t.bytes,
                    copy_seconds: t.copy_seconds,
                    copy_attempts: t.copy_attempts,
                    ranges: t.ranges,
                    wire_bytes: t.wire_bytes,
                    rows_per_second: if t.copy_seconds > 0.0 {
                        t.rows as f64 / t.copy_seconds
                    } else {
                        0.0
                    },
                })
                .collect(),
            errors: status.errors.clone(),
            events: status.events.clone(),
            copy_restarts: status.copy_restarts,
        }
    }
}

fn print_status(status: &wire::StatusResponse) {
    println!(
        "migration {}  phase {}  agent {}",
        status.migration, status.phase, status.agent
    );
    if !status.slot.is_empty() {
        println!("slot {}  consistent at {}", status.slot, status.consistent_lsn);
    }
    let view = StatusView::from(status);
    let rows: Vec<[String; 5]> = view
        .tables
        .iter()
        .map(|t| {
            [
                t.name.clone(),
                t.state.clone(),
                t.rows.to_string(),
                t.bytes.to_string(),
                format!("{:.0}", t.rows_per_second),
            ]
        })
        .collect();
    print_table(&["TABLE", "STATE", "ROWS", "BYTES", "ROWS/S"], &rows);
    for event in &status.events {
        println!("note: {event}");
    }
    for error in &status.errors {
        println!("error: {error}");
    }
}

pub async fn status(address: &ApiAddress, json: bool) -> Result<(), Failure> {
    let mut client = connect(address).await.map_err(Failure::Operation)?;
    let status = client
        .status(wire::StatusRequest {})
        .await
        .map_err(call_failed)?
        .into_inner();
    if json {
        print_json(&StatusView::from(&status));
    } else if status.phase == "none" {
        println!("No migration.");
    } else {
        print_status(&status);
    }
    Ok(())
}

pub async fn verify(address: &ApiAddress, tables: &[String], exclude: &[String], json: bool) -> Result<(), Failure> {
    let mut client = connect(address).await.map_err(Failure::Operation)?;
    let results = client
        .verify(wire::VerifyRequest {
            selection: selection(tables, exclude),
        })
        .await
        .map_err(call_failed)?
        .into_inner()
        .tables;
    let bad: Vec<&wire::TableVerification> = results.iter().filter(|t| !t.matches).collect();
    if json {
        let tables: Vec<_> = results
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name, "matches": t.matches,
                    "source_rows": t.source_rows, "target_rows": t.target_rows,
                    "source_checksum": t.source_checksum, "target_checksum": t.target_checksum,
                    "error": (!t.error.is_empty()).then_some(&t.error),
                })
            })
            .collect();
        print_json(&serde_json::json!({ "matches": bad.is_empty(), "tables": tables }));
    } else {
        let rows: Vec<[String; 4]> = results
            .iter()
            .map(|t| {
                let verdict = if !t.error.is_empty() {
                    format!("ERROR: {}", t.error)
                } else if t.matches {
                    "exact".to_owned()
                } else {
                    "MISMATCH".to_owned()
                };
                [
                    t.name.clone(),
                    t.source_rows.to_string(),
                    t.target_rows.to_string(),
                    verdict,
                ]
            })
            .collect();
        print_table(&["TABLE", "SOURCE ROWS", "TARGET ROWS", "RESULT"], &rows);
    }
    if !bad.is_empty() {
        let names: Vec<&str> = bad.iter().map(|t| t.name.as_str()).collect();
        return Err(Failure::Operation(format!(
            "{} table(s) differ between source and target: {}",
            bad.len(),
            names.join(", ")
        )));
    }
    Ok(())
}
