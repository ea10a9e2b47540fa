//! Splices a TCP connection and a tunnel stream in both directions, carrying half-close
//! (FIN ↔ stream finish) and resets (RST ↔ RESET_STREAM / STOP_SENDING) across. A tunnel
//! stream is a QUIC stream or an HTTP/2 CONNECT stream (`hbone`): both implement
//! [`TunnelSend`] and [`TunnelRecv`]. A splice also ends, with a reset both ways, when
//! its `cut` token is cancelled (the ingress: a policy now denies the stream).

use std::time::Duration;

use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use quinn::{ReadError, RecvStream, SendStream, VarInt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::wire::app_code;

/// Least room offered to one TCP read once the flow is fast: large enough that the QUIC
/// side packs full GSO batches.
const TCP_READ: usize = 64 * 1024;
/// Size of the buffer TCP reads are sliced from, once the flow has shown it is fast.
const TCP_BUF: usize = 1024 * 1024;
/// The buffer a splice starts with, and goes back to when its flow turns quiet: the
/// buffer a read waits on. Most connections carry requests and answers of a few KiB,
/// and many (WebSockets, database and message-broker connections) sit idle for hours: a
/// 64 KiB buffer each was 119-152 KiB per idle WebSocket across the two gateways
/// (bench/ws's `idle_kib`, 2026-12-04), against haproxy's 54. A 1 MiB buffer for each
/// had cost the kernel's memory management enough under a connection churn to put
/// 20-40 ms stalls into the latency tail (bench/tunnel, 2026-11-29).
pub(crate) const TCP_BUF_MIN: usize = 4 * 1024;

/// How long a read may wait on a buffer larger than [`TCP_BUF_MIN`]: past it the flow
/// is quiet, and the read goes on with a small one (reads are cancel-safe), so a
/// connection that had a burst and then idles for hours holds 4 KiB, not 1 MiB.
pub(crate) const QUIET: Duration = Duration::from_secs(1);

/// Runs `read` on a buffer that is `large` for at most [`QUIET`]: `None` when it did
/// not finish by then (nothing was read: reads are cancel-safe), so that the caller
/// waits on a small buffer instead.
pub(crate) async fn unless_quiet<T>(large: bool, read: impl Future<Output = T>) -> Option<T> {
    if large {
        tokio::time::timeout(QUIET, read).await.ok()
    } else {
        Some(read.await)
    }
}

/// The room to offer a splice's next read, after a read of `n` bytes into `offered`
/// while the size was `size`: doubled up to `max` when the read filled at least half
/// of it (the flow is fast), halved down to `min` when it brought less than `min` (a
/// trickle; halved, not reset, so that the short tail of each message of a bulk
/// exchange costs one regrowth read, not four), else the same. Pure; a wait longer
/// than [`QUIET`] sends a large buffer back to `min` at once.
pub(crate) fn next_read_size(
    n: usize,
    offered: usize,
    size: usize,
    (min, max): (usize, usize),
) -> usize {
    if n * 2 >= offered {
        (size * 2).min(max).max(size)
    } else if n < min {
        (size / 2).max(min)
    } else {
        size
    }
}

/// Most chunks taken from the tunnel for one writev.
pub const QUIC_BATCH: usize = 32;

/// Byte counters for the two flows of one splice.
pub struct Counters {
    /// TCP → tunnel.
    pub tx: Counter,
    /// Tunnel → TCP.
    pub rx: Counter,
    /// The same for the stream's service (`meshfed_gateway_service_bytes_total`), when
    /// it is known: (to the tunnel, from it).
    pub service: Option<(Counter, Counter)>,
}

impl Counters {
    pub(crate) fn sent(&self, n: u64) {
        self.tx.inc_by(n);
        if let Some((tx, _)) = &self.service {
            tx.inc_by(n);
        }
    }

    fn received(&self, n: u64) {
        self.rx.inc_by(n);
        if let Some((_, rx)) = &self.service {
            rx.inc_by(n);
        }
    }
}

/// The reset reason of a stream cut because it is no longer allowed.
pub const CUT: &str = "no_longer_allowed";

#[derive(Debug, PartialEq, Eq)]
pub enum SpliceEnd {
    /// Both sides finished cleanly.
    Closed,
    /// One side was reset; the reset was propagated to the other.
    Reset(&'static str),
}

/// Runs until both directions are done or either side resets, or `cut` is cancelled
/// (the stream is no longer allowed), which resets both sides.
pub async fn splice<S: TunnelSend, R: TunnelRecv>(
    mut tcp: TcpStream,
    mut send: S,
    mut recv: R,
    counters: &Counters,
    cut: Option<&CancellationToken>,
) -> SpliceEnd {
    let _ = tcp.set_nodelay(true);
    let end = {
        let (mut tr, mut tw) = tcp.split();
        pump(&mut tr, &mut tw, &mut send, &mut recv, counters, cut).await
    };
    settle(&end, &mut send, &mut recv).await;
    if let SpliceEnd::Reset(_) = end {
        reset_tcp(tcp);
    }
    end
}

/// The same over TLS to the endpoint (TLS origination): a clean end sends close_notify,
/// a reset resets the TCP connection under it.
pub async fn splice_tls<T: TlsOverTcp, S: TunnelSend, R: TunnelRecv>(
    tls: T,
    mut send: S,
    mut recv: R,
    counters: &Counters,
    cut: Option<&CancellationToken>,
) -> SpliceEnd {
    let _ = tls.tcp().set_nodelay(true);
    let (mut r, mut w) = tokio::io::split(tls);
    let end = pump(&mut r, &mut w, &mut send, &mut recv, counters, cut).await;
    settle(&end, &mut send, &mut recv).await;
    if let SpliceEnd::Reset(_) = end {
        reset_tcp(r.unsplit(w).into_tcp());
    }
    end
}

/// A TLS stream over TCP, either side: what [`splice_tls`] carries.
pub trait TlsOverTcp: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {
    fn tcp(&self) -> &TcpStream;
    fn into_tcp(self) -> TcpStream;
}

impl TlsOverTcp for tokio_rustls::client::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
    fn into_tcp(self) -> TcpStream {
        self.into_inner().0
    }
}

impl TlsOverTcp for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
    fn into_tcp(self) -> TcpStream {
        self.into_inner().0
    }
}

