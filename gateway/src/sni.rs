//! The SNI of a client's TLS ClientHello, read before the egress picks a `tls` port's
//! route (a VirtualService's `tls` routes match it, as Envoy's `tls_inspector` reads it
//! for a sidecar's filter chains). The TLS is the client's and the endpoint's: the egress
//! only reads the ClientHello, parsed by rustls's `Acceptor`, and forwards every byte it
//! read ahead of the rest.
//!
//! [`Hello`] is the pure part (bytes in, what they say out); [`read`] is the I/O, bounded
//! in bytes ([`MAX_HELLO`]) and time (its caller's `within`).

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The most bytes read ahead for a ClientHello (a ClientHello is a few hundred bytes to
/// a few KiB; post-quantum key shares make it two TCP segments). Past it the connection
/// goes on without an SNI.
pub const MAX_HELLO: usize = 64 * 1024;

/// What the bytes read so far say.
#[derive(Debug, PartialEq, Eq)]
pub enum Said {
    /// A whole ClientHello, and the name it asked for (`None`: no SNI, or an IP).
    Name(Option<String>),
    /// A ClientHello's start: more bytes are needed.
    More,
    /// Not a TLS ClientHello.
    NotTls,
}

/// A ClientHello fed as it arrives.
#[derive(Default)]
pub struct Hello {
    acceptor: rustls::server::Acceptor,
}

impl Hello {
    /// Feeds the next bytes of the connection. Pure (no I/O).
    pub fn feed(&mut self, mut bytes: &[u8]) -> Said {
        while !bytes.is_empty() {
            match self.acceptor.read_tls(&mut bytes) {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => return Said::NotTls,
            }
            match self.acceptor.accept() {
                Ok(Some(accepted)) => {
                    return Said::Name(
                        accepted
                            .client_hello()
                            .server_name()
                            .map(|n| n.to_ascii_lowercase()),
                    );
                }
                Ok(None) => {}
                Err(_) => return Said::NotTls,
            }
        }
        Said::More
    }
}

/// Reads from `r` until its ClientHello is whole (or it is not TLS, ends, passes
/// [`MAX_HELLO`], or `within` passes): the bytes read, which the caller forwards first,
/// and the SNI.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R, within: Duration) -> (BytesMut, Option<String>) {
    let mut buf = BytesMut::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let mut hello = Hello::default();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let from = buf.len();
        if from >= MAX_HELLO {
            return (buf, None);
        }
        let want = chunk.len().min(MAX_HELLO - from);
        let n = match tokio::time::timeout_at(deadline, r.read(&mut chunk[..want])).await {
            Ok(Ok(n)) if n > 0 => n,
            // The end, an error or the time: on without a name.
            _ => return (buf, None),
        };
        buf.extend_from_slice(&chunk[..n]);
        match hello.feed(&chunk[..n]) {
            Said::Name(n) => return (buf, n),
            Said::More => {}
            Said::NotTls => return (buf, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A real ClientHello, as rustls's client writes it for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        // No roots: the hello is written before any certificate is looked at.
        let roots = rustls::RootCertStore::empty();
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let server = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(cfg), server).unwrap();
        let mut out = Vec::new();
        c.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn a_client_hello_names_its_server() {
        let h = client_hello("DB.Example.com");
        assert_eq!(
            Hello::default().feed(&h),
            Said::Name(Some("db.example.com".into()))
        );
        // Byte by byte: more until the last one.
        let mut hello = Hello::default();
        for (i, b) in h.iter().enumerate() {
            let said = hello.feed(std::slice::from_ref(b));
            if i + 1 < h.len() {
                assert_eq!(said, Said::More, "byte {i}");
            } else {
                assert_eq!(said, Said::Name(Some("db.example.com".into())));
            }
        }
        // An IP address is no SNI (rustls sends none for it).
        assert_eq!(
            Hello::default().feed(&client_hello("192.0.2.1")),
            Said::Name(None)
        );
        // Not TLS: an HTTP request, and a TLS record that is not a handshake.
        assert_eq!(
            Hello::default().feed(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"),
            Said::NotTls
        );
        assert_eq!(
            Hello::default().feed(&[0x17, 3, 3, 0, 2, 0, 0]),
            Said::NotTls
        );
    }

    #[tokio::test]
    async fn reading_keeps_every_byte_and_stops_in_time() {
        let h = client_hello("db.example.com");
        let mut with_more = h.clone();
        with_more.extend_from_slice(b"early data");
        let (buf, sni) = read(&mut &with_more[..], Duration::from_secs(1)).await;
        assert_eq!(sni.as_deref(), Some("db.example.com"));
        assert!(with_more.starts_with(&buf), "only bytes the client sent");
        assert!(buf.len() >= h.len());
        // A client that sends half a ClientHello and waits: on without a name, with
        // what it sent.
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        tokio::io::AsyncWriteExt::write_all(&mut a, &h[..20])
            .await
            .unwrap();
        let (buf, sni) = read(&mut b, Duration::from_millis(100)).await;
        assert_eq!((&buf[..], sni), (&h[..20], None));
        // A flood of handshake-looking bytes stops at the bound.
        let mut flood = vec![0x16, 3, 1, 0xff, 0xff];
        flood.resize(MAX_HELLO * 2, 0);
        let (buf, _) = read(&mut &flood[..], Duration::from_secs(1)).await;
        assert!(buf.len() <= MAX_HELLO, "{}", buf.len());
    }
}
