//! `Database::connect` against real servers speaking TLS: each sslmode,
//! verification that succeeds and each way it fails (one line naming the
//! setting and the reason, never the password), libpq's fallbacks that
//! `prefer` and `allow` make and `require`/`verify-*` never make, client
//! certificates, channel binding, the environment, and pg_dump run with
//! `libpq_environment`.

use std::collections::BTreeMap;

use walbridge_daemon::pg::{ConnectError, Database, FailureKind};
use walbridge_pgcluster::{Cluster, TestCa};

const APP: &str = "walbridge-tls-test";
/// The name the server certificates carry; the tests reach it through
/// `hostaddr`, as libpq checks the name in `host`.
const NAME: &str = "db.walbridge.test";

fn no_env() -> BTreeMap<String, String> {
    BTreeMap::new()
}

/// `source.url` for `cluster` as NAME at 127.0.0.1, with `params`.
fn url(cluster: &Cluster, params: &str) -> String {
    format!(
        "host={NAME} hostaddr=127.0.0.1 port={} user=postgres password={} dbname=postgres {params}",
        cluster.port(),
        cluster.password()
    )
}

fn database(raw: &str) -> Database {
    Database::parse_in("source.url", raw, &no_env()).unwrap_or_else(|e| panic!("{e}"))
}

