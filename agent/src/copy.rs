//! What the agent streams to the controller: `pg_dump` sections and table
//! data, read in the exported snapshot, in zstd-compressed chunks, and
//! checksums computed the same way the controller computes them.
//!
//! Each stream runs in a task that feeds a small bounded channel, so a slow
//! controller slows the read from the source (backpressure end to end) and
//! memory stays bounded whatever the table's size.

use std::process::Stdio;

use bytes::Bytes;
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
        plain: false,
    })
}

/// Chunks measured at the start of a stream before `auto` decides.
const PROBE_CHUNKS: u32 = 4;
/// With zstd off, one chunk in this many is compressed again to see
/// whether the data changed (a table's later rows may compress better).
const PROBE_EVERY: u32 = 64;
/// Below this ratio zstd does not pay: at level 1 it costs about as much
/// CPU per byte on the agent (and the controller's decompression) as
/// TLS, framing and COPY parsing do, so saving less than half the bytes
/// slows a copy on any link fast enough to matter (measured with
/// `bench/initial-sync.sh`: random-content rows compress 1.2–1.6:1,
/// pgbench's blank-padded filler 9:1).
const MIN_RATIO: f64 = 2.0;

/// How one stream's chunks cross the link: zstd, or as they are.
struct Packer {
    mode: wire::Compression,
    /// `auto`: chunks still to measure before deciding.
    probing: u32,
    probed: (u64, u64),
    zstd: bool,
    since_probe: u32,
}

impl Packer {
    fn new(mode: wire::Compression) -> Packer {
        Packer {
            mode,
            probing: PROBE_CHUNKS,
            probed: (0, 0),
            zstd: true,
            since_probe: 0,
        }
    }

    /// One chunk, compressed on a blocking thread (the runtime's threads
    /// carry every stream's I/O) when that is what the mode says.
    async fn pack(&mut self, raw: Vec<u8>) -> Result<wire::DataChunk, Status> {
        let measure = self.mode == wire::Compression::Auto;
        let try_zstd = match self.mode {
            wire::Compression::Zstd => true,
            wire::Compression::None => false,
            wire::Compression::Auto => self.zstd || self.probing > 0 || self.since_probe + 1 >= PROBE_EVERY,
        };
        if !try_zstd {
            self.since_probe += 1;
            return Ok(plain(raw));
        }
        let (raw, packed) = tokio::task::spawn_blocking(move || {
            let packed = compress(&raw);
            (raw, packed)
        })
        .await
        .map_err(|e| fault::status(Fault::new(FaultKind::Internal, format!("compression stopped: {e}"))))?;
        let packed = packed?;
        if measure {
            let ratio = |raw: u64, packed: u64| raw as f64 / packed.max(1) as f64;
            if self.probing > 0 {
                self.probing -= 1;
                self.probed.0 += raw.len() as u64;
                self.probed.1 += packed.data.len() as u64;
                if self.probing == 0 {
                    self.zstd = ratio(self.probed.0, self.probed.1) >= MIN_RATIO;
                }
            } else {
                self.zstd = ratio(raw.len() as u64, packed.data.len() as u64) >= MIN_RATIO;
                self.since_probe = 0;
            }
        }
        // Never send more than the data itself.
        Ok(if packed.data.len() < raw.len() {
            packed
        } else {
            plain(raw)
        })
    }
}

