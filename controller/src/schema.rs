//! The schema on the target: pg_dump's sections, streamed from the agent
//! (zstd chunks), split into statements and executed one at a time, so a
//! statement the target rejects is reported with its text and the
//! target's error, and stops the migration.

use futures_util::StreamExt;
use walbridge_daemon::pg::Database;
use walbridge_migration::ident::QualifiedName;
use walbridge_migration::script::{ScriptSplitter, Statement};
use walbridge_proto::convert::name_to_wire;
use walbridge_proto::v1 as wire;

use crate::migration::{APPLICATION_NAME, StepError};
use crate::registry::AgentClient;
use crate::transfer::decompress;
use walbridge_daemon::pg::describe;

/// Dumps one section in the snapshot and returns its statements.
pub async fn dump(
    agent: &AgentClient,
    snapshot: &str,
    section: &str,
    exclude: &[QualifiedName],
) -> Result<Vec<Statement>, StepError> {
    let mut stream = agent
        .clone()
        .dump_schema(wire::DumpSchemaRequest {
            snapshot: snapshot.to_owned(),
            section: section.to_owned(),
            exclude: exclude.iter().cloned().map(name_to_wire).collect(),
        })
        .await
        .map_err(|s| StepError::Failed(format!("cannot dump the {section} schema: {}", s.message())))?
        .into_inner();
    let mut splitter = ScriptSplitter::new();
    let mut statements = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|s| StepError::Failed(format!("dumping the {section} schema: {}", s.message())))?;
        let raw = decompress(&chunk).map_err(StepError::Failed)?;
        statements.extend(
            splitter
                .push(&raw)
                .map_err(|e| StepError::Failed(format!("the {section} schema dump: {e}")))?,
        );
    }
    statements.extend(
        splitter
            .finish()
            .map_err(|e| StepError::Failed(format!("the {section} schema dump: {e}")))?,
    );
    Ok(statements)
}

/// Applies statements in order on one session; the first rejected one
/// stops it.
pub async fn apply(target: &Database, statements: &[Statement]) -> Result<(), StepError> {
    let client = connect(target).await?;
    for statement in statements {
        client
            .batch_execute(&statement.text)
            .await
            .map_err(|e| rejected(&statement.text, statement.line, &e))?;
    }
    Ok(())
}

/// Executes one statement in a session of its own (post-data statements
/// are recorded done one by one).
pub async fn execute(target: &Database, statement: &str, index: usize) -> Result<(), StepError> {
    let client = connect(target).await?;
    client
        .batch_execute(statement)
        .await
        .map_err(|e| rejected(statement, index + 1, &e))
}

/// Materialized views arrive empty: fill them. One may read another, so
/// repeat while some succeed.
pub async fn refresh_materialized_views(target: &Database, views: &[QualifiedName]) -> Result<(), StepError> {
    let client = connect(target).await?;
    let mut pending: Vec<&QualifiedName> = views.iter().collect();
    while !pending.is_empty() {
        let mut failed = Vec::new();
        let mut last_error = String::new();
        for view in &pending {
            if let Err(e) = client
                .batch_execute(&format!("REFRESH MATERIALIZED VIEW {}", view.quoted()))
                .await
            {
                last_error = format!("REFRESH MATERIALIZED VIEW {view}: {}", describe(&e));
                failed.push(*view);
            }
        }
        if failed.len() == pending.len() {
            return Err(StepError::Failed(format!("the target rejected {last_error}")));
        }
        pending = failed;
    }
    Ok(())
}

async fn connect(target: &Database) -> Result<tokio_postgres::Client, StepError> {
    let client = target
        .connect(APPLICATION_NAME)
        .await
        .map_err(|e| StepError::Failed(e.to_string()))?;
    // pg_dump's scripts assume these.
    client
        .batch_execute(
            "SET client_encoding = 'UTF8'; SET standard_conforming_strings = on; SET check_function_bodies = false",
        )
        .await
        .map_err(|e| StepError::Failed(format!("cannot prepare the target session: {}", describe(&e))))?;
    Ok(client)
}

fn rejected(statement: &str, line: usize, error: &tokio_postgres::Error) -> StepError {
    let shown: String = statement.chars().take(2000).collect();
    StepError::Failed(format!(
        "the target rejected a schema statement (line {line} of the dump): {}\n{shown}",
        describe(error)
    ))
}
