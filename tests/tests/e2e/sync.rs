//! The initial sync: preflight, slot and snapshot, schema, parallel copy,
//! verification, resumption after kill -9 of either daemon, bad input.

use std::time::Duration;

use harness::Cluster;
use serde_json::Value;

use crate::support::{DATABASE, Migration};

const COPY_TIMEOUT: Duration = Duration::from_secs(180);

fn table<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no table {name} in {status}"))
}

#[test]
fn a_demanding_schema_is_copied_exactly() {
    let source = Cluster::builder("source").logical().start();
    let m = Migration::new(source, include_str!("../../fixtures/demanding.sql"));

    let (code, preflight, stderr) = m.cli_json(&["preflight", "--agent", "east", "--json"]);
    assert_eq!(code, Some(0), "preflight: {stderr} {preflight}");
    assert_eq!(preflight["errors"], 0, "{preflight}");

    let (code, status, stderr) = m.cli_json(&["start", "--agent", "east", "--json"]);
    assert_eq!(code, Some(0), "start: {stderr}");
    assert_eq!(status["phase"], "streaming", "{status}");
    let tables = status["tables"].as_array().unwrap();
    // 300 small tables + customers, order lines, Tabelle, blobs, 3 event
    // partitions, readings, audit.
    assert_eq!(tables.len(), 309, "{status}");
    assert!(tables.iter().all(|t| t["state"] == "verified"), "{status}");
    assert_eq!(table(&status, "\"Sales\".\"Order Lines\"")["rows"], 5000);
    assert_eq!(table(&status, "\"größe\".\"Tabelle\"")["rows"], 200);
    assert!(table(&status, "public.events_2024")["rows"].as_u64().unwrap() > 0);

    let (code, verify, stderr) = m.cli_json(&["verify", "--json"]);
    assert_eq!(code, Some(0), "verify: {stderr} {verify}");
    assert_eq!(verify["matches"], true);
    assert_eq!(verify["tables"].as_array().unwrap().len(), 309);

    let on_target = |sql: &str| m.target.psql(DATABASE, sql);
    let on_source = |sql: &str| m.source.psql(DATABASE, sql);
    // The generated column was computed by the target.
    assert_eq!(
        on_target("SELECT sum(total) FROM \"Sales\".\"Order Lines\""),
        on_source("SELECT sum(total) FROM \"Sales\".\"Order Lines\"")
    );
    // The trigger did not fire during the copy: the audit holds what the
    // source's does, no more.
    assert_eq!(on_target("SELECT count(*) FROM public.audit"), "1");
    // Post-data: indexes, constraints and triggers are there.
    for index in [
        "customers_active",
        "customers_lower_name",
        "order_lines_meta",
        "customer_totals_id",
    ] {
        assert_eq!(
            on_target(&format!("SELECT count(*) FROM pg_indexes WHERE indexname = '{index}'")),
            "1"
        );
    }
    assert_eq!(
        on_target("SELECT count(*) FROM pg_trigger WHERE tgname = 'customers_audit'"),
        "1"
    );
    assert_eq!(
        on_target("SELECT count(*) FROM pg_constraint WHERE contype = 'f'"),
        on_source("SELECT count(*) FROM pg_constraint WHERE contype = 'f'")
    );
    // The materialized view was refreshed, the view works.
    assert_eq!(
        on_target("SELECT count(*), sum(total) FROM public.customer_totals"),
        on_source("SELECT count(*), sum(total) FROM public.customer_totals")
    );
    assert_eq!(
        on_target("SELECT count(*) FROM public.big_orders"),
        on_source("SELECT count(*) FROM public.big_orders")
    );
    assert_eq!(
        on_target("SELECT octet_length(data) FROM public.blobs WHERE id = 1"),
        "1600000"
    );
    // The migration's own publication is not in the target's schema.
    assert_eq!(on_target("SELECT count(*) FROM pg_publication"), "0");
    // The snapshot was released; the slot stays for streaming.
    let (slots, publications) = m.source_replication_objects();
    assert_eq!(slots, status["slot"].as_str().unwrap());
    assert_eq!(publications, status["slot"].as_str().unwrap());
    // The only walsender left is the subscription's (named after it).
    let subscription = format!("walbridge_{}", status["migration"].as_str().unwrap());
    assert_eq!(
        on_source(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender' \
             AND application_name <> '{subscription}'"
        )),
        "0",
        "no replication connection is left holding a snapshot"
    );
}

