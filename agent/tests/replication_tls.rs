//! The replication connection over TLS against real servers: a slot and
//! its exported snapshot made over a verified, channel-bound connection
//! (the walsender's `pg_stat_ssl` says so), and the same refusals, in the
//! same words, as every other session.

use harness::{Cluster, TestCa};
use walbridge_agent::replication::{ReplicationConnection, ReplicationError};
use walbridge_daemon::pg::Database;

const APP: &str = "walbridge-replication-tls-test";
const NAME: &str = "source.walbridge.test";

fn source(cluster: &Cluster, params: &str) -> Database {
    let raw = format!(
        "host={NAME} hostaddr=127.0.0.1 port={} user=postgres password={} dbname=postgres {params}",
        cluster.port(),
        cluster.password()
    );
    Database::parse_in("source.url", &raw, &std::collections::BTreeMap::new()).unwrap()
}

fn walsender_encrypted(cluster: &Cluster, connection: &ReplicationConnection) -> String {
    let pid = connection.backend_pid().expect("the server sent its process id");
    cluster.psql("postgres", &format!("SELECT ssl FROM pg_stat_ssl WHERE pid = {pid}"))
}

/// The connection error, checked to be one line naming the setting and
/// not carrying the password.
async fn refused(db: &Database, cluster: &Cluster) -> ReplicationError {
    let error = ReplicationConnection::connect(db, APP).await.unwrap_err();
    let text = error.to_string();
    assert!(!text.contains('\n') && text.contains("(source.url)"), "{text}");
    assert!(!text.contains(cluster.password()), "{text}");
    error
}

#[tokio::test]
async fn a_slot_and_its_snapshot_are_made_over_verified_channel_bound_tls() {
    let ca = TestCa::new("repl");
    let cluster = Cluster::builder("repl-tls")
        .logical()
        .ssl_only(ca.server(&[NAME]))
        .start();
    cluster.psql(
        "postgres",
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10); \
         CREATE PUBLICATION p FOR ALL TABLES",
    );
    // channel_binding=require: SCRAM-SHA-256-PLUS, or no connection.
    let db = source(
        &cluster,
        &format!(
            "sslmode=verify-full sslrootcert={} channel_binding=require",
            ca.cert_path().display()
        ),
    );
    let mut connection = ReplicationConnection::connect(&db, APP).await.unwrap();
    let slot = connection
        .create_logical_slot_exporting_snapshot("tls_slot")
        .await
        .unwrap();
    assert_eq!(walsender_encrypted(&cluster, &connection), "t");
    cluster.psql("postgres", "INSERT INTO t SELECT generate_series(11, 15)");

    let session = db.connect(APP).await.unwrap();
    session
        .batch_execute(&format!(
            "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
            slot.snapshot_name
        ))
        .await
        .unwrap();
    let seen: i64 = session.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(seen, 10, "the snapshot exported over TLS is importable over TLS");
    connection.close().await;
}

#[tokio::test]
async fn sslmode_attempts_are_those_of_every_session() {
    let ca = TestCa::new("repl-modes");
    let only = Cluster::builder("repl-only")
        .logical()
        .ssl_only(ca.server(&[NAME]))
        .start();
    // allow: plain text refused, then TLS.
    let mut allowed = ReplicationConnection::connect(&source(&only, "sslmode=allow"), APP)
        .await
        .unwrap();
    allowed.identify_system().await.unwrap();
    assert_eq!(walsender_encrypted(&only, &allowed), "t");

    let plain = Cluster::builder("repl-plain").logical().plain_only().start();
    let mut preferred = ReplicationConnection::connect(&source(&plain, "sslmode=prefer"), APP)
        .await
        .unwrap();
    preferred.identify_system().await.unwrap();
    assert_eq!(walsender_encrypted(&plain, &preferred), "f");
    let error = refused(&source(&plain, "sslmode=require"), &plain).await;
    assert!(matches!(error, ReplicationError::Connect(_)), "{error:?}");
    assert!(error.to_string().contains("the server does not support TLS"), "{error}");
}

#[tokio::test]
async fn verification_failures_read_as_for_every_session() {
    let ca = TestCa::new("repl-right");
    let other = TestCa::new("repl-other");
    let cluster = Cluster::builder("repl-verify")
        .logical()
        .ssl_only(ca.server(&[NAME]))
        .start();
    let wrong = source(
        &cluster,
        &format!("sslmode=verify-full sslrootcert={}", other.cert_path().display()),
    );
    let error = refused(&wrong, &cluster).await;
    let session_error = wrong.connect(APP).await.unwrap_err().to_string();
    assert_eq!(error.to_string(), session_error, "one description for both clients");
    assert!(session_error.contains("(unknown issuer)"), "{session_error}");
}

#[tokio::test]
async fn a_client_certificate_goes_with_the_replication_connection() {
    let server_ca = TestCa::new("repl-server");
    let client_ca = TestCa::new("repl-clients");
    let cluster = Cluster::builder("repl-cert")
        .logical()
        .ssl_only(server_ca.server(&[NAME]))
        .client_certificates(&client_ca)
        .start();
    let root = server_ca.cert_path().display();
    let client = client_ca.client("postgres");
    let with_cert = source(
        &cluster,
        &format!(
            "sslmode=verify-full sslrootcert={root} sslcert={} sslkey={}",
            client.cert_path.display(),
            client.key_path.display()
        ),
    );
    let mut connection = ReplicationConnection::connect(&with_cert, APP).await.unwrap();
    connection.identify_system().await.unwrap();
    assert_eq!(walsender_encrypted(&cluster, &connection), "t");

    let without = refused(
        &source(&cluster, &format!("sslmode=verify-full sslrootcert={root}")),
        &cluster,
    )
    .await;
    assert!(matches!(without, ReplicationError::Auth(_)), "{without:?}");
    assert!(without.to_string().contains("valid client certificate"), "{without}");
}

/// PostgreSQL 17's direct TLS (no SSLRequest; ALPN `postgresql` required),
/// for a session and for the replication connection.
#[tokio::test]
async fn direct_tls_to_postgresql_17_for_sessions_and_replication() {
    let ca = TestCa::new("direct");
    let cluster = Cluster::builder("pg17-direct")
        .install(&harness::PgInstall::fetch(17))
        .logical()
        .ssl_only(ca.server(&[NAME]))
        .start();
    assert!(cluster.psql("postgres", "SHOW server_version").starts_with("17."));
    let db = source(
        &cluster,
        &format!(
            "sslmode=verify-full sslrootcert={} sslnegotiation=direct channel_binding=require",
            ca.cert_path().display()
        ),
    );
    let session = db.connect(APP).await.unwrap_or_else(|e| panic!("{e}"));
    let ssl: bool = session
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(ssl);

    let mut connection = ReplicationConnection::connect(&db, APP)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let slot = connection
        .create_logical_slot_exporting_snapshot("direct_slot")
        .await
        .unwrap();
    assert!(!slot.snapshot_name.is_empty());
    assert_eq!(walsender_encrypted(&cluster, &connection), "t");
    connection.close().await;
}
