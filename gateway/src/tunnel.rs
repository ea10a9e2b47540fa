//! The QUIC side: one quinn endpoint per gateway that both accepts and dials, its
//! transport tuning, and reading/writing the stream header.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshfed_identity::tls::SvidResolver;
use meshfed_identity::{SpiffeVerifier, Svid};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{RecvStream, TransportConfig, VarInt};

use crate::wire::{self, ALPN, ALPN_V2, ALPN_V3, WireError};

/// Keep-alive keeps NAT bindings and lets a dead peer be noticed.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// A connection with no traffic (not even keep-alives) for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent tunnelled TCP connections per peer connection, each one stream. The
/// ingress grants this only once the peer is authenticated: quinn allocates the state of
/// every stream a peer may open up front (about 90 bytes each, 1.5 MB at this limit).
pub const MAX_STREAMS: u32 = 16 * 1024;
/// The stream limit a connection starts with (accepted or dialed), until its handshake
/// completes.
pub const UNAUTHENTICATED_STREAMS: u32 = 64;
/// How long the ingress keeps an unfinished handshake (the dialer gives up after 5 s).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Packets quinn buffers for one connection attempt the ingress has not accepted yet, and
/// for all of them (quinn's defaults are 10 MiB and 100 MiB).
const INCOMING_BUFFER: u64 = 64 * 1024;
const INCOMING_BUFFER_TOTAL: u64 = 8 * 1024 * 1024;
/// Connection attempts quinn queues before the ingress sees them (default 65 536).
const MAX_INCOMING: usize = 1024;
/// Per-stream flow-control window: one stream can fill a 10 Gbit/s path at 5 ms RTT.
const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// Connection-wide window, shared by all streams.
const CONN_WINDOW: u32 = 16 * 1024 * 1024;
/// Packets a peer may receive before it must send an ACK.
const ACK_THRESHOLD: u32 = 16;
/// Largest UDP payload PLPMTUD searches for: 1500 − 20 (IPv4) − 8 (UDP). It is also
/// quinn's default for the largest payload an endpoint accepts.
const MTU_UPPER_BOUND: u16 = 1472;
/// UDP socket buffers: large enough that GSO/GRO batches are not dropped in bursts.
const SOCKET_BUF: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("QUIC needs a TLS 1.3 initial cipher suite: {0}")]
    Quic(String),
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The QUIC congestion controller (`quic_congestion` in the gateway config).
///
/// BBR is the default: on the 2-core bench host (bench/tunnel, 2026-11-29) it kept
/// 0.88–1.10 of the clean 16-stream goodput under 2 % random loss, where Cubic kept
/// 0.47–0.48 (TCP peers 0.92–1.04), with clean throughput within the run-to-run noise.
/// quinn marks its BBR experimental; `cubic` is the fallback.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    #[default]
    Bbr,
    Cubic,
}

impl std::str::FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bbr" => Ok(Self::Bbr),
            "cubic" => Ok(Self::Cubic),
            other => Err(format!("{other:?}: bbr or cubic")),
        }
    }
}

pub fn transport_config(cc: Congestion) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(
        IDLE_TIMEOUT.try_into().expect("10s fits an idle timeout"),
    ));
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    match cc {
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()));
        }
    }
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW));
    t.receive_window(VarInt::from_u32(CONN_WINDOW));
    t.send_window(u64::from(CONN_WINDOW));
    // ACK-frequency extension: ask the peer to acknowledge every ACK_THRESHOLD+1
    // packets instead of every second one. ACK generation and processing is a large
    // share of QUIC's per-packet cost; a short max delay keeps loss recovery prompt.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(VarInt::from_u32(ACK_THRESHOLD))
        .max_ack_delay(Some(Duration::from_millis(2)));
    t.ack_frequency_config(Some(ack));
    // Path MTU discovery may climb to the largest payload a 1500-byte IPv4 path carries
    // (quinn stops at 1452, which also fits IPv6). Probes that do not arrive only end the
    // search lower, so the bound is safe on any path.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    t.mtu_discovery_config(Some(mtu));
    t
}

/// The server half: requires a client SVID accepted by `policy`.
pub fn server_config(
    svid: Arc<SvidResolver>,
    verifier: SpiffeVerifier,
    cc: Congestion,
) -> Result<quinn::ServerConfig, TunnelError> {
    let tls = meshfed_identity::tls::server_config(svid, verifier, &[ALPN_V3, ALPN_V2, ALPN])?;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TunnelError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = transport_config(cc);
    // Raised to MAX_STREAMS by the ingress once the peer's certificate is verified.
    transport.max_concurrent_bidi_streams(VarInt::from_u32(UNAUTHENTICATED_STREAMS));
    cfg.transport_config(Arc::new(transport));
    // A peer behind a NAT that rebinds (a new source port mid-connection) keeps its
    // connection: quinn validates the new path (PATH_CHALLENGE) before it sends there,
    // so a spoofed source address cannot steal or redirect it.
    cfg.migration(true);
    cfg.max_incoming(MAX_INCOMING)
        .incoming_buffer_size(INCOMING_BUFFER)
        .incoming_buffer_size_total(INCOMING_BUFFER_TOTAL);
    Ok(cfg)
}

