//! What walbridge records on the target itself, in the same transaction as
//! the work it records: pre-data applied, each post-data statement
//! applied, each table or page range copied (with its figures). A crash between that commit and
//! the journal's write can then never make a resumed step repeat the
//! work: the target knows what it has. The schema is walbridge's own and
//! is dropped when the migration is cleaned up or aborted.

use tokio_postgres::Client;
use walbridge_migration::fault::Fault;
use walbridge_migration::ident::QualifiedName;

/// walbridge's schema on the target.
pub const SCHEMA: &str = walbridge_migration::mark::STATE_SCHEMA;

/// Creates the schema and its tables if missing.
pub async fn ensure(client: &Client) -> Result<(), Fault> {
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {SCHEMA}; \
             CREATE TABLE IF NOT EXISTS {SCHEMA}.pre_data (migration text PRIMARY KEY); \
             CREATE TABLE IF NOT EXISTS {SCHEMA}.post_data ( \
               migration text NOT NULL, statement int4 NOT NULL, PRIMARY KEY (migration, statement)); \
             CREATE TABLE IF NOT EXISTS {SCHEMA}.copied ( \
               attempt text NOT NULL, table_name text NOT NULL, first_page int8 NOT NULL, \
               rows int8 NOT NULL, bytes int8 NOT NULL, wire_bytes int8 NOT NULL, \
               PRIMARY KEY (attempt, table_name, first_page))"
        ))
        .await
        .map_err(|e| crate::fault::target(format!("cannot create walbridge's schema {SCHEMA} on the target"), &e))
}

/// Whether the migration's pre-data is committed on the target. Asks
/// without creating anything: before pre-data, walbridge has made nothing
/// on the target.
pub async fn pre_data_applied(client: &Client, migration: &str) -> Result<bool, Fault> {
    let fail = |e: tokio_postgres::Error| crate::fault::target("cannot read whether pre-data is applied", &e);
    let recorded = client
        .query_one(&format!("SELECT to_regclass('{SCHEMA}.pre_data') IS NOT NULL"), &[])
        .await
        .map_err(fail)?
        .get::<_, bool>(0);
    if !recorded {
        return Ok(false);
    }
    client
        .query_opt(
            &format!("SELECT 1 FROM {SCHEMA}.pre_data WHERE migration = $1"),
            &[&migration],
        )
        .await
        .map(|row| row.is_some())
        .map_err(fail)
}

/// Records the migration's pre-data applied: call inside its transaction.
pub async fn record_pre_data(client: &Client, migration: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            &format!("INSERT INTO {SCHEMA}.pre_data (migration) VALUES ($1)"),
            &[&migration],
        )
        .await
        .map(drop)
}

/// The post-data statements (by index) applied so far.
pub async fn applied_statements(client: &Client, migration: &str) -> Result<Vec<usize>, Fault> {
    let rows = client
        .query(
            &format!("SELECT statement FROM {SCHEMA}.post_data WHERE migration = $1"),
            &[&migration],
        )
        .await
        .map_err(|e| crate::fault::target("cannot read the post-data statements applied", &e))?;
    Ok(rows.iter().map(|r| r.get::<_, i32>(0) as usize).collect())
}

/// Records statement `index` applied: call inside its transaction.
pub async fn record_statement(client: &Client, migration: &str, index: usize) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            &format!("INSERT INTO {SCHEMA}.post_data (migration, statement) VALUES ($1, $2)"),
            &[&migration, &(index as i32)],
        )
        .await
        .map(drop)
}

/// One unit of a table's copy that committed, with what it moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopiedUnit {
    pub first_page: u64,
    pub rows: u64,
    pub bytes: u64,
    pub wire_bytes: u64,
}

/// Every unit the copy `attempt` (named by its slot: a new snapshot is a
/// new attempt) has copied so far, by table.
pub async fn copied_units(client: &Client, attempt: &str) -> Result<Vec<(String, CopiedUnit)>, Fault> {
    let rows = client
        .query(
            &format!("SELECT table_name, first_page, rows, bytes, wire_bytes FROM {SCHEMA}.copied WHERE attempt = $1"),
            &[&attempt],
        )
        .await
        .map_err(|e| crate::fault::target("cannot read the units copied", &e))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                CopiedUnit {
                    first_page: r.get::<_, i64>(1) as u64,
                    rows: r.get::<_, i64>(2) as u64,
                    bytes: r.get::<_, i64>(3) as u64,
                    wire_bytes: r.get::<_, i64>(4) as u64,
                },
            )
        })
        .collect())
}

/// Records a unit copied: call inside the transaction of its COPY.
pub async fn record_unit(
    client: &Client,
    attempt: &str,
    table: &QualifiedName,
    unit: CopiedUnit,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            &format!(
                "INSERT INTO {SCHEMA}.copied (attempt, table_name, first_page, rows, bytes, wire_bytes) \
                 VALUES ($1, $2, $3, $4, $5, $6)"
            ),
            &[
                &attempt,
                &table.to_string(),
                &(unit.first_page as i64),
                &(unit.rows as i64),
                &(unit.bytes as i64),
                &(unit.wire_bytes as i64),
            ],
        )
        .await
        .map(drop)
}

/// Drops walbridge's schema; says whether it was there.
pub async fn remove(client: &Client) -> Result<bool, Fault> {
    let existed = client
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&SCHEMA])
        .await
        .map_err(|e| crate::fault::target("cannot look for walbridge's schema", &e))?
        .is_some();
    if existed {
        client
            .batch_execute(&format!("DROP SCHEMA {SCHEMA} CASCADE"))
            .await
            .map_err(|e| crate::fault::target(format!("cannot drop walbridge's schema {SCHEMA}"), &e))?;
    }
    Ok(existed)
}
