//! What a migration leaves, removed: by `cleanup` after a cutover (or a
//! `--copy-only` copy), by `abort` from any phase, and by a failure, which
//! must leave nothing on the source that holds WAL. Every removal is
//! idempotent, so each of these may run again after any crash. With the
//! agent or the source gone, `abort --force` removes what is on the target
//! and says exactly what remains on the source, with the SQL to run there.

use walbridge_daemon::crash_point;
use walbridge_migration::failpoint as fp;
use walbridge_migration::fault::{Fault, FaultKind};
use walbridge_migration::ident::{quote_ident, quote_literal};
use walbridge_migration::mark;
use walbridge_proto::convert::name_to_wire;
use walbridge_proto::v1 as wire;

use super::StepError;
use crate::bookkeeping;
use crate::migration::{Context, MigrationRecord, Phase};
use crate::registry::AgentClient;
use crate::subscription;
use crate::target::{self, Purpose};

/// What a removal did, one line per object.
#[derive(Debug, Default)]
pub struct Removed {
    pub removed: Vec<String>,
    /// Not removed, each with the statement that removes it.
    pub remaining: Vec<String>,
    /// Could not be removed now (retry).
    pub problems: Vec<String>,
    /// With the agent gone: the SQL that removes what remains on the source.
    pub source_sql: Vec<String>,
}

/// Releases everything a migration holds for replication on the source:
/// its snapshot, its slots (current and abandoned: they retain WAL), its
/// publication (with the cutover's mark table) and the subscription's role. All are attempted.
pub async fn release_replication(agent: &AgentClient, record: &MigrationRecord) -> Removed {
    let mut released = Removed::default();
    if let Some(snapshot) = record.snapshot.as_ref().filter(|s| !s.released)
        && let Err(status) = agent
            .clone()
            .release_snapshot(wire::ReleaseSnapshotRequest {
                snapshot: snapshot.name.clone(),
            })
            .await
    {
        released
            .problems
            .push(format!("snapshot {}: {}", snapshot.name, status.message()));
    }
    let slots = record.stale_slots.iter().chain(std::iter::once(&record.slot));
    for slot in slots {
        let publication = if slot == &record.slot {
            record.publication.clone()
        } else {
            String::new()
        };
        match agent
            .clone()
            .drop_replication(wire::DropReplicationRequest {
                slot: slot.clone(),
                publication: publication.clone(),
                mark: (!publication.is_empty()).then(|| name_to_wire(mark::table(&record.id))),
            })
            .await
        {
            Ok(dropped) => {
                let dropped = dropped.into_inner();
                if dropped.dropped_slot {
                    released.removed.push(format!("replication slot {slot} on the source"));
                }
                if dropped.dropped_publication {
                    released
                        .removed
                        .push(format!("publication {publication} on the source"));
                }
            }
            Err(status) => released.problems.push(format!("{slot}: {}", status.message())),
        }
    }
    if !record.subscription_role.is_empty() {
        match agent
            .clone()
            .drop_subscription_role(wire::DropSubscriptionRoleRequest {
                role: record.subscription_role.clone(),
            })
            .await
        {
            Ok(dropped) if dropped.get_ref().dropped => released
                .removed
                .push(format!("role {} on the source", record.subscription_role)),
            Ok(_) => {}
            Err(status) => released
                .problems
                .push(format!("role {}: {}", record.subscription_role, status.message())),
        }
    }
    released
}

/// After a failure nothing may keep holding the source back: the snapshot
/// (it blocks vacuum), the slots (they retain WAL), the publication and the
/// role go. Says what was done, as the failure's event.
pub async fn after_failure(ctx: &Context, record: &MigrationRecord) -> String {
    let agent = match super::verified_agent(ctx, record).await {
        Ok(agent) => agent,
        Err(refusal) => {
            return format!(
                "{refusal}: nothing was removed through it, and these remain on the source: {}",
                source_leftovers(record).join(" ")
            );
        }
    };
    let released = release_replication(&agent, record).await;
    if released.problems.is_empty() {
        format!(
            "after the failure, slot {} and publication {} were dropped from the source; the target keeps \
             what the migration created there",
            record.slot, record.publication
        )
    } else {
        format!(
            "after the failure, cleaning the source failed: {}; run on the source: {}",
            released.problems.join("; "),
            source_leftovers(record).join(" ")
        )
    }
}

/// The SQL that removes, on the source, what the migration may have left
/// there (for an operator whose agent or source is gone).
pub fn source_leftovers(record: &MigrationRecord) -> Vec<String> {
    let mut sql = Vec::new();
    for slot in record.stale_slots.iter().chain(std::iter::once(&record.slot)) {
        sql.push(format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = {};",
            quote_literal(slot)
        ));
    }
    sql.push(format!(
        "DROP PUBLICATION IF EXISTS {};",
        quote_ident(&record.publication)
    ));
    sql.push(format!("{};", mark::drop_sql(&mark::table(&record.id))));
    if !record.subscription_role.is_empty() {
        sql.push(format!(
            "DROP ROLE IF EXISTS {};",
            quote_ident(&record.subscription_role)
        ));
    }
    if record.fence_sealed {
        sql.push(walbridge_migration::fence::RELEASE_SQL.to_owned());
    }
    sql
}

