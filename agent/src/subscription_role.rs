//! The role the target's subscription logs in to the source as.
//!
//! A subscription owned by a non-superuser must carry its password in the
//! connection string, and when `CREATE SUBSCRIPTION` fails the target's
//! server log records the whole statement, password included, in a log the
//! provider owns. So the subscription never uses the agent's own role:
//! walbridge creates one for each migration (and each preflight probe),
//! `LOGIN REPLICATION` and nothing else, with a password generated for it
//! and set anew whenever a subscription is about to be created, and drops
//! it with the migration. A logged password is then worthless. The password
//! reaches the source only as a SCRAM verifier, so the source's own log
//! cannot hold it either.
//!
//! Where the agent's role may not create replication roles (before
//! PostgreSQL 16 only a superuser may; from 16 it needs CREATEROLE and
//! REPLICATION), the operator names a role made for the purpose
//! (`subscription.user`, `subscription.password`).

use tokio_postgres::Client;
use walbridge_daemon::pg::describe;
use walbridge_migration::finding::{Finding, Side};
use walbridge_migration::ident::{quote_ident, quote_literal};
use walbridge_migration::role_settings;

pub const SUBSCRIPTION_USER: &str = "subscription.user";
pub const SUBSCRIPTION_PASSWORD: &str = "subscription.password";

/// Bytes of randomness in a generated password (hex-encoded: 64 characters).
const PASSWORD_BYTES: usize = 32;

/// Who the subscription logs in as.
#[derive(Clone, Default)]
pub enum SubscriptionRole {
    /// walbridge creates a role per migration.
    #[default]
    PerMigration,
    /// A role the operator made for the subscription.
    Configured { user: String, password: String },
}

impl std::fmt::Debug for SubscriptionRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubscriptionRole::PerMigration => f.write_str("PerMigration"),
            SubscriptionRole::Configured { user, .. } => write!(f, "Configured({user})"),
        }
    }
}

/// A role ready for a subscription, with the password to use now.
pub struct Credentials {
    pub user: String,
    pub password: String,
    /// walbridge made this role (and drops it with the migration).
    pub created: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error("{0}")]
    NotAllowed(String),
    #[error("{1}")]
    Database(walbridge_migration::fault::FaultKind, String),
}

/// Makes sure the subscription's role exists and returns its credentials:
/// the configured role as it is, or walbridge's role `name`, created (or
/// given a new password, if it is left from an earlier call) now.
pub async fn ensure(client: &Client, role: &SubscriptionRole, name: &str) -> Result<Credentials, RoleError> {
    if let SubscriptionRole::Configured { user, password } = role {
        return Ok(Credentials {
            user: user.clone(),
            password: password.clone(),
            created: false,
        });
    }
    if !name.starts_with("walbridge_") {
        return Err(RoleError::NotAllowed(format!(
            "{name:?} is not a walbridge role name: walbridge only manages roles named walbridge_*"
        )));
    }
    let password = generate_password()?;
    let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
    let exists = client
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
        .await
        .map_err(|e| RoleError::Database(crate::fault::kind_of(&e), describe(&e)))?
        .is_some();
    let statement = if exists {
        format!("ALTER ROLE {} PASSWORD {}", quote_ident(name), quote_literal(&verifier))
    } else {
        format!(
            "CREATE ROLE {} LOGIN REPLICATION PASSWORD {}",
            quote_ident(name),
            quote_literal(&verifier)
        )
    };
    client.batch_execute(&statement).await.map_err(|e| {
        let text = describe(&e);
        if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
            RoleError::NotAllowed(format!(
                "cannot create the subscription's role {name}: {text}; set subscription.user and \
                 subscription.password to a role made for the subscription"
            ))
        } else {
            RoleError::Database(
                crate::fault::kind_of(&e),
                format!("cannot create the subscription's role {name}: {text}"),
            )
        }
    })?;
    Ok(Credentials {
        user: name.to_owned(),
        password,
        created: true,
    })
}

/// Drops walbridge's role `name` if it exists; says whether it did. Its
/// sessions (the subscription's walsender, once the subscription is gone)
/// end first where the agent may end them.
pub async fn remove(client: &Client, name: &str) -> Result<bool, String> {
    if !name.starts_with("walbridge_") {
        return Err(format!("{name:?} is not a walbridge role: not dropped"));
    }
    let exists = client
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
        .await
        .map_err(|e| describe(&e))?
        .is_some();
    if !exists {
        return Ok(false);
    }
    // A walsender still running as the role would keep it logged in after
    // the drop; ending it may be refused (not a member, no
    // pg_signal_backend), which only delays its end.
    let _ = client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            &[&name],
        )
        .await;
    client
        .batch_execute(&format!("DROP ROLE IF EXISTS {}", quote_ident(name)))
        .await
        .map_err(|e| format!("cannot drop role {name}: {}", describe(&e)))?;
    Ok(true)
}

