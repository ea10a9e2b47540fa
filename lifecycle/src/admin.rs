//! The admin HTTP port: `/metrics` (Prometheus text), `/ready`, `/live`. It runs apart
//! from the data plane's listeners and closes last. `/ready` is false, with the reason in
//! its body, while starting or draining, when the component's own [`ReadyCheck`] fails,
//! and when the SVID is about to expire. A component adds its own JSON debug pages
//! (the gateway's `/debug/config`, `/debug/peers`, `/debug/imports`).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

#[derive(Clone)]
pub struct Admin {
    pub registry: Arc<Registry>,
    /// False until every listener is up, and again from the start of a drain.
    pub ready: Arc<AtomicBool>,
    /// When set, `/ready` is also false once the SVID in use expires within `margin`:
    /// the next reload could not replace it before peers refuse it.
    pub svid_expiry: Option<SvidExpiry>,
    /// The component's own condition for serving (the gateway: a catalog applied; the
    /// federation: its store reachable): `Some(why)` makes `/ready` false with that reason.
    pub check: Option<ReadyCheck>,
    /// Debug pages (`/debug/...`), each a JSON document rendered on request.
    pub pages: Vec<(&'static str, Page)>,
    /// Static HTML pages (the federation's `/topology`), by path.
    pub html: Vec<(&'static str, &'static str)>,
    /// `/debug/probe?QUERY`: an asynchronous check the component runs on request (the
    /// gateway: one real open toward a site), answering a status and a JSON document.
    pub probe: Option<Probe>,
}

/// Runs a probe for a query string; its HTTP status and JSON.
pub type Probe = Arc<
    dyn Fn(String) -> std::pin::Pin<Box<dyn std::future::Future<Output = (u16, String)> + Send>>
        + Send
        + Sync,
>;

/// Renders one debug page's JSON.
pub type Page = Arc<dyn Fn() -> String + Send + Sync>;

/// Why a component cannot serve now, or `None` when it can. Called on each `/ready`.
pub type ReadyCheck = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// The SVID's notAfter (the gauge the gateway exports) and how early to stop being ready.
#[derive(Clone)]
pub struct SvidExpiry {
    pub not_after: prometheus_client::metrics::gauge::Gauge,
    pub margin: std::time::Duration,
}

/// Why `/ready` is false, from the SVID's notAfter and the time now (Unix seconds). Pure.
pub fn svid_not_ready(not_after: i64, margin: std::time::Duration, now: i64) -> Option<String> {
    let margin = i64::try_from(margin.as_secs()).unwrap_or(i64::MAX);
    if not_after <= now {
        Some(format!("SVID expired {}s ago", now - not_after))
    } else if not_after <= now.saturating_add(margin) {
        Some(format!(
            "SVID expires in {}s, within the reload interval ({margin}s)",
            not_after - now
        ))
    } else {
        None
    }
}

/// OpenMetrics text as Prometheus' classic text format (0.0.4): a counter family's
/// `HELP` and `TYPE` name its `_total` samples, `info` becomes a gauge named as its
/// samples, `UNIT` and `EOF` lines go. Pure.
pub fn openmetrics_to_text(om: &str) -> String {
    use std::collections::HashMap;
    let mut kinds: HashMap<&str, &str> = HashMap::new();
    for l in om.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            kinds.insert(name, kind);
        }
    }
    let renamed = |name: &str| -> (String, Option<&str>) {
        match kinds.get(name).copied() {
            Some("counter") => (format!("{name}_total"), None),
            Some("info") => (format!("{name}_info"), Some("gauge")),
            Some("gaugehistogram" | "stateset") => (name.to_owned(), Some("gauge")),
            Some("unknown") => (name.to_owned(), Some("untyped")),
            _ => (name.to_owned(), None),
        }
    };
    let mut out = String::with_capacity(om.len());
    for l in om.lines() {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = l.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let (name, _) = renamed(name);
            out.push_str(&format!("# HELP {name} {help}\n"));
        } else if let Some(rest) = l.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, as_kind) = renamed(name);
            out.push_str(&format!("# TYPE {name} {}\n", as_kind.unwrap_or(kind)));
        } else {
            // Exemplars (` # {...}`) are OpenMetrics only.
            let sample = l.split_once(" # {").map_or(l, |(s, _)| s);
            out.push_str(sample);
            out.push('\n');
        }
    }
    out
}