/// Whether the session is encrypted, as the server sees it.
async fn encrypted(db: &Database) -> bool {
    let client = db.connect(APP).await.unwrap_or_else(|e| panic!("{e}"));
    client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// The error connecting, checked to be one line that names the setting
/// and does not carry the password.
async fn refused(db: &Database, cluster: &Cluster) -> ConnectError {
    let error = match db.connect(APP).await {
        Ok(_) => panic!("{db:?} connected"),
        Err(e) => e,
    };
    let text = error.to_string();
    assert!(!text.contains('\n'), "one line: {text}");
    assert!(text.contains("(source.url)"), "{text}");
    assert!(!text.contains(cluster.password()), "{text}");
    error
}

fn ssl_server(ca: &TestCa, only: bool) -> Cluster {
    let cert = ca.server(&[NAME, "127.0.0.1"]);
    let builder = Cluster::builder("tls");
    if only {
        builder.ssl_only(cert)
    } else {
        builder.ssl(cert)
    }
    .start()
}

#[tokio::test]
async fn each_sslmode_encrypts_as_libpq_would() {
    let ca = TestCa::new("modes");
    let both = ssl_server(&ca, false);
    let root = ca.cert_path().display().to_string();
    for (mode, expected) in [
        ("sslmode=disable", false),
        ("sslmode=allow", false),
        ("sslmode=prefer", true),
        ("sslmode=require", true),
        (&format!("sslmode=verify-ca sslrootcert={root}") as &str, true),
        (&format!("sslmode=verify-full sslrootcert={root}"), true),
    ] {
        assert_eq!(encrypted(&database(&url(&both, mode))).await, expected, "{mode}");
    }
    // verify-full against the address itself: the certificate's IP name.
    let by_address = database(&format!(
        "postgres://postgres:{}@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={root}",
        both.password(),
        both.port()
    ));
    assert!(encrypted(&by_address).await);

    // allow tries plain text first, and TLS when the server refuses it.
    let only = ssl_server(&ca, true);
    assert!(encrypted(&database(&url(&only, "sslmode=allow"))).await);
    let plain = refused(&database(&url(&only, "sslmode=disable")), &only).await;
    assert_eq!(plain.kind(), FailureKind::Refused);
    assert!(plain.to_string().contains("no pg_hba.conf entry"), "{plain}");
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_an_unknown_issuer() {
    let ca = TestCa::new("right");
    let other = TestCa::new("other");
    let server = ssl_server(&ca, true);
    let wrong_root = other.cert_path().display().to_string();
    for mode in ["verify-full", "verify-ca", "require"] {
        let db = database(&url(&server, &format!("sslmode={mode} sslrootcert={wrong_root}")));
        let error = refused(&db, &server).await;
        assert_eq!(error.kind(), FailureKind::Tls, "{mode}");
        assert!(
            error.to_string().contains(&format!(
                "the server's certificate is not signed by a CA in sslrootcert ({wrong_root}) (unknown issuer)"
            )),
            "{mode}: {error}"
        );
    }
    // require without a root certificate trusts any certificate.
    assert!(encrypted(&database(&url(&server, "sslmode=require"))).await);
}

#[tokio::test]
async fn a_certificate_for_another_name_says_which_names_it_has() {
    let ca = TestCa::new("names");
    let server = Cluster::builder("tls")
        .ssl_only(ca.server(&["other.walbridge.test", "10.9.8.7"]))
        .start();
    let root = ca.cert_path().display().to_string();
    let error = refused(
        &database(&url(&server, &format!("sslmode=verify-full sslrootcert={root}"))),
        &server,
    )
    .await;
    assert_eq!(error.kind(), FailureKind::Tls);
    let text = error.to_string();
    assert!(
        text.contains(&format!("not valid for host name \"{NAME}\""))
            && text.contains("other.walbridge.test, 10.9.8.7"),
        "{text}"
    );
    // verify-ca checks the chain, not the name.
    assert!(
        encrypted(&database(&url(
            &server,
            &format!("sslmode=verify-ca sslrootcert={root}")
        )))
        .await
    );
}

#[tokio::test]
async fn an_expired_certificate_is_refused_by_verification() {
    let ca = TestCa::new("expired");
    let server = Cluster::builder("tls").ssl_only(ca.expired_server(&[NAME])).start();
    let root = ca.cert_path().display().to_string();
    let error = refused(
        &database(&url(&server, &format!("sslmode=verify-full sslrootcert={root}"))),
        &server,
    )
    .await;
    assert!(
        error.to_string().contains("the server's certificate expired on "),
        "{error}"
    );
}

#[tokio::test]
async fn a_plain_text_server_under_require_or_verify_is_never_used_in_plain_text() {
    let ca = TestCa::new("plain");
    let server = Cluster::builder("plain").plain_only().start();
    let root = ca.cert_path().display().to_string();
    for mode in [
        "sslmode=require".to_owned(),
        format!("sslmode=verify-ca sslrootcert={root}"),
        format!("sslmode=verify-full sslrootcert={root}"),
        "sslmode=require sslnegotiation=postgres channel_binding=prefer".to_owned(),
    ] {
        let error = refused(&database(&url(&server, &mode)), &server).await;
        assert_eq!(error.kind(), FailureKind::Tls, "{mode}");
        assert!(
            error.to_string().contains("the server does not support TLS"),
            "{mode}: {error}"
        );
    }
    // prefer falls back to plain text; so do allow and disable.
    for mode in ["sslmode=prefer", "sslmode=allow", "sslmode=disable"] {
        assert!(!encrypted(&database(&url(&server, mode))).await, "{mode}");
    }
    // channel_binding=require cannot be met without TLS.
    let error = refused(&database(&url(&server, "channel_binding=require")), &server).await;
    assert!(error.to_string().contains("channel binding"), "{error}");
}

#[tokio::test]
async fn prefer_falls_back_when_tls_fails_and_says_both_when_plain_text_is_refused_too() {
    let ca = TestCa::new("prefer");
    let other = TestCa::new("stranger");
    let wrong = format!("sslmode=prefer sslrootcert={}", other.cert_path().display());
    // A root certificate makes prefer verify (libpq); failing that, plain text.
    let both = ssl_server(&ca, false);
    assert!(!encrypted(&database(&url(&both, &wrong))).await);
    let only = ssl_server(&ca, true);
    let error = refused(&database(&url(&only, &wrong)), &only).await;
    let text = error.to_string();
    assert!(
        text.contains("with TLS: the server's certificate is not signed by a CA")
            && text.contains("; then without TLS: no pg_hba.conf entry"),
        "{text}"
    );
}

#[tokio::test]
async fn channel_binding_binds_scram_to_the_tls_connection() {
    let ca = TestCa::new("binding");
    let server = ssl_server(&ca, true);
    // require fails unless SCRAM-SHA-256-PLUS with tls-server-end-point succeeded.
    assert!(encrypted(&database(&url(&server, "sslmode=require channel_binding=require"))).await);
    assert!(encrypted(&database(&url(&server, "sslmode=require channel_binding=disable"))).await);
}

#[tokio::test]
async fn client_certificates_are_presented_and_refusals_say_so() {
    let server_ca = TestCa::new("server");
    let client_ca = TestCa::new("clients");
    let server = Cluster::builder("clientcert")
        .ssl_only(server_ca.server(&[NAME]))
        .client_certificates(&client_ca)
        .start();
    let root = server_ca.cert_path().display().to_string();
    let good = client_ca.client("postgres");
    let with_cert = |cert: &walbridge_pgcluster::ClientCert| {
        url(
            &server,
            &format!(
                "sslmode=verify-full sslrootcert={root} sslcert={} sslkey={}",
                cert.cert_path.display(),
                cert.key_path.display()
            ),
        )
    };
    assert!(encrypted(&database(&with_cert(&good))).await);

    let without = refused(
        &database(&url(&server, &format!("sslmode=verify-full sslrootcert={root}"))),
        &server,
    )
    .await;
    // Over TLS 1.3 the server takes the handshake and refuses the session.
    assert_eq!(without.kind(), FailureKind::Refused, "{without}");
    assert!(
        without
            .to_string()
            .contains("connection requires a valid client certificate (SQLSTATE 28000)"),
        "{without}"
    );

    let stranger = server_ca.client("postgres");
    let error = refused(&database(&with_cert(&stranger)), &server).await;
    assert!(
        error.to_string().contains(&format!(
            "the server refused the client certificate {} (sslcert)",
            stranger.cert_path.display()
        )),
        "{error}"
    );
}

#[tokio::test]
async fn a_client_key_spoiled_after_the_setting_was_read_is_a_bad_client_key() {
    let server_ca = TestCa::new("spoiled");
    let client_ca = TestCa::new("spoiled-clients");
    let server = Cluster::builder("clientcert")
        .ssl_only(server_ca.server(&[NAME]))
        .client_certificates(&client_ca)
        .start();
    let client = client_ca.client("postgres");
    let db = database(&url(
        &server,
        &format!(
            "sslmode=require sslcert={} sslkey={}",
            client.cert_path.display(),
            client.key_path.display()
        ),
    ));
    assert!(encrypted(&db).await);
    // Certificates are read at each connection (they get rotated).
    let other = client_ca.client("postgres");
    std::fs::copy(&other.key_path, &client.key_path).unwrap();
    let error = refused(&db, &server).await;
    assert_eq!(error.kind(), FailureKind::Tls);
    assert!(
        error.to_string().contains("bad client key: the key in") && error.to_string().contains("does not match"),
        "{error}"
    );
}

#[tokio::test]
async fn the_environment_supplies_tls_defaults() {
    let ca = TestCa::new("env");
    let other = TestCa::new("env-other");
    let server = ssl_server(&ca, true);
    let raw = format!("host={NAME} hostaddr=127.0.0.1 dbname=postgres");
    let env = |root: &TestCa| -> BTreeMap<String, String> {
        [
            ("PGPORT", server.port().to_string()),
            ("PGUSER", "postgres".to_owned()),
            ("PGPASSWORD", server.password().to_owned()),
            ("PGSSLMODE", "verify-full".to_owned()),
            ("PGSSLROOTCERT", root.cert_path().display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    };
    let db = Database::parse_in("source.url", &raw, &env(&ca)).unwrap();
    assert!(encrypted(&db).await);
    let db = Database::parse_in("source.url", &raw, &env(&other)).unwrap();
    assert!(refused(&db, &server).await.to_string().contains("unknown issuer"));
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_in_connect_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accepts and keeps the connection, says nothing.
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let db = database(&format!(
        "host=127.0.0.1 port={port} user=app password=s3cret sslmode=require connect_timeout=2"
    ));
    let error = db.connect(APP).await.unwrap_err();
    assert_eq!(error.kind(), FailureKind::Timeout);
    assert!(
        error.to_string().contains("no answer within 2 s (connect_timeout)"),
        "{error}"
    );
    holder.abort();
}

/// pg_dump --schema-only with `db`'s libpq environment; its stderr on failure.
fn pg_dump(cluster: &Cluster, db: &Database) -> Result<String, String> {
    let out = cluster
        .install()
        .command("pg_dump")
        .args(["--schema-only", "--no-owner"])
        .envs(db.libpq_environment("walbridge-tls-test", &walbridge_daemon::pg::SessionPolicy::UNBOUNDED))
        .output()
        .expect("pg_dump runs");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test]
async fn pg_dump_verifies_the_server_with_the_same_parameters() {
    let ca = TestCa::new("dump");
    let other = TestCa::new("dump-other");
    let server = ssl_server(&ca, true);
    server.psql("postgres", "CREATE TABLE dumped_over_tls (id int)");
    let verified = database(&url(
        &server,
        &format!("sslmode=verify-full sslrootcert={}", ca.cert_path().display()),
    ));
    assert!(pg_dump(&server, &verified).unwrap().contains("dumped_over_tls"));
    let wrong = database(&url(
        &server,
        &format!("sslmode=verify-full sslrootcert={}", other.cert_path().display()),
    ));
    let error = pg_dump(&server, &wrong).unwrap_err();
    assert!(error.contains("certificate verify failed"), "{error}");

    // sslrootcert=system, resolved for a libpq (15 here) that would take
    // "system" for a file name: the bundle is this CA.
    let system_env: BTreeMap<String, String> = [("SSL_CERT_FILE".to_owned(), ca.cert_path().display().to_string())]
        .into_iter()
        .collect();
    let system = Database::parse_in("source.url", &url(&server, "sslrootcert=system"), &system_env).unwrap();
    assert!(pg_dump(&server, &system).unwrap().contains("dumped_over_tls"));
    assert!(
        encrypted(&system).await,
        "and walbridge's own sessions trust the same roots"
    );
}

#[tokio::test]
async fn direct_tls_to_a_server_older_than_17_fails_with_the_reason() {
    let ca = TestCa::new("direct-15");
    let server = ssl_server(&ca, true);
    let error = refused(
        &database(&url(&server, "sslmode=require sslnegotiation=direct")),
        &server,
    )
    .await;
    assert_eq!(error.kind(), FailureKind::Tls, "{error}");
    assert!(
        error
            .to_string()
            .contains("sslnegotiation=direct needs PostgreSQL 17 or later"),
        "{error}"
    );
}
