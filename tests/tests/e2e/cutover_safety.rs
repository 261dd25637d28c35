//! A cutover that cannot hurt, and a source held as little as possible:
//! the lag gate sees a stuck subscriber (in seconds, not only bytes) and
//! refuses before fencing anything; the fence gives up on a locked table
//! in time without holding the other tables for the whole wait, and a
//! source cut off from its agent lifts it by itself; a slot invalidated by
//! `max_slot_wal_keep_size` is reported with its fix; an agent re-pointed
//! at another server is refused for the migration (steps, tunnel, copy
//! restart); `abort --force` ends a migration whose agent is gone.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use harness::Cluster;
use harness::daemons::eventually;
use serde_json::Value;

use crate::cutover::{
    SCHEMA, STREAM_TIMEOUT, cutover_holding_the_fence, fence_triggers, source_accepts_writes, start_streaming,
};
use crate::support::{DATABASE, LINK_TIMEOUT, Migration, Session, stall_the_target};

/// What a writer saw: each write's start and how long it took, and the
/// first error (a fenced write fails; a held one only waits).
#[derive(Debug, Default)]
struct Writes {
    done: Vec<(Instant, Duration)>,
    error: Option<String>,
}

impl Writes {
    /// The longest any write took that started in `[from, to]`.
    fn longest_between(&self, from: Instant, to: Instant) -> Duration {
        self.done
            .iter()
            .filter(|(at, _)| *at >= from && *at <= to)
            .map(|(_, took)| *took)
            .max()
            .unwrap_or_default()
    }

    fn count_between(&self, from: Instant, to: Instant) -> usize {
        self.done.iter().filter(|(at, _)| *at >= from && *at <= to).count()
    }
}

/// Inserts into `table` (a row per transaction) until `stop`, timing each
/// write; stops at the first error.
fn timed_writer(url: String, table: &'static str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Writes> {
    std::thread::spawn(move || {
        let session = Session::open(&url);
        let mut writes = Writes::default();
        while !stop.load(Ordering::SeqCst) {
            let at = Instant::now();
            match session.execute(&format!("INSERT INTO {table} (amount, note) VALUES (1, 'timed')")) {
                Ok(()) => writes.done.push((at, at.elapsed())),
                Err(e) => {
                    writes.error = Some(e.as_db_error().map(|d| d.message().to_owned()).unwrap_or(e.to_string()));
                    break;
                }
            }
            // A steady trickle, not a flood: the machine is shared.
            std::thread::sleep(Duration::from_millis(20));
        }
        writes
    })
}

/// Whether the agent's fence has a session on the source now.
/// The fence's sessions inside a transaction (the one that holds the
/// locks); an idle one on its way out, as the marker's is when the agent
/// is frozen right after it, holds nothing.
fn fence_session_count(m: &Migration) -> u64 {
    m.source
        .psql(
            DATABASE,
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = 'walbridge-agent-fence' AND xact_start IS NOT NULL",
        )
        .parse()
        .unwrap()
}

