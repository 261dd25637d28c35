//! Large objects, which logical replication does not carry: copied with
//! the tables, in the copy's snapshot, and brought up to date at the
//! cutover while writes are fenced — the objects created, changed (by
//! content hash) or deleted since are copied again or removed. `verify`
//! compares them too.

use std::collections::BTreeMap;

use futures_util::StreamExt;
use tokio_postgres::Client;
use walbridge_migration::fault::Fault;
use walbridge_proto::v1 as wire;

use crate::migration::Context;
use crate::registry::AgentClient;
use crate::target::{self, Purpose};

/// oid → (size, md5).
pub type Digests = BTreeMap<u32, (u64, String)>;

pub async fn source_digests(agent: &AgentClient, snapshot: &str) -> Result<Digests, Fault> {
    let mut stream = agent
        .clone()
        .large_object_digests(wire::LargeObjectsRequest {
            snapshot: snapshot.to_owned(),
        })
        .await
        .map_err(|s| crate::fault::agent("cannot read the source's large objects", &s))?
        .into_inner();
    let mut digests = Digests::new();
    while let Some(digest) = stream.next().await {
        let digest = digest.map_err(|s| crate::fault::agent("reading the source's large objects", &s))?;
        digests.insert(digest.oid, (digest.size, digest.md5));
    }
    Ok(digests)
}

pub async fn target_digests(client: &Client) -> Result<Digests, Fault> {
    Ok(client
        .query(walbridge_migration::copy::LARGE_OBJECT_DIGESTS, &[])
        .await
        .map_err(|e| crate::fault::target("cannot read the target's large objects", &e))?
        .iter()
        .map(|row| (row.get::<_, i64>(0) as u32, (row.get::<_, i64>(1) as u64, row.get(2))))
        .collect())
}

/// What [`sync`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Synced {
    /// Large objects on the source.
    pub seen: usize,
    pub copied: usize,
    pub deleted: usize,
    pub bytes: u64,
}

/// Makes the target's large objects the source's (as `snapshot` sees
/// them): each object copied in one target transaction of its own.
pub async fn sync(ctx: &Context, agent: &AgentClient, snapshot: &str) -> Result<Synced, Fault> {
    let client = target::connect(ctx.target()?, Purpose::Copy).await?;
    // Both sides hash every object: at once, the cutover runs this fenced.
    let (source, have) = tokio::try_join!(source_digests(agent, snapshot), target_digests(&client))?;
    let mut synced = Synced {
        seen: source.len(),
        ..Synced::default()
    };
    for oid in have.keys().filter(|oid| !source.contains_key(oid)) {
        client
            .execute("SELECT lo_unlink($1::int8::oid)", &[&i64::from(*oid)])
            .await
            .map_err(|e| crate::fault::target(format!("cannot remove large object {oid}"), &e))?;
        synced.deleted += 1;
    }
    let wanted: Vec<u32> = source
        .iter()
        .filter(|(oid, digest)| have.get(oid) != Some(digest))
        .map(|(oid, _)| *oid)
        .collect();
    if wanted.is_empty() {
        return Ok(synced);
    }
    let mut chunks = agent
        .clone()
        .read_large_objects(wire::ReadLargeObjectsRequest {
            snapshot: snapshot.to_owned(),
            oids: wanted,
        })
        .await
        .map_err(|s| crate::fault::agent("cannot read the source's large objects", &s))?
        .into_inner();
    let failed =
        |oid: u32| move |e: tokio_postgres::Error| crate::fault::target(format!("copying large object {oid}"), &e);
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|s| crate::fault::agent("reading the source's large objects", &s))?;
        let oid = i64::from(chunk.oid);
        if chunk.offset == 0 {
            client.batch_execute("BEGIN").await.map_err(failed(chunk.oid))?;
            client
                .execute(
                    "SELECT lo_unlink(oid) FROM pg_largeobject_metadata WHERE oid = $1::int8::oid",
                    &[&oid],
                )
                .await
                .map_err(failed(chunk.oid))?;
            client
                .execute("SELECT lo_create($1::int8::oid)", &[&oid])
                .await
                .map_err(failed(chunk.oid))?;
        }
        if !chunk.data.is_empty() {
            client
                .execute(
                    "SELECT lo_put($1::int8::oid, $2, $3)",
                    &[&oid, &(chunk.offset as i64), &chunk.data],
                )
                .await
                .map_err(failed(chunk.oid))?;
        }
        synced.bytes += chunk.data.len() as u64;
        if chunk.end {
            client.batch_execute("COMMIT").await.map_err(failed(chunk.oid))?;
            synced.copied += 1;
        }
    }
    Ok(synced)
}

/// Count and one hash of every object's digest: what `verify` compares.
pub fn summary(digests: &Digests) -> (u64, String) {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    for (oid, (size, md5)) in digests {
        hash.update(format!("{oid}:{size}:{md5};"));
    }
    let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    (digests.len() as u64, hex)
}
