//! While the application keeps changing things: its privileges, its
//! TRUNCATEs, its new tables and columns either reach the target or stop
//! the cutover with a clear reason.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use harness::Cluster;
use harness::daemons::eventually;

use crate::support::{DATABASE, Migration, Session};

const STREAM_TIMEOUT: Duration = Duration::from_secs(120);

const SCHEMA: &str = "\
    CREATE ROLE app_user LOGIN PASSWORD 'app-user-password'; \
    CREATE TABLE orders (id bigserial PRIMARY KEY, amount int NOT NULL); \
    INSERT INTO orders (amount) SELECT i FROM generate_series(1, 100) i; \
    GRANT SELECT, INSERT, UPDATE, DELETE ON orders TO app_user; \
    GRANT USAGE ON SEQUENCE orders_id_seq TO app_user;";

fn stream(m: &Migration, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["start", "--agent", "east", "--json"];
    args.extend_from_slice(extra);
    let (code, status, stderr) = m.cli_json(&args);
    assert_eq!(code, Some(0), "start: {stderr} {status}");
    eventually(STREAM_TIMEOUT, "the subscription to stream", || {
        (m.status()["subscription"] == "streaming").then_some(())
    });
    status
}

/// Cuts over whatever the lag: these tests' writers are unpaced, and on a
/// loaded machine the subscriber may stay seconds behind while they run;
/// the fence stops them and the catch-up applies all they acknowledged.
fn cut_over(m: &Migration) {
    let (code, cutover, stderr) = m.cli_json(&["cutover", "--max-lag", "1h", "--timeout", "300s", "--json"]);
    assert_eq!(code, Some(0), "cutover: {stderr} {cutover}");
}

#[test]
fn with_privileges_the_applications_role_uses_its_tables_on_the_target() {
    let source = Cluster::builder("source").logical().start();
    let m = Migration::new(source, SCHEMA);
    // The target lacks the role: preflight says so, with what creates it.
    let (code, report, stderr) = m.cli_json(&["preflight", "--agent", "east", "--privileges", "--json"]);
    assert_eq!(code, Some(1), "{stderr} {report}");
    let missing = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "missing_role")
        .unwrap_or_else(|| panic!("no missing_role finding: {report}"))
        .clone();
    assert_eq!(missing["object"], "app_user", "{missing}");
    let fix = missing["fix"].as_str().unwrap();
    assert!(fix.starts_with("CREATE ROLE app_user LOGIN"), "{fix}");
    assert!(!fix.contains("app-user-password"), "never the source's password: {fix}");
    let create = fix.split(" ALTER ROLE").next().unwrap();
    m.target.psql(
        "postgres",
        &format!("{create} ALTER ROLE app_user PASSWORD 'target-password'"),
    );

    let status = stream(&m, &["--privileges"]);
    assert!(!status["events"].to_string().contains("not carried"), "{status}");
    m.source.psql(DATABASE, "INSERT INTO orders (amount) VALUES (-1)");
    cut_over(&m);

    let as_app = m.target.url_as("app_user", "target-password", DATABASE);
    let app = Session::open(&as_app);
    assert_eq!(app.value("SELECT count(*) FROM orders").unwrap(), "101");
    app.execute("INSERT INTO orders (amount) VALUES (7); UPDATE orders SET amount = 8 WHERE amount = 7")
        .expect("the application's role writes its table on the target");
}

