//! Every supported pair of PostgreSQL majors: sources 10 to 18 into
//! targets 15 to 18 not older than the source, each server fetched by the
//! harness (`PgInstall::fetch`). The matrix test migrates the demanding
//! schema of the initial-sync tests plus a live writer (inserts, updates,
//! deletes, a partitioned table, a `REPLICA IDENTITY FULL` table) through
//! the tunnel, cuts over and verifies. `WALBRIDGE_MATRIX` picks the pairs
//! (`10-17,12-18`, or `all`); without it, the CI subset runs.
//! `tests/matrix.sh` runs every pair and prints the table.
//!
//! The other tests here prove one version rule each: the agent's
//! `pg_dump` must fit the source, floats compare equal across 12, and
//! partitioned tables on sources before 13 are published through their
//! leaves.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use harness::daemons::eventually;
use harness::{Cluster, PgInstall};

use crate::cutover::{Acknowledged, SCHEMA, writer};
use crate::support::{DATABASE, Migration, Spec};

const STREAM_TIMEOUT: Duration = Duration::from_secs(180);

/// Pairs CI runs: the oldest sources into both PlanetScale majors, the
/// first version with `publish_via_partition_root`, and equal majors
/// (binary transfer).
pub(crate) const CI_PAIRS: &[(u32, u32)] = &[(10, 17), (12, 18), (13, 17), (16, 18), (17, 17), (18, 18)];

/// Every pair the project supports: sources 10–18, targets 15–18 not
/// older than the source.
fn every_pair() -> Vec<(u32, u32)> {
    (10..=18)
        .flat_map(|source| {
            (15..=18)
                .filter(move |target| *target >= source)
                .map(move |t| (source, t))
        })
        .collect()
}

/// `WALBRIDGE_MATRIX`: `all`, or pairs `SOURCE-TARGET` separated by commas.
fn pairs_from(spec: Option<&str>) -> Vec<(u32, u32)> {
    match spec.map(str::trim).filter(|s| !s.is_empty()) {
        None => CI_PAIRS.to_vec(),
        Some("all") => every_pair(),
        Some(list) => list
            .split(',')
            .map(|pair| {
                let (source, target) = pair
                    .trim()
                    .split_once('-')
                    .unwrap_or_else(|| panic!("WALBRIDGE_MATRIX: {pair:?} is not SOURCE-TARGET, e.g. 12-18"));
                let major = |m: &str| {
                    m.parse::<u32>()
                        .unwrap_or_else(|_| panic!("WALBRIDGE_MATRIX: {m:?} in {pair:?} is not a major"))
                };
                let pair = (major(source), major(target));
                assert!(
                    every_pair().contains(&pair),
                    "WALBRIDGE_MATRIX: {pair:?} is not a supported pair (sources 10-18, targets 15-18 not older)"
                );
                pair
            })
            .collect(),
    }
}

/// The demanding schema as a source of `major` can hold it. Its partitioned
/// table is renamed `history` and its sequence `receipt_numbers` (the
/// writer's schema has an `events` and an `invoice_numbers`).
/// Before 12 there are no generated columns (the total is a plain column);
/// before 11 a partitioned table has no primary key or default partition
/// (its partitions get the key, a range to MAXVALUE takes the rest), and a
/// trigger runs a PROCEDURE.
pub(crate) fn demanding_schema(major: u32) -> String {
    let mut sql = include_str!("../../fixtures/demanding.sql")
        .replace("events", "history")
        .replace("invoice_numbers", "receipt_numbers");
    if major < 12 {
        sql = replaced(
            &sql,
            "total numeric GENERATED ALWAYS AS (qty * price) STORED",
            "total numeric",
        );
    }
    if major < 11 {
        sql = replaced(
            &sql,
            "payload jsonb,\n    PRIMARY KEY (id, happened)\n)",
            "payload jsonb\n)",
        );
        sql = sql.replace(
            "PARTITION OF public.history FOR VALUES",
            "PARTITION OF public.history (PRIMARY KEY (id, happened)) FOR VALUES",
        );
        sql = replaced(
            &sql,
            "PARTITION OF public.history DEFAULT",
            "PARTITION OF public.history (PRIMARY KEY (id, happened)) FOR VALUES FROM ('2025-01-01') TO (MAXVALUE)",
        );
        sql = replaced(&sql, "EXECUTE FUNCTION", "EXECUTE PROCEDURE");
    }
    sql
}

