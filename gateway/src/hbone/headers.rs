//! The open request and its answer on the h2 transport, as an HTTP/2 CONNECT (the HBONE
//! shape of Istio ambient): pure conversions between [`Open`]/[`Response`] and `http`
//! types, no I/O.
//!
//! ```text
//! request  :method CONNECT   :authority <service>:<port>
//!          meshfed-source: <caller SPIFFE ID>
//!          forwarded: for="<client ip:port>"        (RFC 7239, optional)
//!          meshfed-subset: <k=v,...>        (a subset's endpoint labels, optional)
//!          meshfed-subset-name: <name>      (a subset with a policy of its own, optional)
//! accept   :status 200   meshfed-subset: <the same>   (echoed: the ingress applied it)
//! refuse   :status 4xx/5xx   meshfed-refusal: <stable code>   meshfed-message: <text>
//! ```
//!
//! A UDP flow is an extended CONNECT (RFC 8441) in the shape of RFC 9298, its datagrams
//! in capsules (`capsule`):
//!
//! ```text
//! request  :method CONNECT  :protocol connect-udp  :scheme https
//!          :path /.well-known/masque/udp/<service>/<port>/   capsule-protocol: ?1
//!          meshfed-source: <caller SPIFFE ID>
//! ```
//!
//! The refusal codes are the QUIC transport's ([`Refusal::code`]); the status is only a
//! hint for HTTP tooling.

use std::net::SocketAddr;

use http::{HeaderValue, Method, StatusCode};
use meshfed_catalog::ServiceName;
use meshfed_identity::SpiffeId;

use meshfed_catalog::http_route::{
    SELECTOR_HEADER, SUBSET_NAME_HEADER, format_selector, parse_selector,
};

use crate::wire::{Open, Refusal, Response, WireError};

pub const SOURCE: &str = "meshfed-source";
pub const REFUSAL: &str = "meshfed-refusal";
/// RFC 9297 §3.4: the stream carries capsules.
pub const CAPSULE_PROTOCOL: &str = "capsule-protocol";
/// RFC 9298's extended CONNECT protocol.
pub const CONNECT_UDP: &str = "connect-udp";
const MASQUE_UDP: &str = "/.well-known/masque/udp/";
pub const MESSAGE: &str = "meshfed-message";
/// Longest refusal message sent (as on the QUIC wire).
const MESSAGE_MAX: usize = 1024;

/// The CONNECT request for `open`. `Err` only for a TCP open whose fields cannot be an
/// HTTP request (a source ID with characters a header may not carry).
pub fn request(open: &Open) -> Result<http::Request<()>, WireError> {
    let field = |field: &'static str| {
        move |e: http::Error| WireError::Field {
            field,
            reason: e.to_string(),
        }
    };
    let mut b = http::Request::builder().method(Method::CONNECT);
    b = match open.flow {
        None => b.uri(format!("{}:{}", open.service, open.port)),
        Some(_) => b
            .uri(format!(
                "https://{svc}:{port}{MASQUE_UDP}{svc}/{port}/",
                svc = open.service,
                port = open.port
            ))
            .extension(h2::ext::Protocol::from_static(CONNECT_UDP))
            .header(CAPSULE_PROTOCOL, "?1"),
    };
    b = b.header(SOURCE, open.source.as_str());
    if let Some(client) = open.client {
        b = b.header(http::header::FORWARDED, format!("for=\"{client}\""));
    }
    if let (Some(s), None) = (&open.selector, open.flow) {
        b = b.header(SELECTOR_HEADER, format_selector(s));
    }
    if let (Some(n), None) = (&open.subset, open.flow) {
        b = b.header(SUBSET_NAME_HEADER, n.as_str());
    }
    b.body(()).map_err(field("request"))
}

