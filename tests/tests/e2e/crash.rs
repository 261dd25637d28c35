//! Every step safe to repeat, proven by crashing: the daemons built with
//! their crash points (`walbridge_migration::failpoint`) are killed — by
//! SIGKILL, as `kill -9` would — at every point of a live migration, each
//! restarted at once; the migration must go on to its end with every
//! acknowledged write of a concurrent writer on the target, `verify`
//! exact, and nothing of walbridge's left on either side after cleanup.
//!
//! The walk arms every point still ahead of it in each daemon, so each
//! daemon dies at the first one it reaches, which must be the next in the
//! catalogue's order (a point never reached fails the walk), and restarts
//! armed with the rest. One migration passes them all, each crash where
//! the run naturally gets there: a point is proven by the run carrying on
//! past it, and at each cutover point by the outcome the restart resolved
//! (rolled back: the fence lifted and streaming again; or cut over).

use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use harness::Cluster;
use harness::daemons::{AGENT, CLI, CONTROLLER, Daemon, binary, eventually};
use serde_json::Value;
use walbridge_migration::failpoint as fp;

use crate::cutover::{Acknowledged, SCHEMA, assert_acknowledged_on_target, fence_triggers, source_accepts_writes};
use crate::support::{DATABASE, Install, LINK_TIMEOUT, Migration};

/// How long any one wait of these tests may take.
const WAIT: Duration = Duration::from_secs(120);

/// The cutover schema, and: a table split into page ranges (with
/// `--copy-split-bytes` below its size), an index, a materialized view.
const WALK_SCHEMA: &str = "\
    CREATE TABLE wide (id int PRIMARY KEY, pad text); \
    INSERT INTO wide SELECT i, repeat(md5(i::text), 4) FROM generate_series(1, 8000) i; \
    CREATE INDEX orders_amount ON orders (amount); \
    CREATE MATERIALIZED VIEW wide_summary AS SELECT count(*) AS n, sum(id) AS total FROM wide;";
const SPLIT_BYTES: &str = "300000";

/// `FAILPOINTS` that crash at each of `points`.
fn armed(points: &[&str]) -> String {
    points
        .iter()
        .map(|p| format!("{p}=return"))
        .collect::<Vec<_>>()
        .join(";")
}

/// A migration between fresh clusters whose daemons carry crash points,
/// armed as given (`FAILPOINTS` syntax). The target retries a broken subscription connection
/// quickly: the tunnel breaks with every controller restart.
fn crashable(
    schema: &str,
    controller_extra: &[&str],
    controller_failpoints: &str,
    agent_failpoints: &str,
) -> Migration {
    let source = Cluster::builder("source").logical().start();
    source.create_database(DATABASE);
    source.psql(DATABASE, schema);
    let target = Cluster::builder("target")
        .setting("wal_retrieve_retry_interval", "100ms")
        .start();
    target.create_database(DATABASE);
    let install = Install::new("localhost", &["east"]);
    let controller = Daemon::start_with_failpoints(
        "controller",
        CONTROLLER,
        &[
            install.controller_args(),
            vec!["--target-url".into(), target.url(DATABASE)],
            controller_extra.iter().map(|a| a.to_string()).collect(),
        ]
        .concat(),
        controller_failpoints,
        install.path(),
    );
    let agent = Daemon::start_with_failpoints(
        "agent-east",
        AGENT,
        &install.agent_args("east", &source.url(DATABASE), "localhost"),
        agent_failpoints,
        install.path(),
    );
    eventually(LINK_TIMEOUT, "agent east to connect", || {
        install.connected_agent("east")
    });
    Migration {
        controller,
        agent,
        source,
        target,
        install,
    }
}