/// The writer's tables (see `cutover::SCHEMA`) as a source of `major`
/// holds them: before 11 the partitioned table's key is on its partitions.
pub(crate) fn writer_schema(major: u32) -> String {
    if major >= 11 {
        return SCHEMA.to_owned();
    }
    replaced(SCHEMA, ", PRIMARY KEY (id, at)) PARTITION BY", ") PARTITION BY").replace(
        "PARTITION OF events FOR VALUES",
        "PARTITION OF events (PRIMARY KEY (id, at)) FOR VALUES",
    )
}

fn replaced(sql: &str, from: &str, to: &str) -> String {
    assert!(sql.contains(from), "the fixture no longer has {from:?}");
    sql.replace(from, to)
}

/// A source of `source_major` (logical) filled with `prepare`, a target of
/// `target_major`, and the daemons between them, the agent dumping with
/// `pg_dump` (a path, or `None` for pg_dump 18).
fn pair_migration(source_major: u32, target_major: u32, prepare: &str, pg_dump: Option<&str>) -> Migration {
    let source = Cluster::builder("source")
        .install(&PgInstall::fetch(source_major))
        .logical()
        .start();
    let target = Cluster::builder("target")
        .install(&PgInstall::fetch(target_major))
        .start();
    source.create_database(DATABASE);
    source.psql(DATABASE, prepare);
    target.create_database(DATABASE);
    let pg_dump = pg_dump
        .map(str::to_owned)
        .unwrap_or_else(|| PgInstall::fetch_pg_dump_18().display().to_string());
    let (source_url, target_url) = (source.url(DATABASE), target.url(DATABASE));
    Migration::custom(Spec {
        source,
        target,
        source_url,
        target_url,
        controller_args: Vec::new(),
        agent_args: vec!["--source-pg-dump".into(), pg_dump],
        agent_env: Vec::new(),
    })
}

fn server_major(cluster: &Cluster) -> u32 {
    cluster
        .psql("postgres", "SHOW server_version_num")
        .parse::<u32>()
        .unwrap()
        / 10000
}

fn start_streaming(m: &Migration) -> serde_json::Value {
    let (code, status, stderr) = m.cli_json(&["start", "--agent", "east", "--json"]);
    assert_eq!(code, Some(0), "start: {stderr} {status}");
    assert_eq!(status["phase"], "streaming", "{status}");
    let tables = status["tables"].as_array().expect("tables");
    assert!(
        tables.iter().all(|t| t["state"] == "verified"),
        "every table verified right after its copy: {status}"
    );
    eventually(STREAM_TIMEOUT, "the subscription's worker to stream", || {
        (m.status()["subscription"] == "streaming").then_some(())
    });
    status
}

/// What one pair's migration measured.
struct PairReport {
    copy_seconds: f64,
    lag_kib_at_cutover: u64,
    cutover_seconds: f64,
    write_downtime_seconds: f64,
}

