//! Into a PostgreSQL 17 target as a role made exactly like PlanetScale's
//! (not a superuser, on a database another role owns): preflight names
//! what the role may not do before anything is created — a schema it may
//! not create in, a statement only a superuser may run — with the fix or
//! the `--skip` that leaves it out; an extension installed there by
//! another role is no obstacle; fixed and skipped, `start` migrates.

use std::time::Duration;

use harness::{Cluster, PgInstall};
use serde_json::Value;

use crate::support::{DATABASE, Migration};

const STREAM_TIMEOUT: Duration = Duration::from_secs(180);

const SOURCE_SCHEMA: &str = "CREATE EXTENSION hstore; CREATE SCHEMA shop; \
    CREATE TABLE shop.items (id serial PRIMARY KEY, attributes hstore); \
    INSERT INTO shop.items (attributes) SELECT hstore('n', i::text) FROM generate_series(1, 500) i; \
    CREATE TABLE public.orders (id bigserial PRIMARY KEY, item int REFERENCES shop.items); \
    INSERT INTO public.orders (item) SELECT i FROM generate_series(1, 500) i; \
    CREATE FUNCTION public.audit_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN END $$; \
    CREATE EVENT TRIGGER audit_ddl ON ddl_command_end EXECUTE FUNCTION public.audit_ddl();";

const PSCALE_PASSWORD: &str = "pscale-pw";

/// A PostgreSQL 17 target with PlanetScale's default role, `CREATE` on the
/// database (owned by `app_owner`) and hstore installed by a superuser.
fn planetscale_target() -> (Cluster, String) {
    let target = Cluster::builder("target").install(&PgInstall::fetch(17)).start();
    target.psql(
        "postgres",
        &format!(
            "CREATE ROLE app_owner; \
             CREATE ROLE pscale NOSUPERUSER CREATEDB CREATEROLE INHERIT LOGIN REPLICATION BYPASSRLS \
             PASSWORD '{PSCALE_PASSWORD}'"
        ),
    );
    target.psql("postgres", &format!("CREATE DATABASE {DATABASE} OWNER app_owner"));
    target.psql(
        DATABASE,
        "GRANT pg_read_all_data, pg_write_all_data, pg_read_all_settings, pg_read_all_stats, pg_stat_scan_tables, \
         pg_monitor, pg_signal_backend, pg_checkpoint, pg_maintain, pg_use_reserved_connections, \
         pg_create_subscription TO pscale WITH ADMIN OPTION; \
         GRANT CREATE ON DATABASE app TO pscale; CREATE EXTENSION hstore",
    );
    let url = target.url_as("pscale", PSCALE_PASSWORD, DATABASE);
    (target, url)
}

fn findings<'a>(preflight: &'a Value, check: &str) -> Vec<&'a Value> {
    preflight["findings"]
        .as_array()
        .unwrap_or_else(|| panic!("no findings in {preflight}"))
        .iter()
        .filter(|f| f["check"] == check)
        .collect()
}

#[test]
fn into_a_planetscale_like_role_preflight_names_each_obstacle_and_skip_migrates() {
    let source = Cluster::builder("source").logical().start();
    let (target, target_url) = planetscale_target();
    let m = Migration::with_target(source, SOURCE_SCHEMA, target, &target_url, &[]);

    let (code, preflight, stderr) = m.cli_json(&["preflight", "--agent", "east", "--json"]);
    assert_eq!(code, Some(1), "preflight: {stderr} {preflight}");
    let public = findings(&preflight, "schema_create_privilege");
    assert_eq!(public.len(), 1, "{preflight}");
    assert_eq!(public[0]["object"], "public");
    let rejected = findings(&preflight, "schema_statement");
    let objects: Vec<&str> = rejected.iter().map(|f| f["object"].as_str().unwrap()).collect();
    assert_eq!(objects, ["EVENT TRIGGER audit_ddl"], "{preflight}");
    assert!(
        rejected[0]["fix"]
            .as_str()
            .unwrap()
            .contains("--skip 'EVENT TRIGGER audit_ddl'"),
        "{preflight}"
    );
    // hstore is installed (by another role): its comment is left out, and
    // nothing about it is reported.
    assert!(!preflight.to_string().contains("EXTENSION hstore"), "{preflight}");

    let out = m.cli(&["start", "--agent", "east"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("preflight found") && stderr.contains("schema_create_privilege"),
        "{stderr}"
    );
    assert_eq!(m.status()["phase"], "none");
    assert_eq!(m.source_replication_objects(), (String::new(), String::new()));
    assert_eq!(
        m.target
            .psql(DATABASE, "SELECT count(*) FROM pg_namespace WHERE nspname = 'shop'"),
        "0",
        "nothing was created on the target"
    );

    // A skip that names nothing is bad usage, named.
    let out = m.cli(&["preflight", "--agent", "east", "--skip", "EVENT TRIGGER audit"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("\"EVENT TRIGGER audit\" matches no entry"), "{stderr}");

    // The grant the finding gave, as the database's owner.
    m.target
        .psql(DATABASE, "SET ROLE app_owner; GRANT CREATE ON SCHEMA public TO pscale");
    let skip = ["--skip", "event trigger audit_ddl"];
    let (code, preflight, stderr) = m.cli_json(&[&["preflight", "--agent", "east", "--json"][..], &skip].concat());
    assert_eq!(code, Some(0), "preflight: {stderr} {preflight}");
    assert_eq!(preflight["errors"], 0);

    let (code, status, stderr) = m.cli_json(&[&["start", "--agent", "east", "--json"][..], &skip].concat());
    assert_eq!(code, Some(0), "start: {stderr} {status}");
    assert_eq!(status["phase"], "streaming", "{status}");
    assert!(crate::support::every_table_verified(&status), "{status}");
    let on_target = |sql: &str| m.target.psql(DATABASE, sql);
    assert_eq!(
        on_target("SELECT count(*) FROM shop.items WHERE attributes -> 'n' = '500'"),
        "1"
    );
    assert_eq!(on_target("SELECT count(*) FROM pg_event_trigger"), "0");
    assert_eq!(
        on_target("SELECT tableowner FROM pg_tables WHERE tablename = 'items'"),
        "pscale"
    );
    assert_eq!(on_target("SELECT count(*) FROM pg_constraint WHERE contype = 'f'"), "1");
    // Changes stream into it.
    m.source.psql(DATABASE, "INSERT INTO public.orders (item) VALUES (7)");
    harness::daemons::eventually(STREAM_TIMEOUT, "the new order on the target", || {
        (on_target("SELECT count(*) FROM public.orders") == "501").then_some(())
    });
}
