//! Source-side preflight: everything on the source that would make a
//! migration fail, lose rows silently, or hurt the source, found before
//! anything is created. Each finding names the object (quoted as
//! PostgreSQL would), says why it matters and gives the fix.
//!
//! Catalog queries work on PostgreSQL 10 and later. What each step asks
//! of a role that is not a superuser is checked in [`crate::privileges`].

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_postgres::Client;
use walbridge_migration::finding::{Extension, Finding, Side, SourceFacts, SourceSchema};
use walbridge_migration::ident::{QualifiedName, quote_ident};

use crate::pg_dump::{NotFound, PgDump, PgDumpChoice};
use crate::privileges::{self, ScopedTable, SourceRole};

/// What to check.
#[derive(Debug, Clone)]
pub struct SourceScope {
    /// Top-level tables in scope (partitions follow their root); `None`:
    /// every user table.
    pub tables: Option<Vec<QualifiedName>>,
    /// The port walbridge connected to; a different `inet_server_port()`
    /// means something (a pooler) stands between.
    pub connected_port: Option<u16>,
    /// Transactions open longer than this are reported.
    pub long_transaction_after: Duration,
    /// The schema's GRANTs will be carried: name the roles they need.
    pub privileges: bool,
    /// Large objects are left out (`start --no-large-objects`).
    pub skip_large_objects: bool,
}

/// Transaction-ID age past which the held snapshot's effect on vacuum
/// becomes a worry, and past which it becomes dangerous.
const XID_AGE_WARNING: i64 = 1_200_000_000;
const XID_AGE_ERROR: i64 = 1_800_000_000;
/// Below this, a walsender may drop a subscription busy applying a large
/// transaction.
pub(crate) const WAL_SENDER_TIMEOUT_MIN_MS: i64 = 10_000;

fn error(check: &str, object: impl Into<String>, message: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding::error(Side::Source, check, object, message, fix)
}

fn warning(check: &str, object: impl Into<String>, message: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding::warning(Side::Source, check, object, message, fix)
}

struct Server {
    version_num: i32,
    wal_level: String,
    free_slots: i32,
    free_senders: i32,
    user: String,
    superuser: bool,
    replication: bool,
    bypass_rls: bool,
    database_size: i64,
    xid_age: i64,
    port: Option<i32>,
    wal_sender_timeout_ms: i64,
    /// In MB; `None` before PostgreSQL 13, -1 for no limit.
    max_slot_wal_keep_size_mb: Option<i64>,
}

struct TableInfo {
    oid: u32,
    name: QualifiedName,
    kind: String,
    parent: Option<QualifiedName>,
    unlogged: bool,
    replica_identity: String,
    has_primary_key: bool,
    has_identity_index: bool,
}

pub async fn check_source(
    client: &Client,
    scope: &SourceScope,
) -> Result<(Vec<Finding>, SourceFacts), tokio_postgres::Error> {
    let server = server(client).await?;
    let mut findings = server_findings(&server, scope);
    let tables = in_scope(tables(client).await?, scope);

    for table in &tables {
        findings.extend(table_findings(table));
    }
    let role = SourceRole {
        name: server.user.clone(),
        superuser: server.superuser,
        bypass_rls: server.bypass_rls,
        server_version_num: server.version_num,
    };
    let scoped: Vec<ScopedTable> = tables
        .iter()
        .map(|t| ScopedTable {
            oid: t.oid,
            name: t.name.clone(),
            is_partition: t.parent.is_some(),
        })
        .collect();
    findings.extend(privileges::check(client, &role, &scoped).await?);
    findings.extend(other_objects(client, scope.skip_large_objects).await?);
    findings.extend(transactions(client, scope.long_transaction_after).await?);

    let extensions = client
        .query(
            "SELECT extname::text, extversion FROM pg_extension WHERE extname <> 'plpgsql' ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|row| Extension {
            name: row.get(0),
            version: row.get(1),
        })
        .collect();
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let roles = if scope.privileges {
        crate::grants::roles_named(client, &oids).await?
    } else {
        Vec::new()
    };
    let facts = SourceFacts {
        roles,
        schemas: schemas(client, &oids).await?,
        server_version_num: server.version_num.max(0) as u32,
        database_size_bytes: server.database_size.max(0) as u64,
        extensions,
        tables: tables
            .iter()
            .filter(|t| t.parent.is_none())
            .map(|t| t.name.clone())
            .collect(),
    };
    Ok((findings, facts))
}