/// Lifts a sealed fence; says on how many tables it was.
pub async fn release_fence(agent: &AgentClient, record: &MigrationRecord) -> Result<Option<String>, Fault> {
    let released = agent
        .clone()
        .release_fence(wire::ReleaseFenceRequest {
            migration: record.id.clone(),
        })
        .await
        .map_err(|s| crate::fault::agent("cannot release the write fence", &s))?
        .into_inner();
    let mut what = Vec::new();
    if released.tables > 0 {
        what.push(format!("the write fence on {} source tables", released.tables));
    }
    if released.sequences > 0 {
        what.push(format!(
            "{} source sequences set back where the seal found them",
            released.sequences
        ));
    }
    if released.roles > 0 {
        what.push(format!(
            "the hard fence on {} roles (they may log in again)",
            released.roles
        ));
    }
    Ok((!what.is_empty()).then(|| what.join(", ")))
}

/// Subscription and walbridge's schema (target); snapshot, slots,
/// publication, role and fence (source). With `force` and no agent, the
/// source's part is reported as SQL to run instead.
pub async fn remove_everything(
    ctx: &Context,
    record: &mut MigrationRecord,
    phase: Phase,
    force: bool,
) -> Result<Removed, StepError> {
    // An agent that now reaches another source is as good as gone: what
    // the migration made is not on the server it reaches.
    let (agent, refusal) = match super::verified_agent(ctx, record).await {
        Ok(agent) => (Some(agent), None),
        Err(refusal) => (None, Some(refusal)),
    };
    let gone = refusal.as_ref().map(ToString::to_string).unwrap_or_default();
    if let Some(refusal) = refusal.filter(|_| !force) {
        // The refusal's own kind (away, another source, no answer), with
        // what to do about it here.
        let fault = refusal.fault();
        return Err(Fault::new(
            fault.kind,
            format!(
                "{gone}, and the source's objects are removed through the agent: start it (pointed at the \
                 migration's source), or `walbridge abort --force` to remove what is on the target and print what \
                 remains on the source"
            ),
        )
        .into());
    }
    let mut outcome = Removed::default();
    if let Some(target_db) = &ctx.target {
        if !record.subscription.is_empty() {
            let removed = subscription::remove(target_db, &record.subscription, record.subscription_oid).await?;
            outcome.removed.extend(removed.removed);
            outcome.remaining.extend(removed.remaining);
        }
        let client = target::connect(target_db, Purpose::Control).await?;
        if bookkeeping::remove(&client).await? {
            outcome
                .removed
                .push(format!("walbridge's schema {} on the target", bookkeeping::SCHEMA));
        }
    }
    crash_point!(fp::TEARDOWN_TARGET_REMOVED);
    match agent {
        Some(agent) => {
            let released = release_replication(&agent, record).await;
            outcome.removed.extend(released.removed);
            if !released.problems.is_empty() {
                return Err(Fault::new(
                    FaultKind::SourceUnavailable,
                    format!("could not release the source: {}", released.problems.join("; ")),
                )
                .into());
            }
            if phase == Phase::CleanedUp && record.fence_sealed {
                // After a cutover the source must not take writes meant
                // for the target: only `release-source` lifts the fence.
                outcome.remaining.push(
                    "the write fence on the source, kept so that nothing writes there by mistake: \
                     `walbridge release-source` lifts it"
                        .to_owned(),
                );
            } else {
                if let Some(fence) = release_fence(&agent, record).await? {
                    outcome.removed.push(fence);
                }
                record.fence_sealed = false;
            }
        }
        None => {
            let sql = source_leftovers(record);
            outcome
                .remaining
                .extend(sql.iter().map(|sql| format!("on the source ({gone}): {sql}")));
            outcome.source_sql = sql;
        }
    }
    if let Some(snapshot) = record.snapshot.as_mut() {
        snapshot.released = true;
    }
    record.phase = phase;
    record.events.push(if outcome.removed.is_empty() {
        format!("{}: nothing was left to remove", phase.name())
    } else {
        format!("{}: removed {}", phase.name(), outcome.removed.join(", "))
    });
    if !outcome.remaining.is_empty() {
        record.events.push(format!(
            "{}: left behind {}",
            phase.name(),
            outcome.remaining.join("; ")
        ));
    }
    super::save(ctx, record).await?;
    crash_point!(fp::TEARDOWN_RECORDED);
    tracing::info!(migration = %record.id, phase = phase.name(), removed = ?outcome.removed, remaining = ?outcome.remaining, "replication objects removed");
    Ok(outcome)
}
