//! Source-side preflight against real servers: one source (a database of
//! its own, or a cluster where the problem is server-wide) per problem,
//! and a clean source that reports no error.

use std::time::Duration;

use harness::Cluster;
use tokio_postgres::NoTls;
use walbridge_agent::preflight::{SourceScope, check_source};
use walbridge_migration::finding::{Finding, Severity};

async fn findings_as(url: &str, scope: &SourceScope) -> Vec<Finding> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(connection);
    check_source(&client, scope).await.unwrap().0
}

fn scope() -> SourceScope {
    SourceScope {
        tables: None,
        connected_port: None,
        long_transaction_after: Duration::from_secs(300),
    }
}

/// A database of its own on `cluster`, prepared with `sql`; its findings.
async fn findings_for(cluster: &Cluster, database: &str, sql: &str) -> Vec<Finding> {
    cluster.create_database(database);
    if !sql.is_empty() {
        cluster.psql(database, sql);
    }
    findings_as(&cluster.url(database), &scope()).await
}

fn find<'a>(findings: &'a [Finding], check: &str) -> &'a Finding {
    findings
        .iter()
        .find(|f| f.check == check)
        .unwrap_or_else(|| panic!("no {check} finding in {findings:#?}"))
}

fn errors(findings: &[Finding]) -> Vec<&Finding> {
    findings.iter().filter(|f| f.is_error()).collect()
}

#[tokio::test]
async fn each_problem_on_a_logical_source_is_found() {
    let cluster = Cluster::builder("preflight")
        .logical()
        .setting("max_prepared_transactions", "5")
        .start();

    let clean = findings_for(&cluster, "clean", "CREATE TABLE t (id int PRIMARY KEY)").await;
    assert!(errors(&clean).is_empty(), "{clean:#?}");

    let f = findings_for(
        &cluster,
        "nopk",
        "CREATE SCHEMA \"Sales\"; CREATE TABLE \"Sales\".\"Order Lines\" (qty int)",
    )
    .await;
    let nopk = find(&f, "no_replica_identity");
    assert_eq!(nopk.severity, Severity::Error);
    assert_eq!(nopk.object, "\"Sales\".\"Order Lines\"");
    assert!(nopk.fix.contains("REPLICA IDENTITY FULL"));

    let f = findings_for(&cluster, "unlogged", "CREATE UNLOGGED TABLE u (id int PRIMARY KEY)").await;
    let unlogged = find(&f, "unlogged_table");
    assert_eq!(
        (unlogged.severity, unlogged.object.as_str()),
        (Severity::Error, "public.u")
    );

    let f = findings_for(
        &cluster,
        "matview",
        "CREATE TABLE t (id int PRIMARY KEY); CREATE MATERIALIZED VIEW mv AS SELECT * FROM t",
    )
    .await;
    let mv = find(&f, "materialized_view");
    assert_eq!((mv.severity, mv.object.as_str()), (Severity::Warning, "public.mv"));

    let f = findings_for(
        &cluster,
        "foreign",
        "CREATE FOREIGN DATA WRAPPER dummy; CREATE SERVER elsewhere FOREIGN DATA WRAPPER dummy; \
         CREATE FOREIGN TABLE remote (id int) SERVER elsewhere",
    )
    .await;
    assert_eq!(find(&f, "foreign_table").object, "public.remote");

    let f = findings_for(&cluster, "lobs", "SELECT lo_create(0)").await;
    assert_eq!(find(&f, "large_objects").severity, Severity::Warning);

    let f = findings_for(
        &cluster,
        "partitioned",
        "CREATE TABLE p (id int, k int, PRIMARY KEY (id, k)) PARTITION BY LIST (k); \
         CREATE TABLE p1 PARTITION OF p FOR VALUES IN (1)",
    )
    .await;
    assert_eq!(find(&f, "partitioned_table").object, "public.p");
    assert!(
        errors(&f).is_empty(),
        "a partition inheriting a primary key is fine: {f:#?}"
    );

    // A prepared transaction: made by psql in its own session.
    cluster.create_database("prepared");
    cluster.psql("prepared", "CREATE TABLE t (id int PRIMARY KEY)");
    cluster.psql(
        "prepared",
        "BEGIN; INSERT INTO t VALUES (1); PREPARE TRANSACTION 'pending one'",
    );
    let f = findings_as(&cluster.url("prepared"), &scope()).await;
    let prepared = find(&f, "prepared_transaction");
    assert_eq!(
        (prepared.severity, prepared.object.as_str()),
        (Severity::Error, "pending one")
    );
    cluster.psql("prepared", "ROLLBACK PREPARED 'pending one'");

    // A long transaction (the threshold set to zero for the test).
    cluster.create_database("long");
    let (holder, connection) = tokio_postgres::connect(&cluster.url("long"), NoTls).await.unwrap();
    tokio::spawn(connection);
    holder.batch_execute("BEGIN; SELECT txid_current()").await.unwrap();
    let f = findings_as(
        &cluster.url("long"),
        &SourceScope {
            long_transaction_after: Duration::ZERO,
            ..scope()
        },
    )
    .await;
    assert_eq!(find(&f, "long_transaction").severity, Severity::Warning);
    holder.batch_execute("ROLLBACK").await.unwrap();

    // A pooler in between: the port connected to is not the server's.
    let f = findings_as(
        &cluster.url("clean"),
        &SourceScope {
            connected_port: Some(6432),
            ..scope()
        },
    )
    .await;
    assert_eq!(find(&f, "pooler").severity, Severity::Warning);

    // Row-level security, missing SELECT and no REPLICATION, as a role
    // that is not a superuser.
    cluster.create_database("roles");
    cluster.psql(
        "roles",
        "CREATE ROLE copier LOGIN PASSWORD 'copier-pw'; \
         CREATE TABLE guarded (id int PRIMARY KEY); ALTER TABLE guarded ENABLE ROW LEVEL SECURITY; \
         GRANT SELECT ON guarded TO copier; \
         CREATE TABLE secret (id int PRIMARY KEY)",
    );
    let url = format!("postgres://copier:copier-pw@127.0.0.1:{}/roles", cluster.port());
    let f = findings_as(&url, &scope()).await;
    let rls = find(&f, "row_level_security");
    assert_eq!((rls.severity, rls.object.as_str()), (Severity::Error, "public.guarded"));
    assert!(rls.fix.contains("BYPASSRLS"));
    assert_eq!(find(&f, "select_privilege").object, "public.secret");
    assert_eq!(find(&f, "replication_privilege").object, "copier");

    // A scope leaves out the tables it does not name.
    let f = findings_as(
        &url,
        &SourceScope {
            tables: Some(vec![walbridge_migration::ident::QualifiedName::new(
                "public", "guarded",
            )]),
            ..scope()
        },
    )
    .await;
    assert!(f.iter().all(|f| f.object != "public.secret"), "{f:#?}");
}

