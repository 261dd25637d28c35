//! The migration's vocabulary, shared by the agent and the controller.
//!
//! * [`ident`]: schema-qualified names, quoted in one place only.
//! * [`lsn`]: WAL positions.
//! * [`copy`]: the SQL of the copy and of its checksum, for both sides.
//! * [`fault`]: what went wrong, classified, and the one policy for it.
//! * [`failpoint`]: the names of the daemons' crash points.
//! * [`finding`]: what preflight reports.
//! * [`script`]: pg_dump's SQL script split into statements.
//! * [`selection`]: which tables `--tables` / `--exclude` keep.
//! * [`skip`]: which schema entries are not applied (`--skip`, and what
//!   walbridge leaves out itself).
//!
//! **Architecture invariant**: no I/O here; pure types and functions.

pub mod copy;
pub mod failpoint;
pub mod fault;
pub mod finding;
pub mod ident;
pub mod lsn;
pub mod script;
pub mod selection;
pub mod skip;
