//! The controller's side of the link: accept an agent's connection, check
//! its certificate, and become the gRPC *client* over the connection the
//! agent dialed. The agent stays in the registry until that connection
//! ends (closed, or silent past the HTTP/2 keepalive).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::Instrument;
use walbridge_daemon::VERSION;
use walbridge_daemon::connection::{self, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, Watched};
use walbridge_daemon::journal::Table;
use walbridge_daemon::pki::{CONTROLLER_NAME, OPERATOR_NAME};
use walbridge_daemon::telemetry::PropagateTrace;
use walbridge_daemon::tls::{describe_handshake_error, peer_name};
use walbridge_proto::v1 as wire;
use walbridge_proto::v1::agent_service_client::AgentServiceClient;

use crate::registry::{AgentClient, ConnectedAgent, Registry};

/// A handshake or first Hello slower than this fails the connection.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A Hello slower than this is reported as unanswered (a source that does
/// not answer is bounded by the agent's own connect timeout, 10 s).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(12);

/// What the journal remembers of each agent that ever connected.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KnownAgent {
    pub name: String,
    pub first_connected_unix_ms: i64,
    pub last_connected_unix_ms: i64,
    /// The source cluster it last reported (0 when unreachable).
    pub source_system_identifier: u64,
}

pub const KNOWN_AGENTS_TABLE: &str = "agents";

type AgentStream = Watched<tokio_rustls::server::TlsStream<TcpStream>>;

/// Accepts agents until `shutdown` is cancelled.
pub async fn accept_agents(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    registry: Arc<Registry>,
    known: Arc<Table<KnownAgent>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: pass, and keep accepting.
                    tracing::warn!(error = %e, "cannot accept an agent connection");
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let link = AgentLink {
            acceptor: acceptor.clone(),
            registry: registry.clone(),
            known: known.clone(),
            shutdown: shutdown.clone(),
        };
        tasks.spawn(link.run(tcp, peer).instrument(tracing::info_span!("agent_link", %peer)));
    }
}

struct AgentLink {
    acceptor: TlsAcceptor,
    registry: Arc<Registry>,
    known: Arc<Table<KnownAgent>>,
    shutdown: CancellationToken,
}

impl AgentLink {
    async fn run(self, tcp: TcpStream, peer: SocketAddr) {
        let _ = tcp.set_nodelay(true);
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::warn!(%peer, "refused an agent connection: {}", describe_handshake_error(&e));
                return;
            }
            Err(_) => {
                tracing::warn!(%peer, "refused an agent connection: no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
                return;
            }
        };
        let name = match peer_name(tls.get_ref().1) {
            Some(name) if name != OPERATOR_NAME && name != CONTROLLER_NAME => name,
            other => {
                tracing::warn!(
                    %peer,
                    certificate = ?other,
                    "refused an agent connection: the certificate is not an agent's"
                );
                return;
            }
        };
        let (stream, mut end) = connection::watch(tls, peer);
        let first_error = end.first_error_handle();
        let client = match client_over(stream).await {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!(agent = %name, %peer, error = %e, "cannot start gRPC over the agent's connection");
                return;
            }
        };
        let hello = hello(&client).await;
        let link_id = self.registry.next_link_id();
        let connected_at = SystemTime::now();
        let agent = ConnectedAgent {
            link_id,
            name: name.clone(),
            peer,
            connected_at,
            client,
        };
        if let Some(previous) = self.registry.insert(agent) {
            tracing::info!(agent = %name, previous_peer = %previous.peer, "agent reconnected; its previous link is closed");
        }
        match &hello {
            Ok(hello) => {
                let source = hello.source.clone().unwrap_or_default();
                tracing::info!(
                    agent = %name,
                    %peer,
                    agent_version = %hello.agent_version,
                    source_reachable = source.reachable,
                    source_version = %source.server_version,
                    "agent connected"
                );
                self.remember(&name, connected_at, source.system_identifier).await;
            }
            Err(e) => tracing::warn!(agent = %name, %peer, error = %e, "agent connected but did not answer Hello"),
        }

        tokio::select! {
            _ = end.closed() => {}
            _ = self.shutdown.cancelled() => {}
        }
        if self.registry.remove(&name, link_id) {
            tracing::warn!(
                agent = %name,
                %peer,
                "agent disconnected ({})",
                first_error.get().unwrap_or("connection closed")
            );
        }
    }

    async fn remember(&self, name: &str, connected_at: SystemTime, system_identifier: u64) {
        let now = unix_ms(connected_at);
        let previous = self.known.get(name).ok().flatten();
        if let Some(previous) = &previous
            && previous.source_system_identifier != 0
            && system_identifier != 0
            && previous.source_system_identifier != system_identifier
        {
            tracing::warn!(
                agent = %name,
                before = previous.source_system_identifier,
                now = system_identifier,
                "agent now reports a different source cluster than before"
            );
        }
        let record = KnownAgent {
            name: name.to_owned(),
            first_connected_unix_ms: previous.as_ref().map_or(now, |p| p.first_connected_unix_ms),
            last_connected_unix_ms: now,
            source_system_identifier: if system_identifier != 0 {
                system_identifier
            } else {
                previous.map_or(0, |p| p.source_system_identifier)
            },
        };
        if let Err(e) = self.known.put(name, &record).await {
            tracing::error!(agent = %name, error = %e, "cannot record the agent in the journal");
        }
    }
}

/// A gRPC client whose only connection is the one the agent dialed.
async fn client_over(stream: AgentStream) -> Result<AgentClient, tonic::transport::Error> {
    let slot = Arc::new(Mutex::new(Some(TokioIo::new(stream))));
    // The channel asks its connector again whenever the connection is gone;
    // by then the agent must dial anew, so later asks fail.
    let connector = tower::service_fn(move |_: Uri| {
        let stream = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        async move {
            stream.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotConnected, "the agent's link has ended"))
        }
    });
    let channel: Channel = Endpoint::from_static("http://agent.walbridge.invalid")
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect_with_connector(connector)
        .await?;
    Ok(AgentServiceClient::with_interceptor(channel, PropagateTrace))
}

/// Asks an agent who it is and what it sees of its source.
pub async fn hello(client: &AgentClient) -> Result<wire::HelloResponse, String> {
    let request = wire::HelloRequest {
        controller_version: VERSION.to_owned(),
    };
    match tokio::time::timeout(HELLO_TIMEOUT, client.clone().hello(request)).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(status.message().to_owned()),
        Err(_) => Err(format!("no answer within {HELLO_TIMEOUT:?}")),
    }
}

pub fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}
