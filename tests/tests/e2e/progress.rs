//! Progress the way people expect: bars on a terminal (a pseudo-terminal
//! here), plain lines when piped, and the cutover's steps as they come.

use std::io::Read;
use std::process::{Command, Stdio};

use harness::Cluster;
use harness::daemons::{CLI, binary};

use crate::support::Migration;

const TABLES: &str = "CREATE TABLE big (id int PRIMARY KEY, pad text); \
     INSERT INTO big SELECT i, repeat('p', 200) FROM generate_series(1, 100000) i; \
     CREATE TABLE small (id int PRIMARY KEY); INSERT INTO small SELECT generate_series(1, 10);";

/// Runs the CLI with stdout and stderr on a pseudo-terminal; returns its
/// exit code and everything it drew.
fn on_a_terminal(m: &Migration, args: &[&str]) -> (Option<i32>, String) {
    let pty = nix::pty::openpty(None, None).expect("a pseudo-terminal");
    let mut child = Command::new(binary(CLI))
        .args(["--api", &m.install.api()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
        .stderr(Stdio::from(pty.slave))
        .spawn()
        .unwrap();
    let mut master = std::fs::File::from(pty.master);
    let reader = std::thread::spawn(move || {
        let mut drawn = Vec::new();
        let mut chunk = [0u8; 4096];
        // The read fails (EIO) once the child's side is closed.
        while let Ok(n) = master.read(&mut chunk) {
            if n == 0 {
                break;
            }
            drawn.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8_lossy(&drawn).into_owned()
    });
    let code = child.wait().unwrap().code();
    (code, reader.join().unwrap())
}

#[test]
fn start_draws_bars_on_a_terminal_and_lines_when_piped_and_cutover_prints_its_steps() {
    let m = Migration::new(Cluster::builder("source").logical().start(), TABLES);
    let (code, drawn) = on_a_terminal(&m, &["start", "--agent", "east"]);
    assert_eq!(code, Some(0), "{drawn}");
    assert!(drawn.contains("\x1b["), "a terminal gets drawn on: {drawn:?}");
    assert!(drawn.contains("tables ·"), "the header line: {drawn:?}");
    // Each finished table gets a line (copied, or verified if the check
    // was done by the time it was seen).
    assert!(drawn.contains(" public.big: 100000 rows"), "{drawn:?}");
    assert!(drawn.contains("[") && drawn.contains("ETA"), "a bar: {drawn:?}");
    assert!(drawn.contains("phase streaming"), "the summary: {drawn:?}");

    // Piped: the cutover's steps, one line each, in order, then the outcome.
    let out = m.cli(&["cutover"]);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}");
    let steps: Vec<&str> = printed
        .lines()
        .filter_map(|l| l.strip_prefix("cutover "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        steps,
        [
            "lag",
            "fence",
            "catch",
            "recheck",
            "sequences",
            "seal",
            "detach",
            "done:"
        ],
        "{printed}"
    );
    assert!(!printed.contains('\x1b'), "{printed:?}");

    let m = Migration::new(Cluster::builder("source").logical().start(), TABLES);
    let out = m.cli(&["start", "--agent", "east", "--copy-only"]);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}");
    assert!(!printed.contains('\x1b'), "no escapes into a pipe: {printed:?}");
    assert!(printed.lines().any(|l| l.starts_with("phase: ")), "{printed}");
    for table in ["big: 100000 rows", "small: 10 rows"] {
        assert_eq!(
            printed
                .lines()
                .filter(|l| (l.starts_with("verified public.") || l.starts_with("copied public.")) && l.contains(table))
                .count(),
            1,
            "each table once: {printed}"
        );
    }
}
