//! The long haul: a migration survives what a real one meets — roles with
//! timeouts, servers restarting mid-copy and mid-streaming, a link cut
//! while the agent lives, a controller restarting under the CLI — and
//! when it does fail, it leaves nothing on the source that holds WAL,
//! and says why. What cannot be known is shown as unknown, never as 0.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use harness::Cluster;
use harness::daemons::eventually;
use serde_json::Value;

use crate::support::{DATABASE, Migration, Session, Spec};

const TIMEOUT: Duration = Duration::from_secs(120);

/// 80 small tables (a copy that lasts a few seconds, long enough to be
/// interrupted) and the table a live writer fills.
const MANY_TABLES: &str = "DO $$ BEGIN FOR i IN 1..80 LOOP \
     EXECUTE format('CREATE TABLE t_%s (id int PRIMARY KEY, pad text)', i); \
     EXECUTE format('INSERT INTO t_%s SELECT g, repeat(''y'', 100) FROM generate_series(1, 2000) g', i); \
     END LOOP; END $$; \
     CREATE TABLE feed (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());";

fn tables_in(status: &Value, state: &str) -> Vec<String> {
    status["tables"]
        .as_array()
        .map(|tables| {
            tables
                .iter()
                .filter(|t| t["state"] == state)
                .map(|t| t["name"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Status once the copy is under way: some tables verified, most not.
fn mid_copy(m: &Migration) -> Value {
    eventually(TIMEOUT, "the copy to be under way", || {
        let status = m.try_status()?;
        assert_ne!(status["phase"], "failed", "{status}");
        (status["phase"] == "copy" && tables_in(&status, "verified").len() >= 8).then_some(status)
    })
}

/// Status while it shows a unit being retried for a fault of `kind`.
fn retrying(m: &Migration, kind: &str) -> Value {
    eventually(TIMEOUT, &format!("status to show a retry ({kind})"), || {
        let status = m.try_status()?;
        assert_ne!(status["phase"], "failed", "{status}");
        let retries = status["retries"].as_array()?;
        retries
            .iter()
            .any(|r| r["kind"] == kind && r["count"].as_u64().unwrap_or(0) >= 1 && r["last_error"] != "")
            .then_some(status)
    })
}

/// A writer on the source that outlives the source's restarts: one row
/// per transaction, paced, reconnecting when its session dies. It keeps
/// the ids whose commit was acknowledged.
struct Feed {
    stop: Arc<AtomicBool>,
    written: std::thread::JoinHandle<Vec<i64>>,
}

impl Feed {
    fn start(url: String) -> Feed {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let written = std::thread::spawn(move || {
            let mut acknowledged = Vec::new();
            let mut id = 0i64;
            while !flag.load(Ordering::SeqCst) {
                let Ok(session) = Session::try_open(&url) else {
                    // The server is down: try again shortly (a client's
                    // retry, not the test's synchronisation).
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                while !flag.load(Ordering::SeqCst) {
                    id += 1;
                    if session
                        .execute(&format!("INSERT INTO feed (id) VALUES ({id})"))
                        .is_err()
                    {
                        break;
                    }
                    acknowledged.push(id);
                    // Paced: a steady trickle, not a load test.
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            acknowledged
        });
        Feed { stop, written }
    }

    fn stop(self) -> Vec<i64> {
        self.stop.store(true, Ordering::SeqCst);
        self.written.join().expect("the writer does not panic")
    }
}

fn feed_rows(cluster: &Cluster) -> u64 {
    cluster
        .try_psql(DATABASE, "SELECT count(*) FROM feed")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The writer's rows keep arriving on the target: more than `now` there.
fn streams_again(m: &Migration) {
    let now = feed_rows(&m.target);
    eventually(TIMEOUT, "the writer's rows to stream to the target again", || {
        (feed_rows(&m.target) > now + 10).then_some(())
    });
}

/// The end of every scenario: cutover with every acknowledged write on the
/// target, `verify` exact, and after cleanup nothing on the source.
fn cut_over_verify_and_clean_up(m: &Migration, feed: Feed) {
    let acknowledged = feed.stop();
    assert!(!acknowledged.is_empty(), "the writer wrote");
    let (code, cutover, stderr) = m.cli_json(&["cutover", "--max-lag", "5s", "--timeout", "60s", "--json"]);
    assert_eq!(code, Some(0), "cutover: {stderr} {cutover}");
    assert_eq!(cutover["done"], true, "{cutover}");
    let on_target: BTreeSet<i64> = m
        .target
        .psql(DATABASE, "SELECT coalesce(string_agg(id::text, ','), '') FROM feed")
        .split(',')
        .filter(|id| !id.is_empty())
        .map(|id| id.parse().unwrap())
        .collect();
    let missing: Vec<&i64> = acknowledged.iter().filter(|id| !on_target.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged writes missing on the target: {missing:?}"
    );
    let (code, verify, stderr) = m.cli_json(&["verify", "--json"]);
    assert_eq!(code, Some(0), "verify: {stderr} {verify}");
    assert_eq!(verify["matches"], true, "{verify}");
    let (code, cleaned, stderr) = m.cli_json(&["cleanup", "--json"]);
    assert_eq!(code, Some(0), "cleanup: {stderr} {cleaned}");
    assert_eq!(m.source_replication_objects(), (String::new(), String::new()));
    assert_eq!(
        m.source.psql(
            DATABASE,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'"
        ),
        "0"
    );
}

#[test]
fn roles_whose_timeouts_are_shorter_than_the_copy_do_not_cut_it_off() {
    // Both sides' roles (superusers, as walbridge may run) cut a statement
    // off after 1 s and a session idle in a transaction after 2 s.
    let role = "CREATE ROLE mover SUPERUSER LOGIN PASSWORD 'mover-pw'; \
                ALTER ROLE mover SET statement_timeout = '1s'; \
                ALTER ROLE mover SET idle_in_transaction_session_timeout = '2s'; \
                ALTER ROLE mover SET idle_session_timeout = '2s';";
    let url = |cluster: &Cluster| cluster.url_as("mover", "mover-pw", DATABASE);
    let source = Cluster::builder("source").logical().start();
    source.create_database(DATABASE);
    source.psql(DATABASE, role);
    // The target checks each row with a function that takes a moment, so
    // the copy of `slow` lasts a few seconds whatever the machine: on the
    // target one COPY statement, on the source one COPY held back by the
    // target's pace, and the snapshot's walsender idle in its transaction
    // all along. The expression index makes post-data slow too.
    source.psql(
        DATABASE,
        "CREATE FUNCTION checked(id int) RETURNS boolean IMMUTABLE LANGUAGE plpgsql \
           AS $$ BEGIN PERFORM pg_sleep(0.001); RETURN id IS NOT NULL; END $$; \
         CREATE TABLE slow (id int PRIMARY KEY CHECK (checked(id)), pad text); \
         INSERT INTO slow SELECT g, repeat(md5(g::text), 256) FROM generate_series(1, 2500) g; \
         CREATE INDEX slow_checked ON slow ((checked(id) AND id > 0)); \
         CREATE TABLE feed (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());",
    );
    let target = Cluster::builder("target").start();
    target.create_database(DATABASE);
    target.psql(DATABASE, role);
    let (source_url, target_url) = (url(&source), url(&target));
    let m = Migration::custom(Spec {
        source,
        target,
        source_url,
        target_url,
        controller_args: vec![],
        agent_args: vec![],
        agent_env: vec![],
    });
    // What the test is up against: the roles' settings are in force for
    // any session that does not set its own (psql's, here).
    for cluster in [&m.source, &m.target] {
        let psql = std::process::Command::new("psql")
            .args([
                &url(cluster),
                "-X",
                "-At",
                "-c",
                "SHOW statement_timeout",
                "-c",
                "SELECT pg_sleep(1.2)",
            ])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&psql.stdout).lines().next(), Some("1s"));
        assert!(
            String::from_utf8_lossy(&psql.stderr).contains("statement timeout"),
            "{}",
            String::from_utf8_lossy(&psql.stderr)
        );
    }

    let feed = Feed::start(url(&m.source));
    let (code, status, stderr) = m.cli_json(&["start", "--agent", "east", "--json"]);
    assert_eq!(code, Some(0), "start: {stderr} {status}");
    assert_eq!(status["phase"], "streaming", "{status}");
    let slow = status["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "public.slow")
        .unwrap()
        .clone();
    assert_eq!(slow["state"], "verified", "{slow}");
    assert_eq!(slow["rows"], 2500);
    let copy_seconds = slow["copy_seconds"].as_f64().unwrap();
    assert!(
        copy_seconds > 2.5,
        "the copy of slow took {copy_seconds} s: longer than the roles' timeouts, or it proves nothing"
    );
    assert_eq!(status["copy_restarts"], 0, "the snapshot was never lost: {status}");
    assert!(
        status["retries"].as_array().unwrap().is_empty(),
        "nothing was cut off: {status}"
    );
    assert_eq!(
        m.target.psql(
            DATABASE,
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'slow_checked'"
        ),
        "1"
    );
    eventually(TIMEOUT, "the subscription to stream", || {
        (m.status()["subscription"] == "streaming").then_some(())
    });
    streams_again(&m);
    cut_over_verify_and_clean_up(&m, feed);
}

#[test]
fn the_target_restarted_mid_copy_and_mid_streaming_the_migration_goes_on() {
    let source = Cluster::builder("source").logical().start();
    let mut m = Migration::new(source, MANY_TABLES);
    let feed = Feed::start(m.source.url(DATABASE));
    let mut start = m.start_in_background(&["--parallel", "2"]);
    let before = mid_copy(&m);

    m.target.stop();
    let during = retrying(&m, "target_unavailable");
    assert_eq!(during["phase"], "copy", "{during}");
    m.target.restart();
    let after = m.wait_for_phase("streaming", TIMEOUT);
    assert_eq!(start.wait().unwrap().code(), Some(0), "start follows it to the end");
    // The target's restart cost nothing on the source: same slot, same
    // snapshot, each table verified once.
    assert_eq!(after["copy_restarts"], 0, "{after}");
    assert_eq!(after["slot"], before["slot"], "{after}");
    assert_eq!(tables_in(&after, "verified").len(), 81, "{after}");
    assert!(after["retries"].as_array().unwrap().is_empty(), "{after}");

    eventually(TIMEOUT, "the subscription to stream", || {
        (m.status()["subscription"] == "streaming").then_some(())
    });
    m.target.stop();
    let down = eventually(TIMEOUT, "status to say the target cannot be read", || {
        let status = m.try_status()?;
        status["warnings"]
            .as_array()?
            .iter()
            .any(|w| w.as_str().unwrap_or_default().contains("cannot read the subscription"))
            .then_some(status)
    });
    assert_eq!(down["phase"], "streaming", "{down}");
    m.target.restart();
    streams_again(&m);
    cut_over_verify_and_clean_up(&m, feed);
}

#[test]
fn the_source_restarted_mid_copy_and_mid_streaming_the_migration_goes_on() {
    let source = Cluster::builder("source").logical().start();
    let mut m = Migration::new(source, MANY_TABLES);
    let feed = Feed::start(m.source.url(DATABASE));
    let mut start = m.start_in_background(&["--parallel", "2"]);
    let before = mid_copy(&m);

    // The source's restart ends the agent's replication connection, and
    // with it the exported snapshot: the copy rightly starts again.
    m.source.stop();
    retrying(&m, "source_unavailable");
    m.source.restart();
    let after = m.wait_for_phase("streaming", TIMEOUT);
    assert_eq!(start.wait().unwrap().code(), Some(0), "start follows it to the end");
    assert_eq!(after["copy_restarts"], 1, "{after}");
    assert!(
        after["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e.as_str().unwrap().contains("restarts from a new slot")),
        "status says why the copy restarted: {after}"
    );
    assert_ne!(after["slot"], before["slot"]);
    assert_eq!(m.source_replication_objects().0, after["slot"].as_str().unwrap());
    assert_eq!(tables_in(&after, "verified").len(), 81, "{after}");

    eventually(TIMEOUT, "the subscription to stream", || {
        (m.status()["subscription"] == "streaming").then_some(())
    });
    m.source.stop();
    let down = eventually(TIMEOUT, "status to say the lag is unknown", || {
        let status = m.try_status()?;
        (status["lag_bytes"].is_null() && !status["warnings"].as_array()?.is_empty()).then_some(status)
    });
    assert_eq!(down["phase"], "streaming", "{down}");
    assert!(down["retained_wal_bytes"].is_null(), "{down}");
    m.source.restart();
    streams_again(&m);
    cut_over_verify_and_clean_up(&m, feed);
}

#[test]
fn a_migration_that_fails_leaves_nothing_on_the_source_that_holds_wal_and_says_why() {
    let source = Cluster::builder("source").logical().start();
    let m = Migration::new(source, MANY_TABLES);
    let mut start = m.start_in_background(&["--parallel", "2"]);
    let copying = eventually(TIMEOUT, "the copy to begin", || {
        let status = m.try_status()?;
        (status["phase"] == "copy").then_some(status)
    });
    // The target refuses every row of the tables not copied yet: a fault
    // no retry mends (an operator's).
    let pending: Vec<String> = [tables_in(&copying, "pending"), tables_in(&copying, "copying")]
        .concat()
        .into_iter()
        .map(|name| format!("'{name}'"))
        .collect();
    assert!(pending.len() > 20, "{copying}");
    m.target.psql(
        DATABASE,
        &format!(
            "SET lock_timeout = '100ms'; DO $$ DECLARE t text; BEGIN \
               FOREACH t IN ARRAY ARRAY[{}] LOOP BEGIN \
                 EXECUTE format('ALTER TABLE %s ADD CONSTRAINT refuses_rows CHECK (false) NOT VALID', t); \
               EXCEPTION WHEN lock_not_available THEN NULL; END; END LOOP; END $$",
            pending.join(", ")
        ),
    );
    let failed = m.wait_for_phase("failed", TIMEOUT);
    assert_eq!(start.wait().unwrap().code(), Some(1), "start reports the failure");
    let why = failed["errors"].to_string();
    assert!(
        why.contains("refuses_rows") && why.contains("rejected"),
        "the failure names the constraint and its kind: {failed}"
    );
    // Released before the failure was recorded: no slot holds WAL, no
    // walsender holds a snapshot, no publication is left.
    assert_eq!(m.source_replication_objects(), (String::new(), String::new()));
    assert_eq!(
        m.source.psql(
            DATABASE,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'"
        ),
        "0"
    );
    assert!(
        failed["events"].to_string().contains("were dropped from the source"),
        "{failed}"
    );
}

#[test]
fn the_link_cut_for_30_s_mid_copy_the_copy_goes_on_against_the_same_snapshot() {
    let source = Cluster::builder("source").logical().start();
    let (m, relay) = Migration::through_relay(source, MANY_TABLES);
    let mut start = m.start_in_background(&["--parallel", "2"]);
    let before = mid_copy(&m);

    // A dead network path between agent and controller, while both live.
    relay.cut();
    let cut = Instant::now();
    let waiting = eventually(TIMEOUT, "status to say the copy waits for the agent", || {
        let status = m.try_status()?;
        (status["waiting"]["agent"] == "east").then_some(status)
    });
    assert_eq!(waiting["phase"], "copy", "{waiting}");
    m.agent
        .wait_for_log_line(Duration::from_secs(20), &["link to the controller lost"]);
    while cut.elapsed() < Duration::from_secs(30) {
        // Still cut: nothing but waiting; the migration does not fail.
        let status = m.status();
        assert_eq!(status["phase"], "copy", "{status}");
        std::thread::sleep(Duration::from_millis(500));
    }
    relay.restore();

    let after = m.wait_for_phase("streaming", TIMEOUT);
    assert_eq!(start.wait().unwrap().code(), Some(0), "start follows it to the end");
    assert_eq!(after["copy_restarts"], 0, "no new slot: {after}");
    assert_eq!(after["slot"], before["slot"], "{after}");
    assert_eq!(
        m.source_replication_objects().0,
        before["slot"].as_str().unwrap(),
        "the one slot on the source is the first"
    );
    assert!(after["waiting"].is_null(), "{after}");
    let (code, verify, stderr) = m.cli_json(&["verify", "--json"]);
    assert_eq!(code, Some(0), "verify: {stderr} {verify}");
}

#[test]
fn start_against_hundreds_of_conflicting_tables_prints_the_findings_not_a_transport_error() {
    let tables = "DO $$ BEGIN FOR i IN 1..320 LOOP \
                  EXECUTE format('CREATE TABLE \"a rather long table name, number %s\" (id int PRIMARY KEY)', i); \
                  END LOOP; END $$;";
    let source = Cluster::builder("source").logical().start();
    let m = Migration::new(source, tables);
    m.target.psql(DATABASE, tables);

    let out = m.cli(&["start", "--agent", "east"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // Each table conflicts, and the schema's rehearsal meets it again.
    let count: u64 = stderr
        .split("preflight found ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the count of errors: {stderr}"));
    assert!(count >= 320, "{stderr}");
    assert!(stderr.contains("error(s); nothing was created"), "{stderr}");
    assert!(stderr.contains("conflicting_table"), "{stderr}");
    assert!(
        stderr.contains("more"),
        "the first ones and the count of the rest: {stderr}"
    );
    for transport in ["transport error", "h2 protocol", "http2"] {
        assert!(!stderr.contains(transport), "{stderr}");
    }
    assert!(
        stderr.len() < 20_000,
        "a readable message, not all of them: {} bytes",
        stderr.len()
    );
    let (code, preflight, stderr) = m.cli_json(&["preflight", "--agent", "east", "--json"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(preflight["errors"], count, "preflight lists every one");
    let conflicts = preflight["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["check"] == "conflicting_table")
        .count();
    assert_eq!(conflicts, 320);
    assert_eq!(m.status()["phase"], "none");
}

#[test]
fn with_the_agent_away_lag_is_unknown_and_the_cli_rides_out_a_controller_restart() {
    let source = Cluster::builder("source").logical().start();
    let mut m = Migration::new(source, MANY_TABLES);

    // `start` follows the copy; the controller restarts under it.
    let read = |name: &str| std::fs::read_to_string(m.install.path().join(name)).unwrap_or_default();
    let file = |name: &str| std::fs::File::create(m.install.path().join(name)).unwrap();
    let mut start = std::process::Command::new(harness::daemons::binary(harness::daemons::CLI))
        .args(["--api", &m.install.api(), "start", "--agent", "east", "--parallel", "2"])
        .stdout(file("start.out"))
        .stderr(file("start.err"))
        .spawn()
        .unwrap();
    mid_copy(&m);
    m.controller.kill();
    eventually(TIMEOUT, "start to say the migration goes on", || {
        read("start.err").contains("the migration goes on").then_some(())
    });
    assert!(
        start.try_wait().unwrap().is_none(),
        "start still follows: {}",
        read("start.err")
    );
    m.controller.restart();
    let code = start.wait().unwrap().code();
    let said = read("start.err");
    assert_eq!(code, Some(0), "start followed it to the end: {said}");
    assert!(
        said.contains("answers again") && !said.contains("transport error"),
        "{said}"
    );
    assert!(read("start.out").contains("phase streaming"), "{}", read("start.out"));

    let status = m.status();
    assert!(status["lag_bytes"].is_u64(), "known while the agent is there: {status}");
    m.agent.kill();
    let away = eventually(TIMEOUT, "status to show the agent away", || {
        let status = m.try_status()?;
        (status["waiting"]["agent"] == "east").then_some(status)
    });
    for unknown in ["lag_bytes", "lag_seconds", "retained_wal_bytes"] {
        assert!(away[unknown].is_null(), "{unknown} is unknown, not 0: {away}");
    }
    assert_eq!(away["phase"], "streaming", "{away}");
    assert!(away["waiting"]["since_unix_ms"].as_i64().unwrap() > 0, "{away}");

    // `status --watch` through another controller restart.
    let mut watch = std::process::Command::new(harness::daemons::binary(harness::daemons::CLI))
        .args(["--api", &m.install.api(), "status", "--watch"])
        .stdout(file("watch.out"))
        .stderr(file("watch.err"))
        .spawn()
        .unwrap();
    eventually(TIMEOUT, "the watch to draw", || {
        read("watch.out").contains("phase streaming").then_some(())
    });
    m.controller.kill();
    eventually(TIMEOUT, "the watch to say the controller is away", || {
        read("watch.err").contains("the migration goes on").then_some(())
    });
    assert!(
        watch.try_wait().unwrap().is_none(),
        "the watch goes on: {}",
        read("watch.err")
    );
    let drawn = read("watch.out").len();
    m.controller.restart();
    m.agent.restart();
    eventually(TIMEOUT, "the watch to draw again", || {
        (read("watch.out").len() > drawn).then_some(())
    });
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(!read("watch.err").contains("transport error"), "{}", read("watch.err"));
    eventually(TIMEOUT, "lag to be known again", || {
        let status = m.try_status()?;
        (status["lag_bytes"].is_u64() && status["waiting"].is_null()).then_some(())
    });
}
