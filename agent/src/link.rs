//! The agent's side of the link. The agent dials the controller (the source
//! network allows only outbound connections), authenticates with mutual
//! TLS, and then *serves* gRPC over that connection while the controller
//! calls it. When the connection ends, it dials again with capped
//! exponential backoff and jitter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use walbridge_daemon::connection::{self, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};
use walbridge_daemon::tls::describe_handshake_error;
use walbridge_proto::v1::agent_service_server::AgentServiceServer;

use crate::config::AgentConfig;
use crate::service::{Agent, AgentState};

/// The first redial comes this soon after a link ends...
const FIRST_RETRY: Duration = Duration::from_millis(200);
/// ...and redials never wait longer than this.
const MAX_RETRY: Duration = Duration::from_secs(10);
/// A dial or handshake that takes longer than this has failed.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::new()
        .with_min_delay(FIRST_RETRY)
        .with_max_delay(MAX_RETRY)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// How one link session ended.
enum SessionEnd {
    DialFailed(String),
    HandshakeFailed(String),
    /// The TLS handshake completed but the controller hung up without
    /// calling: with TLS 1.3 that is how a refused client certificate looks
    /// from this side.
    RefusedByController(Option<String>),
    Lost {
        after: Duration,
        cause: Option<String>,
    },
    ShutDown,
}

/// Keeps the link up until `shutdown` is cancelled.
pub async fn run(config: Arc<AgentConfig>, state: Arc<AgentState>, shutdown: CancellationToken) {
    let connector = TlsConnector::from(config.identity.client_config());
    let address = &config.controller.address;
    let mut delays = backoff();
    loop {
        let end = session(&config, &state, &connector, &shutdown).await;
        let delay = match &end {
            SessionEnd::Lost { .. } => {
                // It worked for a while: start the backoff afresh.
                delays = backoff();
                delays.next().unwrap_or(MAX_RETRY)
            }
            _ => delays.next().unwrap_or(MAX_RETRY),
        };
        match end {
            SessionEnd::ShutDown => return,
            SessionEnd::DialFailed(e) => {
                tracing::warn!(controller = %address, retry_in = ?delay, "cannot reach the controller: {e}");
            }
            SessionEnd::HandshakeFailed(e) => {
                tracing::error!(controller = %address, retry_in = ?delay, "refused the controller's TLS handshake: {e}");
            }
            SessionEnd::RefusedByController(cause) => {
                tracing::error!(
                    controller = %address,
                    retry_in = ?delay,
                    "the controller refused this agent's certificate ({}): tls.cert must be signed by the CA the controller trusts",
                    cause.as_deref().unwrap_or("it closed the connection right after the handshake")
                );
            }
            SessionEnd::Lost { after, cause } => {
                tracing::warn!(
                    controller = %address,
                    after = ?after,
                    retry_in = ?delay,
                    "link to the controller lost ({}); reconnecting",
                    cause.as_deref().unwrap_or("connection closed")
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn session(
    config: &AgentConfig,
    state: &Arc<AgentState>,
    connector: &TlsConnector,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let address = &config.controller.address;
    let dial = async {
        let tcp = TcpStream::connect(address)
            .await
            .map_err(|e| SessionEnd::DialFailed(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let peer = tcp.peer_addr().map_err(|e| SessionEnd::DialFailed(e.to_string()))?;
        let tls = connector
            .connect(config.controller.server_name.clone(), tcp)
            .await
            .map_err(|e| SessionEnd::HandshakeFailed(describe_handshake_error(&e)))?;
        Ok((tls, peer))
    };
    let (tls, peer) = tokio::select! {
        dialed = tokio::time::timeout(DIAL_TIMEOUT, dial) => match dialed {
            Ok(Ok(link)) => link,
            Ok(Err(end)) => return end,
            Err(_) => return SessionEnd::DialFailed(format!("no answer within {DIAL_TIMEOUT:?}")),
        },
        _ = shutdown.cancelled() => return SessionEnd::ShutDown,
    };
    tracing::info!(controller = %address, %peer, "link up: serving the controller");
    state.link_up.store(true, std::sync::atomic::Ordering::Relaxed);
    let served = serve(state, tls, peer, shutdown).await;
    state.link_up.store(false, std::sync::atomic::Ordering::Relaxed);
    served
}

/// Serves the controller over one established link until it ends.
async fn serve(
    state: &Arc<AgentState>,
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    peer: std::net::SocketAddr,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let started = Instant::now();
    let (stream, mut end) = connection::watch(tls, peer);
    let first_error = end.first_error_handle();
    let agent = Agent::new(state.clone());
    // tonic serves what the stream yields; the pending tail keeps it from
    // treating the end of the stream as a shutdown.
    let incoming = futures_util::stream::once(async move { Ok::<_, std::io::Error>(stream) })
        .chain(futures_util::stream::pending());
    let stopped_by_us = CancellationToken::new();
    let signal = {
        let shutdown = shutdown.clone();
        let stopped_by_us = stopped_by_us.clone();
        async move {
            tokio::select! {
                _ = end.closed() => {}
                _ = shutdown.cancelled() => stopped_by_us.cancel(),
            }
        }
    };
    let served = Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(AgentServiceServer::new(agent.clone()))
        .serve_with_incoming_shutdown(incoming, signal)
        .await;
    if stopped_by_us.is_cancelled() {
        return SessionEnd::ShutDown;
    }
    let cause = first_error
        .get()
        .map(str::to_owned)
        .or_else(|| served.err().map(|e| e.to_string()));
    if agent.calls_answered() == 0 {
        return SessionEnd::RefusedByController(cause);
    }
    SessionEnd::Lost {
        after: started.elapsed(),
        cause,
    }
}