async fn server(client: &Client) -> Result<Server, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int4, current_setting('wal_level'), \
                    current_setting('max_replication_slots')::int4 - (SELECT count(*) FROM pg_replication_slots)::int4, \
                    current_setting('max_wal_senders')::int4 - (SELECT count(*) FROM pg_stat_replication)::int4, \
                    current_user::text, r.rolsuper, r.rolreplication, r.rolbypassrls, \
                    pg_database_size(current_database())::int8, \
                    (SELECT age(datfrozenxid)::int8 FROM pg_database WHERE datname = current_database()), \
                    inet_server_port(), \
                    (SELECT setting::int8 FROM pg_settings WHERE name = 'wal_sender_timeout'), \
                    (SELECT setting::int8 FROM pg_settings WHERE name = 'max_slot_wal_keep_size') \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    Ok(Server {
        version_num: row.get(0),
        wal_level: row.get(1),
        free_slots: row.get(2),
        free_senders: row.get(3),
        user: row.get(4),
        superuser: row.get(5),
        replication: row.get(6),
        bypass_rls: row.get(7),
        database_size: row.get(8),
        xid_age: row.get(9),
        port: row.get(10),
        wal_sender_timeout_ms: row.get(11),
        max_slot_wal_keep_size_mb: row.get(12),
    })
}

fn server_findings(server: &Server, scope: &SourceScope) -> Vec<Finding> {
    let mut findings = Vec::new();
    if server.version_num < 100000 {
        findings.push(error(
            "server_version",
            "",
            format!(
                "the source runs PostgreSQL {}, which has no logical replication (10 or later is needed)",
                server.version_num
            ),
            "upgrade the source to PostgreSQL 10 or later first",
        ));
    }
    if server.wal_level != "logical" {
        findings.push(error(
            "wal_level",
            "wal_level",
            format!(
                "wal_level is {}: logical decoding needs wal_level = logical",
                server.wal_level
            ),
            "ALTER SYSTEM SET wal_level = logical; -- then restart the source server",
        ));
    }
    if server.free_slots < 1 {
        findings.push(error(
            "replication_slots",
            "max_replication_slots",
            "every replication slot is in use: walbridge needs one",
            "ALTER SYSTEM SET max_replication_slots = <more>; -- then restart, or drop an unused slot",
        ));
    }
    if server.free_senders < 1 {
        findings.push(error(
            "wal_senders",
            "max_wal_senders",
            "every WAL sender is in use: the snapshot and the subscription need one each",
            "ALTER SYSTEM SET max_wal_senders = <more>; -- then restart the source server",
        ));
    }
    if !server.superuser && !server.replication {
        findings.push(error(
            "replication_privilege",
            quote_ident(&server.user),
            format!(
                "role {} may not open replication connections",
                quote_ident(&server.user)
            ),
            format!("ALTER ROLE {} REPLICATION;", quote_ident(&server.user)),
        ));
    }
    findings.extend(xid_age_finding(server.xid_age));
    if server.wal_sender_timeout_ms > 0 && server.wal_sender_timeout_ms < WAL_SENDER_TIMEOUT_MIN_MS {
        findings.push(warning(
            "wal_sender_timeout",
            "wal_sender_timeout",
            format!(
                "wal_sender_timeout is {} ms: a subscriber busy with a large transaction may be cut off and restart",
                server.wal_sender_timeout_ms
            ),
            "ALTER SYSTEM SET wal_sender_timeout = '60s'; SELECT pg_reload_conf();",
        ));
    }
    if let Some(limit) = server.max_slot_wal_keep_size_mb.filter(|mb| *mb >= 0) {
        findings.push(warning(
            "max_slot_wal_keep_size",
            "max_slot_wal_keep_size",
            format!(
                "max_slot_wal_keep_size is {limit} MB: once the slot holds more WAL than that (the source writes \
                 during a long copy, or the subscriber stalls), the server invalidates it and the migration must \
                 start over"
            ),
            "ALTER SYSTEM SET max_slot_wal_keep_size = -1; SELECT pg_reload_conf(); -- or a limit above the WAL \
             the source writes during the copy, with disk to hold it",
        ));
    }
    if let (Some(connected), Some(actual)) = (scope.connected_port, server.port)
        && i32::from(connected) != actual
    {
        findings.push(warning(
            "pooler",
            "source.url",
            format!(
                "walbridge connected to port {connected} but the server listens on {actual}: a pooler seems to stand \
                 between, and an exported snapshot exists only on the server session that made it"
            ),
            "point source.url at the PostgreSQL server itself, not at a pooler",
        ));
    }
    findings
}