/// The point `daemon` (which has ended) crashed at: it must have died by
/// SIGKILL, with the point's line the last of its log.
fn crash_point_of(daemon: &mut Daemon) -> String {
    let status = daemon.wait_for_exit(Duration::from_secs(5));
    assert_eq!(
        status.signal(),
        Some(9),
        "the daemon ended otherwise than at a crash point: {status:?}\n{}",
        daemon.log()
    );
    let log = daemon.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("crash point reached"))
        .unwrap_or_else(|| panic!("no crash point in the log of a daemon killed by SIGKILL"));
    let at = line.find("failpoint=").expect("the crash line names its point") + "failpoint=".len();
    line[at..].split_whitespace().next().unwrap_or_default().to_owned()
}

/// A daemon that crashed: checks it died at the first point left for it,
/// which is now done, and restarts it armed with the rest.
fn restart_after_crash(daemon: &mut Daemon, left: &mut Vec<&'static str>) -> &'static str {
    let point = crash_point_of(daemon);
    assert_eq!(
        Some(point.as_str()),
        left.first().copied(),
        "crashed at {point}, but {left:?} were left, in the order a migration reaches them"
    );
    let point = left.remove(0);
    daemon.arm(&armed(left));
    daemon.restart();
    point
}

/// Starts a `--copy-only` migration copying `parallel` units at once and
/// waits until the controller dies at a crash point; returns the point.
fn copy_until_the_controller_crashes(m: &mut Migration, parallel: &str) -> String {
    let mut start = m.start_in_background(&["--copy-only", "--parallel", parallel]);
    eventually(WAIT, "the controller to crash", || {
        (!m.controller.is_running()).then_some(())
    });
    let _ = start.kill();
    let _ = start.wait();
    crash_point_of(&mut m.controller)
}

/// What is left to crash at, and what has crashed so far.
struct Walk {
    controller: Vec<&'static str>,
    agent: Vec<&'static str>,
    crashed: Vec<&'static str>,
}

impl Walk {
    /// Waits until `reached` holds of status (given how many crashes
    /// there were), restarting each daemon that crashes meanwhile.
    fn until(&mut self, m: &mut Migration, what: &str, mut reached: impl FnMut(&Value, usize) -> bool) -> Value {
        let before = self.crashed.len();
        loop {
            let crashed = self.crashed.len() - before;
            let mut last = None;
            let outcome = eventually(WAIT, &format!("{what} (crashed at {:?})", self.crashed), || {
                if !m.controller.is_running() || !m.agent.is_running() {
                    return Some(None);
                }
                let status = m.try_status();
                if let Some(status) = &status {
                    assert_ne!(status["phase"], "failed", "the migration failed: {status}");
                    if reached(status, crashed) {
                        return Some(Some(status.clone()));
                    }
                }
                if last.as_ref() != status.as_ref() {
                    eprintln!(
                        "{what}: status now {}",
                        status.as_ref().map_or("(no answer)".to_owned(), |s| format!(
                            "phase {} subscription {} cutover {}",
                            s["phase"], s["subscription"], s["cutover"]
                        ))
                    );
                    last = status;
                }
                None
            });
            match outcome {
                Some(status) => return status,
                None if !m.controller.is_running() => {
                    let point = restart_after_crash(&mut m.controller, &mut self.controller);
                    self.crashed.push(point);
                }
                None => {
                    let point = restart_after_crash(&mut m.agent, &mut self.agent);
                    self.crashed.push(point);
                }
            }
        }
    }
}

/// The source is free and the subscription streams: a write on the source
/// reaches the target.
fn assert_streaming_again(m: &Migration, after: &str) {
    assert_eq!(fence_triggers(m), "0", "{after}: rolled back, the fence must be gone");
    let id = source_accepts_writes(m).unwrap_or_else(|e| panic!("{after}: the source refuses writes: {e}"));
    let deadline = Instant::now() + WAIT;
    while m
        .target
        .psql(DATABASE, &format!("SELECT count(*) FROM orders WHERE id = {id}"))
        != "1"
    {
        assert!(
            Instant::now() < deadline,
            "{after}: order {id} did not stream to the target within {WAIT:?}\n{}",
            replication_state(m)
        );
    }
}

/// What both servers say of the replication, for a failure's message.
fn replication_state(m: &Migration) -> String {
    let source = m.source.psql(
        DATABASE,
        "SELECT string_agg(format('%s %s sent %s flush %s replay %s', pid, state, sent_lsn, flush_lsn, replay_lsn), '; ') \
         FROM pg_stat_replication",
    );
    let slots = m.source.psql(
        DATABASE,
        "SELECT string_agg(format('%s active %s confirmed %s now %s', slot_name, active, confirmed_flush_lsn, \
         pg_current_wal_lsn()), '; ') FROM pg_replication_slots",
    );
    let source_activity = m.source.psql(
        DATABASE,
        "SELECT string_agg(format('%s %s %s %s:%s %s', pid, application_name, state, wait_event_type, wait_event, \
         left(query, 60)), E'\n') FROM pg_stat_activity WHERE datname IS NOT NULL OR backend_type = 'walsender'",
    );
    let target = m.target.psql(
        DATABASE,
        "SELECT string_agg(format('%s pid %s received %s latest_end %s', subname, pid, received_lsn, latest_end_lsn), \
         '; ') FROM pg_stat_subscription",
    );
    let target_activity = m.target.psql(
        DATABASE,
        "SELECT string_agg(format('%s %s %s %s %s:%s %s', pid, backend_type, application_name, state, \
         wait_event_type, wait_event, left(query, 60)), E'\n') FROM pg_stat_activity",
    );
    format!(
        "source walsenders: {source}\nslots: {slots}\nsource sessions:\n{source_activity}\ntarget \
         subscriptions: {target}\ntarget sessions:\n{target_activity}\nstatus: {}",
        m.try_status().map(|s| s.to_string()).unwrap_or_default()
    )
}

/// The target stands alone, the source is fenced.
fn assert_cut_over(m: &Migration, after: &str) {
    let status = m.status();
    assert_eq!(status["phase"], "cut_over", "{after}: {status}");
    assert_eq!(status["subscription"], "detached", "{after}: {status}");
    let refused = source_accepts_writes(m).expect_err("a cut-over source refuses writes");
    assert!(refused.contains("fenced"), "{after}: {refused}");
}

/// Nothing of walbridge's on either side: no slot, publication, role,
/// fence or walsender on the source; no subscription, origin or
/// walbridge schema on the target.
fn assert_nothing_left(m: &Migration) {
    let on_source = |sql: &str| m.source.psql(DATABASE, sql);
    let on_target = |sql: &str| m.target.psql(DATABASE, sql);
    assert_eq!(m.source_replication_objects(), (String::new(), String::new()));
    assert_eq!(
        on_source("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'walbridge%'"),
        "0"
    );
    assert_eq!(
        on_source("SELECT count(*) FROM pg_namespace WHERE nspname = 'walbridge_fence'"),
        "0"
    );
    assert_eq!(fence_triggers(m), "0");
    assert_eq!(
        on_source("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'"),
        "0"
    );
    assert_eq!(on_target("SELECT count(*) FROM pg_subscription"), "0");
    assert_eq!(on_target("SELECT count(*) FROM pg_replication_origin"), "0");
    assert_eq!(
        on_target("SELECT count(*) FROM pg_namespace WHERE nspname = 'walbridge_state'"),
        "0"
    );
}

/// A writer like the cutover tests' (inserts, updates, deletes, each
/// acknowledged on its own), paced: it runs for the whole walk, and the
/// target must keep up with it through every restart. (The ledger's
/// updates, which the target applies by scanning the table, are left out:
/// over a minute they would make the target fall behind by itself.)
fn writer(url: String, stop: Arc<AtomicBool>) -> JoinHandle<Acknowledged> {
    std::thread::spawn(move || {
        let session = crate::support::Session::open(&url);
        let mut acked = Acknowledged::default();
        let mut i: i64 = 0;
        while !stop.load(Ordering::SeqCst) {
            i += 1;
            let step = (|| -> Result<(), tokio_postgres::Error> {
                let amount = (i % 1000) as i32;
                let id: i64 = session
                    .value(&format!(
                        "INSERT INTO orders (amount, note) VALUES ({amount}, 'live') RETURNING id"
                    ))?
                    .parse()
                    .unwrap();
                acked.orders.insert(id, Some(amount));
                if i % 3 == 0 {
                    let updated = session.value(&format!(
                        "UPDATE orders SET amount = amount + 1 WHERE id = {} RETURNING amount",
                        id - 2
                    ))?;
                    if let Ok(updated) = updated.parse() {
                        acked.orders.insert(id - 2, Some(updated));
                    }
                }
                if i % 5 == 0 {
                    session.execute(&format!("DELETE FROM orders WHERE id = {}", id - 4))?;
                    acked.orders.insert(id - 4, None);
                }
                let event: i64 = session
                    .value(&format!(
                        "INSERT INTO events (at, payload) VALUES (date '2024-06-01' + {}, '{{\"live\": {i}}}') \
                         RETURNING id",
                        i % 400
                    ))?
                    .parse()
                    .unwrap();
                acked.events.push(event);
                session.execute(&format!("INSERT INTO ledger VALUES ({}, {i}, 'live')", i % 10))?;
                acked.ledger_writes += 1;
                Ok(())
            })();
            if let Err(e) = step {
                acked.stopped_by = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or(e.to_string());
                break;
            }
            // Pacing a load, not waiting for anything.
            std::thread::sleep(Duration::from_millis(10));
        }
        acked
    })
}

/// The writers of one run: a new one starts whenever the last was stopped
/// by a fence that was then lifted.
struct Writers {
    url: String,
    stop: Arc<AtomicBool>,
    running: Option<JoinHandle<Acknowledged>>,
    acknowledged: Acknowledged,
}

impl Writers {
    fn start(m: &Migration) -> Writers {
        let mut writers = Writers {
            url: m.source.url(DATABASE),
            stop: Arc::new(AtomicBool::new(false)),
            running: None,
            acknowledged: Acknowledged::default(),
        };
        writers.keep_writing();
        writers
    }

    /// A writer runs (a new one if the last one stopped).
    fn keep_writing(&mut self) {
        if self.running.as_ref().is_some_and(|w| !w.is_finished()) {
            return;
        }
        self.collect();
        self.running = Some(writer(self.url.clone(), self.stop.clone()));
    }

    fn collect(&mut self) {
        if let Some(done) = self.running.take() {
            let acked = done.join().expect("the writer does not panic");
            self.acknowledged.orders.extend(acked.orders);
            self.acknowledged.events.extend(acked.events);
            self.acknowledged.ledger_writes += acked.ledger_writes;
            self.acknowledged.stopped_by = acked.stopped_by;
        }
    }

    /// Every write acknowledged by any of them.
    fn finish(mut self) -> Acknowledged {
        self.stop.store(true, Ordering::SeqCst);
        self.collect();
        self.acknowledged
    }
}

/// What an ended child printed.
fn output_of(child: &mut std::process::Child) -> String {
    use std::io::Read;
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut out);
    }
    out
}

