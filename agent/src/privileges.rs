//! What each step of a migration asks of the source role, checked before
//! anything is created, so that no step fails half-way for want of a
//! privilege — least of all the cutover's fence while writes wait. Each
//! finding gives the `GRANT` or `ALTER` that fixes it.
//!
//! | step        | needs                                                                      |
//! |-------------|----------------------------------------------------------------------------|
//! | publication | `CREATE` on the database; ownership of each published table (or the owner's privileges); `FOR ALL TABLES` would need superuser |
//! | slot        | `REPLICATION` (checked with the server settings)                           |
//! | pg_dump     | `USAGE` on the tables' schemas; a lock `IN ACCESS SHARE MODE` on every dumped table (`SELECT`; PostgreSQL 16+: any table privilege) |
//! | copy        | `SELECT` on each copied table; no row-level security that applies (`BYPASSRLS`) |
//! | sequences   | `SELECT` or `USAGE` on every sequence (`pg_sequence_last_value`)           |
//! | fence       | a lock `IN EXCLUSIVE MODE` on each published table (`UPDATE`, `DELETE` or `TRUNCATE`; PostgreSQL 17+ also `MAINTAIN`; before 13 on every partition too); `TRIGGER` on each table and partition; `EXECUTE` on `pg_logical_emit_message`; `USAGE` on plpgsql; the schema `walbridge_fence`: `CREATE` on the database, or the schema owned by the role |
//!
//! A superuser has all of these; the checks are skipped for one.

use std::collections::BTreeMap;

use tokio_postgres::Client;
use walbridge_migration::finding::{Finding, Side};
use walbridge_migration::ident::{QualifiedName, quote_ident};

use crate::fence;

/// Past this many objects a fix grants on the whole schema instead of
/// naming each one.
const LISTED_IN_FIX: usize = 50;
/// Objects named in a finding's `object`.
const LISTED_IN_OBJECT: usize = 5;

/// A table in scope, as preflight found it.
#[derive(Debug, Clone)]
pub struct ScopedTable {
    pub oid: u32,
    pub name: QualifiedName,
    /// A partition (its root is the published table).
    pub is_partition: bool,
}

/// The role preflight runs as.
#[derive(Debug, Clone)]
pub struct SourceRole {
    pub name: String,
    pub superuser: bool,
    pub bypass_rls: bool,
    pub server_version_num: i32,
}

fn error(check: &str, object: impl Into<String>, message: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding::error(Side::Source, check, object, message, fix)
}

/// Every privilege finding for this role and these tables.
pub async fn check(
    client: &Client,
    role: &SourceRole,
    tables: &[ScopedTable],
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    if role.superuser {
        return Ok(Vec::new());
    }
    let mut findings = database_findings(client, role).await?;
    findings.extend(table_findings(client, role, tables).await?);
    findings.extend(sequence_findings(client, role).await?);
    Ok(findings)
}

/// Privileges on any table that let a role lock it in `mode`, on this
/// server version, as `has_table_privilege` takes them (any one is enough).
fn lock_privileges(version: i32, mode: LockMode) -> &'static str {
    match (mode, version >= 170000, version >= 160000) {
        (LockMode::Exclusive, true, _) => "UPDATE, DELETE, TRUNCATE, MAINTAIN",
        (LockMode::Exclusive, false, _) => "UPDATE, DELETE, TRUNCATE",
        (LockMode::AccessShare, true, _) => "SELECT, INSERT, UPDATE, DELETE, TRUNCATE, MAINTAIN",
        (LockMode::AccessShare, false, true) => "SELECT, INSERT, UPDATE, DELETE, TRUNCATE",
        (LockMode::AccessShare, false, false) => "SELECT",
    }
}

#[derive(Debug, Clone, Copy)]
enum LockMode {
    /// pg_dump's lock on every table it dumps.
    AccessShare,
    /// The fence's.
    Exclusive,
}

