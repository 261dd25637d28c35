//! The crash points of both daemons, each named after what it sits
//! between (`walbridge_daemon::failpoint` is the mechanism; the points
//! exist only in builds with the feature `failpoints`). The crash tests
//! walk these lists: a kill -9 at each must leave a migration that
//! completes after the restart. "Recorded" means written to the
//! controller's journal; "committed", committed on a server.

/// The migration is journaled (phase `snapshot`); nothing of it has run,
/// and `start` has not answered the CLI.
pub const START_RECORDED: &str = "start.recorded";
/// The agent made the publication, the slot and its snapshot; the
/// journal does not know the slot's snapshot yet.
pub const SNAPSHOT_TAKEN: &str = "snapshot.taken";
/// The snapshot is journaled (phase `schema_pre_data`); pre-data not begun.
pub const SNAPSHOT_RECORDED: &str = "snapshot.recorded";
/// Pre-data is committed on the target; the journal still says
/// `schema_pre_data`.
pub const PRE_DATA_COMMITTED: &str = "pre_data.committed";
/// Phase `copy` is journaled; no table copied yet.
pub const PRE_DATA_RECORDED: &str = "pre_data.recorded";
/// One table (or page range) is committed on the target; the journal
/// has not heard of it.
pub const COPY_UNIT_COMMITTED: &str = "copy.unit_committed";
/// One post-data statement is committed on the target while the copy
/// runs (with its record there); the journal has not heard of it.
pub const COPY_POST_DATA_COMMITTED: &str = "copy.post_data_committed";
/// Every table is copied and checked; the journal still says `copy`.
pub const COPY_DONE: &str = "copy.done";
/// Phase `release_snapshot` is journaled; the agent still holds the snapshot.
pub const COPY_RECORDED: &str = "copy.recorded";
/// The agent let the snapshot go; the journal still says `release_snapshot`.
pub const RELEASE_DONE: &str = "release.done";
/// Phase `schema_post_data` is journaled; no post-data statement run.
pub const RELEASE_RECORDED: &str = "release.recorded";
/// One post-data statement is committed on the target (with its record
/// there); the journal has not heard of it.
pub const POST_DATA_STATEMENT_COMMITTED: &str = "post_data.statement_committed";
/// Post-data applied, materialized views refreshed; the journal still
/// says `schema_post_data`.
pub const POST_DATA_DONE: &str = "post_data.done";
/// Phase `subscribe` is journaled; no subscription yet.
pub const POST_DATA_RECORDED: &str = "post_data.recorded";
/// The subscription exists on the target; the journal still says `subscribe`.
pub const SUBSCRIBE_CREATED: &str = "subscribe.created";
/// Phase `streaming` is journaled.
pub const SUBSCRIBE_RECORDED: &str = "subscribe.recorded";
/// Phase `cutover` is journaled; nothing is fenced yet.
pub const CUTOVER_STARTED: &str = "cutover.started";
/// The agent holds the fence (writes wait); the target has not caught up,
/// no sequence is copied, nothing is sealed.
pub const CUTOVER_FENCED: &str = "cutover.fenced";
/// The fence is sealed and that is journaled; the subscription is not
/// yet detached: between seal and detach.
pub const CUTOVER_SEALED: &str = "cutover.sealed";
/// `ALTER SUBSCRIPTION ... DISABLE` is committed; the journal has not
/// heard of it.
pub const CUTOVER_DISABLE_COMMITTED: &str = "cutover.disable_committed";
/// The first detach statement is journaled, the second not run: between
/// the two detach statements.
pub const CUTOVER_DISABLE_RECORDED: &str = "cutover.disable_recorded";
/// `SET (slot_name = NONE)`, the point of no return, is committed; the
/// journal still says `cutover`.
pub const CUTOVER_DETACH_COMMITTED: &str = "cutover.detach_committed";
/// Phase `cut_over` is journaled; `cutover` has not answered the CLI.
pub const CUTOVER_RECORDED: &str = "cutover.recorded";
/// Cleanup or abort removed what is on the target; the source's part
/// (slot, publication, role, fence) is not removed yet.
pub const TEARDOWN_TARGET_REMOVED: &str = "teardown.target_removed";
/// Cleanup or abort is journaled; it has not answered the CLI.
pub const TEARDOWN_RECORDED: &str = "teardown.recorded";

/// The agent created the slot and holds its snapshot; it has not answered.
pub const AGENT_SLOT_CREATED: &str = "agent.slot_created";
/// The agent streamed one table (or range) out of the snapshot it holds.
pub const AGENT_UNIT_STREAMED: &str = "agent.unit_streamed";
/// The agent holds the fence's locks and said so; not sealed.
pub const AGENT_FENCE_HELD: &str = "agent.fence_held";
/// The agent committed the fence's seal; it has not said so.
pub const AGENT_FENCE_SEALED: &str = "agent.fence_sealed";

/// The controller's points, in the order a migration reaches them.
pub const CONTROLLER: &[&str] = &[
    START_RECORDED,
    SNAPSHOT_TAKEN,
    SNAPSHOT_RECORDED,
    PRE_DATA_COMMITTED,
    PRE_DATA_RECORDED,
    COPY_UNIT_COMMITTED,
    COPY_POST_DATA_COMMITTED,
    COPY_DONE,
    COPY_RECORDED,
    RELEASE_DONE,
    RELEASE_RECORDED,
    POST_DATA_STATEMENT_COMMITTED,
    POST_DATA_DONE,
    POST_DATA_RECORDED,
    SUBSCRIBE_CREATED,
    SUBSCRIBE_RECORDED,
    CUTOVER_STARTED,
    CUTOVER_FENCED,
    CUTOVER_SEALED,
    CUTOVER_DISABLE_COMMITTED,
    CUTOVER_DISABLE_RECORDED,
    CUTOVER_DETACH_COMMITTED,
    CUTOVER_RECORDED,
    TEARDOWN_TARGET_REMOVED,
    TEARDOWN_RECORDED,
];

/// The agent's points: wherever it holds state.
pub const AGENT: &[&str] = &[
    AGENT_SLOT_CREATED,
    AGENT_UNIT_STREAMED,
    AGENT_FENCE_HELD,
    AGENT_FENCE_SEALED,
];
