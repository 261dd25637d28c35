//! The migration: one state machine, persisted as it is, readable beside
//! the runbook. Each phase is recorded in the journal before the next one
//! starts, and each can be run again after any process restarts:
//!
//! | phase            | safe to repeat because                                           |
//! |------------------|------------------------------------------------------------------|
//! | `Snapshot`       | a leftover slot of this migration is dropped first               |
//! | `SchemaPreData`  | one target transaction, which records itself on the target:     |
//! |                  | it applied entirely (and is not applied again), or not at all    |
//! | `Copy`           | each table (each range) is copied in one target transaction      |
//! |                  | that records it there: a resume copies only what is not          |
//! | `ReleaseSnapshot`| releasing a snapshot that is gone is a no-op                     |
//! | `SchemaPostData` | each statement is recorded done with it, on the target           |
//! | `Subscribe`      | an existing subscription of this name is kept (with the role's  |
//! |                  | new password)                                                    |
//! | `Cutover`        | resolved at startup (or when a failed cutover's rollback could   |
//! |                  | not finish): rolled back before the point of no return,          |
//! |                  | finished after it                                                |
//!
//! `Streaming`, `Copied` (with `--copy-only`), `CutOver`, `Failed`,
//! `Aborted` and `CleanedUp` are resting phases: nothing runs in them
//! until the operator asks (cutover, cleanup, abort).
//!
//! What a fault does is decided once, by its kind
//! (`walbridge_migration::fault`): transient faults are retried where they
//! happened, a lost snapshot restarts the copy from a new slot, and only
//! what needs a person ends the migration (`Failed`, which releases the
//! source).
//!
//! * [`record`]: the journal's records (phase, tables, cutover).
//! * [`state`]: where the migration's state lives: journal and live figures.
//!
//! **Architecture invariant**: the steps (`crate::steps`) change the
//! migration only through [`state::MigrationState`]; only the runner
//! (`crate::runner`) decides what runs next and what a fault means.

pub mod record;
pub mod state;

use std::sync::Arc;

use walbridge_daemon::pg::Database;
use walbridge_migration::fault::Fault;

pub use record::{
    Compression, CutoverReport, Detach, MigrationRecord, Phase, RefusedTable, SnapshotRecord, SourceIdentity,
    TableRecord, TableState, slot_name,
};
pub use state::MigrationState;

use crate::registry::Registry;
use crate::subscription::SubscriptionTls;

/// How the controller runs migrations (from its settings).
#[derive(Debug, Clone)]
pub struct MigrationSettings {
    pub split_bytes: u64,
    /// HOST:PORT of the tunnel, as the target reaches it.
    pub tunnel_advertise: Option<(String, u16)>,
    pub retained_wal_warning: u64,
    /// How long the slot's creation may wait for transactions on the
    /// source (`snapshot.create_timeout`).
    pub snapshot_create_timeout: std::time::Duration,
    /// The subscription's TLS where the source's settings do not carry over.
    pub subscription_tls: SubscriptionTls,
}

/// What every step works with: the agents, the target, the settings and
/// the migration's state.
#[derive(Debug)]
pub struct Context {
    pub registry: Arc<Registry>,
    pub target: Option<Database>,
    pub settings: MigrationSettings,
    pub state: MigrationState,
    /// Who may use the tunnel now (follows `state`).
    pub door: crate::door::TunnelDoor,
    /// The slot's lag clock, and whether it was found lost.
    pub slot_watch: crate::slot_watch::SlotWatch,
}

impl Context {
    pub fn target(&self) -> Result<&Database, Fault> {
        self.target
            .as_ref()
            .ok_or_else(|| crate::fault::internal("target.url is not set on the controller"))
    }

    /// How the target reaches the source: directly, or through the tunnel.
    pub fn route(&self, direct: bool) -> Result<crate::subscription::Route, String> {
        if direct {
            return Ok(crate::subscription::Route::Direct);
        }
        self.settings
            .tunnel_advertise
            .clone()
            .map(|(host, port)| crate::subscription::Route::Tunnel { host, port })
            .ok_or_else(|| "listen.tunnel is not set (or start with --direct)".to_owned())
    }
}
