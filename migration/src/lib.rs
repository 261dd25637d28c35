//! The migration's vocabulary, shared by the agent and the controller.
//!
//! * [`ident`]: schema-qualified names, quoted in one place only.
//! * [`lsn`]: WAL positions.
//! * [`copy`]: the SQL of the copy and of its checksum, for both sides.
//! * [`definition`]: a table's definition on either side, and the drift
//!   between them.
//! * [`fault`]: what went wrong, classified, and the one policy for it.
//! * [`failpoint`]: the names of the daemons' crash points.
//! * [`fence`]: the durable write fence's names and the script that lifts it.
//! * [`finding`]: what preflight reports.
//! * [`mark`]: the row the cutover's fence commits and the target waits for.
//! * [`post_data`]: which tables each post-data statement waits for, and
//!   which statements may run beside one another.
//! * [`role_settings`]: `ALTER ROLE/DATABASE ... SET` in force for roles
//!   whose sessions walbridge does not open (the subscription's).
//! * [`script`]: pg_dump's SQL script split into statements.
//! * [`selection`]: which tables `--tables` / `--exclude` keep.
//! * [`skip`]: which schema entries are not applied (`--skip`, and what
//!   walbridge leaves out itself).
//!
//! **Architecture invariant**: no I/O here; pure types and functions.

pub mod copy;
pub mod definition;
pub mod failpoint;
pub mod fault;
pub mod fence;
pub mod finding;
pub mod ident;
pub mod lsn;
pub mod mark;
pub mod post_data;
pub mod role_settings;
pub mod script;
pub mod selection;
pub mod skip;
