//! The admin HTTP port: `/metrics` (Prometheus text), `/ready`, `/live`. It runs apart
//! from the data plane's listeners and closes last.

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
}

impl Admin {
    pub async fn serve(self, listener: TcpListener, stop: CancellationToken) {
        loop {
            let (tcp, _) = tokio::select! {
                r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
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
            "/ready" if self.ready.load(Ordering::Acquire) => {
                (StatusCode::OK, "text/plain", "ready\n".into())
            }
            "/ready" => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "not ready\n".into(),
            ),
            "/live" => (StatusCode::OK, "text/plain", "live\n".into()),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /metrics, /ready, /live\n".into(),
            ),
        };
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        if let Ok(v) = ctype.parse() {
            resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        resp
    }
}
