//! Step `Snapshot`: the publication, then the slot with its exported
//! snapshot, which the agent holds until the copy is done. Slots left by
//! earlier attempts hold WAL and have no usable snapshot (nor has this
//! attempt's, if a crash came between its creation and the journal): they
//! are dropped first, so repeating the step is safe.

use walbridge_daemon::crash_point;
use walbridge_migration::failpoint as fp;
use walbridge_migration::fault::{Fault, FaultKind};
use walbridge_proto::convert::name_to_wire;
use walbridge_proto::v1 as wire;

use super::{StepError, save};
use crate::migration::{Context, MigrationRecord, Phase, SnapshotRecord};
use crate::registry::AgentClient;

pub async fn run(ctx: &Context, agent: &AgentClient, record: &mut MigrationRecord) -> Result<(), StepError> {
    let mut doomed = record.stale_slots.clone();
    doomed.push(record.slot.clone());
    for slot in doomed {
        agent
            .clone()
            .drop_replication(wire::DropReplicationRequest {
                slot: slot.clone(),
                publication: String::new(),
                mark: None,
            })
            .await
            .map_err(|s| crate::fault::agent(format!("cannot drop the old slot {slot}"), &s))?;
    }
    record.stale_slots.clear();
    let created = agent
        .clone()
        .create_snapshot(wire::CreateSnapshotRequest {
            slot: record.slot.clone(),
            publication: record.publication.clone(),
            tables: record.publication_tables.iter().cloned().map(name_to_wire).collect(),
            mark: Some(name_to_wire(walbridge_migration::mark::table(&record.id))),
            deadline_ms: ctx.settings.snapshot_create_timeout.as_millis() as u64,
        })
        .await
        .map_err(|s| crate::fault::agent("cannot create the slot and its snapshot", &s))?
        .into_inner();
    tracing::info!(slot = %created.slot, snapshot = %created.snapshot, lsn = %created.consistent_lsn, "snapshot taken");
    record.snapshot = Some(SnapshotRecord {
        name: created.snapshot,
        consistent_lsn: created.consistent_lsn,
        released: false,
    });
    record.phase = if record.pre_data_applied {
        Phase::Copy
    } else {
        Phase::SchemaPreData
    };
    crash_point!(fp::SNAPSHOT_TAKEN);
    save(ctx, record).await?;
    crash_point!(fp::SNAPSHOT_RECORDED);
    Ok(())
}

/// The snapshot the copy reads, if the agent still holds it; a lost
/// snapshot is a fault of its own kind (the copy restarts from a new one).
pub async fn held(agent: &AgentClient, record: &MigrationRecord) -> Result<String, StepError> {
    let lost = || {
        Fault::new(
            FaultKind::SnapshotLost,
            "the agent no longer holds the migration's snapshot",
        )
    };
    let snapshot = record
        .snapshot
        .as_ref()
        .filter(|s| !s.released)
        .map(|s| s.name.clone())
        .ok_or_else(lost)?;
    let held = agent
        .clone()
        .snapshot_status(wire::SnapshotStatusRequest {
            snapshot: snapshot.clone(),
        })
        .await
        .map_err(|s| crate::fault::agent("cannot ask the agent for its snapshot", &s))?
        .into_inner()
        .held;
    if held { Ok(snapshot) } else { Err(lost().into()) }
}
