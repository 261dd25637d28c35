//! The controller's end of the tunnel: each TCP connection the target's
//! subscription opens here becomes one `Tunnel` stream to the migration's
//! agent, which joins it to the source. Bytes are passed as they come;
//! the bounded channel and HTTP/2 flow control make a slow end slow the
//! other down instead of buffering.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use walbridge_proto::v1 as wire;

use crate::config::TunnelConfig;
use crate::migration::Migrations;

const READ_CHUNK: usize = 64 * 1024;
const IN_FLIGHT: usize = 8;

/// Accepts tunnel connections until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    config: TunnelConfig,
    migrations: Arc<Migrations>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(config.max_connections));
    loop {
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "tunnel accept failed");
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        if !config.allow.is_empty() && !config.allow.iter().any(|net| net.contains(&peer.ip())) {
            tracing::warn!(%peer, "tunnel connection refused: the client is not in tunnel.allow");
            continue;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = config.max_connections, "tunnel connection refused: tunnel.max_connections are open");
            continue;
        };
        let migrations = migrations.clone();
        let inner = tasks.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = carry(socket, peer, &migrations, &inner, shutdown).await {
                tracing::warn!(%peer, error = %e, "tunnel connection closed");
            }
            drop(permit);
        });
    }
}

/// Joins one accepted connection to a stream through the agent.
async fn carry(
    socket: TcpStream,
    peer: SocketAddr,
    migrations: &Migrations,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let agent_name = migrations
        .current()
        .map_err(|e| e.to_string())?
        .map(|m| m.agent)
        .ok_or("no migration: the tunnel leads nowhere")?;
    let agent = migrations
        .registry()
        .get(&agent_name)
        .ok_or_else(|| format!("agent {agent_name} is not connected"))?;
    socket.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut reader, mut writer) = socket.into_split();
    let (tx, rx) = mpsc::channel(IN_FLIGHT);
    let upstream = tasks.spawn(async move {
        let mut buffer = BytesMut::with_capacity(READ_CHUNK);
        loop {
            buffer.reserve(READ_CHUNK);
            match reader.read_buf(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let data = buffer.split().freeze();
                    if tx.send(wire::TunnelData { data }).await.is_err() {
                        break;
                    }
                }
            }
        }
        // Dropping `tx` ends the request stream: the agent closes its
        // side towards the source.
    });
    tracing::debug!(%peer, agent = %agent_name, "tunnel connection opened");
    let mut answers = agent
        .client
        .clone()
        .tunnel(ReceiverStream::new(rx))
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    let downstream = async {
        loop {
            match answers.message().await {
                Ok(Some(message)) => writer.write_all(&message.data).await.map_err(|e| e.to_string())?,
                Ok(None) => break,
                Err(status) => return Err(status.message().to_owned()),
            }
        }
        Ok(())
    };
    let outcome = tokio::select! {
        outcome = downstream => outcome,
        _ = shutdown.cancelled() => Ok(()),
    };
    let _ = writer.shutdown().await;
    upstream.abort();
    outcome
}
