//! The migration's steps, one module each, in the order they run. A step
//! does its phase's work and moves the record to the next phase; it never
//! decides what a fault means (the runner does, by the fault's kind).
//!
//! * [`snapshot`]: publication, slot and exported snapshot.
//! * [`pre_data`]: the schema's pre-data section, in one transaction.
//! * [`copy`]: the tables, in parallel; their verification; a copy restarted.
//! * [`release`]: the snapshot let go as soon as the copy is done.
//! * [`post_data`]: indexes, constraints, triggers; materialized views.
//! * [`subscribe`]: the subscription.
//! * [`cutover`]: lag, fence, catch up, sequences, seal, detach.
//! * [`teardown`]: what cleanup, abort and a failure remove.

pub mod copy;
pub mod cutover;
pub mod post_data;
pub mod pre_data;
pub mod release;
pub mod snapshot;
pub mod subscribe;
pub mod teardown;

use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};
use walbridge_migration::fault::{Fault, FaultKind, Policy};

use crate::migration::state::Waiting;
use crate::migration::{Context, MigrationRecord};
use crate::registry::AgentClient;

/// Why a step did not finish.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Fault(#[from] Fault),
    /// Cancelled (abort, shutdown): the step stopped where it was.
    #[error("stopped")]
    Stopped,
}

impl From<walbridge_daemon::journal::JournalError> for StepError {
    fn from(e: walbridge_daemon::journal::JournalError) -> Self {
        StepError::Fault(crate::fault::journal(e))
    }
}

/// Saves the record (flushed before the caller goes on).
pub async fn save(ctx: &Context, record: &MigrationRecord) -> Result<(), StepError> {
    Ok(ctx.state.save(record).await?)
}

/// Delays between retries of a unit: from a second, doubling to half a
/// minute, with jitter so that units failed together do not retry together.
pub fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}

/// The migration's agent, waited for without limit (status shows since
/// when, and for which phase), and checked to still reach the source the
/// migration started on.
pub async fn agent(ctx: &Context, record: &MigrationRecord) -> Result<AgentClient, StepError> {
    let mut announced = false;
    let connected = loop {
        if let Some(agent) = ctx.registry.get(&record.agent) {
            break agent;
        }
        if !announced {
            tracing::warn!(agent = %record.agent, phase = record.phase.name(), "waiting for the migration's agent to connect");
            ctx.state.set_waiting(Some(Waiting {
                agent: record.agent.clone(),
                since: SystemTime::now(),
                phase: record.phase.name(),
            }));
            announced = true;
        }
        tokio::select! {
            _ = ctx.registry.changed() => {}
            // Also wakes a wait that missed the notification.
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    };
    if announced {
        ctx.state.set_waiting(None);
    }
    if let Some(pinned) = &record.source
        && !ctx.state.is_verified_link(connected.link_id)
    {
        let hello = crate::link::hello(&connected.client).await.map_err(|e| {
            Fault::new(
                FaultKind::AgentAway,
                format!("agent {} did not answer: {e}", record.agent),
            )
        })?;
        let source = hello.source.unwrap_or_default();
        if !source.reachable {
            return Err(Fault::new(
                FaultKind::SourceUnavailable,
                format!("agent {} cannot reach the source: {}", record.agent, source.error),
            )
            .into());
        }
        if source.system_identifier != pinned.system_identifier || source.database != pinned.database {
            return Err(Fault::new(
                FaultKind::SourceChanged,
                format!(
                    "agent {} now reaches database {} of system {}, but migration {} started on database {} of \
                     system {}: it is refused for this migration",
                    record.agent,
                    source.database,
                    source.system_identifier,
                    record.id,
                    pinned.database,
                    pinned.system_identifier
                ),
            )
            .into());
        }
        ctx.state.set_verified_link(connected.link_id);
    }
    Ok(connected.client)
}

/// Runs `unit`, which needs no agent, until it succeeds, retrying
/// transient faults with backoff (shown in status under `name`); any other
/// fault is returned.
pub async fn retrying_on_target<T, F, Fut>(ctx: &Context, name: &str, mut unit: F) -> Result<T, StepError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StepError>>,
{
    let mut delays = backoff();
    loop {
        match unit().await {
            Ok(value) => {
                ctx.state.clear_retry(name);
                return Ok(value);
            }
            Err(StepError::Fault(fault)) if fault.policy() == Policy::Retry => {
                wait_to_retry(ctx, name, &fault, &mut delays).await
            }
            Err(other) => return Err(other),
        }
    }
}

async fn wait_to_retry(ctx: &Context, name: &str, fault: &Fault, delays: &mut impl Iterator<Item = Duration>) {
    let count = ctx.state.note_retry(name, fault);
    let delay = delays.next().unwrap_or(Duration::from_secs(30));
    tracing::warn!(unit = name, attempt = count, kind = fault.kind.name(), error = %fault, ?delay, "retrying");
    tokio::time::sleep(delay).await;
}

/// Runs `unit` until it succeeds, retrying transient faults with backoff
/// (each shown in status under `name` until it succeeds) and waiting for
/// the agent whenever it is away; any other fault is returned.
pub async fn retrying<T, F, Fut>(
    ctx: &Context,
    record: &MigrationRecord,
    name: &str,
    mut unit: F,
) -> Result<T, StepError>
where
    F: FnMut(AgentClient) -> Fut,
    Fut: std::future::Future<Output = Result<T, StepError>>,
{
    let mut delays = backoff();
    loop {
        let agent = agent(ctx, record).await?;
        match unit(agent).await {
            Ok(value) => {
                ctx.state.clear_retry(name);
                return Ok(value);
            }
            Err(StepError::Fault(fault)) if fault.policy() == Policy::Retry => {
                wait_to_retry(ctx, name, &fault, &mut delays).await
            }
            Err(other) => return Err(other),
        }
    }
}
