//! A record the journal reported written survives `kill -9` of the process
//! that wrote it: `put` returns only after sled has flushed it.
//!
//! The test runs itself again as a child process that writes records and
//! prints a line after each `put` returns; the parent kills it with SIGKILL
//! mid-stream and reopens the journal.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use walbridge_daemon::journal::Journal;

const CHILD_DIR: &str = "WALBRIDGE_TEST_JOURNAL_CHILD_DIR";
const RECORDS: u32 = 10_000;
const KILL_AFTER: u32 = 200;

#[test]
fn a_record_reported_durable_survives_kill_9() {
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        write_until_killed(std::path::Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_record_reported_durable_survives_kill_9",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reported = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("durable ") {
            let n: u32 = n.parse().unwrap();
            reported = Some(n);
            if n == KILL_AFTER {
                // SIGKILL while the child keeps writing.
                child.kill().unwrap();
                break;
            }
        }
    }
    child.wait().unwrap();
    let reported = reported.expect("the child reported writes");
    assert_eq!(reported, KILL_AFTER);

    let journal = Journal::open(dir.path()).unwrap();
    let table = journal.table::<u32>("records").unwrap();
    for n in 0..=reported {
        assert_eq!(
            table.get(&format!("{n:08}")).unwrap(),
            Some(n),
            "record {n} was reported durable before the kill but is gone"
        );
    }
}

fn write_until_killed(dir: &std::path::Path) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let journal = Journal::open(dir).unwrap();
        let table = journal.table::<u32>("records").unwrap();
        for n in 0..RECORDS {
            table.put(&format!("{n:08}"), &n).await.unwrap();
            println!("durable {n}");
        }
    });
}
