//! Managed databases: the subscription logs in as a role of its own whose
//! password is worthless after the migration, preflight proves that login
//! before anything is created, and nothing of it stays behind.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use harness::Cluster;
use harness::daemons::eventually;

use crate::support::{DATABASE, Migration, Spec};

const STREAM_TIMEOUT: Duration = Duration::from_secs(120);

const SCHEMA: &str = "CREATE TABLE items (id bigserial PRIMARY KEY, note text); \
                      INSERT INTO items (note) SELECT 'seed' FROM generate_series(1, 100);";

/// The role of the subscription's walsender on the source, once it streams.
fn walsender_role(m: &Migration) -> String {
    eventually(STREAM_TIMEOUT, "the subscription's walsender", || {
        let role = m.source.psql(
            DATABASE,
            "SELECT usename FROM pg_stat_replication WHERE application_name LIKE 'walbridge_%'",
        );
        (!role.is_empty()).then_some(role)
    })
}

#[test]
fn the_subscription_logs_in_as_a_role_of_its_own_that_cleanup_drops() {
    let source = Cluster::builder("source").logical().start();
    let m = Migration::new(source, SCHEMA);
    let (code, status, stderr) = m.cli_json(&["start", "--agent", "east", "--direct", "--json"]);
    assert_eq!(code, Some(0), "start: {stderr} {status}");
    let migration = status["migration"].as_str().unwrap().to_owned();
    let role = walsender_role(&m);
    assert_eq!(role, format!("walbridge_{migration}"));
    assert_ne!(role, m.source.superuser(), "not the agent's own role");
    // It may replicate and log in, nothing more; its password is a SCRAM
    // verifier on the source, and not the agent's password on the target.
    assert_eq!(
        m.source.psql(
            DATABASE,
            &format!(
                "SELECT rolcanlogin AND rolreplication AND NOT rolsuper AND NOT rolcreaterole AND NOT rolbypassrls \
                 FROM pg_roles WHERE rolname = '{role}'"
            )
        ),
        "t"
    );
    assert!(
        m.source
            .psql(
                DATABASE,
                &format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'")
            )
            .starts_with("SCRAM-SHA-256$")
    );
    let conninfo = m.target.psql(DATABASE, "SELECT subconninfo FROM pg_subscription");
    assert!(conninfo.contains(&format!("user='{role}'")), "{conninfo}");
    assert!(
        !conninfo.contains(m.source.password()),
        "the agent's own password: {conninfo}"
    );
    m.source.psql(DATABASE, "INSERT INTO items (note) VALUES ('live')");
    eventually(STREAM_TIMEOUT, "the live row on the target", || {
        (m.target
            .psql(DATABASE, "SELECT count(*) FROM items WHERE note = 'live'")
            == "1")
            .then_some(())
    });

    let (code, aborted, stderr) = m.cli_json(&["abort", "--json"]);
    assert_eq!(code, Some(0), "abort: {stderr} {aborted}");
    assert!(
        aborted["removed"].to_string().contains(&format!("role {role}")),
        "{aborted}"
    );
    assert_eq!(
        m.source.psql(
            DATABASE,
            &format!("SELECT count(*) FROM pg_roles WHERE rolname = '{role}'")
        ),
        "0"
    );
    // Preflight's probe left no role behind either.
    assert_eq!(
        m.source.psql(
            DATABASE,
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'walbridge\\_%'"
        ),
        "0"
    );
}

/// The PlanetScale-like target's role, exactly as issue 8 gives it, on a
/// database owned by another role.
const PLANETSCALE_ROLE: &str = "\
    CREATE ROLE pscale NOSUPERUSER CREATEDB CREATEROLE INHERIT LOGIN REPLICATION BYPASSRLS \
      PASSWORD 'pscale-password'; \
    GRANT pg_read_all_data, pg_write_all_data, pg_read_all_settings, pg_read_all_stats, pg_stat_scan_tables, \
          pg_monitor, pg_signal_backend, pg_checkpoint, pg_maintain, pg_use_reserved_connections, \
          pg_create_subscription TO pscale WITH ADMIN OPTION;";

