//! The migration as the journal holds it: its phase, what each step
//! produced, and one record per table (finishing a table rewrites only
//! that table's record). Serde types with defaults for every field added
//! since the first release, so older journals still load.

use serde::{Deserialize, Serialize};
use walbridge_migration::copy::PageRange;
use walbridge_migration::ident::QualifiedName;
use walbridge_migration::selection::Selection;
use walbridge_migration::skip::Skip;
use walbridge_proto::v1 as wire;

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

    /// Whether the phase's work needs the agent (post-data does not).
    pub fn needs_agent(self) -> bool {
        !matches!(self, Phase::SchemaPostData)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub name: String,
    pub consistent_lsn: String,
    /// The agent let it go (the copy is done); the consistent point stays
    /// on record.
    #[serde(default)]
    pub released: bool,
}

/// Who the source is: pinned at `start`, so an agent re-pointed at another
/// server (restored, failed over to one without the slot) is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceIdentity {
    pub system_identifier: u64,
    pub database: String,
    /// Its `server_version_num` (0 in records made before it was kept).
    #[serde(default)]
    pub server_version_num: u32,
}

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
    /// How far the cutover's detach got: resumable after any crash.
    #[serde(default)]
    pub detach: Detach,
    #[serde(default)]
    pub cutover: Option<CutoverReport>,
    /// The source this migration started on.
    #[serde(default)]
    pub source: Option<SourceIdentity>,
    /// Schema entries left out of the dump (`start --skip`).
    #[serde(default)]
    pub skip: Vec<Skip>,
    /// GRANTs and default privileges are carried (`start --privileges`).
    #[serde(default)]
    pub privileges: bool,
    /// Large objects are left out (`start --no-large-objects`).
    #[serde(default)]
    pub skip_large_objects: bool,
    /// The copy has copied the large objects too.
    #[serde(default)]
    pub large_objects_copied: bool,
    /// Whether table data crosses the link compressed (`start --compression`).
    #[serde(default)]
    pub compression: Compression,
    /// Tables created on the source while streaming that the subscription
    /// is copying now (their indexes follow once it has).
    #[serde(default)]
    pub syncing: Vec<QualifiedName>,
    /// Tables created on the source while streaming that cannot be
    /// migrated as they are: the cutover refuses while any is here.
    #[serde(default)]
    pub refused_tables: Vec<RefusedTable>,
}

impl MigrationRecord {
    /// The source's `server_version_num`, 0 when the record does not know it.
    pub fn source_version_num(&self) -> u32 {
        self.source.as_ref().map_or(0, |s| s.server_version_num)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedTable {
    pub name: QualifiedName,
    pub why: String,
}

/// The two statements that detach the subscription, each recorded once
/// it is done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detach {
    /// `ALTER SUBSCRIPTION ... DISABLE` is done.
    pub disabled: bool,
    /// `ALTER SUBSCRIPTION ... SET (slot_name = NONE)` is done: the point
    /// of no return is passed; the target stands alone.
    pub slot_released: bool,
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

/// The slot (and publication) name of a migration's copy attempt: a new
/// slot per attempt, so an abandoned one is recognisably gone.
pub fn slot_name(id: &str, attempt: u32) -> String {
    if attempt == 0 {
        format!("walbridge_{id}")
    } else {
        format!("walbridge_{id}_{attempt}")
    }
}

/// Table data over the link (`start --compression`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// zstd while it pays (the agent measures).
    #[default]
    Auto,
    Zstd,
    None,
}

impl Compression {
    pub fn from_wire(value: i32) -> Compression {
        match wire::Compression::try_from(value) {
            Ok(wire::Compression::Zstd) => Compression::Zstd,
            Ok(wire::Compression::None) => Compression::None,
            _ => Compression::Auto,
        }
    }

    pub fn to_wire(self) -> wire::Compression {
        match self {
            Compression::Auto => wire::Compression::Auto,
            Compression::Zstd => wire::Compression::Zstd,
            Compression::None => wire::Compression::None,
        }
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
    /// Created on the source while streaming: the subscription copies it.
    Syncing,
    /// Its rows arrive through the subscription (a table the subscription
    /// copied, a partition created while streaming).
    Streamed,
}

impl TableState {
    pub fn name(self) -> &'static str {
        match self {
            TableState::Pending => "pending",
            TableState::Copying => "copying",
            TableState::Copied => "copied",
            TableState::Verified => "verified",
            TableState::Failed => "failed",
            TableState::Syncing => "syncing",
            TableState::Streamed => "streamed",
        }
    }

    /// Nothing is left for the copy to do.
    pub fn is_done(self) -> bool {
        matches!(
            self,
            TableState::Copied | TableState::Verified | TableState::Syncing | TableState::Streamed
        )
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
    /// For a partition: the published table at the top of its tree.
    #[serde(default)]
    pub root: Option<QualifiedName>,
}
