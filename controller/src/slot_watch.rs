//! The migration's slot, watched in every phase that holds one (the copy
//! included, not only streaming): how far behind the subscriber is *in
//! time*, how much WAL the slot keeps on the source and how close
//! `max_slot_wal_keep_size` is to invalidating it. Warnings go to status
//! and the log early; a slot that is lost (`wal_status = lost`, or gone)
//! is a `SlotLost` fault, which the runner turns into a failure with its
//! fix.
//!
//! Lag in time is the controller's own measure, not the walsender's
//! `replay_lag` (which goes stale, or NULL, while the apply worker is
//! stuck): [`LagClock`] samples the source's WAL position over time, and
//! the lag is how long ago the source was where the subscriber has
//! confirmed now — precisely, how long the oldest WAL the subscriber has
//! not confirmed has existed, within one sample. WAL that the subscriber
//! confirms as soon as it appears (an idle source's housekeeping records)
//! reads as no lag.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use walbridge_migration::fault::{Fault, FaultKind};
use walbridge_migration::lsn::Lsn;
use walbridge_proto::v1 as wire;

use crate::migration::{Context, MigrationRecord, Phase};
use crate::runner::Runner;

/// How often the slot is asked about while the migration holds one.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Warnings are checked every this many samples.
const WARN_EVERY: u32 = 5;
/// A warning still true is logged again after this long.
const LOG_AGAIN: Duration = Duration::from_secs(60);
/// The subscriber reports at least every `wal_receiver_status_interval`
/// (10 s by default) when it is healthy; silent longer than this while WAL
/// waits for it, it is stuck.
pub const REPLY_STALE: Duration = Duration::from_secs(15);
/// Positions kept (one per change of the source's position, at most one
/// per sample): beyond this the oldest go, and the lag is a lower bound.
const MAX_SAMPLES: usize = 20_000;

/// Whether the migration holds a slot on the source in this phase (so a
/// slot that is missing is lost).
pub fn holds_slot(record: &MigrationRecord) -> bool {
    match record.phase {
        Phase::SchemaPreData | Phase::Copy => true,
        // With --copy-only the release step drops the slot itself, and no
        // later phase has one.
        Phase::ReleaseSnapshot
        | Phase::SchemaPostData
        | Phase::Subscribe
        | Phase::Streaming
        | Phase::Cutover
        | Phase::CutOver => !record.copy_only,
        Phase::Snapshot | Phase::Copied | Phase::Failed | Phase::Aborted | Phase::CleanedUp => false,
    }
}

/// How far behind the subscriber is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lag {
    /// The source's WAL position minus the slot's confirmed one.
    pub bytes: u64,
    /// How long ago the source was at the confirmed position (0 when the
    /// subscriber has confirmed everything).
    pub seconds: f64,
    /// The samples reach back to a moment the source was no further than
    /// the confirmed position: `seconds` is measured, not only a lower
    /// bound (right after the controller started, or the slot changed).
    pub measured: bool,
}

/// The source's WAL position over time, for one slot.
#[derive(Debug, Default)]
pub struct LagClock {
    samples: Mutex<Samples>,
}

#[derive(Debug, Default)]
struct Samples {
    slot: String,
    /// (when first seen, position), positions strictly increasing.
    points: VecDeque<(Instant, Lsn)>,
}

impl LagClock {
    /// Records the source at `current` at time `at` and returns the lag of
    /// a subscriber that has confirmed `confirmed`.
    pub fn observe(&self, slot: &str, at: Instant, current: Lsn, confirmed: Lsn) -> Lag {
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.slot != slot {
            *samples = Samples {
                slot: slot.to_owned(),
                points: VecDeque::new(),
            };
        }
        let points = &mut samples.points;
        if points.back().is_none_or(|&(_, last)| current > last) {
            points.push_back((at, current));
        }
        // Only the last position at or before `confirmed` is needed (it
        // shows the samples reach back far enough): confirmed never moves
        // back.
        while points.len() >= 2 && points[1].1 <= confirmed {
            points.pop_front();
        }
        while points.len() > MAX_SAMPLES {
            points.pop_front();
        }
        let bytes = current.0.saturating_sub(confirmed.0);
        if confirmed >= current {
            return Lag {
                bytes: 0,
                seconds: 0.0,
                measured: true,
            };
        }
        let measured = points.front().is_some_and(|&(_, lsn)| lsn <= confirmed);
        let first_beyond = points
            .iter()
            .find(|&&(_, lsn)| lsn > confirmed)
            .map_or(at, |&(when, _)| when);
        Lag {
            bytes,
            seconds: at.saturating_duration_since(first_beyond).as_secs_f64(),
            measured,
        }
    }
}

