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
