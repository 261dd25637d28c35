//! The target's subscription: created after the copy, detached at
//! cutover, dropped at cleanup. Dropping never lets PostgreSQL try to drop
//! the remote slot (through a tunnel that may be gone): the slot is
//! detached first and the agent drops it.

use tokio_postgres::Client;
use walbridge_daemon::pg::Database;
use walbridge_migration::ident::{quote_ident, quote_literal};
use walbridge_proto::v1 as wire;

use crate::migration::{APPLICATION_NAME, MigrationRecord};
use walbridge_daemon::pg::describe;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Missing,
    /// Its apply worker is connected.
    Streaming,
    /// Enabled, but no apply worker right now (starting or retrying).
    Connecting,
    /// Disabled with its slot: nothing is applied.
    Disabled,
    /// Disabled and without a slot: the target stands alone.
    Detached,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Missing => "",
            State::Streaming => "streaming",
            State::Connecting => "connecting",
            State::Disabled => "disabled",
            State::Detached => "detached",
        }
    }
}

/// One session on the target; pass it to the functions below so a caller
/// that polls (cutover, status) does not connect per question.
pub async fn session(target: &Database) -> Result<Client, String> {
    target.connect(APPLICATION_NAME).await.map_err(|e| e.to_string())
}

/// A libpq connection-string value, quoted.
fn conninfo_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Creates the subscription unless it exists; returns its oid.
pub async fn create(
    target: &Database,
    record: &MigrationRecord,
    source: &wire::SubscriptionConnectionResponse,
    host: &str,
    port: u16,
) -> Result<u32, String> {
    let client = session(target).await?;
    if let Some(oid) = oid(&client, &record.subscription).await? {
        return Ok(oid);
    }
    let target_version = server_version(&client).await?;
    let source_version = source.server_version_num as i32;
    let mut conninfo = vec![
        format!("host={}", conninfo_value(host)),
        format!("port={port}"),
        format!("dbname={}", conninfo_value(&source.dbname)),
        format!("user={}", conninfo_value(&source.user)),
    ];
    if !source.password.is_empty() {
        conninfo.push(format!("password={}", conninfo_value(&source.password)));
    }
    let mut options = vec![
        "copy_data = false".to_owned(),
        "create_slot = false".to_owned(),
        format!("slot_name = {}", quote_literal(&record.slot)),
    ];
    // Not `disable_on_error`: PostgreSQL counts a dropped connection as an
    // error too, and the tunnel drops whenever the controller or the agent
    // restarts; a subscription that retries comes back on its own.
    // Large transactions are streamed while in progress, not spilled.
    if target_version >= 140000 && source_version >= 140000 {
        options.push("streaming = on".to_owned());
    }
    // Binary transfer is only safe between equal major versions.
    if target_version / 10000 == source_version / 10000 {
        options.push("binary = true".to_owned());
    }
    let statement = format!(
        "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} WITH ({})",
        quote_ident(&record.subscription),
        quote_literal(&conninfo.join(" ")),
        quote_ident(&record.publication),
        options.join(", ")
    );
    // The statement carries the password: only the server's message is
    // ever reported.
    client
        .batch_execute(&statement)
        .await
        .map_err(|e| format!("CREATE SUBSCRIPTION failed on the target: {}", describe(&e)))?;
    oid(&client, &record.subscription)
        .await?
        .ok_or_else(|| "the subscription vanished right after its creation".to_owned())
}

async fn server_version(client: &Client) -> Result<i32, String> {
    Ok(client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(|e| describe(&e))?
        .get(0))
}

async fn oid(client: &Client, name: &str) -> Result<Option<u32>, String> {
    Ok(client
        .query_opt(
            "SELECT oid FROM pg_subscription WHERE subname = $1 \
             AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&name],
        )
        .await
        .map_err(|e| describe(&e))?
        .map(|row| row.get(0)))
}

pub async fn state(client: &Client, name: &str) -> Result<State, String> {
    let row = client
        .query_opt(
            "SELECT s.subenabled, s.subslotname IS NULL, EXISTS (SELECT 1 FROM pg_stat_subscription st \
               WHERE st.subid = s.oid AND st.relid IS NULL AND st.pid IS NOT NULL) \
             FROM pg_subscription s WHERE s.subname = $1 \
             AND s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&name],
        )
        .await
        .map_err(|e| describe(&e))?;
    Ok(match row {
        None => State::Missing,
        Some(row) => match (row.get::<_, bool>(0), row.get::<_, bool>(1), row.get::<_, bool>(2)) {
            (_, true, _) => State::Detached,
            (false, false, _) => State::Disabled,
            (true, false, true) => State::Streaming,
            (true, false, false) => State::Connecting,
        },
    })
}

/// Its state and how many errors its workers have hit (PostgreSQL 15's
/// `pg_stat_subscription_stats`; 0 on older targets, which only log
/// them). The messages themselves are in the target's server log.
pub async fn health(client: &Client, name: &str) -> Result<(State, u64), String> {
    let state = state(client, name).await?;
    if state == State::Missing || server_version(client).await? < 150000 {
        return Ok((state, 0));
    }
    let errors = client
        .query_opt(
            "SELECT (apply_error_count + sync_error_count)::int8 FROM pg_stat_subscription_stats \
             WHERE subname = $1",
            &[&name],
        )
        .await
        .map_err(|e| describe(&e))?
        .map_or(0, |r| r.get::<_, i64>(0) as u64);
    Ok((state, errors))
}

/// Stops the subscription and forgets its slot: the target stands alone.
pub async fn detach(client: &Client, name: &str) -> Result<(), String> {
    for statement in [
        format!("ALTER SUBSCRIPTION {} DISABLE", quote_ident(name)),
        format!("ALTER SUBSCRIPTION {} SET (slot_name = NONE)", quote_ident(name)),
    ] {
        client
            .batch_execute(&statement)
            .await
            .map_err(|e| format!("{statement} failed on the target: {}", describe(&e)))?;
    }
    Ok(())
}

/// Drops the subscription (detaching it first) and its replication
/// origin if PostgreSQL left it behind. Says what it removed.
pub async fn remove(target: &Database, name: &str, oid: u32) -> Result<Vec<String>, String> {
    let client = session(target).await?;
    let mut removed = Vec::new();
    let current = state(&client, name).await?;
    if current != State::Missing {
        if current != State::Detached {
            detach(&client, name).await?;
        }
        client
            .batch_execute(&format!("DROP SUBSCRIPTION {}", quote_ident(name)))
            .await
            .map_err(|e| format!("DROP SUBSCRIPTION {name} failed on the target: {}", describe(&e)))?;
        removed.push(format!("subscription {name} on the target"));
    }
    if oid != 0 {
        let origin = format!("pg_{oid}");
        let leaked = client
            .query_opt("SELECT 1 FROM pg_replication_origin WHERE roname = $1", &[&origin])
            .await
            .map_err(|e| describe(&e))?
            .is_some();
        if leaked {
            client
                .execute("SELECT pg_replication_origin_drop($1)", &[&origin])
                .await
                .map_err(|e| format!("cannot drop replication origin {origin}: {}", describe(&e)))?;
            removed.push(format!("replication origin {origin} on the target"));
        }
    }
    Ok(removed)
}