/// Decodes a CONNECT request into the open it asks for.
pub fn open(req: &http::request::Parts) -> Result<Open, WireError> {
    let bad = |field: &'static str, reason: String| WireError::Field { field, reason };
    if req.method != Method::CONNECT {
        return Err(bad("method", format!("{} (only CONNECT)", req.method)));
    }
    let (host, port, flow) = match req.extensions.get::<h2::ext::Protocol>() {
        None => {
            let authority = req
                .uri
                .authority()
                .ok_or_else(|| bad(":authority", "missing".into()))?;
            let port = authority
                .port_u16()
                .ok_or_else(|| bad(":authority", format!("{authority}: no port")))?;
            (authority.host().to_owned(), port, None)
        }
        Some(p) if p.as_str() == CONNECT_UDP => {
            let path = req.uri.path();
            let target = path
                .strip_prefix(MASQUE_UDP)
                .and_then(|t| t.strip_suffix('/'))
                .and_then(|t| t.split_once('/'))
                .ok_or_else(|| {
                    bad(
                        ":path",
                        format!("{path:?}: expected {MASQUE_UDP}<service>/<port>/"),
                    )
                })?;
            let port = target
                .1
                .parse()
                .map_err(|_| bad(":path", format!("{path:?}: bad port")))?;
            (target.0.to_owned(), port, Some(0))
        }
        Some(p) => {
            return Err(bad(
                ":protocol",
                format!("{:?} (only connect-udp)", p.as_str()),
            ));
        }
    };
    let service = ServiceName::parse(&host).map_err(|e| bad("service", format!("{host}: {e}")))?;
    let source = req
        .headers
        .get(SOURCE)
        .ok_or_else(|| bad(SOURCE, "missing".into()))?
        .to_str()
        .map_err(|e| bad(SOURCE, e.to_string()))?;
    let source = SpiffeId::new(source).map_err(|e| bad(SOURCE, e.to_string()))?;
    let client = match req.headers.get(http::header::FORWARDED) {
        None => None,
        Some(v) => Some(
            forwarded_for(v)
                .ok_or_else(|| bad("forwarded", format!("{v:?}: expected for=\"IP:port\"")))?,
        ),
    };
    let selector = match (req.headers.get(SELECTOR_HEADER), flow) {
        (Some(v), None) => Some(
            v.to_str()
                .map_err(|e| e.to_string())
                .and_then(parse_selector)
                .map_err(|e| bad(SELECTOR_HEADER, e))?,
        ),
        _ => None,
    };
    let subset = match (req.headers.get(SUBSET_NAME_HEADER), flow) {
        (Some(v), None) => {
            let n = v
                .to_str()
                .map_err(|e| bad(SUBSET_NAME_HEADER, e.to_string()))?;
            if !meshfed_catalog::names::is_dns_label(n) {
                return Err(bad(SUBSET_NAME_HEADER, format!("{n:?} is not a DNS label")));
            }
            Some(n.to_owned())
        }
        _ => None,
    };
    Ok(Open {
        service,
        port,
        source,
        flow,
        client,
        selector,
        subset,
    })
}

/// The accept of `open`: with its selector echoed, which tells the egress that this
/// gateway connected among the subset's endpoints (an older one ignores the header).
pub fn accept(open: &Open) -> http::Response<()> {
    let mut r = response(&Response::Accept);
    if let Some(s) = &open.selector
        && let Ok(v) = HeaderValue::from_str(&format_selector(s))
    {
        r.headers_mut().insert(SELECTOR_HEADER, v);
    }
    r
}

/// Whether an accept answers `open` in full: a selector it sent came back.
pub fn accepted_as_asked(open: &Open, accept: &http::response::Parts) -> bool {
    open.selector.is_none() || open.flow.is_some() || accept.headers.contains_key(SELECTOR_HEADER)
}

/// `for="IP:port"` (the form [`request`] writes) out of a Forwarded header.
fn forwarded_for(v: &HeaderValue) -> Option<SocketAddr> {
    let v = v.to_str().ok()?;
    v.split(';').find_map(|pair| {
        let (k, val) = pair.trim().split_once('=')?;
        if !k.eq_ignore_ascii_case("for") {
            return None;
        }
        val.trim_matches('"').parse().ok()
    })
}

