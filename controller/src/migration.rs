//! The migration: one state machine, persisted as it is, readable beside
//! the runbook. Each phase is recorded in the journal before the next one
//! starts, and each can be run again after any process restarts:
//!
//! | phase            | safe to repeat because                                       |
//! |------------------|--------------------------------------------------------------|
//! | `Snapshot`       | a leftover slot of this migration is dropped first           |
//! | `SchemaPreData`  | one target transaction: all of it or nothing, recorded done  |
//! | `Copy`           | each table is emptied and copied in one target transaction   |
//! | `SchemaPostData` | its statements are recorded done one by one                  |
//! | `ReleaseSnapshot`| releasing a snapshot that is gone is a no-op                 |
//! | `Subscribe`      | an existing subscription of this name is kept                |
//! | `Cutover`        | seen at startup only if a cutover was cut short: resolved    |
//!
//! `Streaming`, `Copied` (with `--copy-only`), `CutOver`, `Failed`,
//! `Aborted` and `CleanedUp` are resting phases: nothing runs in them
//! until the operator asks (cutover, cleanup, abort).
//!
//! If the agent loses the exported snapshot (it dies with the agent's
//! process), the copy cannot go on against it: the old slot is dropped, the
//! target's tables are emptied, and the copy restarts from a new slot and
//! snapshot. The target is never left silently inconsistent.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use walbridge_daemon::journal::{Journal, JournalError, Table};
use walbridge_daemon::pg::Database;
use walbridge_migration::copy::PageRange;
use walbridge_migration::ident::QualifiedName;
use walbridge_migration::selection::Selection;
use walbridge_migration::skip::{self, Skip};
use walbridge_proto::convert::name_to_wire;
use walbridge_proto::v1 as wire;

use crate::door::{CurrentMigration, TunnelDoor};
use crate::registry::{AgentClient, Registry};
use crate::{schema, subscription, transfer};

/// How long the migration waits for its agent to (re)connect before it
/// gives up and reports the migration failed.
pub const AGENT_WAIT: Duration = Duration::from_secs(120);

const MIGRATION_TABLE: &str = "migration";
const TABLES_TABLE: &str = "migration.tables";
const CURRENT: &str = "current";
pub const APPLICATION_NAME: &str = "walbridge-controller";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Snapshot,
    SchemaPreData,
    Copy,
    SchemaPostData,
    ReleaseSnapshot,
    /// The initial copy is done and verified, and (`--copy-only`) the
    /// source released: the migration ends here.
    Copied,
    Subscribe,
    /// The subscription applies the source's changes; cutover comes next.
    Streaming,
    /// A cutover is under way (the source may be fenced).
    Cutover,
    /// Cut over: the target stands alone, the source is fenced.
    CutOver,
    Failed,
    Aborted,
    CleanedUp,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Snapshot => "snapshot",
            Phase::SchemaPreData => "schema_pre_data",
            Phase::Copy => "copy",
            Phase::SchemaPostData => "schema_post_data",
            Phase::ReleaseSnapshot => "release_snapshot",
            Phase::Copied => "copied",
            Phase::Subscribe => "subscribe",
            Phase::Streaming => "streaming",
            Phase::Cutover => "cutover",
            Phase::CutOver => "cut_over",
            Phase::Failed => "failed",
            Phase::Aborted => "aborted",
            Phase::CleanedUp => "cleaned_up",
        }
    }

    /// Whether the controller has work to do in this phase on its own.
    pub fn is_running(self) -> bool {
        matches!(
            self,
            Phase::Snapshot
                | Phase::SchemaPreData
                | Phase::Copy
                | Phase::SchemaPostData
                | Phase::ReleaseSnapshot
                | Phase::Subscribe
                | Phase::Cutover
        )
    }

    /// Whether the migration is over (it holds nothing on the source): a
    /// new one may start.
    pub fn is_finished(self) -> bool {
        matches!(self, Phase::Copied | Phase::Failed | Phase::Aborted | Phase::CleanedUp)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub name: String,
    pub consistent_lsn: String,
}

