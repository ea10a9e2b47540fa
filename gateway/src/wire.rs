//! The tunnel's stream header: one open request from the egress, one accept or typed
//! refusal from the ingress, before any payload byte. Pure encode/decode, no I/O.
//!
//! Every frame is `u16 length (big endian) | payload`; a payload is at most
//! [`MAX_HEADER_LEN`] bytes. Payloads:
//!
//! ```text
//! open    = version:u8 (=1) | kind:u8 (=1) | service_len:u8 | service | port:u16
//!           | source_len:u16 | source SPIFFE ID (the caller, as the sending gateway
//!             vouches for it: a workload of its trust domain, or the gateway itself)
//! open_udp = the same with kind:u8 (=4), followed by flow:u32
//! (meshfed/2) open_from, open_udp_from = kinds 5 and 6: after the source,
//!           family:u8 (4|6) | client IP (4|16 bytes) | client port:u16
//! (meshfed/3) open_selected = kind 7, a TCP stream to an endpoint of a subset: after
//!           the source, family:u8 (0|4|6) | client IP and port (none for 0)
//!           | selector_len:u16 | selector (`k=v` joined by `,`, by key: the subset's
//!             endpoint labels, at most MAX_SELECTOR_LEN bytes; none when 0)
//!           | name_len:u8 | name (the subset's name when it has a traffic policy of
//!             its own, whose connection pool the ingress applies; none when 0)
//! accept  = version:u8 (=1) | kind:u8 (=2)
//! refuse  = version:u8 (=1) | kind:u8 (=3) | code:u16 | msg_len:u16 | msg (UTF-8)
//! ```
//!
//! A TCP connection is one stream: header, then payload both ways. A UDP flow (one
//! client address and port at the egress) is also one stream, which carries the header
//! and then nothing: it lives as long as the flow, so closing it ends the flow on the
//! other side. The flow's datagrams travel as QUIC DATAGRAM frames (RFC 9221) on the same
//! connection, each `flow:u32 | payload`. The flow ID is chosen by the egress (the
//! dialing side) and is unique on its connection; datagrams from the dialer are requests,
//! datagrams from the acceptor are responses.

use meshfed_catalog::ServiceName;
use meshfed_identity::SpiffeId;

/// The ALPN every meshfed gateway speaks; a new incompatible wire bumps it.
pub const ALPN: &[u8] = b"meshfed/1";
/// The second version: open requests may carry the client's address (kinds 5 and 6).
/// Gateways offer both and use it only when both sides chose it, so an older peer keeps
/// speaking `meshfed/1`.
pub const ALPN_V2: &[u8] = b"meshfed/2";
/// The third: a TCP open may name the endpoint labels of a subset (kind 7), which the
/// ingress connects among only. Offered beside the older two, as `meshfed/2` is.
pub const ALPN_V3: &[u8] = b"meshfed/3";
/// The longest selector an open request carries.
pub const MAX_SELECTOR_LEN: usize = 1024;
pub const VERSION: u8 = 1;
/// Largest header payload accepted. An open request is well under 3 KiB even with a
/// 2048-byte source ID.
pub const MAX_HEADER_LEN: usize = 4096;

const KIND_OPEN: u8 = 1;
const KIND_ACCEPT: u8 = 2;
const KIND_REFUSE: u8 = 3;
const KIND_OPEN_UDP: u8 = 4;
/// `meshfed/2`: the open kinds with the client's address after the source.
const KIND_OPEN_FROM: u8 = 5;
const KIND_OPEN_UDP_FROM: u8 = 6;
/// `meshfed/3`: a TCP open with a subset's endpoint selector.
const KIND_OPEN_SELECTED: u8 = 7;
/// Bytes a datagram's flow ID takes in front of the payload.
pub const DATAGRAM_HEADER_LEN: usize = 4;

