//! The cutover, as DESIGN.md step 11 orders it: wait for lag; fence the
//! source's writes; wait until the target has applied everything up to
//! the fence; copy every sequence; seal the fence (it now survives the
//! agent); detach the subscription in two recorded statements.
//!
//! It runs as a task the runner owns, not inside the API call that asked
//! for it: a CLI that goes away changes nothing. Its one **point of no
//! return** is the second detach statement (`slot_name = NONE`): before
//! it, any failure lifts the fence and re-enables the subscription, and
//! the source carries on as before; after it, the target stands alone and
//! what remains is only recorded. A controller that dies in between is
//! resolved at startup by [`resolve_interrupted`], from what the target
//! says of the subscription, not from what the journal hoped.

use std::str::FromStr;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_postgres::Client;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use walbridge_daemon::crash_point;
use walbridge_migration::failpoint as fp;
use walbridge_migration::fault::{Fault, Policy};
use walbridge_migration::ident::QualifiedName;
use walbridge_migration::lsn::Lsn;
use walbridge_proto::convert::name_to_wire;
use walbridge_proto::v1 as wire;
use wire::fence_command::Command;
use wire::fence_event::Event;

use super::{StepError, save, teardown};
use crate::migration::{Context, CutoverReport, Detach, MigrationRecord, Phase};
use crate::registry::AgentClient;
use crate::subscription::{self, State};
use crate::target::{self, Purpose};

/// How often lag (and catch-up on the slot) are polled.
const POLL: Duration = Duration::from_millis(25);
/// How often the target is asked for the fence's mark: writes wait
/// meanwhile, and each question is one indexless look at a few rows.
const MARK_POLL: Duration = Duration::from_millis(2);
/// How long the fence waits for any one table's lock per attempt: writers
/// on the tables it already holds wait about this long at most, each time.
const FENCE_TABLE_LOCK_TIMEOUT: Duration = Duration::from_millis(200);
/// The agent lifts a fence nobody sealed this long after the cutover's
/// deadline (and the source's server a little after that, by itself).
const FENCE_HOLD_MARGIN: Duration = Duration::from_secs(5);
/// New apply errors during the lag gate that refuse the cutover at once.
const REFUSING_ERRORS: u64 = 2;
/// With WAL waiting for it, a subscriber silent for longer than the lag
/// bound plus this is not keeping up, whatever its last position says.
const REPLY_SLACK: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct Options {
    pub max_lag: Duration,
    pub timeout: Duration,
    pub dry_run: bool,
    /// Roles the seal makes NOLOGIN (the hard fence).
    pub hard_fence_roles: Vec<String>,
}

/// The steps taken so far, each with its duration, shown by `status`
/// while the cutover runs.
struct Steps<'a> {
    report: CutoverReport,
    last: Instant,
    ctx: &'a Context,
}

impl Steps<'_> {
    fn done(&mut self, name: &str, detail: impl Into<String>) {
        let seconds = self.last.elapsed().as_secs_f64();
        let detail = detail.into();
        tracing::info!(step = name, seconds, %detail, "cutover step done");
        self.report.steps.push((name.to_owned(), seconds, detail));
        self.ctx.state.set_live_cutover(Some(self.report.clone()));
        self.last = Instant::now();
    }
}

pub fn report_to_wire(report: &CutoverReport) -> wire::CutoverResponse {
    wire::CutoverResponse {
        done: report.done,
        steps: report
            .steps
            .iter()
            .map(|(name, seconds, detail)| wire::CutoverStep {
                name: name.clone(),
                seconds: *seconds,
                detail: detail.clone(),
            })
            .collect(),
        write_downtime_seconds: report.write_downtime_seconds,
        fence_lsn: report.fence_lsn.clone(),
        error: report.error.clone(),
    }
}

