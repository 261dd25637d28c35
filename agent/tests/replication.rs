//! The replication-protocol connection against a real server: SCRAM,
//! the exported snapshot's lifetime, slot creation and dropping.

use std::time::Duration;

use harness::Cluster;
use tokio_postgres::NoTls;
use walbridge_agent::replication::{ReplicationConnection, ReplicationError};
use walbridge_daemon::pg::Database;

const APP: &str = "walbridge-replication-test";

fn config(cluster: &Cluster) -> Database {
    Database::parse("source.url", &cluster.url("postgres")).unwrap()
}

async fn sql(cluster: &Cluster) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&cluster.url("postgres"), NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

#[tokio::test]
async fn connects_with_scram_and_identifies_the_system() {
    let cluster = Cluster::builder("repl").logical().start();
    let mut connection = ReplicationConnection::connect(&config(&cluster), APP).await.unwrap();
    assert!(connection.server_version_num() >= 100000);
    let identity = connection.identify_system().await.unwrap();
    assert_eq!(
        identity.system_id,
        cluster.psql("postgres", "SELECT system_identifier FROM pg_control_system()")
    );
    assert_eq!(identity.database.as_deref(), Some("postgres"));
    connection.close().await;
}

#[tokio::test]
async fn a_wrong_password_is_an_auth_error_that_does_not_repeat_it() {
    let cluster = Cluster::builder("repl").logical().start();
    let url = cluster
        .url("postgres")
        .replace(cluster.password(), "not-the-password-42");
    let config = Database::parse("source.url", &url).unwrap();
    let error = ReplicationConnection::connect(&config, APP).await.unwrap_err();
    assert!(matches!(error, ReplicationError::Auth(_)), "{error:?}");
    assert!(!error.to_string().contains("not-the-password-42"), "{error}");
}

#[tokio::test]
async fn the_exported_snapshot_sees_exactly_the_rows_at_slot_creation_while_held() {
    let cluster = Cluster::builder("repl").logical().start();
    cluster.psql(
        "postgres",
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10); \
         CREATE PUBLICATION p FOR ALL TABLES",
    );
    let mut connection = ReplicationConnection::connect(&config(&cluster), APP).await.unwrap();
    let slot = connection
        .create_logical_slot_exporting_snapshot("test_slot")
        .await
        .unwrap();
    assert_eq!(slot.slot_name, "test_slot");
    assert_eq!(slot.output_plugin, "pgoutput");
    cluster.psql("postgres", "INSERT INTO t SELECT generate_series(11, 15)");

    let client = sql(&cluster).await;
    client
        .batch_execute(&format!(
            "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
            slot.snapshot_name
        ))
        .await
        .unwrap();
    let in_snapshot: i64 = client.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(
        in_snapshot, 10,
        "the snapshot sees the rows as they were at slot creation"
    );
    client.batch_execute("COMMIT").await.unwrap();
    assert_eq!(cluster.psql("postgres", "SELECT count(*) FROM t"), "15");

    let confirmed = cluster.psql(
        "postgres",
        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'test_slot' AND plugin = 'pgoutput'",
    );
    assert_eq!(confirmed, slot.consistent_point);

    // Closing the connection ends the snapshot. The server tears the
    // walsender down after our side has closed, so poll until the import
    // fails; a snapshot that stayed importable would time out here.
    connection.close().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let error = loop {
        client
            .batch_execute("START TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .await
            .unwrap();
        let imported = client
            .batch_execute(&format!("SET TRANSACTION SNAPSHOT '{}'", slot.snapshot_name))
            .await;
        client.batch_execute("ROLLBACK").await.unwrap();
        match imported {
            Err(error) => break error,
            Ok(()) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the snapshot is still importable 10 s after its connection closed"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // 22023: the snapshot file is gone; 55000: its exporting process is.
    let code = error.code().map(|c| c.code().to_owned());
    assert!(matches!(code.as_deref(), Some("22023" | "55000")), "{error}");
}

#[tokio::test]
async fn closed_resolves_when_the_backend_is_terminated() {
    let cluster = Cluster::builder("repl").logical().start();
    let mut connection = ReplicationConnection::connect(&config(&cluster), "walbridge-victim")
        .await
        .unwrap();
    connection
        .create_logical_slot_exporting_snapshot("victim")
        .await
        .unwrap();
    let client = sql(&cluster).await;
    client
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'walbridge-victim'",
        )
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), connection.closed())
        .await
        .expect("closed() resolves once the backend is gone");
    assert!(
        matches!(ended, ReplicationError::Closed | ReplicationError::Server { .. }),
        "{ended:?}"
    );
}

#[tokio::test]
async fn drop_slot_removes_it_and_a_missing_slot_is_a_server_error() {
    let cluster = Cluster::builder("repl").logical().start();
    let mut creator = ReplicationConnection::connect(&config(&cluster), APP).await.unwrap();
    creator.create_logical_slot_exporting_snapshot("doomed").await.unwrap();
    creator.close().await;

    let mut connection = ReplicationConnection::connect(&config(&cluster), APP).await.unwrap();
    connection.drop_slot("doomed").await.unwrap();
    assert_eq!(
        cluster.psql("postgres", "SELECT count(*) FROM pg_replication_slots"),
        "0"
    );
    match connection.drop_slot("doomed").await {
        Err(ReplicationError::Server { code, .. }) => assert_eq!(code, "42704"),
        other => panic!("expected undefined_object, got {other:?}"),
    }
}
