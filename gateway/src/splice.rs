//! Splices a TCP connection and a QUIC stream in both directions, carrying half-close
//! (FIN ↔ stream finish) and resets (RST ↔ RESET_STREAM / STOP_SENDING) across.

use std::time::Duration;

use bytes::BytesMut;
use prometheus_client::metrics::counter::Counter;
use quinn::{ReadError, RecvStream, SendStream, VarInt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::wire::app_code;

/// Read size from TCP: large enough that the QUIC side packs full GSO batches.
const TCP_READ: usize = 128 * 1024;
/// Largest chunk taken from QUIC at once.
const QUIC_READ: usize = 256 * 1024;

/// Byte counters for the two flows of one splice.
pub struct Counters {
    /// TCP → tunnel.
    pub tx: Counter,
    /// Tunnel → TCP.
    pub rx: Counter,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SpliceEnd {
    /// Both sides finished cleanly.
    Closed,
    /// One side was reset; the reset was propagated to the other.
    Reset(&'static str),
}

/// Runs until both directions are done or either side resets.
pub async fn splice(
    mut tcp: TcpStream,
    mut send: SendStream,
    mut recv: RecvStream,
    counters: &Counters,
) -> SpliceEnd {
    let _ = tcp.set_nodelay(true);
    let end = {
        let (mut tr, mut tw) = tcp.split();
        let up = async {
            loop {
                let mut buf = BytesMut::with_capacity(TCP_READ);
                match tr.read_buf(&mut buf).await {
                    Ok(0) => {
                        // FIN from the TCP side: finish our half of the stream.
                        let _ = send.finish();
                        return Ok(());
                    }
                    Ok(n) => {
                        counters.tx.inc_by(n as u64);
                        if send.write_chunk(buf.freeze()).await.is_err() {
                            return Err("tunnel_send_failed");
                        }
                    }
                    Err(_) => return Err("tcp_reset"),
                }
            }
        };
        let down = async {
            loop {
                match recv.read_chunk(QUIC_READ, true).await {
                    Ok(Some(chunk)) => {
                        counters.rx.inc_by(chunk.bytes.len() as u64);
                        if tw.write_all(&chunk.bytes).await.is_err() {
                            return Err("tcp_write_failed");
                        }
                    }
                    Ok(None) => {
                        // The far side finished: FIN our TCP write half.
                        let _ = tw.shutdown().await;
                        return Ok(());
                    }
                    Err(ReadError::Reset(_)) => return Err("tunnel_reset"),
                    Err(_) => return Err("tunnel_lost"),
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
            }
            if up_done && down_done {
                break SpliceEnd::Closed;
            }
        }
    };
    match end {
        SpliceEnd::Closed => {
            // Wait until the peer has the last bytes, so that a drain or a dropped
            // connection right after does not lose them.
            let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
        }
        SpliceEnd::Reset(_) => {
            let code = VarInt::from_u32(app_code::STREAM_RESET);
            let _ = send.reset(code);
            let _ = recv.stop(code);
            reset_tcp(tcp);
        }
    }
    end
}

/// Closes with RST rather than FIN, so the client sees an error, not a clean end.
pub fn reset_tcp(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}