/// Runs the cutover of a streaming migration to its end and returns its
/// report (a failed cutover is a report with its error, the migration
/// streaming again).
/// `stop` (the controller shutting down) ends the waits early, which rolls
/// the cutover back like any failure before the point of no return.
pub async fn run(
    ctx: &Context,
    agent: &AgentClient,
    options: Options,
    stop: &CancellationToken,
) -> Result<CutoverReport, StepError> {
    // The lag gate may outlive the agent's link: it goes on with the link
    // that replaced it, and so does the rest of the cutover.
    let mut agent = agent.clone();
    let mut record = ctx
        .state
        .current()?
        .ok_or_else(|| crate::fault::internal("there is no migration"))?;
    let mut steps = Steps {
        report: CutoverReport::default(),
        last: Instant::now(),
        ctx,
    };
    let deadline = Instant::now() + options.timeout;
    // One session for the whole cutover: it polls, and it must not pay a
    // connection per question while writes wait.
    let target = target::connect(ctx.target()?, Purpose::Control).await?;

    match wait_for_lag(ctx, &target, &mut agent, &record, &options, Until { deadline, stop }).await {
        Ok(lag) => steps.done("lag", lag),
        Err(error) => {
            steps.report.error = error;
            return Ok(steps.report);
        }
    }
    if options.dry_run {
        let sequences = sequences(&agent).await?;
        steps.done(
            "dry run",
            format!(
                "would fence {} tables and copy {} sequences; nothing was changed",
                record.publication_tables.len(),
                sequences.len()
            ),
        );
        return Ok(steps.report);
    }

    if !record.skip_large_objects {
        // Brought up to date before the fence too, so that the pass while
        // fenced copies only what changed in between.
        if let Err(fault) = crate::large_objects::sync(ctx, &agent, "").await {
            steps.report.error = format!("bringing the large objects up to date failed: {fault}; nothing was fenced");
            return Ok(steps.report);
        }
    }
    record.phase = Phase::Cutover;
    record.detach = Detach::default();
    // The last cutover's report is this one's from now on: one that is
    // journaled while the phase is still `cutover` failed before its
    // rollback could finish.
    record.cutover = None;
    save(ctx, &record).await?;
    crash_point!(fp::CUTOVER_STARTED);
    let until = Until { deadline, stop };
    let outcome = fence_and_switch(
        ctx,
        &target,
        &agent,
        &mut record,
        &mut steps,
        &options.hard_fence_roles,
        until,
    )
    .await;
    match outcome {
        Ok(()) => {
            steps.report.done = true;
            record.phase = Phase::CutOver;
            tracing::warn!(
                downtime = steps.report.write_downtime_seconds,
                "cutover done: the target stands alone; the source stays fenced until release-source"
            );
        }
        Err(error) if record.fence_sealed || record.detach.disabled => {
            // The rollback could not be finished (the agent is away, say):
            // the phase stays `cutover`, and the runner's drive finishes it
            // as a restarted controller would (`resolve_interrupted`).
            tracing::error!(%error, "cutover failed; its rollback waits to be finished");
            record.events.push(format!(
                "cutover failed: {error}; the fence may still be sealed or the subscription disabled: the \
                 controller lifts and re-enables them as soon as it can, then streaming goes on"
            ));
            steps.report.error = error;
        }
        Err(error) => {
            tracing::error!(%error, "cutover failed; the fence is lifted and streaming goes on");
            record.events.push(format!(
                "cutover failed: {error}; the fence was lifted, streaming goes on"
            ));
            steps.report.error = error;
            record.phase = Phase::Streaming;
        }
    }
    record.cutover = Some(steps.report.clone());
    ctx.state.set_live_cutover(None);
    save(ctx, &record).await?;
    crash_point!(fp::CUTOVER_RECORDED);
    Ok(steps.report)
}

pub async fn slot_status(agent: &AgentClient, slot: &str) -> Result<wire::SlotStatusResponse, Fault> {
    agent
        .clone()
        .slot_status(wire::SlotStatusRequest { slot: slot.to_owned() })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| crate::fault::agent("cannot read the slot on the source", &s))
}

async fn sequences(agent: &AgentClient) -> Result<Vec<wire::SequenceState>, Fault> {
    agent
        .clone()
        .sequences(wire::SequencesRequest {})
        .await
        .map(|r| r.into_inner().sequences)
        .map_err(|s| crate::fault::agent("cannot read the source's sequences", &s))
}

