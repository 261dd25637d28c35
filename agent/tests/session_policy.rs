//! The session policy against real servers of the oldest, the local and a
//! recent major: a role whose `ALTER ROLE ... SET` timeouts would cut a
//! long copy off reaches none of walbridge's sessions — ordinary ones,
//! the replication connection holding an exported snapshot, or a libpq
//! child given `libpq_environment` — and settings a server lacks
//! (`idle_session_timeout` before 14, `transaction_timeout` before 17) do
//! not break the connection.
//!
//! The waits here are the subject, not synchronisation: a session stays
//! idle (or a statement runs) for longer than the role's timeout allows.

use std::time::Duration;

use harness::{Cluster, PgInstall};
use tokio_postgres::NoTls;
use walbridge_agent::replication::ReplicationConnection;
use walbridge_daemon::pg::{Database, SessionPolicy};

const APP: &str = "walbridge-policy-test";
/// Longer than every timeout the role sets.
const OVERSTAY: Duration = Duration::from_millis(1500);

/// A role whose own settings cut sessions off after a second.
fn timid_role(cluster: &Cluster, major: u32) -> String {
    let mut sql = String::from(
        "CREATE ROLE timid LOGIN REPLICATION PASSWORD 'timid-pw'; \
         CREATE TABLE kept (id int); INSERT INTO kept VALUES (1), (2); GRANT SELECT ON kept TO timid; \
         ALTER ROLE timid SET statement_timeout = '1s'; \
         ALTER ROLE timid SET idle_in_transaction_session_timeout = '1s'; \
         ALTER ROLE timid SET lock_timeout = '1s';",
    );
    if major >= 14 {
        sql.push_str("ALTER ROLE timid SET idle_session_timeout = '1s';");
    }
    if major >= 17 {
        sql.push_str("ALTER ROLE timid SET transaction_timeout = '1s';");
    }
    cluster.psql("postgres", &sql);
    format!(
        "postgres://timid:timid-pw@127.0.0.1:{}/postgres?sslmode=disable",
        cluster.port()
    )
}

async fn show(client: &tokio_postgres::Client, setting: &str) -> String {
    client
        .query_one(&format!("SHOW {setting}"), &[])
        .await
        .unwrap_or_else(|e| panic!("SHOW {setting}: {e}"))
        .get(0)
}

async fn check(cluster: &Cluster, major: u32) {
    let url = timid_role(cluster, major);
    // Without walbridge's policy the role's settings apply: this is what
    // the rest of the test is up against.
    let (plain, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(connection);
    assert_eq!(show(&plain, "statement_timeout").await, "1s", "PostgreSQL {major}");
    assert!(
        plain.batch_execute("SELECT pg_sleep(1.5)").await.is_err(),
        "PostgreSQL {major}: the role's timeouts cut a long statement off"
    );

    let source = Database::parse("source.url", &url).unwrap();
    let bulk = source
        .connect_with(APP, &SessionPolicy::UNBOUNDED)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL {major}: {e}"));
    let mut unbounded = vec![
        "statement_timeout",
        "lock_timeout",
        "idle_in_transaction_session_timeout",
    ];
    if major >= 14 {
        unbounded.push("idle_session_timeout");
    }
    if major >= 17 {
        unbounded.push("transaction_timeout");
    }
    for setting in unbounded {
        assert_eq!(show(&bulk, setting).await, "0", "PostgreSQL {major}: {setting}");
    }
    bulk.batch_execute("SELECT pg_sleep(1.5)")
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL {major}: a long statement: {e}"));
    bulk.batch_execute("BEGIN").await.unwrap();
    tokio::time::sleep(OVERSTAY).await;
    bulk.batch_execute("SELECT 1; COMMIT")
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL {major}: idle in a transaction: {e}"));
    tokio::time::sleep(OVERSTAY).await;
    bulk.batch_execute("SELECT 1")
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL {major}: an idle session: {e}"));

    let questions = source.connect_with(APP, &SessionPolicy::BOUNDED).await.unwrap();
    assert_eq!(show(&questions, "statement_timeout").await, "30s", "PostgreSQL {major}");
    assert_eq!(show(&questions, "lock_timeout").await, "10s", "PostgreSQL {major}");

    // The replication connection's walsender holds the exported snapshot
    // idle in its transaction: the role's idle timeout would end it.
    let mut replication = ReplicationConnection::connect(&source, APP)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL {major}: {e}"));
    let slot = replication
        .create_logical_slot_exporting_snapshot("patient")
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL {major}: {e}"));
    tokio::time::sleep(OVERSTAY).await;
    bulk.batch_execute(&format!(
        "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
        slot.snapshot_name
    ))
    .await
    .unwrap_or_else(|e| panic!("PostgreSQL {major}: the snapshot after {OVERSTAY:?} idle: {e}"));
    let rows: i64 = bulk.query_one("SELECT count(*) FROM kept", &[]).await.unwrap().get(0);
    assert_eq!(rows, 2);
    bulk.batch_execute("COMMIT").await.unwrap();
    replication.close().await;

    // A libpq child (pg_dump's way) gets the policy through PGOPTIONS.
    let shown = std::process::Command::new("psql")
        .args(["-X", "-At", "-c", "SHOW statement_timeout"])
        .envs(source.libpq_environment(APP, &SessionPolicy::UNBOUNDED))
        .output()
        .expect("psql runs");
    assert_eq!(
        String::from_utf8_lossy(&shown.stdout).trim(),
        "0",
        "PostgreSQL {major}: {}",
        String::from_utf8_lossy(&shown.stderr)
    );
}

#[tokio::test]
async fn a_roles_timeouts_reach_no_walbridge_session_on_10_15_and_17() {
    check(&Cluster::builder("policy-15").logical().start(), 15).await;
    for major in [10, 17] {
        let cluster = Cluster::builder(&format!("policy-{major}"))
            .install(&PgInstall::fetch(major))
            .logical()
            .start();
        check(&cluster, major).await;
    }
}
