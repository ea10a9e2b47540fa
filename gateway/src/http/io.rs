//! An accepted tunnel stream as one byte stream (tokio `AsyncRead` + `AsyncWrite`), so
//! hyper can speak HTTP over it on either transport: quinn's streams are byte streams
//! already; an h2 CONNECT stream's DATA frames are read and written through its flow
//! control, and shutting down the write half sends END_STREAM. Also the copy of an
//! upgraded connection's bytes (a WebSocket), with its idle timeout.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::splice::{TCP_BUF_MIN, next_read_size, unless_quiet};

pub enum TunnelIo {
    Quic(quinn::SendStream, quinn::RecvStream),
    H2 {
        send: h2::SendStream<Bytes>,
        recv: h2::RecvStream,
        /// Received and not yet read.
        pending: Bytes,
        ended: bool,
    },
}

impl TunnelIo {
    pub fn h2(send: h2::SendStream<Bytes>, recv: h2::RecvStream) -> Self {
        Self::H2 {
            send,
            recv,
            pending: Bytes::new(),
            ended: false,
        }
    }
}

fn h2_err(e: h2::Error) -> io::Error {
    if e.is_reset() {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    } else {
        io::Error::other(e)
    }
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Quic(_, recv) => Pin::new(recv).poll_read(cx, buf),
            Self::H2 { recv, pending, .. } => {
                while pending.is_empty() {
                    match ready!(recv.poll_data(cx)) {
                        None => return Poll::Ready(Ok(())),
                        Some(Ok(b)) => *pending = b,
                        Some(Err(e)) => return Poll::Ready(Err(h2_err(e))),
                    }
                }
                let n = pending.len().min(buf.remaining());
                buf.put_slice(&pending.split_to(n));
                // Read: the peer may send that much more.
                let _ = recv.flow_control().release_capacity(n);
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Quic(send, _) => Pin::new(send).poll_write(cx, data).map_err(Into::into),
            Self::H2 { send, .. } => {
                if data.is_empty() {
                    return Poll::Ready(Ok(0));
                }
                send.reserve_capacity(data.len());
                loop {
                    match ready!(send.poll_capacity(cx)) {
                        Some(Ok(0)) => continue,
                        Some(Ok(n)) => {
                            let n = n.min(data.len());
                            send.send_data(Bytes::copy_from_slice(&data[..n]), false)
                                .map_err(h2_err)?;
                            return Poll::Ready(Ok(n));
                        }
                        Some(Err(e)) => return Poll::Ready(Err(h2_err(e))),
                        None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                    }
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Quic(send, _) => Pin::new(send).poll_flush(cx),
            // h2 writes frames as the connection task runs.
            Self::H2 { .. } => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Quic(send, _) => Pin::new(send).poll_shutdown(cx),
            Self::H2 { send, ended, .. } => {
                if !*ended {
                    *ended = true;
                    send.send_data(Bytes::new(), true).map_err(h2_err)?;
                }
                Poll::Ready(Ok(()))
            }
        }
    }
}

/// A client connection whose first byte must come within a time: until it has, a read
/// that finds the time spent fails (`TimedOut`), which ends the connection. hyper's
/// header timeout starts only once it knows the protocol, which it learns from the
/// first bytes, so without this a client that connects and sends nothing held its
/// connection (and a file descriptor) for ever.
pub struct FirstByteWithin<IO> {
    io: IO,
    /// Until the first byte.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<IO> FirstByteWithin<IO> {
    pub fn new(io: IO, within: std::time::Duration) -> Self {
        Self {
            io,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FirstByteWithin<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        let Some(deadline) = &mut this.deadline else {
            return read;
        };
        match read {
            Poll::Ready(Ok(())) if buf.filled().len() > before => this.deadline = None,
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no byte from the client within the header timeout",
                )));
            }
            _ => {}
        }
        read
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FirstByteWithin<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// A byte stream that notes when it last read something (ms since `since`).
struct Touched<IO> {
    io: IO,
    since: std::time::Instant,
    last: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Touched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.io).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            let now = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.last.store(now, std::sync::atomic::Ordering::Relaxed);
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Touched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// How an upgraded connection's bytes ended.
#[derive(Debug, PartialEq, Eq)]
pub enum BytesEnded {
    /// Both sides closed, or one failed (the error).
    Closed(Option<String>),
    /// Nothing came from either side for the idle timeout.
    Idle,
}

/// The largest copy buffer of each direction of an upgraded connection's splice: 64 KiB
/// (tokio's default 8 KiB halved the throughput of 64 KiB WebSocket messages in
/// ws-bench).
const UPGRADED_BUF: usize = 64 * 1024;