/// How long the cutover may go on: until its deadline, or until the
/// controller stops.
#[derive(Clone, Copy)]
struct Until<'a> {
    deadline: Instant,
    stop: &'a CancellationToken,
}

impl Until<'_> {
    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Waits one poll; an error once the controller stops.
    async fn poll(&self) -> Result<(), String> {
        self.wait(POLL).await
    }

    /// Waits `pause`; an error once the controller stops.
    async fn wait(&self, pause: Duration) -> Result<(), String> {
        tokio::select! {
            _ = tokio::time::sleep(pause) => Ok(()),
            _ = self.stop.cancelled() => Err("the controller is shutting down".to_owned()),
        }
    }
}

/// The gate before anything is fenced: waits until the subscription
/// streams, its slot is sound, and the subscriber keeps up — lag in time
/// within the bound (the controller's measure: how long ago the source
/// was where the subscriber has confirmed now), and, while WAL waits for
/// it, a subscriber that has reported recently; it refuses at once when
/// the subscription hits new apply errors or the slot is lost. Returns the
/// step's detail; on refusal, why, and nothing was fenced.
async fn wait_for_lag(
    ctx: &Context,
    target: &Client,
    agent: &mut AgentClient,
    record: &MigrationRecord,
    options: &Options,
    until: Until<'_>,
) -> Result<String, String> {
    let bound = options.max_lag.as_secs_f64();
    let reply_bound = (options.max_lag + REPLY_SLACK).as_secs_f64();
    let (_, errors_before) = subscription::health(target, &record.subscription)
        .await
        .map_err(|f| f.to_string())?;
    loop {
        // Nothing is fenced yet: a link that blips (or an agent that
        // reconnects) is waited for until the deadline, not a refusal.
        let slot = match slot_status(agent, &record.slot).await {
            Ok(slot) => slot,
            Err(fault) if fault.policy() == Policy::Retry && Instant::now() < until.deadline => {
                tracing::info!(error = %fault, "the lag gate could not read the slot; it asks again");
                until.poll().await?;
                if let Ok(current) = crate::steps::verified_agent(ctx, record).await {
                    *agent = current;
                }
                continue;
            }
            Err(fault) => return Err(format!("{fault}; nothing was fenced")),
        };
        let (state, errors) = subscription::health(target, &record.subscription)
            .await
            .map_err(|f| f.to_string())?;
        if let Some(lost) = crate::slot_watch::assess(record, &slot, ctx.settings.retained_wal_warning, None).lost {
            return Err(format!("{}; nothing was fenced", lost.explained()));
        }
        // One new error may be a subscriber that restarted (PostgreSQL
        // 15+ counts a dropped WAL stream too, and the tunnel drops
        // whenever a daemon restarts): it is waited for like any lag.
        // Errors that keep coming (the apply worker fails again after
        // each restart) refuse at once.
        if errors >= errors_before + REFUSING_ERRORS {
            return Err(format!(
                "subscription {} hit {} new errors applying changes while the cutover waited (the target's \
                 server log says what fails): it is not keeping up; nothing was fenced",
                record.subscription,
                errors - errors_before
            ));
        }
        let lag = ctx
            .slot_watch
            .observe(&record.slot, &slot)
            .ok_or_else(|| format!("the slot's position cannot be read ({:?})", slot.current_lsn))?;
        let silent = lag.bytes > 0 && slot.reply_age_seconds.is_some_and(|age| age > reply_bound);
        let keeps_up = state == State::Streaming && slot.active && lag.measured && lag.seconds <= bound && !silent;
        let described = describe_lag(&lag, &slot, state);
        if keeps_up {
            return Ok(format!("{described} (bound {bound:.3} s)"));
        }
        if Instant::now() >= until.deadline {
            return Err(format!(
                "the lag did not come under {:?} within {:?}: {described}; nothing was fenced",
                options.max_lag, options.timeout
            ));
        }
        until.poll().await?;
    }
}

