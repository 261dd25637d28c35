//! The controller's API for the CLI: on a unix socket (its file mode is the
//! access control) or on TCP with mutual TLS, where only the operator's
//! certificate is let in.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::net::{TcpListener, UnixListener};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Server;
use tonic::{Request, Response, Status};
use walbridge_daemon::connection::{self, Watched};
use walbridge_daemon::pki::OPERATOR_NAME;
use walbridge_daemon::tls::{describe_handshake_error, peer_name};
use walbridge_proto::v1 as wire;
use walbridge_proto::v1::controller_api_server::{ControllerApi, ControllerApiServer};

use crate::link::{hello, unix_ms};
use crate::registry::Registry;
use crate::runner::{RunError, Runner};
use crate::steps::{cutover, teardown};
use crate::{start, status, verify};

/// Handshakes waiting for the API server to take them.
const PENDING_API_CONNECTIONS: usize = 16;
const API_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Api {
    registry: Arc<Registry>,
    runner: Arc<Runner>,
}

impl Api {
    pub fn new(runner: Arc<Runner>) -> Api {
        Api {
            registry: runner.ctx().registry.clone(),
            runner,
        }
    }
}

/// The status an operation's failure reaches the CLI as: `Busy` and a
/// refusal are preconditions; a fault by its kind.
pub fn status_of(error: RunError) -> Status {
    use walbridge_migration::fault::FaultKind;
    match &error {
        RunError::Busy(_) | RunError::Refused(_) => Status::failed_precondition(error.to_string()),
        RunError::Fault(fault) => match fault.kind {
            FaultKind::SourceUnavailable | FaultKind::TargetUnavailable | FaultKind::AgentAway => {
                Status::unavailable(error.to_string())
            }
            FaultKind::Privilege => Status::permission_denied(error.to_string()),
            _ => Status::internal(error.to_string()),
        },
    }
}

fn cleanup_response(removed: teardown::Removed, phase: &str) -> wire::CleanupResponse {
    wire::CleanupResponse {
        removed: removed.removed,
        phase: phase.to_owned(),
        remaining: removed.remaining,
        source_sql: removed.source_sql,
    }
}

#[tonic::async_trait]
impl ControllerApi for Api {
    async fn list_agents(
        &self,
        _request: Request<wire::ListAgentsRequest>,
    ) -> Result<Response<wire::ListAgentsResponse>, Status> {
        let agents = self.registry.list();
        let hellos = join_all(agents.iter().map(|agent| hello(&agent.client))).await;
        let agents = agents
            .into_iter()
            .zip(hellos)
            .map(|(agent, hello)| {
                let (hello, hello_error) = match hello {
                    Ok(hello) => (Some(hello), String::new()),
                    Err(e) => (None, e),
                };
                wire::ConnectedAgent {
                    name: agent.name,
                    peer_address: agent.peer.to_string(),
                    connected_at_unix_ms: unix_ms(agent.connected_at),
                    hello,
                    hello_error,
                }
            })
            .collect();
        Ok(Response::new(wire::ListAgentsResponse { agents }))
    }

    async fn preflight(
        &self,
        request: Request<wire::PreflightRequest>,
    ) -> Result<Response<wire::PreflightResponse>, Status> {
        let findings = start::preflight_call(self.runner.ctx(), request.into_inner()).await?;
        Ok(Response::new(wire::PreflightResponse {
            findings: findings.into_iter().map(wire::Finding::from).collect(),
        }))
    }

