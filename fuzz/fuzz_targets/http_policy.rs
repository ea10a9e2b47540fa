//! HTTP routes as they arrive from another site (JSON in the federation's wire form):
//! refused with a field path or compiled, never a panic; a compiled policy routes any
//! request, its redirects and rewrites give valid strings (a regex rewrite within its
//! bound), its direct responses decode, its TCP routes decide any connection with a
//! destination in range, and the traffic settings it puts in force per port and subset
//! are valid ones.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshfed_catalog::http_route::{
    HttpPolicy, MAX_DIRECT_BODY, MAX_REWRITTEN_PATH, RequestView, TcpView, pick, redirect_location,
    rewrite_path,
};

struct Req<'a>(&'a str);

impl RequestView for Req<'_> {
    fn path(&self) -> &str {
        self.0
    }
    fn method(&self) -> &str {
        "GET"
    }
    fn header(&self, _: &str) -> Option<&str> {
        Some(self.0)
    }
    fn query(&self) -> Option<&str> {
        Some(self.0)
    }
    fn port(&self) -> Option<u16> {
        Some(80)
    }
    fn caller(&self) -> Option<&str> {
        Some("spiffe://td/ns/demo/sa/x")
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(p) = serde_json::from_slice::<HttpPolicy>(data) else {
        return;
    };
    let Ok(c) = p.compile() else {
        return;
    };
    let path = "/a/b?c=d";
    if let Some((route, prefix)) = c.route_and_prefix(&Req(path)) {
        if let Some(rw) = route.rewrite.as_ref().and_then(|r| r.uri.as_deref()) {
            let _ = rewrite_path(path, prefix, rw);
        }
        if let Some(rd) = &route.redirect {
            let _ = redirect_location(rd, "http", "web.demo:80", path, prefix);
        }
    }
    // Regex rewrites stay within their bound on a long path; direct responses decode.
    let long = format!("/{}?q=1", "ab/".repeat(2000));
    for i in 0..c.policy.routes.len() {
        if let Some(re) = c.uri_regex(i)
            && let Some(out) = re.apply(&long)
        {
            assert!(
                out.len() <= MAX_REWRITTEN_PATH + 4,
                "a rewrite past its bound"
            );
        }
        if let Some((status, body)) = c.direct_response(i) {
            assert!((200..=599).contains(&status) && body.len() <= MAX_DIRECT_BODY);
        }
    }
    // The traffic settings in force for every port named and every subset hold as a
    // compiled policy's own do, and any caller is decided.
    let policy = &c.policy;
    let ports = policy.port_settings.iter().map(|s| s.port).chain([80]);
    for port in ports {
        for subset in policy.subsets.iter().map(Some).chain([None]) {
            let t = policy.traffic(port, subset);
            assert_ne!(t.pool.max_requests, Some(0), "a breaker of 0 compiled");
        }
    }
    let _ = policy.routes_apply_to("spiffe://td/ns/demo/sa/x");
    for destination in ["10.1.2.3", "2001:db8::1"] {
        let view = TcpView {
            port: 80,
            destination: destination.parse().unwrap(),
            caller: "spiffe://td/ns/demo/sa/x",
            caller_labels: None,
        };
        if let Some((_, r)) = c.tcp_route(&view) {
            for roll in [0, u32::MAX / 3, u32::MAX] {
                assert!(pick(&r.destinations, roll) < r.destinations.len());
            }
        }
    }
});
