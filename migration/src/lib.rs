//! The migration's vocabulary, shared by the agent and the controller.
//!
//! * [`ident`]: schema-qualified names, quoted in one place only.
//! * [`lsn`]: WAL positions.
//! * [`finding`]: what preflight reports.
//! * [`script`]: pg_dump's SQL script split into statements.
//!
//! **Architecture invariant**: no I/O here; pure types and functions.

pub mod finding;
pub mod ident;
pub mod lsn;
pub mod script;
