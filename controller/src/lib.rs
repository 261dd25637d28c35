//! walbridge's controller: it runs near the target database, accepts the
//! agents' mutual-TLS links (and then calls them over those links), keeps
//! the migration's journal, and serves the CLI's API.
//!
//! * [`config`]: the controller's settings.
//! * [`link`]: accepting agents; the gRPC client over each agent's link.
//! * [`registry`]: the agents connected now.
//! * [`api`]: the CLI's API; [`start`] (preflight, start), [`status`],
//!   [`verify`]: what its calls do.
//! * [`migration`]: the migration's records and its state, in one place.
//! * [`runner`]: runs one operation at a time (the drive through the
//!   phases, cutover, abort, cleanup) and applies the fault policy.
//! * [`steps`]: one module per step of the migration.
//! * [`fault`]: the controller's side of fault classification.
//! * [`target`]: sessions on the target, one kind per purpose.
//! * [`bookkeeping`]: what the target records of the work done on it.
//! * [`plan`]: from catalog and selection to what is copied.
//! * [`catalog_watch`]: tables and partitions created while streaming.
//! * [`large_objects`]: large objects, copied and kept up to date.
//! * [`drift`]: how the target's tables differ from the source's now.
//! * [`schema`]: pg_dump's sections applied to the target.
//! * [`transfer`]: table data into the target; checksums.
//! * [`preflight`]: the target-side checks; [`rehearsal`]: the schema tried
//!   on the target and rolled back; [`probe`]: the proof that the
//!   subscription can log in to the source.
//! * [`subscription`]: the target's subscription.
//! * [`slot_watch`]: the slot watched in every phase that holds one: lag
//!   in time, retained WAL, `max_slot_wal_keep_size`, a lost slot.
//! * [`tunnel`]: the subscription's connections, carried to the agent;
//!   [`door`]: who may use the tunnel when.
//! * [`metrics`]: Prometheus metrics, read from `status` at scrape time.
//!
//! Modules below `steps` (`schema`, `transfer`, `subscription`, `target`,
//! `bookkeeping`) know nothing of the migration's records or runner.
//!
//! **Architecture invariant**: only the controller connects to the target;
//! it never connects to the source (the agent does).

pub mod api;
pub mod bookkeeping;
pub mod catalog_watch;
pub mod config;
pub mod door;
pub mod drift;
pub mod fault;
pub mod large_objects;
pub mod link;
pub mod metrics;
pub mod migration;
pub mod plan;
pub mod preflight;
pub mod probe;
pub mod registry;
pub mod rehearsal;
pub mod runner;
pub mod schema;
pub mod slot_watch;
pub mod start;
pub mod status;
pub mod steps;
pub mod subscription;
pub mod target;
pub mod transfer;
pub mod tunnel;
pub mod verify;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use walbridge_daemon::journal::Journal;
use walbridge_daemon::net;
use walbridge_daemon::settings::SettingError;

pub use config::ControllerConfig;
use config::{ApiAddress, DATA_DIR, LISTEN_AGENTS, LISTEN_API, LISTEN_TUNNEL};

/// How long shutdown waits for tasks that own state to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The controller with its ports bound and its journal open: everything
/// that can be wrong with its settings has been found by now.
#[derive(Debug)]
pub struct BoundController {
    config: ControllerConfig,
    journal: Journal,
    agents: std::net::TcpListener,
    tunnel: Option<std::net::TcpListener>,
    metrics: Option<std::net::TcpListener>,
    api: ApiListener,
}

#[derive(Debug)]
enum ApiListener {
    Unix(std::os::unix::net::UnixListener),
    Tcp(std::net::TcpListener),
}

