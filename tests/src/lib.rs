//! The test harness of walbridge's end-to-end tests.
//!
//! * [`cluster`]: throwaway PostgreSQL clusters from any version's bin folder.
//! * [`daemons`]: walbridge's own programs as separate processes.

pub mod cluster;
pub mod daemons;

pub use cluster::{Cluster, ClusterBuilder, PgInstall};
