//! The schema on the target: pg_dump's sections, streamed from the agent
//! (zstd chunks), split into statements and executed one at a time, so a
//! statement the target rejects is reported with its text and the
//! target's error, and stops the migration.
//!
//! Pre-data is applied in one transaction: a statement the target rejects
//! rolls all of it back, so a failed attempt leaves nothing behind and
//! `start` can simply be run again. Each table, sequence and index it
//! creates holds a lock until the commit, so a schema of thousands of
//! tables needs room for them in the target's lock table
//! (`max_locks_per_transaction`); running out is reported as such, with
//! nothing created. Post-data runs statement by statement (each recorded
//! on the target with its commit), so it needs no such room.

use futures_util::StreamExt;
use walbridge_daemon::pg::Database;
use walbridge_migration::ident::QualifiedName;
use walbridge_migration::script::{ScriptSplitter, Statement};
use walbridge_proto::convert::name_to_wire;
use walbridge_proto::v1 as wire;

use walbridge_migration::fault::Fault;

use crate::bookkeeping;
use crate::registry::AgentClient;
use crate::target::{self, Purpose};
use crate::transfer::decompress;
use walbridge_daemon::pg::describe;

/// Dumps one section in the snapshot (in a fresh one of pg_dump's own
/// when `snapshot` is empty) and returns its statements.
pub async fn dump(
    agent: &AgentClient,
    snapshot: &str,
    section: &str,
    exclude: &[QualifiedName],
    privileges: bool,
) -> Result<Vec<Statement>, Fault> {
    dump_request(
        agent,
        wire::DumpSchemaRequest {
            snapshot: snapshot.to_owned(),
            section: section.to_owned(),
            exclude: exclude.iter().cloned().map(name_to_wire).collect(),
            privileges,
            only: Vec::new(),
        },
    )
    .await
}

/// One section of just these tables, dumped now (no snapshot).
pub async fn dump_tables(
    agent: &AgentClient,
    section: &str,
    tables: &[QualifiedName],
    privileges: bool,
) -> Result<Vec<Statement>, Fault> {
    dump_request(
        agent,
        wire::DumpSchemaRequest {
            snapshot: String::new(),
            section: section.to_owned(),
            exclude: Vec::new(),
            privileges,
            only: tables.iter().cloned().map(name_to_wire).collect(),
        },
    )
    .await
}

async fn dump_request(agent: &AgentClient, request: wire::DumpSchemaRequest) -> Result<Vec<Statement>, Fault> {
    let section = request.section.clone();
    let mut stream = agent
        .clone()
        .dump_schema(request)
        .await
        .map_err(|s| crate::fault::agent(format!("cannot dump the {section} schema"), &s))?
        .into_inner();
    let mut splitter = ScriptSplitter::new();
    let mut statements = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|s| crate::fault::agent(format!("dumping the {section} schema"), &s))?;
        let raw = decompress(chunk)?;
        statements.extend(
            splitter
                .push(&raw)
                .map_err(|e| crate::fault::internal(format!("the {section} schema dump: {e}")))?,
        );
    }
    statements.extend(
        splitter
            .finish()
            .map_err(|e| crate::fault::internal(format!("the {section} schema dump: {e}")))?,
    );
    Ok(statements)
}