/// A source role with least privilege: it logs in and replicates, and is a
/// member of the role that owns the application's tables (a publication
/// needs their owner's privileges); the subscription has a role of its own.
const SOURCE_ROLES: &str = "\
    CREATE ROLE app NOLOGIN; \
    CREATE ROLE migrator LOGIN REPLICATION PASSWORD 'migrator-password' IN ROLE app; \
    CREATE ROLE subscriber LOGIN REPLICATION PASSWORD 'subscriber-password';";

/// Both servers' names in their certificates: neither is the address the
/// connections go to (127.0.0.1, and the tunnel's port for the
/// subscription), so only `host` + `hostaddr` verify them.
const SOURCE_NAME: &str = "source.db.internal";
const TARGET_NAME: &str = "target.db.internal";

struct Managed {
    m: Migration,
    ca: harness::TestCa,
}

/// An SSL-only PostgreSQL 15 source and an SSL-only PostgreSQL 17 target,
/// each reached with verify-full, as the least-privilege roles above.
fn managed(negotiation: &str) -> Managed {
    let ca = harness::TestCa::new("managed");
    let source = Cluster::builder("source")
        .logical()
        .ssl_only(ca.server(&[SOURCE_NAME]))
        .start();
    let target = Cluster::builder("target")
        .install(&harness::PgInstall::fetch(17))
        .ssl_only(ca.server(&[TARGET_NAME]))
        .start();
    source.psql("postgres", SOURCE_ROLES);
    source.create_database(DATABASE);
    source.psql(
        DATABASE,
        "GRANT CREATE ON DATABASE app TO migrator, app; GRANT CREATE ON SCHEMA public TO app; \
         GRANT USAGE ON SCHEMA public TO migrator",
    );
    source.psql(
        DATABASE,
        &format!(
            "SET ROLE app; {} CREATE SCHEMA shop; CREATE TABLE shop.items (id int PRIMARY KEY, name text); \
             INSERT INTO shop.items SELECT i, 'item ' || i FROM generate_series(1, 50) i;",
            crate::cutover::SCHEMA
        ),
    );
    target.psql("postgres", &format!("CREATE ROLE owner LOGIN; {PLANETSCALE_ROLE}"));
    target.psql("postgres", "CREATE DATABASE app OWNER owner");
    target.psql(
        DATABASE,
        "GRANT CREATE ON DATABASE app TO pscale; SET ROLE owner; GRANT CREATE ON SCHEMA public TO pscale",
    );
    let ca_path = ca.cert_path().display().to_string();
    let tls = |name: &str| {
        let mut params = vec![
            ("hostaddr", "127.0.0.1".to_owned()),
            ("sslmode", "verify-full".to_owned()),
            ("sslrootcert", ca_path.clone()),
        ];
        if name == TARGET_NAME && negotiation == "direct" {
            params.push(("sslnegotiation", "direct".to_owned()));
        }
        params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")
    };
    let source_url = format!(
        "postgresql://migrator:migrator-password@{SOURCE_NAME}:{}/{DATABASE}?{}",
        source.port(),
        tls(SOURCE_NAME)
    );
    let target_url = format!(
        "postgresql://pscale:pscale-password@{TARGET_NAME}:{}/{DATABASE}?{}",
        target.port(),
        tls(TARGET_NAME)
    );
    let m = Migration::custom(Spec {
        source,
        target,
        source_url,
        target_url,
        // The target's server checks the source's certificate with the
        // same CA file, readable by its own user.
        controller_args: vec!["--subscription-sslrootcert".into(), ca_path],
        agent_args: vec!["--subscription-user".into(), "subscriber".into()],
        agent_env: vec![("WALBRIDGE_SUBSCRIPTION_PASSWORD".into(), "subscriber-password".into())],
    });
    Managed { m, ca }
}