async fn database_findings(client: &Client, role: &SourceRole) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT current_database()::text, has_database_privilege(current_database(), 'CREATE'), \
                    (SELECT pg_has_role(nspowner, 'USAGE') FROM pg_namespace WHERE nspname = $1), \
                    (SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = $1), \
                    (SELECT has_language_privilege(oid, 'USAGE') FROM pg_language WHERE lanname = 'plpgsql'), \
                    (SELECT bool_or(has_function_privilege(p.oid, 'EXECUTE')) FROM pg_proc p \
                     WHERE p.proname = 'pg_logical_emit_message' AND p.pronamespace = 'pg_catalog'::regnamespace \
                       AND p.proargtypes[2] = 'text'::regtype), \
                    (SELECT min(p.oid::regprocedure::text) FROM pg_proc p \
                     WHERE p.proname = 'pg_logical_emit_message' AND p.pronamespace = 'pg_catalog'::regnamespace \
                       AND p.proargtypes[2] = 'text'::regtype), \
                    pg_has_role('pg_read_all_stats', 'USAGE')",
            &[&fence::SCHEMA],
        )
        .await?;
    let database: String = row.get(0);
    let create_on_database: bool = row.get(1);
    let owns_fence_schema: Option<bool> = row.get(2);
    let fence_schema_owner: Option<String> = row.get(3);
    let plpgsql: Option<bool> = row.get(4);
    let emit_message: Option<bool> = row.get(5);
    let emit_message_signature: Option<String> = row.get(6);
    let sees_activity: bool = row.get(7);
    let user = quote_ident(&role.name);
    let mut findings = Vec::new();

    if !create_on_database {
        let fence_too = if owns_fence_schema.is_none() {
            format!(", and the cutover's fence creates its schema {} with it", fence::SCHEMA)
        } else {
            String::new()
        };
        findings.push(error(
            "database_create_privilege",
            quote_ident(&database),
            format!(
                "role {user} may not create objects in database {}: CREATE PUBLICATION needs it{fence_too}",
                quote_ident(&database)
            ),
            format!("GRANT CREATE ON DATABASE {} TO {user};", quote_ident(&database)),
        ));
    }
    if owns_fence_schema == Some(false) {
        let owner = fence_schema_owner.unwrap_or_default();
        findings.push(error(
            "fence_schema",
            fence::SCHEMA,
            format!(
                "schema {} exists and belongs to {owner}: the cutover's fence keeps its trigger function there \
                 and drops the schema when the fence is released, which only its owner may",
                fence::SCHEMA
            ),
            format!(
                "ALTER SCHEMA {} OWNER TO {user}; -- or, if it holds no fence: DROP SCHEMA {} CASCADE;",
                fence::SCHEMA,
                fence::SCHEMA
            ),
        ));
    }
    match plpgsql {
        Some(true) => {}
        Some(false) => findings.push(error(
            "fence_language",
            "plpgsql",
            format!("role {user} may not use plpgsql, the language of the fence's trigger function"),
            format!("GRANT USAGE ON LANGUAGE plpgsql TO {user};"),
        )),
        None => findings.push(error(
            "fence_language",
            "plpgsql",
            "plpgsql is not installed in the source database: the fence's trigger function is written in it",
            "CREATE EXTENSION plpgsql;",
        )),
    }
    if emit_message == Some(false) {
        let signature = emit_message_signature.unwrap_or_else(|| "pg_logical_emit_message(boolean, text, text)".into());
        findings.push(error(
            "fence_wal_marker",
            signature.clone(),
            format!(
                "role {user} may not run pg_logical_emit_message: the fence marks the WAL position the target must \
                 reach with it"
            ),
            format!("GRANT EXECUTE ON FUNCTION {signature} TO {user};"),
        ));
    }
    if !sees_activity {
        findings.push(Finding::warning(
            Side::Source,
            "activity_visibility",
            user.clone(),
            format!(
                "role {user} cannot see other roles' transactions in pg_stat_activity: preflight cannot find long \
                 transactions that would hold up creating the replication slot"
            ),
            format!("GRANT pg_read_all_stats TO {user};"),
        ));
    }
    Ok(findings)
}

