//! `status`: the migration as the journal and the live figures have it,
//! and its slot's and subscription's health asked of the agent and the
//! target right now. What cannot be known (lag while the agent is away) is
//! absent, never 0. The slot is watched, and its warnings logged, by
//! `slot_watch`.

use tonic::Status;
use walbridge_migration::definition::Drift;
use walbridge_proto::v1 as wire;

use crate::link::unix_ms;
use crate::migration::{Context, MigrationRecord, Phase};
use crate::runner::Runner;
use crate::slot_watch::{self, Lag};
use crate::steps::{self, cutover};
use crate::subscription;
use crate::target::{self, Purpose};

/// Lag and health of a migration that holds a slot.
pub struct Health {
    /// `None` while the agent cannot be asked.
    pub slot: Option<wire::SlotStatusResponse>,
    /// The lag in time (`None` while unknown).
    pub lag: Option<Lag>,
    pub subscription: subscription::State,
    /// Errors its workers hit (PostgreSQL 15 and later).
    pub subscription_errors: u64,
    pub warnings: Vec<String>,
    /// How the target's tables differ from the source's (while streaming).
    pub drift: Vec<Drift>,
}

pub async fn health(ctx: &Context, record: &MigrationRecord) -> Option<Health> {
    if !slot_watch::holds_slot(record) {
        return None;
    }
    let mut warnings = Vec::new();
    let slot = match steps::verified_agent(ctx, record).await {
        Ok(agent) => match cutover::slot_status(&agent, &record.slot).await {
            Ok(slot) => Some(slot),
            Err(problem) => {
                warnings.push(problem.to_string());
                None
            }
        },
        Err(refusal) => {
            warnings.push(format!("{refusal}: the slot's lag and health are unknown"));
            None
        }
    };
    let has_subscription = matches!(
        record.phase,
        Phase::Subscribe | Phase::Streaming | Phase::Cutover | Phase::CutOver
    );
    let observed_lag = slot
        .as_ref()
        .and_then(|slot| ctx.slot_watch.observe(&record.slot, slot));
    // Before there is a subscriber, its lag means nothing yet.
    let lag = observed_lag.filter(|_| has_subscription);
    if let Some(slot) = &slot {
        let assessment = slot_watch::assess(record, slot, ctx.settings.retained_wal_warning, lag);
        warnings.extend(assessment.warnings.into_iter().map(|(_, warning)| warning));
        warnings.extend(assessment.lost.map(|fault| fault.explained()));
    }
    let observed = match (&ctx.target, has_subscription) {
        (Some(target), true) => match target::connect(target, Purpose::Control).await {
            Ok(client) => subscription::health(&client, &record.subscription).await,
            Err(e) => Err(e),
        },
        _ => Ok((subscription::State::Missing, 0)),
    };
    let (subscription, subscription_errors) = observed.unwrap_or_else(|e| {
        warnings.push(format!("cannot read the subscription: {e}"));
        (subscription::State::Missing, 0)
    });
    if record.phase == Phase::Streaming && subscription == subscription::State::Disabled {
        warnings.push(format!(
            "subscription {} is disabled: nothing is applied (the target's server log says why)",
            record.subscription
        ));
    }
    // Read every WATCH_INTERVAL by `catalog_watch::watch`: comparing the catalogs
    // on each status call would cost both servers more than status is worth.
    let drift = if record.phase == Phase::Streaming {
        ctx.state.drift()
    } else {
        Vec::new()
    };
    let missing_columns: Vec<&Drift> = drift
        .iter()
        .filter(|d| d.what.contains("is missing on the target"))
        .collect();
    if subscription_errors > 0 && record.phase == Phase::Streaming {
        if missing_columns.is_empty() {
            warnings.push(format!(
                "subscription {} has hit {subscription_errors} error(s) applying changes; it retries, and the \
                 target's server log says what fails",
                record.subscription
            ));
        } else {
            // The usual reason: the source has a column the target lacks,
            // so no change to that table can be applied.
            warnings.push(format!(
                "subscription {} is stalled ({subscription_errors} errors applying changes): {}; \
                 `walbridge sync-schema` adds what is missing",
                record.subscription,
                crate::drift::describe(&missing_columns.into_iter().cloned().collect::<Vec<_>>())
            ));
        }
    }
    if !drift.is_empty() {
        warnings.push(format!(
            "the target's tables differ from the source's in {} way(s): cutover refuses until they agree \
             (`walbridge sync-schema` applies the additive ones; see schema_drift)",
            drift.len()
        ));
    }
    Some(Health {
        slot,
        lag,
        subscription,
        subscription_errors,
        warnings,
        drift,
    })
}

