//! The h2 transport's open request and its answer, as a peer sends them: a CONNECT's
//! authority or extended-CONNECT path and its headers. Decoding must never panic, and
//! whatever decodes must encode to a request that decodes to the same open.
//!
//! Input: the first line is the request target (`svc.ns:port` for CONNECT, or a path
//! after `udp ` for connect-udp), every further line a `name: value` header; the same
//! headers with a status from the first byte are also read as the answer.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshfed_gateway::hbone::headers;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if data.is_empty() {
        return;
    }
    let mut lines = text.split('\n');
    let target = lines.next().unwrap_or_default();
    let mut req = http::Request::builder().method(http::Method::CONNECT);
    req = match target.strip_prefix("udp ") {
        Some(path) => req
            .uri(format!("https://x{path}"))
            .extension(h2::ext::Protocol::from_static("connect-udp")),
        None => req.uri(target),
    };
    let mut resp = http::Response::builder().status(200 + u16::from(data[0] % 200) * 2);
    for line in lines {
        if let Some((k, v)) = line.split_once(": ") {
            req = req.header(k, v);
            resp = resp.header(k, v);
        }
    }
    if let Ok(r) = req.body(()) {
        let (parts, ()) = r.into_parts();
        if let Ok(open) = headers::open(&parts) {
            let again = headers::request(&open).expect("a decoded open encodes");
            let (parts, ()) = again.into_parts();
            assert_eq!(headers::open(&parts).as_ref(), Ok(&open));
            let accept = headers::accept(&open);
            let (accept, ()) = accept.into_parts();
            assert!(headers::accepted_as_asked(&open, &accept));
        }
    }
    if let Ok(r) = resp.body(()) {
        let (parts, ()) = r.into_parts();
        if let Ok(answer) = headers::decode_response(&parts) {
            let (again, ()) = headers::response(&answer).into_parts();
            let back = headers::decode_response(&again).expect("an answer encodes");
            // The message is cut and made visible ASCII on the way out; the code stays.
            match (&answer, &back) {
                (
                    meshfed_gateway::wire::Response::Refuse { reason: a, .. },
                    meshfed_gateway::wire::Response::Refuse { reason: b, .. },
                ) => assert_eq!(a.code(), b.code()),
                _ => assert_eq!(answer, back),
            }
        }
    }
});