/// Closes a connection whose peer's trust domain the federation withdrew (0x12).
pub fn close_withdrawn(conn: &quinn::Connection) {
    conn.close(
        VarInt::from_u32(wire::app_code::TRUST_WITHDRAWN),
        b"trust domain withdrawn from the federation",
    );
}

/// The wire version both ends of `conn` chose: 1, 2 or 3 (by ALPN).
pub fn wire_version(conn: &quinn::Connection) -> u8 {
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    match alpn.as_deref() {
        Some(ALPN_V3) => 3,
        Some(ALPN_V2) => 2,
        _ => 1,
    }
}

/// Whether both ends of `conn` chose `meshfed/2` or later (open requests may carry the
/// client's address).
pub fn speaks_v2(conn: &quinn::Connection) -> bool {
    wire_version(conn) >= 2
}

/// The client half for dialing one peer, which must present exactly `peer_id`.
pub fn client_config(
    svid: Arc<SvidResolver>,
    verifier: SpiffeVerifier,
    cc: Congestion,
) -> Result<quinn::ClientConfig, TunnelError> {
    let tls = meshfed_identity::tls::client_config(svid, verifier, &[ALPN_V3, ALPN_V2, ALPN])?;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TunnelError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = transport_config(cc);
    // The streams the peer may open back on a connection we dial (an outbound-only
    // site's exports): quinn allocates their state when the connection is created, about
    // 1.5 MB at MAX_STREAMS, and a dial to a peer that never answers paid it on every
    // retry (half of a gateway's CPU with 511 unreachable peers, bench/catalog --scale).
    // Raised to MAX_STREAMS once the handshake verified the peer
    // (`Ingress::serve_dialed`).
    transport.max_concurrent_bidi_streams(VarInt::from_u32(UNAUTHENTICATED_STREAMS));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// Binds the gateway's endpoint. The stateless-reset key is derived from the gateway's
/// private key, so a gateway restarted with the same SVID answers its peers' packets for
/// the old connection with a stateless reset (RFC 9000 §10.3): they learn at once that the
/// connection is gone instead of waiting for the idle timeout.
pub fn bind_endpoint(
    addr: SocketAddr,
    server: quinn::ServerConfig,
    svid: &Svid,
) -> Result<quinn::Endpoint, TunnelError> {
    let bind_err = |source| TunnelError::Bind { addr, source };
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
        .map_err(bind_err)?;
    // Best effort: the kernel caps these at net.core.[rw]mem_max.
    let _ = sock.set_recv_buffer_size(SOCKET_BUF);
    let _ = sock.set_send_buffer_size(SOCKET_BUF);
    sock.bind(&addr.into()).map_err(bind_err)?;
    // Both keys that decide whether a packet for an unknown connection gets a stateless
    // reset must survive a restart: the reset key (the token) and the CID generator's key
    // (quinn drops packets whose CID it did not sign).
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"meshfed stateless reset v1")
        .extract(svid.key.secret_der());
    let reset_key = {
        let okm = prk
            .expand(&[b"quic reset key"], ring::hmac::HMAC_SHA256)
            .expect("HMAC-SHA256 length is a valid HKDF output length");
        ring::hmac::Key::from(okm)
    };
    let cid_key = {
        let mut k = [0u8; 8];
        prk.expand(&[b"quic cid key"], U64Len)
            .and_then(|okm| okm.fill(&mut k))
            .expect("8 bytes is a valid HKDF output length");
        u64::from_le_bytes(k)
    };
    let mut endpoint_cfg = quinn::EndpointConfig::new(Arc::new(reset_key));
    endpoint_cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let runtime = quinn::default_runtime()
        .ok_or_else(|| bind_err(std::io::Error::other("no tokio runtime")))?;
    quinn::Endpoint::new(endpoint_cfg, Some(server), sock.into(), runtime).map_err(bind_err)
}

/// Reads one length-prefixed header payload, enforcing the size limit before reading
/// the payload.
pub async fn read_header(recv: &mut RecvStream) -> Result<Vec<u8>, HeaderReadError> {
    let mut prefix = [0u8; 2];
    recv.read_exact(&mut prefix)
        .await
        .map_err(HeaderReadError::Io)?;
    let len = wire::check_len(prefix).map_err(HeaderReadError::Wire)?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload)
        .await
        .map_err(HeaderReadError::Io)?;
    Ok(payload)
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderReadError {
    #[error("{0}")]
    Wire(WireError),
    #[error("stream ended before the header: {0}")]
    Io(quinn::ReadExactError),
}

/// HKDF output length marker for an 8-byte key.
struct U64Len;

impl ring::hkdf::KeyType for U64Len {
    fn len(&self) -> usize {
        8
    }
}
