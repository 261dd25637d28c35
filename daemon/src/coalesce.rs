//! A byte stream read as HTTP/2-friendly chunks, for the tunnel.
//!
//! Each chunk the tunnel sends is one gRPC message, one HTTP/2 DATA frame.
//! A replication connection writes many tiny messages (a change, a
//! keepalive, a feedback report), and while the target applies slowly the
//! receiving side buffers them unread: h2 (0.4.20+) counts small DATA
//! frames held that way against a budget and ends the whole connection
//! with `GOAWAY ENHANCE_YOUR_CALM "too_many_data_frames"` once it is spent
//! — the agent's link, and the fence with it, went down under a tunnel
//! backlog. Frames of [`MIN_FRAME`] bytes or more cost nothing against
//! that budget, so a short read waits up to [`GATHER`] for more before it
//! is sent: a few milliseconds of latency on a quiet stream, none on a
//! busy one.

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncReadExt};

/// h2's threshold below which a DATA frame counts as framing overhead.
pub const MIN_FRAME: usize = 256;
/// How long a short read waits for more.
pub const GATHER: Duration = Duration::from_millis(2);

/// Reads `reader` as chunks of at most `capacity` bytes, each at least
/// [`MIN_FRAME`] unless no more came within [`GATHER`] (or the reader
/// ended). Ends at end of file; a read error is the last item.
pub fn chunks<R>(reader: R, capacity: usize) -> impl Stream<Item = io::Result<Bytes>>
where
    R: AsyncRead + Unpin,
{
    futures_util::stream::unfold(Some(reader), move |reader| async move {
        let mut reader = reader?;
        let mut chunk = BytesMut::with_capacity(capacity);
        match reader.read_buf(&mut chunk).await {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => return Some((Err(e), None)),
        }
        let deadline = tokio::time::Instant::now() + GATHER;
        let mut reader = Some(reader);
        while chunk.len() < MIN_FRAME.min(capacity) {
            let Some(open) = reader.as_mut() else { break };
            // read_buf is cancel-safe: a read cut short by the deadline
            // loses nothing.
            match tokio::time::timeout_at(deadline, open.read_buf(&mut chunk)).await {
                Ok(Ok(0)) => reader = None,
                Ok(Ok(_)) => {}
                // What was read goes first; the error ends the stream next.
                Ok(Err(_)) | Err(_) => break,
            }
        }
        Some((Ok(chunk.freeze()), reader))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;

    /// A reader that hands out one byte per read, as a replication
    /// connection writing tiny messages looks to the tunnel.
    struct Trickle(std::collections::VecDeque<u8>);

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            if let Some(byte) = self.0.pop_front() {
                buf.put_slice(&[byte]);
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn tiny_reads_close_together_go_as_one_chunk() {
        let sizes: Vec<usize> = chunks(Trickle(vec![1u8; 600].into()), 64 * 1024)
            .map(|c| c.unwrap().len())
            .collect()
            .await;
        assert_eq!(sizes, [MIN_FRAME, MIN_FRAME, 600 - 2 * MIN_FRAME]);
    }

    #[tokio::test]
    async fn a_lone_short_write_goes_after_the_wait_and_eof_ends_the_stream() {
        let (mut writer, reader) = tokio::io::duplex(1024);
        let chunks = chunks(reader, 1024);
        futures_util::pin_mut!(chunks);
        writer.write_all(b"keepalive").await.unwrap();
        assert_eq!(&chunks.next().await.unwrap().unwrap()[..], b"keepalive");
        writer.write_all(b"last").await.unwrap();
        drop(writer);
        assert_eq!(&chunks.next().await.unwrap().unwrap()[..], b"last");
        assert!(chunks.next().await.is_none());
    }

    #[tokio::test]
    async fn a_chunk_is_never_larger_than_its_capacity() {
        let (mut writer, reader) = tokio::io::duplex(1 << 20);
        writer.write_all(&vec![7u8; 100_000]).await.unwrap();
        drop(writer);
        let sizes: Vec<usize> = chunks(reader, 16 * 1024).map(|c| c.unwrap().len()).collect().await;
        assert!(sizes.iter().all(|n| *n <= 16 * 1024), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 100_000);
    }
}
