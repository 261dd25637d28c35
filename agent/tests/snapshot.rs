//! Creating the slot and its snapshot against a real server: bounded by a
//! deadline, and when a transaction blocks it, the error names that
//! transaction (its pid and state, or a prepared transaction's gid) with
//! the statement that ends it, and no half-made slot stays behind.

use std::sync::Arc;
use std::time::Duration;

use harness::Cluster;
use tokio_postgres::NoTls;
use walbridge_agent::snapshot::{SnapshotError, Snapshots};
use walbridge_daemon::pg::Database;
use walbridge_migration::fault::FaultKind;
use walbridge_migration::ident::QualifiedName;

async fn sql(cluster: &Cluster) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&cluster.url("postgres"), NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

fn source(cluster: &Cluster) -> Database {
    Database::parse("source.url", &cluster.url("postgres")).unwrap()
}

async fn slots(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0)
}

/// Creates the slot with a deadline of `deadline`; a creation that
/// ignored it would hang, so the test bounds it too.
async fn create(
    snapshots: &Arc<Snapshots>,
    cluster: &Cluster,
    tables: &[QualifiedName],
    deadline: Duration,
) -> Result<walbridge_agent::snapshot::HeldSnapshot, SnapshotError> {
    tokio::time::timeout(
        deadline + Duration::from_secs(10),
        snapshots.create(&source(cluster), "blocked_slot", "pub", tables, None, Some(deadline)),
    )
    .await
    .expect("the slot's creation gives up at its deadline")
}

/// Waits (bounded) until no slot exists: a cancelled creation's walsender
/// takes its half-made slot with it as it exits.
async fn no_slot_left(client: &tokio_postgres::Client) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while slots(client).await != 0 {
        assert!(std::time::Instant::now() < deadline, "a half-made slot stayed behind");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_transaction_that_blocks_the_slot_is_named_once_the_deadline_passes() {
    let cluster = Cluster::builder("snap")
        .logical()
        .setting("max_prepared_transactions", "4")
        .start();
    let client = sql(&cluster).await;
    client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE u (id int PRIMARY KEY)")
        .await
        .unwrap();
    let tables = [QualifiedName::new("public", "t")];
    let snapshots = Arc::new(Snapshots::default());

    // An open transaction that holds an xid.
    let open = sql(&cluster).await;
    open.batch_execute("SET application_name = 'the-app'; BEGIN; INSERT INTO u VALUES (1)")
        .await
        .unwrap();
    let pid: i32 = open.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let started = std::time::Instant::now();
    let error = create(&snapshots, &cluster, &tables, Duration::from_secs(1))
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(error, SnapshotError::Blocked { .. }), "{error:?}");
    assert_eq!(error.kind(), FaultKind::Blocked);
    let message = error.to_string();
    for needed in [
        "blocked_slot".to_owned(),
        "it waits for the transaction of pid".to_owned(),
        format!("pid {pid}"),
        "application the-app".to_owned(),
        "state idle in transaction".to_owned(),
        "open ".to_owned(),
        format!("pg_terminate_backend({pid})"),
    ] {
        assert!(message.contains(&needed), "{needed:?} in {message}");
    }
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(10),
        "bounded by its deadline: {waited:?}"
    );
    no_slot_left(&client).await;
    open.batch_execute("ROLLBACK").await.unwrap();

    // A prepared transaction: no session to end, a gid to settle.
    client
        .batch_execute("BEGIN; INSERT INTO u VALUES (2); PREPARE TRANSACTION 'order''s gid'")
        .await
        .unwrap();
    let error = create(&snapshots, &cluster, &tables, Duration::from_secs(1))
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("it waits for prepared transaction 'order's gid'")
            && message.contains("ROLLBACK PREPARED 'order''s gid'")
            && message.contains("database postgres"),
        "{message}"
    );
    no_slot_left(&client).await;
    client.batch_execute("ROLLBACK PREPARED 'order''s gid'").await.unwrap();

    // Nothing blocks it now: the slot is made, its snapshot held.
    let held = create(&snapshots, &cluster, &tables, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(snapshots.is_held(&held.snapshot));
    assert_eq!(slots(&client).await, 1);
    snapshots.release(&held.snapshot);
}
