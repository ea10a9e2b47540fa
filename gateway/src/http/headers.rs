//! How a request's and a response's headers change at each gateway hop. Pure.
//!
//! - Hop-by-hop headers (RFC 9110 §7.6.1: `connection` and the fields it names,
//!   `keep-alive`, `proxy-connection`, `transfer-encoding`, `upgrade`, and `te` other
//!   than `trailers`, which gRPC needs) are not forwarded.
//! - A WebSocket handshake (RFC 6455 §4.1: an HTTP/1.1 `GET` with `Upgrade: websocket`
//!   and `Connection: Upgrade`) keeps those two from hop to hop, as Envoy's `websocket`
//!   upgrade does ([`websocket_upgrade`], [`keep_websocket_upgrade`]).
//! - The egress appends the client's address to `x-forwarded-for`.
//! - The ingress replaces `x-forwarded-client-cert` with the caller the egress vouched
//!   for (`URI=<SPIFFE ID>`, Envoy's format), so an endpoint can trust it, and strips
//!   `meshfed-*` headers from endpoint answers: only a gateway speaks for the tunnel.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, Scheme, Uri};
use meshfed_catalog::catalog::AppProtocol;
use meshfed_identity::SpiffeId;

const XFF: &str = "x-forwarded-for";
const XFCC: &str = "x-forwarded-client-cert";

/// Removes the hop-by-hop headers, keeping `te: trailers`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        h.remove(n);
    }
    let trailers = h
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    h.remove(header::TE);
    if trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Whether a request asks to become a WebSocket (RFC 6455 §4.1): HTTP/1.1, `GET`, an
/// `Upgrade` naming `websocket` and a `Connection` naming `upgrade` (both
/// case-insensitive, among other tokens). Any other upgrade (h2c has its own path) is
/// a plain request whose hop-by-hop headers stop at the hop.
pub fn websocket_upgrade(method: &http::Method, version: http::Version, h: &HeaderMap) -> bool {
    let names = |name: header::HeaderName, token: &str| {
        h.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    version == http::Version::HTTP_11
        && method == http::Method::GET
        && names(header::UPGRADE, "websocket")
        && names(header::CONNECTION, "upgrade")
}

/// Whether an h2 request opens a WebSocket (RFC 8441 §4, "extended CONNECT"): `CONNECT`
/// with `:protocol` `websocket`, which the egress accepts from h2 clients
/// (`SETTINGS_ENABLE_CONNECT_PROTOCOL`). Pure.
pub fn websocket_over_h2(
    method: &http::Method,
    version: http::Version,
    protocol: Option<&str>,
) -> bool {
    version == http::Version::HTTP_2
        && method == http::Method::CONNECT
        && protocol.is_some_and(|p| p.eq_ignore_ascii_case("websocket"))
}

/// An h2 WebSocket request ([`websocket_over_h2`]) as the HTTP/1.1 handshake the rest
/// of the path carries (RFC 6455 §4.1), as Envoy translates it: a `GET` asking for the
/// upgrade, with `nonce` (16 random bytes) as its `Sec-WebSocket-Key`, which an h2
/// request has none of (RFC 8441 §5). Its version, subprotocol and extension offers go
/// as they came. Pure.
pub fn websocket_h2_as_h1<B>(req: &mut http::Request<B>, nonce: [u8; 16]) {
    use base64::Engine as _;
    *req.method_mut() = http::Method::GET;
    let key = base64::engine::general_purpose::STANDARD.encode(nonce);
    if let Ok(v) = HeaderValue::from_str(&key) {
        req.headers_mut().insert(header::SEC_WEBSOCKET_KEY, v);
    }
    keep_websocket_upgrade(req.headers_mut());
}

/// The far side's `101` to [`websocket_h2_as_h1`]'s handshake, for the h2 client: a
/// `200` (RFC 8441 §5) without the HTTP/1.1 upgrade's own headers (its
/// `Sec-WebSocket-Accept` answers a key the client never sent) and without a length
/// (the stream carries the WebSocket's bytes). Pure.
pub fn websocket_answer_for_h2<B>(answer: &mut http::Response<B>) {
    *answer.status_mut() = http::StatusCode::OK;
    let h = answer.headers_mut();
    for n in [
        header::CONNECTION,
        header::UPGRADE,
        header::SEC_WEBSOCKET_ACCEPT,
        header::CONTENT_LENGTH,
    ] {
        h.remove(n);
    }
}

/// Sets the upgrade's own headers again, after [`strip_hop_by_hop`], on a WebSocket
/// handshake going to the next hop (or on its `101` going back).
pub fn keep_websocket_upgrade(h: &mut HeaderMap) {
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
}

/// Removes every `meshfed-*` header.
pub fn strip_meshfed(h: &mut HeaderMap) {
    let ours: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().starts_with("meshfed-"))
        .cloned()
        .collect();
    for k in ours {
        h.remove(k);
    }
}