#[test]
fn the_copy_is_exactly_the_snapshot_not_later_writes() {
    let source = Cluster::builder("source").logical().start();
    let m = Migration::new(
        source,
        "CREATE TABLE feed (id bigint PRIMARY KEY, at timestamptz DEFAULT now()); \
         CREATE TABLE filler (id int PRIMARY KEY, pad text); \
         INSERT INTO filler SELECT i, repeat('x', 200) FROM generate_series(1, 200000) i;",
    );
    // A writer that keeps inserting ids in order, each in its own
    // transaction, before, during and after the snapshot.
    let url = m.source.url(DATABASE);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let (psql, password, port) = (
            m.source.install().bin("psql"),
            m.source.password().to_owned(),
            m.source.port(),
        );
        let _ = url;
        std::thread::spawn(move || {
            let mut child = std::process::Command::new(psql)
                .args([
                    "-X",
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    DATABASE,
                ])
                .env("PGPASSWORD", password)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            let mut id = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                id += 1;
                use std::io::Write;
                if writeln!(stdin, "INSERT INTO feed (id) VALUES ({id});").is_err() {
                    break;
                }
            }
            drop(stdin);
            let _ = child.wait();
            id
        })
    };
    harness::daemons::eventually(Duration::from_secs(10), "the writer to write", || {
        (m.source.psql(DATABASE, "SELECT count(*) FROM feed") != "0").then_some(())
    });

    // --copy-only: streaming would (rightly) bring the later rows over.
    // --compression none: the rows cross the link as they are.
    let (code, status, stderr) = m.cli_json(&[
        "start",
        "--agent",
        "east",
        "--json",
        "--copy-only",
        "--compression",
        "none",
    ]);
    assert_eq!(code, Some(0), "start: {stderr}");
    assert_eq!(status["phase"], "copied", "{status}");
    // Nothing streams from a copy-only migration's slot: it is gone, so
    // it holds no WAL on the source.
    assert_eq!(m.source_replication_objects(), (String::new(), String::new()));
    // The writer is still going: the source moves on past the snapshot.
    let before_stop: u64 = m.source.psql(DATABASE, "SELECT count(*) FROM feed").parse().unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();

    // The target holds exactly a prefix 1..k of the ids: every row
    // committed before the snapshot, none after it.
    let copied: u64 = m.target.psql(DATABASE, "SELECT count(*) FROM feed").parse().unwrap();
    let (min, max) = {
        let row = m.target.psql(
            DATABASE,
            "SELECT coalesce(min(id), 0) || ',' || coalesce(max(id), 0) FROM feed",
        );
        let (a, b) = row.split_once(',').unwrap();
        (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap())
    };
    assert!(copied > 0);
    assert_eq!((min, max), (1, copied), "the copy is a gap-free prefix");
    assert!(
        copied < before_stop,
        "rows written after the snapshot ({before_stop} on the source) must not be in the copy ({copied})"
    );
    // And the in-snapshot verification proved the copy equal to the snapshot.
    assert_eq!(table(&status, "public.feed")["state"], "verified");
    let feed = table(&status, "public.feed");
    assert_eq!(feed["wire_bytes"], feed["bytes"], "sent uncompressed: {feed}");
}

#[test]
fn a_large_table_is_copied_in_parallel_page_ranges_exactly() {
    let source = Cluster::builder("source").logical().start();
    let m = Migration::with_controller_args(
        source,
        "CREATE TABLE wide (id int PRIMARY KEY, pad text); \
         INSERT INTO wide SELECT i, repeat(md5(i::text), 6) FROM generate_series(1, 30000) i; \
         DELETE FROM wide WHERE id % 7 = 0; \
         CREATE TABLE narrow (id int PRIMARY KEY, note text); \
         INSERT INTO narrow SELECT i, md5(i::text) FROM generate_series(1, 5000) i;",
        &["--copy-split-bytes", "1000000"],
    );
    let (code, status, stderr) = m.cli_json(&["start", "--agent", "east", "--json", "--parallel", "3"]);
    assert_eq!(code, Some(0), "start: {stderr}");
    let wide = table(&status, "public.wide");
    assert!(wide["ranges"].as_u64().unwrap() >= 4, "split into ranges: {wide}");
    assert_eq!(wide["state"], "verified");
    assert_eq!(wide["rows"], 30000 - 30000 / 7);
    // Repeated md5 text compresses well: the link carried far fewer bytes
    // than the table holds, and status accounts for both.
    let (raw, wire) = (wide["bytes"].as_u64().unwrap(), wide["wire_bytes"].as_u64().unwrap());
    assert!(wire > 0 && wire * 2 < raw, "raw {raw} bytes, wire {wire}: {wide}");
    let (code, verify, stderr) = m.cli_json(&["verify", "--json"]);
    assert_eq!(code, Some(0), "{stderr} {verify}");

    // Every copied table has its planner statistics on the target (a
    // manual ANALYZE: autovacuum's would be last_autoanalyze).
    assert_eq!(
        m.target.psql(
            DATABASE,
            "SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_stat_user_tables \
             WHERE schemaname = 'public' AND last_analyze IS NOT NULL"
        ),
        "narrow,wide"
    );
    // A whole table was emptied and loaded in one transaction, so its rows
    // went in frozen: every page all-frozen without a vacuum. The split
    // table's ranges commit apart and cannot be.
    m.target.psql(DATABASE, "CREATE EXTENSION pg_visibility");
    let frozen = |table: &str| {
        m.target.psql(
            DATABASE,
            &format!(
                "SELECT (all_frozen = pg_relation_size('{table}') / current_setting('block_size')::int)::text \
                 FROM pg_visibility_map_summary('{table}')"
            ),
        )
    };
    assert_eq!(frozen("narrow"), "true");
    assert_eq!(frozen("wide"), "false");
}

