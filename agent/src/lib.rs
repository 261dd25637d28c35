//! walbridge's agent: it runs next to the source database, holds the
//! source's credentials, dials the controller out over mutual TLS and
//! serves it the `AgentService` gRPC API over that connection.
//!
//! * [`config`]: the agent's settings.
//! * [`link`]: dialing, authenticating, serving, redialing.
//! * [`service`]: the gRPC service the controller calls.
//! * [`source`]: what the agent sees of the source database.
//! * [`catalog`]: the source's tables and columns.
//! * [`publication`]: the migration's publication, grown as tables appear.
//! * [`snapshot`]: the slot's exported snapshots, held while the copy runs.
//! * [`copy`]: schema and table streams, checksums.
//! * [`pg_dump`]: which pg_dump dumps the source.
//! * [`preflight`]: the source-side checks.
//! * [`privileges`]: what each step asks of a role that is not a superuser.
//! * [`replication`]: the replication-protocol connection.
//! * [`tunnel`]: the subscription's byte streams to the source.
//! * [`streaming`]: slot lag, sequences, the subscription's connection.
//! * [`subscription_role`]: the role the subscription logs in as.
//! * [`fence`]: the cutover's write fence.
//! * [`large_objects`]: large objects' digests and contents.
//! * [`grants`]: the roles the schema's privileges name.
//!
//! **Architecture invariant**: only the agent connects to the source.

pub mod blocker;
pub mod catalog;
pub mod config;
pub mod copy;
pub mod fault;
pub mod fence;
pub mod grants;
pub mod large_objects;
pub mod link;
pub mod pg_dump;
pub mod preflight;
pub mod privileges;
pub mod publication;
pub mod replication;
pub mod service;
pub mod snapshot;
pub mod source;
pub mod streaming;
pub mod subscription_role;
pub mod tunnel;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use walbridge_daemon::journal::Journal;

pub use config::AgentConfig;

/// Runs the agent until `shutdown` is cancelled, serving its health on
/// `metrics` when given (bound by the caller, so a port in use is reported
/// as a bad setting).
pub async fn run(
    config: AgentConfig,
    journal: Journal,
    metrics: Option<std::net::TcpListener>,
    shutdown: CancellationToken,
) {
    let config = Arc::new(config);
    tracing::info!(
        agent = %config.name,
        controller = %config.controller.address,
        source = %config.source.redacted(),
        journal = %journal.path().display(),
        "walbridge-agent starting"
    );
    let tasks = tokio_util::task::TaskTracker::new();
    let state = Arc::new(service::AgentState {
        name: config.name.clone(),
        source: config.source.clone(),
        pg_dump: config.pg_dump.clone(),
        subscription_role: config.subscription_role.clone(),
        snapshots: Arc::new(snapshot::Snapshots::default()),
        monitor: streaming::Monitor::new(tasks.clone(), shutdown.clone()),
        tasks: tasks.clone(),
        link_up: std::sync::atomic::AtomicBool::new(false),
    });
    if let Some(listener) = metrics {
        match walbridge_daemon::net::into_tokio(listener) {
            Ok(listener) => {
                let state = state.clone();
                let render = move || {
                    let state = state.clone();
                    async move { service::render_metrics(&state).await }
                };
                tasks.spawn(walbridge_daemon::metrics::serve(
                    listener,
                    render,
                    tasks.clone(),
                    shutdown.clone(),
                ));
            }
            Err(e) => tracing::error!(error = %e, "cannot serve metrics"),
        }
    }
    link::run(config, state, shutdown).await;
    // Streams end with their connection; give them a moment to notice.
    tasks.close();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), tasks.wait()).await;
    tracing::info!("walbridge-agent stopped");
}