/// The HTTP status a refusal is answered with (a hint; the code header is the answer).
pub fn status(reason: Refusal) -> StatusCode {
    match reason {
        Refusal::UnknownService => StatusCode::NOT_FOUND,
        Refusal::NotExportedToPeer | Refusal::Denied | Refusal::ForeignCaller => {
            StatusCode::FORBIDDEN
        }
        Refusal::MalformedHeader | Refusal::UnsupportedVersion => StatusCode::BAD_REQUEST,
        Refusal::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        Refusal::EndpointConnectFailed => StatusCode::BAD_GATEWAY,
        Refusal::FlowLimit => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The answer to a CONNECT request.
pub fn response(r: &Response) -> http::Response<()> {
    match r {
        Response::Accept => http::Response::builder()
            .status(StatusCode::OK)
            .body(())
            .expect("a status alone is a valid response"),
        Response::Refuse { reason, message } => {
            // A header value carries visible ASCII only: anything else becomes '?'.
            let msg: String = message
                .chars()
                .take(MESSAGE_MAX)
                .map(|c| {
                    if c == ' ' || c.is_ascii_graphic() {
                        c
                    } else {
                        '?'
                    }
                })
                .collect();
            http::Response::builder()
                .status(status(*reason))
                .header(REFUSAL, reason.code())
                .header(MESSAGE, msg)
                .body(())
                .expect("a status and visible-ASCII headers are a valid response")
        }
    }
}

/// Decodes the answer to a CONNECT request.
pub fn decode_response(r: &http::response::Parts) -> Result<Response, WireError> {
    if r.status == StatusCode::OK {
        return Ok(Response::Accept);
    }
    let code = r
        .headers
        .get(REFUSAL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u16>().ok())
        .ok_or_else(|| WireError::Field {
            field: "meshfed-refusal",
            reason: format!("HTTP {} without a refusal code", r.status),
        })?;
    let message = r
        .headers
        .get(MESSAGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Ok(Response::Refuse {
        reason: Refusal::from_code(code),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Open {
        Open {
            service: ServiceName::parse("echo.demo").unwrap(),
            port: 7000,
            source: SpiffeId::new("spiffe://east/ns/shop/sa/frontend").unwrap(),
            flow: None,
            client: None,
            selector: None,
            subset: None,
        }
    }

    /// The `hbone_open` fuzz target's seeds read as it reads them: each CONNECT seed
    /// decodes to an open, and the refusal seed to its code.
    #[test]
    fn the_fuzz_seeds_decode() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/hbone");
        let mut opens = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let text = std::fs::read_to_string(&p).unwrap();
            let mut lines = text.split('\n');
            let target = lines.next().unwrap();
            let headers: Vec<(&str, &str)> = lines.filter_map(|l| l.split_once(": ")).collect();
            if headers.iter().any(|(k, _)| *k == REFUSAL) {
                let mut r = http::Response::builder().status(503);
                for (k, v) in &headers {
                    r = r.header(*k, *v);
                }
                let (parts, ()) = r.body(()).unwrap().into_parts();
                let got = decode_response(&parts).unwrap();
                assert!(matches!(got, Response::Refuse { .. }), "{}", p.display());
                continue;
            }
            let mut r = http::Request::builder().method(Method::CONNECT);
            r = match target.strip_prefix("udp ") {
                Some(path) => r
                    .uri(format!("https://x{path}"))
                    .extension(h2::ext::Protocol::from_static(CONNECT_UDP)),
                None => r.uri(target),
            };
            for (k, v) in &headers {
                r = r.header(*k, *v);
            }
            let (parts, ()) = r.body(()).unwrap().into_parts();
            open(&parts).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            opens += 1;
        }
        assert!(opens >= 4, "{opens} seeds");
    }

    #[test]
    fn opens_round_trip() {
        for client in [
            None,
            Some("10.1.2.3:40000".parse().unwrap()),
            Some("[fd00::7]:5".parse().unwrap()),
        ] {
            let o = Open { client, ..base() };
            let (parts, ()) = request(&o).unwrap().into_parts();
            assert_eq!(parts.method, Method::CONNECT);
            assert_eq!(parts.uri.to_string(), "echo.demo:7000");
            assert_eq!(open(&parts).unwrap(), o);
        }
        // A UDP flow: connect-udp with the target in the path (the flow ID is the
        // stream's own, 0 on the wire).
        let o = Open {
            flow: Some(0),
            ..base()
        };
        let (parts, ()) = request(&o).unwrap().into_parts();
        assert_eq!(parts.uri.path(), "/.well-known/masque/udp/echo.demo/7000/");
        assert_eq!(parts.headers[CAPSULE_PROTOCOL], "?1");
        assert_eq!(open(&parts).unwrap(), o);
    }

    /// A TCP open's subset selector travels as `meshfed-subset` and comes back in the
    /// accept; an accept without it (an older ingress) is not the answer asked for.
    #[test]
    fn a_subset_selector_is_sent_and_echoed() {
        let o = Open {
            selector: Some([("version".into(), "v2".into())].into()),
            subset: Some("v2".into()),
            ..base()
        };
        let (parts, ()) = request(&o).unwrap().into_parts();
        assert_eq!(parts.headers[SELECTOR_HEADER], "version=v2");
        assert_eq!(parts.headers[SUBSET_NAME_HEADER], "v2");
        assert_eq!(open(&parts).unwrap(), o);
        let (accepted, ()) = accept(&o).into_parts();
        assert_eq!(accepted.status, StatusCode::OK);
        assert!(accepted_as_asked(&o, &accepted));
        let (plain, ()) = accept(&base()).into_parts();
        assert!(!plain.headers.contains_key(SELECTOR_HEADER));
        assert!(
            !accepted_as_asked(&o, &plain),
            "an older ingress ignored it"
        );
        assert!(accepted_as_asked(&base(), &plain));
        // A UDP flow carries none.
        let u = Open {
            flow: Some(0),
            ..o.clone()
        };
        let (parts, ()) = request(&u).unwrap().into_parts();
        assert!(!parts.headers.contains_key(SELECTOR_HEADER));
    }

    #[test]
    fn bad_requests_name_the_field() {
        let parts = |f: &dyn Fn(http::request::Builder) -> http::request::Builder| {
            f(http::Request::builder()).body(()).unwrap().into_parts().0
        };
        let ok = |b: http::request::Builder| {
            b.method(Method::CONNECT)
                .uri("echo.demo:7000")
                .header(SOURCE, "spiffe://east/ns/a/sa/b")
        };
        // (request, field named in the error)
        let rows: Vec<(http::request::Parts, &str)> = vec![
            (
                parts(&|b| ok(b).method(Method::GET).uri("http://echo.demo:7000/")),
                "method",
            ),
            (parts(&|b| ok(b).uri("echo.demo")), ":authority"),
            (parts(&|b| ok(b).uri("Echo_Demo!:7000")), "service"),
            (
                parts(&|b| b.method(Method::CONNECT).uri("echo.demo:7000")),
                SOURCE,
            ),
            (
                parts(&|b| {
                    b.method(Method::CONNECT)
                        .uri("echo.demo:7000")
                        .header(SOURCE, "https://not-spiffe")
                }),
                SOURCE,
            ),
            (
                parts(&|b| ok(b).header("forwarded", "for=unknown")),
                "forwarded",
            ),
            (
                parts(&|b| ok(b).header(SELECTOR_HEADER, "version")),
                SELECTOR_HEADER,
            ),
            (
                parts(&|b| ok(b).header(SELECTOR_HEADER, "a=1,a=2")),
                SELECTOR_HEADER,
            ),
            (
                parts(&|b| ok(b).header(SUBSET_NAME_HEADER, "Canary")),
                SUBSET_NAME_HEADER,
            ),
            (
                parts(&|b| {
                    ok(b)
                        .uri("https://x/.well-known/masque/udp/echo.demo/")
                        .extension(h2::ext::Protocol::from_static(CONNECT_UDP))
                }),
                ":path",
            ),
            (
                parts(&|b| {
                    ok(b)
                        .uri("https://x/.well-known/masque/udp/echo.demo/http/")
                        .extension(h2::ext::Protocol::from_static(CONNECT_UDP))
                }),
                ":path",
            ),
            (
                parts(&|b| {
                    ok(b)
                        .uri("https://x/")
                        .extension(h2::ext::Protocol::from_static("websocket"))
                }),
                ":protocol",
            ),
        ];
        for (p, field) in rows {
            match open(&p) {
                Err(WireError::Field { field: f, .. }) => assert_eq!(f, field, "{p:?}"),
                other => panic!("{p:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn answers_round_trip_with_their_stable_codes() {
        let rows = [
            Response::Accept,
            Response::Refuse {
                reason: Refusal::Denied,
                message: "spiffe://east/ns/batch/sa/r denied echo.demo:7000: by policy demo/deny"
                    .into(),
            },
            Response::Refuse {
                reason: Refusal::NoReadyEndpoint,
                message: String::new(),
            },
            Response::Refuse {
                reason: Refusal::Unknown(999),
                message: "from a newer peer".into(),
            },
        ];
        for r in rows {
            let (parts, ()) = response(&r).into_parts();
            assert_eq!(decode_response(&parts).unwrap(), r);
        }
        // A message that is not visible ASCII is carried, with '?' in its place.
        let (parts, ()) = response(&Response::Refuse {
            reason: Refusal::Denied,
            message: "naïve\r\ncaller".into(),
        })
        .into_parts();
        assert_eq!(parts.status, StatusCode::FORBIDDEN);
        assert_eq!(
            decode_response(&parts).unwrap(),
            Response::Refuse {
                reason: Refusal::Denied,
                message: "na?ve??caller".into()
            }
        );
        // An HTTP error from something that is not a meshfed gateway is malformed.
        let (parts, ()) = http::Response::builder()
            .status(502)
            .body(())
            .unwrap()
            .into_parts();
        assert!(decode_response(&parts).is_err());
    }
}