/// The subscriber's lag as the gate sees it, in one phrase.
fn describe_lag(lag: &crate::slot_watch::Lag, slot: &wire::SlotStatusResponse, state: State) -> String {
    let behind = if lag.measured {
        format!("{:.3} s behind", lag.seconds)
    } else {
        format!(
            "at least {:.3} s behind (the controller has not seen the source where the subscriber is)",
            lag.seconds
        )
    };
    let reply = match slot.reply_age_seconds {
        Some(age) => format!("; its last report {age:.1} s ago"),
        None => String::new(),
    };
    let state = match (state, slot.active) {
        (State::Streaming, true) => String::new(),
        (State::Streaming, false) => "; no walsender serves the slot".to_owned(),
        (other, _) => format!(
            "; subscription {}",
            if other.name().is_empty() {
                "missing"
            } else {
                other.name()
            }
        ),
    };
    format!("{behind}, {} bytes{reply}{state}", lag.bytes)
}

/// Fence, catch up, sequences, seal, detach. On error before the point of
/// no return, the fence is lifted and the subscription enabled again
/// before returning.
async fn fence_and_switch(
    ctx: &Context,
    target: &Client,
    agent: &AgentClient,
    record: &mut MigrationRecord,
    steps: &mut Steps<'_>,
    nologin_roles: &[String],
    until: Until<'_>,
) -> Result<(), String> {
    let (commands, command_stream) = mpsc::channel(2);
    let mark = walbridge_migration::mark::table(&record.id);
    let hold = wire::FenceHold {
        migration: record.id.clone(),
        tables: record.publication_tables.iter().cloned().map(name_to_wire).collect(),
        lock_timeout_ms: until.remaining().as_millis().max(1) as u64,
        table_lock_timeout_ms: FENCE_TABLE_LOCK_TIMEOUT.as_millis() as u64,
        // The agent lifts a fence the controller forgot (it died, hung),
        // and the source's server one whose agent is cut off.
        max_hold_ms: (until.remaining() + FENCE_HOLD_MARGIN).as_millis() as u64,
        nologin_roles: nologin_roles.to_vec(),
        mark: Some(name_to_wire(mark.clone())),
    };
    let _ = commands
        .send(wire::FenceCommand {
            command: Some(Command::Hold(hold)),
        })
        .await;
    let mut events = agent
        .clone()
        .fence(ReceiverStream::new(command_stream))
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    let (fence_lsn, attempts, marked) = match events.message().await {
        Ok(Some(wire::FenceEvent {
            event: Some(Event::Held(held)),
        })) => (held.lsn, held.attempts, held.marked),
        Ok(_) => return Err("the agent ended the fence before holding it".to_owned()),
        Err(status) => return Err(status.message().to_owned()),
    };
    let fenced_at = Instant::now();
    steps.report.fence_lsn = fence_lsn.clone();
    steps.done(
        "fence",
        format!("writes wait from {fence_lsn} (locks taken at attempt {attempts})"),
    );
    crash_point!(fp::CUTOVER_FENCED);

    let before_seal = async {
        if marked {
            catch_up_on_target(target, &mark, &fence_lsn, until).await?;
            steps.done(
                "catch up",
                format!("the target applied everything up to {fence_lsn}, on disk there (the fence's mark arrived)"),
            );
        } else {
            catch_up(agent, &record.slot, &fence_lsn, until).await?;
            steps.done("catch up", format!("the target applied everything up to {fence_lsn}"));
        }
        // Looked at again now that nothing changes: a table or a column
        // that appeared since the checks before the fence would be left
        // behind by a seal that then refuses its writes.
        let (unseen, drift) = tokio::join!(
            crate::catalog_watch::unseen(ctx, agent, record),
            crate::drift::detect(ctx, agent, record)
        );
        let unseen = unseen.map_err(|f| format!("cannot look at the source's tables again while fenced: {f}"))?;
        if !unseen.is_empty() {
            return Err(format!(
                "tables were created on the source while the cutover began: {}; they are not migrated yet, so the \
                 fence is lifted: run cutover again once status shows them streamed",
                unseen.join(", ")
            ));
        }
        let drift = drift.map_err(|f| format!("cannot compare the schemas again while fenced: {f}"))?;
        if !drift.is_empty() {
            return Err(format!(
                "the source's tables changed while the cutover began: {}; the fence is lifted: `walbridge \
                 sync-schema`, then cutover again",
                crate::drift::describe(&drift)
            ));
        }
        steps.done(
            "recheck",
            "no table or column appeared since the checks before the fence",
        );
        let copied = copy_sequences(agent, target).await?;
        steps.done("sequences", copied);
        if !record.skip_large_objects {
            // Not carried by the subscription: the ones created, changed or
            // deleted since the copy, now that nothing writes them.
            // Bounded by the cutover's deadline: writes wait meanwhile.
            let synced = tokio::time::timeout(until.remaining(), crate::large_objects::sync(ctx, agent, ""))
                .await
                .map_err(|_| "bringing the large objects up to date took past the cutover's deadline".to_owned())?
                .map_err(|f| format!("bringing the large objects up to date failed: {f}"))?;
            if synced.seen + synced.deleted > 0 {
                steps.done(
                    "large objects",
                    format!("{} copied again, {} removed", synced.copied, synced.deleted),
                );
            }
        }
        // Once `seal` is sent the agent may commit the seal and die before
        // it says so: from here on the fence counts as sealed (journaled
        // first), and a failure lifts it through the agent, not the stream.
        record.fence_sealed = true;
        ctx.state.save(record).await.map_err(|e| e.to_string())
    };
    // The fence's stream is watched meanwhile: the agent lifts the fence
    // by itself when its link breaks, and nothing else would say so while
    // the catch-up waits on the target.
    let outcome = tokio::select! {
        outcome = before_seal => outcome,
        event = events.message() => Err(match event {
            Ok(Some(wire::FenceEvent { event: Some(Event::Lifted(_)) })) => {
                "the agent lifted the fence before it could be sealed".to_owned()
            }
            Ok(_) => "the fence ended before it could be sealed: the agent's link broke, and the agent lifted it"
                .to_owned(),
            Err(status) => format!("the fence ended before it could be sealed: {}", status.message()),
        }),
    };
    if let Err(error) = outcome {
        lift(&commands, &mut events).await;
        record.fence_sealed = false;
        return Err(error);
    }
    let _ = commands
        .send(wire::FenceCommand {
            command: Some(Command::Seal(wire::FenceSeal {})),
        })
        .await;
    let sealed = match events.message().await {
        Ok(Some(wire::FenceEvent {
            event: Some(Event::Sealed(sealed)),
        })) => Ok(sealed),
        Ok(_) => Err("the agent lifted the fence before it could be sealed".to_owned()),
        Err(status) => Err(status.message().to_owned()),
    };
    let sealed = match sealed {
        Ok(sealed) => sealed,
        Err(error) => {
            lift(&commands, &mut events).await;
            roll_back(ctx, target, agent, record).await;
            return Err(error);
        }
    };
    steps.done("seal", seal_summary(&sealed, nologin_roles));
    crash_point!(fp::CUTOVER_SEALED);

    if let Err(error) = detach(ctx, target, record).await {
        // Not past the point of no return: the source must not stay
        // fenced, and the subscription streams again.
        roll_back(ctx, target, agent, record).await;
        return Err(format!("detaching the subscription failed: {error}"));
    }
    // ---- the point of no return is behind us: the target stands alone ----
    steps.report.write_downtime_seconds = fenced_at.elapsed().as_secs_f64();
    steps.done(
        "detach",
        format!("subscription {} disabled, its slot let go", record.subscription),
    );
    Ok(())
}

