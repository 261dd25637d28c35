//! A target role made exactly like PlanetScale's default role
//! (`NOSUPERUSER CREATEDB CREATEROLE INHERIT LOGIN REPLICATION BYPASSRLS`,
//! the pg_* roles, `CREATE` on a database another role owns): preflight
//! names each grant it lacks, the rehearsal finds every statement of a
//! real pg_dump script the target would reject and leaves nothing behind,
//! and pre-data applies all or nothing.

use harness::{Cluster, PgInstall};
use tokio_postgres::NoTls;
use walbridge_controller::preflight::check_target;
use walbridge_controller::rehearsal::{Sections, rehearse};
use walbridge_controller::schema;
use walbridge_daemon::pg::{Database, describe};
use walbridge_migration::finding::{Extension, Finding, Severity, SourceFacts, SourceSchema};
use walbridge_migration::ident::QualifiedName;
use walbridge_migration::script::{Statement, split};
use walbridge_migration::skip::{self, Skip};

const DATABASE: &str = "app";
const PSCALE_PASSWORD: &str = "pscale-pw";

/// The role, as PlanetScale creates it (the pg_* roles this version has),
/// on database `app` owned by `app_owner`. `CREATE ON DATABASE` is left to
/// the test.
fn planetscale_target(name: &str, install: Option<&PgInstall>) -> Cluster {
    let builder = Cluster::builder(name);
    let cluster = match install {
        Some(install) => builder.install(install).start(),
        None => builder.start(),
    };
    cluster.psql(
        "postgres",
        &format!(
            "CREATE ROLE app_owner; \
             CREATE ROLE pscale NOSUPERUSER CREATEDB CREATEROLE INHERIT LOGIN REPLICATION BYPASSRLS \
             PASSWORD '{PSCALE_PASSWORD}'"
        ),
    );
    cluster.psql("postgres", &format!("CREATE DATABASE {DATABASE} OWNER app_owner"));
    let roles = cluster.psql(
        "postgres",
        "SELECT string_agg(rolname, ', ') FROM pg_roles WHERE rolname IN ('pg_read_all_data', \
         'pg_write_all_data', 'pg_read_all_settings', 'pg_read_all_stats', 'pg_stat_scan_tables', 'pg_monitor', \
         'pg_signal_backend', 'pg_checkpoint', 'pg_maintain', 'pg_use_reserved_connections', \
         'pg_create_subscription')",
    );
    cluster.psql("postgres", &format!("GRANT {roles} TO pscale WITH ADMIN OPTION"));
    cluster
}

fn pscale_url(cluster: &Cluster) -> String {
    format!(
        "postgres://pscale:{PSCALE_PASSWORD}@127.0.0.1:{}/{DATABASE}",
        cluster.port()
    )
}

async fn findings(url: &str, facts: &SourceFacts) -> Vec<Finding> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(connection);
    check_target(&client, facts).await.unwrap()
}

/// Runs `sql` as the role; the server's error when it fails.
async fn as_role(url: &str, sql: &str) -> Result<(), String> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!("BEGIN; {sql}; ROLLBACK"))
        .await
        .map_err(|e| describe(&e))
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

fn source_facts(extensions: &[&str]) -> SourceFacts {
    SourceFacts {
        server_version_num: 150000,
        database_size_bytes: 1000,
        extensions: extensions
            .iter()
            .map(|name| Extension {
                name: (*name).to_owned(),
                version: String::new(),
            })
            .collect(),
        tables: vec![
            QualifiedName::new("public", "orders"),
            QualifiedName::new("shop", "items"),
        ],
        schemas: vec![
            SourceSchema {
                name: "public".into(),
                created_by_dump: false,
                has_objects: true,
            },
            SourceSchema {
                name: "shop".into(),
                created_by_dump: true,
                has_objects: true,
            },
        ],
        roles: vec![],
    }
}

