//! What the agent can see of the source database, asked fresh each time:
//! a probe opens its own short session, so an idle agent holds no backend.

use walbridge_daemon::pg::{Database, SessionError, SessionPolicy};
use walbridge_migration::copy::SESSION_SETTINGS;

pub const APPLICATION_NAME: &str = "walbridge-agent";

/// Short questions and small changes on the source (probes, status, the
/// publication, roles, drops): they come back quickly or give up, and
/// never hold a lock long enough to queue the application behind it.
pub const QUESTIONS: SessionPolicy = SessionPolicy::BOUNDED;
/// Catalog reads whose length grows with the schema (preflight, the list
/// of tables): never cut off by a role's timeouts.
pub const CATALOG: SessionPolicy = SessionPolicy::UNBOUNDED;
/// Sessions reading the exported snapshot (COPY, checksums): never cut
/// off, idle in their transaction between statements, rows rendered as
/// the target renders them.
pub const SNAPSHOT_READS: SessionPolicy = SessionPolicy::UNBOUNDED.with_setup(SESSION_SETTINGS);

/// The source as the agent sees it right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceStatus {
    /// Why the source could not be reached (`None` when it could).
    pub unreachable: Option<String>,
    pub server_version: String,
    pub server_version_num: u32,
    pub system_identifier: u64,
    pub database: String,
}

/// Connects to the source and reads who it is. Never fails: an unreachable
/// source is a status, not an error.
pub async fn probe(source: &Database) -> SourceStatus {
    match try_probe(source).await {
        Ok(status) => status,
        Err(e) => SourceStatus {
            unreachable: Some(e.to_string()),
            database: source.database_name().to_owned(),
            ..SourceStatus::default()
        },
    }
}

async fn try_probe(source: &Database) -> Result<SourceStatus, SessionError> {
    let client = source.connect_with(APPLICATION_NAME, &QUESTIONS).await?;
    let row = client
        .query_one(
            "SELECT current_setting('server_version'), \
                    current_setting('server_version_num')::int4, \
                    (SELECT system_identifier FROM pg_control_system()), \
                    current_database()::text",
            &[],
        )
        .await?;
    Ok(SourceStatus {
        unreachable: None,
        server_version: row.get(0),
        server_version_num: row.get::<_, i32>(1).try_into().unwrap_or_default(),
        system_identifier: row.get::<_, i64>(2) as u64,
        database: row.get(3),
    })
}