fn number(status: &Value, key: &str) -> f64 {
    status[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is a number: {status}"))
}

#[test]
fn a_stuck_subscriber_lags_in_seconds_and_the_gate_refuses_without_fencing() {
    let source = Cluster::builder("source").logical().start();
    let m = Migration::new(source, SCHEMA);
    start_streaming(&m);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = timed_writer(m.source.url(DATABASE), "orders", stop.clone());
    // Caught up while the subscriber applies.
    eventually(STREAM_TIMEOUT, "the lag to be under a second", || {
        let status = m.status();
        (status["lag_seconds"].as_f64()? < 1.0).then_some(())
    });

    // The apply worker blocks on a lock on the target; the source writes on.
    let stall = stall_the_target(&m);
    let first = eventually(Duration::from_secs(30), "the lag to pass 2 s", || {
        let status = m.status();
        (status["lag_seconds"].as_f64()? >= 2.0).then_some(status)
    });
    let later = eventually(Duration::from_secs(30), "the lag to grow by 2 s more", || {
        let status = m.status();
        (status["lag_seconds"].as_f64()? >= number(&first, "lag_seconds") + 2.0).then_some(status)
    });
    assert!(
        later["lag_bytes"].as_u64().unwrap() > first["lag_bytes"].as_u64().unwrap(),
        "the bytes grow too: {first} then {later}"
    );
    // The subscriber has stopped reporting: the source says so.
    assert!(number(&later, "reply_age_seconds") >= 2.0, "{later}");

    let fence_seen = Arc::new(AtomicBool::new(false));
    let watching = {
        let (fence_seen, stop, url) = (fence_seen.clone(), stop.clone(), m.source.url(DATABASE));
        std::thread::spawn(move || {
            let session = Session::open(&url);
            while !stop.load(Ordering::SeqCst) {
                let fences = session
                    .value("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'walbridge-agent-fence'")
                    .unwrap();
                if fences != "0" {
                    fence_seen.store(true, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let asked = Instant::now();
    let (code, cutover, stderr) = m.cli_json(&["cutover", "--max-lag", "1s", "--timeout", "4s", "--json"]);
    let answered = Instant::now();
    assert_eq!(code, Some(1), "the gate refuses: {stderr} {cutover}");
    let error = cutover["error"].as_str().unwrap();
    assert!(
        error.contains("did not come under") && error.contains("s behind") && error.contains("nothing was fenced"),
        "{cutover}"
    );
    let steps = cutover["steps"].to_string();
    assert!(!steps.contains("fence"), "no fence step: {cutover}");

    stop.store(true, Ordering::SeqCst);
    watching.join().unwrap();
    let writes = writer.join().unwrap();
    assert!(
        !fence_seen.load(Ordering::SeqCst),
        "the agent never opened a fence session"
    );
    assert_eq!(writes.error, None, "no write was refused");
    let longest = writes.longest_between(asked, answered);
    assert!(
        longest < Duration::from_millis(1500),
        "no write was held while the cutover waited: the longest took {longest:?}"
    );
    assert!(
        writes.count_between(asked, answered) >= 20,
        "the writer went on writing"
    );
    eprintln!(
        "lag while stuck: {} s / {} bytes, then {} s / {} bytes (reply {} s ago); the gate refused after {:?}; \
         the longest write meanwhile took {longest:?}",
        first["lag_seconds"],
        first["lag_bytes"],
        later["lag_seconds"],
        later["lag_bytes"],
        later["reply_age_seconds"],
        answered - asked
    );
    assert_eq!(fence_triggers(&m), "0");
    let status = m.status();
    assert_eq!(status["phase"], "streaming", "{status}");

    // Once the lock goes, the subscriber catches up and the lag is gone.
    stall.execute("ROLLBACK").unwrap();
    eventually(STREAM_TIMEOUT, "the lag to come back under a second", || {
        let status = m.status();
        (status["lag_seconds"].as_f64()? < 1.0).then_some(())
    });
}

/// Many tables, so the fence has some before the one it cannot have.
const MANY_TABLES: &str = "\
    DO $$ BEGIN FOR i IN 1..12 LOOP \
      EXECUTE format('CREATE TABLE wide_%s (id bigserial PRIMARY KEY, amount int, note text)', lpad(i::text, 2, '0')); \
      EXECUTE format('INSERT INTO wide_%s (amount) SELECT g FROM generate_series(1, 100) g', lpad(i::text, 2, '0')); \
    END LOOP; END $$;";

#[test]
fn a_fence_that_cannot_have_one_table_gives_up_in_time_without_holding_the_others() {
    let source = Cluster::builder("source").logical().start();
    let m = Migration::new(source, MANY_TABLES);
    start_streaming(&m);
    // An application transaction holds a lock on one of the tables...
    let blocker = Session::open(&m.source.url(DATABASE));
    blocker
        .execute("BEGIN; INSERT INTO wide_07 (amount, note) VALUES (1, 'open transaction')")
        .unwrap();
    let blocker_pid = blocker.value("SELECT pg_backend_pid()").unwrap();
    // ...while another writes to a table the fence locks before it.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = timed_writer(m.source.url(DATABASE), "wide_02", stop.clone());

    let asked = Instant::now();
    let (code, cutover, stderr) = m.cli_json(&["cutover", "--max-lag", "1h", "--timeout", "6s", "--json"]);
    let answered = Instant::now();
    stop.store(true, Ordering::SeqCst);
    let writes = writer.join().unwrap();
    assert_eq!(code, Some(1), "{stderr} {cutover}");
    let error = cutover["error"].as_str().unwrap();
    assert!(error.contains("could not fence writes"), "{cutover}");
    assert!(
        error.contains("wide_07") && error.contains(&format!("pg_terminate_backend({blocker_pid})")),
        "the error names the table and who holds it: {error}"
    );
    let took = answered - asked;
    assert!(
        took < Duration::from_secs(6 + 4),
        "it gave up within its deadline: {took:?}"
    );

    // The other table was never held for long: each attempt let go.
    assert_eq!(writes.error, None, "{writes:?}");
    let longest = writes.longest_between(asked, answered);
    assert!(
        longest < Duration::from_millis(1500),
        "the longest write to wide_02 waited {longest:?} while the fence tried for {took:?}"
    );
    assert!(
        writes.count_between(asked, answered) >= 20,
        "{} writes",
        writes.done.len()
    );
    let attempts = m
        .agent
        .log()
        .lines()
        .filter(|l| l.contains("the fence could not take every lock"))
        .count();
    assert!(attempts >= 2, "the fence tried again and again: {attempts} attempts");

    eprintln!(
        "fence gave up after {took:?} ({attempts} attempts); the longest write to another table waited {longest:?}, \
         {} writes meanwhile",
        writes.count_between(asked, answered)
    );
    blocker.execute("COMMIT").unwrap();
    m.source
        .try_psql(
            DATABASE,
            "SET lock_timeout = '5s'; INSERT INTO wide_07 (amount) VALUES (-1)",
        )
        .expect("the source accepts writes");
    assert_eq!(fence_triggers(&m), "0");
    assert_eq!(fence_session_count(&m), 0);
    assert_eq!(m.status()["phase"], "streaming");
}

#[test]
fn a_fence_whose_agent_is_frozen_is_lifted_by_the_source_itself() {
    let source = Cluster::builder("source").logical().start();
    let m = Migration::new(source, SCHEMA);
    start_streaming(&m);
    let stall = stall_the_target(&m);
    let cutover = cutover_holding_the_fence(&m, "6s");
    let held = Instant::now();
    // Neither the agent nor the controller can lift it now: the server must.
    let agent = nix::unistd::Pid::from_raw(m.agent.pid().unwrap() as i32);
    nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let lifted = eventually(Duration::from_secs(40), "the source to end the fence's session", || {
        (fence_session_count(&m) == 0).then(Instant::now)
    });
    nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGCONT).unwrap();
    // The cutover's deadline (6 s), the agent's margin (5 s) and the
    // server's (2 s): lifted by the bound, not before the deadline.
    let after = lifted - held;
    eprintln!("the source ended the frozen agent's fence {after:?} after it was held");
    assert!(
        after > Duration::from_secs(8) && after < Duration::from_secs(20),
        "lifted by the server's bound, a little after the deadline: {after:?}"
    );
    assert!(
        m.source.log_tail(400).contains("idle-in-transaction timeout"),
        "the server ended it: {}",
        m.source.log_tail(40)
    );
    source_accepts_writes(&m).expect("writes go on");
    let out = cutover.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    stall.execute("ROLLBACK").unwrap();
    assert_eq!(fence_triggers(&m), "0");
    m.wait_for_phase("streaming", STREAM_TIMEOUT);
}

#[test]
fn a_slot_invalidated_by_max_slot_wal_keep_size_is_reported_with_its_fix() {
    let source = Cluster::builder("source")
        .logical()
        .setting("max_slot_wal_keep_size", "1MB")
        .start();
    let m = Migration::new(
        source,
        &format!("{SCHEMA} CREATE TABLE filler (id bigserial PRIMARY KEY, pad text);"),
    );
    start_streaming(&m);
    let subscription = m.target.psql(DATABASE, "SELECT subname FROM pg_subscription");
    // The subscriber pauses; the source writes more WAL than the slot may keep.
    m.target
        .psql(DATABASE, &format!("ALTER SUBSCRIPTION {subscription} DISABLE"));
    let slot = m.status()["slot"].as_str().unwrap().to_owned();
    let before = eventually(Duration::from_secs(60), "the slot to be beyond its limit", || {
        m.source.psql(
            DATABASE,
            "INSERT INTO filler (pad) SELECT repeat(md5(g::text), 32) FROM generate_series(1, 4000) g",
        );
        let status = m.status();
        (status["wal_status"] == "unreserved").then_some(status)
    });
    // Warned before it is lost.
    assert!(
        before["warnings"].to_string().contains("max_slot_wal_keep_size"),
        "{before}"
    );
    assert!(before["safe_wal_bytes"].as_i64().is_some_and(|b| b <= 0), "{before}");
    // The next checkpoint invalidates it.
    m.source.psql(DATABASE, "CHECKPOINT");
    assert_eq!(
        m.source.psql(
            DATABASE,
            &format!("SELECT wal_status FROM pg_replication_slots WHERE slot_name = '{slot}'")
        ),
        "lost"
    );
    let failed = m.wait_for_phase("failed", Duration::from_secs(30));
    let error = failed["errors"].to_string();
    for needed in [
        "invalidated",
        "wal_status = lost",
        "raise max_slot_wal_keep_size",
        "start again",
        "slot_lost",
    ] {
        assert!(error.contains(needed), "{needed:?} in {error}");
    }
    assert!(
        m.controller.log().contains("was invalidated on the source"),
        "the log says it too"
    );
    // The failure released the source: nothing of the migration holds it.
    eventually(
        Duration::from_secs(30),
        "the slot and publication to be dropped",
        || (m.source_replication_objects() == (String::new(), String::new())).then_some(()),
    );
}

#[test]
fn a_slot_lost_while_the_copy_holds_it_fails_the_migration_with_its_fix() {
    let source = Cluster::builder("source")
        .logical()
        .setting("max_slot_wal_keep_size", "1MB")
        .start();
    let m = Migration::new(
        source,
        &format!("{SCHEMA} CREATE TABLE filler (id bigserial PRIMARY KEY, pad text);"),
    );
    let (rival, mut start, held) = hold_in_pre_data(&m);
    let slot = held["slot"].as_str().unwrap().to_owned();
    // Before any subscriber exists, the slot is watched all the same.
    let warned = eventually(
        Duration::from_secs(60),
        "a warning while the copy holds the slot",
        || {
            m.source.psql(
                DATABASE,
                "INSERT INTO filler (pad) SELECT repeat(md5(g::text), 32) FROM generate_series(1, 4000) g",
            );
            let status = m.status();
            (status["wal_status"] == "unreserved" && status["warnings"].to_string().contains("max_slot_wal_keep_size"))
                .then_some(status)
        },
    );
    assert_eq!(warned["phase"], "schema_pre_data", "{warned}");
    m.source.psql(DATABASE, "CHECKPOINT");
    let failed = m.wait_for_phase("failed", Duration::from_secs(30));
    let error = failed["errors"].to_string();
    assert!(
        error.contains(&format!("replication slot {slot} was invalidated")) && error.contains("slot_lost"),
        "{error}"
    );
    eventually(Duration::from_secs(30), "the source to be released", || {
        (m.source_replication_objects() == (String::new(), String::new())).then_some(())
    });
    rival.execute("ROLLBACK").unwrap();
    let _ = start.kill();
    let _ = start.wait();
}

#[test]
fn an_agent_re_pointed_at_another_server_is_refused_for_the_streaming_migration() {
    let source = Cluster::builder("source").logical().start();
    let other = Cluster::builder("other").logical().start();
    other.create_database(DATABASE);
    other.psql(DATABASE, SCHEMA);
    let mut m = Migration::new(source, SCHEMA);
    start_streaming(&m);
    let other_system = other.psql(DATABASE, "SELECT system_identifier FROM pg_control_system()");

    // The same name, another server: a restored or re-pointed source.
    m.agent.kill();
    let mut impostor = m.install.start_agent("east", &other.url(DATABASE));
    let refused = eventually(Duration::from_secs(30), "status to say the agent is refused", || {
        let status = m.status();
        status["warnings"]
            .to_string()
            .contains("refused for this migration")
            .then_some(status)
    });
    assert!(refused["warnings"].to_string().contains(&other_system), "{refused}");
    assert!(
        refused["lag_bytes"].is_null() && refused["retained_wal_bytes"].is_null(),
        "{refused}"
    );
    // The subscription's worker comes back through the tunnel, and is not
    // carried to the other server.
    m.controller.wait_for_log_line(
        Duration::from_secs(40),
        &["tunnel connection closed", "refused", "now reaches"],
    );
    assert_eq!(
        other.psql(
            DATABASE,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'"
        ),
        "0"
    );
    for (what, args) in [
        ("cutover", vec!["cutover", "--timeout", "5s"]),
        ("verify", vec!["verify"]),
        ("abort", vec!["abort"]),
    ] {
        let out = m.cli(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
        assert!(stderr.contains("now reaches"), "{what} says why: {stderr}");
    }
    // Nothing was made, or dropped, on the other server.
    assert_eq!(
        other.psql(
            DATABASE,
            "SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) FROM pg_publication) \
             + (SELECT count(*) FROM pg_roles WHERE rolname LIKE 'walbridge%')"
        ),
        "0"
    );

    // Pointed back, it is the migration's agent again.
    impostor.kill();
    m.agent.restart();
    eventually(STREAM_TIMEOUT, "the subscription to stream again", || {
        let status = m.status();
        (status["subscription"] == "streaming" && !status["warnings"].to_string().contains("refused")).then_some(())
    });
    m.source
        .psql(DATABASE, "INSERT INTO orders (id, amount) VALUES (999001, 5)");
    eventually(STREAM_TIMEOUT, "a new row to stream", || {
        (m.target.psql(DATABASE, "SELECT count(*) FROM orders WHERE id = 999001") == "1").then_some(())
    });
}

/// Starts the migration and holds it once it has its slot and snapshot:
/// the slot's creation waits for a transaction while the test makes the
/// target's pre-data wait for another (a table of the same name, created
/// and not committed), then lets the slot be made. Returns the rival
/// session (rolling it back lets pre-data go on), the CLI following the
/// start, and the status while held.
fn hold_in_pre_data(m: &Migration) -> (Session, std::process::Child, Value) {
    let xid_holder = Session::open(&m.source.url(DATABASE));
    xid_holder.execute("BEGIN; SELECT txid_current()").unwrap();
    let start = m.start_in_background(&[]);
    eventually(Duration::from_secs(60), "the slot's creation to wait", || {
        let waiting = m.source.psql(
            DATABASE,
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE a.backend_type = 'walsender' AND l.locktype = 'transactionid' AND NOT l.granted",
        );
        (waiting == "1").then_some(())
    });
    let rival = Session::open(&m.target.url(DATABASE));
    rival.execute("BEGIN; CREATE TABLE public.orders (rival int)").unwrap();
    xid_holder.execute("COMMIT").unwrap();
    let held = eventually(Duration::from_secs(60), "pre-data to wait on the target", || {
        let status = m.status();
        let waiting = m.target.psql(
            DATABASE,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
        );
        (status["phase"] == "schema_pre_data" && waiting != "0").then_some(status)
    });
    (rival, start, held)
}

#[test]
fn an_agent_re_pointed_mid_copy_is_never_used_to_copy_again() {
    let source = Cluster::builder("source").logical().start();
    let other = Cluster::builder("other").logical().start();
    other.create_database(DATABASE);
    other.psql(DATABASE, SCHEMA);
    let mut m = Migration::new(source, SCHEMA);
    let nothing_on_other = || {
        other.psql(
            DATABASE,
            "SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) FROM pg_publication) \
             + (SELECT count(*) FROM pg_roles WHERE rolname LIKE 'walbridge%')",
        ) == "0"
    };
    let (rival, mut start, held) = hold_in_pre_data(&m);
    let first_slot = held["slot"].as_str().unwrap().to_owned();

    // The agent comes back pointed at another server: its snapshot is
    // gone, and the copy must neither read from it nor start again there.
    m.agent.kill();
    let mut impostor = m.install.start_agent("east", &other.url(DATABASE));
    eventually(LINK_TIMEOUT, "the impostor to connect", || {
        m.install.connected_agent("east")
    });
    rival.execute("ROLLBACK").unwrap();
    let waiting = eventually(Duration::from_secs(60), "the copy to wait, saying why", || {
        let status = m.status();
        status["waiting"]["reason"]
            .as_str()?
            .contains("now reaches")
            .then_some(status)
    });
    assert_eq!(waiting["phase"], "copy", "{waiting}");
    assert_eq!(waiting["copy_restarts"], 0, "{waiting}");
    assert_eq!(waiting["slot"], first_slot.as_str(), "{waiting}");
    assert!(nothing_on_other(), "nothing was made on the other server");
    assert_eq!(
        m.target.psql(DATABASE, "SELECT count(*) FROM orders"),
        "0",
        "nothing was copied from the other server"
    );

    // Pointed back: the lost snapshot restarts the copy, on the right server.
    impostor.kill();
    m.agent.restart();
    let streaming = m.wait_for_phase("streaming", STREAM_TIMEOUT);
    assert_eq!(streaming["copy_restarts"], 1, "{streaming}");
    assert_ne!(streaming["slot"], first_slot.as_str(), "{streaming}");
    assert!(
        streaming["events"].to_string().contains("restarts from a new slot"),
        "{streaming}"
    );
    assert!(nothing_on_other());
    let (code, verify, stderr) = m.cli_json(&["verify", "--json"]);
    assert_eq!(code, Some(0), "verify: {stderr} {verify}");
    let _ = start.kill();
    let _ = start.wait();
}

#[test]
fn abort_force_with_the_agent_gone_ends_the_migration_and_prints_the_sql_for_the_source() {
    let source = Cluster::builder("source").logical().start();
    let mut m = Migration::new(source, SCHEMA);
    start_streaming(&m);
    let (slot, publication) = m.source_replication_objects();
    assert!(!slot.is_empty() && !publication.is_empty());
    m.agent.kill();
    eventually(LINK_TIMEOUT, "the controller to see the agent gone", || {
        m.install.connected_agent("east").is_none().then_some(())
    });

    let out = m.cli(&["abort"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("abort --force"), "{stderr}");

    let (code, aborted, stderr) = m.cli_json(&["abort", "--force", "--json"]);
    assert_eq!(code, Some(0), "{stderr} {aborted}");
    assert_eq!(aborted["phase"], "aborted", "{aborted}");
    let removed = aborted["removed"].to_string();
    assert!(
        removed.contains("subscription") && removed.contains("walbridge_state"),
        "{removed}"
    );
    assert_eq!(m.target.psql(DATABASE, "SELECT count(*) FROM pg_subscription"), "0");
    assert_eq!(
        m.target.psql(
            DATABASE,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'walbridge_state'"
        ),
        "0"
    );
    // What remains on the source is listed, and still there...
    let sql: Vec<String> = aborted["source_sql"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    let all = sql.join(" ");
    assert!(
        all.contains(&slot) && all.contains(&publication) && all.contains("DROP ROLE"),
        "{all}"
    );
    assert_eq!(m.source_replication_objects(), (slot.clone(), publication.clone()));
    let roles = || {
        m.source.psql(
            DATABASE,
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'walbridge\\_%'",
        )
    };
    assert_eq!(roles(), "1");
    // ...until the printed SQL is run there.
    for statement in &sql {
        m.source.psql(DATABASE, statement);
    }
    assert_eq!(m.source_replication_objects(), (String::new(), String::new()));
    assert_eq!(roles(), "0");
    assert_eq!(m.status()["phase"], "aborted");
}

#[test]
fn a_slot_creation_blocked_past_its_deadline_fails_naming_the_blocker_and_leaves_nothing() {
    let source = Cluster::builder("source").logical().start();
    let m = Migration::with_controller_args(source, SCHEMA, &["--snapshot-create-timeout", "2s"]);
    // Young enough for preflight to let it pass; it holds an xid.
    let blocker = Session::open(&m.source.url(DATABASE));
    blocker
        .execute("SET application_name = 'the-app'; BEGIN; SELECT txid_current()")
        .unwrap();
    let pid = blocker.value("SELECT pg_backend_pid()").unwrap();
    let (code, started, stderr) = m.cli_json(&["start", "--agent", "east", "--json"]);
    assert_eq!(code, Some(1), "{stderr} {started}");
    let status = m.wait_for_phase("failed", Duration::from_secs(30));
    let error = status["errors"].to_string();
    for needed in [
        "cannot create the replication slot".to_owned(),
        "its deadline".to_owned(),
        format!("pid {pid}"),
        "the-app".to_owned(),
        format!("pg_terminate_backend({pid})"),
        "blocked".to_owned(),
    ] {
        assert!(error.contains(&needed), "{needed:?} in {error}");
    }
    // Nothing is left holding the source.
    eventually(Duration::from_secs(15), "no slot or publication on the source", || {
        (m.source_replication_objects() == (String::new(), String::new())).then_some(())
    });
    blocker.execute("ROLLBACK").unwrap();
}