fn plain(raw: Vec<u8>) -> wire::DataChunk {
    wire::DataChunk {
        raw_len: raw.len() as u64,
        data: raw,
        plain: true,
    }
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

/// Streams `COPY ... TO STDOUT` of one table (or page range) to `out`,
/// compressed as `compression` says.
pub async fn copy_table(
    source: Database,
    snapshot: String,
    table: QualifiedName,
    columns: Vec<String>,
    range: Option<PageRange>,
    compression: wire::Compression,
    out: ChunkSender,
) {
    let result = async {
        let client = snapshot_session(&source, &snapshot).await?;
        let stream = client
            .copy_out(&copy::copy_out(&table, &columns, range))
            .await
            .map_err(|e| crate::fault::source_status(format!("COPY of {table} failed on the source"), &e))?;
        pin_mut!(stream);
        let mut packer = Packer::new(compression);
        let mut buffer = Vec::with_capacity(CHUNK_BYTES);
        while let Some(piece) = stream.next().await {
            let piece: Bytes =
                piece.map_err(|e| crate::fault::source_status(format!("COPY of {table} failed on the source"), &e))?;
            // Chunks are exactly CHUNK_BYTES, however long a row is: COPY
            // data is a byte stream on both ends, so a row may span
            // chunks, and a chunk never outgrows gRPC's message limit or
            // the memory bound (a 2 MB row is eight chunks, not one).
            let mut rest = &piece[..];
            while !rest.is_empty() {
                let take = (CHUNK_BYTES - buffer.len()).min(rest.len());
                buffer.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if buffer.len() == CHUNK_BYTES {
                    let full = std::mem::replace(&mut buffer, Vec::with_capacity(CHUNK_BYTES));
                    let chunk = packer.pack(full).await?;
                    if out.send(Ok(chunk)).await.is_err() {
                        // The controller went away: nothing more to do.
                        return Ok(());
                    }
                }
            }
        }
        if !buffer.is_empty() {
            let _ = out.send(Ok(packer.pack(buffer).await?)).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes with no pattern (xorshift), as random-content rows look to zstd.
    fn noise(len: usize, mut state: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    /// Rows like pgbench's, blank-padded.
    fn padded(len: usize) -> Vec<u8> {
        let row = format!("1\t42\t0\t{}\n", " ".repeat(84));
        row.bytes().cycle().take(len).collect()
    }

    async fn kinds(mode: wire::Compression, chunks: impl Iterator<Item = Vec<u8>>) -> Vec<bool> {
        let mut packer = Packer::new(mode);
        let mut plain = Vec::new();
        for chunk in chunks {
            let raw = chunk.clone();
            let packed = packer.pack(chunk).await.unwrap();
            // What arrives is the data, however it was sent.
            let back = if packed.plain {
                packed.data.clone()
            } else {
                zstd::bulk::decompress(&packed.data, raw.len()).unwrap()
            };
            assert_eq!(back, raw);
            plain.push(packed.plain);
        }
        plain
    }

    #[tokio::test]
    async fn auto_stops_compressing_what_does_not_compress_and_keeps_what_does() {
        let random = kinds(wire::Compression::Auto, (0..12).map(|i| noise(CHUNK_BYTES, i + 1))).await;
        // Measured on the first chunks (sent as they are: zstd cannot
        // shrink them), then sent as they are without trying.
        assert!(random.iter().all(|plain| *plain), "{random:?}");
        let padded_rows = kinds(wire::Compression::Auto, (0..12).map(|_| padded(CHUNK_BYTES))).await;
        assert!(padded_rows.iter().all(|plain| !*plain), "{padded_rows:?}");
    }

    #[tokio::test]
    async fn auto_measures_again_and_turns_zstd_back_on_when_the_data_changes() {
        let noise_then_padded = (0..PROBE_EVERY as u64 * 2).map(|i| {
            if i < PROBE_EVERY as u64 / 2 {
                noise(CHUNK_BYTES, i + 1)
            } else {
                padded(CHUNK_BYTES)
            }
        });
        let plain = kinds(wire::Compression::Auto, noise_then_padded).await;
        let back_on = plain.iter().rposition(|plain| *plain).unwrap() + 1;
        assert!(
            back_on > PROBE_EVERY as usize / 2 && back_on <= (PROBE_CHUNKS + PROBE_EVERY) as usize,
            "zstd came back at chunk {back_on}: {plain:?}"
        );
        assert!(plain[back_on..].iter().all(|plain| !*plain));
    }

    #[tokio::test]
    async fn zstd_and_none_are_what_they_say() {
        let zstd = kinds(wire::Compression::Zstd, (0..6).map(|_| padded(CHUNK_BYTES))).await;
        assert!(zstd.iter().all(|plain| !*plain));
        let none = kinds(wire::Compression::None, (0..6).map(|_| padded(CHUNK_BYTES))).await;
        assert!(none.iter().all(|plain| *plain));
    }
}
