//! `Database::parse_in` against libpq's rules: every keyword walbridge
//! honours, the environment under the string, libpq's default files, and
//! every value libpq (or walbridge) refuses, none of them echoing the
//! password.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use walbridge_pgcluster::TestCa;

use super::ssl::{ChannelBinding, RootCert, SslMode, SslNegotiation, TlsVersion, Verification};
use super::*;

const SECRET: &str = "s3cret-pw";

fn env(vars: &[(&str, &str)]) -> BTreeMap<String, String> {
    vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn parse(raw: &str, vars: &[(&str, &str)]) -> Database {
    Database::parse_in("source.url", raw, &env(vars)).unwrap_or_else(|e| panic!("{raw}: {e}"))
}

/// The error for `raw`, checked to name the setting and not to carry the password.
fn rejected(raw: &str, vars: &[(&str, &str)]) -> String {
    let error = match Database::parse_in("source.url", raw, &env(vars)) {
        Ok(db) => panic!("{raw} was accepted: {db:?}"),
        Err(e) => e,
    };
    assert_eq!(error.key, "source.url");
    let text = error.to_string();
    assert!(!text.contains(SECRET), "{raw}: {text}");
    text
}

fn url(params: &str) -> String {
    format!("postgres://app:{SECRET}@db.example:5433/shop?{params}")
}

#[test]
fn the_endpoint_is_the_host_with_libpqs_default_port() {
    let tcp = parse("postgres://app@db.example/shop", &[]);
    assert_eq!(tcp.libpq_host().as_deref(), Some("db.example"));
    assert_eq!(tcp.endpoint().map(|(_, port)| port), Some(5432));
    let socket = parse("postgres://app@%2Frun%2Fpg:6000/shop", &[]);
    assert_eq!(socket.libpq_host().as_deref(), Some("/run/pg"));
    assert!(matches!(socket.endpoint(), Some((Host::Unix(_), 6000))));
    assert_eq!(
        socket.encryption_plan(),
        &[Encryption::Plain],
        "libpq speaks no TLS over a socket"
    );
}

#[test]
fn redacts_the_password_and_names_the_setting() {
    let db = parse(&format!("postgres://app:{SECRET}@db.example:5433/shop"), &[]);
    assert_eq!(db.redacted(), "postgres://app@db.example:5433/shop");
    assert!(!format!("{db:?}").contains(SECRET));
    assert!(rejected(&format!("postgres://app:{SECRET}@db.example:notaport/shop"), &[]).contains("port"));
}

#[test]
fn both_spellings_mean_the_same() {
    let from_url = parse(
        &url("sslmode=require&connect_timeout=7&options=-c%20work_mem%3D1MB"),
        &[],
    );
    let from_keywords = parse(
        &format!(
            "host=db.example port=5433 user=app password='{SECRET}' dbname=shop sslmode=require \
             connect_timeout=7 options='-c work_mem=1MB'"
        ),
        &[],
    );
    assert_eq!(from_url.keyword_values(), from_keywords.keyword_values());
    assert_eq!(from_url.options(), Some("-c work_mem=1MB"));
    assert_eq!(from_url.connect_timeout(), Some(Duration::from_secs(7)));
}

#[test]
fn every_sslmode_and_its_verification() {
    let ca = TestCa::new("modes");
    let root = ca.cert_path().display().to_string();
    let cases = [
        (
            "disable",
            SslMode::Disable,
            Verification::None,
            &[Encryption::Plain][..],
        ),
        (
            "allow",
            SslMode::Allow,
            Verification::None,
            &[Encryption::Plain, Encryption::Required][..],
        ),
        (
            "prefer",
            SslMode::Prefer,
            Verification::None,
            &[Encryption::IfOffered, Encryption::Plain][..],
        ),
        (
            "require",
            SslMode::Require,
            Verification::None,
            &[Encryption::Required][..],
        ),
    ];
    for (name, mode, verification, plan) in cases {
        let db = parse(&url(&format!("sslmode={name}")), &[]);
        assert_eq!(db.ssl().mode(), mode);
        assert_eq!(db.ssl().verification(), verification, "{name}");
        assert_eq!(db.encryption_plan(), plan, "{name}");
    }
    assert_eq!(parse(&url(""), &[]).ssl().mode(), SslMode::Prefer, "libpq's default");
    let verify_ca = parse(&url(&format!("sslmode=verify-ca&sslrootcert={root}")), &[]);
    assert_eq!(verify_ca.ssl().verification(), Verification::Chain);
    let verify_full = parse(&url(&format!("sslmode=verify-full&sslrootcert={root}")), &[]);
    assert_eq!(verify_full.ssl().verification(), Verification::ChainAndName);
    assert_eq!(
        verify_full.encryption_plan(),
        &[Encryption::Required],
        "never plain text"
    );
    // libpq: a root certificate makes require check the chain.
    let require = parse(&url(&format!("sslmode=require&sslrootcert={root}")), &[]);
    assert_eq!(require.ssl().verification(), Verification::Chain);
    assert_eq!(
        require.ssl().root_cert(),
        Some(&RootCert::File(ca.cert_path().to_owned()))
    );

    let bad = rejected(&url("sslmode=verify_full"), &[]);
    assert!(
        bad.contains("parameter sslmode: \"verify_full\" is not one of"),
        "{bad}"
    );
    for weak in ["verify-ca", "verify-full"] {
        let none = rejected(&url(&format!("sslmode={weak}")), &[]);
        assert!(none.contains("no root certificate"), "{none}");
    }
}

#[test]
fn the_environment_fills_in_what_the_string_leaves_out() {
    let db = parse(
        "dbname=shop",
        &[
            ("PGHOST", "db.example"),
            ("PGPORT", "6543"),
            ("PGUSER", "app"),
            ("PGPASSWORD", SECRET),
            ("PGCONNECT_TIMEOUT", "3"),
            ("PGSSLMODE", "require"),
            ("PGSSLSNI", "0"),
            ("PGCHANNELBINDING", "require"),
            ("PGAPPNAME", "ignored-by-sessions"),
            ("PGDATABASE", "not-this-one"),
        ],
    );
    assert_eq!(db.libpq_host().as_deref(), Some("db.example"));
    assert_eq!((db.port(), db.user(), db.password()), (6543, "app", Some(SECRET)));
    assert_eq!(db.database_name(), "shop", "the string wins over PGDATABASE");
    assert_eq!(db.connect_timeout(), Some(Duration::from_secs(3)));
    assert_eq!(db.ssl().mode(), SslMode::Require);
    assert!(!db.ssl().sni());
    assert_eq!(db.ssl().channel_binding(), ChannelBinding::Require);

    assert_eq!(
        parse(&url("sslmode=disable"), &[("PGSSLMODE", "require")]).ssl().mode(),
        SslMode::Disable,
        "URL parameters win over the environment"
    );
    let from_env = rejected(&url(""), &[("PGSSLMODE", "verify_full")]);
    assert!(from_env.contains("sslmode (from PGSSLMODE)"), "{from_env}");
    assert!(rejected("dbname=x user=app", &[]).contains("names no host"));
    assert!(rejected("host=h dbname=x", &[]).contains("names no user"));
}

#[test]
fn connect_timeout_as_libpq_reads_it() {
    assert_eq!(parse(&url(""), &[]).connect_timeout(), Some(CONNECT_TIMEOUT));
    assert_eq!(
        parse(&url("connect_timeout=0"), &[]).connect_timeout(),
        None,
        "0 waits forever"
    );
    assert_eq!(
        parse(&url("connect_timeout=1"), &[]).connect_timeout(),
        Some(Duration::from_secs(2))
    );
    assert!(
        rejected(&url("connect_timeout=soon"), &[]).contains("parameter connect_timeout: \"soon\" is not an integer")
    );
}

#[test]
fn sslrootcert_system_means_verify_full_and_refuses_weaker_modes() {
    let ca = TestCa::new("system");
    let bundle = ca.cert_path().to_str().unwrap();
    let system = [("SSL_CERT_FILE", bundle)];
    let db = parse(&url("sslrootcert=system"), &system);
    assert_eq!(
        db.ssl().mode(),
        SslMode::VerifyFull,
        "libpq 16's default with system roots"
    );
    assert!(
        matches!(db.ssl().root_cert(), Some(RootCert::System(roots)) if roots.file.as_deref() == Some(ca.cert_path()))
    );
    assert_eq!(
        parse(&url("sslrootcert=system&sslmode=verify-full"), &system)
            .ssl()
            .mode(),
        SslMode::VerifyFull
    );
    for weak in ["disable", "allow", "prefer", "require", "verify-ca"] {
        let error = rejected(&url(&format!("sslrootcert=system&sslmode={weak}")), &system);
        assert!(
            error.contains(&format!("sslmode={weak} is too weak with sslrootcert=system")),
            "{error}"
        );
    }
    let from_env = rejected(
        &url("sslrootcert=system"),
        &[("SSL_CERT_FILE", bundle), ("PGSSLMODE", "require")],
    );
    assert!(
        from_env.contains("too weak"),
        "an sslmode from the environment counts too: {from_env}"
    );

    // pg_dump's libpq may take "system" for a file name: it gets the bundle.
    let env: BTreeMap<String, String> = db
        .libpq_environment("pg_dump", &SessionPolicy::UNBOUNDED)
        .into_iter()
        .collect();
    assert_eq!(env["PGSSLROOTCERT"], bundle);
    assert_eq!(env["PGSSLMODE"], "verify-full");
    // The subscription's libpq (16+ on the target) reads "system" itself.
    assert!(
        db.ssl()
            .keyword_values()
            .contains(&("sslrootcert", "system".to_owned()))
    );
}

#[test]
fn sslrootcert_must_be_a_pem_file_of_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let error = rejected(
        &url(&format!("sslmode=verify-full&sslrootcert={}", missing.display())),
        &[],
    );
    assert!(
        error.contains("parameter sslrootcert") && error.contains("missing.pem"),
        "{error}"
    );
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let error = rejected(&url(&format!("sslrootcert={}", garbage.display())), &[]);
    assert!(error.contains("no PEM certificate"), "{error}");
}