#[test]
fn without_privileges_the_report_says_the_target_has_none_of_the_grants() {
    let source = Cluster::builder("source").logical().start();
    let m = Migration::new(source, SCHEMA);
    m.target
        .psql("postgres", "CREATE ROLE app_user LOGIN PASSWORD 'target-password'");
    let out = m.cli(&["start", "--agent", "east", "--copy-only"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("the target has none of them"),
        "start's report says so: {report}"
    );
    let as_app = m.target.url_as("app_user", "target-password", DATABASE);
    let app = Session::open(&as_app);
    let refused = app.value("SELECT count(*) FROM orders").unwrap_err();
    assert!(
        refused.to_string().contains("permission denied") || format!("{refused:?}").contains("permission denied"),
        "{refused:?}"
    );
}

#[test]
fn a_truncate_during_streaming_reaches_the_target_and_verify_is_exact() {
    let source = Cluster::builder("source").logical().start();
    let m = Migration::new(
        source,
        "CREATE TABLE events (id int PRIMARY KEY, note text); \
         INSERT INTO events SELECT i, 'before' FROM generate_series(1, 500) i; \
         CREATE TABLE kept (id int PRIMARY KEY); INSERT INTO kept SELECT generate_series(1, 10);",
    );
    stream(&m, &[]);
    m.source.psql(
        DATABASE,
        "TRUNCATE events; INSERT INTO events SELECT i, 'after' FROM generate_series(1, 7) i",
    );
    eventually(
        STREAM_TIMEOUT,
        "the TRUNCATE and the rows after it on the target",
        || {
            (m.target
                .psql(DATABASE, "SELECT count(*) || ':' || min(note) FROM events")
                == "7:after")
                .then_some(())
        },
    );
    cut_over(&m);
    let verify = m.verify_exact();
    assert!(
        verify["tables"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["matches"] == true),
        "{verify}"
    );
}

#[test]
fn a_column_added_during_streaming_shows_as_drift_blocks_the_cutover_until_sync_schema() {
    let source = Cluster::builder("source").logical().start();
    let m = Migration::new(source, crate::cutover::SCHEMA);
    let stop = Arc::new(AtomicBool::new(false));
    let writes = crate::cutover::writer(m.source.url(DATABASE), stop.clone());
    stream(&m, &[]);
    // The writer deletes rows it inserted a moment before, by id: the row
    // the test looks for again gets an id the writer never uses.
    m.source.psql(
        DATABASE,
        "ALTER TABLE orders ADD COLUMN channel text NOT NULL DEFAULT 'web'; \
         INSERT INTO orders (id, amount, note, channel) VALUES (-42, 1, 'after the change', 'phone')",
    );
    let drift = eventually(STREAM_TIMEOUT, "status to show the drift", || {
        let status = m.status();
        let drift = status["schema_drift"].as_array()?.clone();
        (!drift.is_empty()).then_some((drift, status))
    });
    let (drift, status) = drift;
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert_eq!(drift[0]["table"], "public.orders");
    assert_eq!(drift[0]["additive"], true);
    assert_eq!(
        drift[0]["ddl"],
        "ALTER TABLE public.orders ADD COLUMN channel text DEFAULT 'web'::text NOT NULL"
    );
    assert!(status["warnings"].to_string().contains("cutover refuses"), "{status}");

    let (code, refused, stderr) = m.cli_json(&["cutover", "--max-lag", "2s", "--timeout", "30s", "--json"]);
    assert_eq!(code, Some(1), "{stderr} {refused}");
    assert!(stderr.contains("channel") && stderr.contains("differ"), "{stderr}");
    assert_eq!(
        m.source.psql(
            DATABASE,
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'walbridge_fence'"
        ),
        "0",
        "nothing was fenced"
    );

    let (code, synced, stderr) = m.cli_json(&["sync-schema", "--json"]);
    assert_eq!(code, Some(0), "sync-schema: {stderr} {synced}");
    assert_eq!(synced["applied"].as_array().unwrap().len(), 1, "{synced}");
    eventually(STREAM_TIMEOUT, "the row with the new column on the target", || {
        (m.target
            .psql(DATABASE, "SELECT count(*) FROM orders WHERE channel = 'phone'")
            == "1")
            .then_some(())
    });
    assert!(m.status()["schema_drift"].as_array().unwrap().is_empty());
    cut_over(&m);
    let acked = crate::cutover::stopped_by_fence(writes);
    crate::cutover::assert_acknowledged_on_target(&m, &acked);
}

#[test]
fn tables_and_partitions_created_during_streaming_are_migrated_exactly() {
    let source = Cluster::builder("source").logical().start();
    let m = Migration::new(
        source,
        "CREATE TABLE events (id int NOT NULL, at date NOT NULL, note text, PRIMARY KEY (id, at)) \
           PARTITION BY RANGE (at); \
         CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01'); \
         INSERT INTO events SELECT i, date '2024-01-01' + i % 300, 'seed' FROM generate_series(1, 300) i;",
    );
    stream(&m, &[]);
    // A partition on the source only, and one made on both sides.
    m.source.psql(
        DATABASE,
        "CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01'); \
         INSERT INTO events SELECT i, date '2025-01-01' + i % 300, 'new partition' FROM generate_series(1001, 1100) i",
    );
    let both = "CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')";
    m.target.psql(DATABASE, both);
    m.source.psql(DATABASE, both);
    m.source.psql(
        DATABASE,
        "INSERT INTO events SELECT i, date '2026-01-01' + i % 300, 'both sides' FROM generate_series(2001, 2050) i",
    );
    // A table the application creates, written before walbridge sees it
    // and after; and one that cannot be published as it is.
    m.source.psql(
        DATABASE,
        "CREATE TABLE audit (id int PRIMARY KEY, note text); \
         INSERT INTO audit SELECT i, 'before' FROM generate_series(1, 40) i; \
         CREATE TABLE scratch (x int)",
    );
    eventually(STREAM_TIMEOUT, "walbridge to take in the new tables", || {
        (m.table_state("public.audit").as_deref() == Some("streamed")
            && m.table_state("public.events_2025").is_some()
            && m.table_state("public.events_2026").is_some())
        .then_some(())
    });
    m.source.psql(
        DATABASE,
        "INSERT INTO audit SELECT i, 'after' FROM generate_series(41, 55) i",
    );
    let status = m.status();
    assert!(
        status["events"].to_string().contains("scratch") && status["events"].to_string().contains("REPLICA IDENTITY"),
        "{status}"
    );
    let (code, _, stderr) = m.cli_json(&["cutover", "--max-lag", "2s", "--timeout", "30s", "--json"]);
    assert_eq!(
        code,
        Some(1),
        "a table that cannot be migrated refuses the cutover: {stderr}"
    );
    assert!(stderr.contains("scratch"), "{stderr}");
    m.source.psql(
        DATABASE,
        "ALTER TABLE scratch REPLICA IDENTITY FULL; INSERT INTO scratch VALUES (1), (2)",
    );
    eventually(STREAM_TIMEOUT, "scratch to be taken in", || {
        (m.table_state("public.scratch").as_deref() == Some("streamed")).then_some(())
    });

    cut_over(&m);
    for (sql, expected) in [
        ("SELECT count(*) FROM events", "450"),
        ("SELECT count(*) FROM events_2025", "100"),
        ("SELECT count(*) FROM events_2026", "50"),
        (
            "SELECT count(*) || ':' || count(*) FILTER (WHERE note = 'before') FROM audit",
            "55:40",
        ),
        ("SELECT count(*) FROM scratch", "2"),
    ] {
        assert_eq!(m.target.psql(DATABASE, sql), expected, "{sql}");
    }
    let (code, verify, stderr) = m.cli_json(&["verify", "--json"]);
    assert_eq!(code, Some(0), "verify: {stderr} {verify}");
    let tables = verify["tables"].as_array().unwrap();
    for name in [
        "public.audit",
        "public.events_2025",
        "public.events_2026",
        "public.scratch",
    ] {
        let table = tables
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("{name} is verified: {verify}"));
        assert_eq!(table["matches"], true, "{table}");
    }
}