#[tokio::test]
async fn a_planetscale_like_role_on_postgresql_17_is_told_each_grant_it_lacks() {
    let target = planetscale_target("pscale-17", Some(&PgInstall::fetch(17)));
    let url = pscale_url(&target);
    let facts = source_facts(&["hstore", "pg_stat_statements"]);

    let f = findings(&url, &facts).await;
    let database = find(&f, "database_create_privilege");
    assert_eq!(database.object, "app");
    assert_eq!(
        database.fix,
        "GRANT CREATE ON DATABASE app TO pscale; -- as app_owner (the database's owner) or a superuser"
    );
    for reason in ["CREATE SUBSCRIPTION", "schema(s) shop", "extension(s) hstore"] {
        assert!(database.message.contains(reason), "{reason}: {}", database.message);
    }
    let public = find(&f, "schema_create_privilege");
    assert_eq!(public.object, "public");
    assert_eq!(
        public.fix,
        "GRANT CREATE ON SCHEMA public TO pscale; -- as app_owner (the database's owner) or a superuser"
    );
    // hstore is trusted: CREATE on the database is enough. pg_stat_statements
    // is not: only a superuser may install it.
    let untrusted = find(&f, "extension_privilege");
    assert_eq!(untrusted.object, "pg_stat_statements");
    assert!(
        untrusted.fix.contains("--skip 'EXTENSION pg_stat_statements'"),
        "{}",
        untrusted.fix
    );
    assert!(f.iter().all(|f| f.check != "subscription_privilege"), "{f:#?}");
    // The target agrees with each of them.
    let denied = |r: Result<(), String>| r.expect_err("the target allowed it");
    assert!(denied(as_role(&url, "CREATE SCHEMA shop").await).contains("permission denied for database app"));
    assert!(
        denied(as_role(&url, "CREATE TABLE public.orders (id int)").await)
            .contains("permission denied for schema public")
    );
    assert!(
        denied(
            as_role(
                &url,
                "CREATE SUBSCRIPTION s CONNECTION 'dbname=x' PUBLICATION p WITH (connect = false)"
            )
            .await
        )
        .contains("permission denied for database app")
    );

    // The fixes, as the database's owner and a superuser would run them.
    target.psql(DATABASE, "GRANT CREATE ON DATABASE app TO pscale");
    target.psql(DATABASE, "SET ROLE app_owner; GRANT CREATE ON SCHEMA public TO pscale");
    target.psql(DATABASE, "CREATE EXTENSION pg_stat_statements");
    let f = findings(&url, &facts).await;
    assert!(errors(&f).is_empty(), "{f:#?}");
    as_role(
        &url,
        "CREATE SCHEMA shop; CREATE TABLE public.orders (id int); CREATE EXTENSION hstore",
    )
    .await
    .unwrap();

    // Without pg_create_subscription.
    target.psql(DATABASE, "REVOKE pg_create_subscription FROM pscale");
    let f = findings(&url, &facts).await;
    let subscribe = find(&f, "subscription_privilege");
    assert_eq!(subscribe.fix, "GRANT pg_create_subscription TO pscale;");
    assert!(
        denied(
            as_role(
                &url,
                "CREATE SUBSCRIPTION s CONNECTION 'dbname=x' PUBLICATION p WITH (connect = false)"
            )
            .await
        )
        .contains("pg_create_subscription")
    );
    target.psql(DATABASE, "GRANT pg_create_subscription TO pscale");

    // Leftovers of an earlier attempt: a schema the dump creates, a table.
    target.psql(DATABASE, "CREATE SCHEMA shop; CREATE TABLE shop.items (id int)");
    let f = findings(&url, &facts).await;
    let schema = find(&f, "leftover_schema");
    assert_eq!(schema.object, "shop");
    assert!(
        schema.message.contains("leftover of an earlier attempt"),
        "{}",
        schema.message
    );
    assert_eq!(
        schema.fix,
        "DROP SCHEMA shop CASCADE; -- on the target, once you are sure it holds nothing you need"
    );
    let table = find(&f, "conflicting_table");
    assert_eq!(table.object, "shop.items");
    assert!(
        table.message.contains("leftover of an earlier attempt"),
        "{}",
        table.message
    );
}