fn append_xff(h: &mut HeaderMap, ip: IpAddr) {
    let v = match h.get(XFF).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => format!("{prev}, {ip}"),
        _ => ip.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&v) {
        h.insert(XFF, v);
    }
}

/// A client's request at the egress, before it enters the tunnel: hop-by-hop headers
/// and `meshfed-*` headers removed, the client appended to `x-forwarded-for`, and an
/// absolute URI (h2 needs `:scheme` and `:authority`; from `Host` for HTTP/1.1).
pub fn from_client(p: &mut Parts, client: SocketAddr, import: &str) {
    strip_hop_by_hop(&mut p.headers);
    strip_meshfed(&mut p.headers);
    append_xff(&mut p.headers, client.ip().to_canonical());
    let authority = p
        .uri
        .authority()
        .cloned()
        .or_else(|| {
            p.headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse::<Authority>().ok())
        })
        .or_else(|| import.parse::<Authority>().ok());
    let mut u = p.uri.clone().into_parts();
    u.scheme = Some(p.uri.scheme().cloned().unwrap_or(Scheme::HTTP));
    u.authority = authority;
    if u.path_and_query.is_none() {
        u.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = Uri::from_parts(u) {
        p.uri = uri;
    }
    // h2 carries the authority in the URI.
    p.headers.remove(header::HOST);
}

/// A request at the ingress, toward endpoint `ep`: the original authority stays in
/// `Host` with the endpoint in the URI (HTTP/1.1, whose pool is keyed by it), or in
/// `:authority` (h2, sent on the endpoint's own connection; the endpoint's address
/// when the request had none), and the caller and client are set.
pub fn to_endpoint(
    p: &mut Parts,
    ep: SocketAddr,
    app: AppProtocol,
    caller: &SpiffeId,
    client: Option<SocketAddr>,
) {
    strip_hop_by_hop(&mut p.headers);
    strip_meshfed(&mut p.headers);
    let authority = p.uri.authority().cloned().or_else(|| {
        p.headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<Authority>().ok())
    });
    if let Some(c) = client {
        append_xff(&mut p.headers, c.ip().to_canonical());
    }
    if let Ok(v) = HeaderValue::from_str(&format!("URI={caller}")) {
        p.headers.insert(XFCC, v);
    }
    let path = p
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let to = if app == AppProtocol::Http {
        // HTTP/1.1 to the endpoint: the client's authority as Host, the endpoint in the URI
        // for the pool's key.
        if let Some(a) = &authority
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            p.headers.insert(header::HOST, v);
        }
        p.version = http::Version::HTTP_11;
        ep.to_string()
    } else {
        p.headers.remove(header::HOST);
        p.version = http::Version::HTTP_2;
        authority.map_or_else(|| ep.to_string(), |a| a.to_string())
    };
    if let Ok(uri) = format!("http://{to}{path}").parse() {
        p.uri = uri;
    }
}

/// A route's header changes (Istio's `headers.request` or `.response`), in Envoy's
/// order: remove, set (replaces), add (appends). Names were checked when the policy
/// compiled; a name or value `http` still refuses is skipped.
pub fn apply_ops(h: &mut HeaderMap, ops: &meshfed_catalog::http_route::HeaderOps) {
    for name in &ops.remove {
        h.remove(name.as_str());
    }
    let pairs = |m: &'_ std::collections::BTreeMap<String, String>| {
        m.iter()
            .filter_map(|(k, v)| {
                Some((
                    HeaderName::from_bytes(k.as_bytes()).ok()?,
                    HeaderValue::from_str(v).ok()?,
                ))
            })
            .collect::<Vec<_>>()
    };
    for (k, v) in pairs(&ops.set) {
        h.insert(k, v);
    }
    for (k, v) in pairs(&ops.add) {
        h.append(k, v);
    }
}

