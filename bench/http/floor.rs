//! `hyper-pair`: the libraries meshfed's L7 path is built on, with nothing of meshfed's
//! own. It separates what meshfed's code costs per request from what hyper, h2, tokio
//! and rustls cost: the floor any design on them starts from.
//!
//! The same shape as meshfed-l7 over the h2 transport and as the haproxy pair, one
//! process per site: A takes HTTP/1.1 and h2 (prior knowledge) clients on one port
//! (hyper-util's auto server) and sends each request, in turn to each B (50/50), over
//! h2 links (mTLS over TCP with the sites' SVIDs and meshfed's own verifier, ALPN h2,
//! [`LINKS`] per B used in turn, as the egress's); B (hyper's h2 server) forwards it
//! over pooled HTTP/1.1 connections (hyper-util's client) to its nginx block, as the
//! ingress does. No routes, retries, policy, metrics, logs or tunnel framing.
//!
//! Run by http-bench itself: `http-bench --floor '<json>'` (see [`Spec`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Request, Response, Uri};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshfed_identity::{
    BundleSet, PeerPolicy, SpiffeVerifier, Svid,
    tls::{SvidResolver, client_config, server_config},
};
use tokio::net::{TcpListener, TcpStream};

/// h2 links per B, used in turn (meshfed's egress: `LINKS` per site).
const LINKS: usize = 4;

/// One floor process, from the JSON `http-bench --floor` takes.
pub struct Spec {
    /// `a` or `b`.
    role: String,
    listen: SocketAddr,
    /// A: the Bs; B: its nginx block.
    upstreams: Vec<SocketAddr>,
    cert: PathBuf,
    key: PathBuf,
    /// The bundles whose SVIDs the peer may present.
    bundles: Vec<PathBuf>,
    threads: usize,
}

impl Spec {
    pub fn json(
        role: &str,
        listen: SocketAddr,
        upstreams: &[SocketAddr],
        cert: &std::path::Path,
        key: &std::path::Path,
        bundles: &[&std::path::Path],
        threads: usize,
    ) -> String {
        serde_json::json!({
            "role": role,
            "listen": listen.to_string(),
            "upstreams": upstreams.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "cert": cert,
            "key": key,
            "bundles": bundles,
            "threads": threads,
        })
        .to_string()
    }

    pub fn parse(json: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(json).context("--floor: JSON")?;
        let s = |k: &str| -> Result<String> {
            v[k].as_str()
                .map(str::to_owned)
                .with_context(|| format!("--floor: {k}"))
        };
        let list = |k: &str| -> Result<Vec<String>> {
            v[k].as_array()
                .with_context(|| format!("--floor: {k}"))?
                .iter()
                .map(|x| x.as_str().map(str::to_owned).context("--floor: a string"))
                .collect()
        };
        Ok(Self {
            role: s("role")?,
            listen: s("listen")?.parse()?,
            upstreams: list("upstreams")?
                .iter()
                .map(|a| a.parse())
                .collect::<Result<_, _>>()?,
            cert: s("cert")?.into(),
            key: s("key")?.into(),
            bundles: list("bundles")?.into_iter().map(PathBuf::from).collect(),
            threads: usize::try_from(v["threads"].as_u64().context("--floor: threads")?)?,
        })
    }

    /// Runs the process until it is killed, on `threads` runtime workers.
    pub fn run(self) -> Result<()> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.threads.max(1))
            .enable_all()
            .build()?
            .block_on(async move {
                match self.role.as_str() {
                    "a" => a(self).await,
                    "b" => b(self).await,
                    r => anyhow::bail!("--floor: role {r}"),
                }
            })
    }

    fn tls(&self) -> Result<(Arc<SvidResolver>, SpiffeVerifier)> {
        let svid = Svid::load(&self.cert, &self.key)?;
        let mut set = BundleSet::new();
        for b in &self.bundles {
            set.insert(BundleSet::read_bundle_file(b, None)?);
        }
        let verifier = SpiffeVerifier::new(
            Arc::new(arc_swap::ArcSwap::from_pointee(set)),
            PeerPolicy::AnyFederated,
        );
        Ok((Arc::new(SvidResolver::new(&svid)?), verifier))
    }
}

struct Links {
    tls: tokio_rustls::TlsConnector,
    bs: Vec<SocketAddr>,
    /// `bs.len() × LINKS` slots.
    open: Vec<Mutex<Option<SendRequest<Incoming>>>>,
    dial: Vec<tokio::sync::Mutex<()>>,
    turn: AtomicUsize,
}