/// Applies schema statements in order in one transaction: all of them, or
/// (the first rejected one stops it) none. With `pre_data_of`, the
/// transaction also records that migration's pre-data applied
/// (`bookkeeping`, whose schema it creates), so a crash after its commit
/// never applies it twice.
pub async fn apply_in_one_transaction(
    target: &Database,
    statements: &[Statement],
    pre_data_of: Option<&str>,
) -> Result<(), Fault> {
    let client = connect(target).await?;
    let begun = client.batch_execute("BEGIN").await;
    begun.map_err(|e| crate::fault::target("cannot begin the pre-data transaction", &e))?;
    // walbridge's own schema comes and goes with pre-data: a pre-data the
    // target rejects leaves nothing at all.
    if let Err(fault) = bookkeeping::ensure(&client).await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(fault);
    }
    for (done, statement) in statements.iter().enumerate() {
        if !setting_exists(&client, &statement.text).await? {
            continue;
        }
        if let Err(e) = client.batch_execute(&statement.text).await {
            let _ = client.batch_execute("ROLLBACK").await;
            let why = if is_lock_table_full(&e) {
                format!(
                    "the target's lock table is full after {done} of {} pre-data statements: pre-data runs in one \
                     transaction, which holds a lock on every object it creates until it commits; raise \
                     max_locks_per_transaction on the target (then restart it), or migrate fewer tables at once \
                     (--tables). ",
                    statements.len()
                )
            } else {
                String::new()
            };
            return Err(Fault::new(
                crate::fault::target_kind(&e),
                format!(
                    "{why}{}\nPre-data was rolled back: nothing of it remains on the target.",
                    rejected(statement, &e)
                ),
            ));
        }
    }
    if let Some(migration) = pre_data_of
        && let Err(e) = bookkeeping::record_pre_data(&client, migration).await
    {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(crate::fault::target("cannot record pre-data applied on the target", &e));
    }
    client
        .batch_execute("COMMIT")
        .await
        .map_err(|e| crate::fault::target("the target could not commit pre-data", &e))
}

/// False for a session setting of a parameter the target does not have:
/// pg_dump writes those of its own version's servers (`SET
/// transaction_timeout = 0` from pg_dump 17), and a server without the
/// parameter has no value of it to neutralise. True for anything else.
pub async fn setting_exists(client: &tokio_postgres::Client, statement: &str) -> Result<bool, Fault> {
    let Some(name) = walbridge_migration::script::session_setting_name(statement) else {
        return Ok(true);
    };
    Ok(client
        .query_one("SELECT EXISTS (SELECT 1 FROM pg_settings WHERE name = $1)", &[&name])
        .await
        .map_err(|e| crate::fault::target("cannot read the target's settings", &e))?
        .get(0))
}

/// PostgreSQL's answer when its shared lock table has no room left.
pub fn is_lock_table_full(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&tokio_postgres::error::SqlState::OUT_OF_MEMORY)
}

/// Materialized views arrive empty: fill them. One may read another, so
/// repeat while some succeed.
pub async fn refresh_materialized_views(target: &Database, views: &[QualifiedName]) -> Result<(), Fault> {
    let client = connect(target).await?;
    let mut pending: Vec<&QualifiedName> = views.iter().collect();
    while !pending.is_empty() {
        let mut failed = Vec::new();
        let mut last_error = None;
        for view in &pending {
            if let Err(e) = client
                .batch_execute(&format!("REFRESH MATERIALIZED VIEW {}", view.quoted()))
                .await
            {
                last_error = Some(crate::fault::target(
                    format!("the target rejected REFRESH MATERIALIZED VIEW {view}"),
                    &e,
                ));
                failed.push(*view);
            }
        }
        if failed.len() == pending.len() {
            return Err(last_error.expect("a refresh failed"));
        }
        pending = failed;
    }
    Ok(())
}

/// A target session set up as pg_dump's scripts assume.
pub async fn connect(target: &Database) -> Result<tokio_postgres::Client, Fault> {
    let client = target::connect(target, Purpose::Schema).await?;
    // pg_dump's scripts assume these.
    client
        .batch_execute(
            "SET client_encoding = 'UTF8'; SET standard_conforming_strings = on; SET check_function_bodies = false",
        )
        .await
        .map_err(|e| crate::fault::target("cannot prepare the target session", &e))?;
    Ok(client)
}

pub fn rejected(statement: &Statement, error: &tokio_postgres::Error) -> String {
    let shown: String = statement.text.chars().take(2000).collect();
    let entry = statement
        .entry
        .as_ref()
        .map(|e| format!(", {}", e.label()))
        .unwrap_or_default();
    format!(
        "the target rejected a schema statement (line {} of the dump{entry}): {}\n{shown}",
        statement.line,
        describe(error)
    )
}