#[test]
fn kill_9_of_the_controller_mid_copy_resumes_without_recopying_finished_tables() {
    let source = Cluster::builder("source").logical().start();
    let many = "DO $$ BEGIN FOR i IN 1..120 LOOP \
                EXECUTE format('CREATE TABLE t_%s (id int PRIMARY KEY, pad text)', i); \
                EXECUTE format('INSERT INTO t_%s SELECT g, repeat(''y'', 100) FROM generate_series(1, 2000) g', i); \
                END LOOP; END $$;";
    let mut m = Migration::new(source, many);
    let mut start = m.start_in_background(&["--parallel", "2"]);
    let before = harness::daemons::eventually(COPY_TIMEOUT, "some tables to be copied", || {
        let status = m.status();
        let done = status["tables"]
            .as_array()
            .map(|t| t.iter().filter(|t| t["state"] == "verified").count())
            .unwrap_or(0);
        (status["phase"] == "copy" && done >= 10).then_some(status)
    });
    m.controller.kill();
    let _ = start.kill();
    let _ = start.wait();
    m.controller.restart();

    let after = m.wait_for_phase("streaming", COPY_TIMEOUT);
    for t in before["tables"].as_array().unwrap() {
        if t["state"] == "verified" {
            let name = t["name"].as_str().unwrap();
            assert_eq!(
                table(&after, name)["copy_attempts"],
                1,
                "{name} was finished before the kill and must not be copied again"
            );
        }
    }
    let unverified: Vec<&Value> = after["tables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["state"] != "verified")
        .collect();
    assert!(unverified.is_empty(), "{unverified:?}");
    let (code, verify, stderr) = m.cli_json(&["verify", "--json"]);
    assert_eq!(code, Some(0), "{stderr} {verify}");
}

#[test]
fn kill_9_of_the_agent_mid_copy_restarts_from_a_fresh_slot() {
    let source = Cluster::builder("source").logical().start();
    let many = "DO $$ BEGIN FOR i IN 1..120 LOOP \
                EXECUTE format('CREATE TABLE t_%s (id int PRIMARY KEY, pad text)', i); \
                EXECUTE format('INSERT INTO t_%s SELECT g, repeat(''y'', 100) FROM generate_series(1, 2000) g', i); \
                END LOOP; END $$;";
    let mut m = Migration::new(source, many);
    let mut start = m.start_in_background(&["--parallel", "2"]);
    let before = harness::daemons::eventually(COPY_TIMEOUT, "some tables to be copied", || {
        let status = m.status();
        let done = status["tables"]
            .as_array()
            .map(|t| t.iter().filter(|t| t["state"] == "verified").count())
            .unwrap_or(0);
        (status["phase"] == "copy" && done >= 10).then_some(status)
    });
    let old_slot = before["slot"].as_str().unwrap().to_owned();
    m.agent.kill();
    m.agent.restart();

    let after = m.wait_for_phase("streaming", COPY_TIMEOUT);
    let _ = start.wait();
    assert!(after["copy_restarts"].as_u64().unwrap() >= 1, "{after}");
    assert!(
        after["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e.as_str().unwrap().contains("restarts from a new slot")),
        "status says why the copy restarted: {after}"
    );
    let new_slot = after["slot"].as_str().unwrap();
    assert_ne!(new_slot, old_slot);
    let (slots, _) = m.source_replication_objects();
    assert_eq!(
        slots, new_slot,
        "the old slot is gone from the source, the new one stays"
    );
    let (code, verify, stderr) = m.cli_json(&["verify", "--json"]);
    assert_eq!(code, Some(0), "{stderr} {verify}");
}

/// Nothing of walbridge's on either side, and no migration recorded.
fn assert_nothing_created(m: &Migration, target_tables_before: &str) {
    assert_eq!(m.source_replication_objects(), (String::new(), String::new()));
    assert_eq!(
        m.target.psql(
            DATABASE,
            "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        ),
        target_tables_before
    );
    assert_eq!(m.status()["phase"], "none");
}

#[test]
fn bad_input_is_refused_and_creates_nothing() {
    let source = Cluster::builder("source").logical().start();
    let m = Migration::new(
        source,
        "CREATE TABLE orders (id int PRIMARY KEY); CREATE TABLE clash (id int PRIMARY KEY);",
    );

    let out = m.cli(&["start", "--agent", "west"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no agent named \"west\" is connected (connected: east)"),
        "{stderr}"
    );
    assert_nothing_created(&m, "0");

    let out = m.cli(&["start", "--agent", "east", "--tables", "public.ordres"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("\"public.ordres\" matches no table"), "{stderr}");
    assert_nothing_created(&m, "0");

    m.target.psql(DATABASE, "CREATE TABLE clash (id int)");
    let out = m.cli(&["start", "--agent", "east"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("conflicting_table") && stderr.contains("public.clash"),
        "{stderr}"
    );
    assert_nothing_created(&m, "1");
}

#[test]
fn a_source_without_logical_wal_is_refused_and_nothing_is_created() {
    let source = Cluster::builder("source").start();
    let m = Migration::new(source, "CREATE TABLE orders (id int PRIMARY KEY);");
    let out = m.cli(&["start", "--agent", "east"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("wal_level"), "{stderr}");
    assert_nothing_created(&m, "0");
}

#[test]
fn a_schema_statement_the_target_rejects_is_found_before_anything_is_created_and_start_succeeds_once_fixed() {
    let source = Cluster::builder("source").logical().start();
    let m = Migration::new(
        source,
        "CREATE TYPE mood AS ENUM ('happy', 'sad'); CREATE TABLE people (id int PRIMARY KEY, m mood); \
         INSERT INTO people VALUES (1, 'happy');",
    );
    // Not a table, so only the schema's rehearsal meets it.
    m.target.psql(DATABASE, "CREATE TYPE mood AS (a int)");
    let (code, preflight, stderr) = m.cli_json(&["preflight", "--agent", "east", "--json"]);
    assert_eq!(code, Some(1), "{stderr}");
    let rejected = preflight["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "schema_statement")
        .unwrap_or_else(|| panic!("no rejected statement in {preflight}"));
    assert_eq!(rejected["object"], "TYPE public.mood", "named by its dump entry");
    let message = rejected["message"].as_str().unwrap();
    assert!(message.contains("already exists"), "the target's error: {message}");
    assert!(
        message.contains("CREATE TYPE public.mood AS ENUM"),
        "the statement: {message}"
    );
    assert!(message.contains("leftover of an earlier attempt"), "{message}");
    let fix = rejected["fix"].as_str().unwrap();
    assert!(fix.starts_with("DROP TYPE public.mood CASCADE;"), "{fix}");
    assert!(fix.contains("--skip 'TYPE public.mood'"), "{fix}");

    let out = m.cli(&["start", "--agent", "east"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("preflight found 1 error(s); nothing was created"),
        "{stderr}"
    );
    assert!(
        stderr.contains("TYPE public.mood") && stderr.contains("already exists"),
        "{stderr}"
    );
    assert_eq!(m.status()["phase"], "none");
    // Nothing was created on either side: no slot, publication, walsender.
    assert_eq!(m.source_replication_objects(), (String::new(), String::new()));
    assert_eq!(
        m.source.psql(
            DATABASE,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'"
        ),
        "0"
    );
    assert_eq!(
        m.target
            .psql(DATABASE, "SELECT count(*) FROM pg_tables WHERE tablename = 'people'"),
        "0",
        "the rehearsal was rolled back"
    );

    // The cause removed, start succeeds.
    m.target.psql(DATABASE, "DROP TYPE mood");
    let (code, status, stderr) = m.cli_json(&["start", "--agent", "east", "--json"]);
    assert_eq!(code, Some(0), "start: {stderr} {status}");
    assert_eq!(table(&status, "public.people")["state"], "verified");
}

#[test]
fn rows_larger_than_a_grpc_message_are_copied_exactly() {
    // 10 MB of COPY text per row (hex of random bytes, which zstd halves
    // at best): more than gRPC's 4 MB message limit, compressed or not.
    let source = Cluster::builder("source").logical().start();
    let m = Migration::new(
        source,
        "CREATE TABLE blobs (id int PRIMARY KEY, data bytea); \
         INSERT INTO blobs SELECT i, (SELECT decode(string_agg(md5(random()::text || j), ''), 'hex') \
                                      FROM generate_series(1, 5 * 65536) j) \
         FROM generate_series(1, 3) i;",
    );
    let (code, status, stderr) = m.cli_json(&["start", "--agent", "east", "--json", "--copy-only"]);
    assert_eq!(code, Some(0), "start: {stderr} {status}");
    let blobs = table(&status, "public.blobs");
    assert_eq!(blobs["state"], "verified", "{blobs}");
    assert_eq!(blobs["rows"], 3);
    assert!(blobs["bytes"].as_u64().unwrap() > 30_000_000, "{blobs}");
}