/// The demanding schema and a live writer from `source_major` into
/// `target_major`, through the tunnel: streamed, cut over, verified, every
/// acknowledged write on the target.
fn migrate_pair(source_major: u32, target_major: u32) -> PairReport {
    let prepare = format!("{} {}", demanding_schema(source_major), writer_schema(source_major));
    let m = pair_migration(source_major, target_major, &prepare, None);
    assert_eq!(server_major(&m.source), source_major);
    assert_eq!(server_major(&m.target), target_major);

    let (code, preflight, stderr) = m.cli_json(&["preflight", "--agent", "east", "--json"]);
    assert_eq!(code, Some(0), "preflight: {stderr} {preflight}");
    assert_eq!(preflight["errors"], 0, "{preflight}");

    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(m.source.url(DATABASE), stop.clone());
    let copy_started = Instant::now();
    let status = start_streaming(&m);
    let copy_seconds = copy_started.elapsed().as_secs_f64();
    // 300 small tables + customers, order lines, Tabelle, blobs, 3 history
    // partitions, readings, audit; orders, 2 event partitions, ledger.
    assert_eq!(status["tables"].as_array().unwrap().len(), 313, "{status}");
    eventually(STREAM_TIMEOUT, "live rows to stream to the target", || {
        let live: u64 = m
            .target
            .psql(DATABASE, "SELECT count(*) FROM orders WHERE note = 'live'")
            .parse()
            .unwrap();
        (live > 0).then_some(())
    });
    // The writes made during the copy may still be applying: the cutover's
    // catch-up waits for them (its downtime includes them), and the lag it
    // started from is reported with the figures. Waiting for it to shrink
    // would not help: the writer's updates of the REPLICA IDENTITY FULL
    // table cost the subscriber a scan per row, so its backlog grows.
    let lag_at_cutover = m.status()["lag_bytes"].as_u64().unwrap_or_default();

    let cutover_started = Instant::now();
    // No lag gate: on a loaded machine the backlog may never shrink to a
    // small bound while the writer runs; the fence stops the writer, and
    // the catch-up then applies everything it acknowledged. This test
    // proves the pair migrates exactly, not how short the downtime is.
    let (code, cutover, stderr) = m.cli_json(&["cutover", "--max-lag", "1h", "--timeout", "300s", "--json"]);
    let cutover_seconds = cutover_started.elapsed().as_secs_f64();
    assert_eq!(code, Some(0), "cutover: {stderr} {cutover}");
    assert_eq!(cutover["done"], true, "{cutover}");
    let acked = crate::cutover::stopped_by_fence(writes);
    assert!(acked.stopped_by.contains("fenced"), "{acked:?}");
    assert!(acked.ledger_writes > 0 && !acked.events.is_empty(), "{acked:?}");
    assert_acknowledged_on_target(&m, &acked);
    let verify = m.verify_exact();
    assert_eq!(verify["tables"].as_array().unwrap().len(), 313, "{verify}");
    // The generated column (12+) was computed by the target, the plain one
    // copied: either way the totals agree.
    assert_eq!(
        m.target
            .psql(DATABASE, "SELECT sum(total) FROM \"Sales\".\"Order Lines\""),
        m.source
            .psql(DATABASE, "SELECT sum(total) FROM \"Sales\".\"Order Lines\"")
    );
    PairReport {
        copy_seconds,
        lag_kib_at_cutover: lag_at_cutover / 1024,
        cutover_seconds,
        write_downtime_seconds: cutover["write_downtime_seconds"].as_f64().unwrap_or_default(),
    }
}

/// Migrates one pair and prints its line for tests/matrix.sh.
pub(crate) fn report_pair(source: u32, target: u32) {
    let report = migrate_pair(source, target);
    println!(
        "MATRIX {source}->{target} pass copy={:.1}s lag={}KiB cutover={:.1}s downtime={:.2}s",
        report.copy_seconds, report.lag_kib_at_cutover, report.cutover_seconds, report.write_downtime_seconds
    );
}

/// `WALBRIDGE_MATRIX`'s pairs (the CI subset without it), one after the
/// other: what tests/matrix.sh runs, a pair per process.
#[test]
#[ignore = "a pair after another, for tests/matrix.sh; the CI subset runs as versions_pairs::pair_*"]
fn matrix() {
    let spec = std::env::var("WALBRIDGE_MATRIX").ok();
    for (source, target) in pairs_from(spec.as_deref()) {
        report_pair(source, target);
    }
}

#[test]
fn matrix_pairs_are_read_from_the_environment() {
    assert_eq!(pairs_from(None), CI_PAIRS);
    assert_eq!(pairs_from(Some("10-17, 12-18")), [(10, 17), (12, 18)]);
    let all = pairs_from(Some("all"));
    assert_eq!(all.len(), 30, "{all:?}");
    assert!(all.contains(&(10, 15)) && all.contains(&(18, 18)) && !all.contains(&(16, 15)));
    assert!(CI_PAIRS.iter().all(|pair| all.contains(pair)));
    for bad in ["16-15", "9-15", "12", "x-18"] {
        assert!(std::panic::catch_unwind(|| pairs_from(Some(bad))).is_err(), "{bad}");
    }
}