/// Every walbridge session seen on a server while the watch ran: pid and
/// whether it was encrypted (`pg_stat_ssl`), sampled until stopped.
struct SslWatch {
    stop: Arc<AtomicBool>,
    seen: std::thread::JoinHandle<std::collections::BTreeMap<String, bool>>,
}

impl SslWatch {
    fn start(cluster: &Cluster) -> SslWatch {
        let url = cluster.url_with(DATABASE, &[("sslmode", "require")]);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let seen = std::thread::spawn(move || {
            let session = crate::support::Session::open(&url);
            let mut seen = std::collections::BTreeMap::new();
            while !stopped.load(Ordering::SeqCst) {
                let rows = session
                    .value(
                        "SELECT coalesce(string_agg(a.pid || ':' || s.ssl || ':' || a.application_name, ','), '') \
                         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                         WHERE a.application_name LIKE 'walbridge%' AND a.pid <> pg_backend_pid()",
                    )
                    .unwrap_or_default();
                for session in rows.split(',').filter(|s| !s.is_empty()) {
                    let mut parts = session.splitn(3, ':');
                    let (pid, ssl, name) = (parts.next(), parts.next(), parts.next());
                    if let (Some(pid), Some(ssl), Some(name)) = (pid, ssl, name) {
                        seen.insert(format!("{pid} {name}"), ssl == "true");
                    }
                }
            }
            seen
        });
        SslWatch { stop, seen }
    }

    /// The sessions seen, each with whether it was encrypted.
    fn finish(self) -> std::collections::BTreeMap<String, bool> {
        self.stop.store(true, Ordering::SeqCst);
        self.seen.join().expect("the watch ran")
    }
}

fn migrate_a_managed_database(negotiation: &str) {
    let Managed { m, ca: _ca } = managed(negotiation);
    let watches = [SslWatch::start(&m.source), SslWatch::start(&m.target)];
    let (code, findings, stderr) = m.cli_json(&["preflight", "--agent", "east", "--json"]);
    assert_eq!(code, Some(0), "preflight: {stderr} {findings}");

    let stop = Arc::new(AtomicBool::new(false));
    let superuser_url = m.source.url_with(DATABASE, &[("sslmode", "require")]);
    let writes = crate::cutover::writer(superuser_url, stop.clone());
    let (code, status, stderr) = m.cli_json(&["start", "--agent", "east", "--json"]);
    assert_eq!(code, Some(0), "start: {stderr} {status}");
    eventually(STREAM_TIMEOUT, "the subscription to stream", || {
        (m.status()["subscription"] == "streaming").then_some(())
    });
    // Streaming through the tunnel, verified end to end: the walsender on
    // the source is the subscriber role's, over TLS.
    let walsender = eventually(STREAM_TIMEOUT, "the subscription's walsender", || {
        let row = m.source.psql(
            DATABASE,
            "SELECT r.usename || '|' || s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) \
             WHERE r.application_name LIKE 'walbridge_%'",
        );
        (!row.is_empty()).then_some(row)
    });
    assert_eq!(walsender, "subscriber|true");
    let conninfo = m.target.psql(DATABASE, "SELECT subconninfo FROM pg_subscription");
    assert!(
        conninfo.contains(&format!("host='{SOURCE_NAME}'")) && conninfo.contains("sslmode='verify-full'"),
        "{conninfo}"
    );
    assert!(!conninfo.contains("migrator-password"), "{conninfo}");

    let (code, cutover, stderr) = m.cli_json(&["cutover", "--max-lag", "2s", "--timeout", "90s", "--json"]);
    assert_eq!(code, Some(0), "cutover: {stderr} {cutover}");
    let acked = crate::cutover::stopped_by_fence(writes);
    assert!(acked.stopped_by.contains("fenced"), "{acked:?}");
    crate::cutover::assert_acknowledged_on_target(&m, &acked);
    let verify = m.verify_exact();
    assert!(
        verify["tables"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["matches"] == true),
        "{verify}"
    );
    let (code, cleaned, stderr) = m.cli_json(&["cleanup", "--json"]);
    assert_eq!(code, Some(0), "cleanup: {stderr} {cleaned}");
    assert_eq!(m.source_replication_objects(), (String::new(), String::new()));
    assert_eq!(m.target.psql(DATABASE, "SELECT count(*) FROM pg_subscription"), "0");
    // Every walbridge session either server saw, from preflight to cleanup
    // (the agent's, the controller's, the subscription's), was encrypted.
    for (side, watch) in ["source", "target"].into_iter().zip(watches) {
        let seen = watch.finish();
        let plain: Vec<&String> = seen.iter().filter(|(_, ssl)| !**ssl).map(|(s, _)| s).collect();
        assert!(seen.len() >= 3, "walbridge sessions seen on the {side}: {seen:?}");
        assert!(
            plain.is_empty(),
            "plain-text walbridge sessions on the {side}: {plain:?}"
        );
    }

    // No password in any log line or journal file; the password the
    // target's server may log is the subscriber's, never the agent's own.
    for password in ["migrator-password", "pscale-password", "subscriber-password"] {
        let found = crate::cutover::files_contain(m.install.path(), password);
        assert!(found.is_empty(), "{password} found in {found:?}");
    }
    for cluster in [&m.source, &m.target] {
        let log = std::fs::read_to_string(cluster.log_path()).unwrap_or_default();
        assert!(
            !log.contains("migrator-password"),
            "the agent's password in {}'s log",
            cluster.name()
        );
    }
}