#[tokio::test]
async fn a_source_without_logical_wal_is_an_error() {
    let cluster = Cluster::builder("replica-wal").start();
    let f = findings_as(&cluster.url("postgres"), &scope()).await;
    let wal = find(&f, "wal_level");
    assert_eq!((wal.severity, wal.object.as_str()), (Severity::Error, "wal_level"));
    assert!(wal.fix.contains("wal_level = logical"));
}

#[tokio::test]
async fn no_free_slot_no_free_sender_and_a_short_sender_timeout_are_found() {
    let cluster = Cluster::builder("full")
        .logical()
        .setting("max_replication_slots", "1")
        .setting("max_wal_senders", "1")
        .setting("wal_sender_timeout", "5s")
        .start();
    // The only WAL sender, taken by a replication connection held open.
    let mut sender = walbridge_agent::replication::ReplicationConnection::connect(
        &walbridge_daemon::pg::Database::parse("source.url", &cluster.url("postgres")).unwrap(),
        "holder",
    )
    .await
    .unwrap();
    sender.identify_system().await.unwrap();
    cluster.psql(
        "postgres",
        "SELECT pg_create_logical_replication_slot('taken', 'pgoutput')",
    );
    let f = findings_as(&cluster.url("postgres"), &scope()).await;
    assert_eq!(find(&f, "replication_slots").severity, Severity::Error);
    assert_eq!(find(&f, "wal_sender_timeout").severity, Severity::Warning);
    assert_eq!(find(&f, "wal_senders").severity, Severity::Error);
    sender.close().await;
}
