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

use std::time::{Duration, Instant, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};
use walbridge_migration::fault::{Fault, FaultKind, Policy};

use crate::migration::state::{LinkCheck, Waiting};
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

/// Why the migration's agent cannot be used right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not connected.
    Away(String),
    /// Connected, but it reaches another source than the one pinned at
    /// `start`: it is never used for this migration (not for a step, not
    /// for the tunnel, not to drop what the migration made).
    OtherSource(String),
    /// Connected, but it did not answer, or cannot reach its source.
    Unanswered(Fault),
}

impl Refusal {
    pub fn fault(&self) -> Fault {
        match self {
            Refusal::Away(message) => Fault::new(FaultKind::AgentAway, message.clone()),
            Refusal::OtherSource(message) => Fault::new(FaultKind::SourceChanged, message.clone()),
            Refusal::Unanswered(fault) => fault.clone(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Away(message) | Refusal::OtherSource(message) => f.write_str(message),
            Refusal::Unanswered(fault) => write!(f, "{fault}"),
        }
    }
}

/// A link's source is checked again after this long: a server can change
/// under the same address (a failover behind a DNS name) without the
/// agent's link breaking.
const IDENTITY_RECHECK: Duration = Duration::from_secs(30);

/// The migration's agent, if it is connected now and reaches the source
/// the migration started on (asked once per link, and again every
/// [`IDENTITY_RECHECK`]). Every use of the migration's agent goes through
/// here: steps, status, the slot watch, cutover, teardown, the tunnel.
pub async fn verified_agent(ctx: &Context, record: &MigrationRecord) -> Result<AgentClient, Refusal> {
    let Some(connected) = ctx.registry.get(&record.agent) else {
        return Err(Refusal::Away(format!("agent {} is not connected", record.agent)));
    };
    let Some(pinned) = &record.source else {
        return Ok(connected.client);
    };
    if let Some(check) = ctx.state.link_check(connected.link_id, IDENTITY_RECHECK) {
        return match check.refusal {
            None => Ok(connected.client),
            Some(refusal) => Err(Refusal::OtherSource(refusal)),
        };
    }
    let hello = crate::link::hello(&connected.client).await.map_err(|e| {
        Refusal::Unanswered(Fault::new(
            FaultKind::AgentAway,
            format!("agent {} did not answer: {e}", record.agent),
        ))
    })?;
    let source = hello.source.unwrap_or_default();
    if !source.reachable {
        return Err(Refusal::Unanswered(Fault::new(
            FaultKind::SourceUnavailable,
            format!("agent {} cannot reach the source: {}", record.agent, source.error),
        )));
    }
    let refusal =
        (source.system_identifier != pinned.system_identifier || source.database != pinned.database).then(|| {
            format!(
                "agent {} now reaches database {} of system {}, but migration {} started on database {} of system {} \
                 (a re-pointed agent, a restore, or a failover to another cluster): it is refused for this \
                 migration — point it back at that server, or `walbridge abort --force`",
                record.agent,
                source.database,
                source.system_identifier,
                record.id,
                pinned.database,
                pinned.system_identifier
            )
        });
    if let Some(refusal) = &refusal {
        tracing::error!(agent = %record.agent, migration = %record.id, "{refusal}");
    }
    ctx.state.set_link_check(LinkCheck {
        link_id: connected.link_id,
        at: Instant::now(),
        refusal: refusal.clone(),
    });
    match refusal {
        None => Ok(connected.client),
        Some(refusal) => Err(Refusal::OtherSource(refusal)),
    }
}

/// The migration's agent, waited for without limit while it is away or
/// reaches another source (status shows since when, why, and for which
/// phase); a fault only when it is connected but cannot answer.
pub async fn agent(ctx: &Context, record: &MigrationRecord) -> Result<AgentClient, StepError> {
    let mut announced: Option<String> = None;
    loop {
        let refusal = match verified_agent(ctx, record).await {
            Ok(agent) => {
                if announced.is_some() {
                    ctx.state.set_waiting(None);
                }
                return Ok(agent);
            }
            Err(Refusal::Unanswered(fault)) => {
                if announced.is_some() {
                    ctx.state.set_waiting(None);
                }
                return Err(fault.into());
            }
            Err(Refusal::Away(why) | Refusal::OtherSource(why)) => why,
        };
        if announced.as_deref() != Some(refusal.as_str()) {
            tracing::warn!(agent = %record.agent, phase = record.phase.name(), reason = %refusal, "waiting for the migration's agent");
            let since = ctx.state.waiting().map_or_else(SystemTime::now, |w| w.since);
            ctx.state.set_waiting(Some(Waiting {
                agent: record.agent.clone(),
                since,
                phase: record.phase.name(),
                reason: refusal.clone(),
            }));
            announced = Some(refusal);
        }
        tokio::select! {
            _ = ctx.registry.changed() => {}
            // Also wakes a wait that missed the notification, and checks
            // a refused link again once its check is due.
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
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
