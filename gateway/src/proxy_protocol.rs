//! PROXY protocol v2 (haproxy's `proxy-protocol.txt`, section 2.2), as the ingress sends
//! it to an endpoint that asked for it (`exports[].proxy_protocol: true`): the client's
//! address at the far site's egress as the source, the endpoint as the destination, and
//! the caller's SPIFFE ID in a TLV of type [`TLV_SPIFFE_ID`] (in the range the
//! specification leaves to applications, 0xE0–0xEF). Pure: bytes in and out.

use std::net::{IpAddr, SocketAddr};

/// PROXY v2 signature.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The TLV carrying the caller's SPIFFE ID (UTF-8).
pub const TLV_SPIFFE_ID: u8 = 0xE0;

const VERSION_PROXY: u8 = 0x21;
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;

/// The header for a TCP connection from `src` to `dst`, on behalf of `caller`. An IPv4
/// address beside an IPv6 one is sent IPv4-mapped.
pub fn header(src: SocketAddr, dst: SocketAddr, caller: &str) -> Vec<u8> {
    let v6 = |ip: IpAddr| match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    };
    let mut addrs = Vec::with_capacity(36);
    let family = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            addrs.extend_from_slice(&s.octets());
            addrs.extend_from_slice(&d.octets());
            TCP4
        }
        (s, d) => {
            addrs.extend_from_slice(&v6(s).octets());
            addrs.extend_from_slice(&v6(d).octets());
            TCP6
        }
    };
    addrs.extend_from_slice(&src.port().to_be_bytes());
    addrs.extend_from_slice(&dst.port().to_be_bytes());
    // A SPIFFE ID is at most 2048 bytes: the TLV length always fits.
    let id = &caller.as_bytes()[..caller.len().min(2048)];
    addrs.push(TLV_SPIFFE_ID);
    addrs.extend_from_slice(&(id.len() as u16).to_be_bytes());
    addrs.extend_from_slice(id);
    let mut out = Vec::with_capacity(16 + addrs.len());
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION_PROXY);
    out.push(family);
    out.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    out.extend_from_slice(&addrs);
    out
}

/// What a header says: source, destination, and its TLVs.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub tlvs: Vec<(u8, Vec<u8>)>,
    /// Bytes the header took.
    pub len: usize,
}

/// Parses a v2 PROXY header of a TCP connection (for endpoints written in Rust and for
/// tests); `None` when `buf` does not start with a complete one.
pub fn parse(buf: &[u8]) -> Option<Parsed> {
    if buf.len() < 16 || buf[..12] != SIGNATURE || buf[12] != VERSION_PROXY {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let body = buf.get(16..16 + len)?;
    let (src, dst, rest) = match buf[13] {
        TCP4 if body.len() >= 12 => {
            let ip = |b: &[u8]| IpAddr::from(<[u8; 4]>::try_from(b).expect("4 bytes"));
            let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
            (
                SocketAddr::new(ip(&body[0..4]), port(&body[8..10])),
                SocketAddr::new(ip(&body[4..8]), port(&body[10..12])),
                &body[12..],
            )
        }
        TCP6 if body.len() >= 36 => {
            let ip = |b: &[u8]| IpAddr::from(<[u8; 16]>::try_from(b).expect("16 bytes"));
            let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
            (
                SocketAddr::new(ip(&body[0..16]), port(&body[32..34])),
                SocketAddr::new(ip(&body[16..32]), port(&body[34..36])),
                &body[36..],
            )
        }
        _ => return None,
    };
    let mut tlvs = Vec::new();
    let mut r = rest;
    while !r.is_empty() {
        let n = usize::from(u16::from_be_bytes([*r.get(1)?, *r.get(2)?]));
        tlvs.push((r[0], r.get(3..3 + n)?.to_vec()));
        r = &r[3 + n..];
    }
    Some(Parsed {
        src,
        dst,
        tlvs,
        len: 16 + len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_through_the_parser() {
        let id = "spiffe://east.example.org/ns/shop/sa/frontend";
        for (src, dst) in [
            ("192.0.2.7:40000", "10.0.0.1:8080"),
            ("[2001:db8::7]:443", "[2001:db8::1]:8443"),
            ("192.0.2.7:40000", "[2001:db8::1]:8443"),
        ] {
            let (s, d): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            let h = header(s, d, id);
            let p = parse(&h).unwrap();
            assert_eq!(p.len, h.len());
            assert_eq!(p.tlvs, vec![(TLV_SPIFFE_ID, id.as_bytes().to_vec())]);
            let unmap = |a: SocketAddr| match a.ip() {
                IpAddr::V6(v6) => SocketAddr::new(
                    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                    a.port(),
                ),
                _ => a,
            };
            assert_eq!((unmap(p.src), unmap(p.dst)), (s, d), "{src} → {dst}");
        }
        // The v4 layout, byte for byte, as the specification gives it.
        let h = header(
            "1.2.3.4:5".parse().unwrap(),
            "6.7.8.9:10".parse().unwrap(),
            "",
        );
        assert_eq!(&h[12..16], &[0x21, 0x11, 0, 15]);
        assert_eq!(&h[16..28], &[1, 2, 3, 4, 6, 7, 8, 9, 0, 5, 0, 10]);
        assert!(parse(&h[..20]).is_none());
        assert!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n").is_none());
    }
}