/// The migration as the journal holds it (tables are kept apart, one
/// record each, so finishing a table rewrites only that table's record).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub id: String,
    pub agent: String,
    pub selection: Selection,
    pub parallel: u32,
    pub verify: bool,
    pub slot: String,
    pub publication: String,
    pub phase: Phase,
    pub snapshot: Option<SnapshotRecord>,
    pub pre_data_applied: bool,
    /// The post-data script, dumped in the snapshot together with pre-data
    /// so that it does not depend on the snapshot living past the copy.
    pub post_data: Vec<String>,
    pub post_data_applied: usize,
    pub publication_tables: Vec<QualifiedName>,
    pub dump_exclude: Vec<QualifiedName>,
    pub materialized_views: Vec<QualifiedName>,
    pub copy_restarts: u32,
    /// Slots of abandoned copy attempts, dropped before the next slot is made.
    pub stale_slots: Vec<String>,
    pub events: Vec<String>,
    pub error: Option<String>,
    /// The subscription connects to the source itself, not via the tunnel.
    #[serde(default)]
    pub direct: bool,
    /// Stop after the copy (no subscription).
    #[serde(default)]
    pub copy_only: bool,
    /// The target's subscription (named after the migration).
    #[serde(default)]
    pub subscription: String,
    /// The subscription's oid on the target: its replication origin is
    /// `pg_<oid>`, which cleanup makes sure is gone.
    #[serde(default)]
    pub subscription_oid: u32,
    /// The role walbridge creates on the source for the subscription to log
    /// in as, dropped with the migration's other source objects (nothing
    /// to drop when the agent uses the operator's `subscription.user`).
    #[serde(default)]
    pub subscription_role: String,
    /// The fence was sealed on the source (it stays until released).
    #[serde(default)]
    pub fence_sealed: bool,
    #[serde(default)]
    pub cutover: Option<CutoverReport>,
    /// Schema entries left out of the dump (`start --skip`).
    #[serde(default)]
    pub skip: Vec<Skip>,
}

/// What the last cutover did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CutoverReport {
    pub done: bool,
    pub steps: Vec<(String, f64, String)>,
    pub write_downtime_seconds: f64,
    pub fence_lsn: String,
    pub error: String,
}

/// What [`release_replication`] did.
#[derive(Debug, Default)]
pub struct Released {
    /// One line per object removed.
    pub removed: Vec<String>,
    /// One line per object that could not be removed.
    pub problems: Vec<String>,
}

/// Releases everything a migration holds for replication on the source:
/// its snapshot, its slots (current and abandoned: they retain WAL) and
/// its publication. Each removal is idempotent; all are attempted.
pub async fn release_replication(agent: &AgentClient, record: &MigrationRecord) -> Released {
    let mut released = Released::default();
    if let Some(snapshot) = &record.snapshot
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

/// How the controller runs migrations (from its settings).
#[derive(Debug, Clone)]
pub struct MigrationSettings {
    pub split_bytes: u64,
    /// HOST:PORT of the tunnel, as the target reaches it.
    pub tunnel_advertise: Option<(String, u16)>,
    pub retained_wal_warning: u64,
    /// The subscription's TLS where the source's settings do not carry over.
    pub subscription_tls: subscription::SubscriptionTls,
}

/// The slot (and publication) name of a migration's copy attempt: a new
/// slot per attempt, so an abandoned one is recognisably gone.
pub fn slot_name(id: &str, attempt: u32) -> String {
    if attempt == 0 {
        format!("walbridge_{id}")
    } else {
        format!("walbridge_{id}_{attempt}")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableState {
    Pending,
    Copying,
    Copied,
    Verified,
    Failed,
}

impl TableState {
    pub fn name(self) -> &'static str {
        match self {
            TableState::Pending => "pending",
            TableState::Copying => "copying",
            TableState::Copied => "copied",
            TableState::Verified => "verified",
            TableState::Failed => "failed",
        }
    }

    fn is_done(self) -> bool {
        matches!(self, TableState::Copied | TableState::Verified)
    }
}

/// One table to copy (a leaf: an ordinary table or a partition).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableRecord {
    pub name: QualifiedName,
    /// The columns copied: every column but generated ones.
    pub columns: Vec<String>,
    pub ranges: Vec<PageRange>,
    pub state: TableState,
    pub rows: u64,
    pub bytes: u64,
    /// Bytes that crossed the link for it (compressed).
    #[serde(default)]
    pub wire_bytes: u64,
    /// Its size on the source when planned: what progress is measured by.
    #[serde(default)]
    pub size_bytes: u64,
    pub copy_seconds: f64,
    /// How many times this table's copy was started (the status and the
    /// tests use it to show a finished table is not copied again).
    pub copy_attempts: u32,
}

/// Why a migration step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("the agent's snapshot is gone")]
    SnapshotLost,
    #[error("{0}")]
    Failed(String),
    #[error("stopped")]
    Stopped,
}