    async fn start(&self, request: Request<wire::StartRequest>) -> Result<Response<wire::StartResponse>, Status> {
        start::start(&self.runner, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn status(&self, _request: Request<wire::StatusRequest>) -> Result<Response<wire::StatusResponse>, Status> {
        status::status(&self.runner).await.map(Response::new)
    }

    async fn cutover(&self, request: Request<wire::CutoverRequest>) -> Result<Response<wire::CutoverResponse>, Status> {
        let request = request.into_inner();
        let seconds = |value: f64, what: &str| {
            if value.is_finite() && value >= 0.0 {
                Ok(Duration::from_secs_f64(value))
            } else {
                Err(Status::invalid_argument(format!(
                    "{what} must be a duration of zero or more"
                )))
            }
        };
        let options = cutover::Options {
            max_lag: seconds(request.max_lag_seconds, "--max-lag")?,
            timeout: seconds(request.timeout_seconds, "--timeout")?,
            dry_run: request.dry_run,
            hard_fence_roles: request.hard_fence_roles,
        };
        let report = self.runner.cutover(options).await.map_err(status_of)?;
        Ok(Response::new(cutover::report_to_wire(&report)))
    }

    async fn release_source(
        &self,
        _request: Request<wire::ReleaseSourceRequest>,
    ) -> Result<Response<wire::CleanupResponse>, Status> {
        let (removed, phase) = self.runner.release_source().await.map_err(status_of)?;
        Ok(Response::new(cleanup_response(removed, phase.name())))
    }

    async fn abort(&self, request: Request<wire::AbortRequest>) -> Result<Response<wire::CleanupResponse>, Status> {
        let removed = self.runner.abort(request.get_ref().force).await.map_err(status_of)?;
        let phase = self.phase();
        Ok(Response::new(cleanup_response(removed, &phase)))
    }

    async fn cleanup(
        &self,
        _request: Request<wire::CleanupRequest>,
    ) -> Result<Response<wire::CleanupResponse>, Status> {
        let removed = self.runner.cleanup().await.map_err(status_of)?;
        let phase = self.phase();
        Ok(Response::new(cleanup_response(removed, &phase)))
    }

    async fn sync_schema(
        &self,
        request: Request<wire::SyncSchemaRequest>,
    ) -> Result<Response<wire::SyncSchemaResponse>, Status> {
        let synced = self
            .runner
            .sync_schema(request.get_ref().dry_run)
            .await
            .map_err(status_of)?;
        Ok(Response::new(wire::SyncSchemaResponse {
            applied: synced.applied.into_iter().map(crate::drift::to_wire).collect(),
            remaining: synced.remaining.into_iter().map(crate::drift::to_wire).collect(),
            errors: synced.errors,
        }))
    }

    async fn verify(&self, request: Request<wire::VerifyRequest>) -> Result<Response<wire::VerifyResponse>, Status> {
        verify::verify(self.runner.ctx(), request.into_inner())
            .await
            .map(Response::new)
    }
}

impl Api {
    /// The current migration's phase, as it is now.
    fn phase(&self) -> String {
        self.runner
            .ctx()
            .state
            .current()
            .ok()
            .flatten()
            .map(|r| r.phase.name().to_owned())
            .unwrap_or_default()
    }
}

/// Serves the API on a unix socket until `shutdown`.
pub async fn serve_unix(
    api: Api,
    listener: UnixListener,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    Server::builder()
        .add_service(ControllerApiServer::new(api))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown.cancelled_owned())
        .await
}

/// Serves the API on TCP with mutual TLS until `shutdown`. Handshakes run
/// concurrently, so one slow client does not hold up the others.
pub async fn serve_tcp(
    api: Api,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (ready, incoming) = tokio::sync::mpsc::channel::<Result<Watched<_>, std::io::Error>>(PENDING_API_CONNECTIONS);
    let accept_shutdown = shutdown.clone();
    let accept_tasks = tasks.clone();
    tasks.spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot accept an API connection");
                        continue;
                    }
                },
                _ = accept_shutdown.cancelled() => return,
            };
            let acceptor = acceptor.clone();
            let ready = ready.clone();
            accept_tasks.spawn(async move {
                let tls = match tokio::time::timeout(API_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::warn!(%peer, "refused an API connection: {}", describe_handshake_error(&e));
                        return;
                    }
                    Err(_) => return,
                };
                if peer_name(tls.get_ref().1).as_deref() != Some(OPERATOR_NAME) {
                    tracing::warn!(%peer, "refused an API connection: only the operator's certificate may use the API");
                    return;
                }
                let (stream, _end) = connection::watch(tls, peer);
                let _ = ready.send(Ok(stream)).await;
            });
        }
    });
    Server::builder()
        .add_service(ControllerApiServer::new(api))
        .serve_with_incoming_shutdown(ReceiverStream::new(incoming), shutdown.cancelled_owned())
        .await
}