/// What one table in scope allows the role.
struct TablePrivileges {
    table: ScopedTable,
    kind: String,
    owner: String,
    owned: bool,
    schema_usage: bool,
    select: bool,
    dump_lock: bool,
    fence_lock: bool,
    trigger: bool,
    row_security_applies: bool,
    /// A fence trigger of an earlier migration is still on it.
    fence_trigger_left: bool,
}

async fn table_findings(
    client: &Client,
    role: &SourceRole,
    tables: &[ScopedTable],
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let version = role.server_version_num;
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    // The privilege lists come from `lock_privileges`, never from input.
    let query = format!(
        "SELECT c.oid, c.relkind::text, c.relowner::regrole::text, pg_has_role(c.relowner, 'USAGE'), \
                has_schema_privilege(c.relnamespace, 'USAGE'), has_table_privilege(c.oid, 'SELECT'), \
                has_table_privilege(c.oid, '{}'), has_table_privilege(c.oid, '{}'), \
                has_table_privilege(c.oid, 'TRIGGER'), \
                c.relrowsecurity AND (c.relforcerowsecurity OR NOT pg_has_role(c.relowner, 'USAGE')), \
                EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = $2) \
         FROM pg_class c WHERE c.oid = ANY($1)",
        lock_privileges(version, LockMode::AccessShare),
        lock_privileges(version, LockMode::Exclusive),
    );
    let rows = client.query(&query, &[&oids, &fence::TRIGGER]).await?;
    let by_oid: BTreeMap<u32, &ScopedTable> = tables.iter().map(|t| (t.oid, t)).collect();
    let mut privileges: Vec<TablePrivileges> = rows
        .iter()
        .filter_map(|row| {
            let table = (*by_oid.get(&row.get::<_, u32>(0))?).clone();
            Some(TablePrivileges {
                table,
                kind: row.get(1),
                owner: row.get(2),
                owned: row.get(3),
                schema_usage: row.get(4),
                select: row.get(5),
                dump_lock: row.get(6),
                fence_lock: row.get(7),
                trigger: row.get(8),
                row_security_applies: row.get::<_, bool>(9) && !role.bypass_rls,
                fence_trigger_left: row.get(10),
            })
        })
        .collect();
    privileges.sort_by(|a, b| a.table.name.cmp(&b.table.name));
    let user = quote_ident(&role.name);
    let mut findings = Vec::new();

    let schemas_without_usage: std::collections::BTreeSet<&str> = privileges
        .iter()
        .filter(|p| !p.schema_usage)
        .map(|p| p.table.name.schema.as_str())
        .collect();
    for schema in schemas_without_usage {
        findings.push(error(
            "schema_usage",
            quote_ident(schema),
            format!(
                "role {user} may not use schema {}: pg_dump, the copy and the fence reach its tables by name",
                quote_ident(schema)
            ),
            format!("GRANT USAGE ON SCHEMA {} TO {user};", quote_ident(schema)),
        ));
    }

    // The publication: a table may be added only by its owner.
    let mut by_owner: BTreeMap<&str, Vec<QualifiedName>> = BTreeMap::new();
    for p in privileges.iter().filter(|p| !p.table.is_partition && !p.owned) {
        by_owner.entry(&p.owner).or_default().push(p.table.name.clone());
    }
    for (owner, names) in by_owner {
        let alters: Vec<String> = names
            .iter()
            .take(LISTED_IN_FIX)
            .map(|t| format!("ALTER TABLE {t} OWNER TO {user};"))
            .collect();
        let more = if names.len() > LISTED_IN_FIX { " ..." } else { "" };
        findings.push(error(
            "publication_ownership",
            listed(&names),
            format!(
                "the publication may include a table only for its owner or a role with the owner's privileges, and \
                 role {user} is neither for {} owned by {owner} (a FOR ALL TABLES publication would need superuser)",
                count(names.len(), "table")
            ),
            format!(
                "GRANT {owner} TO {user}; -- or, table by table: {}{more}",
                alters.join(" ")
            ),
        ));
    }

    let unreadable: Vec<QualifiedName> = privileges
        .iter()
        .filter(|p| if p.kind == "p" { !p.dump_lock } else { !p.select })
        .map(|p| p.table.name.clone())
        .collect();
    findings.extend(per_schema(&unreadable, |schema, names| {
        error(
            "select_privilege",
            listed(names),
            format!(
                "role {user} may not read {}: the copy reads each table, and pg_dump locks every table it dumps \
                 (IN ACCESS SHARE MODE), even for the schema alone",
                count(names.len(), "table")
            ),
            grant_on_tables("SELECT", schema, names, &user),
        )
    }));

    let guarded: Vec<QualifiedName> = privileges
        .iter()
        .filter(|p| p.kind == "r" && p.row_security_applies)
        .map(|p| p.table.name.clone())
        .collect();
    if !guarded.is_empty() {
        findings.push(error(
            "row_level_security",
            listed(&guarded),
            format!(
                "row-level security applies to role {user} on {}: the copy would silently see only the rows its \
                 policies allow",
                count(guarded.len(), "table")
            ),
            format!("ALTER ROLE {user} BYPASSRLS;"),
        ));
    }

    // Before 13, LOCK TABLE checked the privilege on every partition too.
    let unlockable: Vec<QualifiedName> = privileges
        .iter()
        .filter(|p| (!p.table.is_partition || role.server_version_num < 130000) && !p.fence_lock)
        .map(|p| p.table.name.clone())
        .collect();
    let (lock_grant, lock_rule) = if version >= 170000 {
        ("MAINTAIN", "MAINTAIN, UPDATE, DELETE or TRUNCATE")
    } else {
        ("UPDATE", "UPDATE, DELETE or TRUNCATE")
    };
    findings.extend(per_schema(&unlockable, |schema, names| {
        error(
            "fence_lock_privilege",
            listed(names),
            format!(
                "role {user} may not lock {} IN EXCLUSIVE MODE, which the cutover's fence does to stop writes: \
                 it needs {lock_rule} on each{}",
                count(names.len(), "table"),
                if version < 130000 {
                    " (before PostgreSQL 13, on each partition too)"
                } else {
                    ""
                }
            ),
            grant_on_tables(lock_grant, schema, names, &user),
        )
    }));

    let untriggerable: Vec<QualifiedName> = privileges
        .iter()
        .filter(|p| !p.trigger)
        .map(|p| p.table.name.clone())
        .collect();
    findings.extend(per_schema(&untriggerable, |schema, names| {
        error(
            "fence_trigger_privilege",
            listed(names),
            format!(
                "role {user} may not create triggers on {}: the cutover seals its fence with a trigger on every \
                 table and partition",
                count(names.len(), "table")
            ),
            grant_on_tables("TRIGGER", schema, names, &user),
        )
    }));
    // Sealing drops an old fence trigger first, which only the owner may.
    let fenced: Vec<QualifiedName> = privileges
        .iter()
        .filter(|p| p.fence_trigger_left && !p.owned)
        .map(|p| p.table.name.clone())
        .collect();
    if !fenced.is_empty() {
        findings.push(error(
            "fence_leftover",
            listed(&fenced),
            format!(
                "{} still carry the trigger {} of an earlier fence, which sealing the next one replaces, and only \
                 a table's owner may drop a trigger",
                count(fenced.len(), "table"),
                fence::TRIGGER
            ),
            format!(
                "walbridge release-source -- or, on the source: DROP FUNCTION {}.refuse_write() CASCADE;",
                fence::SCHEMA
            ),
        ));
    }
    Ok(findings)
}