/// What the seal step says it did: writes on the source now fail.
fn seal_summary(sealed: &wire::FenceSealed, nologin_roles: &[String]) -> String {
    let mut summary = format!(
        "writes on the source now fail, and will after any restart: {} tables fenced, {} sequences at their limit",
        sealed.tables, sealed.sequences
    );
    if !nologin_roles.is_empty() {
        summary.push_str(&format!(
            ", {} NOLOGIN ({} could log in)",
            nologin_roles.join(", "),
            sealed.roles
        ));
    }
    for note in &sealed.notes {
        summary.push_str("; ");
        summary.push_str(note);
    }
    summary
}

/// The two statements of the detach, each recorded once done, so that a
/// detach cut short is finished or rolled back from where it was.
async fn detach(ctx: &Context, target: &Client, record: &mut MigrationRecord) -> Result<(), Fault> {
    if !record.detach.disabled {
        subscription::disable(target, &record.subscription).await?;
        crash_point!(fp::CUTOVER_DISABLE_COMMITTED);
        record.detach.disabled = true;
        ctx.state.save(record).await.map_err(crate::fault::journal)?;
        crash_point!(fp::CUTOVER_DISABLE_RECORDED);
    }
    subscription::release_slot(target, &record.subscription).await?;
    crash_point!(fp::CUTOVER_DETACH_COMMITTED);
    record.detach.slot_released = true;
    ctx.state.save(record).await.map_err(crate::fault::journal)
}

