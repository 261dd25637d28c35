//! Large objects, which logical replication does not carry: their digests
//! (oid, size, content hash) and their contents, read in the copy's
//! snapshot (or a fresh one at the cutover, while writes are fenced), in
//! chunks so an object of any size costs a chunk of memory.

use tokio::sync::mpsc;
use tonic::Status;
use walbridge_daemon::pg::Database;
use walbridge_proto::v1 as wire;

use crate::copy::snapshot_session;

/// Bytes read per chunk of a large object.
const CHUNK: i32 = 256 * 1024;

pub async fn digests(source: Database, snapshot: String, out: mpsc::Sender<Result<wire::LargeObjectDigest, Status>>) {
    let result = async {
        let client = snapshot_session(&source, &snapshot).await?;
        let rows = client
            .query(walbridge_migration::copy::LARGE_OBJECT_DIGESTS, &[])
            .await
            .map_err(|e| crate::fault::source_status("reading the large objects failed", &e))?;
        for row in rows {
            let digest = wire::LargeObjectDigest {
                oid: row.get::<_, i64>(0) as u32,
                size: row.get::<_, i64>(1) as u64,
                md5: row.get(2),
            };
            if out.send(Ok(digest)).await.is_err() {
                return Ok(());
            }
        }
        Ok::<_, Status>(())
    }
    .await;
    if let Err(status) = result {
        let _ = out.send(Err(status)).await;
    }
}

pub async fn read(
    source: Database,
    snapshot: String,
    oids: Vec<u32>,
    out: mpsc::Sender<Result<wire::LargeObjectChunk, Status>>,
) {
    let result = async {
        let client = snapshot_session(&source, &snapshot).await?;
        let statement = client
            .prepare("SELECT lo_get($1::int8::oid, $2, $3)")
            .await
            .map_err(|e| crate::fault::source_status("cannot read large objects", &e))?;
        for oid in oids {
            let mut offset: i64 = 0;
            loop {
                let data: Vec<u8> = client
                    .query_one(&statement, &[&i64::from(oid), &offset, &CHUNK])
                    .await
                    .map_err(|e| crate::fault::source_status(format!("reading large object {oid} failed"), &e))?
                    .get(0);
                let end = data.len() < CHUNK as usize;
                let length = data.len() as i64;
                let chunk = wire::LargeObjectChunk {
                    oid,
                    offset: offset as u64,
                    data,
                    end,
                };
                if out.send(Ok(chunk)).await.is_err() {
                    return Ok(());
                }
                if end {
                    break;
                }
                offset += length;
            }
        }
        Ok::<_, Status>(())
    }
    .await;
    if let Err(status) = result {
        let _ = out.send(Err(status)).await;
    }
}