/// QUIC application error codes: stream resets and connection closes.
pub mod app_code {
    /// The TCP side of a spliced stream was reset.
    pub const STREAM_RESET: u32 = 0x1;
    /// The stream header was malformed or too large.
    pub const BAD_HEADER: u32 = 0x2;
    /// The stream was refused (after the refusal frame was sent).
    pub const REFUSED: u32 = 0x3;
    /// The gateway is draining (connection close).
    pub const DRAINING: u32 = 0x10;
    /// The dialer gave up on a connection that stopped answering (connection close).
    pub const UNRESPONSIVE: u32 = 0x11;
    /// A UDP flow saw no datagram for its idle timeout (stream reset).
    pub const FLOW_IDLE: u32 = 0x4;
    /// A UDP flow's endpoint became unreachable (ICMP) or its socket failed (stream reset).
    pub const FLOW_ENDPOINT_ERROR: u32 = 0x5;
    /// The peer's trust domain left the federation or was removed (connection close).
    pub const TRUST_WITHDRAWN: u32 = 0x12;
}

/// Why an ingress refused a stream. The numeric code is stable on the wire; the label is
/// stable in logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refusal {
    UnknownService,
    NotExportedToPeer,
    NoReadyEndpoint,
    EndpointConnectFailed,
    MalformedHeader,
    HeaderTooLarge,
    UnsupportedVersion,
    Draining,
    /// The egress could not reach the peer gateway at all (never on the wire).
    PeerUnavailable,
    /// The ingress has as many UDP flows open as it may (per peer or in all), or the
    /// peer as many TCP streams as its share of the open-file limit.
    FlowLimit,
    /// An AuthorizationPolicy denied the caller; the message names the policy.
    Denied,
    /// The open request's caller is outside the trust domain of the gateway that sent
    /// it: a gateway vouches only for its own trust domain's workloads.
    ForeignCaller,
    /// The service's `connectionPool` is full at the ingress: as many connections to its
    /// endpoints as `tcp.maxConnections` allows (another site may have room).
    Overflow,
    /// A code this build does not know (a newer peer).
    Unknown(u16),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    pub service: ServiceName,
    pub port: u16,
    pub source: SpiffeId,
    /// `Some(flow ID)`: a UDP flow whose datagrams carry this ID; `None`: a TCP stream.
    pub flow: Option<u32>,
    /// The client's address at the egress, sent only on a `meshfed/2` connection.
    pub client: Option<std::net::SocketAddr>,
    /// A TCP stream's subset: the endpoint labels the ingress must connect among (a TCP
    /// route's destination subset), sent only on a `meshfed/3` connection. `None`: any
    /// endpoint. A UDP open carries none.
    pub selector: Option<std::collections::BTreeMap<String, String>>,
    /// The subset's name when it has a traffic policy of its own: the ingress applies
    /// that policy's connection pool (a pool of the subset's own). `meshfed/3` only.
    pub subset: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    Accept,
    Refuse { reason: Refusal, message: String },
}

/// A header that could not be decoded; becomes a [`Refusal`] on the wire.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("header length {0} exceeds the maximum of {MAX_HEADER_LEN}")]
    TooLarge(usize),
    #[error("header is truncated: {0}")]
    Truncated(&'static str),
    #[error("unsupported header version {0}")]
    Version(u8),
    #[error("unexpected frame kind {0}")]
    Kind(u8),
    #[error("bad {field}: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("{0} trailing bytes after the header")]
    Trailing(usize),
}

// === impl Refusal ===

impl Refusal {
    pub fn code(self) -> u16 {
        match self {
            Self::UnknownService => 1,
            Self::NotExportedToPeer => 2,
            Self::NoReadyEndpoint => 3,
            Self::EndpointConnectFailed => 4,
            Self::MalformedHeader => 5,
            Self::HeaderTooLarge => 6,
            Self::UnsupportedVersion => 7,
            Self::Draining => 8,
            Self::PeerUnavailable => 9,
            Self::FlowLimit => 10,
            Self::Denied => 11,
            Self::ForeignCaller => 12,
            Self::Overflow => 13,
            Self::Unknown(c) => c,
        }
    }