#[test]
fn a_tls_least_privilege_migration_into_a_planetscale_like_target_cuts_over_exactly() {
    migrate_a_managed_database("postgres");
}

#[test]
fn the_same_with_direct_tls_to_a_postgresql_17_target() {
    migrate_a_managed_database("direct");
}

/// What walbridge may have left on either side: slots, publications and
/// walbridge roles on the source; subscriptions and schemas beyond the
/// defaults on the target.
fn leftovers(m: &Migration) -> String {
    let source = m.source.psql(
        DATABASE,
        "SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) FROM pg_publication) \
              + (SELECT count(*) FROM pg_roles WHERE rolname LIKE 'walbridge%')",
    );
    let target = m.target.psql(
        DATABASE,
        "SELECT (SELECT count(*) FROM pg_subscription) \
              + (SELECT count(*) FROM pg_namespace WHERE nspname NOT IN ('public', 'information_schema') \
                   AND nspname NOT LIKE 'pg\\_%')",
    );
    format!("source {source}, target {target}")
}

#[test]
fn certificates_that_do_not_verify_stop_start_in_one_line_before_anything_is_created() {
    let Managed { mut m, ca } = managed("postgres");
    let other_ca = harness::TestCa::new("other");
    let source_port = m.source.port();
    let target_port = m.target.port();
    let restart_controller = |m: &mut Migration, target_url: &str| {
        m.controller.kill();
        let args = [
            m.install.controller_args(),
            vec!["--target-url".into(), target_url.to_owned()],
        ]
        .concat();
        m.controller =
            harness::daemons::Daemon::start("controller", harness::daemons::CONTROLLER, &args, m.install.path());
        eventually(crate::support::LINK_TIMEOUT, "agent east to reconnect", || {
            m.install.connected_agent("east")
        });
    };
    let target_url = |host: &str, root: &std::path::Path| {
        format!(
            "postgresql://pscale:pscale-password@{host}:{target_port}/{DATABASE}?hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={}",
            root.display()
        )
    };
    let refused = |m: &Migration, setting: &str, reason: &str| {
        let (code, _, stderr) = m.cli_json(&["start", "--agent", "east", "--json"]);
        assert_eq!(code, Some(1), "{stderr}");
        let line = stderr
            .lines()
            .find(|l| l.contains(setting))
            .unwrap_or_else(|| panic!("no line names {setting}: {stderr}"));
        assert!(line.contains(reason), "{reason} in: {line}");
        assert_eq!(leftovers(m), "source 0, target 0", "after: {line}");
    };

    restart_controller(&mut m, &target_url(TARGET_NAME, other_ca.cert_path()));
    refused(&m, "target.url", "unknown issuer");
    restart_controller(&mut m, &target_url("elsewhere.db.internal", ca.cert_path()));
    refused(&m, "target.url", TARGET_NAME);

    // The agent reaches its source under another name.
    restart_controller(&mut m, &target_url(TARGET_NAME, ca.cert_path()));
    m.agent.kill();
    let wrong_name = format!(
        "postgresql://migrator:migrator-password@127.0.0.1:{source_port}/{DATABASE}?sslmode=verify-full&sslrootcert={}",
        ca.cert_path().display()
    );
    m.agent = harness::daemons::Daemon::start(
        "agent-east",
        harness::daemons::AGENT,
        &m.install.agent_args("east", &wrong_name, "localhost"),
        m.install.path(),
    );
    eventually(crate::support::LINK_TIMEOUT, "agent east to reconnect", || {
        m.install.connected_agent("east")
    });
    refused(&m, "source.url", SOURCE_NAME);
}