/// Copies `r` to `w` until `r` ends, then shuts `w` down: a half-close crosses, and the
/// other direction goes on. The buffer starts at the TCP splice's small size, grows
/// with the flow and shrinks when it trickles ([`next_read_size`]) or goes quiet
/// ([`unless_quiet`]): most WebSockets carry small messages and many sit idle for
/// hours, and two 64 KiB buffers at once, at each gateway, were 217-255 KiB per idle
/// WebSocket across the two (bench/ws's `idle_kib`, 2026-12-04; haproxy's pair: 54).
async fn copy_growing<R, W>(r: &mut R, w: &mut W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; TCP_BUF_MIN];
    loop {
        let Some(n) = unless_quiet(buf.len() > TCP_BUF_MIN, r.read(&mut buf)).await else {
            buf = vec![0u8; TCP_BUF_MIN];
            continue;
        };
        let n = n?;
        if n == 0 {
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        let size = next_read_size(n, buf.len(), buf.len(), (TCP_BUF_MIN, UPGRADED_BUF));
        if size != buf.len() {
            // A new buffer, not a resized one: a smaller Vec keeps its allocation.
            buf = vec![0u8; size];
        }
    }
}

/// Copies an upgraded connection's bytes both ways (a WebSocket after its `101`) until
/// both sides have closed or either fails, or nothing crosses for `idle` when given
/// (Envoy's stream idle timeout applies to an upgraded stream the same way). Like a TCP
/// connection's splice, it is not cut by a drain: the drain's grace bounds it.
pub async fn upgraded_bytes<A, B>(a: A, b: B, idle: Option<std::time::Duration>) -> BytesEnded
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    use std::sync::atomic::Ordering;
    let since = std::time::Instant::now();
    let last = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let ((mut ar, mut aw), (mut br, mut bw)) = (
        tokio::io::split(Touched {
            io: a,
            since,
            last: last.clone(),
        }),
        tokio::io::split(Touched {
            io: b,
            since,
            last: last.clone(),
        }),
    );
    let watch = async {
        let Some(idle) = idle else {
            return std::future::pending().await;
        };
        loop {
            let now = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
            // Nothing is ever in flight: the bytes are idle from their last read.
            let Some(at) = super::decide::idle_until(0, last.load(Ordering::Relaxed), now, idle)
            else {
                return;
            };
            tokio::time::sleep(std::time::Duration::from_millis(at - now)).await;
        }
    };
    tokio::select! {
        // Both ways until both have ended, or either fails.
        r = async {
            tokio::try_join!(copy_growing(&mut ar, &mut bw), copy_growing(&mut br, &mut aw))
        } => BytesEnded::Closed(r.err().map(|e| e.to_string())),
        () = watch => BytesEnded::Idle,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes cross both ways whole (1 MiB, through buffers that start at 4 KiB), a
    /// half-close crosses while the other way goes on, and the copy ends when both
    /// ways have.
    #[tokio::test]
    async fn upgraded_bytes_cross_both_ways_with_half_close() {
        let (mut client, a) = tokio::io::duplex(16 * 1024);
        let (b, mut endpoint) = tokio::io::duplex(16 * 1024);
        let copy = tokio::spawn(upgraded_bytes(a, b, None));
        let big: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            // Half-close: the endpoint sees the end, and can still answer.
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        endpoint.read_to_end(&mut got).await.unwrap();
        assert!(got == big, "{} bytes of {}", got.len(), big.len());
        endpoint.write_all(b"after the half-close").await.unwrap();
        endpoint.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"after the half-close");
        assert_eq!(copy.await.unwrap(), BytesEnded::Closed(None));
    }

    /// Nothing crossing for the idle time ends the copy; bytes crossing put it off.
    #[tokio::test]
    async fn upgraded_bytes_end_after_the_idle_time() {
        let (mut client, a) = tokio::io::duplex(1024);
        let (b, mut endpoint) = tokio::io::duplex(1024);
        let idle = std::time::Duration::from_millis(300);
        let began = std::time::Instant::now();
        let copy = tokio::spawn(upgraded_bytes(a, b, Some(idle)));
        for _ in 0..3 {
            tokio::time::sleep(idle / 2).await;
            client.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            endpoint.read_exact(&mut got).await.unwrap();
        }
        assert_eq!(copy.await.unwrap(), BytesEnded::Idle);
        // Three half-idle pauses, then a whole idle time.
        assert!(
            began.elapsed() >= idle / 2 * 3 + idle,
            "{:?}",
            began.elapsed()
        );
    }
}