/// The finding for a database's transaction-ID age, if any.
pub fn xid_age_finding(age: i64) -> Option<Finding> {
    let message = format!(
        "the database's transaction-ID age is {age}: the snapshot held during the copy keeps vacuum from freezing, \
         and wraparound protection starts at 2 billion"
    );
    let fix = "VACUUM (FREEZE) the oldest tables before migrating";
    if age > XID_AGE_ERROR {
        Some(error("xid_wraparound", "", message, fix))
    } else if age > XID_AGE_WARNING {
        Some(warning("xid_wraparound", "", message, fix))
    } else {
        None
    }
}

async fn tables(client: &Client) -> Result<Vec<TableInfo>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, c.relkind::text, pn.nspname::text, p.relname::text, \
                    c.relpersistence = 'u', c.relreplident::text, \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident), \
                    c.oid \
             FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_inherits i ON i.inhrelid = c.oid AND c.relispartition \
             LEFT JOIN pg_class p ON p.oid = i.inhparent \
             LEFT JOIN pg_namespace pn ON pn.oid = p.relnamespace \
             WHERE c.relkind IN ('r', 'p') \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' \
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                               AND d.objid = c.oid AND d.deptype = 'e') \
             ORDER BY 1, 2",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| TableInfo {
            name: QualifiedName::new(row.get::<_, String>(0), row.get::<_, String>(1)),
            kind: row.get(2),
            parent: match (row.get::<_, Option<String>>(3), row.get::<_, Option<String>>(4)) {
                (Some(schema), Some(name)) => Some(QualifiedName::new(schema, name)),
                _ => None,
            },
            unlogged: row.get(5),
            replica_identity: row.get(6),
            has_primary_key: row.get(7),
            has_identity_index: row.get(8),
            oid: row.get(9),
        })
        .collect())
}

/// The tables whose root is in scope.
fn in_scope(tables: Vec<TableInfo>, scope: &SourceScope) -> Vec<TableInfo> {
    let Some(wanted) = &scope.tables else {
        return tables;
    };
    let parents: BTreeMap<QualifiedName, QualifiedName> = tables
        .iter()
        .filter_map(|t| t.parent.clone().map(|p| (t.name.clone(), p)))
        .collect();
    let root = |name: &QualifiedName| {
        let mut root = name.clone();
        while let Some(parent) = parents.get(&root) {
            root = parent.clone();
        }
        root
    };
    tables.into_iter().filter(|t| wanted.contains(&root(&t.name))).collect()
}

fn table_findings(table: &TableInfo) -> Vec<Finding> {
    let name = table.name.to_string();
    let mut findings = Vec::new();
    if table.kind == "p" {
        findings.push(warning(
            "partitioned_table",
            &name,
            "a partitioned table: its partitions are copied one by one and the target needs the same partitions; \
             from PostgreSQL 13 its changes are published as the root's, before 13 as each partition's own",
            "",
        ));
        return findings;
    }
    if table.unlogged {
        findings.push(error(
            "unlogged_table",
            &name,
            "an unlogged table writes no WAL, so it cannot be published and its changes would never reach the target",
            format!("ALTER TABLE {name} SET LOGGED; -- or leave it out with --exclude"),
        ));
    }
    let no_identity = match table.replica_identity.as_str() {
        "d" => !table.has_primary_key,
        "n" => true,
        "i" => !table.has_identity_index,
        _ => false,
    };
    if no_identity {
        findings.push(error(
            "no_replica_identity",
            &name,
            "no primary key or replica identity: once the table is published, UPDATE and DELETE on it fail on the source",
            format!("ALTER TABLE {name} REPLICA IDENTITY FULL; -- or add a primary key"),
        ));
    }
    findings
}

