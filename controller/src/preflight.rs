//! Target-side preflight: what on the target would make the schema, the
//! copy or the subscription fail, given what the agent learned of the
//! source — for a target role that is not a superuser (a managed
//! database's, such as PlanetScale's) as much as for one that is. The
//! schema itself is then rehearsed on the target ([`crate::rehearsal`]).

use tokio_postgres::Client;
use walbridge_migration::finding::{Finding, NamedRole, Side, SourceFacts};
use walbridge_migration::ident::quote_ident;
use walbridge_migration::role_settings;
use walbridge_migration::skip::skip_argument;

fn error(check: &str, object: impl Into<String>, message: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding::error(Side::Target, check, object, message, fix)
}

fn warning(check: &str, object: impl Into<String>, message: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding::warning(Side::Target, check, object, message, fix)
}

pub async fn check_target(client: &Client, source: &SourceFacts) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let mut findings = Vec::new();
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int4, current_user::text, r.rolsuper, \
                    current_setting('max_logical_replication_workers')::int4, \
                    current_setting('max_replication_slots')::int4, \
                    current_database()::text, has_database_privilege(current_database(), 'CREATE'), \
                    (SELECT datdba::regrole::text FROM pg_database WHERE datname = current_database()) \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    let version: i32 = row.get(0);
    let user: String = row.get(1);
    let superuser: bool = row.get(2);
    let workers: i32 = row.get(3);
    let slots: i32 = row.get(4);
    let database: String = row.get(5);
    let create_on_database: bool = row.get(6);
    let database_owner: String = row.get(7);
    // Why the role needs CREATE on the database, if it has it not.
    let mut needs_create_on_database: Vec<String> = Vec::new();
    let (target_major, source_major) = (version / 10000, source.server_version_num as i32 / 10000);

    if target_major < source_major {
        findings.push(error(
            "target_version",
            "",
            format!(
                "the target runs PostgreSQL {target_major}, older than the source ({source_major}): the source's \
                 schema may not load and logical replication to an older server is not supported"
            ),
            "use a target running the source's major version or newer",
        ));
    }

    if !superuser {
        let may_subscribe = if version >= 160000 {
            client
                .query_one(
                    "SELECT pg_has_role(current_user, 'pg_create_subscription', 'MEMBER')",
                    &[],
                )
                .await?
                .get::<_, bool>(0)
        } else {
            false
        };
        if !may_subscribe {
            let (why, fix) = if version >= 160000 {
                (
                    "PostgreSQL 16 and later need superuser or membership in pg_create_subscription",
                    format!("GRANT pg_create_subscription TO {};", quote_ident(&user)),
                )
            } else {
                (
                    "before PostgreSQL 16 only a superuser may",
                    format!(
                        "ALTER ROLE {} SUPERUSER; -- or ask the provider for a role that may",
                        quote_ident(&user)
                    ),
                )
            };
            findings.push(error(
                "subscription_privilege",
                quote_ident(&user),
                format!("role {} cannot create the subscription: {why}", quote_ident(&user)),
                fix,
            ));
        }
    }
    if workers < 1 {
        findings.push(error(
            "max_logical_replication_workers",
            "max_logical_replication_workers",
            "it is 0: the subscription could never apply changes",
            "ALTER SYSTEM SET max_logical_replication_workers = 4; -- then restart the target",
        ));
    }
    if slots < 1 {
        findings.push(error(
            "max_replication_slots",
            "max_replication_slots",
            "it is 0 on the target: a subscription needs a replication origin to track its progress",
            "ALTER SYSTEM SET max_replication_slots = 10; -- then restart the target",
        ));
    }

    if !superuser && version >= 160000 {
        needs_create_on_database.push("PostgreSQL 16 and later require it for CREATE SUBSCRIPTION".to_owned());
    }
    findings.extend(extension_findings(client, source, superuser, version, &mut needs_create_on_database).await?);
    findings.extend(
        schema_findings(
            client,
            source,
            superuser,
            &database_owner,
            &mut needs_create_on_database,
        )
        .await?,
    );
    if !create_on_database && !superuser && !needs_create_on_database.is_empty() {
        findings.push(error(
            "database_create_privilege",
            quote_ident(&database),
            format!(
                "role {} may not create objects in database {}: {}",
                quote_ident(&user),
                quote_ident(&database),
                needs_create_on_database.join("; ")
            ),
            format!(
                "GRANT CREATE ON DATABASE {} TO {}; -- as {} (the database's owner) or a superuser",
                quote_ident(&database),
                quote_ident(&user),
                database_owner
            ),
        ));
    }

    for table in &source.tables {
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table.quoted()])
            .await?
            .get(0);
        if exists {
            findings.push(error(
                "conflicting_table",
                table.to_string(),
                "the table already exists on the target: creating it would fail, and the copy would mix its rows \
                 with the source's. It may be a leftover of an earlier attempt (walbridge never drops what it \
                 created on the target)",
                format!(
                    "DROP TABLE {table} CASCADE; -- on the target, once you are sure it holds nothing you need; \
                     or leave it out with --exclude"
                ),
            ));
        }
    }

    findings.extend(missing_roles(client, &source.roles).await?);
    findings.extend(owner_settings_findings(client, &user, &database).await?);

    let needed = source.database_size_bytes.saturating_mul(3) / 2;
    findings.push(warning(
        "target_room",
        "",
        format!(
            "the source database holds {} bytes; the target needs room for about 150% of that ({needed} bytes) \
             during the migration, which SQL cannot check",
            source.database_size_bytes
        ),
        "check the target's free disk space",
    ));
    Ok(findings)
}

