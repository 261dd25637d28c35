//! One established connection, watched: it tells when it has closed and
//! what error, if any, ended it.
//!
//! hyper and tonic own a connection once they serve or call over it and do
//! not say when it ends; the agent needs to know in order to redial, the
//! controller in order to drop the agent from its registry. Both learn it
//! here, when hyper drops the stream.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// HTTP/2 pings on the link go out this often...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(3);
/// ...and a ping unanswered for this long ends the connection, so either
/// side finds a dead link within `KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT`
/// (8 s, inside the 10 s the design allows).
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A stream that reports its end to a [`ConnectionEnd`].
pub struct Watched<S> {
    inner: S,
    peer: SocketAddr,
    first_error: Arc<OnceLock<String>>,
    // Dropped with the stream: that is the signal.
    _closed: oneshot::Sender<()>,
}

/// The other half of a [`Watched`] stream.
#[derive(Debug)]
pub struct ConnectionEnd {
    closed: oneshot::Receiver<()>,
    first_error: Arc<OnceLock<String>>,
}

/// Wraps a stream so that its end can be awaited.
pub fn watch<S>(inner: S, peer: SocketAddr) -> (Watched<S>, ConnectionEnd) {
    let (sender, closed) = oneshot::channel();
    let first_error = Arc::new(OnceLock::new());
    (
        Watched {
            inner,
            peer,
            first_error: first_error.clone(),
            _closed: sender,
        },
        ConnectionEnd { closed, first_error },
    )
}

impl ConnectionEnd {
    /// Resolves when the stream has been dropped.
    pub async fn closed(&mut self) {
        let _ = (&mut self.closed).await;
    }

    /// The first I/O error seen on the stream: for a TLS stream, this is
    /// where a peer's alert (a refused certificate) shows up.
    pub fn first_error(&self) -> Option<&str> {
        self.first_error.get().map(String::as_str)
    }

    /// A handle on the first error that outlives this `ConnectionEnd` (which
    /// is usually moved into a shutdown future).
    pub fn first_error_handle(&self) -> FirstError {
        FirstError(self.first_error.clone())
    }
}

/// See [`ConnectionEnd::first_error_handle`].
#[derive(Debug, Clone)]
pub struct FirstError(Arc<OnceLock<String>>);

impl FirstError {
    pub fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

impl<S> Watched<S> {
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn record<T>(&self, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(e)) = &result {
            let _ = self.first_error.set(e.to_string());
        }
        result
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.record(result)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.record(result)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.record(result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.record(result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What a tonic service learns of the connection a request came over.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddress(pub SocketAddr);

impl<S> tonic::transport::server::Connected for Watched<S> {
    type ConnectInfo = PeerAddress;

    fn connect_info(&self) -> Self::ConnectInfo {
        PeerAddress(self.peer)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn the_end_is_seen_when_the_stream_is_dropped() {
        let (a, mut b) = tokio::io::duplex(64);
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let (mut watched, mut end) = watch(a, peer);
        watched.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        // Not closed yet: the end is still pending.
        assert!(futures_util::FutureExt::now_or_never(end.closed()).is_none());

        drop(watched);
        end.closed().await;
        assert_eq!(end.first_error(), None);
    }
}