/// A route's `rewrite` on an egress request (absolute URI, as `from_client` left it):
/// the path (the matched prefix, or all of it; or, with `uri_regex`, the rewrite's
/// compiled regex replacing its matches) and the authority. Unchanged when the result is
/// not a valid URI, or the path would grow past
/// [`meshfed_catalog::http_route::MAX_REWRITTEN_PATH`].
pub fn rewrite(
    p: &mut Parts,
    rw: &meshfed_catalog::http_route::Rewrite,
    matched_prefix: Option<&str>,
    uri_regex: Option<&meshfed_catalog::http_route::UriRegex>,
) {
    let mut u = p.uri.clone().into_parts();
    let pq = u.path_and_query.as_ref().map_or("/", |pq| pq.as_str());
    let new = match (&rw.uri, uri_regex) {
        (Some(uri), _) => Some(meshfed_catalog::http_route::rewrite_path(
            pq,
            matched_prefix,
            uri,
        )),
        (None, Some(re)) => match re.apply(pq) {
            Some(p) => Some(p),
            None => return,
        },
        (None, None) => None,
    };
    if let Some(new) = new {
        match new.parse() {
            Ok(pq) => u.path_and_query = Some(pq),
            Err(_) => return,
        }
    }
    if let Some(a) = &rw.authority {
        match a.parse::<Authority>() {
            Ok(a) => u.authority = Some(a),
            Err(_) => return,
        }
    }
    if let Ok(uri) = Uri::from_parts(u) {
        p.uri = uri;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn route_header_changes_remove_then_set_then_add() {
        use meshfed_catalog::http_route::HeaderOps;
        let mut h = HeaderMap::new();
        h.append("x-env", "dev".parse().unwrap());
        h.append("x-env", "test".parse().unwrap());
        h.insert("x-debug", "1".parse().unwrap());
        h.insert("x-trace", "a".parse().unwrap());
        let ops = HeaderOps {
            set: [("x-env".to_string(), "prod".to_string())].into(),
            add: [("x-trace".to_string(), "b".to_string())].into(),
            remove: vec!["x-debug".into(), "x-trace".into()],
        };
        apply_ops(&mut h, &ops);
        assert_eq!(h.get_all("x-env").iter().collect::<Vec<_>>(), ["prod"]);
        assert!(h.get("x-debug").is_none());
        // Removed first, then added: only the added value.
        assert_eq!(h.get_all("x-trace").iter().collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn rewrite_changes_the_path_and_authority_of_the_absolute_uri() {
        use meshfed_catalog::http_route::Rewrite;
        let req = |uri: &str| http::Request::get(uri).body(()).unwrap().into_parts().0;
        let mut p = req("http://web.demo:8080/v1/orders?id=3");
        let rw = Rewrite {
            uri: Some("/v2/".into()),
            authority: Some("web-v2.demo:8080".into()),
            uri_regex: None,
        };
        rewrite(&mut p, &rw, Some("/v1/"), None);
        assert_eq!(p.uri.to_string(), "http://web-v2.demo:8080/v2/orders?id=3");
        // A path that does not parse leaves the request as it was.
        let mut p = req("http://web.demo/a");
        let bad = Rewrite {
            uri: Some("/has space".into()),
            authority: None,
            uri_regex: None,
        };
        rewrite(&mut p, &bad, None, None);
        assert_eq!(p.uri.to_string(), "http://web.demo/a");
        // A regex rewrite: every match in the path.
        let re = meshfed_catalog::http_route::RegexRewrite {
            pattern: "one".into(),
            substitution: "two".into(),
        };
        let rw = Rewrite {
            uri: None,
            authority: None,
            uri_regex: Some(re.clone()),
        };
        let mut p = req("http://web.demo/one/x/one?q=one");
        rewrite(&mut p, &rw, None, Some(&re.compile("r").unwrap()));
        assert_eq!(p.uri.to_string(), "http://web.demo/two/x/two?q=one");
    }

    #[test]
    fn hop_by_hop_headers_stop_at_the_hop() {
        let mut p = parts(
            "/",
            &[
                ("connection", "keep-alive, x-private"),
                ("x-private", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "gzip, trailers"),
                ("transfer-encoding", "chunked"),
                ("upgrade", "h2c"),
                ("x-kept", "yes"),
            ],
        );
        strip_hop_by_hop(&mut p.headers);
        let mut names: Vec<&str> = p.headers.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["te", "x-kept"]);
        assert_eq!(p.headers["te"], "trailers");
        let mut p = parts("/", &[("te", "gzip")]);
        strip_hop_by_hop(&mut p.headers);
        assert!(p.headers.get("te").is_none());
    }

    #[test]
    fn a_websocket_handshake_is_an_http_1_1_get_asking_for_websocket() {
        let websocket_upgrade = |p: &Parts| websocket_upgrade(&p.method, p.version, &p.headers);
        let ws = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ];
        let p = parts("/chat", &ws);
        assert!(websocket_upgrade(&p));
        // Two Connection fields, the token in the second.
        let mut two = parts("/chat", &ws[1..]);
        two.headers
            .append("connection", "keep-alive".parse().unwrap());
        two.headers.append("connection", "upgrade".parse().unwrap());
        assert!(websocket_upgrade(&two));
        // Each missing piece, another method or version, another protocol.
        for drop in ["connection", "upgrade"] {
            let h: Vec<_> = ws.iter().copied().filter(|(k, _)| *k != drop).collect();
            assert!(!websocket_upgrade(&parts("/chat", &h)), "without {drop}");
        }
        let mut post = parts("/chat", &ws);
        post.method = http::Method::POST;
        assert!(!websocket_upgrade(&post));
        for v in [http::Version::HTTP_10, http::Version::HTTP_2] {
            let mut p = parts("/chat", &ws);
            p.version = v;
            assert!(!websocket_upgrade(&p), "{v:?}");
        }
        let mut h2c = ws;
        h2c[1] = ("upgrade", "h2c");
        assert!(!websocket_upgrade(&parts("/chat", &h2c)));
        let mut no_token = ws;
        no_token[0] = ("connection", "keep-alive, upgrades");
        assert!(!websocket_upgrade(&parts("/chat", &no_token)));
        // Stripped at the hop, set again for the next one; the handshake's own
        // headers are end to end.
        let mut p = parts("/chat", &ws);
        strip_hop_by_hop(&mut p.headers);
        assert!(!websocket_upgrade(&p));
        keep_websocket_upgrade(&mut p.headers);
        assert!(websocket_upgrade(&p));
        assert_eq!(p.headers["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(p.headers.get_all("connection").iter().count(), 1);
    }

    /// RFC 8441: an h2 `CONNECT` with `:protocol websocket` opens a WebSocket, and goes
    /// on as the HTTP/1.1 handshake an endpoint expects (which `websocket_upgrade`
    /// recognises once the version is set), whose `101` comes back as a `200`.
    #[test]
    fn an_h2_websocket_goes_on_as_an_http_1_1_handshake() {
        let h2 = http::Version::HTTP_2;
        let connect = http::Method::CONNECT;
        assert!(websocket_over_h2(&connect, h2, Some("websocket")));
        assert!(websocket_over_h2(&connect, h2, Some("WebSocket")));
        assert!(!websocket_over_h2(&connect, h2, Some("connect-udp")));
        assert!(!websocket_over_h2(&connect, h2, None));
        assert!(!websocket_over_h2(
            &http::Method::GET,
            h2,
            Some("websocket")
        ));
        let h11 = http::Version::HTTP_11;
        assert!(!websocket_over_h2(&connect, h11, Some("websocket")));

        let mut req = http::Request::builder()
            .method(connect)
            .version(h2)
            .uri("http://chat.demo/chat")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-protocol", "chat.v1")
            .header("sec-websocket-extensions", "permessage-deflate")
            .body(())
            .unwrap();
        websocket_h2_as_h1(&mut req, *b"the sample nonce");
        let (mut p, ()) = req.into_parts();
        p.version = h11;
        assert!(websocket_upgrade(&p.method, p.version, &p.headers));
        // RFC 6455 §1.3's own example nonce.
        assert_eq!(p.headers["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(p.headers["sec-websocket-protocol"], "chat.v1");
        assert_eq!(p.headers["sec-websocket-extensions"], "permessage-deflate");

        let mut answer = http::Response::builder()
            .status(101)
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
            .header("sec-websocket-protocol", "chat.v1")
            .header("content-length", "0")
            .body(())
            .unwrap();
        websocket_answer_for_h2(&mut answer);
        assert_eq!(answer.status(), 200);
        let names: Vec<&str> = answer.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["sec-websocket-protocol"]);
    }

    #[test]
    fn only_a_gateway_speaks_for_the_tunnel() {
        // An endpoint's (or a client's) meshfed-* header would make the egress believe a
        // POST was never sent, and send it again elsewhere.
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("meshfed-error", "no_ready_endpoint"),
            ("Meshfed-Refusal", "3"),
            ("x-meshfed", "kept"),
        ] {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_static(v),
            );
        }
        strip_meshfed(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-meshfed"]);
    }

    #[test]
    fn a_client_request_gets_an_absolute_uri_and_its_address() {
        let c: SocketAddr = "10.1.2.3:5555".parse().unwrap();
        // (uri, host, xff before) → (uri after, xff after)
        let rows = [
            (
                "/a?b=1",
                Some("shop.example:8080"),
                None,
                "http://shop.example:8080/a?b=1",
                "10.1.2.3",
            ),
            (
                "/",
                None,
                Some("192.0.2.1"),
                "http://echo.demo:7000/",
                "192.0.2.1, 10.1.2.3",
            ),
            (
                "http://x.test/p",
                Some("ignored"),
                None,
                "http://x.test/p",
                "10.1.2.3",
            ),
        ];
        for (uri, host, xff, want_uri, want_xff) in rows {
            let mut h = vec![("meshfed-error", "forged")];
            if let Some(host) = host {
                h.push(("host", host));
            }
            if let Some(x) = xff {
                h.push(("x-forwarded-for", x));
            }
            let mut p = parts(uri, &h);
            from_client(&mut p, c, "echo.demo:7000");
            assert_eq!(p.uri.to_string(), want_uri, "{uri}");
            assert_eq!(p.headers[XFF], want_xff, "{uri}");
            assert!(p.headers.get("host").is_none());
            assert!(p.headers.get("meshfed-error").is_none());
        }
    }

    #[test]
    fn the_endpoint_sees_the_vouched_caller_not_a_forged_one() {
        let caller = SpiffeId::new("spiffe://east.example.org/ns/shop/sa/web").unwrap();
        let ep: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let client: SocketAddr = "10.0.0.9:1".parse().unwrap();
        // HTTP/1.1: the endpoint in the URI, the authority in Host; h2: the authority
        // stays `:authority` (it was the endpoint's address).
        for (app, want_uri, want_host, want_version) in [
            (
                AppProtocol::Http,
                "http://127.0.0.1:9000/svc.Echo/Say",
                Some("shop.example"),
                http::Version::HTTP_11,
            ),
            (
                AppProtocol::Grpc,
                "http://shop.example/svc.Echo/Say",
                None,
                http::Version::HTTP_2,
            ),
        ] {
            let mut p = parts(
                "http://shop.example/svc.Echo/Say",
                &[("x-forwarded-client-cert", "URI=spiffe://evil/x")],
            );
            to_endpoint(&mut p, ep, app, &caller, Some(client));
            assert_eq!(p.uri.to_string(), want_uri);
            assert_eq!(
                p.headers[XFCC],
                "URI=spiffe://east.example.org/ns/shop/sa/web"
            );
            assert_eq!(p.headers[XFF], "10.0.0.9");
            assert_eq!(
                p.headers.get("host").map(|h| h.to_str().unwrap()),
                want_host
            );
            assert_eq!(p.version, want_version);
        }
    }
}
