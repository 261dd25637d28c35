//! The cutover, as DESIGN.md step 11 orders it: wait for lag; fence the
//! source's writes; wait until the target has applied everything up to
//! the fence; copy every sequence; seal the fence (it now survives the
//! agent); detach the subscription. Any failure before the detach lifts
//! the fence and streaming goes on as before.

use std::str::FromStr;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use walbridge_migration::lsn::Lsn;
use walbridge_proto::convert::name_to_wire;
use walbridge_proto::v1 as wire;
use wire::fence_command::Command;
use wire::fence_event::Event;

use tokio_postgres::Client;

use crate::migration::{CutoverReport, MigrationRecord, Migrations, Phase};
use crate::operations::{self, save};
use crate::registry::AgentClient;
use crate::subscription::{self, State};
use walbridge_daemon::pg::describe;

/// How often lag and catch-up are polled.
const POLL: Duration = Duration::from_millis(25);

#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub max_lag: Duration,
    pub timeout: Duration,
    pub dry_run: bool,
}

/// The steps taken so far, each with its duration.
struct Steps<'a> {
    report: CutoverReport,
    last: Instant,
    /// Where `status` sees the steps while the cutover runs.
    migrations: &'a Migrations,
}

impl Steps<'_> {
    fn done(&mut self, name: &str, detail: impl Into<String>) {
        let seconds = self.last.elapsed().as_secs_f64();
        let detail = detail.into();
        tracing::info!(step = name, seconds, %detail, "cutover step done");
        self.report.steps.push((name.to_owned(), seconds, detail));
        self.migrations.set_live_cutover(Some(self.report.clone()));
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

pub async fn run(migrations: &Migrations, options: Options) -> Result<wire::CutoverResponse, Status> {
    let mut record = operations::current(migrations)?;
    if record.phase != Phase::Streaming {
        return Err(Status::failed_precondition(format!(
            "migration {} is in phase {}: cutover needs it streaming",
            record.id,
            record.phase.name()
        )));
    }
    let agent = operations::agent_client(migrations, &record.agent)?;
    let mut steps = Steps {
        report: CutoverReport::default(),
        last: Instant::now(),
        migrations,
    };
    let deadline = Instant::now() + options.timeout;
    let target = migrations
        .target()
        .ok_or_else(|| Status::failed_precondition("target.url is not set on the controller"))?;
    // One session for the whole cutover: it polls, and it must not pay a
    // connection per question while writes wait.
    let target = subscription::session(target).await.map_err(Status::unavailable)?;

    let lag = wait_for_lag(&target, &agent, &record, options, deadline)
        .await
        .map_err(Status::deadline_exceeded)?;
    steps.done(
        "lag",
        format!("{lag:.3} s behind (bound {:.3} s)", options.max_lag.as_secs_f64()),
    );
    if options.dry_run {
        let sequences = sequences(&agent).await.map_err(Status::unavailable)?;
        steps.done(
            "dry run",
            format!(
                "would fence {} tables and copy {} sequences; nothing was changed",
                record.publication_tables.len(),
                sequences.len()
            ),
        );
        return Ok(report_to_wire(&steps.report));
    }

    record.phase = Phase::Cutover;
    save(migrations, &record).await?;
    let outcome = fence_and_switch(migrations, &target, &agent, &mut record, &mut steps, deadline).await;
    match outcome {
        Ok(()) => {
            steps.report.done = true;
            record.phase = Phase::CutOver;
            tracing::warn!(
                downtime = steps.report.write_downtime_seconds,
                "cutover done: the target stands alone; the source stays fenced until release-source or cleanup"
            );
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
    migrations.set_live_cutover(None);
    save(migrations, &record).await?;
    Ok(report_to_wire(&steps.report))
}

pub(crate) async fn slot_status(agent: &AgentClient, slot: &str) -> Result<wire::SlotStatusResponse, String> {
    agent
        .clone()
        .slot_status(wire::SlotStatusRequest { slot: slot.to_owned() })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("cannot read the slot on the source: {}", s.message()))
}

async fn sequences(agent: &AgentClient) -> Result<Vec<wire::SequenceState>, String> {
    agent
        .clone()
        .sequences(wire::SequencesRequest {})
        .await
        .map(|r| r.into_inner().sequences)
        .map_err(|s| format!("cannot read the source's sequences: {}", s.message()))
}

/// Waits until the subscription streams and its lag is within the bound.
async fn wait_for_lag(
    target: &Client,
    agent: &AgentClient,
    record: &MigrationRecord,
    options: Options,
    deadline: Instant,
) -> Result<f64, String> {
    loop {
        let slot = slot_status(agent, &record.slot).await?;
        let state = subscription::state(target, &record.subscription).await?;
        if state == State::Streaming && slot.active && slot.lag_seconds <= options.max_lag.as_secs_f64() {
            return Ok(slot.lag_seconds);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the lag did not come under {:?} within {:?} (lag {:.3} s, {} bytes; subscription {}); nothing was fenced",
                options.max_lag,
                options.timeout,
                slot.lag_seconds,
                slot.lag_bytes,
                state.name()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Fence, catch up, sequences, seal, detach. On error before the detach
/// is done, the fence is lifted (or was never sealed) before returning.
async fn fence_and_switch(
    migrations: &Migrations,
    target: &Client,
    agent: &AgentClient,
    record: &mut MigrationRecord,
    steps: &mut Steps<'_>,
    deadline: Instant,
) -> Result<(), String> {
    let (commands, command_stream) = mpsc::channel(2);
    let hold = wire::FenceHold {
        migration: record.id.clone(),
        tables: record.publication_tables.iter().cloned().map(name_to_wire).collect(),
        lock_timeout_ms: remaining(deadline).as_millis().max(1) as u64,
        // The agent lifts a fence the controller forgot (it died, hung).
        max_hold_ms: (remaining(deadline) + Duration::from_secs(30)).as_millis() as u64,
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
    let fence_lsn = match events.message().await {
        Ok(Some(wire::FenceEvent {
            event: Some(Event::Held(held)),
        })) => held.lsn,
        Ok(_) => return Err("the agent ended the fence before holding it".to_owned()),
        Err(status) => return Err(status.message().to_owned()),
    };
    let fenced_at = Instant::now();
    steps.report.fence_lsn = fence_lsn.clone();
    steps.done("fence", format!("writes wait from {fence_lsn}"));

    let before_seal = async {
        catch_up(agent, &record.slot, &fence_lsn, deadline).await?;
        steps.done("catch up", format!("the target applied everything up to {fence_lsn}"));
        let copied = copy_sequences(agent, target).await?;
        steps.done("sequences", copied);
        let _ = commands
            .send(wire::FenceCommand {
                command: Some(Command::Seal(wire::FenceSeal {})),
            })
            .await;
        match events.message().await {
            Ok(Some(wire::FenceEvent {
                event: Some(Event::Sealed(_)),
            })) => Ok(()),
            Ok(_) => Err("the agent lifted the fence before it could be sealed".to_owned()),
            Err(status) => Err(status.message().to_owned()),
        }
    };
    if let Err(error) = before_seal.await {
        lift(&commands, &mut events).await;
        return Err(error);
    }
    record.fence_sealed = true;
    migrations.save_record(record).await.map_err(|e| e.to_string())?;
    steps.done("seal", "writes on the source now fail, and will after any restart");

    if let Err(error) = subscription::detach(target, &record.subscription).await {
        // Not detached: the source must not stay fenced.
        let released = agent
            .clone()
            .release_fence(wire::ReleaseFenceRequest {
                migration: record.id.clone(),
            })
            .await;
        if released.is_ok() {
            record.fence_sealed = false;
        }
        return Err(format!("detaching the subscription failed: {error}"));
    }
    steps.report.write_downtime_seconds = fenced_at.elapsed().as_secs_f64();
    steps.done(
        "detach",
        format!("subscription {} disabled, its slot let go", record.subscription),
    );
    Ok(())
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

/// Waits until the slot's confirmed position passes the fence: the target
/// has applied and flushed every write the source committed before it.
async fn catch_up(agent: &AgentClient, slot: &str, fence_lsn: &str, deadline: Instant) -> Result<(), String> {
    let fence = Lsn::from_str(fence_lsn).map_err(|e| e.to_string())?;
    loop {
        let status = slot_status(agent, slot).await?;
        if Lsn::from_str(&status.confirmed_flush_lsn).is_ok_and(|confirmed| confirmed >= fence) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the target did not catch up to the fence ({fence_lsn}) in time (confirmed {})",
                status.confirmed_flush_lsn
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Sets every target sequence from the source's state: one statement, so
/// one round trip while writes wait, however many sequences there are.
async fn copy_sequences(agent: &AgentClient, target: &Client) -> Result<String, String> {
    let sequences = sequences(agent).await?;
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
        .map_err(|e| format!("setting the sequences failed: {}", describe(&e)))?;
    let set: std::collections::HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
    let missing: Vec<&String> = names.iter().filter(|n| !set.contains(*n)).collect();
    Ok(if missing.is_empty() {
        format!("{} sequences set from the source", set.len())
    } else {
        let missing: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
        format!("{} sequences set; not on the target: {}", set.len(), missing.join(", "))
    })
}