fn cutover_in_background(m: &Migration, max_lag: &str) -> std::process::Child {
    std::process::Command::new(binary(CLI))
        .args([
            "--api",
            &m.install.api(),
            "cutover",
            "--max-lag",
            max_lag,
            "--timeout",
            "60s",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("walbridge cutover runs")
}

/// The points of the walk, in the order a migration reaches them; the
/// rest of the catalogue (those past the point of no return) is walked by
/// [`after_the_point_of_no_return_every_crash_finishes_what_it_began`].
const WALKED_BEFORE_NO_RETURN: &[&str] = &[
    fp::START_RECORDED,
    fp::SNAPSHOT_TAKEN,
    fp::SNAPSHOT_RECORDED,
    fp::PRE_DATA_COMMITTED,
    fp::PRE_DATA_RECORDED,
    fp::COPY_UNIT_COMMITTED,
    fp::COPY_DONE,
    fp::COPY_RECORDED,
    fp::RELEASE_DONE,
    fp::RELEASE_RECORDED,
    fp::POST_DATA_STATEMENT_COMMITTED,
    fp::POST_DATA_DONE,
    fp::POST_DATA_RECORDED,
    fp::SUBSCRIBE_CREATED,
    fp::SUBSCRIBE_RECORDED,
    fp::CUTOVER_STARTED,
    fp::CUTOVER_FENCED,
    fp::CUTOVER_SEALED,
    fp::CUTOVER_DISABLE_COMMITTED,
    fp::CUTOVER_DISABLE_RECORDED,
    fp::CUTOVER_DETACH_COMMITTED,
];

/// The points walked past the point of no return (and in the cleanup).
const WALKED_AFTER_NO_RETURN: &[&str] = &[fp::CUTOVER_RECORDED, fp::TEARDOWN_TARGET_REMOVED, fp::TEARDOWN_RECORDED];

/// Points proven by a test of their own instead of a walk: a post-data
/// statement commits during the copy only when a table finishes before
/// the last one does, which the walk's schema does not promise.
const TESTED_APART: &[&str] = &[fp::COPY_POST_DATA_COMMITTED];

#[test]
fn the_walks_cover_every_crash_point_in_order() {
    let walked: Vec<&str> = fp::CONTROLLER
        .iter()
        .copied()
        .filter(|point| !TESTED_APART.contains(point))
        .collect();
    assert_eq!(
        [WALKED_BEFORE_NO_RETURN, WALKED_AFTER_NO_RETURN].concat(),
        walked,
        "a crash point of the controller's that no walk crashes at"
    );
    assert!(TESTED_APART.iter().all(|point| fp::CONTROLLER.contains(point)));
}

#[test]
fn a_post_data_statement_committed_during_the_copy_is_applied_once_after_a_crash() {
    // One table at a time: the copy hands the first table finished to
    // post-data, which builds its key while the second table copies; the
    // controller dies right after that commit, before anything is
    // journaled. Applying the key again would fail ("already exists").
    let mut m = crashable(
        "CREATE TABLE first (id int PRIMARY KEY, note text); \
         INSERT INTO first SELECT i, md5(i::text) FROM generate_series(1, 20000) i; \
         CREATE INDEX first_note ON first (note); \
         CREATE TABLE second (id int PRIMARY KEY, note text); \
         INSERT INTO second SELECT i, md5(i::text) FROM generate_series(1, 20000) i; \
         CREATE INDEX second_note ON second (note);",
        &[],
        &armed(&[fp::COPY_POST_DATA_COMMITTED]),
        "",
    );
    assert_eq!(
        copy_until_the_controller_crashes(&mut m, "1"),
        fp::COPY_POST_DATA_COMMITTED
    );
    let applied_before: u64 = m
        .target
        .psql(DATABASE, "SELECT count(*) FROM walbridge_state.post_data")
        .parse()
        .unwrap();
    assert!(applied_before >= 1, "a statement committed before the crash");

    m.controller.arm("");
    m.controller.restart();
    let status = m.wait_for_phase("copied", WAIT);
    assert!(crate::support::every_table_verified(&status), "{status}");
    assert_eq!(
        m.target.psql(
            DATABASE,
            "SELECT string_agg(indexname, ',' ORDER BY indexname) FROM pg_indexes WHERE schemaname = 'public'"
        ),
        "first_note,first_pkey,second_note,second_pkey"
    );
}

#[test]
fn a_kill_9_at_every_step_boundary_of_either_daemon_leaves_a_migration_that_completes() {
    let started = Instant::now();
    let controller_left = WALKED_BEFORE_NO_RETURN.to_vec();
    let agent_left = fp::AGENT.to_vec();
    let mut m = crashable(
        &format!("{SCHEMA} {WALK_SCHEMA}"),
        &["--copy-split-bytes", SPLIT_BYTES],
        &armed(&controller_left),
        &armed(&agent_left),
    );
    let mut writers = Writers::start(&m);
    let mut walk = Walk {
        controller: controller_left,
        agent: agent_left,
        crashed: Vec::new(),
    };

    // The initial sync, crashed at every boundary, to streaming.
    let mut start = m.start_in_background(&["--parallel", "2"]);
    let status = walk.until(&mut m, "the migration to stream", |status, _| {
        status["phase"] == "streaming" && status["subscription"] == "streaming"
    });
    let _ = start.kill();
    let _ = start.wait();
    assert_streaming_again(&m, "the initial sync");
    assert_eq!(
        walk.controller.first(),
        Some(&fp::CUTOVER_STARTED),
        "every point of the initial sync was reached: {:?}",
        walk.crashed
    );
    assert_eq!(
        walk.agent,
        [fp::AGENT_FENCE_HELD, fp::AGENT_FENCE_SEALED],
        "{:?}",
        walk.crashed
    );
    let wide = status["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "public.wide")
        .unwrap();
    assert!(wide["ranges"].as_u64().unwrap() > 1, "wide was split: {wide}");
    assert!(
        status["copy_restarts"].as_u64().unwrap() >= 1,
        "the agent's crash mid-copy restarted the copy: {status}"
    );
    let synced = started.elapsed();

    // Cutovers, each crashed at the next point and resolved by the
    // restart — rolled back before the point of no return, done after
    // it — until one is past it.
    loop {
        writers.keep_writing();
        eventually(LINK_TIMEOUT, "the agent to be connected", || {
            m.install.connected_agent("east")
        });
        let mut cutover = cutover_in_background(&m, "5s");
        let mut ended = None;
        let status = walk.until(&mut m, "the cutover to crash and be resolved", |status, crashed| {
            // A cutover that ended with no daemon dead for a while reached
            // no crash point (a crash is seen within a poll or two).
            if crashed == 0
                && let Ok(Some(exit)) = cutover.try_wait()
            {
                let since = *ended.get_or_insert_with(Instant::now);
                assert!(
                    since.elapsed() < Duration::from_secs(5),
                    "the cutover ended ({exit}) without reaching a crash point: {}\n{status}",
                    output_of(&mut cutover)
                );
            }
            crashed > 0 && matches!(status["phase"].as_str(), Some("streaming" | "cut_over"))
        });
        let _ = cutover.kill();
        let _ = cutover.wait();
        let point = *walk.crashed.last().unwrap();
        eventually(LINK_TIMEOUT, "the agent to connect again", || {
            m.install.connected_agent("east")
        });
        if point == fp::CUTOVER_DETACH_COMMITTED {
            assert_cut_over(&m, point);
            assert_eq!(m.status()["cutover"]["done"], true, "{point}");
            break;
        }
        assert_eq!(
            status["phase"], "streaming",
            "{point}: rolled back, not cut over: {status}"
        );
        let report = &status["cutover"];
        assert!(
            report["done"] == false && !report["error"].as_str().unwrap_or_default().is_empty(),
            "{point}: the last cutover is reported failed: {status}"
        );
        eventually(WAIT, &format!("{point}: the subscription to stream again"), || {
            (m.status()["subscription"] == "streaming").then_some(())
        });
        assert_streaming_again(&m, point);
    }
    assert!(
        walk.controller.is_empty() && walk.agent.is_empty(),
        "{:?} {:?}",
        walk.controller,
        walk.agent
    );

    let acknowledged = writers.finish();
    assert!(acknowledged.stopped_by.contains("fenced"), "{acknowledged:?}");
    assert_acknowledged_on_target(&m, &acknowledged);
    let (code, verify, stderr) = m.cli_json(&["verify", "--json"]);
    assert_eq!(code, Some(0), "verify: {stderr} {verify}");
    let on_target = |sql: &str| m.target.psql(DATABASE, sql);
    let on_source = |sql: &str| m.source.psql(DATABASE, sql);
    // Post-data applied once each, the view refreshed, the sequences set.
    assert_eq!(
        on_target("SELECT count(*) FROM pg_indexes WHERE indexname = 'orders_amount'"),
        "1"
    );
    assert_eq!(
        on_target("SELECT n || ',' || total FROM wide_summary"),
        on_source("SELECT count(*) || ',' || sum(id) FROM wide")
    );
    // The seal moved the source's sequences to their limit; released,
    // they are back where the target's were set from.
    crate::support::release_source(&m);
    assert_eq!(
        on_target("SELECT last_value FROM invoice_numbers"),
        on_source("SELECT last_value FROM invoice_numbers")
    );

    let (code, cleaned, stderr) = m.cli_json(&["cleanup", "--json"]);
    assert_eq!(code, Some(0), "cleanup: {stderr} {cleaned}");
    crate::support::release_source(&m);
    assert_nothing_left(&m);
    eprintln!(
        "walked {} crash points ({:?}): initial sync {:.0?}, all {:.0?}",
        walk.crashed.len(),
        walk.crashed,
        synced,
        started.elapsed()
    );
}

/// Runs `walbridge <args>` and expects it to fail at a crash point of the
/// controller's, which is restarted with `next` armed.
fn crash_the_controller(m: &mut Migration, args: &[&str], at: &str, next: &str) {
    let out = m.cli(args);
    assert!(
        !out.status.success(),
        "{args:?} answered although the controller crashed: {out:?}"
    );
    assert_eq!(crash_point_of(&mut m.controller), at);
    m.controller.arm(next);
    m.controller.restart();
    eventually(LINK_TIMEOUT, "the agent to connect again", || {
        m.install.connected_agent("east")
    });
}

#[test]
fn after_the_point_of_no_return_every_crash_finishes_what_it_began() {
    let mut m = crashable(SCHEMA, &[], &armed(&[fp::CUTOVER_RECORDED]), "");
    let (code, status, stderr) = m.cli_json(&["start", "--agent", "east", "--json"]);
    assert_eq!(code, Some(0), "start: {stderr} {status}");
    let writers = Writers::start(&m);
    eventually(WAIT, "the subscription to stream", || {
        (m.status()["subscription"] == "streaming").then_some(())
    });

    // Cut over, journaled, and the controller dies before it answers: the
    // cutover is done all the same.
    crash_the_controller(
        &mut m,
        &["cutover", "--max-lag", "5s", "--timeout", "60s", "--json"],
        fp::CUTOVER_RECORDED,
        &armed(&WALKED_AFTER_NO_RETURN[1..]),
    );
    let status = m.status();
    assert_eq!(status["cutover"]["done"], true, "{status}");
    assert_cut_over(&m, fp::CUTOVER_RECORDED);
    let acknowledged = writers.finish();
    assert!(acknowledged.stopped_by.contains("fenced"), "{acknowledged:?}");
    assert_acknowledged_on_target(&m, &acknowledged);
    let (code, verify, stderr) = m.cli_json(&["verify", "--json"]);
    assert_eq!(code, Some(0), "verify: {stderr} {verify}");

    // Cleanup dies half-way (the target's part done, the source's not),
    // then after its journal write: run again, it finishes.
    crash_the_controller(
        &mut m,
        &["cleanup", "--json"],
        fp::TEARDOWN_TARGET_REMOVED,
        &armed(&[fp::TEARDOWN_RECORDED]),
    );
    assert_eq!(m.status()["phase"], "cut_over");
    crash_the_controller(&mut m, &["cleanup", "--json"], fp::TEARDOWN_RECORDED, "");
    assert_eq!(m.status()["phase"], "cleaned_up");
    let (code, cleaned, stderr) = m.cli_json(&["cleanup", "--json"]);
    assert_eq!(code, Some(0), "cleanup: {stderr} {cleaned}");
    assert_eq!(cleaned["removed"].as_array().unwrap().len(), 0, "{cleaned}");
    crate::support::release_source(&m);
    assert_nothing_left(&m);
}

/// How many page ranges of `table` the agent was asked to copy so far.
fn ranges_requested(agent: &Daemon, table: &str) -> usize {
    agent
        .log()
        .lines()
        .filter(|l| l.contains("copying a page range") && l.contains(&format!("table={table} ")))
        .count()
}

#[test]
fn a_split_table_killed_mid_copy_copies_only_its_unfinished_ranges() {
    // About 4 MB in ranges of 200 kB; the controller dies right after the
    // fifth range commits, before the journal hears of it.
    let mut m = crashable(
        "CREATE TABLE wide (id int PRIMARY KEY, pad text); \
         INSERT INTO wide SELECT i, repeat(md5(i::text), 4) FROM generate_series(1, 24000) i;",
        &["--copy-split-bytes", "200000"],
        &format!("{}=4*off->return", fp::COPY_UNIT_COMMITTED),
        "",
    );
    assert_eq!(copy_until_the_controller_crashes(&mut m, "2"), fp::COPY_UNIT_COMMITTED);
    let committed: usize = m
        .target
        .psql(
            DATABASE,
            "SELECT count(*) FROM walbridge_state.copied WHERE table_name = 'public.wide'",
        )
        .parse()
        .unwrap();
    assert!(
        committed >= 5,
        "five ranges at least committed before the crash: {committed}"
    );
    let requested_before = ranges_requested(&m.agent, "public.wide");

    m.controller.arm("");
    m.controller.restart();
    let status = m.wait_for_phase("copied", WAIT);
    let wide = status["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "public.wide")
        .unwrap();
    let ranges = wide["ranges"].as_u64().unwrap() as usize;
    assert!(
        ranges > committed,
        "some ranges were left for after the restart: {wide}"
    );
    assert_eq!(
        ranges_requested(&m.agent, "public.wide") - requested_before,
        ranges - committed,
        "after the restart only the {} ranges not committed are copied, of {ranges}",
        ranges - committed
    );
    assert_eq!(wide["state"], "verified", "{wide}");
    assert_eq!(wide["rows"], 24000, "{wide}");
    let (code, verify, stderr) = m.cli_json(&["verify", "--json"]);
    assert_eq!(code, Some(0), "verify: {stderr} {verify}");
}

#[test]
fn a_cutover_outlives_its_cli_and_a_second_one_meanwhile_is_refused_as_busy() {
    let source = Cluster::builder("source").logical().start();
    let m = Migration::new(source, SCHEMA);
    let (code, status, stderr) = m.cli_json(&["start", "--agent", "east", "--json"]);
    assert_eq!(code, Some(0), "start: {stderr} {status}");
    let writers = Writers::start(&m);
    eventually(WAIT, "the subscription to stream", || {
        (m.status()["subscription"] == "streaming").then_some(())
    });
    // The target cannot catch up: the cutover holds the fence and waits.
    let stall = crate::support::stall_the_target(&m);
    let mut first = cutover_in_background(&m, "1h");
    eventually(WAIT, "the cutover to hold the fence", || {
        (m.status()["cutover"]["fence_lsn"]
            .as_str()
            .is_some_and(|lsn| !lsn.is_empty()))
        .then_some(())
    });

    let second = m.cli(&["cutover", "--json"]);
    assert_eq!(second.status.code(), Some(1), "{second:?}");
    let refused = String::from_utf8_lossy(&second.stderr);
    assert!(refused.contains("busy: cutover is running"), "{refused}");

    // The operator's CLI dies; the cutover is the controller's, not its.
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(m.status()["phase"], "cutover");
    stall.execute("ROLLBACK").unwrap();
    let status = m.wait_for_phase("cut_over", WAIT);
    assert_eq!(status["cutover"]["done"], true, "{status}");
    assert_cut_over(&m, "the cutover whose CLI was killed");

    let acknowledged = writers.finish();
    assert!(acknowledged.stopped_by.contains("fenced"), "{acknowledged:?}");
    assert_acknowledged_on_target(&m, &acknowledged);
    let (code, verify, stderr) = m.cli_json(&["verify", "--json"]);
    assert_eq!(code, Some(0), "verify: {stderr} {verify}");
    let (code, cleaned, stderr) = m.cli_json(&["cleanup", "--json"]);
    assert_eq!(code, Some(0), "cleanup: {stderr} {cleaned}");
    crate::support::release_source(&m);
    assert_nothing_left(&m);
}
