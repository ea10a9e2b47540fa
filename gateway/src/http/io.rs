//! An accepted tunnel stream as one byte stream (tokio `AsyncRead` + `AsyncWrite`), so
//! hyper can speak HTTP over it on either transport: quinn's streams are byte streams
//! already; an h2 CONNECT stream's DATA frames are read and written through its flow
//! control, and shutting down the write half sends END_STREAM.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
