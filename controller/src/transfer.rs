//! Table data into the target: each table (or page range) streamed from
//! the agent in zstd chunks straight into `COPY ... FROM STDIN`, inside one
//! target transaction that empties the table first, so a copy is all or
//! nothing and copying again never duplicates rows. Also the checksums
//! that prove a copy exact.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, pin_mut};
use walbridge_daemon::pg::Database;
use walbridge_migration::copy;
use walbridge_migration::fault::Fault;
use walbridge_migration::ident::QualifiedName;
use walbridge_proto::convert::name_to_wire;
use walbridge_proto::v1 as wire;

use crate::bookkeeping;
use crate::migration::Compression;
use crate::registry::AgentClient;
use crate::target::{self, Purpose};

/// A chunk's bytes as the table holds them (a plain chunk is taken as it is).
pub fn decompress(chunk: wire::DataChunk) -> Result<Vec<u8>, Fault> {
    if chunk.plain {
        return Ok(chunk.data);
    }
    // raw_len bounds the allocation; a chunk is at most a few hundred kB.
    let capacity = usize::try_from(chunk.raw_len).map_err(|_| crate::fault::internal("a chunk too large arrived"))?;
    zstd::bulk::decompress(&chunk.data, capacity)
        .map_err(|e| crate::fault::internal(format!("a corrupt chunk arrived: {e}")))
}

/// [`decompress`] on a blocking thread: the async runtime's threads carry
/// every stream's I/O and must not spend a chunk's decompression on one.
async fn decompress_off_runtime(chunk: wire::DataChunk) -> Result<Vec<u8>, Fault> {
    if chunk.plain {
        return Ok(chunk.data);
    }
    tokio::task::spawn_blocking(move || decompress(chunk))
        .await
        .map_err(|e| crate::fault::internal(format!("decompression stopped: {e}")))?
}

/// What one copy moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Copied {
    pub rows: u64,
    /// Bytes of COPY text, as the tables hold them.
    pub bytes: u64,
    /// Bytes that crossed the link (zstd-compressed).
    pub wire_bytes: u64,
}

/// Copies one table, or one page range of it, in one target transaction
/// that also records the unit done (`bookkeeping`): a copy that committed
/// just before a crash is known to the target and never done twice. A
/// whole table is emptied inside that transaction too.
/// `progress` hears the increments as they arrive.
#[allow(clippy::too_many_arguments)]
pub async fn copy_table(
    agent: &AgentClient,
    target: &Database,
    attempt: &str,
    snapshot: &str,
    table: &QualifiedName,
    columns: &[String],
    range: Option<copy::PageRange>,
    compression: Compression,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Copied, Fault> {
    let client = target::connect(target, Purpose::Copy).await?;
    let begin = match range {
        None => format!("BEGIN; TRUNCATE ONLY {}", table.quoted()),
        Some(_) => "BEGIN".to_owned(),
    };
    client
        .batch_execute(&begin)
        .await
        .map_err(|e| crate::fault::target(format!("cannot empty {table} on the target"), &e))?;
    let mut stream = agent
        .clone()
        .copy_table(wire::CopyTableRequest {
            snapshot: snapshot.to_owned(),
            table: Some(name_to_wire(table.clone())),
            columns: columns.to_vec(),
            first_page: range.map_or(0, |r| r.first_page),
            end_page: range.map_or(0, |r| r.end_page),
            compression: compression.to_wire() as i32,
        })
        .await
        .map_err(|s| crate::fault::agent(format!("copy of {table} failed on the source"), &s))?
        .into_inner();
    let sink = client
        // A whole table is emptied in this transaction, so its rows may be
        // written frozen; a page range shares the table with other ranges.
        .copy_in::<_, Bytes>(&copy::copy_in(table, columns, range.is_none()))
        .await
        .map_err(|e| crate::fault::target(format!("COPY into {table} failed on the target"), &e))?;
    pin_mut!(sink);
    let (mut bytes, mut wire_bytes) = (0u64, 0u64);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|s| crate::fault::agent(format!("copy of {table} failed"), &s))?;
        wire_bytes += chunk.data.len() as u64;
        let raw = decompress_off_runtime(chunk).await?;
        bytes += raw.len() as u64;
        progress(0, raw.len() as u64);
        sink.send(Bytes::from(raw))
            .await
            .map_err(|e| crate::fault::target(format!("COPY into {table} failed on the target"), &e))?;
    }
    let rows = sink
        .finish()
        .await
        .map_err(|e| crate::fault::target(format!("COPY into {table} failed on the target"), &e))?;
    let unit = bookkeeping::CopiedUnit {
        first_page: range.map_or(0, |r| r.first_page),
        rows,
        bytes,
        wire_bytes,
    };
    bookkeeping::record_unit(&client, attempt, table, unit)
        .await
        .map_err(|e| crate::fault::target(format!("cannot record the copy of {table} on the target"), &e))?;
    client
        .batch_execute("COMMIT")
        .await
        .map_err(|e| crate::fault::target(format!("commit of {table} failed on the target"), &e))?;
    progress(rows, 0);
    Ok(Copied {
        rows,
        bytes,
        wire_bytes,
    })
}