async fn sequence_findings(client: &Client, role: &SourceRole) -> Result<Vec<Finding>, tokio_postgres::Error> {
    // The same sequences the cutover copies (`streaming::sequences`). The
    // privilege is asked in the select list: in WHERE, the planner may ask
    // it of relations that are not sequences, which is an error.
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, has_sequence_privilege(c.oid, 'SELECT, USAGE') \
             FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' \
             ORDER BY 1, 2",
            &[],
        )
        .await?;
    let names: Vec<QualifiedName> = rows
        .iter()
        .filter(|row| !row.get::<_, bool>(2))
        .map(|row| QualifiedName::new(row.get::<_, String>(0), row.get::<_, String>(1)))
        .collect();
    let user = quote_ident(&role.name);
    let silently = if role.server_version_num >= 180000 {
        " (PostgreSQL 18 reads NULL instead of failing, which would set the target's sequence back to its start)"
    } else {
        ""
    };
    Ok(per_schema(&names, |schema, names| {
        let fix = if names.len() > LISTED_IN_FIX {
            format!(
                "GRANT SELECT ON ALL SEQUENCES IN SCHEMA {} TO {user};",
                quote_ident(schema)
            )
        } else {
            let list: Vec<String> = names.iter().map(ToString::to_string).collect();
            format!("GRANT SELECT ON SEQUENCE {} TO {user};", list.join(", "))
        };
        error(
            "sequence_privilege",
            listed(names),
            format!(
                "role {user} may not read {}: the cutover copies every sequence's value to the target, which needs \
                 SELECT or USAGE on it{silently}",
                count(names.len(), "sequence")
            ),
            fix,
        )
    }))
}