/// Before the point of no return: lift the sealed fence and let the
/// subscription apply again. Each part is attempted; what fails is
/// recorded for the operator (and retried by the startup resolution).
async fn roll_back(ctx: &Context, target: &Client, agent: &AgentClient, record: &mut MigrationRecord) {
    if record.detach.disabled {
        match subscription::enable(target, &record.subscription).await {
            Ok(()) => record.detach.disabled = false,
            Err(e) => record
                .events
                .push(format!("could not re-enable subscription {}: {e}", record.subscription)),
        }
    }
    match teardown::release_fence(agent, record).await {
        Ok(_) => record.fence_sealed = false,
        Err(e) => record.events.push(format!("could not lift the fence: {e}")),
    }
    if let Err(e) = ctx.state.save(record).await {
        tracing::error!(error = %e, "cannot record the cutover's rollback");
    }
}

async fn lift(commands: &mpsc::Sender<wire::FenceCommand>, events: &mut tonic::Streaming<wire::FenceEvent>) {
    let _ = commands
        .send(wire::FenceCommand {
            command: Some(Command::Lift(wire::FenceLift {})),
        })
        .await;
    // Lifted, or the stream is gone (and the fence's transaction with it).
    let _ = tokio::time::timeout(Duration::from_secs(10), events.message()).await;
}

/// Waits until the fence's mark shows on the target, then makes what the
/// target applied durable there.
///
/// Why this is as safe as waiting for the slot's confirmed position (the
/// subscriber's report that it flushed past the fence): the subscription
/// applies the source's transactions one at a time in their commit order,
/// so once the mark's row is visible, every write the source committed
/// before the fence is committed on the target too — but the apply worker
/// commits asynchronously, so perhaps not yet on disk. The transaction
/// committed next, with `synchronous_commit = on` and an xid of its own,
/// flushes the target's WAL up to its own commit record, which lies after
/// every commit the apply worker made before the mark was seen: from then
/// on a crash of the target loses none of them. The subscriber's report
/// would have said the same, a WAL writer's delay or two later.
async fn catch_up_on_target(
    target: &Client,
    mark: &QualifiedName,
    fence_lsn: &str,
    until: Until<'_>,
) -> Result<(), String> {
    let failed = |e: tokio_postgres::Error| {
        format!(
            "cannot look for the fence's mark on the target: {}",
            walbridge_daemon::pg::describe(&e)
        )
    };
    let arrived = target
        .prepare(&format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE fence_lsn = $1)",
            mark.quoted()
        ))
        .await
        .map_err(failed)?;
    loop {
        if target
            .query_one(&arrived, &[&fence_lsn])
            .await
            .map_err(failed)?
            .get::<_, bool>(0)
        {
            break;
        }
        if Instant::now() >= until.deadline {
            return Err(format!(
                "the target did not catch up to the fence ({fence_lsn}) in time: its mark has not arrived"
            ));
        }
        until.wait(MARK_POLL).await?;
    }
    target
        .batch_execute("BEGIN; SET LOCAL synchronous_commit = on; SELECT txid_current(); COMMIT")
        .await
        .map_err(|e| {
            format!(
                "cannot make the applied writes durable on the target: {}",
                walbridge_daemon::pg::describe(&e)
            )
        })
}

