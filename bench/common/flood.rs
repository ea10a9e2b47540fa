//! An unauthenticated QUIC handshake flood: ClientHellos that never finish, built with
//! quinn-proto (real Initial packets, real TLS 1.3 ClientHellos) and sent from plain UDP
//! sockets, for the tests and benchmarks that check what a flood costs a gateway.
//!
//! - [`Mode::Spoofed`]: answer nothing, as an attacker with spoofed source addresses
//!   would (it never sees the replies): the gateway's Retry stops it without state.
//! - [`Mode::Validated`]: answer Retry packets (so the address is validated) and nothing
//!   else: every attempt then holds a half-open handshake at the gateway until it times out.
//!
//! Every attempt comes from one of `sources` loopback addresses (127.0.2.x), so per-address
//! limits can be exercised with one or many "attackers". The replies are counted, which
//! gives the amplification factor (bytes back per byte sent) too.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::BytesMut;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Spoofed,
    Validated,
}

#[derive(Clone, Debug, Default)]
pub struct FloodReport {
    /// Connection attempts started (first Initials sent).
    pub attempts: usize,
    /// Retry packets received (and, in validated mode, answered).
    pub retries: usize,
    /// Datagrams and bytes this side sent, and received back.
    pub sent_datagrams: usize,
    pub sent_bytes: u64,
    pub received_datagrams: usize,
    pub received_bytes: u64,
    /// Bytes received per byte sent. In spoofed mode every reply goes to an address the
    /// server has not validated: RFC 9000 §8.1 caps this at 3.
    pub amplification: f64,
}

/// A TLS client config that never gets to check a certificate (the flood never reads the
/// server's flight), offering the gateway's ALPN.
fn client_config() -> Result<quinn_proto::ClientConfig> {
    let mut tls = no_verify()?;
    tls.alpn_protocols = vec![b"meshfed/1".to_vec()];
    let quic = quinn_proto::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| anyhow::anyhow!("QUIC client config: {e}"))?;
    Ok(quinn_proto::ClientConfig::new(Arc::new(quic)))
}

/// A TLS 1.3 client with no certificate of its own that checks none of the server's: an
/// anonymous attacker's.
pub fn no_verify() -> Result<rustls::ClientConfig> {
    no_verify_as(None)
}

/// The same, presenting `auth` (a certificate chain and its key) when given: a client
/// that holds a valid identity and checks nothing.
pub fn no_verify_as(
    auth: Option<(
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
) -> Result<rustls::ClientConfig> {
    #[derive(Debug)]
    struct NoVerify(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for NoVerify {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(provider)));
    Ok(match auth {
        None => builder.with_no_client_auth(),
        Some((certs, key)) => builder.with_client_auth_cert(certs, key)?,
    })
}

/// A process's resident set size in bytes (VmRSS from /proc), 0 when unreadable.
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Whether a datagram is a QUIC v1 Retry (long header, type 3).
fn is_retry(b: &[u8]) -> bool {
    b.first().is_some_and(|&x| x & 0xf0 == 0xf0)
}

/// Starts `attempts` handshakes at `target` within about `spread`, spread over `sources`
/// source addresses, then keeps listening for `linger` (collecting replies, answering
/// Retries in validated mode). The attempts are left half-open.
pub fn flood(
    target: SocketAddr,
    attempts: usize,
    sources: usize,
    mode: Mode,
    spread: Duration,
    linger: Duration,
) -> Result<FloodReport> {
    let sources = sources.max(1);
    let sockets = (0..sources)
        .map(|i| {
            let ip = Ipv4Addr::new(127, 0, 2, 1 + (i % 250) as u8);
            let s = UdpSocket::bind((ip, 0)).with_context(|| format!("bind {ip}"))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<Result<Vec<_>>>()?;
    let cfg = client_config()?;
    let mut ep = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let mut conns: HashMap<quinn_proto::ConnectionHandle, (usize, quinn_proto::Connection)> =
        HashMap::new();
    let mut report = FloodReport::default();
    let mut buf = Vec::with_capacity(65536);
    let mut rx = vec![0u8; 65536];
    let start = Instant::now();
    let mut sent = 0usize;
    let send_all = |conn: &mut quinn_proto::Connection,
                    sock: &UdpSocket,
                    report: &mut FloodReport,
                    buf: &mut Vec<u8>|
     -> u64 {
        let mut bytes = 0;
        while let Some(t) = conn.poll_transmit(Instant::now(), 1, buf) {
            if sock.send_to(&buf[..t.size], t.destination).is_ok() {
                report.sent_datagrams += 1;
                report.sent_bytes += t.size as u64;
                bytes += t.size as u64;
            }
            buf.clear();
        }
        bytes
    };
    let end = start + spread + linger;
    while Instant::now() < end {
        // Start the attempts due by now.
        let due = if spread.is_zero() {
            attempts
        } else {
            ((start.elapsed().as_secs_f64() / spread.as_secs_f64()) * attempts as f64).ceil()
                as usize
        }
        .min(attempts);
        while sent < due {
            let src = sent % sources;
            let (ch, mut conn) = ep
                .connect(Instant::now(), cfg.clone(), target, "gateway")
                .map_err(|e| anyhow::anyhow!("connect: {e}"))?;
            send_all(&mut conn, &sockets[src], &mut report, &mut buf);
            conns.insert(ch, (src, conn));
            sent += 1;
            report.attempts += 1;
        }
        // Read what came back.
        let mut idle = true;
        for sock in &sockets {
            while let Ok((n, from)) = sock.recv_from(&mut rx) {
                idle = false;
                report.received_datagrams += 1;
                report.received_bytes += n as u64;
                let retry = is_retry(&rx[..n]);
                if retry {
                    report.retries += 1;
                }
                let local = sock.local_addr().ok().map(|a| a.ip());
                let ev = ep.handle(
                    Instant::now(),
                    from,
                    local,
                    None,
                    BytesMut::from(&rx[..n]),
                    &mut buf,
                );
                buf.clear();
                let Some(quinn_proto::DatagramEvent::ConnectionEvent(ch, ev)) = ev else {
                    continue;
                };
                if !retry {
                    // The server's flight: counted, never fed, so the attempt stays
                    // half-open at the server.
                    continue;
                }
                if mode == Mode::Validated
                    && let Some((src, conn)) = conns.get_mut(&ch)
                {
                    // Take the Retry and send the Initial with its token.
                    conn.handle_event(ev);
                    send_all(conn, &sockets[*src], &mut report, &mut buf);
                }
            }
        }
        if idle {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    report.amplification = if report.sent_bytes == 0 {
        0.0
    } else {
        report.received_bytes as f64 / report.sent_bytes as f64
    };
    Ok(report)
}