/// What the agent runs, with the agent's options, against `source`.
fn dump(source: &Cluster, section: &str) -> Vec<Statement> {
    let out = source
        .install()
        .command("pg_dump")
        .args([
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--no-publications",
            "--no-subscriptions",
        ])
        .arg(format!("--section={section}"))
        .args(["-d", &source.url("shop")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    split(&String::from_utf8(out.stdout).unwrap()).unwrap()
}

fn sections(source: &Cluster) -> Sections {
    Sections {
        pre_data: dump(source, "pre-data"),
        post_data: dump(source, "post-data"),
    }
}

fn schema_exists(target: &Cluster, schema: &str) -> bool {
    target.psql(
        DATABASE,
        &format!("SELECT count(*) FROM pg_namespace WHERE nspname = '{schema}'"),
    ) == "1"
}

#[tokio::test]
async fn the_rehearsal_finds_what_the_role_may_not_run_and_pre_data_applies_all_or_nothing() {
    let source = Cluster::builder("pscale-source").start();
    source.create_database("shop");
    source.psql(
        "shop",
        "CREATE EXTENSION hstore; CREATE SCHEMA shop; \
         CREATE TABLE shop.items (id serial PRIMARY KEY, attributes hstore); \
         CREATE FUNCTION public.audit_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN END $$; \
         CREATE EVENT TRIGGER audit_ddl ON ddl_command_end EXECUTE FUNCTION public.audit_ddl(); \
         CREATE TABLE public.orders (id int PRIMARY KEY, item int REFERENCES shop.items)",
    );
    let target = planetscale_target("pscale-15", None);
    target.psql(DATABASE, "GRANT CREATE ON DATABASE app TO pscale");
    // Installed by another role: COMMENT ON EXTENSION would fail for pscale.
    target.psql(DATABASE, "CREATE EXTENSION hstore");
    let url = pscale_url(&target);
    let database = Database::parse("target.url", &url).unwrap();
    let facts = SourceFacts {
        extensions: vec![Extension {
            name: "hstore".into(),
            version: String::new(),
        }],
        ..source_facts(&[])
    };

    // No CREATE on public: the explicit check says so once, the rehearsal
    // adds the event trigger (a superuser's), and nothing about the
    // extension's comment, which is left out.
    let explicit = findings(&url, &facts).await;
    find(&explicit, "schema_create_privilege");
    let rehearsed = rehearse(&database, sections(&source), &[], &explicit).await.unwrap();
    let rejected: Vec<&str> = rehearsed
        .iter()
        .filter(|f| f.check == "schema_statement")
        .map(|f| f.object.as_str())
        .collect();
    assert_eq!(rejected, ["EVENT TRIGGER audit_ddl"], "{rehearsed:#?}");
    let trigger = &rehearsed[rehearsed.iter().position(|f| f.check == "schema_statement").unwrap()];
    assert!(
        trigger.message.contains("permission denied to create event trigger"),
        "{}",
        trigger.message
    );
    assert!(
        trigger.message.contains("CREATE EVENT TRIGGER audit_ddl"),
        "{}",
        trigger.message
    );
    assert!(
        trigger.fix.contains("walbridge start --skip 'EVENT TRIGGER audit_ddl'"),
        "{}",
        trigger.fix
    );
    // Post-data statements on the tables that could not be created fail too:
    // summed up, not listed.
    let consequences = find(&rehearsed, "schema_statement_consequence");
    assert!(
        consequences.message.contains("public.orders"),
        "{}",
        consequences.message
    );
    assert!(!schema_exists(&target, "shop"), "the rehearsal was rolled back");

    // Pre-data for real: CREATE SCHEMA shop succeeds, then a statement in
    // public is rejected, and all of it is rolled back.
    let pre_data = skip::filter(sections(&source).pre_data, &[]).statements;
    let failure = schema::apply_in_one_transaction(&database, &pre_data, Some("m1"))
        .await
        .expect_err("pre-data must fail without CREATE on public")
        .to_string();
    assert!(failure.contains("permission denied for schema public"), "{failure}");
    assert!(
        failure.contains("FUNCTION public.audit_ddl()"),
        "the entry is named: {failure}"
    );
    assert!(failure.contains("nothing of it remains on the target"), "{failure}");
    assert!(!schema_exists(&target, "shop"), "a failed pre-data leaves nothing");
    assert!(
        !schema_exists(&target, "walbridge_state"),
        "not even walbridge's record of it"
    );
    assert_eq!(
        target.psql(DATABASE, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"),
        "0"
    );

    // A skip that names nothing is refused, naming it.
    let unknown = rehearse(
        &database,
        sections(&source),
        &[Skip::parse("TABLE public.nothing").unwrap()],
        &explicit,
    )
    .await
    .expect_err("an unknown skip is an error");
    assert!(unknown.contains("\"TABLE public.nothing\""), "{unknown}");

    // The cause fixed and the event trigger skipped: nothing is rejected,
    // and the schema applies.
    target.psql(DATABASE, "SET ROLE app_owner; GRANT CREATE ON SCHEMA public TO pscale");
    let skips = [Skip::parse("event trigger audit_ddl").unwrap()];
    let explicit = findings(&url, &facts).await;
    // (Before PostgreSQL 16 only a superuser may subscribe: a PostgreSQL 15
    // target has no pg_create_subscription to grant.)
    let blocking: Vec<&Finding> = errors(&explicit)
        .into_iter()
        .filter(|f| f.check != "subscription_privilege")
        .collect();
    assert!(blocking.is_empty(), "{explicit:#?}");
    let rehearsed = rehearse(&database, sections(&source), &skips, &explicit).await.unwrap();
    assert!(errors(&rehearsed).is_empty(), "{rehearsed:#?}");
    let Sections { pre_data, post_data } = sections(&source);
    let pre_data = skip::filter(pre_data, &skips);
    assert!(
        pre_data.left_out.contains(&"COMMENT EXTENSION hstore".to_owned()),
        "{:?}",
        pre_data.left_out
    );
    schema::apply_in_one_transaction(&database, &pre_data.statements, Some("m1"))
        .await
        .unwrap();
    let post_data = skip::filter(post_data, &skips);
    assert_eq!(post_data.left_out, ["EVENT TRIGGER audit_ddl"]);
    // (All of post-data at once, here: the test needs it in, not resumable.)
    schema::apply_in_one_transaction(&database, &post_data.statements, None)
        .await
        .unwrap();
    assert!(schema_exists(&target, "shop"));
    assert_eq!(
        target.psql(DATABASE, "SELECT count(*) FROM pg_constraint WHERE contype = 'f'"),
        "1"
    );
    assert_eq!(target.psql(DATABASE, "SELECT count(*) FROM pg_event_trigger"), "0");
    assert_eq!(
        target.psql(
            DATABASE,
            "SELECT extowner::regrole FROM pg_extension WHERE extname = 'hstore'"
        ),
        "postgres"
    );
}

#[tokio::test]
async fn a_pre_data_larger_than_the_targets_lock_table_is_found_by_the_rehearsal_and_creates_nothing() {
    let target = Cluster::builder("small-lock-table")
        .setting("max_locks_per_transaction", "10")
        .setting("max_connections", "20")
        .start();
    target.create_database(DATABASE);
    let database = Database::parse("target.url", &target.url(DATABASE)).unwrap();
    let mut script = String::from("SET statement_timeout = 0;\nSET lock_timeout = 0;\n");
    for i in 0..1500 {
        script.push_str(&format!(
            "--\n-- Name: t{i}; Type: TABLE; Schema: public; Owner: -\n--\n\nCREATE TABLE public.t{i} (id int, note text);\n\n"
        ));
    }
    let pre_data = split(&script).unwrap();

    let rehearsed = rehearse(
        &database,
        Sections {
            pre_data: pre_data.clone(),
            post_data: Vec::new(),
        },
        &[],
        &[],
    )
    .await
    .unwrap();
    let locks = find(&rehearsed, "pre_data_locks");
    assert_eq!(locks.severity, Severity::Error);
    assert!(
        locks.message.contains("max_locks_per_transaction = 10"),
        "{}",
        locks.message
    );
    assert!(
        locks.fix.starts_with("ALTER SYSTEM SET max_locks_per_transaction = "),
        "{}",
        locks.fix
    );

    let failure = schema::apply_in_one_transaction(&database, &pre_data, Some("m1"))
        .await
        .expect_err("the lock table cannot hold it")
        .to_string();
    assert!(failure.contains("lock table is full"), "{failure}");
    assert!(failure.contains("max_locks_per_transaction"), "{failure}");
    assert_eq!(
        target.psql(DATABASE, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"),
        "0",
        "nothing of the failed pre-data remains"
    );
}