#[test]
fn a_source_newer_than_the_agents_pg_dump_is_refused_by_preflight_with_the_fix() {
    let debian_pg_dump = PgInstall::discover().bin("pg_dump");
    let debian_major = PgInstall::discover().major_version();
    assert!(debian_major < 18, "this test needs a pg_dump older than 18");
    let m = pair_migration(
        18,
        18,
        "CREATE TABLE items (id int PRIMARY KEY)",
        Some(&debian_pg_dump.display().to_string()),
    );
    let (code, report, stderr) = m.cli_json(&["preflight", "--agent", "east", "--json"]);
    assert_eq!(code, Some(1), "{stderr} {report}");
    let finding = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "pg_dump")
        .unwrap_or_else(|| panic!("no pg_dump finding: {report}"))
        .clone();
    assert_eq!(finding["severity"], "error", "{finding}");
    assert_eq!(finding["object"], "source.pg_dump", "{finding}");
    let message = finding["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("{}", debian_pg_dump.display()))
            && message.contains(&format!("{debian_major}."))
            && message.contains("PostgreSQL 18"),
        "names the pg_dump, its version and the source's: {message}"
    );
    let fix = finding["fix"].as_str().unwrap();
    assert!(fix.contains("postgresql-client-18"), "{fix}");
    assert!(fix.contains("set source.pg_dump"), "{fix}");
    assert!(fix.contains("/usr/lib/postgresql/18/bin/pg_dump"), "{fix}");
    // start runs the same preflight and creates nothing.
    let (code, _, stderr) = m.cli_json(&["start", "--agent", "east", "--json"]);
    assert_ne!(code, Some(0), "start is refused: {stderr}");
    assert!(stderr.contains("pg_dump"), "{stderr}");
    assert_eq!(m.source_replication_objects(), (String::new(), String::new()));
}

#[test]
fn floats_from_postgresql_11_verify_exact_on_postgresql_18() {
    let m = pair_migration(
        11,
        18,
        "CREATE TABLE measures (id int PRIMARY KEY, d float8, r real, ds float8[], p point); \
         INSERT INTO measures VALUES \
           (1, 0.1, 0.1, ARRAY[0.1, 0.2], point(0.1, 1/3.0)), \
           (2, 1/3.0, 1/3.0, ARRAY[1/3.0], point(2/3.0, 1e-300)), \
           (3, 1e-300, 1e-30, ARRAY[1e300], NULL), \
           (4, '-0', '-0', NULL, point(0, 0)), \
           (5, 'NaN', 'Infinity', ARRAY['-Infinity'::float8], NULL), \
           (6, 123456789.123456789, 3.4e38, ARRAY[]::float8[], NULL); \
         INSERT INTO measures SELECT i, i / 7.0, i / 7.0, ARRAY[i / 3.0], point(i / 9.0, i) \
           FROM generate_series(7, 500) i;",
        None,
    );
    // The two servers print the same float differently under the copy's
    // settings: the comparison must not depend on that.
    let rendered = |cluster: &Cluster| {
        cluster.psql(
            DATABASE,
            "SET extra_float_digits = 3; SELECT d FROM measures WHERE id = 1",
        )
    };
    let on_source = rendered(&m.source);
    start_streaming(&m);
    assert_ne!(on_source, rendered(&m.target), "PostgreSQL 11 and 18 render 0.1 alike");
    let verify = m.verify_exact();
    assert_eq!(verify["tables"][0]["name"], "public.measures", "{verify}");
    // The values themselves arrived exactly (the copy's text loses nothing).
    for id in [1, 2, 3, 6, 250] {
        assert_eq!(
            m.target.psql(
                DATABASE,
                &format!("SELECT float8send(d)::text || float4send(r)::text FROM measures WHERE id = {id}")
            ),
            m.source.psql(
                DATABASE,
                &format!("SELECT float8send(d)::text || float4send(r)::text FROM measures WHERE id = {id}")
            ),
            "row {id}"
        );
    }
    // Changes streamed after the copy compare equal too.
    m.source.psql(
        DATABASE,
        "INSERT INTO measures VALUES (1000, 0.3, 0.3, ARRAY[0.7], point(0.1, 0.2))",
    );
    eventually(STREAM_TIMEOUT, "the streamed row", || {
        (m.target.psql(DATABASE, "SELECT count(*) FROM measures WHERE id = 1000") == "1").then_some(())
    });
    m.verify_exact();
}