/// The subscription's apply worker runs as its owner (walbridge's target
/// role) with that role's and the database's settings, which walbridge's
/// session policy does not reach: a `lock_timeout` there makes it give up
/// a lock wait and restart (with `disable_on_error`, disable the
/// subscription) whenever an application transaction holds a row it
/// applies to.
async fn owner_settings_findings(
    client: &Client,
    user: &str,
    database: &str,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let rows: Vec<role_settings::RoleSetting> = client
        .query(role_settings::SQL, &[&user])
        .await?
        .iter()
        .map(|row| role_settings::RoleSetting {
            name: row.get(0),
            value: row.get(1),
            precedence: row.get(2),
        })
        .collect();
    let mut findings = Vec::new();
    if let Some(set) = role_settings::in_force(&rows, "lock_timeout")
        && role_settings::milliseconds(&set.value).is_some_and(|ms| ms > 0.0)
    {
        findings.push(warning(
            "subscription_owner_settings",
            "lock_timeout",
            format!(
                "the subscription's apply worker runs as {} and gets lock_timeout = {} from {}: it gives up \
                 whenever it waits that long for a lock an application holds on the target, and restarts (or, with \
                 disable_on_error, stops applying)",
                quote_ident(user),
                set.value,
                set.origin(user, database)
            ),
            role_settings::fix(user, database, "lock_timeout", "0"),
        ));
    }
    Ok(findings)
}