    pub fn from_code(c: u16) -> Self {
        match c {
            1 => Self::UnknownService,
            2 => Self::NotExportedToPeer,
            3 => Self::NoReadyEndpoint,
            4 => Self::EndpointConnectFailed,
            5 => Self::MalformedHeader,
            6 => Self::HeaderTooLarge,
            7 => Self::UnsupportedVersion,
            8 => Self::Draining,
            9 => Self::PeerUnavailable,
            10 => Self::FlowLimit,
            11 => Self::Denied,
            12 => Self::ForeignCaller,
            13 => Self::Overflow,
            c => Self::Unknown(c),
        }
    }

    /// The label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownService => "unknown_service",
            Self::NotExportedToPeer => "not_exported_to_peer",
            Self::NoReadyEndpoint => "no_ready_endpoint",
            Self::EndpointConnectFailed => "endpoint_connect_failed",
            Self::MalformedHeader => "malformed_header",
            Self::HeaderTooLarge => "header_too_large",
            Self::UnsupportedVersion => "unsupported_version",
            Self::Draining => "draining",
            Self::PeerUnavailable => "peer_unavailable",
            Self::FlowLimit => "flow_limit",
            Self::Denied => "denied",
            Self::ForeignCaller => "foreign_caller",
            Self::Overflow => "overflow",
            Self::Unknown(_) => "unknown_code",
        }
    }

    /// Whether another site could succeed where this one refused. An authorization
    /// refusal is final: failing over would go around the policy.
    pub fn retryable_elsewhere(self) -> bool {
        !matches!(
            self,
            Self::MalformedHeader | Self::HeaderTooLarge | Self::Denied | Self::ForeignCaller
        )
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&WireError> for Refusal {
    fn from(e: &WireError) -> Self {
        match e {
            WireError::TooLarge(_) => Refusal::HeaderTooLarge,
            WireError::Version(_) => Refusal::UnsupportedVersion,
            _ => Refusal::MalformedHeader,
        }
    }
}

// === encode ===

fn frame(payload: Vec<u8>) -> Vec<u8> {
    debug_assert!(payload.len() <= MAX_HEADER_LEN);
    let mut out = Vec::with_capacity(2 + payload.len());
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

impl Open {
    /// Whether the selector, as the wire carries it, is within [`MAX_SELECTOR_LEN`].
    pub fn selector_fits(&self) -> bool {
        // `k=v` per label, `,` between them: counted, not written.
        self.selector.as_ref().is_none_or(|s| {
            let len: usize = s.iter().map(|(k, v)| k.len() + 1 + v.len()).sum();
            len + s.len().saturating_sub(1) <= MAX_SELECTOR_LEN
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let svc = self.service.to_string();
        let src = self.source.as_str();
        let mut p = Vec::with_capacity(8 + svc.len() + src.len());
        let selector = match (&self.selector, self.flow) {
            (Some(s), None) => Some(meshfed_catalog::http_route::format_selector(s)),
            _ => None,
        };
        let name = self.subset.as_deref().filter(|_| self.flow.is_none());
        let selected = selector.is_some() || name.is_some();
        let kind = match (self.flow.is_some(), self.client.is_some()) {
            _ if selected => KIND_OPEN_SELECTED,
            (false, false) => KIND_OPEN,
            (true, false) => KIND_OPEN_UDP,
            (false, true) => KIND_OPEN_FROM,
            (true, true) => KIND_OPEN_UDP_FROM,
        };
        p.extend_from_slice(&[VERSION, kind, svc.len() as u8]);
        p.extend_from_slice(svc.as_bytes());
        p.extend_from_slice(&self.port.to_be_bytes());
        p.extend_from_slice(&(src.len() as u16).to_be_bytes());
        p.extend_from_slice(src.as_bytes());
        match self.client {
            Some(std::net::SocketAddr::V4(a)) => {
                p.push(4);
                p.extend_from_slice(&a.ip().octets());
                p.extend_from_slice(&a.port().to_be_bytes());
            }
            Some(std::net::SocketAddr::V6(a)) => {
                p.push(6);
                p.extend_from_slice(&a.ip().octets());
                p.extend_from_slice(&a.port().to_be_bytes());
            }
            None if selected => p.push(0),
            None => {}
        }
        if selected {
            // The egress checks the length before it opens (`Open::selector_fits`); one
            // past it goes out as `=`, which the ingress refuses, never cut short or
            // left out (either could name another subset).
            let sel = match &selector {
                Some(s) if s.len() <= MAX_SELECTOR_LEN => s.as_bytes(),
                Some(_) => b"=",
                None => &[],
            };
            p.extend_from_slice(&(sel.len() as u16).to_be_bytes());
            p.extend_from_slice(sel);
            // A name is a DNS label (at most 63 bytes); a longer one goes out empty: the
            // service's pool, never another subset's.
            let name = name.filter(|n| n.len() <= 63).unwrap_or_default();
            p.push(name.len() as u8);
            p.extend_from_slice(name.as_bytes());
        }
        if let Some(flow) = self.flow {
            p.extend_from_slice(&flow.to_be_bytes());
        }
        frame(p)
    }
}

impl Response {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Response::Accept => frame(vec![VERSION, KIND_ACCEPT]),
            Response::Refuse { reason, message } => {
                // Keep the frame within bounds whatever the message.
                let mut msg = message.as_str();
                while msg.len() > 1024 {
                    let mut cut = 1024;
                    while !msg.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    msg = &msg[..cut];
                }
                let mut p = vec![VERSION, KIND_REFUSE];
                p.extend_from_slice(&reason.code().to_be_bytes());
                p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
                p.extend_from_slice(msg.as_bytes());
                frame(p)
            }
        }
    }
}

// === decode ===

/// Checks a frame's length prefix before its payload is read.
pub fn check_len(prefix: [u8; 2]) -> Result<usize, WireError> {
    let len = u16::from_be_bytes(prefix) as usize;
    if len > MAX_HEADER_LEN {
        return Err(WireError::TooLarge(len));
    }
    if len < 2 {
        return Err(WireError::Truncated("version and kind"));
    }
    Ok(len)
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated(what));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn str(&mut self, n: usize, field: &'static str) -> Result<&'a str, WireError> {
        std::str::from_utf8(self.take(n, field)?).map_err(|e| WireError::Field {
            field,
            reason: e.to_string(),
        })
    }
    fn finish(self) -> Result<(), WireError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing(self.0.len()))
        }
    }
}

