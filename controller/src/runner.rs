//! The runner: it owns every task that changes the migration, and runs at
//! most one of them at a time — the drive through the phases, a cutover,
//! an abort, a cleanup, a release of the source. Another request gets
//! "busy: <what> is running"; only `abort` may stop a running drive, which
//! it cancels and waits for. The tasks belong to the runner, not to the
//! API calls that asked for them: a CLI that goes away stops nothing.
//!
//! The drive applies the one fault policy (`walbridge_migration::fault`):
//! a transient fault is retried (with backoff, shown in status), a lost
//! snapshot restarts the copy (bounded), and only what needs a person
//! ends the migration in `Failed`, after releasing what it holds on the
//! source.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use walbridge_daemon::crash_point;
use walbridge_migration::failpoint as fp;
use walbridge_migration::fault::{Fault, Policy};

use crate::migration::{Context, CutoverReport, MigrationRecord, Phase, TableRecord};
use crate::steps::{self, StepError, cutover, teardown};

/// What the runner may be running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Drive,
    Cutover,
    Abort,
    Cleanup,
    ReleaseSource,
    SyncSchema,
    CatalogWatch,
}

impl Operation {
    pub fn name(self) -> &'static str {
        match self {
            Operation::Drive => "the migration's steps",
            Operation::Cutover => "cutover",
            Operation::Abort => "abort",
            Operation::Cleanup => "cleanup",
            Operation::ReleaseSource => "release-source",
            Operation::SyncSchema => "sync-schema",
            Operation::CatalogWatch => "the look at the source's new tables",
        }
    }
}

/// Why an operation did not run, or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("busy: {} is running", .0.name())]
    Busy(Operation),
    /// The migration is not in a state for it.
    #[error("{0}")]
    Refused(String),
    #[error("{}", .0.explained())]
    Fault(Fault),
}

impl From<StepError> for RunError {
    fn from(e: StepError) -> Self {
        match e {
            StepError::Fault(fault) => RunError::Fault(fault),
            StepError::Stopped => RunError::Refused("stopped: the controller is shutting down".to_owned()),
        }
    }
}

impl From<walbridge_daemon::journal::JournalError> for RunError {
    fn from(e: walbridge_daemon::journal::JournalError) -> Self {
        RunError::Fault(crate::fault::journal(e))
    }
}

struct Running {
    operation: Operation,
    cancel: CancellationToken,
    /// Cancelled when the operation has ended.
    ended: CancellationToken,
}

/// The running operation's hold on the runner; dropping it ends the hold.
struct Claim {
    cancel: CancellationToken,
    _ended: DropGuard,
}

pub struct Runner {
    ctx: Arc<Context>,
    /// A std mutex: held only to look at or swap the running operation.
    running: Mutex<Option<Running>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner").finish_non_exhaustive()
    }
}

/// How long `abort` waits for a cancelled drive to stop.
const STOP_WAIT: Duration = Duration::from_secs(30);

impl Runner {
    pub fn new(ctx: Arc<Context>, tasks: TaskTracker, shutdown: CancellationToken) -> Arc<Runner> {
        Arc::new(Runner {
            ctx,
            running: Mutex::new(None),
            tasks,
            shutdown,
        })
    }