/// Each extension the source uses: the schema's `CREATE EXTENSION IF NOT
/// EXISTS` must find it installed on the target, or be allowed to
/// install it: a superuser may, another role only a trusted extension
/// (PostgreSQL 13+) and with `CREATE` on the database.
async fn extension_findings(
    client: &Client,
    source: &SourceFacts,
    superuser: bool,
    version: i32,
    needs_create_on_database: &mut Vec<String>,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let trusted = if version >= 130000 {
        "coalesce((SELECT v.trusted FROM pg_available_extension_versions v \
                   WHERE v.name = a.name AND v.version = a.default_version), false)"
    } else {
        "false"
    };
    let available = client
        .query(
            &format!(
                "SELECT a.name::text, coalesce(a.installed_version, ''), coalesce(a.default_version, ''), {trusted} \
                 FROM pg_available_extensions a"
            ),
            &[],
        )
        .await?;
    let mut findings = Vec::new();
    let mut to_create = Vec::new();
    for extension in &source.extensions {
        let Some(row) = available.iter().find(|row| row.get::<_, String>(0) == extension.name) else {
            findings.push(error(
                "missing_extension",
                quote_ident(&extension.name),
                format!(
                    "the source uses extension {} {}, which the target cannot install: objects using it will not load",
                    extension.name, extension.version
                ),
                format!(
                    "install the extension on the target server (or ask the provider), or drop it from the source, \
                     or leave it out: walbridge start {}",
                    extension_skip(&extension.name)
                ),
            ));
            continue;
        };
        let (installed, default, trusted): (String, String, bool) = (row.get(1), row.get(2), row.get(3));
        let target_version = if installed.is_empty() { &default } else { &installed };
        if *target_version != extension.version {
            findings.push(warning(
                "extension_version",
                quote_ident(&extension.name),
                format!(
                    "the source has version {} of {}; the target {} {target_version}",
                    extension.version,
                    extension.name,
                    if installed.is_empty() { "would install" } else { "has" }
                ),
                format!("check {}'s release notes for differences", extension.name),
            ));
        }
        if !installed.is_empty() || superuser {
            continue;
        }
        if trusted {
            to_create.push(extension.name.clone());
        } else {
            findings.push(error(
                "extension_privilege",
                quote_ident(&extension.name),
                format!(
                    "extension {} is not installed on the target, and only a superuser may install it there (it is \
                     not a trusted extension{})",
                    extension.name,
                    if version < 130000 {
                        "; PostgreSQL 12 and older trust none"
                    } else {
                        ""
                    }
                ),
                format!(
                    "CREATE EXTENSION {}; -- on the target, as a superuser or the provider's way; or, if the \
                     application does not need it: walbridge start {}",
                    quote_ident(&extension.name),
                    extension_skip(&extension.name)
                ),
            ));
        }
    }
    if !to_create.is_empty() {
        needs_create_on_database.push(format!("it installs extension(s) {}", to_create.join(", ")));
    }
    Ok(findings)
}

fn extension_skip(name: &str) -> String {
    skip_argument(&walbridge_migration::script::Entry {
        kind: "EXTENSION".to_owned(),
        schema: None,
        name: name.to_owned(),
    })
}

/// The schemas the dump writes into: one it creates must not exist yet
/// (a leftover of an earlier attempt, most likely); one it does not
/// create (`public`) must exist and let the role create objects in it,
/// which `public` does not by default since PostgreSQL 15.
async fn schema_findings(
    client: &Client,
    source: &SourceFacts,
    superuser: bool,
    database_owner: &str,
    needs_create_on_database: &mut Vec<String>,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let names: Vec<&str> = source.schemas.iter().map(|s| s.name.as_str()).collect();
    let rows = client
        .query(
            "SELECT n.nspname::text, has_schema_privilege(n.oid, 'CREATE'), n.nspowner::regrole::text \
             FROM pg_namespace n WHERE n.nspname = ANY($1)",
            &[&names],
        )
        .await?;
    let user: String = client.query_one("SELECT current_user::text", &[]).await?.get(0);
    let user = quote_ident(&user);
    let mut findings = Vec::new();
    let mut to_create = Vec::new();
    for schema in &source.schemas {
        let quoted = quote_ident(&schema.name);
        let existing = rows.iter().find(|row| row.get::<_, String>(0) == schema.name);
        match (existing, schema.created_by_dump) {
            (Some(_), true) => findings.push(error(
                "leftover_schema",
                quoted.clone(),
                format!(
                    "schema {quoted} already exists on the target, and the schema dump creates it (CREATE SCHEMA \
                     {quoted}), which would fail: it may be a leftover of an earlier attempt (walbridge never drops \
                     what it created on the target)"
                ),
                format!("DROP SCHEMA {quoted} CASCADE; -- on the target, once you are sure it holds nothing you need"),
            )),
            (None, true) => to_create.push(quoted),
            (Some(row), false) if schema.has_objects && !superuser && !row.get::<_, bool>(1) => {
                let owner: String = row.get(2);
                let owner = if owner == "pg_database_owner" {
                    format!("{database_owner} (the database's owner)")
                } else {
                    owner
                };
                findings.push(error(
                    "schema_create_privilege",
                    quoted.clone(),
                    format!(
                        "role {user} may not create objects in schema {quoted}, where the schema dump creates some \
                         (since PostgreSQL 15, only the database's owner may create in public unless granted)"
                    ),
                    format!("GRANT CREATE ON SCHEMA {quoted} TO {user}; -- as {owner} or a superuser"),
                ));
            }
            (None, false) if schema.has_objects => findings.push(error(
                "missing_schema",
                quoted.clone(),
                format!(
                    "the schema dump creates objects in schema {quoted}, which the target lacks (pg_dump does not \
                     create it)"
                ),
                format!("CREATE SCHEMA {quoted}; -- on the target"),
            )),
            _ => {}
        }
    }
    if !to_create.is_empty() {
        needs_create_on_database.push(format!("the schema dump creates schema(s) {}", to_create.join(", ")));
    }
    Ok(findings)
}

