//! Target-side preflight: what on the target would make the schema, the
//! copy or the subscription fail, given what the agent learned of the
//! source.

use tokio_postgres::Client;
use walbridge_migration::finding::{Finding, Side, SourceFacts};
use walbridge_migration::ident::quote_ident;

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
                    current_setting('max_replication_slots')::int4 \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    let version: i32 = row.get(0);
    let user: String = row.get(1);
    let superuser: bool = row.get(2);
    let workers: i32 = row.get(3);
    let slots: i32 = row.get(4);
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

    let available = client
        .query(
            "SELECT name::text, coalesce(default_version, '') FROM pg_available_extensions",
            &[],
        )
        .await?;
    for extension in &source.extensions {
        match available.iter().find(|row| row.get::<_, String>(0) == extension.name) {
            None => findings.push(error(
                "missing_extension",
                quote_ident(&extension.name),
                format!(
                    "the source uses extension {} {}, which the target cannot install: objects using it will not load",
                    extension.name, extension.version
                ),
                "install the extension on the target server (or ask the provider), or drop it from the source",
            )),
            Some(row) if row.get::<_, String>(1) != extension.version => findings.push(warning(
                "extension_version",
                quote_ident(&extension.name),
                format!(
                    "the source has version {} of {}; the target would install {}",
                    extension.version,
                    extension.name,
                    row.get::<_, String>(1)
                ),
                format!("check {}'s release notes for differences", extension.name),
            )),
            Some(_) => {}
        }
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
                "the table already exists on the target: the copy would mix its rows with the source's",
                format!("DROP TABLE {table}; -- on the target, or leave it out with --exclude"),
            ));
        }
    }

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
