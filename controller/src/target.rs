//! Sessions on the target, one kind per purpose, each with the settings
//! that purpose needs whatever the server's or the role's defaults: bulk
//! work (copy, schema, checksums) is never cut off by a timeout, and
//! walbridge's short questions (status, the cutover's polls) never hang.

use tokio_postgres::Client;
use walbridge_daemon::pg::{Database, SessionPolicy};
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

impl Purpose {
    /// The session policy of this purpose (`walbridge_daemon::pg::session`):
    /// bulk work is never cut off by a timeout and does not bound its lock
    /// waits either, because its tables are its own; a question that takes
    /// longer than 30 s is stuck, and so is one waiting 10 s for a lock.
    pub fn policy(self) -> SessionPolicy {
        match self {
            Purpose::Copy => SessionPolicy::UNBOUNDED.with_setup(SESSION_SETTINGS),
            Purpose::Schema => SessionPolicy::UNBOUNDED,
            Purpose::Control => SessionPolicy::BOUNDED,
        }
    }
}

/// Opens a session for `purpose`.
pub async fn connect(target: &Database, purpose: Purpose) -> Result<Client, Fault> {
    target
        .connect_with(APPLICATION_NAME, &purpose.policy())
        .await
        .map_err(|e| crate::fault::connect(&e))
}