/// The schemas pg_dump writes into (an extension's own schemas left out:
/// the extension makes them), and whether it creates each.
async fn schemas(client: &Client, tables_in_scope: &[u32]) -> Result<Vec<SourceSchema>, tokio_postgres::Error> {
    let not_extension_member = |catalog: &str, column: &str| {
        format!(
            "NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = '{catalog}'::regclass \
             AND d.objid = {column} AND d.deptype = 'e')"
        )
    };
    // Objects pg_dump dumps there: relations (tables only when in scope,
    // sequences only when not owned by a table out of scope), functions,
    // types of their own. Not extensions: a trusted one is installed into
    // a schema without CREATE on it.
    let query = format!(
        "SELECT n.nspname::text, n.nspname <> 'public', \
                EXISTS (SELECT 1 FROM pg_class c WHERE c.relnamespace = n.oid \
                        AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f', 'c') \
                        AND (c.relkind NOT IN ('r', 'p') OR c.oid = ANY($1)) \
                        AND NOT EXISTS (SELECT 1 FROM pg_depend o WHERE c.relkind = 'S' \
                                        AND o.classid = 'pg_class'::regclass AND o.objid = c.oid \
                                        AND o.refclassid = 'pg_class'::regclass AND o.deptype IN ('a', 'i') \
                                        AND o.refobjid <> ALL($1)) \
                        AND {}) \
                OR EXISTS (SELECT 1 FROM pg_proc p WHERE p.pronamespace = n.oid AND {}) \
                OR EXISTS (SELECT 1 FROM pg_type t WHERE t.typnamespace = n.oid AND t.typtype IN ('d', 'e', 'r') AND {}) \
         FROM pg_namespace n \
         WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
           AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' \
           AND {} \
         ORDER BY 1",
        not_extension_member("pg_class", "c.oid"),
        not_extension_member("pg_proc", "p.oid"),
        not_extension_member("pg_type", "t.oid"),
        not_extension_member("pg_namespace", "n.oid"),
    );
    Ok(client
        .query(&query, &[&tables_in_scope])
        .await?
        .iter()
        .map(|row| SourceSchema {
            name: row.get(0),
            created_by_dump: row.get(1),
            has_objects: row.get(2),
        })
        .collect())
}

async fn other_objects(client: &Client, skip_large_objects: bool) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let mut findings = Vec::new();
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, c.relkind::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('m', 'f') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
             ORDER BY 1, 2",
            &[],
        )
        .await?;
    for row in rows {
        let name = QualifiedName::new(row.get::<_, String>(0), row.get::<_, String>(1)).to_string();
        if row.get::<_, String>(2) == "m" {
            findings.push(warning(
                "materialized_view",
                &name,
                "materialized views are not replicated: walbridge refreshes it on the target after the copy, \
                 and it must be refreshed there again after the cutover",
                format!("REFRESH MATERIALIZED VIEW {name}; -- on the target, after the cutover"),
            ));
        } else {
            findings.push(warning(
                "foreign_table",
                &name,
                "a foreign table's rows live elsewhere: only its definition is migrated",
                "make sure the target can reach the foreign server",
            ));
        }
    }
    findings.extend(large_objects(client, skip_large_objects).await?);
    Ok(findings)
}

/// Large objects: walbridge copies them (logical replication does not
/// carry them), which needs the right to read each; or, when asked, leaves
/// them out, which the operator must know.
async fn large_objects(client: &Client, skip: bool) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*), coalesce(sum(1) FILTER (WHERE NOT (pg_has_role(m.lomowner, 'USAGE') \
                 OR EXISTS (SELECT 1 FROM aclexplode(m.lomacl) a WHERE a.privilege_type = 'SELECT' \
                            AND (a.grantee = 0 OR pg_has_role(a.grantee, 'USAGE'))) \
                 OR current_setting('lo_compat_privileges')::bool \
                 OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user))), 0)::int8, \
                    (SELECT string_agg(oid::text, ', ') FROM (SELECT oid FROM pg_largeobject_metadata ORDER BY oid LIMIT 3) o) \
             FROM pg_largeobject_metadata m",
            &[],
        )
        .await?;
    let (count, unreadable): (i64, i64) = (row.get(0), row.get(1));
    let mut findings = Vec::new();
    if count == 0 {
        return Ok(findings);
    }
    if skip {
        findings.push(warning(
            "large_objects",
            "pg_largeobject",
            format!(
                "{count} large object(s) will NOT be migrated (--no-large-objects): the target will have none of them"
            ),
            "drop --no-large-objects to copy them with the tables",
        ));
        return Ok(findings);
    }
    findings.push(warning(
        "large_objects",
        "pg_largeobject",
        format!(
            "{count} large object(s): logical replication does not carry them, so walbridge copies them with the \
             tables and again, those changed since, while the cutover holds writes (a long wait if many change)"
        ),
        "to leave them out, start with --no-large-objects",
    ));
    if unreadable > 0 {
        findings.push(error(
            "large_object_privilege",
            "pg_largeobject",
            format!("{unreadable} of the {count} large objects may not be read by this role: their copy would fail"),
            "GRANT SELECT ON LARGE OBJECT <oid> TO <role>; for each (or make the role their owner's member, or \
             SET lo_compat_privileges = on)",
        ));
    }
    Ok(findings)
}