/// Errors shown in `start`'s refusal; `preflight` lists them all.
const REFUSAL_ERRORS_SHOWN: usize = 5;
/// Characters of each.
const REFUSAL_ERROR_CHARS: usize = 300;

/// `start`'s refusal: how many errors, and the first few, kept short (a
/// gRPC status travels in HTTP/2 headers, whose size is limited).
pub fn refusal(findings: &[Finding]) -> Option<String> {
    let errors: Vec<&Finding> = findings.iter().filter(|f| f.is_error()).collect();
    if errors.is_empty() {
        return None;
    }
    let mut lines: Vec<String> = errors
        .iter()
        .take(REFUSAL_ERRORS_SHOWN)
        .map(|f| {
            let line = format!("{} {}: {}", f.check, f.object, f.message.replace('\n', " "));
            let mut short: String = line.chars().take(REFUSAL_ERROR_CHARS).collect();
            if line.chars().count() > REFUSAL_ERROR_CHARS {
                short.push_str(" ...");
            }
            short
        })
        .collect();
    if errors.len() > REFUSAL_ERRORS_SHOWN {
        lines.push(format!("... and {} more", errors.len() - REFUSAL_ERRORS_SHOWN));
    }
    Some(format!(
        "preflight found {} error(s); nothing was created. Run `walbridge preflight` (with the same options) for \
         all of them and their fixes.\n{}",
        errors.len(),
        lines.join("\n")
    ))
}

/// With `--privileges`: the roles the schema's GRANTs name that the target
/// lacks (each GRANT to one would fail), each with what creates it.
async fn missing_roles(client: &Client, roles: &[NamedRole]) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let names: Vec<&str> = roles.iter().map(|r| r.name.as_str()).collect();
    let present: Vec<String> = client
        .query("SELECT rolname::text FROM pg_roles WHERE rolname = ANY($1)", &[&names])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    Ok(roles
        .iter()
        .filter(|role| !present.contains(&role.name))
        .map(|role| {
            error(
                "missing_role",
                quote_ident(&role.name),
                format!(
                    "the schema's privileges name role {}, which the target lacks: carrying them (--privileges) \
                     would fail",
                    quote_ident(&role.name)
                ),
                role.create_statements(),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_refusal_stays_short_however_many_errors() {
        let findings: Vec<Finding> = (0..311)
            .map(|i| error("schema_statement", format!("TABLE public.t{i}"), "x".repeat(2000), ""))
            .chain(std::iter::once(warning("target_room", "", "a warning", "")))
            .collect();
        let refused = refusal(&findings).unwrap();
        assert!(
            refused.starts_with("preflight found 311 error(s); nothing was created."),
            "{refused}"
        );
        assert!(
            refused.contains("TABLE public.t4:") && !refused.contains("TABLE public.t5:"),
            "{refused}"
        );
        assert!(refused.ends_with("... and 306 more"), "{refused}");
        assert!(refused.len() < 2500, "{} bytes", refused.len());
        assert_eq!(refusal(&findings[311..]), None, "warnings alone refuse nothing");
    }
}
