//! Step `ReleaseSnapshot`, as soon as the last table is copied and
//! verified: the agent closes the replication connection that holds the
//! exported snapshot, so the source's xmin horizon moves on again while
//! post-data builds the indexes. The slot stays (it is what streams),
//! unless the migration only copies: then slot and publication go too.

use walbridge_proto::v1 as wire;

use walbridge_daemon::crash_point;
use walbridge_migration::failpoint as fp;
use walbridge_migration::fault::{Fault, FaultKind};

use super::{StepError, save, teardown};
use crate::migration::{Context, MigrationRecord, Phase};
use crate::registry::AgentClient;

pub async fn run(ctx: &Context, agent: &AgentClient, record: &mut MigrationRecord) -> Result<(), StepError> {
    release(agent, record).await?;
    if record.copy_only {
        // Nothing will stream from the slot: it would only hold WAL on the
        // source's disk while post-data runs.
        let released = teardown::release_replication(agent, record).await;
        if !released.problems.is_empty() {
            return Err(Fault::new(
                FaultKind::SourceUnavailable,
                format!(
                    "the copy is done, but releasing the source failed: {}",
                    released.problems.join("; ")
                ),
            )
            .into());
        }
        record
            .events
            .push(format!("copy only: removed {}", released.removed.join(", ")));
    }
    tracing::info!(migration = %record.id, "initial copy complete");
    crash_point!(fp::RELEASE_DONE);
    record.phase = Phase::SchemaPostData;
    save(ctx, record).await?;
    crash_point!(fp::RELEASE_RECORDED);
    Ok(())
}

/// Lets the snapshot go; one that is gone already is fine.
pub async fn release(agent: &AgentClient, record: &mut MigrationRecord) -> Result<(), StepError> {
    if let Some(snapshot) = record.snapshot.as_mut().filter(|s| !s.released) {
        agent
            .clone()
            .release_snapshot(wire::ReleaseSnapshotRequest {
                snapshot: snapshot.name.clone(),
            })
            .await
            .map_err(|s| crate::fault::agent("cannot release the snapshot", &s))?;
        tracing::info!(snapshot = %snapshot.name, "snapshot released");
        snapshot.released = true;
    }
    Ok(())
}