/// Waits until the slot's confirmed position passes the fence: the target
/// has applied and flushed every write the source committed before it
/// (for a migration whose source has no mark table).
async fn catch_up(agent: &AgentClient, slot: &str, fence_lsn: &str, until: Until<'_>) -> Result<(), String> {
    let fence = Lsn::from_str(fence_lsn).map_err(|e| e.to_string())?;
    loop {
        let status = slot_status(agent, slot).await.map_err(|f| f.to_string())?;
        if Lsn::from_str(&status.confirmed_flush_lsn).is_ok_and(|confirmed| confirmed >= fence) {
            return Ok(());
        }
        if Instant::now() >= until.deadline {
            return Err(format!(
                "the target did not catch up to the fence ({fence_lsn}) in time (confirmed {})",
                status.confirmed_flush_lsn
            ));
        }
        until.poll().await?;
    }
}

/// Sets every target sequence from the source's state: one statement, so
/// one round trip while writes wait, however many sequences there are.
async fn copy_sequences(agent: &AgentClient, target: &Client) -> Result<String, String> {
    let sequences = sequences(agent).await.map_err(|f| f.to_string())?;
    let names: Vec<String> = sequences
        .iter()
        .map(|s| walbridge_proto::convert::name_from_wire(s.name.clone().unwrap_or_default()).quoted())
        .collect();
    let values: Vec<i64> = sequences.iter().map(|s| s.last_value).collect();
    let called: Vec<bool> = sequences.iter().map(|s| s.is_called).collect();
    // The projection runs after the filter: setval only sees sequences
    // that exist on the target; the ones it set come back.
    let rows = target
        .query(
            "SELECT name, setval(name::regclass, value, called) \
             FROM unnest($1::text[], $2::int8[], $3::bool[]) AS s(name, value, called) \
             WHERE to_regclass(name) IS NOT NULL",
            &[&names as &(dyn tokio_postgres::types::ToSql + Sync), &values, &called],
        )
        .await
        .map_err(|e| format!("setting the sequences failed: {}", walbridge_daemon::pg::describe(&e)))?;
    let set: std::collections::HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
    let missing: Vec<&String> = names.iter().filter(|n| !set.contains(*n)).collect();
    Ok(if missing.is_empty() {
        format!("{} sequences set from the source", set.len())
    } else {
        let missing: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
        format!("{} sequences set; not on the target: {}", set.len(), missing.join(", "))
    })
}

/// A cutover the controller did not see to its end (it restarted). The
/// fence's stream died with it, so an unsealed fence is already gone. What
/// the target says decides: a subscription without its slot is past the
/// point of no return (the cutover is done); anything else is rolled back
/// — a disabled subscription enabled again, a sealed fence lifted — and
/// streaming goes on.
pub async fn resolve_interrupted(
    ctx: &Context,
    agent: &AgentClient,
    record: &mut MigrationRecord,
) -> Result<(), StepError> {
    let target = target::connect(ctx.target()?, Purpose::Control).await?;
    // No report: the controller died during the cutover; one: the cutover
    // failed and its rollback waited for the agent.
    let why = match record.cutover.as_ref() {
        Some(report) => format!("its failure ({})", report.error),
        None => "a controller restart".to_owned(),
    };
    match subscription::state(&target, &record.subscription).await? {
        State::Detached => {
            record.detach.slot_released = true;
            record.phase = Phase::CutOver;
            record.cutover = Some(CutoverReport {
                done: true,
                steps: vec![(
                    "detach".to_owned(),
                    0.0,
                    format!("found detached after {why}; the write downtime was not measured"),
                )],
                ..CutoverReport::default()
            });
            record.events.push(format!(
                "a cutover interrupted by {why} had already detached the subscription: it is done"
            ));
        }
        state => {
            if state == State::Disabled {
                subscription::enable(&target, &record.subscription).await?;
            }
            teardown::release_fence(agent, record).await?;
            record.fence_sealed = false;
            record.detach = Detach::default();
            record.phase = Phase::Streaming;
            record.cutover = Some(CutoverReport {
                error: format!("interrupted by {why}; rolled back: the fence is lifted, streaming goes on"),
                ..CutoverReport::default()
            });
            record.events.push(format!(
                "a cutover was interrupted by {why}: the fence is lifted, streaming goes on"
            ));
        }
    }
    save(ctx, record).await
}