impl BoundController {
    /// Opens the journal and binds every port, naming the setting at fault.
    pub fn bind(config: ControllerConfig) -> Result<BoundController, SettingError> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| SettingError::new(DATA_DIR, format!("cannot create {}: {e}", config.data_dir.display())))?;
        let journal =
            Journal::open(&config.data_dir.join("journal")).map_err(|e| SettingError::new(DATA_DIR, e.to_string()))?;
        let agents = net::bind(LISTEN_AGENTS, config.listen_agents)?;
        let tunnel = config
            .tunnel
            .listen
            .map(|address| net::bind(LISTEN_TUNNEL, address))
            .transpose()?;
        let metrics = walbridge_daemon::metrics::bind(config.listen_metrics)?;
        let mut config = config;
        // Port 0 picks a free port: the advertised one is the one bound.
        if let (Some(listener), Some((_, 0))) = (&tunnel, &config.tunnel.advertise)
            && let Ok(bound) = listener.local_addr()
        {
            config.tunnel.advertise = Some((bound.ip().to_string(), bound.port()));
        }
        let api = match &config.listen_api {
            ApiAddress::Tcp(address) => ApiListener::Tcp(net::bind(LISTEN_API, *address)?),
            ApiAddress::Unix(path) => ApiListener::Unix(bind_unix(path)?),
        };
        Ok(BoundController {
            config,
            journal,
            agents,
            tunnel,
            metrics,
            api,
        })
    }

    pub fn log_format(&self) -> walbridge_daemon::telemetry::LogFormat {
        self.config.log_format
    }

    /// The address agents dial (useful when the port was 0).
    pub fn agents_address(&self) -> std::io::Result<std::net::SocketAddr> {
        self.agents.local_addr()
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), String> {
        let BoundController {
            config,
            journal,
            agents,
            tunnel,
            metrics,
            api,
        } = self;
        let known = Arc::new(
            journal
                .table::<link::KnownAgent>(link::KNOWN_AGENTS_TABLE)
                .map_err(|e| e.to_string())?,
        );
        let registry = Arc::new(registry::Registry::default());
        let acceptor = TlsAcceptor::from(config.identity.server_config());
        let tasks = TaskTracker::new();

        let agents = net::into_tokio(agents)?;
        tracing::info!(
            agents = %config.listen_agents,
            api = ?config.listen_api,
            journal = %journal.path().display(),
            "walbridge-controller serving"
        );
        tasks.spawn(link::accept_agents(
            agents,
            acceptor.clone(),
            registry.clone(),
            known,
            tasks.clone(),
            shutdown.clone(),
        ));
        let state = migration::MigrationState::open(&journal).map_err(|e| e.to_string())?;
        let ctx = Arc::new(migration::Context {
            door: door::TunnelDoor::new(state.follow()),
            registry,
            target: config.target.clone(),
            settings: migration::MigrationSettings {
                split_bytes: config.split_bytes,
                tunnel_advertise: config.tunnel.advertise.clone(),
                retained_wal_warning: config.retained_wal_warning,
                snapshot_create_timeout: config.snapshot_create_timeout,
                subscription_tls: config.subscription_tls.clone(),
            },
            state,
            slot_watch: slot_watch::SlotWatch::default(),
        });
        let runner = runner::Runner::new(ctx.clone(), tasks.clone(), shutdown.clone());
        if let Some(listener) = tunnel {
            tracing::info!(tunnel = ?config.tunnel.listen, advertise = ?config.tunnel.advertise, "tunnel listening");
            tasks.spawn(tunnel::serve(
                net::into_tokio(listener)?,
                config.tunnel.clone(),
                ctx.clone(),
                tasks.clone(),
                shutdown.clone(),
            ));
        }
        if let Some(listener) = metrics {
            tracing::info!(metrics = ?config.listen_metrics, "serving /metrics");
            tasks.spawn(metrics::serve(
                net::into_tokio(listener)?,
                runner.clone(),
                tasks.clone(),
                shutdown.clone(),
            ));
        }
        tasks.spawn(catalog_watch::watch(runner.clone(), shutdown.clone()));
        tasks.spawn(slot_watch::watch(runner.clone(), shutdown.clone()));
        // A migration interrupted by a restart carries on where its journal
        // says it was.
        runner.resume().map_err(|e| e.to_string())?;
        let api_service = api::Api::new(runner);
        let served = match api {
            ApiListener::Unix(listener) => {
                listener.set_nonblocking(true).map_err(|e| e.to_string())?;
                let listener = tokio::net::UnixListener::from_std(listener).map_err(|e| e.to_string())?;
                api::serve_unix(api_service, listener, shutdown.clone()).await
            }
            ApiListener::Tcp(listener) => {
                let listener = net::into_tokio(listener)?;
                api::serve_tcp(api_service, listener, acceptor, tasks.clone(), shutdown.clone()).await
            }
        };
        shutdown.cancel();
        tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait()).await.is_err() {
            tracing::warn!(
                still_running = tasks.len(),
                "tasks did not finish within the shutdown grace period"
            );
        }
        if let ApiAddress::Unix(path) = &config.listen_api {
            let _ = std::fs::remove_file(path);
        }
        served.map_err(|e| format!("the API server failed: {e}"))
    }
}

/// Binds the API socket. A socket file left by a controller that died is
/// replaced; one that a running controller answers on is not.
fn bind_unix(path: &std::path::Path) -> Result<std::os::unix::net::UnixListener, SettingError> {
    let problem = |p: String| SettingError::new(LISTEN_API, p);
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(problem(format!(
                "{} is in use: another controller is running with it",
                path.display()
            )));
        }
        std::fs::remove_file(path)
            .map_err(|e| problem(format!("cannot remove the stale socket {}: {e}", path.display())))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| problem(format!("cannot listen on {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| problem(format!("cannot restrict {} to its owner: {e}", path.display())))?;
    Ok(listener)
}