/// How long a client of the admin port has to send a request's head, and how long an
/// idle keep-alive connection stays open: a client that sends nothing, or its head a
/// byte at a time, holds a connection for no longer.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Admin connections served at once; more wait in the listen backlog. Scrapers and
/// `meshfed diagnose` need a few.
pub const MAX_CONNECTIONS: usize = 256;

impl Admin {
    pub async fn serve(self, listener: TcpListener, stop: CancellationToken) {
        self.serve_within(listener, stop, HEADER_TIMEOUT, MAX_CONNECTIONS)
            .await
    }

    /// [`Admin::serve`] with its header timeout and connection bound given.
    pub async fn serve_within(
        self,
        listener: TcpListener,
        stop: CancellationToken,
        header_timeout: std::time::Duration,
        max_connections: usize,
    ) {
        let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
        loop {
            let slot = tokio::select! {
                s = slots.clone().acquire_owned() => match s {
                    Ok(s) => s,
                    Err(_) => return,
                },
                _ = stop.cancelled() => return,
            };
            let (tcp, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors, most likely: wait instead of spinning.
                        debug!(error = %e, "admin accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            let this = self.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let svc = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.handle(req).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await
                {
                    debug!(error = %e, "admin connection");
                }
            });
        }
    }

    fn not_ready(&self) -> Option<String> {
        if !self.ready.load(Ordering::Acquire) {
            return Some("starting or draining".into());
        }
        if let Some(why) = self.check.as_ref().and_then(|c| c()) {
            return Some(why);
        }
        let e = self.svid_expiry.as_ref()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        svid_not_ready(e.not_after.get(), e.margin, now)
    }

    async fn handle<B>(&self, req: Request<B>) -> Response<Full<Bytes>> {
        let (status, ctype, body) = match req.uri().path() {
            "/debug/probe" if self.probe.is_some() => {
                let probe = self.probe.clone().expect("checked");
                let (status, body) = probe(req.uri().query().unwrap_or_default().to_owned()).await;
                (
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    "application/json",
                    body,
                )
            }
            "/metrics" => {
                let mut out = String::new();
                // OpenMetrics when the scraper asks for it (Prometheus does), else the
                // classic text format that `curl` users and older tools read.
                let openmetrics = req
                    .headers()
                    .get_all(hyper::header::ACCEPT)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .any(|v| v.contains("application/openmetrics-text"));
                match prometheus_client::encoding::text::encode(&mut out, &self.registry) {
                    Ok(()) if openmetrics => (
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        out,
                    ),
                    Ok(()) => (
                        StatusCode::OK,
                        "text/plain; version=0.0.4; charset=utf-8",
                        openmetrics_to_text(&out),
                    ),
                    Err(e) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        e.to_string(),
                    ),
                }
            }
            "/ready" => match self.not_ready() {
                None => (StatusCode::OK, "text/plain", "ready\n".into()),
                Some(why) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {why}\n"),
                ),
            },
            "/live" => (StatusCode::OK, "text/plain", "live\n".into()),
            path if self.html.iter().any(|(p, _)| *p == path) => {
                let page = self
                    .html
                    .iter()
                    .find(|(p, _)| *p == path)
                    .map_or("", |(_, b)| b);
                (StatusCode::OK, "text/html; charset=utf-8", page.to_owned())
            }
            path => match self.pages.iter().find(|(p, _)| *p == path) {
                Some((_, render)) => (StatusCode::OK, "application/json", render()),
                None => {
                    let mut known = String::from("/metrics, /ready, /live");
                    for (p, _) in &self.pages {
                        known.push_str(", ");
                        known.push_str(p);
                    }
                    if self.probe.is_some() {
                        known.push_str(", /debug/probe");
                    }
                    for (p, _) in &self.html {
                        known.push_str(", ");
                        known.push_str(p);
                    }
                    (
                        StatusCode::NOT_FOUND,
                        "text/plain",
                        format!("not found: try {known}\n"),
                    )
                }
            },
        };
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        if let Ok(v) = ctype.parse() {
            resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        resp
    }
}