fn head(c: &mut Cursor<'_>) -> Result<u8, WireError> {
    let v = c.u8("version")?;
    if v != VERSION {
        return Err(WireError::Version(v));
    }
    c.u8("kind")
}

/// Decodes an open request payload (without its length prefix).
pub fn decode_open(payload: &[u8]) -> Result<Open, WireError> {
    if payload.len() > MAX_HEADER_LEN {
        return Err(WireError::TooLarge(payload.len()));
    }
    let mut c = Cursor(payload);
    let (udp, from, selected) = match head(&mut c)? {
        KIND_OPEN => (false, false, false),
        KIND_OPEN_UDP => (true, false, false),
        KIND_OPEN_FROM => (false, true, false),
        KIND_OPEN_UDP_FROM => (true, true, false),
        KIND_OPEN_SELECTED => (false, true, true),
        k => return Err(WireError::Kind(k)),
    };
    let n = c.u8("service length")? as usize;
    let svc = c.str(n, "service")?;
    let service = ServiceName::parse(svc).map_err(|e| WireError::Field {
        field: "service",
        reason: e.to_string(),
    })?;
    let port = c.u16("port")?;
    if port == 0 {
        return Err(WireError::Field {
            field: "port",
            reason: "port 0".into(),
        });
    }
    let n = c.u16("source length")? as usize;
    let src = c.str(n, "source")?;
    let source = SpiffeId::new(src).map_err(|e| WireError::Field {
        field: "source",
        reason: e.to_string(),
    })?;
    let client = if from {
        let ip: std::net::IpAddr = match c.u8("client family")? {
            4 => {
                let b: [u8; 4] = c.take(4, "client address")?.try_into().expect("4 bytes");
                b.into()
            }
            6 => {
                let b: [u8; 16] = c.take(16, "client address")?.try_into().expect("16 bytes");
                b.into()
            }
            0 if selected => return decode_selector(c, service, port, source, None),
            f => {
                return Err(WireError::Field {
                    field: "client family",
                    reason: format!("{f} is neither 4 nor 6"),
                });
            }
        };
        let client = std::net::SocketAddr::new(ip, c.u16("client port")?);
        if selected {
            return decode_selector(c, service, port, source, Some(client));
        }
        Some(client)
    } else {
        None
    };
    let flow = if udp { Some(c.u32("flow")?) } else { None };
    c.finish()?;
    Ok(Open {
        service,
        port,
        source,
        flow,
        client,
        selector: None,
        subset: None,
    })
}

