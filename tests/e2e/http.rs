//! HTTP-family ports (`protocol: http | http2 | grpc`) between real gateways: requests
//! routed one by one through the tunnel on either transport, with `curl` (HTTP/1.1 and
//! h2 prior knowledge) and a hyper h2 client streaming a gRPC-shaped call with
//! trailers; retries at another site, under the retry budget.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::harness::*;

/// What an endpoint answers: `x-status: N` sets the status (default: the endpoint's
/// own), after `x-delay-ms: N`; `POST /stream` echoes the body frame by frame and ends with the trailers
/// `grpc-status: 0` and `x-seen: <bytes>`; anything else gets one line naming the
/// site, method, path, caller (`x-forwarded-client-cert`) and `x-forwarded-for`.
pub(crate) async fn http_endpoint(
    site: &'static str,
    status: u16,
) -> (SocketAddr, Arc<AtomicUsize>) {
    slow_http_endpoint(site, status, 0).await
}

/// [`http_endpoint`], answering every request `delay_ms` late.
async fn slow_http_endpoint(
    site: &'static str,
    status: u16,
    delay_ms: u64,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = listen();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    h.fetch_add(1, Ordering::Relaxed);
                    async move {
                        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                        answer(site, status, req).await
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

async fn answer(
    site: &'static str,
    status: u16,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Body>, std::convert::Infallible> {
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    if req.method() == hyper::Method::POST && req.uri().path() == "/stream" {
        // Echo each frame as it comes, then trailers: the shape of a gRPC stream.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(8);
        let mut body = req.into_body();
        tokio::spawn(async move {
            let mut seen = 0usize;
            while let Some(f) = body.frame().await {
                let Ok(f) = f else { return };
                if let Ok(d) = f.into_data() {
                    seen += d.len();
                    let _ = tx.send(Ok(Frame::data(d))).await;
                }
            }
            let mut t = hyper::HeaderMap::new();
            t.insert("grpc-status", "0".parse().unwrap());
            t.insert("x-seen", seen.to_string().parse().unwrap());
            let _ = tx.send(Ok(Frame::trailers(t))).await;
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut r = hyper::Response::new(StreamBody::new(stream).boxed());
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        return Ok(r);
    }
    if let Ok(ms) = h("x-delay-ms").parse::<u64>() {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = h("x-status").parse().unwrap_or(status);
    let line = format!(
        "site={site} method={} path={} query={} env={} debug={} xfcc={} xff={} tp={} host={}\n",
        req.method(),
        req.uri().path(),
        req.uri().query().unwrap_or("-"),
        h("x-env"),
        h("x-debug"),
        h("x-forwarded-client-cert"),
        h("x-forwarded-for"),
        h("traceparent"),
        req.uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_else(|| h("host")),
    );
    let mut r = hyper::Response::new(
        Full::new(Bytes::from(line))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    r.headers_mut()
        .insert("x-upstream", hyper::header::HeaderValue::from_static(site));
    Ok(r)
}

/// `curl` with `args` against `url`: (HTTP status, body, meshfed-error header).
fn curl(args: &[&str], url: &str) -> (u16, String, String) {
    let (status, _, body, error) = curl_head(args, url);
    (status, body, error)
}

/// [`curl`], with the response head too: (status, head, body, meshfed-error).
fn curl_head(args: &[&str], url: &str) -> (u16, String, String, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-D", "/dev/stderr", "-o", "-"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl runs");
    let head = String::from_utf8_lossy(&out.stderr).into_owned();
    let status = head
        .lines()
        .find(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let error = head
        .lines()
        .find_map(|l| l.strip_prefix("meshfed-error: "))
        .unwrap_or("")
        .trim()
        .to_owned();
    (
        status,
        head,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        error,
    )
}

/// A gRPC-shaped call over h2 prior knowledge: `chunks` request frames, each answered
/// as it is sent (a bidirectional stream), then the trailers.
async fn streaming_call(addr: SocketAddr, chunks: usize) -> (Vec<Bytes>, hyper::HeaderMap) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
    let req = hyper::Request::post(format!("http://grpc.demo:{}/stream", addr.port()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    for i in 0..chunks {
        let msg = Bytes::from(format!("message {i}"));
        tx.send(Ok(Frame::data(msg.clone()))).await.unwrap();
        // The answer to this message comes before the next is sent: streaming, not
        // buffered anywhere on the way.
        let f = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("an answer per message")
            .unwrap()
            .unwrap();
        let d = f.into_data().unwrap();
        assert_eq!(d, msg);
        got.push(d);
    }
    drop(tx);
    let mut trailers = hyper::HeaderMap::new();
    while let Some(f) = body.frame().await {
        if let Ok(t) = f.unwrap().into_trailers() {
            trailers = t;
        }
    }
    (got, trailers)
}

async fn requests_cross_sites_one_by_one(transport: &str) {
    use meshfed_lab::ConfigBuilder;
    let scratch = Scratch::new(&format!("http-{transport}"));
    let west = scratch.site("west", "west.example.org");
    let east = scratch.site("east", "east.example.org");
    let (web, web_hits) = http_endpoint("west", 200).await;
    let (grpc, _) = http_endpoint("west", 200).await;
    let wc = ConfigBuilder {
        reload_interval: Some(RELOAD),
        ..Default::default()
    }
    .export("web.demo", 8080, vec![web])
    .export("grpc.demo", 9090, vec![grpc])
    .export("down.demo", 8081, vec![closed_port()])
    .speaks("web.demo", 8080, "http")
    .speaks("grpc.demo", 9090, "grpc")
    .speaks("down.demo", 8081, "http")
    .peer(&east, None);
    let west_gw = Gw::start(&west, &wc).unwrap();
    let any: SocketAddr = ([127, 0, 0, 1], 0).into();
    let ec = ConfigBuilder {
        reload_interval: Some(RELOAD),
        transport: Some(format!("default: {transport}")),
        ..Default::default()
    }
    .peer(&west, Some(west_gw.quic))
    .import("web.demo", 8080, "west", any)
    .import("grpc.demo", 9090, "west", any)
    .import("down.demo", 8081, "west", any)
    .speaks("web.demo", 8080, "http")
    .speaks("grpc.demo", 9090, "grpc")
    .speaks("down.demo", 8081, "http");
    let east_gw = Gw::start(&east, &ec).unwrap();
    let web_in = east_gw.import("web.demo:8080");
    let east_id = east.id.to_string();

    // HTTP/1.1 and h2 prior knowledge, with a forged caller header that must not pass.
    for (proto, args) in [
        ("HTTP/1.1", vec!["--http1.1"]),
        ("h2", vec!["--http2-prior-knowledge"]),
    ] {
        let mut a = args.clone();
        a.extend([
            "-H",
            "x-forwarded-client-cert: URI=spiffe://evil.example.org/admin",
        ]);
        let (status, body, _) = curl(&a, &format!("http://{web_in}/orders?id=7"));
        assert_eq!(status, 200, "{proto}: {body}\n{}", east_gw.logs());
        assert!(
            body.starts_with("site=west method=GET path=/orders"),
            "{proto}: {body}"
        );
        assert!(
            body.contains(&format!("xfcc=URI={east_id} ")),
            "{proto}: {body}"
        );
        assert!(body.contains("xff=127.0.0.1 "), "{proto}: {body}");
    }
    // HTTP/1.1 `Upgrade: h2c` (curl's --http2 on an http:// URL, a client nobody here
    // wrote): 101, the request answered as h2 stream 1, the next one on the same
    // connection as h2 too. A request with a body is answered as HTTP/1.1 (a server may
    // ignore an upgrade).
    let out = std::process::Command::new("curl")
        .args(["-sS", "--http2", "--max-time", "10", "-D", "/dev/stderr"])
        .args([
            "-H",
            "x-forwarded-client-cert: URI=spiffe://evil.example.org/admin",
        ])
        .arg(format!("http://{web_in}/h2c/1"))
        .arg(format!("http://{web_in}/h2c/2"))
        .output()
        .unwrap();
    let (head, body) = (
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
    );
    let statuses: Vec<&str> = head.lines().filter(|l| l.starts_with("HTTP/")).collect();
    assert_eq!(
        statuses,
        [
            "HTTP/1.1 101 Switching Protocols",
            "HTTP/2 200 ",
            "HTTP/2 200 "
        ],
        "{head}{body}\n{}",
        east_gw.logs()
    );
    for i in [1, 2] {
        assert!(
            body.contains(&format!("site=west method=GET path=/h2c/{i}")),
            "{body}"
        );
    }
    assert!(body.contains(&format!("xfcc=URI={east_id} ")), "{body}");
    let (status, head, body, _) = curl_head(
        &["--http2", "-d", "posted"],
        &format!("http://{web_in}/h2c/post"),
    );
    assert_eq!(status, 200, "{head}{body}");
    assert!(
        !head.contains(" 101 "),
        "a request with a body was upgraded: {head}"
    );
    assert!(body.contains("method=POST path=/h2c/post"), "{body}");

    // Many requests on one client connection, each its own request at the far side.
    let before = web_hits.load(Ordering::Relaxed);
    let urls: Vec<String> = (0..20).map(|i| format!("http://{web_in}/r{i}")).collect();
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--http1.1", "--max-time", "10"])
        .args(&urls);
    let out = cmd.output().unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert_eq!(body.lines().count(), 20, "{body}");
    assert_eq!(web_hits.load(Ordering::Relaxed) - before, 20);
    // The requests so far went over the egress's h2 links, opened once and kept: the
    // ingress accepted at most one tunnel stream per link, not one per request.
    let streams = west_gw
        .metric(r#"meshfed_gateway_connections_total{direction="ingress"}"#)
        .await;
    assert!(
        (1.0..=meshfed_gateway::http::egress::LINKS as f64).contains(&streams),
        "{streams} tunnel streams for 25 requests"
    );
    // The endpoint's own status passes through untouched (not retried: 500).
    let (status, _, error) = curl(&["-H", "x-status: 500"], &format!("http://{web_in}/"));
    assert_eq!((status, error.as_str()), (500, ""));

    // A gRPC-shaped bidirectional stream: every message answered as it goes, trailers
    // at the end.
    let (got, trailers) = streaming_call(east_gw.import("grpc.demo:9090"), 5).await;
    assert_eq!(got.len(), 5);
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-seen"], "45");

    // An endpoint nobody listens on: a typed answer, not a reset.
    let (status, body, error) = curl(
        &[],
        &format!("http://{}/", east_gw.import("down.demo:8081")),
    );
    assert_eq!(status, 503, "{body}");
    assert_eq!(error, "endpoint_connect_failed", "{body}");
    // Requests were counted at both gateways.
    assert!(
        east_gw
            .metric(r#"meshfed_gateway_http_requests_total{direction="egress",class="2xx"}"#)
            .await
            >= 23.0
    );
    assert!(
        west_gw
            .metric(r#"meshfed_gateway_http_requests_total{direction="ingress",class="2xx"}"#)
            .await
            >= 23.0
    );
    assert!(
        east_gw
            .metric(r#"meshfed_gateway_http_requests_total{direction="egress",class="5xx"}"#)
            .await
            >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_cross_sites_one_by_one_on_quic() {
    requests_cross_sites_one_by_one("quic").await
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_cross_sites_one_by_one_on_h2() {
    requests_cross_sites_one_by_one("h2").await
}

/// `n` GETs on one HTTP/1.1 connection with `headers`: the statuses.
async fn gets(addr: SocketAddr, n: usize, headers: &[(&str, &str)]) -> Vec<u16> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut b = hyper::Request::get(format!("http://web.demo/{i}"));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(Bytes::new())).unwrap();
        send.ready().await.unwrap();
        let resp = send.send_request(req).await.unwrap();
        out.push(resp.status().as_u16());
        let _ = resp.into_body().collect().await;
    }
    out
}

/// Three federated sites: west and north export `web.demo` as HTTP, each in front of a
/// test endpoint answering `statuses` (west's, north's) by default; east imports it.
/// `before` runs once the sites joined and before any gateway starts (to register
/// routes). Gateways and the federation stop when the returned value drops.
struct HttpSites {
    _fed: crate::federation::Fed,
    _gws: (Gw, Gw),
    east_gw: Gw,
    west: meshfed_lab::SiteFiles,
    north: meshfed_lab::SiteFiles,
    import: SocketAddr,
    west_hits: Arc<AtomicUsize>,
    north_hits: Arc<AtomicUsize>,
    _scratch: Scratch,
}

async fn http_sites(
    name: &str,
    statuses: (u16, u16),
    north_delay_ms: u64,
    before: impl FnOnce(&meshfed_lab::SiteFiles),
) -> HttpSites {
    http_sites_at(name, statuses, north_delay_ms, [None; 3], before).await
}

impl HttpSites {
    /// Requests west's and north's endpoints have had so far.
    fn hits(&self) -> (usize, usize) {
        (
            self.west_hits.load(Ordering::Relaxed),
            self.north_hits.load(Ordering::Relaxed),
        )
    }

    /// Requests both endpoints have had so far.
    fn endpoint_hits(&self) -> usize {
        let (w, n) = self.hits();
        w + n
    }

    /// Sends `n` requests, each answered 200; how many reached west and north.
    async fn spread(&self, n: usize) -> (usize, usize) {
        let before = self.hits();
        let s = gets(self.import, n, &[]).await;
        assert!(s.iter().all(|c| *c == 200), "{s:?}");
        let after = self.hits();
        (after.0 - before.0, after.1 - before.1)
    }

    /// Registers `yaml` at west as `dr.yaml`, then sends 20 requests at a time until the
    /// counts per site (west, north) satisfy `applied`: `what` is in force at east.
    async fn register_until(
        &self,
        yaml: &str,
        what: &str,
        applied: impl Fn((usize, usize)) -> bool,
    ) {
        let out = register_yaml(&self.west, "dr.yaml", yaml);
        assert!(out.contains("routes:web.demo"), "{out}");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let before = self.hits();
            gets(self.import, 20, &[]).await;
            let after = self.hits();
            if applied((after.0 - before.0, after.1 - before.1)) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what} never applied\n{}",
                self.east_gw.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Registers `yaml` at west as `file`, then sends 20 requests at a time until their
    /// statuses satisfy `done`: `what` is in force at east.
    async fn register_until_statuses(
        &self,
        file: &str,
        yaml: &str,
        what: &str,
        done: impl Fn(&[u16]) -> bool,
    ) {
        let out = register_yaml(&self.west, file, yaml);
        assert!(out.contains("routes:web.demo"), "{out}");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let s = gets(self.import, 20, &[]).await;
            if done(&s) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what} never applied: {s:?}\n{}",
                self.east_gw.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until a request reached north (east knows both sites).
    async fn north_reached(&self) {
        let url = format!("http://{}/", self.import);
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while self.north_hits.load(Ordering::Relaxed) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "north never reached\n{}",
                self.east_gw.logs()
            );
            let _ = curl(&[], &url);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until east's import serves and its plan knows both sites' exports.
    async fn serving_through_both(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (status, _, _) = curl(&[], &format!("http://{}/", self.import));
            let plan = http_get(self.east_gw.admin, "/debug/imports")
                .await
                .unwrap_or_default();
            if status == 200 && plan.contains("north") && plan.contains("west") {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "import not serving: {status} {plan}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// [`http_sites`] with each site's `federation.locality` (east, west, north).
async fn http_sites_at(
    name: &str,
    statuses: (u16, u16),
    north_delay_ms: u64,
    localities: [Option<&str>; 3],
    before: impl FnOnce(&meshfed_lab::SiteFiles),
) -> HttpSites {
    http_sites_with(name, statuses, north_delay_ms, localities, |c| c, before).await
}

/// [`http_sites_at`], with east's configuration changed by `east`.
async fn http_sites_with(
    name: &str,
    statuses: (u16, u16),
    north_delay_ms: u64,
    localities: [Option<&str>; 3],
    east: impl FnOnce(meshfed_lab::ConfigBuilder) -> meshfed_lab::ConfigBuilder,
    before: impl FnOnce(&meshfed_lab::SiteFiles),
) -> HttpSites {
    let site = |c, _| c;
    http_sites_each(
        name,
        statuses,
        north_delay_ms,
        localities,
        (east, site),
        before,
    )
    .await
}

/// [`http_sites_with`], with west's (1) and north's (2) configurations changed by `site`.
async fn http_sites_each(
    name: &str,
    statuses: (u16, u16),
    north_delay_ms: u64,
    localities: [Option<&str>; 3],
    (east, site): (
        impl FnOnce(meshfed_lab::ConfigBuilder) -> meshfed_lab::ConfigBuilder,
        impl Fn(meshfed_lab::ConfigBuilder, usize) -> meshfed_lab::ConfigBuilder,
    ),
    before: impl FnOnce(&meshfed_lab::SiteFiles),
) -> HttpSites {
    use crate::federation::{Fed, fed_config, free_port, joined};
    let at = |c: meshfed_lab::ConfigBuilder, i: usize| meshfed_lab::ConfigBuilder {
        locality: localities[i].map(str::to_owned),
        ..c
    };
    let scratch = Scratch::new(name);
    let fed = Fed::start(&Fed::init(&scratch), 0);
    let [east_files, west, north] = joined(&scratch, &fed, ["east", "west", "north"]);
    let import_ip: std::net::IpAddr = [127, 0, 0, 2].into();
    let port = free_port(import_ip);
    let (west_ep, west_hits) = http_endpoint("west", statuses.0).await;
    let (north_ep, north_hits) = slow_http_endpoint("north", statuses.1, north_delay_ms).await;
    before(&west);
    let start = |s: &meshfed_lab::SiteFiles, ip, ep, i| {
        Gw::start(
            s,
            &site(at(fed_config(s, ip), i), i)
                .export("web.demo", port, vec![ep])
                .speaks("web.demo", port, "http"),
        )
        .unwrap()
    };
    let gws = (
        start(&west, [127, 0, 0, 3], west_ep, 1),
        start(&north, [127, 0, 0, 4], north_ep, 2),
    );
    let east_gw = Gw::start(
        &east_files,
        &east(at(fed_config(&east_files, [127, 0, 0, 2]), 0)),
    )
    .unwrap();
    HttpSites {
        _fed: fed,
        _gws: gws,
        east_gw,
        west,
        north,
        import: SocketAddr::new(import_ip, port),
        west_hits,
        north_hits,
        _scratch: scratch,
    }
}

/// Two sites export `web.demo` as HTTP; the one tried first (north: equal capacity,
/// ordered by name) answers 503. Idempotent requests are retried at west and never fail;
/// a POST was sent, so it is not; and when every site fails, the retry budget (20 % of
/// requests + 10/s over 10 s) caps the extra load.
#[tokio::test(flavor = "multi_thread")]
async fn a_503_is_retried_at_another_site_within_the_budget() {
    let HttpSites {
        east_gw,
        import,
        west_hits,
        north_hits,
        ..
    } = &http_sites("http-retry", (200, 503), 0, |_| {}).await;
    let (import, east_gw) = (*import, east_gw);
    let url = format!("http://{import}/");
    // East learns both sites, as HTTP, from the catalog.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while north_hits.load(Ordering::Relaxed) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "north never reached\n{}",
            east_gw.logs()
        );
        let _ = curl(&[], &url);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let statuses = gets(import, 50, &[]).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let retries = r#"meshfed_gateway_http_retries_total{reason="status"}"#;
    assert!(east_gw.metric(retries).await >= 50.0);
    let (status, body, _) = curl(&["-X", "POST", "-d", "x"], &url);
    assert_eq!(status, 503, "a POST that was sent is not retried: {body}");
    assert!(body.contains("site=north"), "{body}");

    // Every site fails: 300 requests, at most 2 retries each without a budget (900
    // attempts); the budget allows 0.2 × requests + 100 retries over its window.
    let requests_before = east_gw
        .metric(r#"meshfed_gateway_http_requests_total{direction="egress",class="2xx"}"#)
        .await
        + east_gw
            .metric(r#"meshfed_gateway_http_requests_total{direction="egress",class="5xx"}"#)
            .await;
    let hits_before = west_hits.load(Ordering::Relaxed) + north_hits.load(Ordering::Relaxed);
    let statuses = gets(import, 300, &[("x-status", "503")]).await;
    assert!(statuses.iter().all(|s| *s == 503));
    let attempts =
        west_hits.load(Ordering::Relaxed) + north_hits.load(Ordering::Relaxed) - hits_before;
    let total = requests_before as usize + 300;
    let cap = 300 + total / 5 + 100;
    eprintln!("300 failing requests made {attempts} attempts (budget cap {cap}, 900 without)");
    assert!(attempts > 300, "no retry at all: {attempts}");
    assert!(
        attempts <= cap,
        "{attempts} attempts for 300 requests: over the budget"
    );
}

/// Issue 17 §2: a route's `retryOn`, registered at one site, decides what every
/// importer retries. North (tried first: equal capacity, by name) answers 500, which the
/// default conditions (connect failures, resets, 502–504) leave to the client; with
/// `retryOn: 5xx` east retries it at west and no request fails; with `gateway-error`
/// the 500s reach the client again; a `backoff` spaces the retries. Before, `retryOn`
/// was warned about and ignored, and retries never waited.
#[tokio::test(flavor = "multi_thread")]
async fn retry_on_decides_what_every_importer_retries() {
    let sites = &http_sites("http-retry-on", (200, 500), 0, |_| {}).await;
    sites.north_reached().await;
    let statuses = gets(sites.import, 20, &[]).await;
    assert!(
        statuses.contains(&500),
        "the default retries no 500: {statuses:?}"
    );

    const VS: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: demo}
spec:
  hosts: [web.demo]
  http:
  - route:
    - destination: {host: web.demo}
    retries: {attempts: 2, retryOn: "RETRY_ON"}
"#;
    // Registers `on` and waits until 20 requests in a row see `done`.
    let until = |on: &'static str, done: fn(&[u16]) -> bool| {
        let what = format!("retryOn {on}");
        async move {
            let vs = VS.replace("RETRY_ON", on);
            sites
                .register_until_statuses("vs.yaml", &vs, &what, done)
                .await
        }
    };
    until("5xx", |s| s.iter().all(|c| *c == 200)).await;
    let statuses = gets(sites.import, 50, &[]).await;
    assert!(statuses.iter().all(|c| *c == 200), "{statuses:?}");
    let retried = r#"meshfed_gateway_http_retries_total{reason="status"}"#;
    assert!(sites.east_gw.metric(retried).await >= 50.0);
    // 502-504 only: the 500s are the answer again.
    until("gateway-error", |s| s.contains(&500)).await;
    // Istio 1.26's `backoff`, registered at west, sets the base of every importer's
    // jittered back-off: each request here is retried once (north, then west) after a
    // uniform wait below 400 ms, about 4 s over 20 requests (under 2 s: less than one
    // chance in 10,000). The default base is 25 ms.
    until("5xx\", backoff: \"400ms", |s| s.iter().all(|c| *c == 200)).await;
    let started = std::time::Instant::now();
    let statuses = gets(sites.import, 20, &[]).await;
    let took = started.elapsed();
    assert!(statuses.iter().all(|c| *c == 200), "{statuses:?}");
    assert!(
        took >= Duration::from_secs(2),
        "20 retried requests took {took:?}: the 400 ms back-off never applied"
    );
}

/// Istio 1.27's DestinationRule `retryBudget`, registered at west, replaces every
/// importer's default budget for the service with Envoy's, by retries in flight. North
/// (tried first) answers 503: by default east retries each at west; with `percent: 0,
/// minRetryConcurrency: 0` no retry may start and the 503s reach the client; with
/// `minRetryConcurrency: 1` one retry at a time may, and requests one after another
/// are all retried again. Before, `retryBudget` was warned about and ignored.
#[tokio::test(flavor = "multi_thread")]
async fn a_destination_rule_retry_budget_bounds_every_importers_retries() {
    let sites = &http_sites("http-retry-budget", (200, 503), 0, |_| {}).await;
    sites.north_reached().await;
    let statuses = gets(sites.import, 20, &[]).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    const DR: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web.demo
  trafficPolicy:
    retryBudget: {percent: 0, minRetryConcurrency: MIN}
"#;
    let until = |min: &str, done: fn(&[u16]) -> bool| {
        let (dr, what) = (
            DR.replace("MIN", min),
            format!("retryBudget with minRetryConcurrency {min}"),
        );
        async move {
            sites
                .register_until_statuses("dr.yaml", &dr, &what, done)
                .await
        }
    };
    // No room: every request, tried at north first (by name), answers its 503. (The
    // default budget would let every fifth through, and 10 a second.)
    until("0", |s| s.iter().all(|c| *c == 503)).await;
    // One retry at a time: requests one after another are each retried at west.
    until("1", |s| s.iter().all(|c| *c == 200)).await;
}

/// `n` GETs over `conns` HTTP/1.1 connections at once: the statuses, in no order.
async fn gets_parallel(
    addr: SocketAddr,
    n: usize,
    conns: usize,
    headers: &'static [(&'static str, &'static str)],
) -> Vec<u16> {
    let tasks: Vec<_> = (0..conns)
        .map(|i| {
            let share = n / conns + usize::from(i < n % conns);
            tokio::spawn(async move { gets(addr, share, headers).await })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.extend(t.await.unwrap());
    }
    out
}

const ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: demo}
spec:
  hosts: [web.demo]
  http:
  - name: canary-header
    match:
    - headers: {x-canary: {exact: "1"}}
    route:
    - destination: {host: web.demo, subset: canary}
  - name: split
    route:
    - destination: {host: web.demo, subset: stable}
      weight: STABLE
    - destination: {host: web.demo, subset: canary}
      weight: CANARY
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web.demo
  subsets:
  - name: stable
    labels: {topology.istio.io/cluster: west}
  - name: canary
    labels: {topology.istio.io/cluster: north}
"#;

fn register_routes(site: &meshfed_lab::SiteFiles, stable: u32) {
    let text = ROUTES
        .replace("STABLE", &stable.to_string())
        .replace("CANARY", &(100 - stable).to_string());
    let out = register_yaml(site, "routes.yaml", &text);
    assert!(out.contains("routes:web.demo"), "{out}");
}

/// Writes `text` to `name` in the site's directory and registers it there (`meshfed
/// register`); its output.
pub(crate) fn register_yaml(site: &meshfed_lab::SiteFiles, name: &str, text: &str) -> String {
    let file = site.dir.join(name);
    std::fs::write(&file, text).unwrap();
    let (code, out, err) = meshfed(&[
        "register",
        "-f",
        file.to_str().unwrap(),
        "--dir",
        site.dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    out
}

/// A VirtualService registered at one site (west) splits every importing site's
/// requests: 80/20 between a subset at west and one at north (subsets by
/// `topology.istio.io/cluster`), a header sends the canary only to north, and a new
/// split registered while requests flow shifts them without a failed request.
#[tokio::test(flavor = "multi_thread")]
async fn a_split_registered_at_one_site_routes_every_importer() {
    let sites = http_sites("http-split", (200, 200), 0, |west| {
        register_routes(west, 80)
    })
    .await;
    let HttpSites {
        east_gw,
        west,
        north,
        import,
        west_hits,
        north_hits,
        ..
    } = &sites;
    let import = *import;
    // East has both sites and the routes once a header-matched request reaches north.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let before = north_hits.load(Ordering::Relaxed);
        if tokio::net::TcpStream::connect(import).await.is_ok() {
            let s = gets(import, 10, &[("x-canary", "1")]).await;
            if s.iter().all(|s| *s == 200) && north_hits.load(Ordering::Relaxed) - before == 10 {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "routes never applied at east\n{}",
            east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The header: north only.
    let west_before = west_hits.load(Ordering::Relaxed);
    let s = gets(import, 200, &[("x-canary", "1")]).await;
    assert!(s.iter().all(|s| *s == 200));
    assert_eq!(
        west_hits.load(Ordering::Relaxed),
        west_before,
        "x-canary went to west"
    );

    // 10,000 requests: 20 % ± 2 points at north.
    let (w0, n0) = (
        west_hits.load(Ordering::Relaxed),
        north_hits.load(Ordering::Relaxed),
    );
    let s = gets_parallel(import, 10_000, 8, &[]).await;
    assert!(s.iter().all(|s| *s == 200));
    let (w, n) = (
        west_hits.load(Ordering::Relaxed) - w0,
        north_hits.load(Ordering::Relaxed) - n0,
    );
    assert_eq!(w + n, 10_000);
    let share = n as f64 / 100.0;
    eprintln!("80/20 split over 10000 requests: north {share:.2} %");
    assert!((18.0..=22.0).contains(&share), "north got {share} %");
    // Counted per route and answering site.
    let route = |site: &str| {
        format!(
            "meshfed_gateway_http_route_requests_total{{import=\"web.demo:{}\",route=\"split\",site=\"{site}\",class=\"2xx\"}}",
            import.port()
        )
    };
    assert!(east_gw.metric(&route("north")).await >= n as f64);
    assert!(east_gw.metric(&route("west")).await >= w as f64);

    // A new split while requests flow: none fails, and the traffic moves.
    let flowing = tokio::spawn(gets_parallel(import, 6_000, 4, &[]));
    tokio::time::sleep(Duration::from_millis(100)).await;
    register_routes(west, 50);
    let s = flowing.await.unwrap();
    assert!(
        s.iter().all(|s| *s == 200),
        "a request failed during the change"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (w0, n0) = (
            west_hits.load(Ordering::Relaxed),
            north_hits.load(Ordering::Relaxed),
        );
        let s = gets_parallel(import, 2_000, 4, &[]).await;
        assert!(s.iter().all(|s| *s == 200));
        let n = north_hits.load(Ordering::Relaxed) - n0;
        let w = west_hits.load(Ordering::Relaxed) - w0;
        let share = n as f64 * 100.0 / (n + w) as f64;
        if (45.0..=55.0).contains(&share) {
            eprintln!("after the change: north {share:.1} %");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new split never applied: north {share} %"
        );
    }

    // North publishes other routes for the same service (everything to west): a
    // conflict east counts, and the first site by name (north) wins.
    register_routes(north, 100);
    east_gw
        .wait_metric(
            "meshfed_gateway_route_conflicts",
            1.0,
            Duration::from_secs(15),
        )
        .await;
    assert!(east_gw.logs().contains("routing policy conflict"));
    // The federation's operator view names it too.
    let out = std::process::Command::new(BIN)
        .args(["status", "--json", "--dir"])
        .arg(&sites._fed.dir)
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let conflicts = doc["policy_conflicts"].as_array().unwrap();
    assert!(
        conflicts.len() == 1
            && conflicts[0].as_str().unwrap().contains("web.demo")
            && conflicts[0].as_str().unwrap().contains("north's apply"),
        "{doc:#}"
    );
    let n0 = north_hits.load(Ordering::Relaxed);
    let s = gets(import, 200, &[]).await;
    assert!(s.iter().all(|s| *s == 200));
    assert_eq!(
        north_hits.load(Ordering::Relaxed),
        n0,
        "north's routes (all to west) apply"
    );

    // Fault injection (north's routes apply): 100 ms delay for 50 %, 503 for 10 %.
    register_yaml(
        north,
        "faults.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: demo}\n\
         spec:\n  hosts: [web.demo]\n  http:\n  - fault:\n      delay: {fixedDelay: 100ms, percentage: {value: 50}}\n\
         \x20     abort: {httpStatus: 503, percentage: {value: 10}}\n    route:\n    - destination: {host: web.demo}\n",
    );
    // Applied once one request is aborted; then 2000 more are measured.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !timed_gets(import, 50, 10)
        .await
        .iter()
        .any(|(s, _)| *s == 503)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the faults never applied"
        );
    }
    let t = timed_gets(import, 2000, 50).await;
    let aborted = t.iter().filter(|(s, _)| *s == 503).count();
    let delayed = t
        .iter()
        .filter(|(_, d)| *d >= Duration::from_millis(100))
        .count();
    let (a, d) = (aborted as f64 / 20.0, delayed as f64 / 20.0);
    eprintln!("faults over 2000 requests: {a:.1} % aborted, {d:.1} % delayed 100 ms or more");
    assert!((7.0..=13.0).contains(&a), "{a} % aborted");
    assert!((45.0..=55.0).contains(&d), "{d} % delayed");
    assert!(t.iter().all(|(s, _)| *s == 200 || *s == 503));
}

/// `n` GETs over `conns` connections at once: (status, latency) of each.
async fn timed_gets(addr: SocketAddr, n: usize, conns: usize) -> Vec<(u16, Duration)> {
    let tasks: Vec<_> = (0..conns)
        .map(|i| {
            let share = n / conns + usize::from(i < n % conns);
            tokio::spawn(async move {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let mut out = Vec::new();
                for _ in 0..share {
                    let req = hyper::Request::get("http://web.demo/")
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    send.ready().await.unwrap();
                    let t = std::time::Instant::now();
                    let resp = send.send_request(req).await.unwrap();
                    let status = resp.status().as_u16();
                    let _ = resp.into_body().collect().await;
                    out.push((status, t.elapsed()));
                }
                out
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.extend(t.await.unwrap());
    }
    out
}

/// A real gRPC server and client (grpcio, from PyPI, in the test tools' venv) across two
/// sites on a `grpc` port, on both transports: a unary call with trailing metadata, a
/// status that is not OK with its details, and a bidirectional stream of 50 messages.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_calls_from_a_client_nobody_here_wrote_cross_sites() {
    use meshfed_lab::ConfigBuilder;
    use std::io::BufRead;
    let python = "/opt/meshfed-tools/bin/python";
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/grpc_peer.py");
    let mut server = std::process::Command::new(python)
        .args([script, "serve", "west"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("python with grpcio (deploy/setup-dev.sh)");
    let mut line = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().parse().expect("the gRPC server's port");
    let endpoint: SocketAddr = ([127, 0, 0, 1], port).into();
    for transport in ["quic", "h2"] {
        let scratch = Scratch::new(&format!("grpc-{transport}"));
        let west = scratch.site("west", "west.example.org");
        let east = scratch.site("east", "east.example.org");
        let west_gw = Gw::start(
            &west,
            &ConfigBuilder::default()
                .export("echo.grpc", 50051, vec![endpoint])
                .speaks("echo.grpc", 50051, "grpc")
                .peer(&east, None),
        )
        .unwrap();
        let east_gw = Gw::start(
            &east,
            &ConfigBuilder {
                transport: Some(format!("default: {transport}")),
                ..Default::default()
            }
            .peer(&west, Some(west_gw.quic))
            .import("echo.grpc", 50051, "west", ([127, 0, 0, 1], 0).into())
            .speaks("echo.grpc", 50051, "grpc"),
        )
        .unwrap();
        let import = east_gw.import("echo.grpc:50051");
        let out = std::process::Command::new(python)
            .args([script, "call", &import.to_string()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{transport}: {text}{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            east_gw.logs()
        );
        assert_eq!(
            text.lines().filter(|l| l.starts_with("ok ")).count(),
            4,
            "{text}"
        );
        // The calls were routed as requests at both gateways.
        let m = r#"meshfed_gateway_http_requests_total{direction="ingress",class="2xx"}"#;
        assert!(west_gw.metric(m).await >= 3.0, "{transport}");
    }
    let _ = server.kill();
    let _ = server.wait();
}

/// The WebSocket server of `tests/data/ws_peer.py` (`websockets`, from PyPI) for `site`:
/// the process (killed on drop) and its address.
pub(crate) struct WsServer(std::process::Child, pub SocketAddr);

impl WsServer {
    pub(crate) fn start(site: &str) -> Self {
        use std::io::BufRead;
        let mut server = std::process::Command::new(WS_PYTHON)
            .args([WS_PEER, "serve", site])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python with websockets (deploy/setup-dev.sh)");
        let mut line = String::new();
        std::io::BufReader::new(server.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().expect("the WebSocket server's port");
        Self(server, ([127, 0, 0, 1], port).into())
    }
}

impl Drop for WsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const WS_PYTHON: &str = "/opt/meshfed-tools/bin/python";
const WS_PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/ws_peer.py");

/// Runs `ws_peer.py` with `args` and parses the JSON line it prints.
fn ws_peer(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(WS_PYTHON)
        .arg(WS_PEER)
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ws_peer.py {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Before: a WebSocket handshake through an `http` import lost its `Upgrade` and
/// `Connection` headers at the egress (hop-by-hop), so the endpoint saw a plain GET and
/// answered 426: WebSockets, which Istio's HTTP ports carry by default, did not cross
/// sites at all. Now a real client and server (`websockets`, from PyPI) hold a
/// WebSocket across two sites on both transports: the handshake is routed as a request
/// (the endpoint sees the caller in `x-forwarded-client-cert`), the subprotocol and
/// permessage-deflate are negotiated end to end, text and binary messages up to 1 MiB
/// come back whole, a handshake the endpoint refuses gets its 403, and a WebSocket
/// that carries nothing for `http_idle_timeout` is closed.
#[tokio::test(flavor = "multi_thread")]
async fn websockets_from_a_client_nobody_here_wrote_cross_sites() {
    use meshfed_lab::ConfigBuilder;
    let server = WsServer::start("west");
    for transport in ["quic", "h2"] {
        let scratch = Scratch::new(&format!("ws-{transport}"));
        let west = scratch.site("west", "west.example.org");
        let east = scratch.site("east", "east.example.org");
        let west_gw = Gw::start(
            &west,
            &ConfigBuilder::default()
                .export("chat.demo", 8080, vec![server.1])
                .speaks("chat.demo", 8080, "http")
                .peer(&east, None),
        )
        .unwrap();
        let east_gw = Gw::start(
            &east,
            &ConfigBuilder {
                transport: Some(format!("default: {transport}")),
                http_idle_timeout: Some(Duration::from_secs(2)),
                ..Default::default()
            }
            .peer(&west, Some(west_gw.quic))
            .import("chat.demo", 8080, "west", ([127, 0, 0, 1], 0).into())
            .speaks("chat.demo", 8080, "http"),
        )
        .unwrap();
        let import = east_gw.import("chat.demo:8080");
        let got = tokio::task::spawn_blocking(move || {
            ws_peer(&["call", &format!("ws://{import}/chat"), "8"])
        })
        .await
        .unwrap();
        let ctx = format!("{transport}: {got}\n{}", east_gw.logs());
        assert_eq!(got["echoed"], 23, "{ctx}");
        assert_eq!(got["hello"]["site"], "west", "{ctx}");
        assert_eq!(got["hello"]["path"], "/chat", "{ctx}");
        let xfcc = got["hello"]["xfcc"].as_str().unwrap_or_default();
        assert!(xfcc.contains("spiffe://east.example.org"), "{ctx}");
        assert_eq!(got["subprotocol"], "chat.v1", "{ctx}");
        let ext = got["extensions"].as_str().unwrap_or_default();
        assert!(ext.contains("permessage-deflate"), "{ctx}");
        // Idle for the 2 s timeout: closed then, not before, not never.
        let closed = got["closed_after"].as_f64().unwrap_or(f64::NAN);
        assert!(
            (1.5..6.0).contains(&closed),
            "closed after {closed} s: {ctx}"
        );

        let refused = tokio::task::spawn_blocking(move || {
            ws_peer(&["refused", &format!("ws://{import}/forbidden")])
        })
        .await
        .unwrap();
        assert_eq!(
            refused["status"],
            403,
            "{transport}: {refused}\n{}",
            east_gw.logs()
        );
        // A plain GET is a plain request: the endpoint's own answer to it.
        assert_eq!(curl(&[], &format!("http://{import}/chat")).0, 426);
        let m = r#"meshfed_gateway_http_requests_total{direction="egress",class="1xx"}"#;
        assert!(east_gw.metric(m).await >= 1.0, "{transport}");
        let m = r#"meshfed_gateway_http_requests_total{direction="ingress",class="1xx"}"#;
        assert!(west_gw.metric(m).await >= 1.0, "{transport}");
    }
}

/// RFC 8441: an h2 client (PyPI `h2`, with `wsproto` for the frames) opens a WebSocket
/// with an extended CONNECT on its h2 connection to the import. Before, the egress
/// never enabled it (h2 clients had to open an HTTP/1.1 connection for each
/// WebSocket). Now it goes on as the HTTP/1.1 handshake the endpoint (PyPI
/// `websockets`) expects, the `101` comes back as a `200`, messages cross both ways
/// beside a plain request on the same connection, the close handshake completes, and
/// an extended CONNECT for another protocol is answered `501 unsupported_protocol`.
#[tokio::test(flavor = "multi_thread")]
async fn an_h2_client_opens_a_websocket_across_sites() {
    use meshfed_lab::ConfigBuilder;
    let server = WsServer::start("west");
    let scratch = Scratch::new("ws-h2");
    let west = scratch.site("west", "west.example.org");
    let east = scratch.site("east", "east.example.org");
    let west_gw = Gw::start(
        &west,
        &ConfigBuilder::default()
            .export("chat.demo", 8080, vec![server.1])
            .speaks("chat.demo", 8080, "http")
            .peer(&east, None),
    )
    .unwrap();
    let east_gw = Gw::start(
        &east,
        &ConfigBuilder::default()
            .peer(&west, Some(west_gw.quic))
            .import("chat.demo", 8080, "west", ([127, 0, 0, 1], 0).into())
            .speaks("chat.demo", 8080, "http"),
    )
    .unwrap();
    let import = east_gw.import("chat.demo:8080");
    let out = tokio::process::Command::new(WS_PYTHON)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/ws_h2_peer.py"
        ))
        .args([import.ip().to_string(), import.port().to_string()])
        .arg("/chat")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let ctx = format!(
        "{text}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        east_gw.logs()
    );
    assert!(out.status.success(), "{ctx}");
    let got: serde_json::Value = serde_json::from_str(text.trim()).expect(&ctx);
    assert_eq!(got["connect_protocol"], true, "{ctx}");
    assert_eq!(got["status"], 200, "{ctx}");
    assert_eq!(got["subprotocol"], "chat.v1", "{ctx}");
    assert_eq!(got["hello"]["site"], "west", "{ctx}");
    assert_eq!(got["hello"]["path"], "/chat", "{ctx}");
    let xfcc = got["hello"]["xfcc"].as_str().unwrap_or_default();
    assert!(xfcc.contains("spiffe://east.example.org"), "{ctx}");
    assert_eq!(got["echoed"], 22, "{ctx}");
    assert_eq!(got["close_code"], 1000, "{ctx}");
    // The endpoint's own answer to a plain GET.
    assert_eq!(got["plain_status"], 426, "{ctx}");
    assert_eq!(got["other"]["status"], 501, "{ctx}");
    assert_eq!(got["other"]["error"], "unsupported_protocol", "{ctx}");
}

/// West exports an HTTP endpoint as web.demo:8080 (`http`), east imports it with `east`
/// as the rest of its configuration; returns west's gateway and the scratch directory
/// (kept while the test runs; dropped in that order), and east's gateway.
async fn web_sites(name: &str, east: meshfed_lab::ConfigBuilder) -> ((Gw, Scratch), Gw) {
    let scratch = Scratch::new(name);
    let west = scratch.site("west", "west.example.org");
    let east_site = scratch.site("east", "east.example.org");
    let (web, _) = http_endpoint("west", 200).await;
    let west_gw = Gw::start(
        &west,
        &meshfed_lab::ConfigBuilder::default()
            .export("web.demo", 8080, vec![web])
            .speaks("web.demo", 8080, "http")
            .peer(&east_site, None),
    )
    .unwrap();
    let east_gw = Gw::start(
        &east_site,
        &east
            .peer(&west, Some(west_gw.quic))
            .import("web.demo", 8080, "west", ([127, 0, 0, 1], 0).into())
            .speaks("web.demo", 8080, "http"),
    )
    .unwrap();
    ((west_gw, scratch), east_gw)
}

/// An HTTP import attacked: garbage, a 1 MiB header and a client that never finishes
/// its headers (slowloris). Garbage and the oversized header are answered or cut at
/// once, the slow client is cut after the 10 s header timeout (hyper applies none
/// without a timer: before, it held its connection forever), and real requests are
/// served throughout.
#[tokio::test(flavor = "multi_thread")]
async fn an_http_import_cuts_garbage_and_slow_headers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_sites, east_gw) = web_sites("http-attack", meshfed_lab::ConfigBuilder::default()).await;
    let import = east_gw.import("web.demo:8080");
    let url = format!("http://{import}/");
    let ok = || assert_eq!(curl(&[], &url).0, 200, "{}", east_gw.logs());
    ok();

    // Garbage: an answer (400) or a close, at once.
    let mut c = tokio::net::TcpStream::connect(import).await.unwrap();
    c.write_all(&[0u8, 1, 2, 0xff, b'\r', b'\n', b'\r', b'\n'])
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .expect("garbage is answered or closed at once")
        .unwrap_or(0);
    assert!(
        n == 0 || buf.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    ok();

    // A header of 1 MiB: refused, not buffered.
    let mut c = tokio::net::TcpStream::connect(import).await.unwrap();
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let _ = c.write_all(big.as_bytes()).await;
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .expect("an oversized header is refused at once")
        .unwrap_or(0);
    assert!(
        n == 0 || buf.starts_with(b"HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    ok();

    // A client that connects and sends nothing at all: cut after the header timeout
    // too, not held for ever.
    let started = std::time::Instant::now();
    let mut mute = tokio::net::TcpStream::connect(import).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(20), mute.read(&mut buf))
        .await
        .expect("a client that sends nothing is never cut")
        .unwrap_or(0);
    assert!(
        n == 0 || buf.starts_with(b"HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(9), "cut after {took:?}");
    eprintln!("mute client cut after {took:?}");
    ok();

    // Slowloris: headers that never end are cut after the header timeout.
    let started = std::time::Instant::now();
    let mut slow = tokio::net::TcpStream::connect(import).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let cut = loop {
        tokio::select! {
            r = slow.read(&mut buf) => break r.map(|n| n == 0 || buf.starts_with(b"HTTP/1.1 408")).unwrap_or(true),
            _ = tick.tick() => {
                assert!(started.elapsed() < Duration::from_secs(20), "a slow client is never cut");
                // Trickle one more header line each second, as slowloris does.
                if slow.write_all(b"x-a: b\r\n").await.is_err() {
                    break true;
                }
                ok();
            }
        }
    };
    assert!(cut);
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(9), "cut after {took:?}");
    eprintln!("slow client cut after {took:?}");
    ok();
}

/// Before: an h2 client's connection to an HTTP import lived for ever once idle (the
/// gateway answers its pings), holding a descriptor and a client slot. Now a connection
/// that carries no request for `http_idle_timeout` gets a GOAWAY and is closed; one
/// that keeps carrying requests, or has one in flight, is not.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_h2_client_connection_is_closed_after_the_idle_timeout() {
    let east = meshfed_lab::ConfigBuilder {
        http_idle_timeout: Some(Duration::from_secs(2)),
        ..meshfed_lab::ConfigBuilder::default()
    };
    let (_sites, east_gw) = web_sites("http-idle", east).await;
    let import = east_gw.import("web.demo:8080");
    let h2 = || async move {
        let tcp = tokio::net::TcpStream::connect(import).await.unwrap();
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake::<_, http_body_util::Empty<Bytes>>(TokioIo::new(tcp))
            .await
            .unwrap();
        let ended = tokio::spawn(conn);
        (send, ended)
    };
    // A request answered after `delay_ms`.
    let get = |send: &mut hyper::client::conn::http2::SendRequest<_>, delay_ms: u64| {
        let req = hyper::Request::get("http://web.demo:8080/")
            .header("x-delay-ms", delay_ms.to_string())
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        send.send_request(req)
    };

    // Idle: closed between 2 s and a few seconds after its last answer.
    let (mut send, ended) = h2().await;
    assert_eq!(get(&mut send, 0).await.unwrap().status(), 200);
    let answered = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), ended)
        .await
        .expect("an idle connection is closed")
        .unwrap()
        .unwrap();
    let took = answered.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "closed {took:?} after its last answer"
    );

    // Busy: a request every 500 ms for 5 s, and one slower than the timeout, on one
    // connection that stays open throughout.
    let (mut send, ended) = h2().await;
    for _ in 0..10 {
        assert_eq!(get(&mut send, 0).await.unwrap().status(), 200);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(get(&mut send, 3500).await.unwrap().status(), 200);
    assert!(!ended.is_finished(), "a busy connection was closed");
    assert!(!send.is_closed());
}

/// A VirtualService's `exportTo` scopes its routes by the caller's namespace: east's
/// listener vouches for `ns/demo` callers, and a route that aborts every request with
/// 418 applies while the VirtualService is exported to `.` (its namespace, demo), and
/// not once it is exported to another namespace only (the service itself then answers).
#[tokio::test(flavor = "multi_thread")]
async fn export_to_applies_the_routes_to_callers_of_the_namespaces_named() {
    let sites = http_sites_with(
        "http-export-to",
        (200, 200),
        0,
        [None; 3],
        |c| meshfed_lab::ConfigBuilder {
            source_identity: Some("spiffe://east.example.org/ns/demo/sa/client".into()),
            ..c
        },
        |_| {},
    )
    .await;
    let vs = |export_to: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: demo}}\n\
             spec:\n  hosts: [web.demo]\n  exportTo: [{export_to}]\n  http:\n  - fault:\n      abort: {{httpStatus: 418, percentage: {{value: 100}}}}\n    \
             route:\n    - destination: {{host: web.demo}}\n"
        )
    };
    let url = format!("http://{}/", sites.import);
    let settle = |want: u16| {
        let url = url.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while curl(&[], &url).0 != want {
                assert!(
                    std::time::Instant::now() < deadline,
                    "never answered {want}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Settled: every request now.
            for _ in 0..20 {
                assert_eq!(curl(&[], &url).0, want);
            }
        }
    };
    let out = register_yaml(&sites.west, "vs.yaml", &vs("."));
    assert!(out.contains("routes:web.demo"), "{out}");
    settle(418).await;
    register_yaml(&sites.west, "vs.yaml", &vs("other"));
    settle(200).await;
    // Exported to every namespace again: the route applies.
    register_yaml(&sites.west, "vs.yaml", &vs("\"*\""));
    settle(418).await;
}

/// Istio's match conditions beyond the request line, registered at west and applied at
/// east's egress per request: `ignoreUriCase`, `withoutHeaders`, `authority`, `port`,
/// `sourceNamespace` (the caller's SPIFFE ID), a `{}` presence match and a pseudo-header;
/// and the conditions that keep a match from applying at meshfed's egress (another
/// namespace, other gateways, caller labels, another port, `https`). Each route answers
/// its own status (an abort), so curl shows which one matched.
#[tokio::test(flavor = "multi_thread")]
async fn match_conditions_beyond_the_request_line_pick_routes() {
    let sites = http_sites_with(
        "http-match-more",
        (200, 200),
        0,
        [None; 3],
        |c| meshfed_lab::ConfigBuilder {
            source_identity: Some("spiffe://east.example.org/ns/demo/sa/client".into()),
            ..c
        },
        |_| {},
    )
    .await;
    let port = sites.import.port();
    let abort = |name: &str, m: &str, status: u16| {
        format!(
            "  - name: {name}\n    match: [{m}]\n    fault: {{abort: {{httpStatus: {status}, percentage: {{value: 100}}}}}}\n    route: [{{destination: {{host: web.demo}}}}]\n"
        )
    };
    let vs = [
        // Never at meshfed's egress: each must be passed over.
        abort("other-namespace", "{sourceNamespace: shop}", 500),
        abort("ingress-only", "{gateways: [my-ingress]}", 501),
        abort("labelled-callers", "{sourceLabels: {app: web}}", 502),
        abort("other-port", "{port: 1}", 503),
        abort("over-tls", "{scheme: {exact: https}}", 504),
        // Applied.
        abort(
            "case",
            "{uri: {prefix: /API/}, ignoreUriCase: true, withoutHeaders: {x-stable: {}}}",
            451,
        ),
        abort("host", "{authority: {prefix: \"canary.\"}}", 421),
        abort(
            "namespace",
            "{sourceNamespace: demo, headers: {x-ns: {}}}",
            403,
        ),
        abort(
            "port",
            &format!("{{port: {port}, scheme: {{exact: http}}, headers: {{x-port: {{}}}}}}"),
            422,
        ),
        abort("method", "{headers: {\":method\": {exact: DELETE}}}", 405),
    ]
    .concat();
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: demo}}\n\
         spec:\n  hosts: [web.demo]\n  http:\n{vs}  - name: rest\n    route: [{{destination: {{host: web.demo}}}}]\n"
    );
    let out = register_yaml(&sites.west, "vs.yaml", &yaml);
    assert!(out.contains("routes:web.demo"), "{out}");
    // `meshfed validate` names the matches that never apply here.
    let file = sites.west.dir.join("vs.yaml");
    let (code, out, err) = meshfed(&["validate", "-f", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    for w in [
        "spec.http[1].match[0].gateways",
        "spec.http[2].match[0].sourceLabels",
    ] {
        assert!(
            format!("{out}{err}").contains(w),
            "a warning names {w}: {out}{err}"
        );
    }
    let url = |path: &str| format!("http://{}{path}", sites.import);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while curl(&[], &url("/api/x")).0 != 451 {
        assert!(
            std::time::Instant::now() < deadline,
            "the routes never applied\n{}",
            sites.east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (args, path, want, why) in [
        (&[][..], "/api/x", 451, "the prefix, case ignored"),
        (&["-H", "x-stable: 1"][..], "/api/x", 200, "withoutHeaders"),
        (
            &["-H", "x-stable;"][..],
            "/Api/x",
            200,
            "withoutHeaders {}: an empty header is there",
        ),
        (
            &["-H", "host: canary.web.demo"][..],
            "/x",
            421,
            "the authority",
        ),
        (
            &["-H", "host: web.demo"][..],
            "/x",
            200,
            "another authority",
        ),
        (&["-H", "x-ns: 1"][..], "/x", 403, "the caller's namespace"),
        (
            &["-H", "x-port: 1"][..],
            "/x",
            422,
            "the service port and scheme",
        ),
        (
            &["-X", "DELETE"][..],
            "/x",
            405,
            "the :method pseudo-header",
        ),
        (&[][..], "/x", 200, "none of the others"),
    ] {
        assert_eq!(curl(args, &url(path)).0, want, "{why}: {args:?} {path}");
    }
}

/// One connection to `addr`, one HTTP/1.1 request on it, read to the end: whether the
/// answer came (through a TCP import, which carries the bytes).
async fn one_connection(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut c) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    if c.write_all(b"GET / HTTP/1.1\r\nhost: db.demo\r\nconnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
    out.starts_with(b"HTTP/1.1 200")
}

/// `n` connections, `conns` at a time; how many were answered.
async fn connections(addr: SocketAddr, n: usize, conns: usize) -> usize {
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let (next, ok) = (next.clone(), ok.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    if one_connection(addr).await {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    ok.load(Ordering::Relaxed)
}

/// Istio `tcp` routes, registered at west, split every importer's TCP connections
/// (a plain TCP port: bytes, one decision per connection): 80/20 between a subset at
/// west and one at north over 2000 connections, then a route matched by port and
/// destination subnet sends all of them to north while a route for another caller
/// namespace is passed over. A VirtualService with only `tcp` routes was refused before
/// ("meshfed reads HTTP routes").
#[tokio::test(flavor = "multi_thread")]
async fn tcp_routes_split_connections_across_sites() {
    use crate::federation::{Fed, fed_config, free_port, joined};
    let scratch = Scratch::new("tcp-routes");
    let fed = Fed::start(&Fed::init(&scratch), 0);
    let [east, west, north] = joined(&scratch, &fed, ["east", "west", "north"]);
    let import_ip: std::net::IpAddr = [127, 0, 0, 2].into();
    let port = free_port(import_ip);
    let (west_ep, west_hits) = http_endpoint("west", 200).await;
    let (north_ep, north_hits) = http_endpoint("north", 200).await;
    // Another service, at north only, on a port of its own.
    let port2 = free_port(import_ip);
    let (v2_ep, v2_hits) = http_endpoint("north", 200).await;
    let vs = |tcp: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: db, namespace: demo}}\n\
             spec:\n  hosts: [db.demo]\n  tcp:\n{tcp}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: db, namespace: demo}}\n\
             spec:\n  host: db.demo\n  subsets:\n  - {{name: v1, labels: {{topology.istio.io/cluster: west}}}}\n\
             \x20 - {{name: v2, labels: {{topology.istio.io/cluster: north}}}}\n"
        )
    };
    let split = vs(
        "  - route:\n    - {destination: {host: db.demo, subset: v1}, weight: 80}\n    - {destination: {host: db.demo, subset: v2}, weight: 20}",
    );
    let out = register_yaml(&west, "db.yaml", &split);
    assert!(out.contains("routes:db.demo"), "{out}");
    let _gws = [
        Gw::start(
            &west,
            &fed_config(&west, [127, 0, 0, 3]).export("db.demo", port, vec![west_ep]),
        ),
        Gw::start(
            &north,
            &fed_config(&north, [127, 0, 0, 4])
                .export("db.demo", port, vec![north_ep])
                .export("db-v2.demo", port2, vec![v2_ep]),
        ),
    ]
    .map(Result::unwrap);
    let east_gw = Gw::start(&east, &fed_config(&east, [127, 0, 0, 2])).unwrap();
    let import = SocketAddr::new(import_ip, port);
    let hits = || {
        (
            west_hits.load(Ordering::Relaxed),
            north_hits.load(Ordering::Relaxed),
        )
    };
    // Both sites serve, and the routes are applied, once a connection reaches north.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while hits().1 == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "north never reached\n{}",
            east_gw.logs()
        );
        connections(import, 10, 2).await;
    }
    let plan = http_get(east_gw.admin, "/debug/imports").await.unwrap();
    assert!(plan.contains("tcp_routes"), "{plan}");
    let before = hits();
    assert_eq!(connections(import, 2000, 8).await, 2000);
    let (w, n) = (hits().0 - before.0, hits().1 - before.1);
    assert_eq!(w + n, 2000);
    let share = n as f64 / 20.0;
    eprintln!("80/20 TCP split over 2000 connections: north {share:.2} %");
    assert!((17.0..=23.0).contains(&share), "north got {share} %");
    // Counted by route and accepting site.
    let routed = |route: &str, site: &str| {
        format!(
            "meshfed_gateway_tcp_route_connections_total{{import=\"db.demo:{port}\",route=\"{route}\",site=\"{site}\"}}"
        )
    };
    assert!(east_gw.metric(&routed("#0", "north")).await >= n as f64);
    assert!(east_gw.metric(&routed("#0", "west")).await >= w as f64);

    // By port and destination subnet (the import's address), past a route for callers
    // of another namespace (east's connections come from its gateway: none).
    register_yaml(
        &west,
        "db.yaml",
        &vs(&format!(
            "  - match: [{{sourceNamespace: shop}}]\n    route: [{{destination: {{host: db.demo, subset: v1}}}}]\n\
             \x20 - match: [{{port: {port}, destinationSubnets: [127.0.0.0/24]}}]\n    route: [{{destination: {{host: db.demo, subset: v2}}}}]\n\
             \x20 - route: [{{destination: {{host: db.demo, subset: v1}}}}]"
        )),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let before = hits();
        assert_eq!(connections(import, 20, 4).await, 20);
        if hits().0 == before.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the match never applied\n{}",
            east_gw.logs()
        );
    }
    let before = hits();
    let counted = east_gw.metric(&routed("#1", "north")).await;
    assert_eq!(connections(import, 200, 8).await, 200);
    assert_eq!(hits().0, before.0, "a connection went to west");
    assert_eq!(
        east_gw.metric(&routed("#1", "north")).await - counted,
        200.0
    );

    // A destination of another service: db.demo's connections open through east's
    // import of db-v2.demo, on its port.
    register_yaml(
        &west,
        "db.yaml",
        &vs(&format!(
            "  - route: [{{destination: {{host: db-v2.demo, port: {{number: {port2}}}}}}}]"
        )),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while v2_hits.load(Ordering::Relaxed) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the other service never reached\n{}",
            east_gw.logs()
        );
        connections(import, 10, 2).await;
    }
    let (before, v2) = (hits(), v2_hits.load(Ordering::Relaxed));
    assert_eq!(connections(import, 100, 4).await, 100);
    assert_eq!(hits(), before, "a connection went to db.demo's endpoints");
    assert_eq!(v2_hits.load(Ordering::Relaxed) - v2, 100);
    drop(fed);
}

/// A TCP route's subset selects endpoints by their labels, as Istio's does, and a
/// subset may also name a label of the site (`federation.labels`), which every endpoint
/// there holds. West registers one ServiceEntry whose two endpoints (`version: v1` and
/// `v2`) sit behind the same site, with a TCP port and an HTTP port, in network `n1`:
/// - the TCP route to subset `v2` reaches v2 only, over QUIC (the open request names
///   the subset's labels, `meshfed/3`) and over h2 (the CONNECT's `meshfed-subset`);
/// - the HTTP route to the subset `topology.istio.io/network: n1` reaches both
///   endpoints (it was answered 503 `no_ready_endpoint`: no endpoint had that label);
/// - a TCP route to a subset no endpoint is in is refused and counted with no site.
///
/// Before, a TCP route's subset selected sites by their name and export labels only,
/// so the route to `v2` selected no site and every connection was refused.
#[tokio::test(flavor = "multi_thread")]
async fn tcp_route_subsets_select_endpoints_by_their_labels() {
    use crate::federation::{Fed, fed_config, free_port, joined};
    let scratch = Scratch::new("tcp-subsets");
    let fed = Fed::start(&Fed::init(&scratch), 0);
    let [east, west] = joined(&scratch, &fed, ["east", "west"]);
    let ip: std::net::IpAddr = [127, 0, 0, 2].into();
    let (tcp_port, http_port) = (free_port(ip), free_port(ip));
    let (v1, v1_hits) = http_endpoint("v1", 200).await;
    let (v2, v2_hits) = http_endpoint("v2", 200).await;
    let yaml = |tcp_subset: &str| {
        format!(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db, namespace: demo}}
spec:
  hosts: [db.demo.example]
  ports:
  - {{number: {tcp_port}, name: db, protocol: TCP}}
  - {{number: {http_port}, name: http, protocol: HTTP}}
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{db: {p1}, http: {p1}}}, labels: {{app: db, version: v1}}}}
  - {{address: 127.0.0.1, ports: {{db: {p2}, http: {p2}}}, labels: {{app: db, version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: db, namespace: demo}}
spec:
  host: db.demo.example
  subsets:
  - {{name: v2, labels: {{version: v2}}}}
  - {{name: v3, labels: {{version: v3}}}}
  - {{name: net, labels: {{topology.istio.io/network: n1}}}}
  - name: v2one
    labels: {{version: v2}}
    trafficPolicy: {{connectionPool: {{tcp: {{maxConnections: 1}}}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: db, namespace: demo}}
spec:
  hosts: [db.demo.example]
  http:
  - route: [{{destination: {{host: db.demo.example, subset: net}}}}]
  tcp:
  - route: [{{destination: {{host: db.demo.example, subset: {tcp_subset}}}}}]
"#,
            p1 = v1.port(),
            p2 = v2.port()
        )
    };
    let out = register_yaml(&west, "db.yaml", &yaml("v2"));
    assert!(out.contains("routes:db.demo"), "{out}");
    let west_gw = Gw::start(
        &west,
        &meshfed_lab::ConfigBuilder {
            labels: Some("{topology.istio.io/network: n1}".into()),
            ..fed_config(&west, [127, 0, 0, 3])
        },
    )
    .unwrap();
    let east_config = fed_config(&east, [127, 0, 0, 2]);
    let east_gw = Gw::start(&east, &east_config).unwrap();
    let tcp = SocketAddr::new(ip, tcp_port);
    let hits = || {
        (
            v1_hits.load(Ordering::Relaxed),
            v2_hits.load(Ordering::Relaxed),
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while connections(tcp, 4, 2).await < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "the TCP route never reached an endpoint\n{}",
            east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = hits();
    assert_eq!(connections(tcp, 200, 8).await, 200);
    assert_eq!(hits(), (before.0, before.1 + 200), "QUIC: v2 took them all");

    // The HTTP port's subset by the site's network label: both endpoints.
    let before = hits();
    let s = gets(SocketAddr::new(ip, http_port), 40, &[]).await;
    assert!(s.iter().all(|s| *s == 200), "{s:?}\n{}", east_gw.logs());
    let (d1, d2) = (hits().0 - before.0, hits().1 - before.1);
    assert_eq!(d1 + d2, 40);
    assert!(d1 > 0 && d2 > 0, "round-robin over both: {d1}/{d2}");

    // A subset no endpoint is in: refused at east, nothing reaches an endpoint.
    register_yaml(&west, "db.yaml", &yaml("v3"));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while connections(tcp, 2, 1).await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the v3 route never applied\n{}",
            east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = hits();
    assert_eq!(connections(tcp, 20, 4).await, 0);
    assert_eq!(hits(), before);
    // Counted by route, with no site.
    let line = |m: &str, has: &[&str]| -> f64 {
        m.lines()
            .find(|l| l.starts_with("meshfed_gateway_") && has.iter().all(|h| l.contains(h)))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let m = http_get(east_gw.admin, "/metrics").await.unwrap();
    let port_label = format!(":{tcp_port}\"");
    assert!(
        line(
            &m,
            &[
                "tcp_route_connections_total{",
                &port_label,
                "route=\"#0\"",
                "site=\"none\""
            ]
        ) >= 20.0,
        "{m}"
    );

    // A subset with a traffic policy of its own (`v2one`: tcp.maxConnections 1): the
    // open names it, and west holds its connections to one at a time, apart from the
    // service's (which has no limit).
    register_yaml(&west, "db.yaml", &yaml("v2one"));
    let v1_before = hits().0;
    one_slot(tcp, &west_gw, &east_gw).await;
    assert_eq!(hits().0, v1_before, "v2 only");

    // A peer cannot take v2one's pool for other endpoints: an open that names v2one
    // but selects v1's endpoints (or all of them) is not v2one's at west, and gets the
    // service's pool (no limit) while v2one's one slot is held; v2one's own open
    // overflows.
    // Held once it has been answered (its endpoint connection, and so the slot, is up:
    // 300 ms without a request was not always enough with the whole suite running).
    let mut held = tokio::net::TcpStream::connect(tcp).await.unwrap();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        held.write_all(b"GET / HTTP/1.1\r\nHost: db\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(10), held.read_exact(&mut buf))
            .await
            .expect("the held connection is answered")
            .unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
    }
    let bundle = meshfed_identity::BundleSet::read_bundle_file(&west.bundle, None).unwrap();
    let raw = crate::harness::quic_as(&east, &west, west_gw.quic, bundle)
        .await
        .unwrap();
    let open = |selector: Option<&str>| {
        meshfed_gateway::wire::Open {
            service: "db.demo".parse().unwrap(),
            port: tcp_port,
            source: east.id.clone(),
            flow: None,
            client: None,
            selector: selector.map(|v| [("version".to_owned(), v.to_owned())].into()),
            subset: Some("v2one".into()),
        }
        .encode()
    };
    for (selector, want) in [
        (Some("v2"), Err("overflow")),
        (Some("v1"), Ok(())),
        (None, Ok(())),
    ] {
        let (r, _send) = crate::tunnel::exchange(&raw, &open(selector)).await;
        let got = match r {
            Ok(meshfed_gateway::wire::Response::Accept) => Ok(()),
            Ok(meshfed_gateway::wire::Response::Refuse { reason, .. }) => Err(reason.as_str()),
            Err(e) => panic!("{selector:?}: {e}"),
        };
        assert_eq!(got, want, "an open naming v2one with selector {selector:?}");
    }
    drop(held);

    // Over h2: the subset travels as the CONNECT's header, and the ingress echoes it.
    register_yaml(&west, "db.yaml", &yaml("v2"));
    drop(east_gw);
    let east_gw = Gw::start(
        &east,
        &meshfed_lab::ConfigBuilder {
            transport: Some("default: h2".into()),
            ..east_config
        },
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while connections(tcp, 4, 2).await < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "h2: the TCP route never reached an endpoint\n{}",
            east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = hits();
    assert_eq!(connections(tcp, 100, 4).await, 100);
    assert_eq!(hits(), (before.0, before.1 + 100), "h2: v2 took them all");
    let m = http_get(east_gw.admin, "/metrics").await.unwrap();
    assert_eq!(
        line(
            &m,
            &["peer_link_transport{", "site=\"west\"", "transport=\"h2\""]
        ),
        1.0,
        "{m}"
    );
    // And the subset's name, as the CONNECT's header: v2one's pool applies over h2.
    register_yaml(&west, "db.yaml", &yaml("v2one"));
    let v1_before = hits().0;
    one_slot(tcp, &west_gw, &east_gw).await;
    assert_eq!(hits().0, v1_before, "h2: v2 only");
    drop(fed);
}

/// Once a route to subset v2one (`tcp.maxConnections: 1` of its own) applies at the
/// importing gateway, a connection to `tcp` holds its one slot at the exporting
/// gateway: five more are refused `overflow` there, and once it ends the slot comes
/// back.
async fn one_slot(tcp: SocketAddr, west_gw: &Gw, east_gw: &Gw) {
    // Applied: a connection is served, and none is while one is held.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let held = loop {
        if connections(tcp, 1, 1).await == 1 {
            let held = tokio::net::TcpStream::connect(tcp).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            if connections(tcp, 1, 1).await == 0 {
                break held;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the v2one route and its pool never applied\n{}",
            east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let overflow = r#"meshfed_gateway_refusals_total{direction="ingress",reason="overflow"}"#;
    let before = west_gw.metric(overflow).await;
    assert_eq!(connections(tcp, 5, 1).await, 0, "v2one's one slot is held");
    assert_eq!(west_gw.metric(overflow).await - before, 5.0);
    // Once the held connection ends, its slot comes back (the next connection may race
    // the release of the one before: a slot is held until both ends closed).
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while connections(tcp, 1, 1).await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `openssl s_client` to `addr` with `sni` (`None`: no SNI), verifying the server's
/// certificate for that name against `ca`, sending `ping`: what the server answered
/// (empty when the connection was refused or the TLS failed).
fn s_client(addr: SocketAddr, sni: Option<&str>, ca: &std::path::Path) -> String {
    use std::io::Write;
    let mut c = std::process::Command::new("timeout");
    c.args([
        "10",
        "openssl",
        "s_client",
        "-quiet",
        "-verify_return_error",
    ])
    .arg("-connect")
    .arg(addr.to_string())
    .arg("-CAfile")
    .arg(ca);
    match sni {
        Some(n) => c.args(["-servername", n, "-verify_hostname", n]),
        None => c.arg("-noservername"),
    };
    let mut child = c
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl s_client");
    let _ = child.stdin.take().unwrap().write_all(b"ping");
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Istio `tls` routes: a ServiceEntry with two hosts on a TLS port (passed through: the
/// TLS is the client's and the endpoints', verified end to end by `openssl s_client`
/// against the endpoints' CA), registered at west, served at west and north. Its
/// VirtualService has only `tls` routes (refused before: "meshfed reads HTTP and TCP
/// routes"): SNI a.db.example goes to west, b.db.example to north, another SNI or none
/// is refused at the importing egress, as at an Istio sidecar; each counted by route.
#[tokio::test(flavor = "multi_thread")]
async fn tls_routes_send_connections_by_their_sni() {
    use crate::federation::{Fed, fed_config, free_port, joined};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let scratch = Scratch::new("tls-routes");
    let fed = Fed::start(&Fed::init(&scratch), 0);
    let [east, west, north] = joined(&scratch, &fed, ["east", "west", "north"]);
    let certs = scratch.0.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    crate::legacy::tls_files(&certs, "*.db.example");
    let west_ep = crate::legacy::tls_echo_as(&certs, false, "west").await;
    let north_ep = crate::legacy::tls_echo_as(&certs, false, "north").await;
    let ip: std::net::IpAddr = [127, 0, 0, 2].into();
    let port = free_port(ip);
    let yaml = format!(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db, namespace: demo}}
spec:
  hosts: [a.db.example, b.db.example]
  ports: [{{number: {port}, name: tls, protocol: TLS}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{tls: {west_port}}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: db, namespace: demo}}
spec:
  hosts: [a.db.example, b.db.example]
  tls:
  - match: [{{sniHosts: [a.db.example]}}]
    route: [{{destination: {{host: a.db.example, subset: west}}}}]
  - match: [{{sniHosts: [b.db.example], sourceNamespace: reports}}]
    route: [{{destination: {{host: a.db.example, subset: west}}}}]
  - match: [{{sniHosts: [b.db.example]}}]
    route: [{{destination: {{host: b.db.example, subset: north}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: db, namespace: demo}}
spec:
  host: a.db.example
  subsets:
  - {{name: west, labels: {{topology.istio.io/cluster: west}}}}
  - {{name: north, labels: {{topology.istio.io/cluster: north}}}}
"#,
        west_port = west_ep.port()
    );
    let out = register_yaml(&west, "db.yaml", &yaml);
    assert!(out.contains("routes:db.demo"), "{out}");
    let _gws = [
        Gw::start(&west, &fed_config(&west, [127, 0, 0, 3])),
        Gw::start(
            &north,
            &fed_config(&north, [127, 0, 0, 4])
                .export("db.demo", port, vec![north_ep])
                .speaks("db.demo", port, "tls"),
        ),
    ]
    .map(Result::unwrap);
    let east_gw = Gw::start(&east, &fed_config(&east, [127, 0, 0, 2])).unwrap();
    let import = SocketAddr::new(ip, port);
    let ca = certs.join("ca.pem");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (a, b) = (
            s_client(import, Some("a.db.example"), &ca),
            s_client(import, Some("b.db.example"), &ca),
        );
        if a == "west:ping" && b == "north:ping" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the TLS routes never applied: {a:?} {b:?}\n{}",
            east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for _ in 0..8 {
        assert_eq!(s_client(import, Some("a.db.example"), &ca), "west:ping");
        assert_eq!(s_client(import, Some("b.db.example"), &ca), "north:ping");
    }
    // Another SNI, and none: no TLS route matches, so no site is tried.
    assert_eq!(s_client(import, Some("c.db.example"), &ca), "");
    assert_eq!(s_client(import, None, &ca), "");
    let m = http_get(east_gw.admin, "/metrics").await.unwrap();
    let count = |route: &str, site: &str| -> f64 {
        let want = format!("route=\"{route}\",site=\"{site}\"");
        m.lines()
            .find(|l| {
                l.starts_with("meshfed_gateway_tcp_route_connections_total{") && l.contains(&want)
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(count("tls#0", "west") >= 9.0, "{m}");
    assert!(count("tls#2", "north") >= 9.0, "{m}");
    assert_eq!(count("tls#1", "west"), 0.0, "not a caller of reports");
    assert_eq!(count("tls", "none"), 2.0, "{m}");
    drop(fed);
}

/// A DestinationRule's `connectionPool.http.http2MaxRequests: 4` for the service's port
/// (`portLevelSettings`, under a destination-wide 1000), registered at west: of 20 slow
/// requests at once, 4 are served and the rest are answered 503 `overflow` at once
/// (never queued); once they finish, requests pass again. Then a subset's own
/// `trafficPolicy` breaker (2, for the canary subset at north) bounds that subset's
/// requests while the stable subset's pass.
#[tokio::test(flavor = "multi_thread")]
async fn the_circuit_breaker_answers_overflow_at_once_and_recovers() {
    let sites = http_sites("http-breaker", (200, 200), 0, |_| {}).await;
    register_yaml(
        &sites.west,
        "pool.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: demo}}\n\
             spec:\n  host: web.demo\n  trafficPolicy:\n    connectionPool:\n      http: {{http2MaxRequests: 1000}}\n    \
             portLevelSettings:\n    - port: {{number: {}}}\n      connectionPool:\n        http: {{http2MaxRequests: 4}}\n",
            sites.import.port()
        ),
    );
    let url = format!("http://{}/", sites.import);
    // Applied once 8 requests at once see an overflow.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let url = url.clone();
                tokio::task::spawn_blocking(move || curl(&["-H", "x-delay-ms: 300"], &url))
            })
            .collect();
        let mut over = false;
        for t in tasks {
            over |= t.await.unwrap().2 == "overflow";
        }
        if over {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the breaker never applied\n{}",
            sites.east_gw.logs()
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = sites
        .east_gw
        .metric("meshfed_gateway_http_overflows_total{direction=\"egress\"}")
        .await;
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let url = url.clone();
            tokio::task::spawn_blocking(move || {
                let t = std::time::Instant::now();
                let r = curl(&["-H", "x-delay-ms: 1000"], &url);
                (r, t.elapsed())
            })
        })
        .collect();
    let mut served = 0;
    let mut overflowed = 0;
    for t in tasks {
        let ((status, body, error), took) = t.await.unwrap();
        match (status, error.as_str()) {
            (200, "") => served += 1,
            (503, "overflow") => {
                overflowed += 1;
                assert!(
                    took < Duration::from_millis(900),
                    "an overflow waited {took:?}"
                );
            }
            other => panic!("{other:?}: {body}"),
        }
    }
    eprintln!("20 slow requests at once: {served} served, {overflowed} overflowed");
    assert_eq!(served + overflowed, 20);
    assert!(
        (4..=8).contains(&served),
        "{served} served past a limit of 4"
    );
    let after = sites
        .east_gw
        .metric("meshfed_gateway_http_overflows_total{direction=\"egress\"}")
        .await;
    assert_eq!(after - before, overflowed as f64);
    // Recovered: one at a time, all pass.
    for _ in 0..10 {
        assert_eq!(curl(&[], &url).0, 200);
    }

    // A subset's own breaker: the canary subset (north) allows 2 in flight under the
    // destination's 1000 (no port settings now). 10 slow canary requests: 2 served, the
    // rest overflow at once; 6 slow stable requests beside them all pass.
    let routes = ROUTES
        .replace("STABLE", "100")
        .replace("CANARY", "0")
        .replace(
            "  host: web.demo\n  subsets:\n",
            "  host: web.demo\n  trafficPolicy:\n    connectionPool:\n      http: {http2MaxRequests: 1000}\n  subsets:\n",
        )
        .replace(
            "    labels: {topology.istio.io/cluster: north}\n",
            "    labels: {topology.istio.io/cluster: north}\n    trafficPolicy:\n      connectionPool:\n        http: {http2MaxRequests: 2}\n",
        );
    let out = register_yaml(&sites.west, "pool.yaml", &routes);
    assert!(out.contains("routes:web.demo"), "{out}");
    let burst = |canary: usize, stable: usize| {
        let mut tasks = Vec::new();
        for i in 0..canary + stable {
            let url = url.clone();
            tasks.push(tokio::task::spawn_blocking(move || {
                let t = std::time::Instant::now();
                let args: &[&str] = if i < canary {
                    &["-H", "x-delay-ms: 1000", "-H", "x-canary: 1"]
                } else {
                    &["-H", "x-delay-ms: 1000"]
                };
                (i < canary, curl(args, &url), t.elapsed())
            }));
        }
        tasks
    };
    // Applied once a burst of canary requests sees an overflow.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let mut over = false;
        for t in burst(6, 0) {
            over |= t.await.unwrap().1.2 == "overflow";
        }
        if over {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the subset's breaker never applied\n{}",
            sites.east_gw.logs()
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut canary_served, mut canary_over, mut stable_served) = (0, 0, 0);
    for t in burst(10, 6) {
        let (canary, (status, body, error), took) = t.await.unwrap();
        match (canary, status, error.as_str()) {
            (true, 200, "") => canary_served += 1,
            (true, 503, "overflow") => {
                canary_over += 1;
                assert!(body.contains("subset canary"), "{body}");
                assert!(
                    took < Duration::from_millis(900),
                    "an overflow waited {took:?}"
                );
            }
            (false, 200, "") => stable_served += 1,
            other => panic!("{other:?}: {body}"),
        }
    }
    eprintln!(
        "subset breaker: canary {canary_served} served, {canary_over} overflowed; stable {stable_served} of 6 served"
    );
    assert!(
        (2..=4).contains(&canary_served) && canary_served + canary_over == 10,
        "{canary_served} canary requests served past a limit of 2"
    );
    assert_eq!(
        stable_served, 6,
        "the canary's limit reached the stable subset"
    );

    // The subset's pool at the exporting gateway: north's canary allows 1 connection to
    // its endpoint and 1 request waiting; of 4 slow canary requests at once, 2 are
    // served and 2 answered 503 overflow by north (the egress retries them at the only
    // canary site, where they overflow again); 4 stable requests beside them pass.
    let routes = routes.replace(
        "        http: {http2MaxRequests: 2}\n",
        "        tcp: {maxConnections: 1}\n        http: {http1MaxPendingRequests: 1}\n",
    );
    let out = register_yaml(&sites.west, "pool.yaml", &routes);
    assert!(out.contains("routes:web.demo"), "{out}");
    register_yaml(&sites.north, "pool.yaml", &routes);
    let north = &sites._gws.1;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while north
        .metric("meshfed_gateway_http_overflows_total{direction=\"ingress\"}")
        .await
        == 0.0
    {
        for t in burst(4, 0) {
            t.await.unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "north's subset pool never applied\n{}",
            north.logs()
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut served, mut over, mut stable) = (0, 0, 0);
    for t in burst(4, 4) {
        let (canary, (status, body, error), _) = t.await.unwrap();
        match (canary, status, error.as_str()) {
            (true, 200, "") => served += 1,
            (true, 503, "overflow") => {
                over += 1;
                assert!(body.contains("connectionPool"), "{body}");
            }
            (false, 200, "") => stable += 1,
            other => panic!("{other:?}: {body}"),
        }
    }
    eprintln!(
        "subset pool at north: canary {served} served, {over} overflowed; stable {stable} of 4"
    );
    assert!(
        (2..=3).contains(&served) && served + over == 4,
        "{served} canary requests served past 1 connection and 1 waiting"
    );
    assert_eq!(stable, 4, "the canary's pool reached the stable subset");
}

/// A mirror at north (answering 300 ms late) beside a route to west: north receives a
/// copy of each request (at most 256 in flight: a copy past that is dropped and counted,
/// never queued), and the primary's p99 stays far below the mirror's delay (the copy is
/// never waited for).
#[tokio::test(flavor = "multi_thread")]
async fn a_mirror_gets_copies_and_its_slowness_never_reaches_the_caller() {
    let sites = http_sites("http-mirror", (200, 200), 300, |west| {
        register_yaml(
            west,
            "mirror.yaml",
            &ROUTES
                .replace("weight: STABLE", "weight: 100")
                .replace(
                    "    - destination: {host: web.demo, subset: canary}\n      weight: CANARY\n",
                    "    mirror: {host: web.demo, subset: canary}\n    mirrorPercentage: {value: 100}\n",
                ),
        );
    })
    .await;
    // Applied once north sees a copy of a request that west answered.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while sites.north_hits.load(Ordering::Relaxed) == 0 {
        let _ = curl(&[], &format!("http://{}/", sites.import));
        assert!(
            std::time::Instant::now() < deadline,
            "no copy reached north\n{}",
            sites.east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (w0, n0) = (
        sites.west_hits.load(Ordering::Relaxed),
        sites.north_hits.load(Ordering::Relaxed),
    );
    let mut t = timed_gets(sites.import, 400, 8).await;
    assert!(t.iter().all(|(s, _)| *s == 200));
    t.sort_by_key(|(_, d)| *d);
    let p99 = t[t.len() * 99 / 100].1;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (w, n) = (
        sites.west_hits.load(Ordering::Relaxed) - w0,
        sites.north_hits.load(Ordering::Relaxed) - n0,
    );
    let m = |r: &str| format!("meshfed_gateway_http_mirrors_total{{result=\"{r}\"}}");
    let dropped = sites.east_gw.metric(&m("dropped")).await;
    eprintln!(
        "400 requests: west answered {w}, north got {n} copies ({dropped} dropped); primary p99 {p99:?} beside a 300 ms mirror"
    );
    assert_eq!(w, 400, "every request answered by west");
    assert_eq!(
        n as f64 + dropped,
        400.0,
        "every copy reached north or was counted as dropped"
    );
    // A mirror slower than the traffic gets at most 256 copies in flight; the rest are
    // dropped and counted, not queued.
    assert!(n >= 256, "{n} copies");
    assert!(
        p99 < Duration::from_millis(150),
        "the mirror's 300 ms reached the caller: p99 {p99:?}"
    );
}

/// A DestinationRule's `outlierDetection` (3 consecutive 5xx, 2 s base ejection),
/// registered at west: north answers 503, so after 3 of its answers it is ejected and
/// requests go straight to west, with no client error at any point; after the ejection
/// time north is tried again, and ejected again (for twice as long).
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_site_is_ejected_and_tried_again_after_the_ejection_time() {
    let sites = http_sites("http-outlier", (200, 503), 0, |west| {
        register_yaml(
            west,
            "outlier.yaml",
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web, namespace: demo}\n\
             spec:\n  host: web.demo\n  trafficPolicy:\n    outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 2s, maxEjectionPercent: 100}\n",
        );
    })
    .await;
    let ejections = "meshfed_gateway_http_ejections_total";
    // Every request is answered 200 (north's 503 is retried at west) until north is out.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while sites.east_gw.metric(ejections).await < 1.0 {
        if tokio::net::TcpStream::connect(sites.import).await.is_ok() {
            let s = gets(sites.import, 5, &[]).await;
            assert!(s.iter().all(|s| *s == 200), "{s:?}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "north never ejected\n{}",
            sites.east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ejected_at = std::time::Instant::now();
    assert!(sites.east_gw.logs().contains("site ejected"));
    // While ejected: straight to west.
    let n0 = sites.north_hits.load(Ordering::Relaxed);
    let s = gets(sites.import, 50, &[]).await;
    assert!(s.iter().all(|s| *s == 200));
    assert!(
        ejected_at.elapsed() < Duration::from_secs(2),
        "the 50 requests were too slow to tell"
    );
    assert_eq!(
        sites.north_hits.load(Ordering::Relaxed),
        n0,
        "an ejected site got requests"
    );
    // After the ejection time north is tried again, fails again, and is ejected again.
    tokio::time::sleep(
        Duration::from_secs(2).saturating_sub(ejected_at.elapsed()) + Duration::from_millis(200),
    )
    .await;
    let s = gets(sites.import, 10, &[]).await;
    assert!(s.iter().all(|s| *s == 200));
    let back = sites.north_hits.load(Ordering::Relaxed) - n0;
    assert!(
        (1..=4).contains(&back),
        "north got {back} requests after its ejection ended"
    );
    assert_eq!(sites.east_gw.metric(ejections).await, 2.0);
}

/// Ejection is per subset, as Envoy keeps it per cluster: requests to subset `all` (both
/// sites) that north fails eject north for that subset only; requests to the service
/// itself (no subset) still go to north first, and are ejected on their own count.
#[tokio::test(flavor = "multi_thread")]
async fn a_subsets_ejection_leaves_the_site_to_the_other_requests() {
    let sites = http_sites("http-outlier-subset", (200, 503), 0, |west| {
        register_yaml(
            west,
            "outlier.yaml",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: demo}\n\
             spec:\n  hosts: [web.demo]\n  http:\n  - match: [{headers: {x-subset: {exact: all}}}]\n    route: [{destination: {host: web.demo, subset: all}}]\n\
             \x20 - route: [{destination: {host: web.demo}}]\n\
             ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web, namespace: demo}\n\
             spec:\n  host: web.demo\n  subsets: [{name: all}]\n  trafficPolicy:\n    outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 30s, maxEjectionPercent: 100}\n",
        );
    })
    .await;
    let ejections = "meshfed_gateway_http_ejections_total";
    let to_all = [("x-subset", "all")];
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while sites.east_gw.metric(ejections).await < 1.0 {
        if tokio::net::TcpStream::connect(sites.import).await.is_ok() {
            let s = gets(sites.import, 1, &to_all).await;
            assert!(s.iter().all(|s| *s == 200), "{s:?}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "north never ejected\n{}",
            sites.east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Ejected for subset `all`: its requests go straight to west.
    let n0 = sites.north_hits.load(Ordering::Relaxed);
    let s = gets(sites.import, 20, &to_all).await;
    assert!(s.iter().all(|s| *s == 200), "{s:?}");
    assert_eq!(
        sites.north_hits.load(Ordering::Relaxed),
        n0,
        "subset all still tried north"
    );
    // Not for the service's own requests: each goes to north first (and is retried at
    // west), until their own count ejects north too.
    let s = gets(sites.import, 2, &[]).await;
    assert!(s.iter().all(|s| *s == 200), "{s:?}");
    assert_eq!(
        sites.north_hits.load(Ordering::Relaxed) - n0,
        2,
        "the service's own requests skipped north: subset all's ejection applied to them"
    );
    assert_eq!(sites.east_gw.metric(ejections).await, 1.0);
    let s = gets(sites.import, 1, &[]).await;
    assert!(s.iter().all(|s| *s == 200), "{s:?}");
    assert_eq!(sites.east_gw.metric(ejections).await, 2.0);
    let n1 = sites.north_hits.load(Ordering::Relaxed);
    let s = gets(sites.import, 5, &[]).await;
    assert!(s.iter().all(|s| *s == 200), "{s:?}");
    assert_eq!(sites.north_hits.load(Ordering::Relaxed), n1);
}

/// Routes that answer at the egress or change the request: a redirect (308 with the
/// `Location` Istio would give), a direct response (Istio's `directResponse`: its
/// status, body and the route's answer headers; before, warned about and ignored, and
/// such a route refused for having no destinations), a regex rewrite of the path
/// (Istio's `uriRegexRewrite`; before, warned about and ignored), a rewrite of path and authority, header changes on the
/// request and its answer, and a rate limit that answers 429 with `retry-after` at the
/// configured rate (10/s, bursts of 5) while other routes are untouched.
#[tokio::test(flavor = "multi_thread")]
async fn redirects_rewrites_header_changes_and_rate_limits_apply_per_route() {
    const EDGES: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: web
  namespace: demo
  annotations:
    ratelimit.meshfed.io/route.limited: 10/s
    ratelimit.meshfed.io/burst: "5"
spec:
  hosts: [web.demo]
  http:
  - name: old
    match: [{uri: {prefix: /old/}}]
    redirect: {uri: /new/, redirectCode: 308}
  - name: maintenance
    match: [{uri: {prefix: /maintenance}}]
    directResponse: {status: 503, body: {string: "back at noon"}}
    headers:
      response: {set: {retry-after: "3600"}}
  - name: regex
    match: [{uri: {prefix: /service/}}]
    rewrite: {uriRegexRewrite: {match: "^/service/([^/]+)(/.*)$", rewrite: "\\2/instance/\\1"}}
    route: [{destination: {host: web.demo}}]
  - name: limited
    match: [{uri: {prefix: /limited}}]
    route: [{destination: {host: web.demo}}]
  - name: v2
    match: [{uri: {prefix: /v2/}}]
    rewrite: {uri: /api/, authority: web-v2.demo}
    headers:
      request: {set: {x-env: prod}, remove: [x-debug]}
      response: {set: {x-route: v2}, remove: [x-upstream]}
    route: [{destination: {host: web.demo}}]
  - name: split
    match: [{uri: {prefix: /split}}]
    headers:
      request: {set: {x-env: route}}
      response: {set: {x-route: split}}
    route:
    - destination: {host: web.demo}
      weight: 50
      headers:
        request: {set: {x-env: a, x-debug: from-a}}
        response: {set: {x-dest: a, x-route: a}}
    - destination: {host: web.demo}
      weight: 50
      headers:
        request: {set: {x-debug: from-b}, remove: [x-env]}
        response: {add: {x-dest: b}}
  - route: [{destination: {host: web.demo}}]
"#;
    let sites = http_sites("http-edges", (200, 200), 0, |west| {
        let out = register_yaml(west, "edges.yaml", EDGES);
        assert!(out.contains("routes:web.demo"), "{out}");
    })
    .await;
    let base = format!("http://{}", sites.import);
    // Applied once the redirect answers.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let head = loop {
        let (status, head, _, _) = curl_head(&[], &format!("{base}/old/page?q=1"));
        if status == 308 {
            break head;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the routes never applied: {status}\n{}",
            sites.east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let location = head
        .lines()
        .find_map(|l| l.strip_prefix("location: "))
        .unwrap_or_else(|| panic!("no location: {head}"))
        .trim();
    assert_eq!(location, format!("{base}/new/?q=1"));
    assert_eq!(sites.endpoint_hits(), 0, "a redirect reached an endpoint");
    // A direct response, with the route's answer headers, never forwarded.
    let (status, head, body, _) = curl_head(&[], &format!("{base}/maintenance/x"));
    assert_eq!((status, body.as_str()), (503, "back at noon"), "{head}");
    for h in ["retry-after: 3600", "content-type: text/plain"] {
        assert!(head.contains(h), "{h}: {head}");
    }
    assert_eq!(
        sites.endpoint_hits(),
        0,
        "a direct response reached an endpoint"
    );

    // Rewrite and header changes.
    let (status, head, body, _) = curl_head(
        &["-H", "x-debug: 1", "-H", "x-env: dev"],
        &format!("{base}/v2/orders?id=3"),
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("path=/api/orders query=id=3 env=prod debug=- "),
        "{body}"
    );
    assert!(body.contains("host=web-v2.demo"), "{body}");
    assert!(head.contains("x-route: v2"), "{head}");
    assert!(!head.contains("x-upstream"), "{head}");
    // A regex rewrite (Istio's uriRegexRewrite), groups substituted, query kept.
    let (status, _, body, _) = curl_head(&[], &format!("{base}/service/foo/v1/api?id=3"));
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("path=/v1/api/instance/foo query=id=3 "),
        "{body}"
    );
    // Other routes are untouched.
    let (_, head, body, _) = curl_head(&["-H", "x-debug: 1"], &format!("{base}/other"));
    assert!(
        body.contains("path=/other query=- env=- debug=1 "),
        "{body}"
    );
    assert!(head.contains("x-upstream: "), "{head}");

    // A destination's own header changes (Istio's route[].headers) apply when it is
    // picked, before the route's, whose `set` wins (Envoy's order).
    let mut seen = (0, 0);
    for _ in 0..40 {
        let (status, head, body, _) = curl_head(&["-H", "x-env: client"], &format!("{base}/split"));
        assert_eq!(status, 200, "{body}");
        assert!(head.contains("x-route: split"), "{head}");
        assert!(!head.contains("x-route: a"), "{head}");
        if body.contains("env=route debug=from-a ") {
            assert!(head.contains("x-dest: a"), "{head}");
            seen.0 += 1;
        } else {
            assert!(body.contains("env=route debug=from-b "), "{body}");
            assert!(head.contains("x-dest: b"), "{head}");
            seen.1 += 1;
        }
    }
    assert!(
        seen.0 > 0 && seen.1 > 0,
        "one destination never picked: {seen:?}"
    );

    // The rate limit: 10/s with bursts of 5, over 3 s of 40 requests a second on one
    // connection each.
    let before = sites
        .east_gw
        .metric("meshfed_gateway_http_rate_limited_total")
        .await;
    let started = std::time::Instant::now();
    let mut ok = 0;
    let mut limited = 0;
    let mut retry_after = Vec::new();
    for i in 0..120 {
        let at = started + Duration::from_millis(25 * i);
        tokio::time::sleep_until(at.into()).await;
        let url = format!("{base}/limited");
        let (status, head, body, error) = tokio::task::spawn_blocking(move || curl_head(&[], &url))
            .await
            .unwrap();
        match (status, error.as_str()) {
            (200, "") => ok += 1,
            (429, "rate_limited") => {
                limited += 1;
                retry_after.push(
                    head.lines()
                        .find_map(|l| l.strip_prefix("retry-after: "))
                        .unwrap_or("none")
                        .trim()
                        .to_owned(),
                );
            }
            other => panic!("{other:?}: {body}"),
        }
    }
    let took = started.elapsed().as_secs_f64();
    eprintln!("rate limit 10/s burst 5: {ok} passed, {limited} limited in {took:.2} s");
    // The burst, then 10 a second.
    let most = 5.0 + 10.0 * took;
    assert!(
        f64::from(ok) <= most + 1.0 && f64::from(ok) >= 5.0 + 10.0 * 3.0 * 0.8,
        "{ok} passed in {took:.2} s (at most {most:.0})"
    );
    assert!(retry_after.iter().all(|r| r == "1"), "{retry_after:?}");
    let after = sites
        .east_gw
        .metric("meshfed_gateway_http_rate_limited_total")
        .await;
    assert_eq!(after - before, f64::from(limited));
    // The other routes are not limited.
    for _ in 0..20 {
        assert_eq!(curl(&[], &format!("{base}/other")).0, 200);
    }
    // Every answer counts for its route: those the egress gave itself (redirect, direct
    // response, rate limit) with site `none`, the forwarded ones by the answering site.
    let route = |name: &str, site: &str, class: &str| {
        format!(
            "meshfed_gateway_http_route_requests_total{{import=\"web.demo:{}\",route=\"{name}\",site=\"{site}\",class=\"{class}\"}}",
            sites.import.port()
        )
    };
    let count = |name: &str, site: &str, class: &str| {
        let m = route(name, site, class);
        let gw = &sites.east_gw;
        async move { gw.metric(&m).await }
    };
    assert!(count("old", "none", "3xx").await >= 1.0);
    assert_eq!(count("maintenance", "none", "5xx").await, 1.0);
    assert_eq!(count("limited", "none", "4xx").await, f64::from(limited));
    let served = count("limited", "west", "2xx").await + count("limited", "north", "2xx").await;
    assert_eq!(served, f64::from(ok));
}

/// An OTLP/gRPC trace receiver: the real `TraceService` from opentelemetry-proto, on
/// tonic, keeping every span it is sent.
mod otlp {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::trace::v1::Span;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    pub struct Receiver(pub Arc<Mutex<Vec<(String, Span)>>>);

    #[tonic::async_trait]
    impl TraceService for Receiver {
        async fn export(
            &self,
            req: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let mut all = self.0.lock().unwrap();
            for rs in req.into_inner().resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| r.attributes.iter())
                    .find(|a| a.key == "service.name")
                    .and_then(|a| a.value.as_ref())
                    .and_then(|v| match &v.value {
                        Some(Value::StringValue(s)) => Some(s.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        all.push((service.clone(), span));
                    }
                }
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }

    pub fn attr(span: &Span, key: &str) -> Option<String> {
        span.attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.as_ref())
            .and_then(|v| match &v.value {
                Some(Value::StringValue(s)) => Some(s.clone()),
                Some(Value::IntValue(i)) => Some(i.to_string()),
                _ => None,
            })
    }

    pub async fn start() -> (std::net::SocketAddr, Receiver) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let r = Receiver::default();
        let svc = TraceServiceServer::new(r.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
        );
        (addr, r)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A client's W3C trace crosses the gateway hop: east's egress span continues the
/// client's `traceparent`, the answering site's ingress span continues east's, and the
/// endpoint receives the ingress span's context; every span reaches an OTLP receiver
/// (real OTLP protobuf over gRPC) with its site, in one trace. Federation publishes are
/// traced too.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_trace_continues_through_both_gateways_to_the_endpoint() {
    let (otlp, received) = otlp::start().await;
    // The gateways and the federation this test starts inherit these (nextest runs each
    // test in a process of its own).
    unsafe {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"));
        std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    }
    let sites = http_sites("http-otlp", (200, 200), 0, |_| {}).await;
    let url = format!("http://{}/traced", sites.import);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while curl(&[], &url).0 != 200 {
        assert!(std::time::Instant::now() < deadline, "never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let (status, body, _) = curl(
        &[
            "-H",
            &format!("traceparent: 00-{trace_id}-{client_span}-01"),
        ],
        &url,
    );
    assert_eq!(status, 200, "{body}");
    let tp = body
        .split_whitespace()
        .find_map(|w| w.strip_prefix("tp="))
        .unwrap_or_else(|| panic!("{body}"));
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(
        parts[1], trace_id,
        "the endpoint is in the client's trace: {tp}"
    );
    assert_ne!(parts[2], client_span, "a gateway span sits between: {tp}");
    let endpoint_parent = parts[2].to_owned();

    // The spans arrive in batches.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (egress, ingress) = loop {
        let spans = received.0.lock().unwrap().clone();
        let in_trace = |name: &str| {
            spans
                .iter()
                .find(|(_, s)| s.name == name && hex(&s.trace_id) == trace_id)
                .cloned()
        };
        if let (Some(e), Some(i)) = (in_trace("egress http"), in_trace("ingress http")) {
            break (e, i);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "spans of the trace never arrived: {:?}",
            spans
                .iter()
                .map(|(svc, s)| (svc, &s.name))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (egress_service, egress) = egress;
    let (_, ingress) = ingress;
    assert_eq!(egress_service, "meshfed-gateway");
    assert_eq!(otlp::attr(&egress, "meshfed.site").as_deref(), Some("east"));
    let answered_by = otlp::attr(&egress, "meshfed.destination_site").unwrap();
    assert_eq!(
        otlp::attr(&ingress, "meshfed.site"),
        Some(answered_by.clone())
    );
    assert!(body.contains(&format!("site={answered_by} ")), "{body}");
    assert_eq!(hex(&egress.parent_span_id), client_span);
    assert_eq!(
        ingress.parent_span_id, egress.span_id,
        "ingress continues east's span"
    );
    assert_eq!(
        hex(&ingress.span_id),
        endpoint_parent,
        "the endpoint continues the ingress span"
    );
    assert_eq!(
        otlp::attr(&egress, "http.response.status_code").as_deref(),
        Some("200")
    );
    // Federation publishes are traced, with the site.
    let spans = received.0.lock().unwrap().clone();
    assert!(
        spans
            .iter()
            .any(|(_, s)| s.name == "federation.publish" && otlp::attr(s, "meshfed.site").is_some()),
        "{:?}",
        spans.iter().map(|(_, s)| &s.name).collect::<Vec<_>>()
    );
}

/// West exports `web.demo` (endpoint `v1`) and `web-v2.demo` (endpoint `v2`) as HTTP,
/// after registering the routes `yaml` makes of their ports (in `file`); east imports
/// both. `base` is east's import of `web.demo`.
struct V1V2 {
    fed: crate::federation::Fed,
    _west_gw: Gw,
    east_gw: Gw,
    /// East's import of `web.demo`, and its URL.
    import: SocketAddr,
    base: String,
    v1_hits: Arc<AtomicUsize>,
    v2_hits: Arc<AtomicUsize>,
    _scratch: Scratch,
}

async fn v1_v2_at_west(name: &str, file: &str, yaml: impl FnOnce(u16, u16) -> String) -> V1V2 {
    let (v1, v1_hits) = http_endpoint("v1", 200).await;
    let (v2, v2_hits) = http_endpoint("v2", 200).await;
    let sites = two_at_west(
        name,
        file,
        yaml,
        [("web.demo", v1, "http"), ("web-v2.demo", v2, "http")],
    );
    assert!(
        sites.registered.contains("routes:web.demo"),
        "{}",
        sites.registered
    );
    V1V2 {
        fed: sites.fed,
        _west_gw: sites.west_gw,
        east_gw: sites.east_gw,
        import: sites.imports[0],
        base: format!("http://{}", sites.imports[0]),
        v1_hits,
        v2_hits,
        _scratch: sites.scratch,
    }
}

/// Two sites in one federation: west registers `yaml(port, port2)` (as `file`) and
/// exports two services, (name, endpoint, protocol), on those ports; east imports both,
/// on 127.0.0.2. What the registration printed is in `registered`.
struct TwoAtWest {
    fed: crate::federation::Fed,
    west_gw: Gw,
    east_gw: Gw,
    /// East's imports of the two services.
    imports: [SocketAddr; 2],
    registered: String,
    scratch: Scratch,
}

fn two_at_west(
    name: &str,
    file: &str,
    yaml: impl FnOnce(u16, u16) -> String,
    services: [(&str, SocketAddr, &str); 2],
) -> TwoAtWest {
    use crate::federation::{Fed, fed_config, free_port, joined};
    let scratch = Scratch::new(name);
    let fed = Fed::start(&Fed::init(&scratch), 0);
    let [east, west] = joined(&scratch, &fed, ["east", "west"]);
    let ip: std::net::IpAddr = [127, 0, 0, 2].into();
    let ports = [free_port(ip), free_port(ip)];
    let registered = register_yaml(&west, file, &yaml(ports[0], ports[1]));
    let mut cfg = fed_config(&west, [127, 0, 0, 3]);
    for ((svc, endpoint, protocol), port) in services.into_iter().zip(ports) {
        cfg = cfg
            .export(svc, port, vec![endpoint])
            .speaks(svc, port, protocol);
    }
    let west_gw = Gw::start(&west, &cfg).unwrap();
    let east_gw = Gw::start(&east, &fed_config(&east, [127, 0, 0, 2])).unwrap();
    TwoAtWest {
        fed,
        west_gw,
        east_gw,
        imports: ports.map(|p| SocketAddr::new(ip, p)),
        registered,
        scratch,
    }
}

/// Issue 17 §2 (GAMMA): a Gateway API HTTPRoute attached to `web.demo`, registered at
/// west, sends requests to another service, `web-v2.demo`, through the importing
/// gateway's import of it: a header match takes every request to v2, the rest split
/// 1:1 by relative weights, a rule with all weights 0 answers 500 (Gateway API's
/// rule), and a redirect replaces the matched prefix (ReplacePrefixMatch, refused
/// before); the rules apply in the Gateway API's precedence, not as written. Before, a
/// destination of another service was refused at registration.
#[tokio::test(flavor = "multi_thread")]
async fn an_http_route_sends_a_canary_to_another_service() {
    let V1V2 {
        fed,
        _west_gw,
        east_gw,
        import,
        base,
        v1_hits,
        v2_hits,
        _scratch,
    } = v1_v2_at_west("http-gamma", "route.yaml", |port, port_v2| {
        format!(
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web-canary, namespace: demo}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web}}]
  rules:
  - name: beta
    matches: [{{headers: [{{name: x-beta, value: "1"}}]}}]
    backendRefs: [{{name: web-v2, port: {port_v2}}}]
  - name: zero
    matches: [{{path: {{type: PathPrefix, value: /off}}}}]
    backendRefs:
    - {{name: web, port: {port}, weight: 0}}
    - {{name: web-v2, port: {port_v2}, weight: 0}}
  - name: moved
    matches: [{{path: {{type: PathPrefix, value: /old}}}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /new}}, statusCode: 308}}
  - name: split
    backendRefs:
    - {{name: web, port: {port}, weight: 1}}
    - {{name: web-v2, port: {port_v2}, weight: 1}}
"#
        )
    })
    .await;

    // Applied once the header rule reaches v2 through web.demo's import.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body, _) = curl(&["-H", "x-beta: 1"], &format!("{base}/x"));
        if status == 200 && body.contains("site=v2") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the route never applied: {status} {body}\n{}",
            east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = (
        v1_hits.load(Ordering::Relaxed),
        v2_hits.load(Ordering::Relaxed),
    );
    let beta = gets(import, 20, &[("x-beta", "1")]).await;
    assert!(beta.iter().all(|s| *s == 200), "{beta:?}");
    let after_beta = (
        v1_hits.load(Ordering::Relaxed),
        v2_hits.load(Ordering::Relaxed),
    );
    assert_eq!(after_beta.0, before.0, "a beta request reached v1");
    assert_eq!(after_beta.1 - before.1, 20);

    // The split: 400 requests, each version gets its half within a wide margin.
    let split = gets(import, 400, &[]).await;
    assert!(split.iter().all(|s| *s == 200), "{split:?}");
    let to_v1 = v1_hits.load(Ordering::Relaxed) - after_beta.0;
    let to_v2 = v2_hits.load(Ordering::Relaxed) - after_beta.1;
    eprintln!("split 1:1 over 400 requests: v1 {to_v1}, v2 {to_v2}");
    assert_eq!(to_v1 + to_v2, 400);
    assert!((140..=260).contains(&to_v1), "v1 {to_v1}, v2 {to_v2}");

    // All weights 0: 500, and no endpoint sees it.
    let (status, _, code) = curl(&[], &format!("{base}/off/x"));
    assert_eq!((status, code.as_str()), (500, "no_route"));
    // A redirect replacing the matched prefix (ReplacePrefixMatch), answered here.
    let (status, head, _, _) = curl_head(&[], &format!("{base}/old/a/b?q=1"));
    assert_eq!(status, 308, "{head}");
    assert!(
        head.contains(&format!("location: {base}/new/a/b?q=1")),
        "{head}"
    );
    // The Gateway API's precedence, not the order written: a beta request to /old
    // matches `moved` (the longer path) before `beta` (a header on `/`), as Istio
    // orders them. In the order written, beta took it to v2.
    let (status, head, _, _) = curl_head(&["-H", "x-beta: 1"], &format!("{base}/old/a"));
    assert_eq!(status, 308, "{head}");
    assert_eq!(
        v1_hits.load(Ordering::Relaxed) + v2_hits.load(Ordering::Relaxed),
        to_v1 + to_v2 + after_beta.0 + after_beta.1
    );
    drop(fed);
}

/// Issue 17 §2 (GAMMA): a route whose parentRef names a port of its Service applies on
/// that port only. web.demo is exported on two ports (one endpoint each); a redirect
/// route on the second answers 308 there, and the first still reaches its endpoint.
/// Before, the port was warned about and the route applied on both.
#[tokio::test(flavor = "multi_thread")]
async fn a_route_on_one_port_of_a_service_leaves_the_others() {
    let (v1, v1_hits) = http_endpoint("v1", 200).await;
    let (v2, _v2_hits) = http_endpoint("v2", 200).await;
    let sites = two_at_west(
        "gamma-port",
        "route.yaml",
        |_, port| {
            format!(
                r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web-moved, namespace: demo}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web, port: {port}}}]
  rules:
  - filters:
    - type: RequestRedirect
      requestRedirect: {{path: {{type: ReplaceFullPath, replaceFullPath: /moved}}, statusCode: 308}}
"#
            )
        },
        [("web.demo", v1, "http"), ("web.demo", v2, "http")],
    );
    assert!(
        sites.registered.contains("routes:web.demo"),
        "{}",
        sites.registered
    );
    let [first, second] = sites.imports.map(|a| format!("http://{a}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _, _, _) = curl_head(&[], &format!("{second}/x"));
        if status == 308 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the route never applied on its port: {status}\n{}",
            sites.east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = v1_hits.load(Ordering::Relaxed);
    for _ in 0..10 {
        let (status, body, _) = curl(&[], &format!("{first}/x"));
        assert_eq!(status, 200, "the other port: {body}");
        assert!(body.contains("site=v1"), "{body}");
    }
    assert_eq!(v1_hits.load(Ordering::Relaxed) - before, 10);
    drop(sites);
}

/// Issue 17 §2/§4: a DestinationRule's `loadBalancer` registered at west spreads every
/// importer's requests over the sites. Without one, the best site (north: equal
/// capacity, first by name) takes them all; with ROUND_ROBIN each site gets its turn.
#[tokio::test(flavor = "multi_thread")]
async fn a_destination_rule_load_balancer_spreads_requests_over_sites() {
    const RR: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web.demo
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
"#;
    let sites = http_sites("http-lb", (200, 200), 0, |west| {
        let out = register_yaml(west, "lb.yaml", RR);
        assert!(out.contains("routes:web.demo"), "{out}");
    })
    .await;
    // Applied once both sites get requests (before, north takes them all).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _, _) = curl(&[], &format!("http://{}/", sites.import));
        if status != 200 {
            assert!(
                std::time::Instant::now() < deadline,
                "import not serving: {status}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        if sites.west_hits.load(Ordering::Relaxed) > 0
            && sites.north_hits.load(Ordering::Relaxed) > 0
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "requests never spread\n{}",
            sites.east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = (
        sites.west_hits.load(Ordering::Relaxed),
        sites.north_hits.load(Ordering::Relaxed),
    );
    let s = gets(sites.import, 200, &[]).await;
    assert!(s.iter().all(|c| *c == 200), "{s:?}");
    let west = sites.west_hits.load(Ordering::Relaxed) - before.0;
    let north = sites.north_hits.load(Ordering::Relaxed) - before.1;
    eprintln!("round robin over 200 requests: west {west}, north {north}");
    assert_eq!(west + north, 200);
    assert_eq!(west, 100, "west {west}, north {north}");
}

/// Issue 17 §2/§4: a DestinationRule's `loadBalancer.consistentHash` (session affinity),
/// which Istio accepts and meshfed used to refuse. By header across sites: each of 24
/// users' 4 requests land at one site, and both sites get users. By cookie across the
/// two endpoints of one site: a request without the cookie gets one made up
/// (`Set-Cookie`, its ttl as `Max-Age`), and every request that sends it back lands on
/// the same endpoint, while requests without it spread.
#[tokio::test(flavor = "multi_thread")]
async fn consistent_hash_keeps_a_key_on_one_site_and_one_endpoint() {
    const BY_HEADER: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web.demo
  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: x-user}}
"#;
    let sites = http_sites("http-hash", (200, 200), 0, |west| {
        let out = register_yaml(west, "hash.yaml", BY_HEADER);
        assert!(out.contains("routes:web.demo"), "{out}");
    })
    .await;
    let url = format!("http://{}/", sites.import);
    // Applied once two users land at different sites (before, north takes them all).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        for u in 0..8 {
            let _ = curl(&["-H", &format!("x-user: u{u}")], &url);
        }
        if sites.west_hits.load(Ordering::Relaxed) > 0
            && sites.north_hits.load(Ordering::Relaxed) > 0
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "users never spread\n{}",
            sites.east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut per_site = std::collections::BTreeMap::<String, usize>::new();
    for u in 0..24 {
        let seen: std::collections::BTreeSet<String> = (0..4)
            .map(|_| {
                let (status, body, _) = curl(&["-H", &format!("x-user: u{u}")], &url);
                assert_eq!(status, 200, "{body}");
                body.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        assert_eq!(seen.len(), 1, "user u{u} landed at {seen:?}");
        *per_site
            .entry(seen.into_iter().next().unwrap())
            .or_default() += 1;
    }
    eprintln!("24 users by x-user: {per_site:?}");
    assert_eq!(per_site.len(), 2, "every user at one site: {per_site:?}");
    drop(sites);

    const BY_COOKIE: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web.demo
  trafficPolicy:
    loadBalancer: {consistentHash: {httpCookie: {name: affinity, path: /, ttl: 60s}}}
"#;
    let (a, _) = http_endpoint("a", 200).await;
    let (b, _) = http_endpoint("b", 200).await;
    let west = west_serves("http-hash-cookie", BY_COOKIE, vec![a, b]).await;
    let url = format!("http://{}/", west.import);
    let mut cookies = Vec::new();
    let mut fresh = std::collections::BTreeSet::new();
    for _ in 0..16 {
        let (status, head, body, _) = curl_head(&[], &url);
        assert_eq!(status, 200, "{body}");
        let cookie = head
            .lines()
            .find_map(|l| l.strip_prefix("set-cookie: "))
            .unwrap_or_else(|| panic!("no cookie made up: {head}"))
            .trim()
            .to_owned();
        assert!(
            cookie.ends_with("; Path=/; Max-Age=60; HttpOnly"),
            "{cookie}"
        );
        fresh.insert(
            body.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned(),
        );
        cookies.push(cookie.split(';').next().unwrap().to_owned());
    }
    // Without a cookie, each request is a new key: both endpoints get some.
    assert_eq!(fresh.len(), 2, "16 new keys all at {fresh:?}");
    for c in &cookies {
        let seen: std::collections::BTreeSet<String> = (0..4)
            .map(|_| {
                let (status, head, body, _) = curl_head(&["-H", &format!("cookie: {c}")], &url);
                assert_eq!(status, 200, "{body}");
                assert!(
                    !head.contains("set-cookie"),
                    "a cookie sent back was replaced: {head}"
                );
                body.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        assert_eq!(seen.len(), 1, "cookie {c} landed at {seen:?}");
    }
    drop(west);
}

/// `federation.labels`: a site's own labels go with its exports, and the importing
/// gateway's are what `failoverPriority` compares them with, as Istio compares the client
/// proxy's labels with the endpoints'. East (us/b) and west (eu/b) are on network n1,
/// north (us/a) on n2: by locality north (east's region) takes every request; under
/// `failoverPriority: [topology.istio.io/network]` west (east's network) does. Without
/// east's own label no site would match it, and north would stay first (by name).
#[tokio::test(flavor = "multi_thread")]
async fn failover_priority_compares_the_gateways_own_labels() {
    let network = |n: &str| Some(format!("{{topology.istio.io/network: {n}}}"));
    let sites = http_sites_each(
        "http-labels",
        (200, 200),
        0,
        [Some("us/b"), Some("eu/b"), Some("us/a")],
        (
            |c| meshfed_lab::ConfigBuilder {
                labels: network("n1"),
                ..c
            },
            |c, i| meshfed_lab::ConfigBuilder {
                labels: network(if i == 2 { "n2" } else { "n1" }),
                ..c
            },
        ),
        |_| {},
    )
    .await;
    sites.serving_through_both().await;
    assert_eq!(
        sites.spread(20).await,
        (0, 20),
        "by locality: north (us/a) first"
    );
    const PRIORITY: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web.demo
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 5}
    loadBalancer:
      localityLbSetting:
        failoverPriority: [topology.istio.io/network]
"#;
    sites
        .register_until(PRIORITY, "failoverPriority", |(w, _)| w == 20)
        .await;
    assert_eq!(
        sites.spread(100).await,
        (100, 0),
        "east's network (n1) first: west"
    );
}

/// Issue 17 §2: a DestinationRule's `localityLbSetting`. East is in `eu/a`, west in
/// `eu/b`, north in `us/a`. By default the nearest site takes every request (west: same
/// region); `distribute` from `eu/*` gives `us/*` 75 % and `eu/*` 25 %; with `enabled:
/// false`, the locality is ignored and the order is by name (equal capacity). Before,
/// a gateway never published its `locality`, so nothing was ordered by it. (`failover`
/// ordering is table-tested in `catalog::routing`.)
#[tokio::test(flavor = "multi_thread")]
async fn locality_lb_settings_order_and_share_sites_by_locality() {
    let sites = http_sites_at(
        "http-locality",
        (200, 200),
        0,
        [Some("eu/a"), Some("eu/b"), Some("us/a")],
        |_| {},
    )
    .await;
    let hits = HttpSites::hits;
    sites.serving_through_both().await;
    assert_eq!(
        sites.spread(100).await,
        (100, 0),
        "nearest first: west (eu/b) before north (us/a)"
    );

    // Distribute: 25 % eu, 75 % us, once east's plan has it.
    const DIST: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web.demo
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        distribute:
        - from: eu/*
          to: {"eu/*": 25, "us/*": 75}
"#;
    sites
        .register_until(DIST, "distribute", |(_, n)| n > 0)
        .await;
    let before = hits(&sites);
    let s = gets(sites.import, 400, &[]).await;
    assert!(s.iter().all(|c| *c == 200), "{s:?}");
    let after = hits(&sites);
    let (west, north) = (after.0 - before.0, after.1 - before.1);
    eprintln!("distribute 25/75 over 400 requests: west {west}, north {north}");
    assert_eq!(west + north, 400);
    // The rolls are a fixed sequence (splitmix64 of a counter): near the shares.
    assert!((70..=130).contains(&west), "west {west}, north {north}");

    // Disabled: no locality preference, equal capacity, so by name: north.
    const OFF: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web.demo
  trafficPolicy:
    loadBalancer:
      localityLbSetting: {enabled: false}
"#;
    sites
        .register_until(OFF, "enabled: false", |(_, n)| n == 20)
        .await;

    // failoverPriority by labels instead of localities: first the sites whose region
    // label is us (north), whatever east's own region (eu, as west's); then, on one
    // zone label, both are a (west eu/b has zone b): north takes every request.
    const PRIORITY: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web.demo
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 5}
    loadBalancer:
      localityLbSetting:
        failoverPriority: ["topology.kubernetes.io/region=us", topology.kubernetes.io/zone]
"#;
    // Back to the default first (west, the same region, takes every request), so the
    // change to north below is failoverPriority's.
    let nearest = OFF.replace("enabled: false", "enabled: true");
    let back_to_nearest = || sites.register_until(&nearest, "enabled: true", |(w, _)| w == 20);
    back_to_nearest().await;
    let out = register_yaml(&sites.west, "dr.yaml", PRIORITY);
    assert!(out.contains("routes:web.demo"), "{out}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let before = hits(&sites);
        let s = gets(sites.import, 100, &[]).await;
        let after = hits(&sites);
        if (after.0 - before.0, after.1 - before.1) == (0, 100) {
            assert!(s.iter().all(|c| *c == 200), "{s:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "failoverPriority never applied: west {}, north {} of 100",
            after.0 - before.0,
            after.1 - before.1
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A subset's own localityLbSetting orders its sites: the destination's default
    // sends every request to west (the same region), the subset every route names
    // turns locality off, so north (equal capacity, first by name) takes them. Before,
    // the subset's setting was warned about and west took them.
    const SUBSET: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: demo}
spec:
  hosts: [web.demo]
  http:
  - route:
    - destination: {host: web.demo, subset: anywhere}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web.demo
  trafficPolicy:
    loadBalancer:
      localityLbSetting: {enabled: true}
  subsets:
  - name: anywhere
    trafficPolicy:
      loadBalancer:
        localityLbSetting: {enabled: false}
"#;
    back_to_nearest().await;
    sites
        .register_until(SUBSET, "the subset's localityLbSetting", |(_, n)| n == 20)
        .await;
    let plan = http_get(sites.east_gw.admin, "/debug/imports")
        .await
        .unwrap_or_default();
    assert!(plan.contains("subset_sites"), "{plan}");
}

/// Two federated sites: west exports `web.demo` as HTTP in front of `endpoints`, with
/// `yaml` registered at west first; east imports it. Ready once the import answers 200.
struct WestServes {
    fed: crate::federation::Fed,
    west: meshfed_lab::SiteFiles,
    west_gw: Gw,
    _east_gw: Gw,
    import: SocketAddr,
    _scratch: Scratch,
}

async fn west_serves(name: &str, yaml: &str, endpoints: Vec<SocketAddr>) -> WestServes {
    use crate::federation::{Fed, fed_config, free_port, joined};
    let scratch = Scratch::new(name);
    let fed = Fed::start(&Fed::init(&scratch), 0);
    let [east, west] = joined(&scratch, &fed, ["east", "west"]);
    let ip: std::net::IpAddr = [127, 0, 0, 2].into();
    let port = free_port(ip);
    let out = register_yaml(&west, "policy.yaml", yaml);
    assert!(out.contains("routes:web.demo"), "{out}");
    let west_gw = Gw::start(
        &west,
        &fed_config(&west, [127, 0, 0, 3])
            .export("web.demo", port, endpoints)
            .speaks("web.demo", port, "http"),
    )
    .unwrap();
    let east_gw = Gw::start(&east, &fed_config(&east, [127, 0, 0, 2])).unwrap();
    let import = SocketAddr::new(ip, port);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while curl(&[], &format!("http://{import}/")).0 != 200 {
        assert!(std::time::Instant::now() < deadline, "import never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    WestServes {
        fed,
        west,
        west_gw,
        _east_gw: east_gw,
        import,
        _scratch: scratch,
    }
}

/// Issue 17 §4 (istio#52435): outlier detection at the ingress is per endpoint. West's
/// `web.demo` has a good endpoint and one that answers 503; with a DestinationRule's
/// `outlierDetection` registered at west, the bad endpoint is ejected after two errors
/// in a row and gets nothing more, while the site keeps serving every request (the
/// egress's retry of the two 503s lands on the good endpoint).
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_endpoint_is_ejected_at_the_ingress_and_its_site_keeps_serving() {
    const DR: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web.demo
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 60s, maxEjectionPercent: 50}
"#;
    let (good, good_hits) = http_endpoint("good", 200).await;
    let (bad, bad_hits) = http_endpoint("bad", 503).await;
    // Bound by name (not `..`), so the east gateway and the scratch live to the end.
    let WestServes {
        fed,
        west: _,
        west_gw,
        import,
        _east_gw,
        _scratch,
    } = west_serves("http-ep-outlier", DR, vec![good, bad]).await;
    let statuses = gets(import, 200, &[]).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let (good_n, bad_n) = (
        good_hits.load(Ordering::Relaxed),
        bad_hits.load(Ordering::Relaxed),
    );
    eprintln!("after 200 requests: good endpoint {good_n}, bad endpoint {bad_n}");
    assert!(
        bad_n <= 3,
        "the failing endpoint kept getting requests: {bad_n}"
    );
    assert!(good_n >= 200, "{good_n}");
    assert!(
        west_gw.metric("meshfed_gateway_http_ejections_total").await >= 1.0,
        "no ejection counted"
    );
    drop(fed);
}

/// Issue 17 §2: a DestinationRule's `connectionPool.tcp.connectTimeout` bounds the
/// exporting gateway's dial to each endpoint. West's `web.demo` has a good endpoint and
/// one whose accept queue is full, so its SYNs are dropped and a dial hangs. With
/// `connectTimeout: 100ms` no request waits on it for the gateway's own 1 s; once the
/// rule no longer sets it, a request that meets that endpoint waits the 1 s again.
/// Before, `connectTimeout` was warned about and the gateway's 1 s always applied.
#[tokio::test(flavor = "multi_thread")]
async fn connect_timeout_bounds_each_dial_to_an_endpoint() {
    const DR: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web.demo
  trafficPolicy:
    connectionPool:
      tcp: {CONNECT}
"#;
    let (good, _) = http_endpoint("good", 200).await;
    // Backlog 0: one connection fills the queue; it is never accepted, and the
    // kernel drops the SYNs that follow.
    let stuck = tokio::net::TcpSocket::new_v4().unwrap();
    stuck.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let stuck = stuck.listen(0).unwrap();
    let stuck_addr = stuck.local_addr().unwrap();
    let mut held = Vec::new();
    loop {
        match tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(stuck_addr),
        )
        .await
        {
            Ok(Ok(c)) => held.push(c),
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => break,
        }
        assert!(held.len() < 16, "the accept queue never filled");
    }
    let WestServes {
        west,
        west_gw,
        import,
        ..
    } = &west_serves(
        "http-connect-timeout",
        &DR.replace("CONNECT", "connectTimeout: 100ms"),
        vec![good, stuck_addr],
    )
    .await;
    // Each request's slowest: the ingress dials the stuck endpoint on about every
    // other request, gives up within the timeout and answers from the good one.
    let slowest = |n: usize| async move {
        let mut worst = Duration::ZERO;
        for _ in 0..n {
            let started = std::time::Instant::now();
            let (status, body, _) = curl(&[], &format!("http://{import}/"));
            assert_eq!(status, 200, "{body}");
            worst = worst.max(started.elapsed());
        }
        worst
    };
    let worst = slowest(8).await;
    assert!(
        worst < Duration::from_millis(900),
        "a request waited {worst:?}: connectTimeout 100ms never applied\n{}",
        west_gw.logs()
    );
    // Without it, the gateway's own 1 s.
    let out = register_yaml(
        west,
        "policy.yaml",
        &DR.replace("CONNECT", "maxConnections: 100"),
    );
    assert!(out.contains("routes:web.demo"), "{out}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let worst = slowest(4).await;
        if worst >= Duration::from_millis(950) {
            eprintln!("without connectTimeout, a request waited {worst:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rule without connectTimeout never applied: {worst:?}"
        );
    }
    drop(held);
}

/// The kernel's keepalive timers (`ss -o`) of this host's connections to `to`: for
/// each connection, its `timer:(...)` field, or `-` without one.
fn keepalive_timers(to: SocketAddr) -> Vec<String> {
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established", "dst"])
        .arg(to.to_string())
        .output()
        .expect("ss runs (iproute2; deploy/setup-dev.sh installs it)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            l.split_whitespace()
                .find(|f| f.starts_with("timer:("))
                .unwrap_or("-")
                .to_owned()
        })
        .collect()
}

/// Issue 17 §2: a DestinationRule's `connectionPool.tcp.tcpKeepalive` turns on keepalive
/// probes on the exporting gateway's connections to the endpoints, as the kernel shows
/// them (`ss -o`): without it, west's connection to the endpoint has no keepalive
/// timer; with `time: 30s` a new connection has one of at most 30 s. Before,
/// `tcpKeepalive` was warned about and ignored.
#[tokio::test(flavor = "multi_thread")]
async fn tcp_keepalive_probes_the_endpoint_connections() {
    const DR: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web.demo
  trafficPolicy:
    connectionPool:
      tcp: {TCP}
"#;
    let (ep, _) = http_endpoint("ep", 200).await;
    let WestServes { west, import, .. } = &west_serves(
        "http-keepalive",
        &DR.replace("TCP", "maxConnections: 100"),
        vec![ep],
    )
    .await;
    let timers = keepalive_timers(ep);
    assert!(!timers.is_empty(), "no connection to the endpoint");
    assert!(
        timers.iter().all(|t| !t.contains("keepalive")),
        "keepalive without tcpKeepalive: {timers:?}"
    );
    let out = register_yaml(
        west,
        "policy.yaml",
        &DR.replace(
            "TCP",
            "maxConnections: 100, tcpKeepalive: {time: 30s, interval: 5s, probes: 3}",
        ),
    );
    assert!(out.contains("routes:web.demo"), "{out}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let timer = loop {
        assert_eq!(curl(&[], &format!("http://{import}/")).0, 200);
        let timers = keepalive_timers(ep);
        if let Some(t) = timers.iter().find(|t| t.contains("keepalive")) {
            break t.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tcpKeepalive never applied: {timers:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // `timer:(keepalive,29sec,0)`: at most the rule's 30 s to the first probe.
    let secs: u64 = timer
        .trim_start_matches("timer:(keepalive,")
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{timer}"));
    assert!(secs <= 30 && timer.contains("sec"), "{timer}");
}

/// Issue 17 §2: a DestinationRule's `connectionPool.tcp.maxConnections` and
/// `http.http1MaxPendingRequests`, at the exporting site's gateway. West's endpoint
/// answers after 300 ms and counts the requests it holds at once; with `maxConnections:
/// 2, http1MaxPendingRequests: 2`, 8 requests at once from east never put more than 2 on
/// it, 4 are served (2 at once, 2 after waiting), and the others are answered 503
/// `overflow` at once, counted at west's ingress. Before, every request reached the
/// endpoint at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_pool_caps_the_endpoints_connections_at_the_exporting_site() {
    const DR: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web.demo
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 2}
      http: {http1MaxPendingRequests: 2}
"#;
    // The endpoint: 300 ms per request, the most it held at once.
    let l = listen();
    let ep = l.local_addr().unwrap();
    let now = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (n, m) = (now.clone(), most.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (n, m) = (n.clone(), m.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let (n, m) = (n.clone(), m.clone());
                    async move {
                        let held = n.fetch_add(1, Ordering::SeqCst) + 1;
                        m.fetch_max(held, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        n.fetch_sub(1, Ordering::SeqCst);
                        answer("west", 200, req).await
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    // Bound by name (not `..`), so the east gateway and the scratch live to the end.
    let WestServes {
        fed,
        west: _,
        west_gw,
        import,
        _east_gw,
        _scratch,
    } = west_serves("http-conn-pool", DR, vec![ep]).await;
    most.store(0, Ordering::SeqCst);
    let at = std::time::Instant::now();
    let burst: Vec<_> = (0..8)
        .map(|_| {
            tokio::task::spawn_blocking(move || {
                let (status, _, _, error) = curl_head(&[], &format!("http://{import}/"));
                (status, error == "overflow")
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in burst {
        results.push(t.await.unwrap());
    }
    let took = at.elapsed();
    let served = results.iter().filter(|(s, _)| *s == 200).count();
    let overflowed = results.iter().filter(|(s, o)| *s == 503 && *o).count();
    eprintln!(
        "8 at once: {served} served, {overflowed} overflow, endpoint held at most {}, {took:?}",
        most.load(Ordering::SeqCst)
    );
    assert_eq!(served + overflowed, 8, "{results:?}");
    assert!(
        most.load(Ordering::SeqCst) <= 2,
        "more than maxConnections at the endpoint"
    );
    assert!(
        served >= 4,
        "connections and waiting slots serve: {results:?}"
    );
    assert!(overflowed >= 1, "{results:?}");
    assert!(
        west_gw
            .metric("meshfed_gateway_http_overflows_total{direction=\"ingress\"}")
            .await
            >= 1.0
    );
    // Afterwards, all served again.
    let s = gets(import, 4, &[]).await;
    assert!(s.iter().all(|c| *c == 200), "{s:?}");
    drop(fed);
}

/// Issue 17 §2/§4: a DestinationRule's `connectionPool.tcp.maxConnections` on a TCP
/// port (no HTTP) caps the tunnelled connections to the service's endpoints at the
/// exporting gateway, as Envoy's TCP proxy does: past 2 open connections, a third open
/// is refused with the typed `overflow` at once (counted at west), and once one closes
/// a new connection is served. Before, the setting applied only to HTTP/1.1 ports and
/// a TCP port took any number of connections.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_pool_caps_a_tcp_ports_connections_with_a_typed_refusal() {
    use crate::federation::{Fed, fed_config, free_port, joined};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const DR: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db, namespace: demo}
spec:
  host: db.demo
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 2}
"#;
    let scratch = Scratch::new("tcp-conn-pool");
    let fed = Fed::start(&Fed::init(&scratch), 0);
    let [east, west] = joined(&scratch, &fed, ["east", "west"]);
    let ip: std::net::IpAddr = [127, 0, 0, 2].into();
    let port = free_port(ip);
    let out = register_yaml(&west, "pool.yaml", DR);
    assert!(out.contains("db.demo"), "{out}");
    let echo = crate::harness::echo_server().await;
    let west_gw = Gw::start(
        &west,
        &fed_config(&west, [127, 0, 0, 3]).export("db.demo", port, vec![echo]),
    )
    .unwrap();
    let east_gw = Gw::start(&east, &fed_config(&east, [127, 0, 0, 2])).unwrap();
    let import = SocketAddr::new(ip, port);
    // A connection that has echoed a byte is open end to end (it holds a slot).
    async fn held(addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let mut c = tokio::net::TcpStream::connect(addr).await?;
        c.write_all(b"x").await?;
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(5), c.read(&mut b)).await {
            Ok(Ok(1)) => Ok(c),
            Ok(Ok(_)) => Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let first = loop {
        if let Ok(c) = held(import).await {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "import never served\n{}",
            east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let second = held(import)
        .await
        .expect("the second connection is within the pool");
    let third = held(import).await;
    assert!(
        third.is_err(),
        "a third connection was served past maxConnections: 2"
    );
    let overflow = west_gw
        .metric("meshfed_gateway_refusals_total{direction=\"ingress\",reason=\"overflow\"}")
        .await;
    eprintln!(
        "2 connections held, the third refused ({third:?}); overflow refusals at west: {overflow}"
    );
    assert!(overflow >= 1.0, "{}", west_gw.logs());
    // One closes: its slot is free again once the tunnel ends.
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while held(import).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "a closed connection's slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(second);
    drop(fed);
}

/// An endpoint (HTTP/1.1 or h2) that counts the connections it accepts and those that
/// ended.
async fn counting_endpoint(site: &'static str) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let l = listen();
    let addr = l.local_addr().unwrap();
    let (opened, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (o, c) = (opened.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            o.fetch_add(1, Ordering::SeqCst);
            let c = c.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    answer(site, 200, req)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, opened, closed)
}

/// West exports `web.demo` (HTTP/1.1 endpoint) and `web2.demo` (h2 endpoint), each a
/// [`counting_endpoint`], with a DestinationRule per service whose
/// `connectionPool.http` is `http_setting`; east imports both. Returned once each import
/// serves, with (protocol, import, connections opened, connections ended) per service.
struct PoolSites {
    _fed: crate::federation::Fed,
    _west_gw: Gw,
    _east_gw: Gw,
    imports: Vec<(&'static str, SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>)>,
    _scratch: Scratch,
}

async fn pool_sites(name: &str, http_setting: &str) -> PoolSites {
    let dr = |svc: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {svc}, namespace: demo}}\n\
             spec:\n  host: {svc}.demo\n  trafficPolicy: {{connectionPool: {{http: {{{http_setting}}}}}}}\n"
        )
    };
    let (h1, h1_opened, h1_closed) = counting_endpoint("h1").await;
    let (h2, h2_opened, h2_closed) = counting_endpoint("h2").await;
    let TwoAtWest {
        fed,
        west_gw,
        east_gw,
        imports: [import, import2],
        registered,
        scratch,
    } = two_at_west(
        name,
        "pool.yaml",
        |_, _| format!("{}---\n{}", dr("web"), dr("web2")),
        [("web.demo", h1, "http"), ("web2.demo", h2, "http2")],
    );
    assert!(
        registered.contains("web.demo") && registered.contains("web2.demo"),
        "{registered}"
    );
    let imports = vec![
        ("http", import, h1_opened, h1_closed),
        ("http2", import2, h2_opened, h2_closed),
    ];
    for (what, import, _, _) in &imports {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while curl(&[], &format!("http://{import}/")).0 != 200 {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: import never served\n{}",
                east_gw.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    PoolSites {
        _fed: fed,
        _west_gw: west_gw,
        _east_gw: east_gw,
        imports,
        _scratch: scratch,
    }
}

/// Issue 17 §2: a DestinationRule's `connectionPool.http.idleTimeout` (1 s), registered
/// at west, closes an endpoint connection that carried no request for that long, on an
/// HTTP/1.1 endpoint and on an h2 one; the next request dials anew. Before, the setting
/// was warned about and idle connections stayed open 90 s.
#[tokio::test(flavor = "multi_thread")]
async fn idle_timeout_closes_idle_endpoint_connections() {
    let PoolSites {
        _fed,
        _west_gw,
        _east_gw,
        imports,
        _scratch,
    } = pool_sites("http-idle", "idleTimeout: 1s").await;
    for (what, import, opened, closed) in &imports {
        // Every connection so far goes idle and closes within the timeout and a margin.
        let waiting = std::time::Instant::now();
        let deadline = waiting + Duration::from_secs(5);
        while closed.load(Ordering::SeqCst) < opened.load(Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: {} of {} endpoint connections closed after 5 s idle",
                closed.load(Ordering::SeqCst),
                opened.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let idle_closed = waiting.elapsed();
        let before = opened.load(Ordering::SeqCst);
        // Busy connections stay: 10 requests 200 ms apart ride one connection.
        let t = std::time::Instant::now();
        for _ in 0..10 {
            assert_eq!(curl(&[], &format!("http://{import}/")).0, 200);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let used = opened.load(Ordering::SeqCst) - before;
        eprintln!(
            "{what}: every idle connection closed {idle_closed:?} after this check began; 10 requests over {:?} used {used} new connection(s)",
            t.elapsed()
        );
        assert_eq!(used, 1, "{what}: a connection in use was closed");
    }
}

/// Issue 17 §2: a DestinationRule's `connectionPool.http.maxRequestsPerConnection`
/// (3), registered at west, closes each endpoint connection after 3 requests, on an
/// HTTP/1.1 endpoint (`http`) and on an h2 one (`http2`): 12 requests in a row from
/// east reach each endpoint over 4 connections (5 when a warm-up request left one
/// partly used). Before, the setting was warned about and every request rode one
/// connection.
#[tokio::test(flavor = "multi_thread")]
async fn max_requests_per_connection_closes_endpoint_connections() {
    let PoolSites {
        _fed,
        _west_gw,
        _east_gw,
        imports,
        _scratch,
    } = pool_sites("http-per-conn", "maxRequestsPerConnection: 3").await;
    for (what, import, conns, _) in &imports {
        let before = conns.load(Ordering::SeqCst);
        let statuses = gets(*import, 12, &[]).await;
        assert!(statuses.iter().all(|s| *s == 200), "{what}: {statuses:?}");
        let used = conns.load(Ordering::SeqCst) - before;
        eprintln!(
            "{what}: 12 requests over {used} new endpoint connections (maxRequestsPerConnection: 3)"
        );
        assert!((4..=5).contains(&used), "{what}: {used} connections");
    }
}

/// Subsets select endpoints by their labels, as Istio's do: west registers one
/// ServiceEntry whose two endpoints (WorkloadEntry-style labels `version: v1` and `v2`)
/// sit behind the same site, so no choice of site can tell them apart; the ingress picks
/// among the endpoints the request's subset selects. A subset no endpoint is in answers
/// 503 `no_ready_endpoint` and reaches nobody, and a client cannot name a subset itself.
#[tokio::test(flavor = "multi_thread")]
async fn subsets_select_endpoints_by_their_labels() {
    use crate::federation::{Fed, fed_config, free_port, joined};
    let scratch = Scratch::new("http-labels");
    let fed = Fed::start(&Fed::init(&scratch), 0);
    let [east, west] = joined(&scratch, &fed, ["east", "west"]);
    let ip: std::net::IpAddr = [127, 0, 0, 2].into();
    let port = free_port(ip);
    let (v1, v1_hits) = http_endpoint("v1", 200).await;
    let (v2, v2_hits) = http_endpoint("v2", 200).await;
    let yaml = format!(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web, namespace: demo}}
spec:
  hosts: [web.demo.example]
  ports: [{{number: {port}, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {}}}, labels: {{app: web, version: v1}}}}
  - {{address: 127.0.0.1, ports: {{http: {}}}, labels: {{app: web, version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web, namespace: demo}}
spec:
  host: web.demo.example
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
  - {{name: v3, labels: {{version: v3}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: demo}}
spec:
  hosts: [web.demo.example]
  http:
  - name: old
    match: [{{headers: {{x-old: {{exact: "1"}}}}}}]
    route: [{{destination: {{host: web.demo.example, subset: v1}}}}]
  - name: next
    match: [{{headers: {{x-next: {{exact: "1"}}}}}}]
    route: [{{destination: {{host: web.demo.example, subset: v3}}}}]
  - name: rest
    route: [{{destination: {{host: web.demo.example, subset: v2}}}}]
"#,
        v1.port(),
        v2.port()
    );
    let out = register_yaml(&west, "web.yaml", &yaml);
    assert!(out.contains("routes:web.demo"), "{out}");
    let _west_gw = Gw::start(&west, &fed_config(&west, [127, 0, 0, 3])).unwrap();
    let east_gw = Gw::start(&east, &fed_config(&east, [127, 0, 0, 2])).unwrap();
    let url = format!("http://{}/x", SocketAddr::new(ip, port));

    // Applied once the header rule reaches v1.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body, _) = curl(&["-H", "x-old: 1"], &url);
        if status == 200 && body.contains("site=v1") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the routes never applied: {status} {body}\n{}",
            east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let import = SocketAddr::new(ip, port);
    let hits = || {
        (
            v1_hits.load(Ordering::Relaxed),
            v2_hits.load(Ordering::Relaxed),
        )
    };
    // Everything else goes to v2 only, whatever the client says about subsets.
    let before = hits();
    let s = gets(import, 100, &[("meshfed-subset", "version=v1")]).await;
    assert!(s.iter().all(|s| *s == 200), "{s:?}");
    assert_eq!(hits(), (before.0, before.1 + 100), "v2 took all");
    let before = hits();
    let s = gets(import, 50, &[("x-old", "1")]).await;
    assert!(s.iter().all(|s| *s == 200), "{s:?}");
    assert_eq!(hits(), (before.0 + 50, before.1), "v1 took the header's");
    // No endpoint has version v3: refused, and nothing reached an endpoint.
    let before = hits();
    let (status, body, error) = curl(&["-H", "x-next: 1"], &url);
    assert_eq!(
        (status, error.as_str()),
        (503, "no_ready_endpoint"),
        "{body}"
    );
    assert_eq!(hits(), before);
}

/// An HTTP link lives long (the egress keeps it), so each request is decided again at
/// the ingress: an endpoint withdrawn while links are open gets no more requests once
/// the gateway applied the change, and an endpoint added gets its share, without a
/// failed request.
#[tokio::test(flavor = "multi_thread")]
async fn endpoints_changed_under_live_links_take_effect_per_request() {
    use crate::federation::{Fed, fed_config, free_port, joined};
    let scratch = Scratch::new("http-churn");
    let fed = Fed::start(&Fed::init(&scratch), 0);
    let [east, west] = joined(&scratch, &fed, ["east", "west"]);
    let ip: std::net::IpAddr = [127, 0, 0, 2].into();
    let port = free_port(ip);
    let (a, a_hits) = http_endpoint("a", 200).await;
    let (b, b_hits) = http_endpoint("b", 200).await;
    let (c, c_hits) = http_endpoint("c", 200).await;
    let entry = |eps: &[SocketAddr]| {
        let eps: String = eps
            .iter()
            .map(|e| {
                format!(
                    "  - {{address: 127.0.0.1, ports: {{http: {}}}}}\n",
                    e.port()
                )
            })
            .collect();
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: web, namespace: demo}}\nspec:\n  hosts: [web.demo.example]\n  ports: [{{number: {port}, name: http, protocol: HTTP}}]\n  resolution: STATIC\n  endpoints:\n{eps}"
        )
    };
    register_yaml(&west, "web.yaml", &entry(&[a, b]));
    let _west_gw = Gw::start(&west, &fed_config(&west, [127, 0, 0, 3])).unwrap();
    let east_gw = Gw::start(&east, &fed_config(&east, [127, 0, 0, 2])).unwrap();
    let import = SocketAddr::new(ip, port);
    let hits = || [&a_hits, &b_hits, &c_hits].map(|h| h.load(Ordering::Relaxed));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(import).await.is_err()
        || gets(import, 1, &[]).await != [200]
    {
        assert!(std::time::Instant::now() < deadline, "{}", east_gw.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = hits();
    assert!(gets(import, 40, &[]).await.iter().all(|s| *s == 200));
    let after = hits();
    assert!(
        after[0] > before[0] && after[1] > before[1],
        "{before:?} → {after:?}"
    );

    // Withdraw a, add c, while requests flow over the same links.
    register_yaml(&west, "web.yaml", &entry(&[b, c]));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let before = hits();
        let s = gets(import, 20, &[]).await;
        assert!(
            s.iter().all(|s| *s == 200),
            "a request failed during the change: {s:?}"
        );
        let now = hits();
        if now[0] == before[0] && now[2] > before[2] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the change never applied on the open links: {before:?} → {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Applied: a gets nothing more, b and c share.
    let before = hits();
    assert!(gets(import, 200, &[]).await.iter().all(|s| *s == 200));
    let after = hits();
    assert_eq!(after[0], before[0], "a withdrawn endpoint got requests");
    assert!(
        after[1] - before[1] >= 80 && after[2] - before[2] >= 80,
        "{before:?} → {after:?}"
    );

    // A policy that denies the port, registered while the links stay open: 403 denied,
    // and no endpoint sees the request.
    register_yaml(
        &west,
        "deny.yaml",
        &format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: closed, namespace: demo}}\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation: {{ports: [\"{port}\"]}}\n"
        ),
    );
    let url = format!("http://{import}/x");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body, error) = curl(&[], &url);
        if status == 403 {
            assert_eq!(error, "denied", "{body}");
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(
            std::time::Instant::now() < deadline,
            "the policy never applied on the open links"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = hits();
    assert!(gets(import, 20, &[]).await.iter().all(|s| *s == 403));
    assert_eq!(hits(), before, "a denied request reached an endpoint");

    // Links opened after the policy (a restarted importer): the far side refuses their
    // open, and the answer is the same 403 `denied` (it was a 503).
    let mut east_gw = east_gw;
    east_gw.kill();
    let east_gw = Gw::start(&east, &fed_config(&east, [127, 0, 0, 2])).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(import).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "{}", east_gw.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body, error) = curl(&[], &url);
    assert_eq!((status, error.as_str()), (403, "denied"), "{body}");
    assert_eq!(hits(), before, "a denied request reached an endpoint");
}

/// Issue 17 §2/§4: a VirtualService registered at west mirrors `web.demo`'s requests,
/// with Istio's `mirrors`, to two places: another service, `web-v2.demo` (a new version
/// that is a Service of its own), through the importing gateway's import of it, and
/// `web.demo` itself. Every request is answered by v1; v2 gets a copy of each, and v1 a
/// copy of each beside the request. Before, a mirror host other than the route's service
/// was refused at registration, and `mirrors` was ignored with a warning.
#[tokio::test(flavor = "multi_thread")]
async fn mirrors_copy_to_another_service_through_its_import_and_to_the_service_itself() {
    let V1V2 {
        fed,
        _west_gw,
        east_gw,
        import: _,
        base,
        v1_hits,
        v2_hits,
        _scratch,
    } = v1_v2_at_west("http-mirror-other", "shadow.yaml", |_, port_v2| {
        format!(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web-shadow, namespace: demo}}
spec:
  hosts: [web.demo]
  http:
  - route: [{{destination: {{host: web.demo}}}}]
    mirrors:
    - destination: {{host: web-v2.demo, port: {{number: {port_v2}}}}}
    - destination: {{host: web.demo}}
      percentage: {{value: 100}}
"#
        )
    })
    .await;

    // Applied once a copy reaches v2.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while v2_hits.load(Ordering::Relaxed) == 0 {
        let _ = curl(&[], &format!("{base}/warm"));
        assert!(
            std::time::Instant::now() < deadline,
            "no copy reached web-v2.demo\n{}",
            east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = (
        v1_hits.load(Ordering::Relaxed),
        v2_hits.load(Ordering::Relaxed),
    );
    for _ in 0..40 {
        let (status, body, _) = curl(&[], &format!("{base}/x"));
        assert_eq!(status, 200);
        assert!(
            body.contains("site=v1"),
            "a mirror answered the caller: {body}"
        );
    }
    // Copies are fire-and-forget: give the last ones a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while (v2_hits.load(Ordering::Relaxed) - before.1 < 40
        || v1_hits.load(Ordering::Relaxed) - before.0 < 80)
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (to_v1, to_v2) = (
        v1_hits.load(Ordering::Relaxed) - before.0,
        v2_hits.load(Ordering::Relaxed) - before.1,
    );
    let sent = east_gw
        .metric("meshfed_gateway_http_mirrors_total{result=\"sent\"}")
        .await;
    eprintln!(
        "40 requests: v1 got {to_v1} (answers and copies), web-v2.demo got {to_v2} copies ({sent} sent in all)"
    );
    assert_eq!((to_v1, to_v2), (80, 40));
    drop(fed);
}

/// Serves `html` at `/` on a port of its own at 127.0.0.1 (a page of another origin
/// than the import).
async fn page_server(html: String) -> SocketAddr {
    let l = listen();
    let addr = l.local_addr().unwrap();
    let html = Bytes::from(html);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let html = html.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: hyper::Request<Incoming>| {
                    let mut r = hyper::Response::new(Full::new(html.clone()));
                    r.headers_mut()
                        .insert("content-type", "text/html".parse().unwrap());
                    async move { Ok::<_, std::convert::Infallible>(r) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// A page that calls `http://{import}/api` with a GET and with a PUT carrying a custom
/// header (which needs a preflight), sending cookies as `credentials` says (`fetch`'s
/// option), and shows `done get=STATUS:X-UPSTREAM put=…` (`blocked` where the browser
/// refused the call, `hidden` where it hid the header).
fn cors_page(import: SocketAddr, credentials: &str) -> String {
    format!(
        r#"<html><body><pre id="out">pending</pre><script>
async function go() {{
  const url = "http://{import}/api";
  const out = [];
  for (const [name, opts] of [["get", {{}}], ["put", {{method: "PUT", headers: {{"x-custom": "1"}}}}]]) {{
    try {{
      const r = await fetch(url, Object.assign({{credentials: "{credentials}"}}, opts));
      out.push(name + "=" + r.status + ":" + (r.headers.get("x-upstream") || "hidden"));
    }} catch (e) {{
      out.push(name + "=blocked");
    }}
  }}
  document.getElementById("out").textContent = "done " + out.join(" ");
}}
go();
</script></body></html>"#
    )
}

/// The `<pre id="out">` text of the page at `url`, as headless chromium ran it.
fn chromium_out(url: &str, profile: &std::path::Path) -> String {
    let dom = crate::federation::chromium_dom(url, profile);
    dom.split("<pre id=\"out\">")
        .nth(1)
        .and_then(|t| t.split("</pre>").next())
        .unwrap_or(&dom)
        .to_owned()
}

/// Sends a preflight (`send`, [`curl_head`]'s answer) until the egress answers it with
/// CORS headers, i.e. until `what` (the policy) applied, for up to 20 s; its headers.
async fn applied_preflight(send: impl Fn() -> (u16, String, String, String), what: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, head, _, _) = send();
        if status == 200 && head.contains("access-control-allow-origin") {
            return head;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} never applied: {status} {head}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks a [`cors_page`]'s text: both calls answered 200 by west or north, with the
/// exposed header readable.
fn assert_both_calls_answered(text: &str) {
    assert!(text.starts_with("done "), "{text}");
    let fields: Vec<&str> = text.split_whitespace().skip(1).collect();
    assert_eq!(fields.len(), 2, "{text}");
    for (f, name) in fields.iter().zip(["get", "put"]) {
        let rest = f
            .strip_prefix(&format!("{name}=200:"))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(rest == "west" || rest == "north", "{text}");
    }
}

/// Issue 17 §2: a VirtualService's `corsPolicy`, registered at west, applies at east's
/// egress, checked by a browser nobody here wrote (headless chromium). A page of the
/// allowed origin reads a GET's answer and an exposed header, and makes a PUT with a
/// custom header, whose preflight the egress answers without forwarding it; a page of
/// another origin is refused both by the browser. Before, `corsPolicy` was warned about
/// and ignored, and the browser refused every cross-origin call.
#[tokio::test(flavor = "multi_thread")]
async fn cors_policy_lets_a_browser_call_across_origins() {
    let page = |import| cors_page(import, "same-origin");
    let sites = http_sites("http-cors", (200, 200), 0, |_| {}).await;
    // The same page from two origins; the policy allows the first.
    let allowed = page_server(page(sites.import)).await;
    let other = page_server(page(sites.import)).await;
    let vs = format!(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: demo}}
spec:
  hosts: [web.demo]
  http:
  - route: [{{destination: {{host: web.demo}}}}]
    corsPolicy:
      allowOrigins: [{{exact: "http://{allowed}"}}]
      allowMethods: [GET, PUT]
      allowHeaders: [x-custom]
      exposeHeaders: [x-upstream]
      maxAge: 10m
"#
    );
    let out = register_yaml(&sites.west, "cors.yaml", &vs);
    assert!(out.contains("routes:web.demo"), "{out}");
    // Applied once a preflight is answered at the egress.
    let url = format!("http://{}/api", sites.import);
    let origin = format!("Origin: http://{allowed}");
    let preflight = [
        "-X",
        "OPTIONS",
        "-H",
        origin.as_str(),
        "-H",
        "Access-Control-Request-Method: PUT",
    ];
    let head = applied_preflight(|| curl_head(&preflight, &url), "the corsPolicy").await;
    for h in [
        format!("access-control-allow-origin: http://{allowed}"),
        "access-control-allow-methods: GET,PUT".into(),
        "access-control-allow-headers: x-custom".into(),
        "access-control-max-age: 600".into(),
    ] {
        assert!(head.contains(&h), "{h}: {head}");
    }
    // The preflight never reached an endpoint.
    let before = sites.endpoint_hits();
    let (status, _, _, _) = curl_head(&preflight, &url);
    assert_eq!((status, sites.endpoint_hits()), (200, before));

    let scratch = &sites._scratch.0;
    // Both calls answered; the exposed header is readable; the PUT went through.
    let text = chromium_out(
        &format!("http://{allowed}/"),
        &scratch.join("chromium-allowed"),
    );
    assert_both_calls_answered(&text);
    // Another origin: the browser refuses both (the GET's answer has no
    // access-control-allow-origin; the PUT's preflight is forwarded and not allowed).
    let text = chromium_out(&format!("http://{other}/"), &scratch.join("chromium-other"));
    assert_eq!(text, "done get=blocked put=blocked");
}

/// A route's pieces apply in Envoy's filter order (fault, CORS, local rate limit,
/// router), registered at west and applied at east: a route whose fault aborts every
/// request aborts its CORS preflights too and never spends its rate limit; a
/// rate-limited route's 429 carries the CORS headers; a redirect carries the route's
/// answer headers and CORS headers. Before, the rate limit, CORS preflights and
/// redirects were answered ahead of the route's fault, and the 429 and the redirect had
/// neither.
#[tokio::test(flavor = "multi_thread")]
async fn a_routes_fault_comes_before_its_cors_rate_limit_and_redirect() {
    let sites = http_sites("http-filter-order", (200, 200), 0, |_| {}).await;
    let cors =
        "    corsPolicy: {allowOrigins: [{exact: \"http://a.example\"}], allowMethods: [GET]}\n";
    let vs = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: web\n  namespace: demo\n\
         \x20 annotations:\n    ratelimit.meshfed.io/route.faulty: 1/s\n    ratelimit.meshfed.io/route.limited: 1/s\n\
         \x20   ratelimit.meshfed.io/burst: \"1\"\n\
         spec:\n  hosts: [web.demo]\n  http:\n\
         \x20 - name: faulty\n    match: [{{uri: {{prefix: /faulty}}}}]\n    fault: {{abort: {{httpStatus: 418, percentage: {{value: 100}}}}}}\n{cors}\
         \x20   route: [{{destination: {{host: web.demo}}}}]\n\
         \x20 - name: limited\n    match: [{{uri: {{prefix: /limited}}}}]\n{cors}    route: [{{destination: {{host: web.demo}}}}]\n\
         \x20 - name: moved\n    match: [{{uri: {{prefix: /moved}}}}]\n    redirect: {{uri: /new}}\n\
         \x20   headers: {{response: {{set: {{x-route: moved}}}}}}\n{cors}\
         \x20 - route: [{{destination: {{host: web.demo}}}}]\n"
    );
    let out = register_yaml(&sites.west, "order.yaml", &vs);
    assert!(out.contains("routes:web.demo"), "{out}");
    let base = format!("http://{}", sites.import);
    let origin = ["-H", "Origin: http://a.example"];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let head = loop {
        let (status, head, _, _) = curl_head(&origin, &format!("{base}/moved/x"));
        if status == 301 {
            break head;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the routes never applied: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The redirect: the route's answer headers and CORS headers.
    for h in [
        "x-route: moved",
        "access-control-allow-origin: http://a.example",
    ] {
        assert!(head.contains(h), "{h}: {head}");
    }
    // The fault first: the preflight is aborted, and no request reaches the rate limit.
    let preflight = [
        "-X",
        "OPTIONS",
        "-H",
        "Origin: http://a.example",
        "-H",
        "Access-Control-Request-Method: GET",
    ];
    let (status, head, _, _) = curl_head(&preflight, &format!("{base}/faulty"));
    assert_eq!(status, 418, "{head}");
    assert!(!head.contains("access-control-allow-origin"), "{head}");
    for _ in 0..20 {
        assert_eq!(curl(&origin, &format!("{base}/faulty")).0, 418);
    }
    let limited = |route: &str| {
        format!(
            "meshfed_gateway_http_rate_limited_total{{import=\"web.demo:{}\",route=\"{route}\"}}",
            sites.import.port()
        )
    };
    assert_eq!(sites.east_gw.metric(&limited("faulty")).await, 0.0);
    // The rate limit's 429 passes CORS on the way out.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let (status, head, _, _) = curl_head(&origin, &format!("{base}/limited"));
        if status == 429 {
            assert!(
                head.contains("access-control-allow-origin: http://a.example"),
                "{head}"
            );
        }
        statuses.push(status);
    }
    assert!(
        statuses.contains(&429) && statuses.contains(&200),
        "{statuses:?}"
    );
    assert!(sites.east_gw.metric(&limited("limited")).await >= 1.0);
}

/// Issue 17 §2: a Gateway API HTTPRoute's `CORS` filter (the experimental channel's
/// HTTPCORSFilter), registered at west, applies at east's egress, checked by headless
/// chromium making credentialed calls. The allowed origin is a wildcard
/// (`http://*.0.0.1:PORT`); methods and headers are `*`, which a browser reads as a name
/// on a credentialed call, so the egress answers a preflight with what it asked for
/// (the Gateway API's rule). Another origin's preflight is answered at the egress
/// without CORS headers (the Gateway API's, Istio's `IGNORE`), never forwarded. Before,
/// a `CORS` filter was refused ("one of RequestHeaderModifier, …").
#[tokio::test(flavor = "multi_thread")]
async fn an_http_route_cors_filter_lets_a_browser_call_with_credentials() {
    let sites = http_sites("http-route-cors", (200, 200), 0, |_| {}).await;
    let allowed = page_server(cors_page(sites.import, "include")).await;
    let other = page_server(cors_page(sites.import, "include")).await;
    let port = sites.import.port();
    let route = format!(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web, namespace: demo}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web}}]
  rules:
  - filters:
    - type: CORS
      cors:
        allowOrigins: ["http://*.0.0.1:{}"]
        allowMethods: ["*"]
        allowHeaders: ["*"]
        exposeHeaders: [x-upstream]
        allowCredentials: true
    backendRefs: [{{name: web, port: {port}}}]
"#,
        allowed.port()
    );
    let out = register_yaml(&sites.west, "cors-route.yaml", &route);
    assert!(out.contains("routes:web.demo"), "{out}");
    let url = format!("http://{}/api", sites.import);
    let preflight = |origin: SocketAddr| {
        curl_head(
            &[
                "-X",
                "OPTIONS",
                "-H",
                &format!("Origin: http://{origin}"),
                "-H",
                "Access-Control-Request-Method: PATCH",
                "-H",
                "Access-Control-Request-Headers: x-a,x-b",
            ],
            &url,
        )
    };
    let head = applied_preflight(|| preflight(allowed), "the CORS filter").await;
    for h in [
        format!("access-control-allow-origin: http://{allowed}"),
        "access-control-allow-credentials: true".into(),
        "access-control-allow-methods: PATCH".into(),
        "access-control-allow-headers: x-a,x-b".into(),
        "access-control-max-age: 5".into(),
    ] {
        assert!(head.contains(&h), "{h}: {head}");
    }
    // Another origin's preflight is answered here, bare, and reaches no endpoint.
    let before = sites.endpoint_hits();
    let (status, head, _, _) = preflight(other);
    assert_eq!((status, sites.endpoint_hits()), (200, before), "{head}");
    assert!(!head.contains("access-control-"), "{head}");

    let scratch = &sites._scratch.0;
    let text = chromium_out(
        &format!("http://{allowed}/"),
        &scratch.join("chromium-allowed"),
    );
    assert_both_calls_answered(&text);
    let text = chromium_out(&format!("http://{other}/"), &scratch.join("chromium-other"));
    assert_eq!(text, "done get=blocked put=blocked");
}

/// Runs tests/data/h2_reset_flood.py (the PyPI `h2` library) against `addr`: `streams`
/// requests in batches of `batch`, each batch reset `pause_ms` after it was sent, each
/// asking the endpoint to answer `delay_ms` late. Its JSON report.
async fn h2_reset_flood(
    addr: SocketAddr,
    streams: u32,
    (batch, pause_ms, delay_ms): (u32, u32, u32),
) -> serde_json::Value {
    let out = tokio::process::Command::new("/opt/meshfed-tools/bin/python")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/h2_reset_flood.py"
        ))
        .args(["127.0.0.1".to_string(), addr.port().to_string()])
        .args([streams, batch, pause_ms].map(|n| n.to_string()))
        .arg(format!("x-delay-ms: {delay_ms}"))
        .output()
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(report.trim())
        .unwrap_or_else(|e| panic!("{e}: {report} {}", String::from_utf8_lossy(&out.stderr)))
}

/// The rapid-reset attacker was cut early: by the premature-reset rule (the connection
/// closed, after 250 to 1,000 requests), or, when the gateway was slow to accept its
/// streams (a loaded host), by h2's own bound on resets of streams not yet accepted
/// (GOAWAY `ENHANCE_YOUR_CALM`, after 20 or more). Either counts as `premature_resets`.
fn assert_cut_for_resets(attack: &serde_json::Value, logs: &str) {
    let sent = attack["streams"].as_u64().unwrap();
    match attack["ended"].as_str() {
        Some("closed") => assert!((250..=1000).contains(&sent), "{attack}"),
        Some("goaway: ENHANCE_YOUR_CALM") => assert!((20..=1000).contains(&sent), "{attack}"),
        _ => panic!("the attacker was not cut: {attack}\n{logs}"),
    }
}

/// h2 "rapid reset" (CVE-2023-44487) at an HTTP import, from the PyPI `h2` library: a
/// client sends requests in batches of 20 and resets each batch 20 ms later, once the
/// gateway has accepted them (h2's own bound catches only resets of streams not yet
/// accepted). Each reset request had cost a routed request, a link stream and, at
/// west, its pooled endpoint connection, which a cancelled HTTP/1.1 request cannot be
/// reused on: before, one client connection sent 5,000 such requests unchecked, and
/// west opened 4,189-4,576 connections to the endpoint for them. Now the connection is
/// cut once half of at least 500 requests were reset within 1 s before their answer
/// (Envoy's rule: after 250 at the earliest), counted as `premature_resets`; a client
/// that resets only requests already answered is never cut, and others are served.
#[tokio::test(flavor = "multi_thread")]
async fn an_h2_client_that_resets_its_requests_at_once_is_cut() {
    let (_sites, east_gw) = web_sites("h2-reset", meshfed_lab::ConfigBuilder::default()).await;
    let import = east_gw.import("web.demo:8080");
    let url = format!("http://{import}/");
    assert_eq!(curl(&[], &url).0, 200, "{}", east_gw.logs());
    let cut = "meshfed_gateway_refusals_total{direction=\"egress\",reason=\"premature_resets\"}";

    // The endpoint answers 30 ms late, so a reset 20 ms after the request is premature.
    let attack = h2_reset_flood(import, 5000, (20, 20, 30)).await;
    eprintln!("attacker: {attack}");
    assert_cut_for_resets(&attack, &east_gw.logs());
    assert_eq!(
        east_gw.wait_metric(cut, 1.0, Duration::from_secs(5)).await,
        1.0,
        "{}",
        east_gw.logs()
    );
    assert!(
        east_gw
            .wait_log(
                "(premature_resets, HTTP/2 rapid reset)",
                Duration::from_secs(5)
            )
            .await
    );
    assert_eq!(curl(&[], &url).0, 200, "{}", east_gw.logs());

    // Resets of requests already answered (each batch waited for): never cut.
    let calm = h2_reset_flood(import, 600, (50, 300, 0)).await;
    eprintln!("calm client: {calm}");
    assert_eq!(calm["ended"], serde_json::Value::Null, "{calm}");
    assert_eq!(calm["responses"], 600, "{calm}");
    assert_eq!(east_gw.metric(cut).await, 1.0);
}

/// The same attack through an import that carries bytes (east's static config declares
/// the port `tcp`; west exports it as `http`): west's ingress serves the client's h2
/// itself on the client's stream, and cuts that stream by the same rule
/// (`direction="ingress"`). Before, it served all 5,000 requests.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_resetting_its_requests_through_a_tcp_import_is_cut_by_the_far_side() {
    let scratch = Scratch::new("h2-reset-l4");
    let west = scratch.site("west", "west.example.org");
    let east_site = scratch.site("east", "east.example.org");
    let (web, _) = http_endpoint("west", 200).await;
    let west_gw = Gw::start(
        &west,
        &meshfed_lab::ConfigBuilder::default()
            .export("web.demo", 8080, vec![web])
            .speaks("web.demo", 8080, "http")
            .peer(&east_site, None),
    )
    .unwrap();
    let east_gw = Gw::start(
        &east_site,
        &meshfed_lab::ConfigBuilder::default()
            .peer(&west, Some(west_gw.quic))
            .import("web.demo", 8080, "west", ([127, 0, 0, 1], 0).into()),
    )
    .unwrap();
    let import = east_gw.import("web.demo:8080");
    let url = format!("http://{import}/");
    assert_eq!(
        curl(&["--http2-prior-knowledge"], &url).0,
        200,
        "{}",
        west_gw.logs()
    );
    let attack = h2_reset_flood(import, 5000, (20, 20, 30)).await;
    eprintln!("attacker: {attack}");
    assert_cut_for_resets(&attack, &west_gw.logs());
    let cut = "meshfed_gateway_refusals_total{direction=\"ingress\",reason=\"premature_resets\"}";
    assert_eq!(
        west_gw.wait_metric(cut, 1.0, Duration::from_secs(5)).await,
        1.0
    );
    assert_eq!(curl(&["--http2-prior-knowledge"], &url).0, 200);
    let calm = h2_reset_flood(import, 600, (50, 300, 0)).await;
    assert_eq!(calm["ended"], serde_json::Value::Null, "{calm}");
    assert_eq!(calm["responses"], 600, "{calm}");
}
