//! walbridge's agent: it runs next to the source database, holds the
//! source's credentials, dials the controller out over mutual TLS and
//! serves it the `AgentService` gRPC API over that connection.
//!
//! * [`config`]: the agent's settings.
//! * [`link`]: dialing, authenticating, serving, redialing.
//! * [`service`]: the gRPC service the controller calls.
//! * [`source`]: what the agent sees of the source database.
//!
//! **Architecture invariant**: only the agent connects to the source.

pub mod config;
pub mod link;
pub mod preflight;
pub mod replication;
pub mod service;
pub mod source;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use walbridge_daemon::journal::Journal;

pub use config::AgentConfig;

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(config: AgentConfig, journal: Journal, shutdown: CancellationToken) {
    let config = Arc::new(config);
    tracing::info!(
        agent = %config.name,
        controller = %config.controller.address,
        source = %config.source.redacted(),
        journal = %journal.path().display(),
        "walbridge-agent starting"
    );
    link::run(config, shutdown).await;
    tracing::info!("walbridge-agent stopped");
}
