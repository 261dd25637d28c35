//! The controller's end of the tunnel: each TCP connection the target's
//! subscription opens here becomes one `Tunnel` stream to the migration's
//! agent, which joins it to the source. Bytes are passed as they come:
//! each side is read only as fast as HTTP/2 flow control lets its bytes
//! go, so a slow end slows the other down instead of buffering.
//!
//! A connection is carried only from a client in `tunnel.allow` and while
//! the [`crate::door::TunnelDoor`] is open; it is closed as soon as the
//! door closes for its agent. Refused connections are closed at once and
//! logged with the client's address and the reason.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::io::StreamReader;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use walbridge_proto::v1 as wire;

use crate::config::TunnelConfig;
use crate::door::{Passage, Reason};
use crate::migration::Context;

/// Bytes read from the client per message.
const READ_CHUNK: usize = 64 * 1024;

/// Accepts tunnel connections until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    config: TunnelConfig,
    ctx: Arc<Context>,
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
        let passage = match ctx.door.admit() {
            Ok(passage) => passage,
            Err(why) => {
                tracing::warn!(%peer, reason = %why, "tunnel connection refused: the tunnel is closed");
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = config.max_connections, "tunnel connection refused: tunnel.max_connections are open");
            continue;
        };
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = carry(socket, peer, passage, &ctx, shutdown).await {
                tracing::warn!(%peer, error = %e, "tunnel connection closed");
            }
            drop(permit);
        });
    }
}

/// Joins one accepted connection to a stream through the agent, until
/// either end closes, the door closes for it, or the controller stops.
async fn carry(
    socket: TcpStream,
    peer: SocketAddr,
    mut passage: Passage,
    ctx: &Context,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let agent_name = passage.agent.clone();
    // A migration's connection goes only through an agent that reaches the
    // migration's source; a preflight probe's comes before there is one.
    let agent = match &passage.reason {
        Reason::Migration { id, .. } => {
            let record = ctx
                .state
                .current()
                .map_err(|e| e.to_string())?
                .filter(|record| &record.id == id)
                .ok_or_else(|| format!("migration {id} is no longer current"))?;
            crate::steps::verified_agent(ctx, &record)
                .await
                .map_err(|refusal| format!("refused: {refusal}"))?
        }
        Reason::Probe => {
            ctx.registry
                .get(&agent_name)
                .ok_or_else(|| format!("agent {agent_name} is not connected"))?
                .client
        }
    };
    socket.set_nodelay(true).map_err(|e| e.to_string())?;
    let (reader, mut writer) = socket.into_split();
    // The client's bytes as the request stream: read as the HTTP/2 window
    // lets them go, so a slow agent slows the client down. It ends when
    // the client closes (the agent then closes its side towards the
    // source), or when the answers have ended.
    let answered = CancellationToken::new();
    let requests = walbridge_daemon::coalesce::chunks(reader, READ_CHUNK)
        // A read error ends the stream like EOF does.
        .scan((), |(), chunk| std::future::ready(chunk.ok()))
        .map(|data| wire::TunnelData { data })
        .take_until(answered.clone().cancelled_owned());
    tracing::debug!(%peer, agent = %agent_name, reason = ?passage.reason, "tunnel connection opened");
    let mut client = agent;
    let opened = tokio::select! {
        opened = client.tunnel(requests) => opened.map_err(|s| s.message().to_owned())?,
        why = passage.closed() => return Err(format!("closed by the controller: {why}")),
        _ = shutdown.cancelled() => return Ok(()),
    };
    let answers = opened.into_inner();
    let mut answers = StreamReader::new(answers.map(|message| {
        message
            .map(|m| m.data)
            .map_err(|status| std::io::Error::other(status.message().to_owned()))
    }));
    let outcome = tokio::select! {
        copied = tokio::io::copy_buf(&mut answers, &mut writer) => copied.map(drop).map_err(|e| e.to_string()),
        why = passage.closed() => Err(format!("closed by the controller: {why}")),
        _ = shutdown.cancelled() => Ok(()),
    };
    let _ = writer.shutdown().await;
    answered.cancel();
    outcome
}
