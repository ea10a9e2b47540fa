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
}

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

impl Admin {
    pub async fn serve(self, listener: TcpListener, stop: CancellationToken) {
        loop {
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
                let svc = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.handle(req)) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
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

    fn handle<B>(&self, req: Request<B>) -> Response<Full<Bytes>> {
        let (status, ctype, body) = match req.uri().path() {
            "/metrics" => {
                let mut out = String::new();
                match prometheus_client::encoding::text::encode(&mut out, &self.registry) {
                    Ok(()) => (
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        out,
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
            path => match self.pages.iter().find(|(p, _)| *p == path) {
                Some((_, render)) => (StatusCode::OK, "application/json", render()),
                None => {
                    let mut known = String::from("/metrics, /ready, /live");
                    for (p, _) in &self.pages {
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
