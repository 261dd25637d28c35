//! The agent's end of the tunnel: each stream is joined to a new
//! connection to the source address of `source.url` — the only address
//! the tunnel ever reaches, so it is not a general proxy.

use std::path::PathBuf;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_postgres::config::Host;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use walbridge_daemon::pg::Database;
use walbridge_proto::v1 as wire;

/// Bytes read from the source per message. Small enough to keep latency
/// low for replication messages, big enough for bulk WAL.
const READ_CHUNK: usize = 64 * 1024;
/// Messages in flight towards the controller; the HTTP/2 window does the
/// rest, so a slow target slows the source connection down.
const IN_FLIGHT: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceAddress {
    Tcp(String, u16),
    Unix(PathBuf),
}

impl SourceAddress {
    pub fn of(source: &Database) -> Result<SourceAddress, String> {
        match source.endpoint() {
            Some((Host::Tcp(host), port)) => Ok(SourceAddress::Tcp(host.clone(), port)),
            Some((Host::Unix(dir), port)) => Ok(SourceAddress::Unix(dir.join(format!(".s.PGSQL.{port}")))),
            None => Err("source.url names no host".to_owned()),
        }
    }
}

trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}

async fn connect(address: &SourceAddress) -> std::io::Result<Box<dyn Duplex>> {
    Ok(match address {
        SourceAddress::Tcp(host, port) => {
            let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            // Replication messages are small and latency is lag.
            stream.set_nodelay(true)?;
            Box::new(stream)
        }
        SourceAddress::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
    })
}

pub type TunnelStream = ReceiverStream<Result<wire::TunnelData, Status>>;

/// Connects to the source and pipes `inbound` to it and its answers back.
pub async fn open(
    address: &SourceAddress,
    mut inbound: Streaming<wire::TunnelData>,
    tasks: &tokio_util::task::TaskTracker,
) -> Result<TunnelStream, Status> {
    let socket = connect(address)
        .await
        .map_err(|e| Status::unavailable(format!("the tunnel cannot reach the source: {e}")))?;
    let (mut reader, mut writer) = tokio::io::split(socket);
    let (tx, rx) = mpsc::channel(IN_FLIGHT);
    tasks.spawn(async move {
        while let Ok(Some(message)) = inbound.message().await {
            if writer.write_all(&message.data).await.is_err() {
                break;
            }
        }
        // The controller's side closed (or the link broke): so does ours
        // towards the source.
        let _ = writer.shutdown().await;
    });
    tasks.spawn(async move {
        let mut buffer = BytesMut::with_capacity(READ_CHUNK);
        loop {
            buffer.reserve(READ_CHUNK);
            match reader.read_buf(&mut buffer).await {
                Ok(0) => break,
                Ok(_) => {
                    let data = buffer.split().freeze();
                    if tx.send(Ok(wire::TunnelData { data })).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(Status::unavailable(format!("source connection: {e}"))))
                        .await;
                    break;
                }
            }
        }
    });
    Ok(ReceiverStream::new(rx))
}