/// One finding per schema of `names` (sorted by schema).
fn per_schema(names: &[QualifiedName], finding: impl Fn(&str, &[QualifiedName]) -> Finding) -> Vec<Finding> {
    let mut by_schema: BTreeMap<&str, Vec<QualifiedName>> = BTreeMap::new();
    for name in names {
        by_schema.entry(&name.schema).or_default().push(name.clone());
    }
    by_schema
        .into_iter()
        .map(|(schema, names)| finding(schema, &names))
        .collect()
}

/// `GRANT privilege ON a, b TO role;`, or on the whole schema when the
/// list would be long.
fn grant_on_tables(privilege: &str, schema: &str, names: &[QualifiedName], user: &str) -> String {
    if names.len() > LISTED_IN_FIX {
        format!(
            "GRANT {privilege} ON ALL TABLES IN SCHEMA {} TO {user}; -- {} tables need it; this grants it on every table there",
            quote_ident(schema),
            names.len()
        )
    } else {
        let list: Vec<String> = names.iter().map(ToString::to_string).collect();
        format!("GRANT {privilege} ON {} TO {user};", list.join(", "))
    }
}

/// The objects a finding is about: the one, or the first few and a count.
fn listed(names: &[QualifiedName]) -> String {
    let shown: Vec<String> = names.iter().take(LISTED_IN_OBJECT).map(ToString::to_string).collect();
    if names.len() > LISTED_IN_OBJECT {
        format!("{} and {} more", shown.join(", "), names.len() - LISTED_IN_OBJECT)
    } else {
        shown.join(", ")
    }
}

fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_privileges_follow_the_server_version() {
        assert_eq!(lock_privileges(150000, LockMode::AccessShare), "SELECT");
        assert!(lock_privileges(160000, LockMode::AccessShare).contains("UPDATE"));
        assert!(!lock_privileges(160000, LockMode::Exclusive).contains("MAINTAIN"));
        assert!(lock_privileges(170000, LockMode::Exclusive).contains("MAINTAIN"));
        assert!(!lock_privileges(100000, LockMode::Exclusive).contains("SELECT"));
    }

    #[test]
    fn long_lists_are_cut_in_objects_and_fixes() {
        let names: Vec<QualifiedName> = (0..60).map(|i| QualifiedName::new("app", format!("t{i}"))).collect();
        assert_eq!(listed(&names[..1]), "app.t0");
        assert_eq!(listed(&names), "app.t0, app.t1, app.t2, app.t3, app.t4 and 55 more");
        assert_eq!(
            grant_on_tables("SELECT", "app", &names[..2], "lp"),
            "GRANT SELECT ON app.t0, app.t1 TO lp;"
        );
        assert!(
            grant_on_tables("SELECT", "app", &names, "lp")
                .starts_with("GRANT SELECT ON ALL TABLES IN SCHEMA app TO lp;")
        );
    }
}
