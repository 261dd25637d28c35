//! The test harness of walbridge's end-to-end tests.
//!
//! * [`cluster`]: throwaway PostgreSQL clusters from any version's bin folder.
//! * [`daemons`]: walbridge's own programs as separate processes.

pub mod daemons;

/// Throwaway PostgreSQL clusters (shared with `walbridge demo`).
pub use walbridge_pgcluster as cluster;

pub use cluster::{ClientCert, Cluster, ClusterBuilder, PgInstall, ServerCert, TestCa};
