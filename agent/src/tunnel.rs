//! The agent's end of the tunnel: each stream is joined to a new
//! connection to the source address of `source.url` — the only address
//! the tunnel ever reaches, so it is not a general proxy.

use std::path::PathBuf;
use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::Host;
use tokio_util::io::StreamReader;
use tonic::{Status, Streaming};
use walbridge_daemon::pg::Database;
use walbridge_proto::v1 as wire;

/// Bytes read from the source per message. Small enough to keep latency
/// low for replication messages, big enough for bulk WAL.
const READ_CHUNK: usize = 64 * 1024;

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

pub type TunnelStream = Pin<Box<dyn Stream<Item = Result<wire::TunnelData, Status>> + Send>>;

/// Connects to the source and pipes `inbound` to it and its answers back.
/// The source is read only as fast as the answers can leave (HTTP/2 flow
/// control), so a slow target slows the source connection down.
pub async fn open(
    address: &SourceAddress,
    inbound: Streaming<wire::TunnelData>,
    tasks: &tokio_util::task::TaskTracker,
) -> Result<TunnelStream, Status> {
    let socket = connect(address)
        .await
        .map_err(|e| Status::unavailable(format!("the tunnel cannot reach the source: {e}")))?;
    let (reader, mut writer) = tokio::io::split(socket);
    let mut from_controller = StreamReader::new(inbound.map(|message| {
        message
            .map(|m| m.data)
            .map_err(|status| std::io::Error::other(status.message().to_owned()))
    }));
    tasks.spawn(async move {
        let _ = tokio::io::copy_buf(&mut from_controller, &mut writer).await;
        // The controller's side closed (or the link broke): so does ours
        // towards the source.
        let _ = writer.shutdown().await;
    });
    let answers = walbridge_daemon::coalesce::chunks(reader, READ_CHUNK).map(|chunk| {
        chunk
            .map(|data| wire::TunnelData { data })
            .map_err(|e| Status::unavailable(format!("source connection: {e}")))
    });
    Ok(Box::pin(answers))
}