#[test]
fn a_partitioned_table_on_postgresql_12_is_migrated_exactly_with_rows_written_while_streaming() {
    let m = pair_migration(12, 15, &writer_schema(12), None);
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(m.source.url(DATABASE), stop.clone());
    let status = start_streaming(&m);
    assert_eq!(status["tables"].as_array().unwrap().len(), 4, "{status}");
    // The publication holds the leaves: PostgreSQL 12 cannot publish the
    // partitioned table itself.
    assert_eq!(
        m.source.psql(
            DATABASE,
            "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_publication_tables \
             WHERE schemaname <> 'walbridge_state'"
        ),
        "events_2024,events_2025,ledger,orders"
    );
    eventually(STREAM_TIMEOUT, "live events to stream to the target", || {
        let live: u64 = m
            .target
            .psql(DATABASE, "SELECT count(*) FROM events WHERE payload ? 'live'")
            .parse()
            .unwrap();
        (live > 0).then_some(())
    });
    // A partition created while streaming, written before walbridge sees
    // it and after: before 13 it must be published and copied on its own.
    m.source.psql(
        DATABASE,
        "CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01'); \
         INSERT INTO events (at, payload) SELECT date '2026-01-01' + i, '{\"new\": 1}' FROM generate_series(0, 99) i",
    );
    eventually(STREAM_TIMEOUT, "the new partition to be taken in", || {
        (m.table_state("public.events_2026").as_deref() == Some("streamed")).then_some(())
    });
    m.source.psql(
        DATABASE,
        "INSERT INTO events (at, payload) SELECT date '2026-06-01' + i, '{\"new\": 2}' FROM generate_series(0, 49) i; \
         UPDATE events SET payload = '{\"new\": 3}' WHERE id = (SELECT min(id) FROM events_2026)",
    );
    // An update that moves a row to the other partition, and a delete.
    m.source.psql(
        DATABASE,
        "UPDATE events SET at = '2025-03-03' WHERE id = 1; DELETE FROM events WHERE id = 2",
    );
    // No lag gate: on a loaded machine the backlog may never shrink to a
    // small bound while the writer runs; the fence stops the writer, and
    // the catch-up then applies everything it acknowledged. This test
    // proves the pair migrates exactly, not how short the downtime is.
    let (code, cutover, stderr) = m.cli_json(&["cutover", "--max-lag", "1h", "--timeout", "300s", "--json"]);
    assert_eq!(code, Some(0), "cutover: {stderr} {cutover}");
    let acked = crate::cutover::stopped_by_fence(writes);
    assert!(acked.stopped_by.contains("fenced"), "{acked:?}");
    assert_acknowledged_on_target(&m, &acked);
    for event in &acked.events {
        assert_eq!(
            m.target
                .psql(DATABASE, &format!("SELECT count(*) FROM events WHERE id = {event}")),
            "1",
            "event {event}"
        );
    }
    assert_eq!(
        m.target.psql(DATABASE, "SELECT at FROM events_2025 WHERE id = 1"),
        "2025-03-03"
    );
    assert_eq!(m.target.psql(DATABASE, "SELECT count(*) FROM events WHERE id = 2"), "0");
    assert_eq!(
        m.target.psql(
            DATABASE,
            "SELECT count(*) || ':' || count(*) FILTER (WHERE payload = '{\"new\": 3}') FROM events_2026"
        ),
        "150:1"
    );
    let verify = m.verify_exact();
    assert!(verify["tables"].to_string().contains("public.events_2026"), "{verify}");
}

/// Every acknowledged write is on the target in its last state (what
/// `cutover::assert_acknowledged_on_target` proves, in one query per table
/// instead of one per row: a pair's writer acknowledges thousands).
fn assert_acknowledged_on_target(m: &Migration, acked: &Acknowledged) {
    let on_target: std::collections::BTreeMap<i64, i32> = m
        .target
        .psql(
            DATABASE,
            "SELECT coalesce(string_agg(id || ':' || amount, ','), '') FROM orders",
        )
        .split(',')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (id, amount) = pair.split_once(':').unwrap();
            (id.parse().unwrap(), amount.parse().unwrap())
        })
        .collect();
    for (id, amount) in &acked.orders {
        assert_eq!(on_target.get(id), amount.as_ref(), "order {id}");
    }
    let events: std::collections::BTreeSet<i64> = m
        .target
        .psql(DATABASE, "SELECT coalesce(string_agg(id::text, ','), '') FROM events")
        .split(',')
        .filter(|id| !id.is_empty())
        .map(|id| id.parse().unwrap())
        .collect();
    for event in &acked.events {
        assert!(events.contains(event), "event {event} is on the target");
    }
}