impl From<JournalError> for StepError {
    fn from(e: JournalError) -> Self {
        StepError::Failed(format!("journal: {e}"))
    }
}

/// A table being copied: its record and how many of its units remain.
struct TableRun {
    record: TableRecord,
    remaining: usize,
    started: Instant,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Live figures of the running copy, for `status`.
#[derive(Debug, Default)]
pub struct Progress {
    pub tables: BTreeMap<QualifiedName, (u64, u64)>,
}

/// The controller's migrations (one at a time).
pub struct Migrations {
    registry: Arc<Registry>,
    target: Option<Database>,
    settings: MigrationSettings,
    records: Table<MigrationRecord>,
    tables: Table<TableRecord>,
    progress: Mutex<Progress>,
    running: Mutex<bool>,
    /// Cancels the running drive (abort).
    stop: Mutex<CancellationToken>,
    /// The running cutover's steps so far, for `status` while it runs.
    live_cutover: Mutex<Option<CutoverReport>>,
    /// The current migration's agent and phase, published on every save:
    /// the tunnel's door follows it.
    published: tokio::sync::watch::Sender<Option<CurrentMigration>>,
    door: TunnelDoor,
}

impl std::fmt::Debug for Migrations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migrations").finish_non_exhaustive()
    }
}

impl Migrations {
    pub fn open(
        journal: &Journal,
        registry: Arc<Registry>,
        target: Option<Database>,
        settings: MigrationSettings,
    ) -> Result<Self, JournalError> {
        let records: Table<MigrationRecord> = journal.table(MIGRATION_TABLE)?;
        let published = tokio::sync::watch::Sender::new(records.get(CURRENT)?.as_ref().map(CurrentMigration::of));
        let door = TunnelDoor::new(published.subscribe());
        Ok(Migrations {
            registry,
            target,
            settings,
            records,
            tables: journal.table(TABLES_TABLE)?,
            progress: Mutex::new(Progress::default()),
            running: Mutex::new(false),
            stop: Mutex::new(CancellationToken::new()),
            live_cutover: Mutex::new(None),
            published,
            door,
        })
    }

