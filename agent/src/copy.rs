//! What the agent streams to the controller: `pg_dump` sections and table
//! data, read in the exported snapshot, in zstd-compressed chunks, and
//! checksums computed the same way the controller computes them.
//!
//! Each stream runs in a task that feeds a small bounded channel, so a slow
//! controller slows the read from the source (backpressure end to end) and
//! memory stays bounded whatever the table's size.

use std::process::Stdio;

use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, pin_mut};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_postgres::Client;
use tonic::Status;
use walbridge_daemon::pg::{Database, SessionPolicy, describe};
use walbridge_migration::copy::{self, PageRange};
use walbridge_migration::fault::{Fault, FaultKind};
use walbridge_migration::ident::{QualifiedName, quote_literal};
use walbridge_proto::v1 as wire;

use crate::fault;
use crate::pg_dump::PgDumpChoice;
use crate::source::{APPLICATION_NAME, SNAPSHOT_READS};

/// Raw bytes per chunk before compression.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// Chunks in flight per stream.
const CHANNEL_CHUNKS: usize = 4;
/// zstd level: fast, and still a good ratio on table data.
const ZSTD_LEVEL: i32 = 1;

pub type ChunkSender = mpsc::Sender<Result<wire::DataChunk, Status>>;

pub fn channel() -> (ChunkSender, mpsc::Receiver<Result<wire::DataChunk, Status>>) {
    mpsc::channel(CHANNEL_CHUNKS)
}

fn compress(raw: &[u8]) -> Result<wire::DataChunk, Status> {
    let data = zstd::bulk::compress(raw, ZSTD_LEVEL)
        .map_err(|e| fault::status(Fault::new(FaultKind::Internal, format!("zstd: {e}"))))?;
    Ok(wire::DataChunk {
        data,
        raw_len: raw.len() as u64,
    })
}

/// Opens a session reading in `snapshot` (or in a fresh consistent
/// snapshot when `snapshot` is empty), with the shared session settings.
pub async fn snapshot_session(source: &Database, snapshot: &str) -> Result<Client, Status> {
    let client = source
        .connect_with(APPLICATION_NAME, &SNAPSHOT_READS)
        .await
        .map_err(|e| crate::fault::connect_status(&e))?;
    let mut setup = "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY".to_owned();
    if !snapshot.is_empty() {
        setup.push_str(&format!("; SET TRANSACTION SNAPSHOT {}", quote_literal(snapshot)));
    }
    client.batch_execute(&setup).await.map_err(|e| {
        let message = describe(&e);
        if message.contains("invalid snapshot identifier") {
            fault::status(Fault::new(
                FaultKind::SnapshotLost,
                format!("the snapshot {snapshot} is gone: {message}"),
            ))
        } else {
            fault::source_status("cannot open a snapshot session on the source", &e)
        }
    })?;
    Ok(client)
}

/// Streams `COPY ... TO STDOUT` of one table (or page range) to `out`.
pub async fn copy_table(
    source: Database,
    snapshot: String,
    table: QualifiedName,
    columns: Vec<String>,
    range: Option<PageRange>,
    out: ChunkSender,
) {
    let result = async {
        let client = snapshot_session(&source, &snapshot).await?;
        let stream = client
            .copy_out(&copy::copy_out(&table, &columns, range))
            .await
            .map_err(|e| crate::fault::source_status(format!("COPY of {table} failed on the source"), &e))?;
        pin_mut!(stream);
        let mut buffer = BytesMut::with_capacity(CHUNK_BYTES);
        while let Some(piece) = stream.next().await {
            let piece: Bytes =
                piece.map_err(|e| crate::fault::source_status(format!("COPY of {table} failed on the source"), &e))?;
            buffer.extend_from_slice(&piece);
            if buffer.len() >= CHUNK_BYTES {
                let chunk = compress(&buffer)?;
                buffer.clear();
                if out.send(Ok(chunk)).await.is_err() {
                    // The controller went away: nothing more to do.
                    return Ok(());
                }
            }
        }
        if !buffer.is_empty() {
            let _ = out.send(Ok(compress(&buffer)?)).await;
        }
        Ok(())
    }
    .await;
    if let Err(status) = result {
        let _ = out.send(Err(status)).await;
    }
}

/// What to dump of the schema.
#[derive(Debug, Clone)]
pub struct SchemaDump {
    /// Read in this snapshot (empty: a snapshot of pg_dump's own).
    pub snapshot: String,
    /// `pre-data` or `post-data`.
    pub section: String,
    pub exclude: Vec<QualifiedName>,
    /// GRANTs and default privileges too (`start --privileges`).
    pub privileges: bool,
    /// Only these tables (empty: all but `exclude`).
    pub only: Vec<QualifiedName>,
}