/// A HOME whose ~/.postgresql holds libpq's default files.
fn home_with(ca: &TestCa, root: bool, client: bool) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    let folder = home.path().join(".postgresql");
    std::fs::create_dir(&folder).unwrap();
    if root {
        std::fs::copy(ca.cert_path(), folder.join("root.crt")).unwrap();
    }
    if client {
        let cert = ca.client("app");
        std::fs::copy(&cert.cert_path, folder.join("postgresql.crt")).unwrap();
        std::fs::copy(&cert.key_path, folder.join("postgresql.key")).unwrap();
        std::fs::set_permissions(folder.join("postgresql.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    home
}

#[test]
fn libpqs_default_files_under_home_are_honoured() {
    let ca = TestCa::new("home");
    let home = home_with(&ca, true, true);
    let vars = [("HOME", home.path().to_str().unwrap())];
    let db = parse(&url("sslmode=require"), &vars);
    assert_eq!(
        db.ssl().verification(),
        Verification::Chain,
        "root.crt makes require check the chain"
    );
    assert!(db.ssl().root_cert_is_default());
    let client = db
        .ssl()
        .client_cert()
        .expect("postgresql.crt is the client certificate");
    assert_eq!(client.cert, home.path().join(".postgresql/postgresql.crt"));
    assert_eq!(client.key, home.path().join(".postgresql/postgresql.key"));
    assert!(parse(&url("sslmode=verify-full"), &vars).ssl().root_cert().is_some());
    assert_eq!(parse(&url("sslcertmode=disable"), &vars).ssl().client_cert(), None);

    let bare = home_with(&ca, false, false);
    let db = parse(&url("sslmode=require"), &[("HOME", bare.path().to_str().unwrap())]);
    assert_eq!(db.ssl().verification(), Verification::None);
    assert_eq!(db.ssl().client_cert(), None);
}

#[test]
fn client_keys_are_checked_as_libpq_checks_them() {
    let ca = TestCa::new("keys");
    let client = ca.client("app");
    let other = ca.client("other");
    let (cert, key) = (client.cert_path.display(), client.key_path.display());
    let db = parse(&url(&format!("sslcert={cert}&sslkey={key}")), &[]);
    assert_eq!(
        db.ssl().client_cert().map(|c| c.key.as_path()),
        Some(client.key_path.as_path())
    );

    std::fs::set_permissions(&client.key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let open = rejected(&url(&format!("sslcert={cert}&sslkey={key}")), &[]);
    assert!(open.contains("group or world access"), "{open}");
    std::fs::set_permissions(&client.key_path, std::fs::Permissions::from_mode(0o600)).unwrap();

    let mismatch = rejected(
        &url(&format!("sslcert={cert}&sslkey={}", other.key_path.display())),
        &[],
    );
    assert!(mismatch.contains("does not match the certificate"), "{mismatch}");
    let no_key = rejected(&url(&format!("sslcert={cert}&sslkey=/nonexistent/key.pem")), &[]);
    assert!(no_key.contains("has no private key"), "{no_key}");
    let key_alone = rejected(&url(&format!("sslkey={key}")), &[]);
    assert!(key_alone.contains("no client certificate"), "{key_alone}");
    let garbage = Path::new(&client.cert_path).with_extension("garbage");
    std::fs::write(&garbage, "junk").unwrap();
    std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o600)).unwrap();
    let unreadable = rejected(&url(&format!("sslcert={cert}&sslkey={}", garbage.display())), &[]);
    assert!(unreadable.contains("no unencrypted PEM private key"), "{unreadable}");
    assert!(rejected(&url("sslcertmode=require"), &[]).contains("not supported"));
    assert!(rejected(&url("sslcertmode=sometimes"), &[]).contains("is not one of disable, allow, require"));
}

#[test]
fn direct_tls_needs_require_or_stronger() {
    let direct = parse(&url("sslmode=require&sslnegotiation=direct"), &[]);
    assert_eq!(direct.ssl().negotiation(), SslNegotiation::Direct);
    for weak in ["disable", "allow", "prefer"] {
        let error = rejected(&url(&format!("sslmode={weak}&sslnegotiation=direct")), &[]);
        assert!(
            error.contains(&format!("sslmode={weak} is too weak with sslnegotiation=direct")),
            "{error}"
        );
    }
    assert!(
        rejected(&url("sslnegotiation=direct"), &[]).contains("too weak"),
        "prefer is the default"
    );
    assert!(rejected(&url("sslnegotiation=requiredirect"), &[]).contains("neither postgres nor direct"));
    let from_env = parse(&url("sslmode=require"), &[("PGSSLNEGOTIATION", "direct")]);
    assert_eq!(from_env.ssl().negotiation(), SslNegotiation::Direct);
}

#[test]
fn sni_channel_binding_and_protocol_versions() {
    assert!(parse(&url(""), &[]).sni, "a host name is sent");
    assert!(!parse(&url("sslsni=0"), &[]).sni);
    assert!(!parse("host=127.0.0.1 user=app", &[]).sni, "never an IP address");
    assert!(rejected(&url("sslsni=yes"), &[]).contains("parameter sslsni: \"yes\" is neither 1 nor 0"));

    for (value, mode) in [
        ("disable", ChannelBinding::Disable),
        ("prefer", ChannelBinding::Prefer),
        ("require", ChannelBinding::Require),
    ] {
        assert_eq!(
            parse(&url(&format!("channel_binding={value}")), &[])
                .ssl()
                .channel_binding(),
            mode
        );
    }
    assert!(rejected(&url("channel_binding=always"), &[]).contains("is not one of disable, prefer, require"));
    assert!(rejected(&url("channel_binding=require&sslmode=disable"), &[]).contains("turns TLS off"));

    assert_eq!(
        parse(&url(""), &[]).ssl().versions(),
        &[TlsVersion::Tls12, TlsVersion::Tls13]
    );
    assert_eq!(
        parse(&url("ssl_min_protocol_version=TLSv1.3"), &[]).ssl().versions(),
        &[TlsVersion::Tls13]
    );
    assert_eq!(
        parse(
            &url("ssl_min_protocol_version=tlsv1&ssl_max_protocol_version=TLSv1.2"),
            &[]
        )
        .ssl()
        .versions(),
        &[TlsVersion::Tls12]
    );
    assert!(
        rejected(
            &url("ssl_min_protocol_version=TLSv1&ssl_max_protocol_version=TLSv1.1"),
            &[]
        )
        .contains("walbridge speaks TLS 1.2 and 1.3")
    );
    assert!(
        rejected(
            &url("ssl_min_protocol_version=TLSv1.3&ssl_max_protocol_version=TLSv1.2"),
            &[]
        )
        .contains("above")
    );
    assert!(rejected(&url("ssl_min_protocol_version=SSLv3"), &[]).contains("is not one of TLSv1"));
}

#[test]
fn hostaddr_is_where_to_connect_and_host_what_tls_checks() {
    let ca = TestCa::new("hostaddr");
    let root = ca.cert_path().display();
    let db = parse(
        &format!("host=db.example hostaddr=127.0.0.1 port=5433 user=app sslmode=verify-full sslrootcert={root}"),
        &[],
    );
    assert!(matches!(db.endpoint(), Some((Host::Tcp(address), 5433)) if address == "127.0.0.1"));
    assert_eq!(db.libpq_host().as_deref(), Some("db.example"));
    assert_eq!(db.tls_server_name(), "db.example");
    let env: BTreeMap<String, String> = db
        .libpq_environment("pg_dump", &SessionPolicy::UNBOUNDED)
        .into_iter()
        .collect();
    assert_eq!(
        (env["PGHOST"].as_str(), env["PGHOSTADDR"].as_str()),
        ("db.example", "127.0.0.1")
    );

    let only_address = parse("hostaddr=127.0.0.1 user=app sslmode=require", &[]);
    assert_eq!(only_address.tls_server_name(), "127.0.0.1");
    let error = rejected(
        &format!("hostaddr=127.0.0.1 user=app sslmode=verify-full sslrootcert={root}"),
        &[],
    );
    assert!(error.contains("only hostaddr is given"), "{error}");
    assert!(rejected("hostaddr=db.example user=app", &[]).contains("is not a numeric IP address"));
    assert_eq!(
        parse("user=app", &[("PGHOSTADDR", "127.0.0.2")]).hostaddr(),
        Some("127.0.0.2".parse().unwrap())
    );
}

#[test]
fn several_servers_are_refused_with_the_reason() {
    for raw in [
        format!("postgres://app:{SECRET}@db1:5432,db2:5432/shop"),
        format!("host=db1,db2 user=app password={SECRET}"),
        "host=db1 hostaddr=10.0.0.1,10.0.0.2 user=app".to_owned(),
        "host=db1 port=5432,5433 user=app".to_owned(),
    ] {
        let error = rejected(&raw, &[]);
        assert!(
            error.contains("names several servers") && error.contains("snapshot"),
            "{error}"
        );
    }
}

#[test]
fn every_value_libpq_refuses_is_refused_here() {
    for (params, expected) in [
        ("port=0", "is not a port number"),
        ("port=70000", "is not a port number"),
        ("port=x", "is not a port number"),
        ("sslmode=strict", "is not one of"),
        ("requiressl=yes", "is neither 0 nor 1"),
        ("sslnegotiation=tls", "neither postgres nor direct"),
        ("sslsni=2", "neither 1 nor 0"),
        ("channel_binding=yes", "is not one of"),
        ("gssencmode=always", "is not one of"),
        ("keepalives=on", "is not an integer"),
        ("keepalives_idle=long", "is not an integer"),
        ("tcp_user_timeout=1s", "is not an integer"),
        ("target_session_attrs=writable", "is not one of any"),
        ("load_balance_hosts=roundrobin", "neither disable nor random"),
        ("ssl_max_protocol_version=TLSv2", "is not one of TLSv1"),
        (
            "no_such_option=1",
            "\"no_such_option\" is not a libpq connection parameter",
        ),
    ] {
        let error = rejected(&url(params), &[]);
        assert!(error.contains(expected), "{params}: {error}");
    }
}

#[test]
fn what_walbridge_cannot_honour_is_refused_not_ignored() {
    for (params, expected) in [
        ("sslcrl=/etc/crl.pem", "revocation"),
        ("sslcrldir=/etc/crl", "revocation"),
        ("passfile=/root/.pgpass", "password file"),
        ("service=prod", "service file"),
        ("require_auth=scram-sha-256", "require_auth"),
        ("requirepeer=postgres", "requirepeer"),
        ("sslpassword=x", "encrypted client key"),
        ("replication=database", "replication connections itself"),
        ("gssencmode=require", "GSSAPI"),
        ("target_session_attrs=primary", "not supported"),
        ("client_encoding=LATIN1", "UTF8"),
        ("dbname=host%3Dother", "connection string"),
    ] {
        let error = rejected(&url(params), &[]);
        assert!(error.contains(expected), "{params}: {error}");
    }
    let from_env = rejected(&url(""), &[("PGSSLCRL", "/etc/crl.pem")]);
    assert!(from_env.contains("PGSSLCRL is set in the environment"), "{from_env}");
    // What libpq itself ignores (or a libpq without GSSAPI), walbridge ignores.
    parse(
        &url("sslcompression=1&krbsrvname=postgres&gssencmode=prefer&client_encoding=UTF8"),
        &[],
    );
}

#[test]
fn keyword_values_render_into_a_string_that_reads_back_the_same() {
    let ca = TestCa::new("render");
    let db = parse(
        &format!(
            "host=db.example hostaddr=127.0.0.1 port=5433 user=app password='it\\'s {SECRET}' dbname=shop \
             sslmode=verify-full sslrootcert={} sslnegotiation=direct sslsni=0 channel_binding=require",
            ca.cert_path().display()
        ),
        &[],
    );
    let values = db.keyword_values();
    let rendered = conninfo::render(values.iter().map(|(k, v)| (*k, v.as_str())));
    let again = parse(&rendered, &[]);
    assert_eq!(again.keyword_values(), values);
    assert_eq!(again.password(), db.password());
    for keyword in [
        "sslmode",
        "sslrootcert",
        "sslnegotiation",
        "sslsni",
        "channel_binding",
        "hostaddr",
    ] {
        assert!(
            values.iter().any(|(k, _)| *k == keyword),
            "{keyword} missing from {rendered}"
        );
    }
}

#[test]
fn pg_dump_gets_every_tls_parameter_as_its_variable() {
    let ca = TestCa::new("pgdump");
    let client = ca.client("app");
    let db = parse(
        &url(&format!(
            "sslmode=verify-ca&sslrootcert={}&sslcert={}&sslkey={}&sslnegotiation=direct&sslsni=0&channel_binding=disable\
             &ssl_min_protocol_version=TLSv1.3",
            ca.cert_path().display(),
            client.cert_path.display(),
            client.key_path.display()
        )),
        &[],
    );
    let env: BTreeMap<String, String> = db
        .libpq_environment("walbridge-agent", &SessionPolicy::UNBOUNDED)
        .into_iter()
        .collect();
    let expected = [
        ("PGSSLMODE", "verify-ca".to_owned()),
        ("PGSSLROOTCERT", ca.cert_path().display().to_string()),
        ("PGSSLCERT", client.cert_path.display().to_string()),
        ("PGSSLKEY", client.key_path.display().to_string()),
        ("PGSSLNEGOTIATION", "direct".to_owned()),
        ("PGSSLSNI", "0".to_owned()),
        ("PGCHANNELBINDING", "disable".to_owned()),
        ("PGSSLMINPROTOCOLVERSION", "TLSv1.3".to_owned()),
        ("PGPASSWORD", SECRET.to_owned()),
        ("PGHOST", "db.example".to_owned()),
        ("PGPORT", "5433".to_owned()),
        ("PGAPPNAME", "walbridge-agent".to_owned()),
        // The session policy's timeouts, which outrank the role's own.
        (
            "PGOPTIONS",
            "-c statement_timeout=0 -c lock_timeout=0 -c idle_in_transaction_session_timeout=0".to_owned(),
        ),
    ];
    for (name, value) in expected {
        assert_eq!(env.get(name), Some(&value), "{name}");
    }
}