/// After a clean end, waits until the peer has the last bytes (so that a drain or a
/// dropped connection right after does not lose them); after a reset, resets the stream.
async fn settle<S: TunnelSend, R: TunnelRecv>(end: &SpliceEnd, send: &mut S, recv: &mut R) {
    match end {
        SpliceEnd::Closed => {
            let _ = tokio::time::timeout(Duration::from_secs(5), send.delivered()).await;
        }
        SpliceEnd::Reset(_) => {
            send.reset();
            recv.stop();
        }
    }
}

/// The sending half of a tunnel stream.
pub trait TunnelSend: Send {
    /// Sends one chunk, waiting for flow-control room. `Err`: the stream is gone.
    fn send(&mut self, chunk: Bytes) -> impl Future<Output = Result<(), ()>> + Send;
    /// Ends our half cleanly (FIN).
    fn finish(&mut self);
    /// Resolves when the far side has everything sent (or stopped reading).
    fn delivered(&mut self) -> impl Future<Output = ()> + Send;
    /// Resets the stream (the TCP side was reset).
    fn reset(&mut self);
}

/// The receiving half of a tunnel stream.
pub trait TunnelRecv: Send {
    /// Fills `out` with the next chunks and returns how many; `Ok(0)`: the far side
    /// finished. `Err`: why the stream broke (`tunnel_reset` or `tunnel_lost`).
    fn recv(
        &mut self,
        out: &mut [Bytes; QUIC_BATCH],
    ) -> impl Future<Output = Result<usize, &'static str>> + Send;
    /// Tells the far side to stop sending (after a reset).
    fn stop(&mut self);
}

impl TunnelSend for SendStream {
    async fn send(&mut self, chunk: Bytes) -> Result<(), ()> {
        self.write_chunk(chunk).await.map_err(|_| ())
    }
    fn finish(&mut self) {
        let _ = SendStream::finish(self);
    }
    async fn delivered(&mut self) {
        let _ = self.stopped().await;
    }
    fn reset(&mut self) {
        let _ = SendStream::reset(self, VarInt::from_u32(app_code::STREAM_RESET));
    }
}

impl TunnelRecv for RecvStream {
    async fn recv(&mut self, out: &mut [Bytes; QUIC_BATCH]) -> Result<usize, &'static str> {
        // Every chunk quinn has ready, for one writev.
        match self.read_chunks(out).await {
            Ok(Some(n)) => Ok(n),
            Ok(None) => Ok(0),
            Err(ReadError::Reset(_)) => Err("tunnel_reset"),
            Err(_) => Err("tunnel_lost"),
        }
    }
    fn stop(&mut self) {
        let _ = RecvStream::stop(self, VarInt::from_u32(app_code::STREAM_RESET));
    }
}