/// Streams `pg_dump --schema-only --section=<section>` as `dump` says.
pub async fn dump_schema(source: Database, pg_dump: PgDumpChoice, dump: SchemaDump, out: ChunkSender) {
    let SchemaDump {
        snapshot,
        section,
        exclude,
        privileges,
        only,
    } = dump;
    let result = async {
        let pg_dump = pg_dump.resolve().await.map_err(|not_found| {
            fault::status(Fault::new(
                FaultKind::Internal,
                format!("{}: {not_found}", pg_dump.describe()),
            ))
        })?;
        let pg_dump = pg_dump.program.display().to_string();
        let mut command = tokio::process::Command::new(&pg_dump);
        command
            .args(["--schema-only", "--no-owner", "--no-publications", "--no-subscriptions"])
            .args((!privileges).then_some("--no-privileges"))
            .arg(format!("--section={section}"))
            // walbridge's own schemas on the source are never migrated.
            .arg(format!("--exclude-schema={}", walbridge_migration::mark::STATE_SCHEMA))
            .arg(format!("--exclude-schema={}", walbridge_migration::fence::SCHEMA))
            .args((!snapshot.is_empty()).then(|| format!("--snapshot={snapshot}")))
            .envs(source.libpq_environment(APPLICATION_NAME, &SessionPolicy::UNBOUNDED))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for table in &exclude {
            command.arg(format!("--exclude-table={}", dump_pattern(table)));
        }
        for table in &only {
            command.arg(format!("--table={}", dump_pattern(table)));
        }
        let mut child = command
            .spawn()
            .map_err(|e| fault::status(Fault::new(FaultKind::Internal, format!("cannot run {pg_dump}: {e}"))))?;
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let errors = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text).await;
            text
        });
        let mut buffer = vec![0u8; CHUNK_BYTES];
        loop {
            let n = stdout.read(&mut buffer).await.map_err(|e| {
                fault::status(Fault::new(
                    FaultKind::Internal,
                    format!("reading pg_dump's output: {e}"),
                ))
            })?;
            if n == 0 {
                break;
            }
            if out.send(Ok(compress(&buffer[..n])?)).await.is_err() {
                return Ok(());
            }
        }
        let status = child
            .wait()
            .await
            .map_err(|e| fault::status(Fault::new(FaultKind::Internal, format!("waiting for pg_dump: {e}"))))?;
        let errors = errors.await.unwrap_or_default();
        if !status.success() {
            let errors = errors.trim();
            return Err(fault::status(Fault::new(
                pg_dump_fault(errors),
                format!("pg_dump failed ({status}): {errors}"),
            )));
        }
        Ok(())
    }
    .await;
    if let Err(status) = result {
        let _ = out.send(Err(status)).await;
    }
}

/// What kind of fault pg_dump's complaint is: it reports only text.
fn pg_dump_fault(stderr: &str) -> FaultKind {
    let says = |words: &[&str]| words.iter().any(|w| stderr.contains(w));
    if says(&["invalid snapshot identifier"]) {
        FaultKind::SnapshotLost
    } else if says(&[
        "could not connect",
        "connection to server",
        "server closed the connection",
        "terminating connection",
        "the database system is",
    ]) {
        FaultKind::SourceUnavailable
    } else if says(&["permission denied", "password authentication failed"]) {
        FaultKind::Privilege
    } else {
        FaultKind::Internal
    }
}

/// A pg_dump table pattern that matches exactly this table: inside double
/// quotes, pattern characters are literal.
fn dump_pattern(table: &QualifiedName) -> String {
    format!(
        "\"{}\".\"{}\"",
        table.schema.replace('"', "\"\""),
        table.name.replace('"', "\"\"")
    )
}

/// Row count and checksum of one table, in the snapshot if given.
pub async fn checksum(
    source: &Database,
    snapshot: &str,
    table: &QualifiedName,
    columns: &[String],
    round_floats: bool,
) -> Result<(u64, String), Status> {
    let client = snapshot_session(source, snapshot).await?;
    client
        .batch_execute(copy::checksum_setup(round_floats))
        .await
        .map_err(|e| crate::fault::source_status(format!("checksum of {table} failed on the source"), &e))?;
    let row = client
        .query_one(&copy::checksum(table, columns), &[])
        .await
        .map_err(|e| crate::fault::source_status(format!("checksum of {table} failed on the source"), &e))?;
    Ok((row.get::<_, i64>(0) as u64, row.get(1)))
}
