//! Managed databases: the subscription logs in as a role of its own whose
//! password is worthless after the migration, preflight proves that login
//! before anything is created, and nothing of it stays behind.

use std::time::Duration;

use harness::Cluster;
use harness::daemons::eventually;

use crate::support::{DATABASE, Migration};

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
