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

use crate::migration::{APPLICATION_NAME, CutoverReport, MigrationRecord, Migrations, Phase};
use crate::registry::AgentClient;
use crate::subscription::{self, State};
use crate::transfer::db_message;

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
    let mut record = migrations
        .current()
        .map_err(|e| Status::internal(e.to_string()))?
        .ok_or_else(|| Status::failed_precondition("there is no migration: run `walbridge start` first"))?;
    if record.phase != Phase::Streaming {
        return Err(Status::failed_precondition(format!(
            "migration {} is in phase {}: cutover needs it streaming",
            record.id,
            record.phase.name()
        )));
    }
    let agent = migrations
        .registry()
        .get(&record.agent)
        .ok_or_else(|| Status::unavailable(format!("agent {} is not connected", record.agent)))?
        .client;
    let mut steps = Steps {
        report: CutoverReport::default(),
        last: Instant::now(),
        migrations,
    };
    let deadline = Instant::now() + options.timeout;

    let lag = wait_for_lag(migrations, &agent, &record, options, deadline)
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
    let outcome = fence_and_switch(migrations, &agent, &mut record, &mut steps, deadline).await;
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

async fn save(migrations: &Migrations, record: &MigrationRecord) -> Result<(), Status> {
    migrations
        .save_record(record)
        .await
        .map_err(|e| Status::internal(e.to_string()))
}

async fn slot_status(agent: &AgentClient, slot: &str) -> Result<wire::SlotStatusResponse, String> {
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
    migrations: &Migrations,
    agent: &AgentClient,
    record: &MigrationRecord,
    options: Options,
    deadline: Instant,
) -> Result<f64, String> {
    let target = migrations.target().ok_or("target.url is not set")?;
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
    agent: &AgentClient,
    record: &mut MigrationRecord,
    steps: &mut Steps<'_>,
    deadline: Instant,
) -> Result<(), String> {
    let target = migrations.target().ok_or("target.url is not set")?;
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

/// Sets every target sequence from the source's state, in one transaction.
async fn copy_sequences(agent: &AgentClient, target: &walbridge_daemon::pg::Database) -> Result<String, String> {
    let sequences = sequences(agent).await?;
    let mut client = target
        .connect(APPLICATION_NAME)
        .await
        .map_err(|e| format!("cannot connect to the target: {}", db_message(&e)))?;
    let transaction = client.transaction().await.map_err(|e| db_message(&e))?;
    let (mut set, mut missing) = (0, Vec::new());
    for sequence in sequences {
        let name = walbridge_proto::convert::name_from_wire(sequence.name.unwrap_or_default());
        let quoted = name.quoted();
        let exists: bool = transaction
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&quoted])
            .await
            .map_err(|e| db_message(&e))?
            .get(0);
        if !exists {
            missing.push(quoted);
            continue;
        }
        transaction
            .execute(
                "SELECT setval($1::text::regclass, $2, $3)",
                &[&quoted, &sequence.last_value, &sequence.is_called],
            )
            .await
            .map_err(|e| format!("setting sequence {quoted} failed: {}", db_message(&e)))?;
        set += 1;
    }
    transaction.commit().await.map_err(|e| db_message(&e))?;
    Ok(if missing.is_empty() {
        format!("{set} sequences set from the source")
    } else {
        format!("{set} sequences set; not on the target: {}", missing.join(", "))
    })
}