#[test]
fn large_objects_created_changed_and_deleted_while_streaming_are_exact_after_cutover() {
    let source = Cluster::builder("source").logical().start();
    let m = Migration::new(
        source,
        "CREATE TABLE docs (id int PRIMARY KEY, body oid); \
         INSERT INTO docs SELECT i, lo_from_bytea(0, convert_to(repeat('page ' || i, 1000), 'UTF8')) \
           FROM generate_series(1, 5) i; \
         SELECT lo_from_bytea(424242, decode(repeat('ab', 300000), 'hex'));",
    );
    stream(&m, &[]);
    assert_eq!(
        m.target.psql(DATABASE, "SELECT count(*) FROM pg_largeobject_metadata"),
        "6"
    );
    // While streaming: one created, one changed, one deleted.
    m.source.psql(
        DATABASE,
        "SELECT lo_from_bytea(515151, 'new'::bytea); \
         SELECT lo_put(424242, 10, 'changed'::bytea); \
         SELECT lo_unlink(body) FROM docs WHERE id = 1",
    );
    cut_over(&m);
    let digests = "SELECT string_agg(oid || ':' || md5(lo_get(oid)), ',' ORDER BY oid) FROM pg_largeobject_metadata";
    assert_eq!(m.target.psql(DATABASE, digests), m.source.psql(DATABASE, digests));
    let (code, verify, stderr) = m.cli_json(&["verify", "--json"]);
    assert_eq!(code, Some(0), "verify: {stderr} {verify}");
    let line = verify["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "large objects")
        .unwrap_or_else(|| panic!("verify covers large objects: {verify}"))
        .clone();
    assert_eq!(line["matches"], true, "{line}");
    assert_eq!(line["source_rows"], 6, "{line}");
}

#[test]
fn a_sealed_source_refuses_every_writer_and_only_release_source_lifts_it() {
    let source = Cluster::builder("source").logical().start();
    let m = Migration::new(
        source,
        &format!(
            "{SCHEMA} CREATE TABLE scratch (id int PRIMARY KEY); INSERT INTO scratch VALUES (1); \
             CREATE TABLE busy (id int PRIMARY KEY);"
        ),
    );
    stream(&m, &["--exclude", "public.scratch", "--exclude", "public.busy"]);
    // An unpublished table whose lock does not come: named by the seal,
    // not waited for while every write is held.
    let busy = Session::open(&m.source.url(DATABASE));
    busy.execute("BEGIN; LOCK TABLE busy IN ROW EXCLUSIVE MODE").unwrap();
    let app_user = m.source.url_as("app_user", "app-user-password", DATABASE);
    Session::try_open(&app_user).expect("app_user logs in before the cutover");
    let sequence_before = m.source.psql(DATABASE, "SELECT last_value FROM orders_id_seq");

    let (code, cutover, stderr) = m.cli_json(&[
        "cutover",
        "--max-lag",
        "2s",
        "--timeout",
        "60s",
        "--hard-fence",
        "app_user",
        "--json",
    ]);
    assert_eq!(code, Some(0), "cutover: {stderr} {cutover}");
    let seal = cutover["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "seal")
        .unwrap_or_else(|| panic!("no seal step: {cutover}"))["detail"]
        .to_string();
    // orders (published) and scratch (not); one sequence; one role.
    assert!(seal.contains("2 tables fenced, 1 sequences at their limit"), "{seal}");
    assert!(
        seal.contains("public.busy is not fenced: canceling statement due to lock timeout"),
        "{seal}"
    );
    busy.execute("ROLLBACK").unwrap();
    assert!(seal.contains("app_user NOLOGIN (1 could log in)"), "{seal}");

    // Every kind of writer is refused: one that bypasses ordinary
    // triggers, one on a table the migration left out, a TRUNCATE, a
    // stray nextval(), the application's role logging in.
    let writers = [
        (
            "SET session_replication_role = replica; INSERT INTO orders (amount) VALUES (1)",
            "are fenced",
        ),
        ("INSERT INTO scratch VALUES (2)", "are fenced"),
        ("TRUNCATE scratch", "are fenced"),
        ("SELECT nextval('orders_id_seq')", "reached maximum value"),
    ];
    let assert_fenced = |when: &str| {
        for (sql, refusal) in writers {
            let error = m
                .source
                .try_psql(DATABASE, sql)
                .expect_err(&format!("{when}: {sql} must be refused"));
            assert!(error.contains(refusal), "{when}: {sql}: {error}");
        }
        let login = Session::try_open(&app_user).err().unwrap_or_default();
        assert!(login.contains("not permitted to log in"), "{when}: app_user: {login}");
    };
    assert_fenced("after the seal");

    let (code, cleaned, stderr) = m.cli_json(&["cleanup", "--json"]);
    assert_eq!(code, Some(0), "cleanup: {stderr} {cleaned}");
    assert!(cleaned["remaining"].to_string().contains("release-source"), "{cleaned}");
    assert_fenced("after cleanup");

    let released = crate::support::release_source(&m);
    let removed = released["removed"].to_string();
    for what in [
        "write fence on 2 source tables",
        "1 source sequences",
        "hard fence on 1 roles",
    ] {
        assert!(removed.contains(what), "{what} in {removed}");
    }
    assert_eq!(
        m.source
            .psql(DATABASE, "SELECT nextval('orders_id_seq') - 1")
            .parse::<i64>()
            .unwrap(),
        sequence_before.parse::<i64>().unwrap(),
        "the sequence goes on from where the seal found it"
    );
    for (sql, _) in writers {
        m.source
            .try_psql(DATABASE, &format!("BEGIN; {sql}; ROLLBACK"))
            .unwrap_or_else(|e| panic!("after release-source: {sql}: {e}"));
    }
    Session::try_open(&app_user).expect("app_user logs in again");
    assert_eq!(
        m.source.psql(
            DATABASE,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'walbridge_fence'"
        ),
        "0"
    );
}

#[test]
fn a_table_created_while_the_cutover_holds_the_fence_lifts_it_and_is_migrated_by_the_next() {
    let source = Cluster::builder("source").logical().start();
    let m = Migration::new(source, crate::cutover::SCHEMA);
    stream(&m, &[]);
    // The target's apply is held back, so the cutover waits in catch-up
    // with the source fenced while the application creates a table
    // (unpublished, so the fence's locks do not cover it).
    let stall = crate::support::stall_the_target(&m);
    let cutover = crate::cutover::cutover_holding_the_fence(&m, "90s");
    m.source.psql(
        DATABASE,
        "CREATE TABLE late (id int PRIMARY KEY, note text); INSERT INTO late VALUES (1, 'while fenced')",
    );
    stall.execute("ROLLBACK").unwrap();
    let out = cutover.wait_with_output().unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(1), "{report}");
    let error = report["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("tables were created on the source while the cutover began: public.late"),
        "{report}"
    );
    assert_eq!(crate::cutover::fence_triggers(&m), "0");
    crate::cutover::source_accepts_writes(&m).expect("the fence is lifted");

    m.source.psql(DATABASE, "INSERT INTO late VALUES (2, 'after')");
    eventually(STREAM_TIMEOUT, "late to be taken in", || {
        (m.table_state("public.late").as_deref() == Some("streamed")).then_some(())
    });
    cut_over(&m);
    assert_eq!(
        m.target.psql(
            DATABASE,
            "SELECT string_agg(id || ':' || note, ',' ORDER BY id) FROM late"
        ),
        "1:while fenced,2:after"
    );
}