/// What preflight says about the subscription's role.
pub async fn check(client: &Client, role: &SubscriptionRole) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let mut findings = settings_findings(client, role).await?;
    match role {
        SubscriptionRole::Configured { user, password } => {
            let row = client
                .query_opt(
                    "SELECT rolcanlogin, rolreplication OR rolsuper FROM pg_roles WHERE rolname = $1",
                    &[user],
                )
                .await?;
            match row {
                None => findings.push(Finding::error(
                    Side::Source,
                    "subscription_role",
                    quote_ident(user),
                    format!(
                        "subscription.user names role {}, which does not exist on the source",
                        quote_ident(user)
                    ),
                    format!("CREATE ROLE {} LOGIN REPLICATION PASSWORD '...';", quote_ident(user)),
                )),
                Some(row) if !(row.get::<_, bool>(0) && row.get::<_, bool>(1)) => findings.push(Finding::error(
                    Side::Source,
                    "subscription_role",
                    quote_ident(user),
                    format!(
                        "role {} (subscription.user) needs LOGIN and REPLICATION to stream changes to the target",
                        quote_ident(user)
                    ),
                    format!("ALTER ROLE {} LOGIN REPLICATION;", quote_ident(user)),
                )),
                Some(_) => {}
            }
            if password.is_empty() {
                findings.push(Finding::error(
                    Side::Source,
                    "subscription_role",
                    SUBSCRIPTION_PASSWORD,
                    "subscription.user is set without subscription.password: a subscription owned by a \
                     non-superuser must authenticate with a password",
                    "set subscription.password (WALBRIDGE_SUBSCRIPTION_PASSWORD) on the agent",
                ));
            }
        }
        SubscriptionRole::PerMigration => {
            let row = client
                .query_one(
                    "SELECT current_user::text, rolsuper, rolcreaterole, rolreplication, \
                            current_setting('server_version_num')::int4 \
                     FROM pg_roles WHERE rolname = current_user",
                    &[],
                )
                .await?;
            let (user, superuser, createrole, replication, version): (String, bool, bool, bool, i32) =
                (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
            let may_create = superuser || (version >= 160000 && createrole && replication);
            if !may_create {
                let why = if version >= 160000 {
                    "PostgreSQL 16 and later need CREATEROLE and REPLICATION for that"
                } else {
                    "before PostgreSQL 16 only a superuser may create replication roles"
                };
                let grant = if version >= 160000 {
                    format!("ALTER ROLE {} CREATEROLE; -- or ", quote_ident(&user))
                } else {
                    String::new()
                };
                findings.push(Finding::error(
                    Side::Source,
                    "subscription_role",
                    quote_ident(&user),
                    format!(
                        "the subscription logs in as a role of its own, so that the password the target's server \
                         may log is worthless after the migration; role {} may not create it ({why})",
                        quote_ident(&user)
                    ),
                    format!(
                        "{grant}CREATE ROLE walbridge_subscriber LOGIN REPLICATION PASSWORD '...'; and set the \
                         agent's subscription.user = walbridge_subscriber and subscription.password (drop the \
                         role after the migration)"
                    ),
                ));
            }
        }
    }
    Ok(findings)
}

/// The settings made for the subscription's role (or, for walbridge's
/// own role, which does not exist yet, for the database) that would cut
/// its walsender off: walbridge's session policy does not reach a
/// session the target's server opens.
async fn settings_findings(client: &Client, role: &SubscriptionRole) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let name = match role {
        SubscriptionRole::Configured { user, .. } => user.clone(),
        SubscriptionRole::PerMigration => String::new(),
    };
    let database: String = client.query_one("SELECT current_database()::text", &[]).await?.get(0);
    let rows: Vec<role_settings::RoleSetting> = client
        .query(role_settings::SQL, &[&name])
        .await?
        .iter()
        .map(|row| role_settings::RoleSetting {
            name: row.get(0),
            value: row.get(1),
            precedence: row.get(2),
        })
        .collect();
    let mut findings = Vec::new();
    if let Some(set) = role_settings::in_force(&rows, "wal_sender_timeout")
        && role_settings::milliseconds(&set.value)
            .is_some_and(|ms| ms > 0.0 && ms < crate::preflight::WAL_SENDER_TIMEOUT_MIN_MS as f64)
    {
        let who = if name.is_empty() {
            "walbridge's subscription role".to_owned()
        } else {
            format!("role {} (subscription.user)", quote_ident(&name))
        };
        let fix = if name.is_empty() {
            format!(
                "ALTER DATABASE {} RESET wal_sender_timeout; -- or set subscription.user to a role given {}",
                quote_ident(&database),
                role_settings::fix("<that role>", &database, "wal_sender_timeout", "60s")
            )
        } else {
            role_settings::fix(&name, &database, "wal_sender_timeout", "60s")
        };
        findings.push(Finding::warning(
            Side::Source,
            "subscription_role_settings",
            "wal_sender_timeout",
            format!(
                "{who} gets wal_sender_timeout = {} from {}: its walsender drops a subscriber busy applying a large \
                 transaction, which then starts again",
                set.value,
                set.origin(&name, &database)
            ),
            fix,
        ));
    }
    Ok(findings)
}

fn generate_password() -> Result<String, RoleError> {
    let mut bytes = [0u8; PASSWORD_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| {
        RoleError::Database(
            walbridge_migration::fault::FaultKind::Internal,
            format!("no randomness for a password: {e}"),
        )
    })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_long_random_and_hex() {
        let a = generate_password().unwrap();
        let b = generate_password().unwrap();
        assert_eq!(a.len(), PASSWORD_BYTES * 2);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn a_configured_role_never_shows_its_password() {
        let role = SubscriptionRole::Configured {
            user: "sub".into(),
            password: "s3cret".into(),
        };
        assert!(!format!("{role:?}").contains("s3cret"));
    }
}