/// Row counts and checksums of one table on both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    pub source: (u64, String),
    pub target: (u64, String),
}

impl Comparison {
    pub fn matches(&self) -> bool {
        self.source == self.target
    }
}

/// Compares one table: the source read in `snapshot` (or a fresh snapshot
/// when empty), the target as committed. Floats are rendered alike on both
/// sides whatever their majors (`copy::checksum_rounds_floats`); a source
/// version of 0 (not known) is taken as one that needs it.
pub async fn compare(
    agent: &AgentClient,
    target: &Database,
    source_version_num: u32,
    snapshot: &str,
    table: &QualifiedName,
    columns: &[String],
) -> Result<Comparison, Fault> {
    let client = target::connect(target, Purpose::Copy).await?;
    let target_version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await
        .map_err(|e| crate::fault::target(format!("checksum of {table} failed on the target"), &e))?
        .get(0);
    let round_floats = copy::checksum_rounds_floats(source_version_num, target_version.try_into().unwrap_or(0));
    let mut agent = agent.clone();
    let source = agent.checksum(wire::ChecksumRequest {
        snapshot: snapshot.to_owned(),
        table: Some(name_to_wire(table.clone())),
        columns: columns.to_vec(),
        round_floats,
    });
    let target = async {
        client
            .batch_execute(copy::checksum_setup(round_floats))
            .await
            .map_err(|e| crate::fault::target(format!("checksum of {table} failed on the target"), &e))?;
        let row = client
            .query_one(&copy::checksum(table, columns), &[])
            .await
            .map_err(|e| crate::fault::target(format!("checksum of {table} failed on the target"), &e))?;
        Ok::<_, Fault>((row.get::<_, i64>(0) as u64, row.get::<_, String>(1)))
    };
    let (source, target) = tokio::join!(source, target);
    let source = source
        .map_err(|s| crate::fault::agent(format!("checksum of {table} failed on the source"), &s))?
        .into_inner();
    Ok(Comparison {
        source: (source.rows, source.checksum),
        target: target?,
    })
}

/// Gathers the planner's statistics of a copied table on the target, so
/// that the first plans after the cutover are not those of an empty table
/// (autovacuum would get there, minutes later). Safe to repeat.
pub async fn analyze(target: &Database, table: &QualifiedName) -> Result<(), Fault> {
    let client = target::connect(target, Purpose::Copy).await?;
    client
        .batch_execute(&format!("ANALYZE {}", table.quoted()))
        .await
        .map_err(|e| crate::fault::target(format!("ANALYZE of {table} failed on the target"), &e))
}

/// Empties tables on the target (all in one statement: they may refer to
/// one another).
pub async fn truncate(target: &Database, tables: &[QualifiedName]) -> Result<(), Fault> {
    let client = target::connect(target, Purpose::Copy).await?;
    let list = tables.iter().map(QualifiedName::quoted).collect::<Vec<_>>().join(", ");
    client
        .batch_execute(&format!("TRUNCATE ONLY {list}"))
        .await
        .map_err(|e| crate::fault::target("cannot empty the copied tables on the target", &e))
}
