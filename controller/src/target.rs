//! Sessions on the target, one kind per purpose, each with the settings
//! that purpose needs whatever the server's or the role's defaults: bulk
//! work (copy, schema, checksums) is never cut off by a timeout, and
//! walbridge's short questions (status, the cutover's polls) never hang.

use tokio_postgres::Client;
use walbridge_daemon::pg::Database;
use walbridge_migration::copy::SESSION_SETTINGS;
use walbridge_migration::fault::Fault;

/// How every controller session names itself on the target.
pub const APPLICATION_NAME: &str = "walbridge-controller";

/// What a session is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// COPY into tables and checksums: rows rendered as the source renders them.
    Copy,
    /// pg_dump's script: its preamble is run by the caller.
    Schema,
    /// Questions that must come back quickly (status, the cutover).
    Control,
}

/// Bulk work must not be cut off by a role's or database's timeouts; it
/// does not wait for locks either, because its tables are its own.
const UNBOUNDED: &str = "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0; SET lock_timeout = 0";
/// A question that takes longer than this is stuck; so is one waiting
/// this long for a lock.
const BOUNDED: &str = "SET statement_timeout = '30s'; SET idle_in_transaction_session_timeout = 0; \
                       SET lock_timeout = '10s'";

/// Opens a session for `purpose`.
pub async fn connect(target: &Database, purpose: Purpose) -> Result<Client, Fault> {
    let client = target
        .connect(APPLICATION_NAME)
        .await
        .map_err(|e| crate::fault::connect(&e))?;
    let settings = match purpose {
        Purpose::Copy => format!("{UNBOUNDED}; {SESSION_SETTINGS}"),
        Purpose::Schema => UNBOUNDED.to_owned(),
        Purpose::Control => BOUNDED.to_owned(),
    };
    client
        .batch_execute(&settings)
        .await
        .map_err(|e| crate::fault::target("cannot prepare the target session", &e))?;
    Ok(client)
}