async fn transactions(client: &Client, older_than: Duration) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let mut findings = Vec::new();
    let seconds = older_than.as_secs_f64();
    let rows = client
        .query(
            "SELECT pid, extract(epoch FROM now() - xact_start)::float8, coalesce(state, ''), usename::text \
             FROM pg_stat_activity \
             WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid() AND backend_type = 'client backend' \
               AND now() - xact_start >= $1 * interval '1 second' \
             ORDER BY xact_start",
            &[&seconds],
        )
        .await?;
    for row in rows {
        let pid: i32 = row.get(0);
        findings.push(warning(
            "long_transaction",
            format!("pid {pid}"),
            format!(
                "a transaction of {} has been open {:.0} s ({}): creating the replication slot waits for it to end",
                row.get::<_, String>(3),
                row.get::<_, f64>(1),
                row.get::<_, String>(2)
            ),
            format!("end it, or SELECT pg_terminate_backend({pid});"),
        ));
    }
    let prepared = client
        .query(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() ORDER BY prepared",
            &[],
        )
        .await?;
    for row in prepared {
        let gid: String = row.get(0);
        findings.push(error(
            "prepared_transaction",
            &gid,
            "a prepared transaction is pending: creating the replication slot waits until it is committed or rolled back",
            format!("COMMIT PREPARED '{}'; -- or ROLLBACK PREPARED", gid.replace('\'', "''")),
        ));
    }
    Ok(findings)
}

/// The agent's pg_dump must not be older than the source server (an older
/// pg_dump refuses a newer server). The fix names the major to install and
/// the setting to point at it.
pub fn check_pg_dump(
    choice: &PgDumpChoice,
    found: &Result<PgDump, NotFound>,
    server_version_num: u32,
) -> Option<Finding> {
    let server_major = server_version_num / 10000;
    let fix = format!(
        "install PostgreSQL {server_major}'s pg_dump or a newer one (the newest dumps every older server): Debian \
         and Ubuntu `apt-get install postgresql-client-{server_major}` from apt.postgresql.org, RHEL \
         `dnf install postgresql{server_major}` from the PGDG repository; then set source.pg_dump to it (e.g. \
         /usr/lib/postgresql/{server_major}/bin/pg_dump), or leave source.pg_dump unset for the agent to take the \
         newest it finds"
    );
    match found {
        Err(not_found) => Some(error(
            "pg_dump",
            "source.pg_dump",
            format!("{}: {not_found}; the schema cannot be dumped", choice.describe()),
            fix,
        )),
        Ok(pg_dump) if pg_dump.major >= server_major => None,
        Ok(pg_dump) => Some(error(
            "pg_dump",
            "source.pg_dump",
            format!(
                "{} is {} at {}, older than the source server (PostgreSQL {server_major}): it refuses to dump it",
                choice.describe(),
                pg_dump.version,
                pg_dump.program.display()
            ),
            fix,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walbridge_migration::finding::Severity;

    fn found(version: &str) -> Result<PgDump, NotFound> {
        Ok(PgDump {
            program: "/usr/lib/postgresql/15/bin/pg_dump".into(),
            major: crate::pg_dump::major_of(version).unwrap(),
            version: version.to_owned(),
        })
    }

    #[test]
    fn pg_dump_must_not_be_older_than_the_server() {
        let configured = PgDumpChoice::Configured("/usr/lib/postgresql/15/bin/pg_dump".into());
        let debian = found("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)");
        assert_eq!(check_pg_dump(&configured, &debian, 150018), None);
        assert_eq!(
            check_pg_dump(&configured, &found("pg_dump (PostgreSQL) 18.1"), 130022),
            None
        );
        let old = check_pg_dump(&configured, &found("pg_dump (PostgreSQL) 14.2"), 160001).unwrap();
        assert_eq!(old.severity, Severity::Error);
        assert!(old.fix.contains("postgresql-client-16"), "{}", old.fix);
        assert!(old.fix.contains("set source.pg_dump"), "{}", old.fix);
        assert!(old.message.contains("PostgreSQL 16"), "{}", old.message);
        let missing = Err(NotFound { tried: vec![] });
        let none = check_pg_dump(&PgDumpChoice::Newest, &missing, 150000).unwrap();
        assert!(none.is_error());
        assert!(none.message.contains("source.pg_dump is not set"), "{}", none.message);
    }

    #[test]
    fn xid_age_thresholds() {
        assert_eq!(xid_age_finding(1_000_000), None);
        assert_eq!(xid_age_finding(1_500_000_000).unwrap().severity, Severity::Warning);
        assert_eq!(xid_age_finding(1_900_000_000).unwrap().severity, Severity::Error);
    }
}