/// Copies both ways between a byte stream and a tunnel stream until both are done or
/// either side resets.
async fn pump<R, W, S: TunnelSend, T: TunnelRecv>(
    tr: &mut R,
    tw: &mut W,
    send: &mut S,
    recv: &mut T,
    counters: &Counters,
    cut: Option<&CancellationToken>,
) -> SpliceEnd
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    {
        let up = async {
            // One buffer, sliced into chunks that the tunnel keeps until they are sent
            // (QUIC: acknowledged); `reserve` reclaims the allocation once they are all
            // dropped, so a bulk transfer allocates rarely. It starts small, doubles up
            // to TCP_BUF while reads fill what they are offered, and shrinks when the
            // flow trickles ([`next_read_size`]) or goes quiet ([`QUIET`]), so that an
            // idle connection's read does not hold a large one.
            let mut size = TCP_BUF_MIN;
            let mut buf = BytesMut::with_capacity(size);
            loop {
                if size == TCP_BUF_MIN {
                    // Quiet: a fresh small buffer when this one is large (a new
                    // BytesMut: `reserve` on a split one allocates at least its
                    // original capacity) or nearly used up.
                    if buf.capacity() > 2 * TCP_BUF_MIN || buf.capacity() < TCP_BUF_MIN / 2 {
                        buf = BytesMut::with_capacity(TCP_BUF_MIN);
                    }
                } else if buf.capacity() < size.min(TCP_READ) {
                    buf.reserve(size);
                }
                let offered = buf.capacity();
                let Some(r) = unless_quiet(size > TCP_BUF_MIN, tr.read_buf(&mut buf)).await else {
                    size = TCP_BUF_MIN;
                    continue;
                };
                if let Ok(n) = r {
                    size = next_read_size(n, offered, size, (TCP_BUF_MIN, TCP_BUF));
                }
                match r {
                    Ok(0) => {
                        // FIN from the TCP side: finish our half of the stream.
                        send.finish();
                        return Ok(());
                    }
                    Ok(n) => {
                        counters.sent(n as u64);
                        if send.send(buf.split().freeze()).await.is_err() {
                            return Err("tunnel_send_failed");
                        }
                    }
                    Err(_) => return Err("tcp_reset"),
                }
            }
        };
        let down = async {
            // Take every chunk the tunnel has ready and hand them to one writev, so the
            // receiving side makes one syscall per batch rather than per packet.
            let mut chunks: [Bytes; QUIC_BATCH] = Default::default();
            loop {
                match recv.recv(&mut chunks).await {
                    Ok(0) => {
                        // The far side finished: FIN our TCP write half.
                        let _ = tw.shutdown().await;
                        return Ok(());
                    }
                    Ok(n) => {
                        let bytes: usize = chunks[..n].iter().map(Bytes::len).sum();
                        counters.received(bytes as u64);
                        if write_all_chunks(tw, &mut chunks[..n]).await.is_err() {
                            return Err("tcp_write_failed");
                        }
                    }
                    Err(why) => return Err(why),
                }
            }
        };
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Ok(()) => up_done = true,
                    Err(why) => break SpliceEnd::Reset(why),
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => down_done = true,
                    Err(why) => break SpliceEnd::Reset(why),
                },
                _ = cancelled(cut) => break SpliceEnd::Reset(CUT),
            }
            if up_done && down_done {
                break SpliceEnd::Closed;
            }
        }
    }
}

/// Resolves when `cut` is cancelled; never without one.
async fn cancelled(cut: Option<&CancellationToken>) {
    match cut {
        Some(c) => c.cancelled().await,
        None => std::future::pending().await,
    }
}

/// Writes every chunk, with as few writev calls as the socket allows.
async fn write_all_chunks<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    chunks: &mut [Bytes],
) -> std::io::Result<()> {
    let mut first = 0;
    while first < chunks.len() {
        let mut written = {
            let iov: [IoSlice<'_>; QUIC_BATCH] = std::array::from_fn(|i| {
                IoSlice::new(chunks.get(first + i).map_or(&[][..], |b| &b[..]))
            });
            let n = (chunks.len() - first).min(QUIC_BATCH);
            w.write_vectored(&iov[..n]).await?
        };
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let len = chunks[first].len();
            if written >= len {
                written -= len;
                chunks[first] = Bytes::new();
                first += 1;
            } else {
                chunks[first].advance(written);
                written = 0;
            }
        }
    }
    Ok(())
}

/// Closes with RST rather than FIN, so the client sees an error, not a clean end.
pub fn reset_tcp(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_size_grows_while_reads_fill_it_and_halves_while_it_trickles() {
        const K: usize = 1024;
        let bounds = (4 * K, 1024 * K);
        for (n, offered, size, want) in [
            // The first read filled half its 4 KiB: twice as much next.
            (2 * K, 4 * K, 4 * K, 8 * K),
            (4 * K, 4 * K, 4 * K, 8 * K),
            // A small message: stays small.
            (100, 4 * K, 4 * K, 4 * K),
            // Fast up to the bound, never past it.
            (600 * K, 1024 * K, 1024 * K, 1024 * K),
            (300 * K, 512 * K, 512 * K, 1024 * K),
            // Offered more than the size (capacity left over): judged on the offer.
            (40 * K, 100 * K, 64 * K, 64 * K),
            // Fast flow, a read of 10 KiB into 1 MiB: keeps its size (a bulk flow's
            // reads return what the socket holds).
            (10 * K, 1024 * K, 1024 * K, 1024 * K),
            // A trickle (less than the minimum): halved, down to the minimum.
            (4 * K - 1, 1024 * K, 1024 * K, 512 * K),
            (3, 64 * K, 64 * K, 32 * K),
            (3, 8 * K, 8 * K, 4 * K),
            (3, 4 * K, 4 * K, 4 * K),
            // The end of the stream (0) on a fast flow.
            (0, 1024 * K, 1024 * K, 512 * K),
        ] {
            assert_eq!(
                next_read_size(n, offered, size, bounds),
                want,
                "{n} read into {offered} at size {size}"
            );
        }
    }
}