    pub fn ctx(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// What runs now, if anything.
    pub fn running(&self) -> Option<Operation> {
        self.lock()
            .as_ref()
            .filter(|r| !r.ended.is_cancelled())
            .map(|r| r.operation)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn claim(&self, operation: Operation) -> Result<Claim, RunError> {
        let mut running = self.lock();
        if let Some(current) = running.as_ref()
            && !current.ended.is_cancelled()
        {
            return Err(RunError::Busy(current.operation));
        }
        let cancel = self.shutdown.child_token();
        let ended = CancellationToken::new();
        *running = Some(Running {
            operation,
            cancel: cancel.clone(),
            ended: ended.clone(),
        });
        Ok(Claim {
            cancel,
            _ended: ended.drop_guard(),
        })
    }

    /// Claims the runner for `operation`, first stopping what runs if it is
    /// one of `stoppable` (and waiting for it to end). The look at the
    /// source's new tables is background work that every operation may
    /// stop (it is safe to cut short); only abort stops a drive.
    async fn claim_stopping(&self, operation: Operation, stoppable: &[Operation]) -> Result<Claim, RunError> {
        loop {
            match self.claim(operation) {
                Err(RunError::Busy(running)) if stoppable.contains(&running) => {
                    let ended = {
                        let current = self.lock();
                        let current = current.as_ref().expect("an operation is running");
                        current.cancel.cancel();
                        current.ended.clone()
                    };
                    if tokio::time::timeout(STOP_WAIT, ended.cancelled()).await.is_err() {
                        return Err(RunError::Busy(running));
                    }
                }
                other => return other,
            }
        }
    }

    /// Resumes the migration in the journal, if it has work to do.
    pub fn resume(self: &Arc<Self>) -> Result<(), RunError> {
        if self.ctx.state.current()?.is_some_and(|m| m.phase.is_running()) {
            tracing::info!("resuming the migration in the journal");
            let claim = self.claim(Operation::Drive)?;
            self.tasks.spawn(self.clone().drive(claim));
        }
        Ok(())
    }

    /// Records a new migration and starts driving it.
    pub async fn start(self: &Arc<Self>, record: MigrationRecord, tables: Vec<TableRecord>) -> Result<(), RunError> {
        let claim = self.claim(Operation::Drive)?;
        if let Some(current) = self.ctx.state.current()?
            && !current.phase.is_finished()
        {
            return Err(RunError::Refused(format!(
                "migration {} is in phase {}: finish it (`walbridge cleanup`) or `walbridge abort` it first",
                current.id,
                current.phase.name()
            )));
        }
        self.ctx.state.create(&record, &tables).await?;
        crash_point!(fp::START_RECORDED);
        self.tasks.spawn(self.clone().drive(claim));
        Ok(())
    }

    /// Runs the phases until the migration rests (or the claim is cancelled).
    async fn drive(self: Arc<Self>, claim: Claim) {
        let ctx = &self.ctx;
        let id = ctx.state.current().ok().flatten().map(|r| r.id).unwrap_or_default();
        // One trace for the whole run: every step (and, through the link's
        // traceparent, the agent's work for it) nests under this span.
        let run = tracing::info_span!("migration", migration = %id);
        let mut delays = steps::backoff();
        loop {
            let mut record = match ctx.state.current() {
                Ok(Some(record)) if record.phase.is_running() => record,
                Ok(_) => return,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the migration from the journal");
                    return;
                }
            };
            let phase = record.phase;
            let span = tracing::info_span!(parent: &run, "step", migration = %record.id, phase = phase.name());
            let started = std::time::Instant::now();
            let slot = record.slot.clone();
            let outcome = tokio::select! {
                outcome = tracing::Instrument::instrument(step(ctx, &mut record), span) => outcome,
                _ = claim.cancel.cancelled() => Err(StepError::Stopped),
                // The slot watch found the slot lost: the step cannot succeed.
                lost = ctx.slot_watch.lost(&slot) => Err(StepError::Fault(lost)),
            };
            let unit = format!("phase {}", phase.name());
            let fault = match outcome {
                Ok(()) => {
                    ctx.state.clear_retry(&unit);
                    delays = steps::backoff();
                    tracing::info!(
                        phase = phase.name(),
                        seconds = started.elapsed().as_secs_f64(),
                        "step done"
                    );
                    continue;
                }
                Err(StepError::Stopped) => return,
                Err(StepError::Fault(fault)) => fault,
            };
            match fault.policy() {
                Policy::Retry => {
                    let count = ctx.state.note_retry(&unit, &fault);
                    let delay = delays.next().unwrap_or(Duration::from_secs(30));
                    tracing::warn!(phase = phase.name(), attempt = count, kind = fault.kind.name(), error = %fault, ?delay, "the step will be retried");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = claim.cancel.cancelled() => return,
                    }
                }
                Policy::RestartCopy => match steps::copy::restart(ctx, &mut record, &fault).await {
                    Ok(()) => {}
                    Err(StepError::Stopped) => return,
                    Err(StepError::Fault(fault)) if fault.policy() == Policy::Retry => {
                        ctx.state.note_retry(&unit, &fault);
                        tokio::select! {
                            _ = tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(30))) => {}
                            _ = claim.cancel.cancelled() => return,
                        }
                    }
                    Err(StepError::Fault(fault)) => return fail(ctx, record, fault).await,
                },
                Policy::Operator => return fail(ctx, record, fault).await,
            }
        }
    }

    /// Runs a cutover of the streaming migration as the runner's task and
    /// returns its report once it is over.
    pub async fn cutover(self: &Arc<Self>, options: cutover::Options) -> Result<CutoverReport, RunError> {
        // Claimed first: a second cutover while one runs (phase `cutover`)
        // is told it is busy, not that the phase is wrong.
        let claim = self
            .claim_stopping(Operation::Cutover, &[Operation::CatalogWatch])
            .await?;
        let record = self.current()?;
        if record.phase != Phase::Streaming {
            return Err(RunError::Refused(format!(
                "migration {} is in phase {}: cutover needs it streaming",
                record.id,
                record.phase.name()
            )));
        }
        let agent = self.connected_agent(&record).await?;
        // Tables the application created since the last look: the cutover
        // must not leave any behind.
        let mut record = record;
        let look = crate::catalog_watch::look(&self.ctx, &agent, &mut record)
            .await
            .map_err(RunError::Fault)?;
        if look.changed {
            self.ctx.state.save(&record).await?;
        }
        if !look.refusals.is_empty() {
            return Err(RunError::Refused(format!(
                "tables created on the source while streaming are not ready: {}; nothing was fenced",
                look.refusals.join("; ")
            )));
        }
        // The target must be the source's shape first: a change the
        // subscription cannot apply would hold every write at the fence.
        let drift = crate::drift::detect(&self.ctx, &agent, &record)
            .await
            .map_err(RunError::Fault)?;
        if !drift.is_empty() {
            return Err(RunError::Refused(format!(
                "the target's tables differ from the source's, so the cutover would stall: {}; nothing was fenced",
                crate::drift::describe(&drift)
            )));
        }
        let runner = self.clone();
        let task = self.tasks.spawn(async move {
            let report = cutover::run(&runner.ctx, &agent, options, &claim.cancel).await;
            drop(claim);
            // A cutover whose rollback could not finish rests in phase
            // `cutover`: the drive finishes it, here and not in the API
            // call, which the CLI may have left.
            if let Err(e) = runner.resume() {
                tracing::error!(error = %e, "cannot resume the migration after its cutover");
            }
            report
        });
        task.await
            .map_err(|e| RunError::Fault(crate::fault::internal(format!("the cutover task failed: {e}"))))?
            .map_err(RunError::from)
    }

    /// Fails a streaming migration for a fault found while it rests (its
    /// slot lost): nothing can bring it back.
    pub async fn fail_streaming(self: &Arc<Self>, fault: Fault) -> Result<(), RunError> {
        let claim = self
            .claim_stopping(Operation::Drive, &[Operation::CatalogWatch])
            .await?;
        let record = self.current()?;
        if record.phase == Phase::Streaming {
            fail(&self.ctx, record, fault).await;
        }
        drop(claim);
        Ok(())
    }

    /// Stops the migration in any phase but `cut_over` and removes what it
    /// made for replication (`force`: also with the agent gone).
    pub async fn abort(self: &Arc<Self>, force: bool) -> Result<teardown::Removed, RunError> {
        let claim = self
            .claim_stopping(Operation::Abort, &[Operation::Drive, Operation::CatalogWatch])
            .await?;
        let mut record = self.current()?;
        if record.phase == Phase::CutOver {
            return Err(RunError::Refused(format!(
                "migration {} is cut over: the target is live. Use `walbridge cleanup` (it keeps what the cutover did)",
                record.id
            )));
        }
        let phase = if record.phase == Phase::CleanedUp {
            Phase::CleanedUp
        } else {
            Phase::Aborted
        };
        let ctx = self.ctx.clone();
        let task = self.tasks.spawn(async move {
            let removed = teardown::remove_everything(&ctx, &mut record, phase, force).await;
            drop(claim);
            removed
        });
        self.finish(task).await
    }

    /// After a cutover (or a `--copy-only` copy): removes every replication object.
    pub async fn cleanup(self: &Arc<Self>) -> Result<teardown::Removed, RunError> {
        let claim = self
            .claim_stopping(Operation::Cleanup, &[Operation::CatalogWatch])
            .await?;
        let mut record = self.current()?;
        if !matches!(record.phase, Phase::CutOver | Phase::CleanedUp | Phase::Copied) {
            return Err(RunError::Refused(format!(
                "migration {} is in phase {}: cleanup follows a cutover (or a --copy-only copy); \
                 `walbridge abort` stops a migration in any phase",
                record.id,
                record.phase.name()
            )));
        }
        let ctx = self.ctx.clone();
        let task = self.tasks.spawn(async move {
            let removed = teardown::remove_everything(&ctx, &mut record, Phase::CleanedUp, false).await;
            drop(claim);
            removed
        });
        self.finish(task).await
    }

    /// Lifts the durable fence a cutover left on the source.
    pub async fn release_source(self: &Arc<Self>) -> Result<(teardown::Removed, Phase), RunError> {
        let claim = self
            .claim_stopping(Operation::ReleaseSource, &[Operation::CatalogWatch])
            .await?;
        let mut record = self.current()?;
        let agent = self.connected_agent(&record).await?;
        let ctx = self.ctx.clone();
        let task = self.tasks.spawn(async move {
            let outcome = async {
                let mut removed = teardown::Removed::default();
                removed.removed.extend(teardown::release_fence(&agent, &record).await?);
                record.fence_sealed = false;
                record.events.push("the source's write fence was released".to_owned());
                steps::save(&ctx, &record).await?;
                Ok::<_, StepError>((removed, record.phase))
            }
            .await;
            drop(claim);
            outcome
        });
        self.finish(task).await
    }

    /// Takes in the tables the application created on the source since the
    /// last look (a streaming migration only; skipped while anything else
    /// runs).
    pub async fn watch_catalog(self: &Arc<Self>) {
        let Ok(Some(mut record)) = self.ctx.state.current() else {
            return;
        };
        if record.phase != Phase::Streaming {
            return;
        }
        let Ok(agent) = self.connected_agent(&record).await else {
            return;
        };
        let Ok(claim) = self.claim(Operation::CatalogWatch) else {
            return;
        };
        // An operator's operation cancels it; cut short, the next look
        // finds what this one made and goes on from there.
        let looked = tokio::select! {
            looked = crate::catalog_watch::look(&self.ctx, &agent, &mut record) => looked,
            _ = claim.cancel.cancelled() => return,
        };
        match looked {
            Ok(look) if look.changed => {
                if let Err(e) = self.ctx.state.save(&record).await {
                    tracing::error!(error = %e, "cannot record the new tables");
                }
            }
            Ok(_) => {}
            Err(fault) => {
                tracing::warn!(kind = fault.kind.name(), error = %fault, "cannot look at the source's new tables")
            }
        }
        drop(claim);
    }

    /// Applies the additive schema drift of a streaming migration.
    pub async fn sync_schema(self: &Arc<Self>, dry_run: bool) -> Result<crate::drift::Synced, RunError> {
        let record = self.current()?;
        if record.phase != Phase::Streaming {
            return Err(RunError::Refused(format!(
                "migration {} is in phase {}: sync-schema brings a streaming migration's target in line",
                record.id,
                record.phase.name()
            )));
        }
        let agent = self.connected_agent(&record).await?;
        let claim = self
            .claim_stopping(Operation::SyncSchema, &[Operation::CatalogWatch])
            .await?;
        let ctx = self.ctx.clone();
        let task = self.tasks.spawn(async move {
            let synced = crate::drift::sync(&ctx, &agent, &record, dry_run).await;
            drop(claim);
            synced.map_err(StepError::from)
        });
        self.finish(task).await
    }

    async fn finish<T>(&self, task: tokio::task::JoinHandle<Result<T, StepError>>) -> Result<T, RunError> {
        task.await
            .map_err(|e| RunError::Fault(crate::fault::internal(format!("the task failed: {e}"))))?
            .map_err(RunError::from)
    }

    fn current(&self) -> Result<MigrationRecord, RunError> {
        self.ctx
            .state
            .current()?
            .ok_or_else(|| RunError::Refused("there is no migration: run `walbridge start` first".to_owned()))
    }

    /// The migration's agent, connected and reaching the migration's source.
    async fn connected_agent(&self, record: &MigrationRecord) -> Result<crate::registry::AgentClient, RunError> {
        steps::verified_agent(&self.ctx, record)
            .await
            .map_err(|refusal| RunError::Fault(refusal.fault()))
    }
}