    /// Who may use the tunnel now (the current migration's phase, or a
    /// preflight probe's guard).
    pub fn tunnel_door(&self) -> &TunnelDoor {
        &self.door
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn target(&self) -> Option<&Database> {
        self.target.as_ref()
    }

    pub fn settings(&self) -> &MigrationSettings {
        &self.settings
    }

    /// Stops the running drive, if any, and waits until it has stopped.
    pub async fn stop_running(&self) {
        lock(&self.stop).cancel();
        let deadline = Instant::now() + Duration::from_secs(30);
        while *lock(&self.running) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The steps a running cutover has done so far.
    pub fn live_cutover(&self) -> Option<CutoverReport> {
        lock(&self.live_cutover).clone()
    }

    pub fn set_live_cutover(&self, report: Option<CutoverReport>) {
        *lock(&self.live_cutover) = report;
    }

    /// The one way the current record is written: journaled, then
    /// published (to the tunnel's door) when its agent or phase changed.
    pub async fn save_record(&self, record: &MigrationRecord) -> Result<(), JournalError> {
        self.records.put(CURRENT, record).await?;
        let current = Some(CurrentMigration::of(record));
        self.published.send_if_modified(|published| {
            let changed = *published != current;
            *published = current;
            changed
        });
        Ok(())
    }

    pub fn current(&self) -> Result<Option<MigrationRecord>, JournalError> {
        self.records.get(CURRENT)
    }

    pub fn table_records(&self) -> Result<Vec<TableRecord>, JournalError> {
        Ok(self.tables.all()?.into_iter().map(|(_, t)| t).collect())
    }

    pub fn live_progress(&self, table: &QualifiedName) -> Option<(u64, u64)> {
        self.lock_progress().tables.get(table).copied()
    }

    fn lock_progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a new migration; `run` then carries it out.
    pub async fn create(&self, record: MigrationRecord, tables: Vec<TableRecord>) -> Result<(), JournalError> {
        for (_, old) in self.tables.all()? {
            self.tables.remove(&old.name.to_string()).await?;
        }
        for table in &tables {
            self.tables.put(&table.name.to_string(), table).await?;
        }
        self.save_record(&record).await
    }

    /// Runs the current migration to its end (or until `shutdown`), unless
    /// it is already being run. Called after `create` and at startup.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            if *running {
                return;
            }
            *running = true;
        }
        let stop = {
            let mut stop = lock(&self.stop);
            *stop = shutdown.child_token();
            stop.clone()
        };
        let result = self.clone().drive(stop).await;
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = false;
        match result {
            Ok(()) | Err(StepError::Stopped) => {}
            Err(e) => {
                tracing::error!(error = %e, "the migration failed");
                if let Ok(Some(mut record)) = self.current() {
                    // Cleaned first, recorded failed after: whoever sees
                    // the failure sees a source that is no longer held.
                    let event = self.release_source(&record).await;
                    record.events.push(event);
                    record.phase = Phase::Failed;
                    record.error = Some(e.to_string());
                    if let Err(e) = self.save_record(&record).await {
                        tracing::error!(error = %e, "cannot record the failure in the journal");
                    }
                }
            }
        }
    }

    /// After a failure, nothing may keep holding the source back: the
    /// snapshot (it blocks vacuum) is released and the slots (they retain
    /// WAL) and the publication are dropped. Says what was done.
    async fn release_source(&self, record: &MigrationRecord) -> String {
        let Some(agent) = self.registry.get(&record.agent) else {
            return format!(
                "agent {} is not connected: its snapshot dies with its link, but slot {} and publication {} \
                 may remain on the source",
                record.agent, record.slot, record.publication
            );
        };
        let released = release_replication(&agent.client, record).await;
        if released.problems.is_empty() {
            format!(
                "after the failure, slot {} and publication {} were dropped from the source; the target keeps \
                 what the migration created there",
                record.slot, record.publication
            )
        } else {
            format!(
                "after the failure, cleaning the source failed: {}",
                released.problems.join("; ")
            )
        }
    }

    async fn drive(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), StepError> {
        // One trace for the whole run: every step (and, through the link's
        // traceparent, the agent's work for it) nests under this span.
        let run = tracing::info_span!(
            "migration",
            migration = self.current()?.map(|r| r.id).unwrap_or_default()
        );
        loop {
            let Some(mut record) = self.current()? else {
                return Ok(());
            };
            if !record.phase.is_running() {
                return Ok(());
            }
            let span = tracing::info_span!(parent: &run, "step", migration = %record.id, phase = record.phase.name());
            let agent = self.wait_for_agent(&record.agent, &shutdown).await?;
            let phase = record.phase.name();
            let step = async {
                match record.phase {
                    Phase::Snapshot => self.take_snapshot(&agent, &mut record).await,
                    Phase::SchemaPreData => self.apply_pre_data(&agent, &mut record).await,
                    Phase::Copy => self.copy(&agent, &mut record).await,
                    Phase::SchemaPostData => self.apply_post_data(&mut record).await,
                    Phase::ReleaseSnapshot => self.release_snapshot(&agent, &mut record).await,
                    Phase::Subscribe => self.subscribe(&agent, &mut record).await,
                    Phase::Cutover => self.resolve_interrupted_cutover(&agent, &mut record).await,
                    _ => Ok(()),
                }
            };
            let started = Instant::now();
            let outcome = tokio::select! {
                outcome = tracing::Instrument::instrument(step, span) => outcome,
                _ = shutdown.cancelled() => Err(StepError::Stopped),
            };
            match outcome {
                Ok(()) => tracing::info!(phase, seconds = started.elapsed().as_secs_f64(), "step done"),
                Err(StepError::SnapshotLost) => self.restart_copy(&mut record).await?,
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits (bounded) for the migration's agent to be connected.
    async fn wait_for_agent(&self, name: &str, shutdown: &CancellationToken) -> Result<AgentClient, StepError> {
        let deadline = Instant::now() + AGENT_WAIT;
        let mut announced = false;
        loop {
            if let Some(agent) = self.registry.get(name) {
                return Ok(agent.client);
            }
            if !announced {
                tracing::warn!(agent = %name, "waiting for the migration's agent to connect");
                announced = true;
            }
            if Instant::now() >= deadline {
                return Err(StepError::Failed(format!(
                    "agent {name} did not connect within {AGENT_WAIT:?}"
                )));
            }
            tokio::select! {
                _ = self.registry.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.cancelled() => return Err(StepError::Stopped),
            }
        }
    }

    async fn save(&self, record: &MigrationRecord) -> Result<(), StepError> {
        Ok(self.save_record(record).await?)
    }

    async fn save_table(&self, table: &TableRecord) -> Result<(), StepError> {
        Ok(self.tables.put(&table.name.to_string(), table).await?)
    }

    fn target_db(&self) -> Result<&Database, StepError> {
        self.target
            .as_ref()
            .ok_or_else(|| StepError::Failed("target.url is not set".to_owned()))
    }

    async fn take_snapshot(&self, agent: &AgentClient, record: &mut MigrationRecord) -> Result<(), StepError> {
        // Slots left by earlier attempts hold WAL and have no usable
        // snapshot (nor has this attempt's, if a crash came between its
        // creation and the journal): drop them first.
        let mut doomed = record.stale_slots.clone();
        doomed.push(record.slot.clone());
        for slot in doomed {
            agent
                .clone()
                .drop_replication(wire::DropReplicationRequest {
                    slot: slot.clone(),
                    publication: String::new(),
                })
                .await
                .map_err(|s| StepError::Failed(format!("cannot drop the old slot {slot}: {}", s.message())))?;
        }
        record.stale_slots.clear();
        let created = agent
            .clone()
            .create_snapshot(wire::CreateSnapshotRequest {
                slot: record.slot.clone(),
                publication: record.publication.clone(),
                tables: record.publication_tables.iter().cloned().map(name_to_wire).collect(),
            })
            .await
            .map_err(|s| StepError::Failed(s.message().to_owned()))?
            .into_inner();
        tracing::info!(slot = %created.slot, snapshot = %created.snapshot, lsn = %created.consistent_lsn, "snapshot taken");
        record.snapshot = Some(SnapshotRecord {
            name: created.snapshot,
            consistent_lsn: created.consistent_lsn,
        });
        record.phase = if record.pre_data_applied {
            Phase::Copy
        } else {
            Phase::SchemaPreData
        };
        self.save(record).await
    }

    fn snapshot_name(record: &MigrationRecord) -> Result<String, StepError> {
        record
            .snapshot
            .as_ref()
            .map(|s| s.name.clone())
            .ok_or(StepError::SnapshotLost)
    }

    async fn ensure_snapshot(&self, agent: &AgentClient, record: &MigrationRecord) -> Result<String, StepError> {
        let snapshot = Self::snapshot_name(record)?;
        let held = agent
            .clone()
            .snapshot_status(wire::SnapshotStatusRequest {
                snapshot: snapshot.clone(),
            })
            .await
            .map_err(|s| StepError::Failed(s.message().to_owned()))?
            .into_inner()
            .held;
        if held {
            Ok(snapshot)
        } else {
            Err(StepError::SnapshotLost)
        }
    }

    async fn apply_pre_data(&self, agent: &AgentClient, record: &mut MigrationRecord) -> Result<(), StepError> {
        let snapshot = self.ensure_snapshot(agent, record).await?;
        let target = self.target_db()?;
        // Post-data is dumped now, in the same snapshot, and kept: applying
        // it later must not need the snapshot.
        let post_data = schema::dump(agent, &snapshot, "post-data", &record.dump_exclude).await?;
        let pre_data = schema::dump(agent, &snapshot, "pre-data", &record.dump_exclude).await?;
        let (pre_data, post_data) = (
            skip::filter(pre_data, &record.skip),
            skip::filter(post_data, &record.skip),
        );
        let left_out: Vec<&String> = pre_data.left_out.iter().chain(&post_data.left_out).collect();
        if !left_out.is_empty() {
            tracing::info!(?left_out, "schema entries left out");
        }
        schema::apply_in_one_transaction(target, &pre_data.statements).await?;
        record.post_data = post_data.statements.into_iter().map(|s| s.text).collect();
        record.pre_data_applied = true;
        record.phase = Phase::Copy;
        self.save(record).await
    }

    async fn copy(&self, agent: &AgentClient, record: &mut MigrationRecord) -> Result<(), StepError> {
        let snapshot = self.ensure_snapshot(agent, record).await?;
        let target = self.target_db()?.clone();
        let tables = self.table_records()?;
        // A table copied just before a restart may still await its check.
        if record.verify {
            for table in tables.iter().filter(|t| t.state == TableState::Copied) {
                self.verify_table(agent, &target, &snapshot, table.clone()).await?;
            }
        }
        let pending: Vec<TableRecord> = tables.into_iter().filter(|t| !t.state.is_done()).collect();
        let parallel = record.parallel.max(1) as usize;
        self.lock_progress().tables.clear();
        tracing::info!(tables = pending.len(), parallel, "copying");

        // Units of work: a whole table, or one page range of a split table.
        // A split table is emptied once, up front, since its ranges commit
        // separately; an unsplit one is emptied inside its copy.
        let mut units = Vec::new();
        let mut runs = BTreeMap::new();
        for mut table in pending {
            table.state = TableState::Copying;
            table.copy_attempts += 1;
            table.rows = 0;
            table.bytes = 0;
            table.wire_bytes = 0;
            self.save_table(&table).await?;
            if table.ranges.len() > 1 {
                transfer::truncate(&target, std::slice::from_ref(&table.name))
                    .await
                    .map_err(StepError::Failed)?;
                units.extend(table.ranges.iter().map(|r| (table.name.clone(), Some(*r))));
            } else {
                units.push((table.name.clone(), None));
            }
            let remaining = table.ranges.len().max(1);
            runs.insert(
                table.name.clone(),
                TableRun {
                    record: table,
                    remaining,
                    started: Instant::now(),
                },
            );
        }
        let runs = Mutex::new(runs);
        let verify = record.verify;
        // The first failure ends the step: dropping the stream cancels the
        // units still running (their target transactions roll back).
        let mut results = futures_util::stream::iter(units)
            .map(|(name, range)| {
                let (agent, target, snapshot, runs) = (agent.clone(), target.clone(), snapshot.clone(), &runs);
                async move {
                    self.copy_unit(&agent, &target, &snapshot, runs, name, range, verify)
                        .await
                }
            })
            .buffer_unordered(parallel);
        while let Some(result) = results.next().await {
            result?;
        }
        drop(results);
        record.phase = Phase::SchemaPostData;
        self.save(record).await
    }

    /// Copies one unit; the last unit of a table records the table copied
    /// and, when asked, proves it exact against the snapshot.
    #[allow(clippy::too_many_arguments)]
    async fn copy_unit(
        &self,
        agent: &AgentClient,
        target: &Database,
        snapshot: &str,
        runs: &Mutex<BTreeMap<QualifiedName, TableRun>>,
        name: QualifiedName,
        range: Option<PageRange>,
        verify: bool,
    ) -> Result<(), StepError> {
        let columns = lock(runs)
            .get(&name)
            .map(|r| r.record.columns.clone())
            .unwrap_or_default();
        let progress = |rows: u64, bytes: u64| {
            let mut live = self.lock_progress();
            let entry = live.tables.entry(name.clone()).or_default();
            entry.0 += rows;
            entry.1 += bytes;
        };
        let copied = transfer::copy_table(agent, target, snapshot, &name, &columns, range, &progress).await;
        let copied = match copied {
            Ok(copied) => copied,
            Err(e) => return Err(self.classify(agent, snapshot, e).await),
        };
        let finished = {
            let mut runs = lock(runs);
            let run = runs.get_mut(&name).expect("every unit belongs to a run");
            run.record.rows += copied.rows;
            run.record.bytes += copied.bytes;
            run.record.wire_bytes += copied.wire_bytes;
            run.remaining -= 1;
            (run.remaining == 0).then(|| {
                let mut table = run.record.clone();
                table.copy_seconds = run.started.elapsed().as_secs_f64();
                table.state = TableState::Copied;
                table
            })
        };
        let Some(table) = finished else {
            return Ok(());
        };
        self.lock_progress().tables.remove(&name);
        self.save_table(&table).await?;
        tracing::info!(table = %table.name, rows = table.rows, bytes = table.bytes, seconds = table.copy_seconds, "table copied");
        if verify {
            self.verify_table(agent, target, snapshot, table).await?;
        }
        Ok(())
    }

    /// Proves a copied table equal to the snapshot: row count and checksum
    /// on both sides, the source read in the snapshot.
    async fn verify_table(
        &self,
        agent: &AgentClient,
        target: &Database,
        snapshot: &str,
        mut table: TableRecord,
    ) -> Result<(), StepError> {
        match transfer::compare(agent, target, snapshot, &table.name, &table.columns).await {
            Ok(check) if check.matches() => {
                table.state = TableState::Verified;
                self.save_table(&table).await
            }
            Ok(check) => {
                table.state = TableState::Failed;
                self.save_table(&table).await?;
                Err(StepError::Failed(format!(
                    "verification of {} failed right after its copy: source {} rows (checksum {}), target {} rows (checksum {})",
                    table.name, check.source.0, check.source.1, check.target.0, check.target.1
                )))
            }
            Err(e) => Err(self.classify(agent, snapshot, e).await),
        }
    }

    /// A failed stream may mean the snapshot is gone (the agent died):
    /// ask, when the agent is there to answer.
    async fn classify(&self, agent: &AgentClient, snapshot: &str, error: String) -> StepError {
        let held = agent
            .clone()
            .snapshot_status(wire::SnapshotStatusRequest {
                snapshot: snapshot.to_owned(),
            })
            .await;
        match held {
            Ok(response) if response.get_ref().held => StepError::Failed(error),
            // Not held, or the agent is not answering (the link dropped,
            // most likely because it died): the snapshot cannot be trusted.
            _ => StepError::SnapshotLost,
        }
    }

    async fn restart_copy(&self, record: &mut MigrationRecord) -> Result<(), StepError> {
        let lost = record.snapshot.as_ref().map(|s| s.name.clone()).unwrap_or_default();
        let event = format!(
            "the agent lost snapshot {lost} (its process restarted or its source connection broke): \
             the copy restarts from a new slot and snapshot"
        );
        tracing::warn!("{event}");
        record.events.push(event);
        record.copy_restarts += 1;
        let tables = self.table_records()?;
        let copied: Vec<QualifiedName> = tables
            .iter()
            .filter(|t| t.state != TableState::Pending)
            .map(|t| t.name.clone())
            .collect();
        if !copied.is_empty() {
            transfer::truncate(self.target_db()?, &copied)
                .await
                .map_err(StepError::Failed)?;
        }
        for mut table in tables {
            table.state = TableState::Pending;
            table.rows = 0;
            table.bytes = 0;
            table.wire_bytes = 0;
            self.save_table(&table).await?;
        }
        record.snapshot = None;
        record.stale_slots.push(record.slot.clone());
        record.slot = slot_name(&record.id, record.copy_restarts);
        record.phase = Phase::Snapshot;
        // The agent may not be back yet: the next step waits for it, then
        // drops the stale slot before making the new one.
        self.save(record).await
    }

    async fn apply_post_data(&self, record: &mut MigrationRecord) -> Result<(), StepError> {
        let target = self.target_db()?;
        while record.post_data_applied < record.post_data.len() {
            let statement = &record.post_data[record.post_data_applied];
            schema::execute(target, statement, record.post_data_applied).await?;
            record.post_data_applied += 1;
            self.save(record).await?;
        }
        schema::refresh_materialized_views(target, &record.materialized_views).await?;
        record.phase = Phase::ReleaseSnapshot;
        self.save(record).await
    }

    async fn release_snapshot(&self, agent: &AgentClient, record: &mut MigrationRecord) -> Result<(), StepError> {
        if let Some(snapshot) = &record.snapshot {
            agent
                .clone()
                .release_snapshot(wire::ReleaseSnapshotRequest {
                    snapshot: snapshot.name.clone(),
                })
                .await
                .map_err(|s| StepError::Failed(s.message().to_owned()))?;
        }
        record.phase = if record.copy_only {
            // Nothing will stream from the slot: it would only hold WAL on
            // the source's disk. The migration ends here, leaving nothing.
            let released = release_replication(agent, record).await;
            if !released.problems.is_empty() {
                return Err(StepError::Failed(format!(
                    "the copy is done, but releasing the source failed: {}",
                    released.problems.join("; ")
                )));
            }
            record.snapshot = None;
            record
                .events
                .push(format!("copy only: removed {}", released.removed.join(", ")));
            Phase::Copied
        } else {
            Phase::Subscribe
        };
        tracing::info!(migration = %record.id, "initial copy complete");
        self.save(record).await
    }

    /// Creates the subscription that streams the changes since the slot's
    /// consistent point. The password comes from the agent for this one
    /// statement and is kept nowhere else by walbridge.
    async fn subscribe(&self, agent: &AgentClient, record: &mut MigrationRecord) -> Result<(), StepError> {
        let target = self.target_db()?;
        let route = self.route(record.direct).map_err(StepError::Failed)?;
        // The role's name is journaled before it exists, so that whatever
        // happens next, the migration's end drops it (a no-op when the
        // agent uses the operator's subscription.user instead).
        let role = format!("walbridge_{}", record.id);
        if record.subscription_role != role {
            record.subscription_role = role.clone();
            self.save(record).await?;
        }
        let source = agent
            .clone()
            .subscription_connection(wire::SubscriptionConnectionRequest { role })
            .await
            .map_err(|s| StepError::Failed(s.message().to_owned()))?
            .into_inner();
        let oid = subscription::create(target, record, &source, &route, &self.settings.subscription_tls)
            .await
            .map_err(StepError::Failed)?;
        tracing::info!(subscription = %record.subscription, role = %source.user, direct = record.direct, "subscription created");
        record.subscription_oid = oid;
        record.phase = Phase::Streaming;
        self.save(record).await
    }

    /// How the target reaches the source: directly, or through the tunnel.
    pub fn route(&self, direct: bool) -> Result<subscription::Route, String> {
        if direct {
            return Ok(subscription::Route::Direct);
        }
        self.settings
            .tunnel_advertise
            .clone()
            .map(|(host, port)| subscription::Route::Tunnel { host, port })
            .ok_or_else(|| "listen.tunnel is not set (or start with --direct)".to_owned())
    }

    /// A cutover the controller did not see to its end (it restarted). The
    /// fence's stream died with it, so an unsealed fence is already gone.
    /// A sealed one: if the subscription was detached the cutover is done;
    /// if not, the fence is released and streaming goes on.
    async fn resolve_interrupted_cutover(
        &self,
        agent: &AgentClient,
        record: &mut MigrationRecord,
    ) -> Result<(), StepError> {
        let target = self.target_db()?;
        let client = subscription::session(target).await.map_err(StepError::Failed)?;
        let detached = subscription::state(&client, &record.subscription)
            .await
            .map_err(StepError::Failed)?
            == subscription::State::Detached;
        if detached {
            record.phase = Phase::CutOver;
            record.events.push(
                "a cutover interrupted by a restart had already detached the subscription: it is done".to_owned(),
            );
        } else {
            agent
                .clone()
                .release_fence(wire::ReleaseFenceRequest {
                    migration: record.id.clone(),
                })
                .await
                .map_err(|s| StepError::Failed(s.message().to_owned()))?;
            record.fence_sealed = false;
            record.phase = Phase::Streaming;
            record.events.push(
                "a cutover was interrupted by a controller restart: the fence is lifted, streaming goes on".to_owned(),
            );
        }
        self.save(record).await
    }
}