pub async fn status(runner: &Runner) -> Result<wire::StatusResponse, Status> {
    let ctx = runner.ctx();
    let internal = |e: walbridge_daemon::journal::JournalError| Status::internal(e.to_string());
    let Some(record) = ctx.state.current().map_err(internal)? else {
        return Ok(wire::StatusResponse {
            phase: "none".to_owned(),
            ..Default::default()
        });
    };
    let tables = ctx
        .state
        .tables()
        .map_err(internal)?
        .into_iter()
        .map(|t| {
            let (rows, bytes) = ctx.state.progress(&t.name).unwrap_or((t.rows, t.bytes));
            wire::TableStatus {
                name: t.name.to_string(),
                state: t.state.name().to_owned(),
                rows,
                bytes,
                copy_seconds: t.copy_seconds,
                copy_attempts: t.copy_attempts,
                ranges: t.ranges.len() as u32,
                wire_bytes: t.wire_bytes,
                size_bytes: t.size_bytes,
            }
        })
        .collect();
    let health = health(ctx, &record).await;
    let (slot, lag, subscription, subscription_errors, warnings, drift) = match health {
        Some(h) => (
            h.slot,
            h.lag,
            h.subscription.name().to_owned(),
            h.subscription_errors,
            h.warnings,
            h.drift,
        ),
        None => Default::default(),
    };
    let retries = ctx
        .state
        .retries()
        .into_iter()
        .map(|r| wire::Retry {
            unit: r.unit,
            count: r.count,
            kind: r.kind.name().to_owned(),
            hint: r.kind.hint().to_owned(),
            last_error: r.last_error,
            since_unix_ms: unix_ms(r.since),
        })
        .collect();
    // Streaming waits for the agent too (for its lag, for a cutover)
    // although no step is running to say so.
    let resting_without_agent = || {
        (record.phase == Phase::Streaming)
            .then(|| ctx.registry.away_since(&record.agent))
            .flatten()
            .map(|since| crate::migration::state::Waiting {
                agent: record.agent.clone(),
                since,
                phase: record.phase.name(),
                reason: "it is not connected".to_owned(),
            })
    };
    let waiting = ctx
        .state
        .waiting()
        .or_else(resting_without_agent)
        .map(|w| wire::AgentWait {
            agent: w.agent,
            phase: w.phase.to_owned(),
            since_unix_ms: unix_ms(w.since),
            reason: w.reason,
        });
    let existing = slot.as_ref().filter(|s| s.exists);
    Ok(wire::StatusResponse {
        lag_bytes: lag.map(|l| l.bytes),
        lag_seconds: lag.map(|l| l.seconds),
        retained_wal_bytes: existing.map(|s| s.retained_wal_bytes),
        slot_active: existing.is_some_and(|s| s.active),
        reply_age_seconds: existing.and_then(|s| s.reply_age_seconds),
        wal_status: existing.map(|s| s.wal_status.clone()).unwrap_or_default(),
        safe_wal_bytes: existing.and_then(|s| s.safe_wal_bytes),
        retries,
        waiting,
        running: runner.running().map(|op| op.name().to_owned()).unwrap_or_default(),
        schema_drift: drift.into_iter().map(crate::drift::to_wire).collect(),
        subscription,
        subscription_errors,
        warnings,
        cutover: match record.phase {
            Phase::Cutover => ctx.state.live_cutover(),
            _ => record.cutover.clone(),
        }
        .as_ref()
        .map(cutover::report_to_wire),
        phase: record.phase.name().to_owned(),
        migration: record.id,
        agent: record.agent,
        slot: record.slot,
        consistent_lsn: record.snapshot.map(|s| s.consistent_lsn).unwrap_or_default(),
        tables,
        errors: record.error.into_iter().collect(),
        events: record.events,
        copy_restarts: record.copy_restarts,
    })
}