/// One phase's work.
async fn step(ctx: &Context, record: &mut MigrationRecord) -> Result<(), StepError> {
    if !record.phase.needs_agent() {
        return match record.phase {
            Phase::SchemaPostData => steps::post_data::run(ctx, record).await,
            _ => Ok(()),
        };
    }
    let agent = steps::agent(ctx, record).await?;
    match record.phase {
        Phase::Snapshot => steps::snapshot::run(ctx, &agent, record).await,
        Phase::SchemaPreData => steps::pre_data::run(ctx, &agent, record).await,
        Phase::Copy => steps::copy::run(ctx, record).await,
        Phase::ReleaseSnapshot => steps::release::run(ctx, &agent, record).await,
        Phase::Subscribe => steps::subscribe::run(ctx, &agent, record).await,
        Phase::Cutover => cutover::resolve_interrupted(ctx, &agent, record).await,
        _ => Ok(()),
    }
}

/// Ends the migration for a fault that needs a person: the source is
/// released first, recorded failed after, so whoever sees the failure
/// sees a source that is no longer held.
async fn fail(ctx: &Context, mut record: MigrationRecord, fault: Fault) {
    tracing::error!(kind = fault.kind.name(), error = %fault, "the migration failed");
    let event = teardown::after_failure(ctx, &record).await;
    record.events.push(event);
    record.phase = Phase::Failed;
    record.error = Some(fault.explained());
    if let Err(e) = ctx.state.save(&record).await {
        tracing::error!(error = %e, "cannot record the failure in the journal");
    }
}