/// Why [`get`] failed.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("connect {addr}: {source}")]
    Connect {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("admin request: {0}")]
    Request(#[from] hyper::http::Error),
}

/// GETs `path` from an admin port: for `meshfed` commands, the demo and tests.
pub async fn get(addr: std::net::SocketAddr, path: &str) -> Result<(StatusCode, String), GetError> {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| GetError::Connect { addr, source })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(http_body_util::Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A client that sends nothing, or stops mid-head, is cut after the header timeout,
    /// and past the connection bound the next client waits for a slot instead of
    /// each one holding a descriptor and a task.
    #[tokio::test]
    async fn idle_and_slow_clients_are_cut_and_connections_bounded() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let admin = Admin {
            registry: Arc::new(Registry::default()),
            ready: Arc::new(AtomicBool::new(true)),
            svid_expiry: None,
            check: None,
            pages: vec![],
            html: vec![],
            probe: None,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let timeout = Duration::from_millis(300);
        tokio::spawn(admin.serve_within(listener, stop.clone(), timeout, 2));
        let cut = |mut c: tokio::net::TcpStream| async move {
            let mut buf = [0u8; 256];
            let started = std::time::Instant::now();
            let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
                .await
                .expect("never cut")
                .unwrap_or(0);
            assert!(
                n == 0 || buf.starts_with(b"HTTP/1.1 408"),
                "{:?}",
                &buf[..n]
            );
            started.elapsed()
        };
        // Nothing sent.
        let mute = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(cut(mute).await >= Duration::from_millis(250));
        // Half a head.
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        assert!(cut(slow).await >= Duration::from_millis(250));

        // Both slots held by silent clients: a real request waits for one to be cut,
        // then is served.
        let held = [
            tokio::net::TcpStream::connect(addr).await.unwrap(),
            tokio::net::TcpStream::connect(addr).await.unwrap(),
        ];
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        let (status, _) = tokio::time::timeout(Duration::from_secs(5), get(addr, "/live"))
            .await
            .expect("served once a slot is free")
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "{:?}",
            started.elapsed()
        );
        drop(held);
        stop.cancel();
    }

    #[test]
    fn openmetrics_reads_as_classic_text() {
        let om = "# HELP c Things.\n# TYPE c counter\nc_total{a=\"1\"} 3\n\
                  # HELP g Level.\n# TYPE g gauge\n# UNIT g bytes\ng 2\n\
                  # HELP b Build.\n# TYPE b info\nb_info{v=\"1\"} 1\n\
                  # HELP h Latency.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1 # {trace_id=\"x\"} 0.1\nh_sum 0.1\nh_count 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP c_total Things.\n# TYPE c_total counter\nc_total{a=\"1\"} 3\n\
             # HELP g Level.\n# TYPE g gauge\ng 2\n\
             # HELP b_info Build.\n# TYPE b_info gauge\nb_info{v=\"1\"} 1\n\
             # HELP h Latency.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 0.1\nh_count 1\n"
        );
    }

    #[test]
    fn ready_follows_the_svid_expiry() {
        let m = Duration::from_secs(5);
        assert_eq!(svid_not_ready(1_000, m, 900), None);
        assert_eq!(svid_not_ready(1_000, m, 994), None);
        let e = svid_not_ready(1_000, m, 995).unwrap();
        assert!(e.contains("expires in 5s"), "{e}");
        let e = svid_not_ready(1_000, m, 1_000).unwrap();
        assert!(e.contains("expired 0s ago"), "{e}");
        let e = svid_not_ready(1_000, m, 1_060).unwrap();
        assert!(e.contains("expired 60s ago"), "{e}");
    }
}