impl Links {
    async fn link(&self, slot: usize) -> Result<SendRequest<Incoming>> {
        let live = || {
            self.open[slot]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .filter(|s| !s.is_closed())
                .cloned()
        };
        if let Some(s) = live() {
            return Ok(s);
        }
        let _dialing = self.dial[slot].lock().await;
        if let Some(s) = live() {
            return Ok(s);
        }
        let tcp = TcpStream::connect(self.bs[slot / LINKS]).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from("floor.invalid")?;
        let io = self.tls.connect(name, tcp).await?;
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(8 << 20)
            .handshake(TokioIo::new(io))
            .await?;
        tokio::spawn(conn);
        *self.open[slot].lock().unwrap_or_else(|e| e.into_inner()) = Some(send.clone());
        Ok(send)
    }

    async fn send(&self, mut req: Request<Incoming>) -> Result<Response<Incoming>> {
        let n = self.turn.fetch_add(1, Ordering::Relaxed);
        // Alternate the Bs; within one, go round its links.
        let slot = (n % self.bs.len()) * LINKS + (n / self.bs.len()) % LINKS;
        // h2 wants a scheme and an authority: an HTTP/1.1 request's come from its Host.
        if req.uri().authority().is_none() {
            let host = req
                .headers()
                .get(hyper::header::HOST)
                .and_then(|h| Authority::try_from(h.as_bytes()).ok())
                .unwrap_or_else(|| Authority::from_static("web.bench"));
            absolute(&mut req, host)?;
        }
        *req.version_mut() = hyper::Version::HTTP_2;
        let mut link = self.link(slot).await?;
        Ok(link.send_request(req).await?)
    }
}

/// `req`'s URI with scheme `http` and `authority`, its path kept (as the egress's
/// `headers::from_client` does, from parts, with nothing formatted or parsed again).
fn absolute(req: &mut Request<Incoming>, authority: Authority) -> Result<()> {
    let mut u = std::mem::take(req.uri_mut()).into_parts();
    u.scheme = Some(Scheme::HTTP);
    u.authority = Some(authority);
    if u.path_and_query.is_none() {
        u.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = Uri::from_parts(u)?;
    Ok(())
}

fn bad_gateway(e: anyhow::Error) -> Response<http_body_util::Full<bytes::Bytes>> {
    let mut r = Response::new(http_body_util::Full::new(bytes::Bytes::from(format!(
        "{e:#}\n"
    ))));
    *r.status_mut() = hyper::StatusCode::BAD_GATEWAY;
    r
}

type Answer = Response<http_body_util::Either<Incoming, http_body_util::Full<bytes::Bytes>>>;

fn answer(r: Result<Response<Incoming>>) -> Result<Answer, std::convert::Infallible> {
    Ok(match r {
        Ok(r) => r.map(http_body_util::Either::Left),
        Err(e) => bad_gateway(e).map(http_body_util::Either::Right),
    })
}

/// The next connection, with Nagle off; an accept error (out of descriptors) waits a
/// moment instead of ending the process.
async fn accept(listener: &TcpListener) -> TcpStream {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                let _ = tcp.set_nodelay(true);
                return tcp;
            }
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

async fn a(spec: Spec) -> Result<()> {
    let (svid, verifier) = spec.tls()?;
    let cfg = client_config(svid, verifier, &[b"h2"])?;
    let n = spec.upstreams.len() * LINKS;
    let links = Arc::new(Links {
        tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
        bs: spec.upstreams.clone(),
        open: (0..n).map(|_| Mutex::new(None)).collect(),
        dial: (0..n).map(|_| tokio::sync::Mutex::new(())).collect(),
        turn: AtomicUsize::new(0),
    });
    let listener = TcpListener::bind(spec.listen).await?;
    loop {
        let tcp = accept(&listener).await;
        let links = links.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let links = links.clone();
                async move { answer(links.send(req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

async fn b(spec: Spec) -> Result<()> {
    let (svid, verifier) = spec.tls()?;
    let cfg = server_config(svid, verifier, &[b"h2"])?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    // Parsed once: each request's URI is built from parts.
    let nginx = Authority::try_from(
        spec.upstreams
            .first()
            .context("--floor: b needs its nginx")?
            .to_string(),
    )?;
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .build(c);
    let listener = TcpListener::bind(spec.listen).await?;
    loop {
        let tcp = accept(&listener).await;
        let (acceptor, client, nginx) = (acceptor.clone(), client.clone(), nginx.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let client = client.clone();
                let nginx = nginx.clone();
                async move {
                    let r = async {
                        absolute(&mut req, nginx)?;
                        *req.version_mut() = hyper::Version::HTTP_11;
                        Ok(client.request(req).await?)
                    }
                    .await;
                    answer(r)
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}