/// The rest of a kind 7 open: its selector, checked as a subset's labels are, and the
/// subset's name.
fn decode_selector(
    mut c: Cursor<'_>,
    service: ServiceName,
    port: u16,
    source: SpiffeId,
    client: Option<std::net::SocketAddr>,
) -> Result<Open, WireError> {
    let n = c.u16("selector length")? as usize;
    if n > MAX_SELECTOR_LEN {
        return Err(WireError::Field {
            field: "selector",
            reason: format!("{n} bytes (at most {MAX_SELECTOR_LEN})"),
        });
    }
    let s = c.str(n, "selector")?;
    let selector = if s.is_empty() {
        None
    } else {
        let selector =
            meshfed_catalog::http_route::parse_selector(s).map_err(|reason| WireError::Field {
                field: "selector",
                reason,
            })?;
        // One spelling per selector (keys in order, as encode writes them): what
        // decodes encodes back to the same bytes.
        if meshfed_catalog::http_route::format_selector(&selector) != s {
            return Err(WireError::Field {
                field: "selector",
                reason: format!("{s:?}: labels out of key order"),
            });
        }
        Some(selector)
    };
    let n = c.u8("subset name length")? as usize;
    let name = c.str(n, "subset name")?;
    let subset = if name.is_empty() {
        None
    } else {
        if !meshfed_catalog::names::is_dns_label(name) {
            return Err(WireError::Field {
                field: "subset name",
                reason: format!("{name:?} is not a DNS label"),
            });
        }
        Some(name.to_owned())
    };
    if selector.is_none() && subset.is_none() {
        return Err(WireError::Field {
            field: "selector",
            reason: "neither a selector nor a subset name (use kind 1 or 5)".into(),
        });
    }
    c.finish()?;
    Ok(Open {
        service,
        port,
        source,
        flow: None,
        client,
        selector,
        subset,
    })
}

/// Prefixes a UDP payload with its flow ID: the body of one QUIC datagram.
pub fn encode_datagram(flow: u32, payload: &[u8]) -> bytes::Bytes {
    let mut b = bytes::BytesMut::with_capacity(DATAGRAM_HEADER_LEN + payload.len());
    b.extend_from_slice(&flow.to_be_bytes());
    b.extend_from_slice(payload);
    b.freeze()
}

/// Splits a received QUIC datagram into its flow ID and payload.
pub fn decode_datagram(d: &[u8]) -> Result<(u32, &[u8]), WireError> {
    if d.len() < DATAGRAM_HEADER_LEN {
        return Err(WireError::Truncated("datagram flow id"));
    }
    let (id, payload) = d.split_at(DATAGRAM_HEADER_LEN);
    Ok((u32::from_be_bytes([id[0], id[1], id[2], id[3]]), payload))
}