/// The slot's watch: the lag clock, and the slot found lost.
#[derive(Debug)]
pub struct SlotWatch {
    pub clock: LagClock,
    lost: watch::Sender<Option<(String, Fault)>>,
}

impl Default for SlotWatch {
    fn default() -> Self {
        SlotWatch {
            clock: LagClock::default(),
            lost: watch::Sender::new(None),
        }
    }
}

impl SlotWatch {
    /// Records the slot's status now; its lag (`None` when the slot does
    /// not exist or its positions cannot be read).
    pub fn observe(&self, slot: &str, status: &wire::SlotStatusResponse) -> Option<Lag> {
        if !status.exists {
            return None;
        }
        let current = status.current_lsn.parse::<Lsn>().ok()?;
        let confirmed = status.confirmed_flush_lsn.parse::<Lsn>().unwrap_or(Lsn(0));
        Some(self.clock.observe(slot, Instant::now(), current, confirmed))
    }

    fn set_lost(&self, slot: &str, fault: Fault) {
        self.lost.send_replace(Some((slot.to_owned(), fault)));
    }

    /// Resolves with the fault once `slot` is found lost.
    pub async fn lost(&self, slot: &str) -> Fault {
        let mut lost = self.lost.subscribe();
        loop {
            if let Some((lost_slot, fault)) = lost.borrow_and_update().as_ref()
                && lost_slot == slot
            {
                return fault.clone();
            }
            if lost.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

/// What the slot's status says: warnings (each under a key, so the log
/// repeats one only now and then), and the fault when the slot is lost.
#[derive(Debug, Default, PartialEq)]
pub struct Assessment {
    pub warnings: Vec<(&'static str, String)>,
    pub lost: Option<Fault>,
}

/// Judges the slot's status for a migration in its phase.
pub fn assess(
    record: &MigrationRecord,
    slot: &wire::SlotStatusResponse,
    retained_wal_warning: u64,
    lag: Option<Lag>,
) -> Assessment {
    let mut found = Assessment::default();
    if !holds_slot(record) {
        return found;
    }
    let detached = record.phase == Phase::CutOver;
    let fix = "abort (`walbridge abort`) and start again";
    if !slot.exists {
        let source = record
            .source
            .as_ref()
            .map(|s| format!("database {} of system {}", s.database, s.system_identifier))
            .unwrap_or_else(|| "the source".to_owned());
        let message = format!(
            "replication slot {} is missing on the source ({source}, the server the migration started on): it was \
             dropped, or the source failed over — a promoted standby has the same system identifier but not the \
             primary's logical slots (before PostgreSQL 17's failover slots); the changes since the copy cannot be \
             streamed any more: {fix}",
            record.slot
        );
        push_lost(&mut found, detached, message);
        return found;
    }
    if slot.wal_status == "lost" {
        let message = format!(
            "replication slot {} was invalidated on the source (wal_status = lost): it needed more WAL than \
             max_slot_wal_keep_size lets a slot keep, while the subscriber was behind or paused; the changes since \
             the copy are gone: raise max_slot_wal_keep_size on the source (or set it to -1) and keep the \
             subscriber applying, then {fix}",
            record.slot
        );
        push_lost(&mut found, detached, message);
        return found;
    }
    if slot.wal_status == "unreserved" {
        found.warnings.push((
            "unreserved",
            format!(
                "replication slot {} holds {} bytes of WAL, more than max_slot_wal_keep_size: the source's next \
                 checkpoint invalidates it (wal_status unreserved); raise max_slot_wal_keep_size on the source now \
                 (ALTER SYSTEM SET max_slot_wal_keep_size = ...; SELECT pg_reload_conf())",
                record.slot, slot.retained_wal_bytes
            ),
        ));
    } else if let Some(safe) = slot.safe_wal_bytes
        && (safe <= 0 || safe as u64 <= slot.retained_wal_bytes)
    {
        found.warnings.push((
            "safe_wal_size",
            format!(
                "replication slot {} holds {} bytes of WAL, and {} more bytes written on the source would make \
                 max_slot_wal_keep_size invalidate it (safe_wal_size): raise max_slot_wal_keep_size on the source, \
                 or let the subscriber catch up",
                record.slot,
                slot.retained_wal_bytes,
                safe.max(0)
            ),
        ));
    }
    if slot.retained_wal_bytes > retained_wal_warning {
        found.warnings.push((
            "retained_wal",
            format!(
                "slot {} holds {} bytes of WAL on the source (over streaming.retained_wal_warning, \
                 {retained_wal_warning}): a stalled subscription fills the source's disk",
                record.slot, slot.retained_wal_bytes
            ),
        ));
    }
    if matches!(record.phase, Phase::Streaming | Phase::Cutover)
        && let Some(lag) = lag
        && lag.bytes > 0
        && let Some(age) = slot.reply_age_seconds
        && age > REPLY_STALE.as_secs_f64()
    {
        found.warnings.push((
            "reply",
            format!(
                "the subscriber has not reported to the source for {age:.0} s while {} bytes wait for it (lag {:.0} \
                 s): its apply worker may be blocked — a lock on a target table, a long transaction there; the \
                 target's pg_stat_activity and server log say which",
                lag.bytes, lag.seconds
            ),
        ));
    }
    found
}

fn push_lost(found: &mut Assessment, detached: bool, message: String) {
    if detached {
        // The target stands alone: nothing depends on the slot any more.
        found.warnings.push((
            "lost",
            format!("{message} (after the cutover this is harmless; cleanup drops it)"),
        ));
    } else {
        found.lost = Some(Fault::new(FaultKind::SlotLost, message));
    }
}

/// Watches the current migration's slot until `shutdown`: a sample every
/// second (for the lag clock), warnings logged when they first appear and
/// every minute while they last, and a lost slot reported to the runner.
pub async fn watch(runner: Arc<Runner>, shutdown: CancellationToken) {
    let ctx = runner.ctx().clone();
    let mut logged: HashMap<&'static str, Instant> = HashMap::new();
    let mut tick: u32 = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SAMPLE_INTERVAL) => {}
            _ = shutdown.cancelled() => return,
        }
        tick = tick.wrapping_add(1);
        let Ok(Some(record)) = ctx.state.current() else {
            continue;
        };
        if !holds_slot(&record) {
            logged.clear();
            continue;
        }
        // Away, or refused because it reaches another source: status says
        // why; nothing can be learnt of the slot meanwhile.
        let Ok(agent) = crate::steps::verified_agent(&ctx, &record).await else {
            continue;
        };
        let Ok(slot) = crate::steps::cutover::slot_status(&agent, &record.slot).await else {
            continue;
        };
        let lag = ctx.slot_watch.observe(&record.slot, &slot);
        let lost = !slot.exists || slot.wal_status == "lost";
        if !lost && !tick.is_multiple_of(WARN_EVERY) {
            continue;
        }
        let assessment = assess(&record, &slot, ctx.settings.retained_wal_warning, lag);
        let keys: Vec<&'static str> = assessment.warnings.iter().map(|(key, _)| *key).collect();
        logged.retain(|key, _| keys.contains(key));
        for (key, warning) in &assessment.warnings {
            if logged.get(key).is_none_or(|at| at.elapsed() >= LOG_AGAIN) {
                tracing::warn!(migration = %record.id, slot = %record.slot, "{warning}");
                logged.insert(key, Instant::now());
            }
        }
        if let Some(fault) = assessment.lost {
            report_lost(&runner, &ctx, &record, fault).await;
        }
    }
}

/// A lost slot ends the migration: a step that runs is stopped with the
/// fault (the runner fails it), a streaming migration is failed now.
async fn report_lost(runner: &Arc<Runner>, ctx: &Context, seen: &MigrationRecord, fault: Fault) {
    // The record may have moved on while the slot was asked about (an
    // abort dropped it, a copy restart abandoned it).
    let Ok(Some(record)) = ctx.state.current() else {
        return;
    };
    if record.id != seen.id || record.slot != seen.slot || !holds_slot(&record) {
        return;
    }
    tracing::error!(migration = %record.id, slot = %record.slot, kind = fault.kind.name(), "{fault}");
    ctx.slot_watch.set_lost(&record.slot, fault.clone());
    if record.phase == Phase::Streaming
        && let Err(e) = runner.fail_streaming(fault).await
    {
        tracing::warn!(error = %e, "the migration whose slot is lost will be failed once the runner is free");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock_lag(clock: &LagClock, start: Instant, seconds: f64, current: u64, confirmed: u64) -> Lag {
        clock.observe(
            "s",
            start + Duration::from_secs_f64(seconds),
            Lsn(current),
            Lsn(confirmed),
        )
    }

    #[test]
    fn a_stuck_subscriber_lags_by_the_time_since_the_source_passed_it() {
        let clock = LagClock::default();
        let t0 = Instant::now();
        // Caught up, then the subscriber stops confirming at 1000 while
        // the source keeps writing.
        assert_eq!(clock_lag(&clock, t0, 0.0, 1000, 1000).seconds, 0.0);
        let lag = clock_lag(&clock, t0, 1.0, 5000, 1000);
        assert!(lag.measured && lag.seconds == 0.0, "{lag:?}: first seen beyond now");
        let lag = clock_lag(&clock, t0, 2.0, 9000, 1000);
        assert!(lag.measured && (lag.seconds - 1.0).abs() < 1e-9, "{lag:?}");
        let lag = clock_lag(&clock, t0, 12.0, 90_000, 1000);
        assert!((lag.seconds - 11.0).abs() < 1e-9 && lag.bytes == 89_000, "{lag:?}");
        // It catches up half-way: the source was at 9000 from 2 s and
        // first seen beyond it at 12 s (within one sample, here 10 s).
        let lag = clock_lag(&clock, t0, 13.0, 95_000, 9000);
        assert!(lag.measured && (lag.seconds - 1.0).abs() < 1e-9, "{lag:?}");
        let lag = clock_lag(&clock, t0, 14.0, 95_000, 95_000);
        assert_eq!((lag.seconds, lag.bytes), (0.0, 0));
    }

    #[test]
    fn the_lag_is_how_long_the_oldest_unconfirmed_wal_has_existed() {
        let clock = LagClock::default();
        let t0 = Instant::now();
        clock_lag(&clock, t0, 0.0, 100, 100);
        clock_lag(&clock, t0, 1.0, 200, 100);
        clock_lag(&clock, t0, 2.0, 300, 100);
        clock_lag(&clock, t0, 3.0, 400, 100);
        // Confirmed 250: the source first went beyond it at 2 s.
        let lag = clock_lag(&clock, t0, 4.0, 400, 250);
        assert!(lag.measured && (lag.seconds - 2.0).abs() < 1e-9, "{lag:?}");
    }

    #[test]
    fn an_idle_sources_housekeeping_wal_confirmed_at_once_is_no_lag() {
        let clock = LagClock::default();
        let t0 = Instant::now();
        clock_lag(&clock, t0, 0.0, 1000, 1000);
        // A checkpoint's record appears; the subscriber has not said so yet.
        let lag = clock_lag(&clock, t0, 60.0, 1100, 1000);
        assert_eq!(lag.seconds, 0.0, "{lag:?}");
        assert_eq!(clock_lag(&clock, t0, 60.3, 1100, 1100).seconds, 0.0);
    }

    #[test]
    fn without_history_the_lag_is_a_lower_bound() {
        let clock = LagClock::default();
        let t0 = Instant::now();
        let lag = clock_lag(&clock, t0, 0.0, 5000, 1000);
        assert!(!lag.measured && lag.seconds == 0.0, "{lag:?}");
        let lag = clock_lag(&clock, t0, 3.0, 6000, 1000);
        assert!(!lag.measured && (lag.seconds - 3.0).abs() < 1e-9, "{lag:?}");
        // Another slot starts afresh.
        let lag = clock.observe("other", t0 + Duration::from_secs(4), Lsn(6000), Lsn(6000));
        assert!(lag.measured && lag.seconds == 0.0);
    }

    fn record(phase: Phase) -> MigrationRecord {
        serde_json::from_value(serde_json::json!({
            "id": "m1", "agent": "east", "selection": {"tables": [], "exclude": []}, "parallel": 2,
            "verify": true, "slot": "walbridge_m1", "publication": "walbridge_m1", "phase": phase,
            "snapshot": null, "pre_data_applied": true, "post_data": [], "post_data_applied": 0,
            "publication_tables": [], "dump_exclude": [], "materialized_views": [], "copy_restarts": 0,
            "stale_slots": [], "events": [], "error": null,
            "source": {"system_identifier": 42, "database": "app"}
        }))
        .expect("a record")
    }

    #[test]
    fn a_lost_or_missing_slot_is_a_fault_with_its_fix_until_the_cutover() {
        let lost = wire::SlotStatusResponse {
            exists: true,
            wal_status: "lost".into(),
            ..Default::default()
        };
        for phase in [Phase::Copy, Phase::SchemaPostData, Phase::Streaming] {
            let found = assess(&record(phase), &lost, u64::MAX, None);
            let fault = found.lost.expect("lost");
            assert_eq!(fault.kind, FaultKind::SlotLost);
            assert!(fault.message.contains("max_slot_wal_keep_size"), "{fault}");
        }
        let missing = wire::SlotStatusResponse::default();
        let fault = assess(&record(Phase::Copy), &missing, u64::MAX, None).lost.unwrap();
        assert!(
            fault.message.contains("failed over") && fault.message.contains("system 42"),
            "{fault}"
        );
        let after = assess(&record(Phase::CutOver), &lost, u64::MAX, None);
        assert!(after.lost.is_none() && after.warnings.len() == 1, "{after:?}");
        // No slot yet, or no longer: nothing to judge.
        assert_eq!(
            assess(&record(Phase::Snapshot), &missing, u64::MAX, None),
            Assessment::default()
        );
        assert_eq!(
            assess(&record(Phase::Aborted), &missing, u64::MAX, None),
            Assessment::default()
        );
    }

    #[test]
    fn a_slot_near_its_limit_or_a_silent_subscriber_is_warned_about() {
        let slot = wire::SlotStatusResponse {
            exists: true,
            wal_status: "reserved".into(),
            retained_wal_bytes: 600,
            safe_wal_bytes: Some(400),
            reply_age_seconds: Some(40.0),
            ..Default::default()
        };
        let lag = Lag {
            bytes: 500,
            seconds: 40.0,
            measured: true,
        };
        let found = assess(&record(Phase::Streaming), &slot, 10_000, Some(lag));
        let keys: Vec<&str> = found.warnings.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, ["safe_wal_size", "reply"], "{found:?}");
        // During the copy there is no subscriber to be silent.
        let found = assess(&record(Phase::Copy), &slot, 100, Some(lag));
        let keys: Vec<&str> = found.warnings.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, ["safe_wal_size", "retained_wal"], "{found:?}");
        // An idle subscriber that last reported 40 s ago but owes nothing.
        let idle = Lag {
            bytes: 0,
            seconds: 0.0,
            measured: true,
        };
        let healthy = wire::SlotStatusResponse {
            safe_wal_bytes: None,
            ..slot
        };
        assert!(
            assess(&record(Phase::Streaming), &healthy, 10_000, Some(idle))
                .warnings
                .is_empty()
        );
    }
}