#[test]
fn a_plain_text_source_under_sslmode_require_is_refused_in_one_line_and_nothing_is_created() {
    let source = Cluster::builder("source").logical().plain_only().start();
    let target = Cluster::builder("target").start();
    source.create_database(DATABASE);
    target.create_database(DATABASE);
    source.psql(DATABASE, "CREATE TABLE t (id int PRIMARY KEY)");
    let m = Migration::custom(Spec {
        source_url: source.url_with(DATABASE, &[("sslmode", "require")]),
        target_url: target.url(DATABASE),
        source,
        target,
        controller_args: Vec::new(),
        agent_args: Vec::new(),
        agent_env: Vec::new(),
    });
    let (code, _, stderr) = m.cli_json(&["start", "--agent", "east", "--json"]);
    assert_eq!(code, Some(1), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("source.url"))
        .unwrap_or_else(|| panic!("no line names source.url: {stderr}"));
    assert!(line.contains("does not support TLS") || line.contains("TLS"), "{line}");
    assert_eq!(leftovers(&m), "source 0, target 0");
}

#[test]
fn a_source_that_lets_the_subscription_in_without_a_password_is_found_by_preflight() {
    let Managed { m, ca: _ca } = managed("postgres");
    // Everyone from 127.0.0.1 is let in without a password; a subscription
    // owned by the target's non-superuser role refuses such a source.
    std::fs::write(
        m.source.data_dir().join("pg_hba.conf"),
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl replication all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    m.source.psql("postgres", "SELECT pg_reload_conf()");
    let (code, report, stderr) = m.cli_json(&["preflight", "--agent", "east", "--json"]);
    assert_eq!(code, Some(1), "{stderr} {report}");
    let findings = report["findings"].as_array().expect("findings");
    let login = findings
        .iter()
        .find(|f| f["check"] == "subscription_connection")
        .unwrap_or_else(|| panic!("no subscription_connection finding: {report}"));
    let message = login["message"].as_str().unwrap();
    assert!(message.contains("password is required"), "{message}");
    assert!(login["fix"].as_str().unwrap().contains("scram-sha-256"), "{login}");
    assert_eq!(leftovers(&m), "source 0, target 0");
    // The probe logged the subscriber's password, if any, in the target's
    // server log — never the agent's own.
    let target_log = std::fs::read_to_string(m.target.log_path()).unwrap_or_default();
    assert!(!target_log.contains("migrator-password"));
}
