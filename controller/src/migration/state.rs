//! The migration's state, in one place: what the journal holds (the
//! record and one record per table, each flushed before the step it
//! describes is reported done) and what lives only in memory while the
//! controller runs (copy progress, the retries under way, what waits for
//! the agent, the running cutover's steps) — all that `status` shows.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use tokio::sync::watch;
use walbridge_daemon::journal::{Journal, JournalError, Table};
use walbridge_migration::fault::{Fault, FaultKind};
use walbridge_migration::ident::QualifiedName;

use super::record::{CutoverReport, MigrationRecord, TableRecord};
use crate::door::CurrentMigration;

const MIGRATION_TABLE: &str = "migration";
const TABLES_TABLE: &str = "migration.tables";
const CURRENT: &str = "current";

/// A unit of work being retried after transient faults.
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    /// What is retried: "copy of public.orders", "post-data statement 12".
    pub unit: String,
    pub count: u32,
    pub kind: FaultKind,
    pub last_error: String,
    pub since: SystemTime,
}

/// A step waiting for the migration's agent to connect.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    pub agent: String,
    pub since: SystemTime,
    /// The phase whose work waits.
    pub phase: &'static str,
    /// Why it cannot be used: not connected, or reaching another source.
    pub reason: String,
}

/// What was found when an agent's link was checked against the source
/// pinned at `start`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkCheck {
    pub link_id: u64,
    pub at: std::time::Instant,
    /// Why this link is refused for the migration (`None`: it may be used).
    pub refusal: Option<String>,
}

#[derive(Debug, Default)]
struct Live {
    /// Rows and bytes of the tables being copied, as they arrive.
    progress: BTreeMap<QualifiedName, (u64, u64)>,
    retries: BTreeMap<String, Retry>,
    waiting: Option<Waiting>,
    /// The running cutover's steps so far.
    cutover: Option<CutoverReport>,
    /// The agent's link last checked against the pinned source.
    link_check: Option<LinkCheck>,
    /// How the target's tables differed from the source's when last compared.
    drift: Vec<walbridge_migration::definition::Drift>,
}

pub struct MigrationState {
    records: Table<MigrationRecord>,
    tables: Table<TableRecord>,
    /// The current migration's agent and phase, published on every save:
    /// the tunnel's door follows it.
    published: watch::Sender<Option<CurrentMigration>>,
    /// A std mutex: held only to read or change a field, never across an await.
    live: Mutex<Live>,
}

impl std::fmt::Debug for MigrationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationState").finish_non_exhaustive()
    }
}

impl MigrationState {
    pub fn open(journal: &Journal) -> Result<MigrationState, JournalError> {
        let records: Table<MigrationRecord> = journal.table(MIGRATION_TABLE)?;
        let published = watch::Sender::new(records.get(CURRENT)?.as_ref().map(CurrentMigration::of));
        Ok(MigrationState {
            records,
            tables: journal.table(TABLES_TABLE)?,
            published,
            live: Mutex::new(Live::default()),
        })
    }

    /// The current migration's agent and phase as they change.
    pub fn follow(&self) -> watch::Receiver<Option<CurrentMigration>> {
        self.published.subscribe()
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current migration (the last one started), if any.
    pub fn current(&self) -> Result<Option<MigrationRecord>, JournalError> {
        self.records.get(CURRENT)
    }

    /// The one way the current record is written: journaled (returns once
    /// it is flushed), then published when its agent or phase changed.
    pub async fn save(&self, record: &MigrationRecord) -> Result<(), JournalError> {
        self.records.put(CURRENT, record).await?;
        let current = Some(CurrentMigration::of(record));
        self.published.send_if_modified(|published| {
            let changed = *published != current;
            *published = current;
            changed
        });
        Ok(())
    }

    pub fn tables(&self) -> Result<Vec<TableRecord>, JournalError> {
        Ok(self.tables.all()?.into_iter().map(|(_, t)| t).collect())
    }

    pub async fn save_table(&self, table: &TableRecord) -> Result<(), JournalError> {
        self.tables.put(&table.name.to_string(), table).await
    }

    /// Records a new migration in place of the last one.
    pub async fn create(&self, record: &MigrationRecord, tables: &[TableRecord]) -> Result<(), JournalError> {
        for (_, old) in self.tables.all()? {
            self.tables.remove(&old.name.to_string()).await?;
        }
        for table in tables {
            self.save_table(table).await?;
        }
        *self.live() = Live::default();
        self.save(record).await
    }

    pub fn add_progress(&self, table: &QualifiedName, rows: u64, bytes: u64) {
        let mut live = self.live();
        let entry = live.progress.entry(table.clone()).or_default();
        entry.0 += rows;
        entry.1 += bytes;
    }

    /// Forgets a table's live figures (they are in its record now), or
    /// all of them.
    pub fn clear_progress(&self, table: Option<&QualifiedName>) {
        let mut live = self.live();
        match table {
            Some(table) => {
                live.progress.remove(table);
            }
            None => live.progress.clear(),
        }
    }

    pub fn progress(&self, table: &QualifiedName) -> Option<(u64, u64)> {
        self.live().progress.get(table).copied()
    }

    /// Counts one more transient fault of `unit`; returns the count.
    pub fn note_retry(&self, unit: &str, fault: &Fault) -> u32 {
        let mut live = self.live();
        let retry = live.retries.entry(unit.to_owned()).or_insert_with(|| Retry {
            unit: unit.to_owned(),
            count: 0,
            kind: fault.kind,
            last_error: String::new(),
            since: SystemTime::now(),
        });
        retry.count += 1;
        retry.kind = fault.kind;
        retry.last_error = fault.message.clone();
        retry.count
    }

    /// `unit` succeeded: it is no longer being retried.
    pub fn clear_retry(&self, unit: &str) {
        self.live().retries.remove(unit);
    }

    pub fn retries(&self) -> Vec<Retry> {
        self.live().retries.values().cloned().collect()
    }

    pub fn set_waiting(&self, waiting: Option<Waiting>) {
        self.live().waiting = waiting;
    }

    pub fn waiting(&self) -> Option<Waiting> {
        self.live().waiting.clone()
    }

    /// The last check of this link, if it is no older than `max_age`.
    pub fn link_check(&self, link_id: u64, max_age: std::time::Duration) -> Option<LinkCheck> {
        self.live()
            .link_check
            .clone()
            .filter(|c| c.link_id == link_id && c.at.elapsed() <= max_age)
    }

    pub fn set_link_check(&self, check: LinkCheck) {
        self.live().link_check = Some(check);
    }

    pub fn set_drift(&self, drift: Vec<walbridge_migration::definition::Drift>) {
        self.live().drift = drift;
    }

    pub fn drift(&self) -> Vec<walbridge_migration::definition::Drift> {
        self.live().drift.clone()
    }

    pub fn set_live_cutover(&self, report: Option<CutoverReport>) {
        self.live().cutover = report;
    }

    pub fn live_cutover(&self) -> Option<CutoverReport> {
        self.live().cutover.clone()
    }
}