/// Decodes a response payload (without its length prefix).
pub fn decode_response(payload: &[u8]) -> Result<Response, WireError> {
    let mut c = Cursor(payload);
    match head(&mut c)? {
        KIND_ACCEPT => {
            c.finish()?;
            Ok(Response::Accept)
        }
        KIND_REFUSE => {
            let code = c.u16("refusal code")?;
            let n = c.u16("message length")? as usize;
            let message = c.str(n, "message")?.to_owned();
            c.finish()?;
            Ok(Response::Refuse {
                reason: Refusal::from_code(code),
                message,
            })
        }
        k => Err(WireError::Kind(k)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn open() -> Open {
        Open {
            service: ServiceName::parse("orders.shop").unwrap(),
            port: 8080,
            source: SpiffeId::new("spiffe://east.example.org/meshfed/site/east/gateway").unwrap(),
            flow: None,
            client: None,
            selector: None,
            subset: None,
        }
    }

    fn payload(framed: &[u8]) -> &[u8] {
        let len = check_len([framed[0], framed[1]]).unwrap();
        assert_eq!(len, framed.len() - 2);
        &framed[2..]
    }

    #[test]
    fn a_v2_open_carries_the_client_address() {
        for (client, flow, kind) in [
            ("192.0.2.7:40000", None, KIND_OPEN_FROM),
            ("[2001:db8::7]:443", Some(9), KIND_OPEN_UDP_FROM),
        ] {
            let o = Open {
                client: Some(client.parse().unwrap()),
                flow,
                ..open()
            };
            let framed = o.encode();
            assert_eq!(framed[3], kind);
            assert_eq!(decode_open(payload(&framed)).unwrap(), o);
        }
        // A bad family is a field error, and a truncated address says what is missing.
        let mut framed = Open {
            client: Some("192.0.2.7:1".parse().unwrap()),
            ..open()
        }
        .encode();
        let at = framed.len() - 7;
        framed[at] = 5;
        assert!(matches!(
            decode_open(payload(&framed)),
            Err(WireError::Field {
                field: "client family",
                ..
            })
        ));
        let framed = Open {
            client: Some("192.0.2.7:1".parse().unwrap()),
            ..open()
        }
        .encode();
        let short = &payload(&framed)[..framed.len() - 2 - 3];
        assert_eq!(
            decode_open(short),
            Err(WireError::Truncated("client address"))
        );
    }

    #[test]
    fn a_v3_open_carries_a_subset_selector() {
        let sel: std::collections::BTreeMap<String, String> =
            [("version".into(), "v2".into()), ("app".into(), "db".into())].into();
        for client in [None, Some("192.0.2.7:40000"), Some("[2001:db8::7]:443")] {
            let o = Open {
                client: client.map(|c| c.parse().unwrap()),
                selector: Some(sel.clone()),
                ..open()
            };
            assert!(o.selector_fits());
            let framed = o.encode();
            assert_eq!(framed[3], KIND_OPEN_SELECTED);
            assert!(
                framed.ends_with(b"\x00\x11app=db,version=v2\x00"),
                "{framed:?}"
            );
            assert_eq!(decode_open(payload(&framed)).unwrap(), o);
        }
        // A UDP flow carries none: no routes pick its subset.
        let u = Open {
            flow: Some(3),
            selector: Some(sel.clone()),
            ..open()
        };
        assert_eq!(u.encode()[3], KIND_OPEN_UDP);
        // A selector is checked as a subset's labels are, and bounded.
        let with = |s: &[u8]| {
            let mut p = payload(
                &Open {
                    selector: Some(sel.clone()),
                    ..open()
                }
                .encode(),
            )
            .to_vec();
            p.truncate(p.len() - 20);
            p.extend_from_slice(&(s.len() as u16).to_be_bytes());
            p.extend_from_slice(s);
            p.push(0);
            decode_open(&p)
        };
        assert!(with(b"version=v2").is_ok());
        for bad in [
            &b"version"[..],
            b"=v2",
            b"a=1,a=2",
            b"v=-x",
            b"",
            b"\xff=1",
            b"b=1,a=2",
            b"=",
        ] {
            assert!(
                matches!(
                    with(bad),
                    Err(WireError::Field {
                        field: "selector",
                        ..
                    })
                ),
                "{bad:?}: {:?}",
                with(bad)
            );
        }
        let long = vec![b'a'; MAX_SELECTOR_LEN + 1];
        assert!(matches!(
            with(&long),
            Err(WireError::Field {
                field: "selector",
                ..
            })
        ));
        let huge = Open {
            selector: Some(
                [("k".into(), "v".repeat(63))]
                    .into_iter()
                    .chain((0..20).map(|i| (format!("label-{i}"), "v".repeat(63))))
                    .collect(),
            ),
            ..open()
        };
        assert!(!huge.selector_fits());
        // Counted as written: at the bound exactly, and one past it.
        for extra in [0, 1] {
            let mut sel = std::collections::BTreeMap::new();
            for i in 0..15 {
                sel.insert(format!("k{i:02}"), "v".repeat(63));
            }
            let written = meshfed_catalog::http_route::format_selector(&sel).len();
            sel.insert(
                "z".into(),
                "v".repeat(MAX_SELECTOR_LEN - written - 3 + extra),
            );
            let o = Open {
                selector: Some(sel.clone()),
                ..open()
            };
            let len = meshfed_catalog::http_route::format_selector(&sel).len();
            assert_eq!(len, MAX_SELECTOR_LEN + extra);
            assert_eq!(o.selector_fits(), extra == 0, "{len} bytes");
        }
        assert!(matches!(
            decode_open(payload(&huge.encode())),
            Err(WireError::Field {
                field: "selector",
                ..
            })
        ));
        // Trailing bytes after the selector, and a cut one, are named.
        let mut p = payload(
            &Open {
                selector: Some(sel.clone()),
                ..open()
            }
            .encode(),
        )
        .to_vec();
        p.push(0);
        assert_eq!(decode_open(&p), Err(WireError::Trailing(1)));
        assert_eq!(
            decode_open(&p[..p.len() - 4]),
            Err(WireError::Truncated("selector"))
        );
        // A subset's name, with or without a selector (a subset of site labels only).
        for selector in [None, Some(sel.clone())] {
            let o = Open {
                selector,
                subset: Some("canary-2".into()),
                ..open()
            };
            let framed = o.encode();
            assert_eq!(framed[3], KIND_OPEN_SELECTED);
            assert!(framed.ends_with(b"\x08canary-2"), "{framed:?}");
            assert_eq!(decode_open(payload(&framed)).unwrap(), o);
        }
        let named = |n: &[u8]| {
            let mut p = payload(
                &Open {
                    subset: Some("x".into()),
                    ..open()
                }
                .encode(),
            )
            .to_vec();
            p.truncate(p.len() - 2);
            p.push(n.len() as u8);
            p.extend_from_slice(n);
            decode_open(&p)
        };
        assert!(named(b"v2").is_ok());
        for bad in [&b"V2"[..], b"-v2", b"v_2", b"\xff"] {
            assert!(
                matches!(
                    named(bad),
                    Err(WireError::Field {
                        field: "subset name",
                        ..
                    })
                ),
                "{bad:?}: {:?}",
                named(bad)
            );
        }
        // Neither: a kind 7 that names nothing.
        assert!(matches!(
            named(b""),
            Err(WireError::Field {
                field: "selector",
                ..
            })
        ));
        // A name past a DNS label's length goes out empty: the service's pool.
        let long = Open {
            selector: Some(sel.clone()),
            subset: Some("x".repeat(64)),
            ..open()
        };
        assert_eq!(decode_open(payload(&long.encode())).unwrap().subset, None);
    }

    /// The fuzz seeds (`tests/data/wire`, one open payload each) decode, and encode back
    /// to their bytes.
    #[test]
    fn the_fuzz_seeds_decode() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/wire");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let b = std::fs::read(&p).unwrap();
            let o = decode_open(&b).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert_eq!(&o.encode()[2..], &b[..], "{}", p.display());
            n += 1;
        }
        assert!(n >= 4, "{n} seeds");
    }

    #[test]
    fn open_round_trip() {
        let o = open();
        assert_eq!(decode_open(payload(&o.encode())).unwrap(), o);
        let u = Open {
            flow: Some(0xdead_beef),
            ..open()
        };
        let framed = u.encode();
        assert_eq!(framed[3], KIND_OPEN_UDP);
        assert_eq!(decode_open(payload(&framed)).unwrap(), u);
        // A UDP open cut before its flow ID names what is missing.
        let p = payload(&framed);
        assert_eq!(
            decode_open(&p[..p.len() - 2]),
            Err(WireError::Truncated("flow"))
        );
    }

    #[test]
    fn datagrams_round_trip() {
        let d = encode_datagram(7, b"hello");
        assert_eq!(d.len(), DATAGRAM_HEADER_LEN + 5);
        assert_eq!(decode_datagram(&d).unwrap(), (7, &b"hello"[..]));
        assert_eq!(decode_datagram(&d[..4]).unwrap(), (7, &b""[..]));
        assert_eq!(
            decode_datagram(&d[..3]),
            Err(WireError::Truncated("datagram flow id"))
        );
    }

    #[test]
    fn responses_round_trip() {
        for r in [
            Response::Accept,
            Response::Refuse {
                reason: Refusal::NoReadyEndpoint,
                message: "0 of 3 ready".into(),
            },
            Response::Refuse {
                reason: Refusal::Unknown(999),
                message: String::new(),
            },
        ] {
            assert_eq!(decode_response(payload(&r.encode())).unwrap(), r);
        }
    }

    #[test]
    fn codes_are_stable() {
        // These numbers are on the wire: changing one breaks mixed-version federations.
        assert_eq!(Refusal::UnknownService.code(), 1);
        assert_eq!(Refusal::NotExportedToPeer.code(), 2);
        assert_eq!(Refusal::NoReadyEndpoint.code(), 3);
        assert_eq!(Refusal::EndpointConnectFailed.code(), 4);
        assert_eq!(Refusal::Denied.code(), 11);
        assert_eq!(Refusal::ForeignCaller.code(), 12);
        assert_eq!(Refusal::Overflow.code(), 13);
        for c in 1..=13 {
            assert_eq!(Refusal::from_code(c).code(), c);
            assert_ne!(Refusal::from_code(c).as_str(), "unknown_code");
        }
    }

    #[test]
    fn oversized_header_refused() {
        assert_eq!(check_len([0xff, 0xff]), Err(WireError::TooLarge(0xffff)));
        assert_eq!(check_len([0x10, 0x01]), Err(WireError::TooLarge(4097)));
        assert!(check_len([0x10, 0x00]).is_ok());
        assert_eq!(
            Refusal::from(&WireError::TooLarge(5000)),
            Refusal::HeaderTooLarge
        );
    }

    #[test]
    fn malformed_headers_name_the_problem() {
        let mut p = payload(&open().encode()).to_vec();
        p[0] = 9;
        assert_eq!(decode_open(&p), Err(WireError::Version(9)));
        let mut p = payload(&open().encode()).to_vec();
        p[1] = KIND_ACCEPT;
        assert_eq!(decode_open(&p), Err(WireError::Kind(KIND_ACCEPT)));
        let p = payload(&open().encode()).to_vec();
        assert!(matches!(
            decode_open(&p[..p.len() - 1]),
            Err(WireError::Truncated("source"))
        ));
        let mut p2 = p.clone();
        p2.push(0);
        assert_eq!(decode_open(&p2), Err(WireError::Trailing(1)));
        let mut bad_svc = p.clone();
        bad_svc[3] = b'O';
        assert!(matches!(
            decode_open(&bad_svc),
            Err(WireError::Field {
                field: "service",
                ..
            })
        ));
        assert_eq!(decode_open(&[]), Err(WireError::Truncated("version")));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_open(&b);
            let _ = decode_response(&b);
            let _ = decode_datagram(&b);
        }

        #[test]
        fn mutated_open_never_panics(i in 0usize..64, v in any::<u8>()) {
            let mut p = payload(&open().encode()).to_vec();
            let i = i % p.len();
            p[i] = v;
            let _ = decode_open(&p);
        }
    }
}
