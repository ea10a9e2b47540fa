//! The meshfed data plane: one QUIC endpoint per gateway carrying mTLS (SPIFFE) between
//! sites, and beside it the h2 transport (`hbone`: HTTP/2 CONNECT over mTLS on TCP, for
//! networks that block UDP; `peers` picks per peer, `auto` falling back to it), egress
//! listeners for imported services, ingress to exported ones, the stream header
//! protocol (`wire`), and the HTTP path (`http`: ports speaking `http`, `http2` or
//! `grpc` are routed per request, with the service's federated routes). Its admin port
//! and drain come from `meshfed-lifecycle`.
//!
//! Decisions (`wire` decoding, `ingress::decide` with the caller check and the
//! AuthorizationPolicies, `admission` of unauthenticated handshakes and of each
//! authenticated peer's connections and UDP flows, egress candidate budgets,
//! `preflight::collisions`, `hbone::headers`, `http::decide` and `http::headers`) are
//! pure; sockets live in `tunnel`, `hbone`, `peers`, `egress` (with `caller_mtls`, a TLS
//! acceptor for its clients), `ingress`, `http` and `splice`.
//! `preflight` is `meshfed gateway check`. `reload` swaps in SVIDs and bundles from
//! disk; `renew` issues the gateway's own SVID from `tls.renew`'s signing authority.
//! `federated` is the site's agent of the federation (join state, publish, watch, apply
//! the plan, drop withdrawn trust domains); `registry` follows the site directory's
//! registered services, policies and Kubernetes exports.
//!
//! It depends on `identity`, `catalog`, `api` and `lifecycle` only: no etcd, no Kubernetes, no
//! federation server, no DNS (CI checks it, `.ci/deps.sh`). The binary composes the
//! gateway with DNS (`meshfed::site`) from [`RunningGateway::applied_plans`].
#![forbid(unsafe_code)]

pub mod admission;
pub mod config;
pub mod egress;
pub mod federated;
pub mod hbone;
pub mod health;
pub mod http;
pub mod ingress;
pub mod metrics;
pub mod origination;
pub mod peers;
pub mod preflight;
pub mod proxy_protocol;
pub mod registry;
pub mod reload;
pub mod renew;
pub mod resolve;
pub mod sni;
pub mod splice;
pub mod tunnel;
pub mod udp;
pub mod wire;
pub mod workload_api;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use meshfed_identity::tls::SvidResolver;
use meshfed_identity::{PeerPolicy, SpiffeId, SpiffeVerifier, Svid};
use meshfed_lifecycle::drain::{self, Drained};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::{ConfigError, GatewayConfig};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("identity: {0}")]
    Identity(#[from] meshfed_identity::CaError),
    #[error(transparent)]
    Bundles(#[from] reload::ReloadError),
    #[error("certificate {cert}: SPIFFE ID {found} is not this site's gateway ID {expected}")]
    WrongIdentity {
        cert: String,
        found: SpiffeId,
        expected: SpiffeId,
    },
    #[error(transparent)]
    Tunnel(#[from] tunnel::TunnelError),
    #[error("SVID: {0}")]
    Svid(String),
    #[error("certificate {cert}: not a usable SVID now [{code}]: {reason}")]
    SvidRefused {
        cert: String,
        code: &'static str,
        reason: String,
    },
    #[error(transparent)]
    WorkloadApi(#[from] workload_api::WorkloadApiError),
    #[error("bind {what} {addr}: {source}")]
    Bind {
        what: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running gateway: where it listens, and how to stop it.
pub struct RunningGateway {
    pub quic_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// `(service:port, local listen address)` per import at start.
    pub imports: Vec<(String, SocketAddr)>,
    pub local_id: SpiffeId,
    pub peers: peers::Peers,
    pub import_set: Arc<egress::Imports>,
    /// The plans the federation agent applies (`None` until the first, and always
    /// without a federation).
    applied: tokio::sync::watch::Sender<Option<Arc<federated::AppliedPlan>>>,
    ingress: Arc<ingress::Ingress>,
    reload: Arc<tokio::sync::Notify>,
    /// Cancelling it starts the drain.
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl RunningGateway {
    /// Replaces the AuthorizationPolicies the ingress enforces, as the registry does
    /// when policies are registered (for a process embedding the gateway).
    pub fn set_authorization_policies(
        &self,
        policies: Vec<meshfed_catalog::authz::AuthorizationPolicy>,
    ) {
        self.ingress
            .policies
            .store(Arc::new(meshfed_catalog::authz::PolicyIndex::new(policies)));
        self.ingress.recheck_streams();
    }

    /// Starts a drain and waits for it to finish.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.done.await;
    }

    /// Verified identities on both sides: peers we dialed (by site) and peers that dialed us.
    pub fn connected_peers(
        &self,
    ) -> (
        Vec<(meshfed_catalog::SiteName, Option<SpiffeId>)>,
        Vec<SpiffeId>,
    ) {
        (self.peers.status(), self.ingress.inbound_peers())
    }

    /// Resolves when the gateway has stopped.
    pub async fn wait(self) {
        let _ = self.done.await;
    }

    /// Follows the plans the federation agent applies; the current one is in it at once.
    pub fn applied_plans(
        &self,
    ) -> tokio::sync::watch::Receiver<Option<Arc<federated::AppliedPlan>>> {
        self.applied.subscribe()
    }

    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// A handle that makes the reloader look at the SVID and bundle files now (SIGHUP)
    /// instead of at its next tick.
    pub fn reload_trigger(&self) -> Arc<tokio::sync::Notify> {
        self.reload.clone()
    }
}

/// Accept backlog of egress listeners (the kernel caps it at `net.core.somaxconn`). The
/// std/mio default of 128 drops SYNs under a connection burst, costing clients a 1 s
/// retransmit.
pub const LISTEN_BACKLOG: u32 = 4096;

/// How long the dialers may take to stop once the endpoint has closed.
const DIALERS_GRACE: Duration = Duration::from_secs(10);

/// Binds the QUIC endpoint (UDP) and the h2 listener (TCP) on one port number. With
/// port 0 the kernel picks the UDP port, and the TCP port with its number is taken too
/// (another UDP port is picked when that one is in use for TCP).
fn bind_transports(
    listen: SocketAddr,
    server: quinn::ServerConfig,
    svid: &Svid,
) -> Result<(quinn::Endpoint, TcpListener), GatewayError> {
    let mut attempts = if listen.port() == 0 { 16 } else { 1 };
    loop {
        let endpoint = tunnel::bind_endpoint(listen, server.clone(), svid)?;
        let quic = endpoint.local_addr().map_err(|source| GatewayError::Bind {
            what: "quic".into(),
            addr: listen,
            source,
        })?;
        let tcp = SocketAddr::new(listen.ip(), quic.port());
        match bind_tcp(tcp) {
            Ok(l) => return Ok((endpoint, l)),
            Err(source) => {
                attempts -= 1;
                if attempts == 0 {
                    return Err(GatewayError::Bind {
                        what: "h2 (TCP, the QUIC port's number)".into(),
                        addr: tcp,
                        source,
                    });
                }
                endpoint.close(0u32.into(), b"rebinding");
            }
        }
    }
}

pub(crate) fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(LISTEN_BACKLOG)
}

/// Raises the soft open-file limit to the hard one (every flow and stream holds a
/// socket; 1024, a common default, is soon spent) and returns the limit in force.
pub fn raise_nofile_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if let (Some(soft), Some(hard)) = (lim.current, lim.maximum)
        && soft < hard
    {
        lim.current = Some(hard);
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            warn!(error = %e, "could not raise the open-file limit");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// The data plane's shared handles, for the federation agent and the registry follower.
struct Shared {
    ingress: Arc<ingress::Ingress>,
    peers: peers::Peers,
    imports: Arc<egress::Imports>,
    metrics: metrics::Metrics,
    bundle_store: Arc<ArcSwap<meshfed_identity::BundleSet>>,
    applied: tokio::sync::watch::Sender<Option<Arc<federated::AppliedPlan>>>,
    /// Kicks the reloader (a withdrawn bundle: reload the files at once).
    reload: Arc<tokio::sync::Notify>,
}

/// With a federation: the follower of the site directory's registered and Kubernetes
/// exports, and the agent that publishes them and applies the catalog. Both stop with
/// the dialers (`stop`).
fn start_federation(
    cfg: &GatewayConfig,
    fed: &config::Federation,
    quic_addr: SocketAddr,
    sh: Shared,
    stop: CancellationToken,
) {
    let advertise = fed
        .advertise
        .clone()
        .unwrap_or_else(|| quic_addr.to_string());
    if quic_addr.ip().is_unspecified() && fed.advertise.is_none() {
        warn!(%quic_addr, "listening on a wildcard address without federation.advertise: peers cannot dial it");
    }
    let (published, exports_rx) =
        tokio::sync::watch::channel(cfg.exports.values().cloned().collect::<Vec<_>>());
    let follower = registry::Follower {
        dir: fed.dir.clone(),
        config_exports: cfg.exports.clone(),
        ingress: sh.ingress.clone(),
        published,
    };
    tokio::spawn(follower.run(stop.clone()));
    let agent = federated::Agent {
        fed: fed.clone(),
        site: cfg.site.clone(),
        cert: cfg.cert.clone(),
        key: cfg.key.clone(),
        exports: exports_rx,
        advertise,
        static_peers: cfg.peers.clone(),
        static_imports: cfg.imports.clone(),
        peers: sh.peers,
        imports: sh.imports,
        metrics: sh.metrics,
        bundle_store: sh.bundle_store,
        applied: sh.applied,
        listeners_written: Default::default(),
        ingress: sh.ingress,
        reload: sh.reload,
        pinned: cfg
            .bundles
            .iter()
            .filter_map(|f| meshfed_identity::BundleSet::read_bundle_file(f, None).ok())
            .map(|b| b.trust_domain)
            .chain([cfg.trust_domain.clone()])
            .collect(),
    };
    tokio::spawn(agent.run(stop));
}

/// What the gateway's drain stops, in order.
struct Stages {
    streams: drain::DrainTrigger,
    streams_w: drain::DrainWatcher,
    dialers: drain::DrainTrigger,
    endpoint: quinn::Endpoint,
    ready: Arc<AtomicBool>,
    admin_stop: CancellationToken,
    grace: Duration,
}

/// Waits for the drain to start, then: not ready; listeners stop and in-flight streams
/// finish within the grace; the endpoint closes (peers see DRAINING); the dialers stop;
/// the admin port closes last.
async fn drain_when_told(s: Stages) {
    s.streams_w.signaled().await;
    s.ready.store(false, Ordering::Release);
    info!(in_flight = s.streams_w.in_flight(), grace = ?s.grace, "draining");
    if let Drained::GraceExpired { in_flight } = s.streams.drain(s.grace).await {
        warn!(
            in_flight,
            "drain grace period over; closing remaining streams"
        );
    }
    s.dialers.start();
    s.endpoint.close(
        quinn::VarInt::from_u32(wire::app_code::DRAINING),
        b"gateway draining",
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), s.endpoint.wait_idle()).await;
    if let Drained::GraceExpired { in_flight } = s.dialers.drain(DIALERS_GRACE).await {
        warn!(in_flight, "peer dialers did not stop in time");
    }
    s.admin_stop.cancel();
    info!("gateway stopped");
}

/// The gateway's SVID and the bundles it verifies peers with, refused when the SVID is
/// not this site's gateway ID or is not usable now.
fn load_identity(cfg: &GatewayConfig) -> Result<(Svid, meshfed_identity::BundleSet), GatewayError> {
    let svid = Svid::load(&cfg.cert, &cfg.key)?;
    let expected = SpiffeId::gateway(&cfg.trust_domain, cfg.site.as_str()).map_err(|e| {
        ConfigError::Field {
            file: "<config>".into(),
            field: "site".into(),
            reason: e.to_string(),
        }
    })?;
    if svid.id != expected {
        return Err(GatewayError::WrongIdentity {
            cert: cfg.cert.display().to_string(),
            found: svid.id.clone(),
            expected,
        });
    }
    let bundles = reload::load_bundles(
        &reload::bundle_files(&cfg.bundles, &cfg.bundle_dirs()),
        &cfg.trust_domain,
    )?;

    // Refuse to start on an identity every peer would refuse: the gateway would look
    // ready while each handshake failed.
    reload::check_svid(&svid, &bundles, rustls::pki_types::UnixTime::now()).map_err(|e| {
        GatewayError::SvidRefused {
            cert: cfg.cert.display().to_string(),
            code: e.code(),
            reason: e.to_string(),
        }
    })?;

    Ok((svid, bundles))
}

/// The admin port's JSON debug pages:
/// - `/debug/config`: the effective configuration (defaults filled in, paths resolved).
///   It holds no secret values: keys are paths, and key material never appears;
/// - `/debug/peers`: each peer's links as dialed (transport, why, verified ID, QUIC path
///   figures), the connections peers dialed to us by verified ID, and the active streams
///   by direction;
/// - `/debug/imports`: the catalog revision applied, and each import listener with its
///   backends in order, what it speaks, and its HTTP routes.
fn debug_pages(
    cfg: &GatewayConfig,
    peers: &peers::Peers,
    ingress: &Arc<ingress::Ingress>,
    imports: &Arc<egress::Imports>,
    applied: &tokio::sync::watch::Sender<Option<Arc<federated::AppliedPlan>>>,
    metrics: &metrics::Metrics,
) -> Vec<(&'static str, meshfed_lifecycle::admin::Page)> {
    let pretty = |v: serde_json::Value| {
        serde_json::to_string_pretty(&v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    };
    let config = {
        let cfg = cfg.clone();
        Arc::new(move || pretty(serde_json::to_value(&cfg).unwrap_or_default()))
    };
    let peers_page = {
        let (peers, ingress, metrics) = (peers.clone(), ingress.clone(), metrics.clone());
        Arc::new(move || {
            let streams = |direction| {
                metrics
                    .active_streams
                    .get_or_create(&metrics::DirLabels { direction })
                    .get()
            };
            pretty(serde_json::json!({
                "dialed": peers.debug(),
                "accepted": ingress.debug(),
                "active_streams": {"egress": streams("egress"), "ingress": streams("ingress")},
            }))
        })
    };
    let imports_page = {
        let (imports, applied) = (imports.clone(), applied.subscribe());
        Arc::new(move || {
            let plan = applied.borrow().clone();
            let conflicts: Vec<serde_json::Value> = plan
                .iter()
                .flat_map(|p| p.plan.imports.iter())
                .filter_map(|im| {
                    im.policy_conflict.as_ref().map(|c| {
                        serde_json::json!({"service": im.service.to_string(), "port": im.port, "conflict": c})
                    })
                })
                .collect();
            pretty(serde_json::json!({
                "catalog_revision": plan.as_ref().map(|p| p.revision),
                "imports": imports.debug(),
                "policy_conflicts": conflicts,
            }))
        })
    };
    vec![
        ("/debug/config", config as meshfed_lifecycle::admin::Page),
        ("/debug/peers", peers_page),
        ("/debug/imports", imports_page),
    ]
}

/// Probes `/debug/probe` runs at once, at most.
const PROBES_AT_ONCE: usize = 4;

/// `/debug/probe?service=S&port=P&site=X`: one real open of `S:P` at site `X` over the
/// live peer link ([`egress::Imports::probe`]), for `meshfed diagnose`. 400 on a bad
/// query, 404 for a service port this gateway does not import, 429 past
/// [`PROBES_AT_ONCE`] probes in flight.
fn probe(imports: Arc<egress::Imports>) -> meshfed_lifecycle::admin::Probe {
    let slots = Arc::new(tokio::sync::Semaphore::new(PROBES_AT_ONCE));
    Arc::new(move |query: String| {
        let imports = imports.clone();
        let slot = slots.clone().try_acquire_owned();
        Box::pin(async move {
            let Ok(_slot) = slot else {
                return (
                    429,
                    serde_json::json!({"error": format!("{PROBES_AT_ONCE} probes already in flight")})
                        .to_string(),
                );
            };
            let mut service = None;
            let mut port = None;
            let mut site = None;
            for kv in query.split('&') {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                match k {
                    "service" => service = Some(v.to_owned()),
                    "port" => port = v.parse::<u16>().ok(),
                    "site" => site = Some(v.to_owned()),
                    _ => {}
                }
            }
            let parsed = (
                service.as_deref().map(meshfed_catalog::ServiceName::parse),
                port,
                site.as_deref().map(meshfed_catalog::SiteName::new),
            );
            match parsed {
                (Some(Ok(service)), Some(port), Some(Ok(site))) => {
                    match imports.probe(service.clone(), port, site).await {
                        Some(v) => (200, v.to_string()),
                        None => (
                            404,
                            serde_json::json!({"error": format!("{service}:{port} is not an import of this gateway")})
                                .to_string(),
                        ),
                    }
                }
                _ => (
                    400,
                    serde_json::json!({"error": "usage: /debug/probe?service=NAME.NAMESPACE&port=PORT&site=SITE"})
                        .to_string(),
                ),
            }
        })
    })
}

/// Loads identity and bundles, binds every listener, and starts serving. Returns once
/// all listeners are bound: `/ready` is then true, or, for a federated gateway, true once
/// it has applied a catalog (cached or the federation's). The config's `dns` section is not
/// served here: the binary starts DNS beside the gateway (`meshfed::site`).
pub async fn start(cfg: GatewayConfig) -> Result<RunningGateway, GatewayError> {
    start_with(cfg, Options::default()).await
}

/// What the binary hands the gateway beside its config.
#[derive(Default)]
pub struct Options {
    /// Served on the admin port beside the gateway's own metrics (the binary registers
    /// its DNS server's there).
    pub registry: Registry,
    /// `caller_pod_ip`: callers by source address, kept by a pod reflector.
    pub caller_ips: Option<egress::CallerIps>,
}

/// [`start`] with [`Options`].
pub async fn start_with(
    cfg: GatewayConfig,
    options: Options,
) -> Result<RunningGateway, GatewayError> {
    let mut registry = options.registry;
    let workload_api = match &cfg.workload_api {
        Some(w) => {
            let source = workload_api::Source {
                cfg: w.clone(),
                expected: SpiffeId::gateway(&cfg.trust_domain, cfg.site.as_str())
                    .map_err(|e| GatewayError::Svid(e.to_string()))?,
                cert: cfg.cert.clone(),
                key: cfg.key.clone(),
            };
            source.first().await?;
            Some(source)
        }
        None => None,
    };
    let (svid, bundles) = load_identity(&cfg)?;

    let metrics = metrics::Metrics {
        site: cfg.site.as_str().into(),
        ..Default::default()
    };
    metrics.register(&mut registry);
    let hook_metrics = metrics.clone();
    let bundle_store = Arc::new(ArcSwap::from_pointee(bundles));
    let base_verifier = SpiffeVerifier::new(bundle_store.clone(), PeerPolicy::AnyFederated)
        .with_reject_hook(Arc::new(move |e| {
            warn!(reason = e.code(), error = %e, "mTLS handshake refused");
            hook_metrics.handshake_failed(e.code());
        }));

    // Inbound: only configured peers may connect; with a federation, any gateway of a
    // federated trust domain (the catalog decides whom we serve, per export).
    let inbound_ids: BTreeSet<SpiffeId> = cfg.peers.iter().map(|p| p.spiffe_id.clone()).collect();
    let inbound = if cfg.federation.is_some() {
        PeerPolicy::AnyGateway
    } else {
        PeerPolicy::Only(inbound_ids)
    };
    let resolver = Arc::new(SvidResolver::new(&svid).map_err(|e| {
        GatewayError::Svid(format!(
            "key {} does not match certificate {}: {e}",
            cfg.key.display(),
            cfg.cert.display()
        ))
    })?);
    metrics
        .svid_not_after
        .set(svid.not_after_unix().unwrap_or_default());
    let h2_tls = meshfed_identity::tls::server_config(
        resolver.clone(),
        base_verifier.clone().with_policy(inbound.clone()),
        &[hbone::ALPN_H2, hbone::ALPN_REVERSE],
    )
    .map_err(tunnel::TunnelError::Tls)?;
    let server = tunnel::server_config(
        resolver.clone(),
        base_verifier.clone().with_policy(inbound),
        cfg.quic_congestion,
    )?;
    let (endpoint, h2_listener) = bind_transports(cfg.listen, server, &svid)?;
    let quic_addr = endpoint.local_addr().map_err(|source| GatewayError::Bind {
        what: "quic".into(),
        addr: cfg.listen,
        source,
    })?;

    // Two drains, one after the other: first the listeners stop and in-flight streams
    // finish; then the dialers stop with the endpoint (in-flight egress streams need
    // their connections until then).
    let (streams, streams_w) = drain::channel();
    let (dialers, dialers_w) = drain::channel();
    let dial_stop = dialers_w.token();
    let config_for: peers::ClientConfigFor = {
        let (resolver, base, cc) = (resolver.clone(), base_verifier.clone(), cfg.quic_congestion);
        Arc::new(move |id: &SpiffeId| {
            let v = base
                .clone()
                .with_policy(PeerPolicy::Only([id.clone()].into()));
            let h2 = meshfed_identity::tls::client_config(
                resolver.clone(),
                v.clone(),
                &[hbone::ALPN_H2],
            )
            .map_err(|e| warn!(error = %e, "peer TLS config (h2)"))
            .ok()?;
            let quic = tunnel::client_config(resolver.clone(), v, cc)
                .map_err(|e| warn!(error = %e, "peer TLS config"))
                .ok()?;
            let mut h2_reverse = h2.clone();
            h2_reverse.alpn_protocols = vec![hbone::ALPN_REVERSE.to_vec()];
            Some(peers::PeerTls {
                quic,
                h2: Arc::new(h2),
                h2_reverse: Arc::new(h2_reverse),
            })
        })
    };
    let peers = peers::Peers::new(
        endpoint.clone(),
        peers::Transports {
            reverse: cfg.federation.as_ref().is_some_and(|f| !f.inbound),
            ..cfg.transports.clone()
        },
        metrics.clone(),
        config_for,
        dialers_w.clone(),
    );
    for p in &cfg.peers {
        if let Some(addr) = &p.address {
            peers.upsert(&p.site, &p.spiffe_id, std::slice::from_ref(addr));
        }
    }
    // The caller the egress vouches for: the declared workload, or the gateway itself.
    // Callers prove who they are with their SVID, of this trust domain only.
    let callers = if cfg.caller_mtls {
        let v = base_verifier
            .clone()
            .with_policy(PeerPolicy::TrustDomain(cfg.trust_domain.clone()));
        let tls = meshfed_identity::tls::server_config(resolver.clone(), v, &[])
            .map_err(|e| GatewayError::Svid(format!("caller mTLS: {e}")))?;
        egress::Callers::mtls(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
    } else if cfg.caller_pod_ip {
        egress::Callers::SourceAddress(options.caller_ips.ok_or_else(|| {
            GatewayError::Svid(
                "caller_pod_ip: no pod directory was given (`meshfed gateway run` starts one from the Kubernetes API)".into(),
            )
        })?)
    } else {
        egress::Callers::Declared
    };
    let nofile = raise_nofile_limit();
    let imports = Arc::new(
        egress::Imports::new(
            peers.clone(),
            cfg.source_identity
                .clone()
                .unwrap_or_else(|| svid.id.clone()),
            metrics.clone(),
            cfg.connect_timeout + Duration::from_secs(2),
            cfg.udp_idle_timeout,
            streams_w.clone(),
            callers,
        )
        .with_max_listeners(egress::listener_budget(nofile))
        .with_max_clients(admission::client_connections(nofile))
        .with_http_idle_timeout(cfg.http_idle_timeout),
    );
    for im in &cfg.imports {
        imports
            .upsert(
                &im.service,
                im.port,
                im.protocol,
                im.app_protocol,
                im.listen,
                std::slice::from_ref(&im.site),
                im.source_identity.as_ref(),
                None,
            )
            .map_err(|source| GatewayError::Bind {
                what: format!("import {}:{}", im.service, im.port),
                addr: im.listen,
                source,
            })?;
    }
    let admin_l = TcpListener::bind(cfg.admin)
        .await
        .map_err(|source| GatewayError::Bind {
            what: "admin".into(),
            addr: cfg.admin,
            source,
        })?;
    let admin_addr = admin_l.local_addr().map_err(|source| GatewayError::Bind {
        what: "admin".into(),
        addr: cfg.admin,
        source,
    })?;

    let flow_limits = udp::FlowLimits::for_nofile(nofile);
    let tcp_per_peer = admission::tcp_streams_per_peer(nofile);
    info!(
        nofile,
        udp_flows = flow_limits.total,
        udp_flows_per_peer = flow_limits.per_peer,
        tcp_streams_per_peer = tcp_per_peer,
        client_connections = admission::client_connections(nofile),
        "open-file limit"
    );
    let ingress = Arc::new(
        ingress::Ingress::new(
            cfg.exports.clone(),
            cfg.connect_timeout,
            cfg.udp_idle_timeout,
            flow_limits,
            metrics.clone(),
            bundle_store.clone(),
            ingress::ThisSite {
                name: cfg.site.clone(),
                labels: cfg
                    .federation
                    .as_ref()
                    .map(|f| f.labels.clone())
                    .unwrap_or_default(),
            },
        )
        .with_tcp_streams_per_peer(tcp_per_peer),
    );
    tokio::spawn(ingress.clone().serve(endpoint.clone(), streams_w.clone()));
    tokio::spawn(ingress.clone().serve_h2(
        h2_listener,
        tokio_rustls::TlsAcceptor::from(Arc::new(h2_tls)),
        streams_w.clone(),
    ));
    // Our dialed connections serve the peer's streams; its dialed ones carry ours when
    // we cannot dial it (an outbound-only site).
    peers.attach_ingress(
        {
            let ingress = ingress.clone();
            Arc::new(move |id: &SpiffeId| ingress.accepted(id))
        },
        {
            let (ingress, drain) = (ingress.clone(), streams_w.clone());
            let (ingress2, drain2) = (ingress.clone(), drain.clone());
            Arc::new(peers::OnDialedHooks {
                quic: Arc::new(move |conn| ingress.serve_dialed(conn, drain.clone())),
                reverse_h2: Arc::new(move |tls, peer, remote, graceful| {
                    Box::pin(ingress2.clone().serve_reverse(
                        tls,
                        peer,
                        remote,
                        graceful,
                        drain2.clone(),
                    ))
                }),
            })
        },
    );

    let (applied, _) = tokio::sync::watch::channel(None);
    let reload_kick = Arc::new(tokio::sync::Notify::new());
    if let Some(fed) = &cfg.federation {
        start_federation(
            &cfg,
            fed,
            quic_addr,
            Shared {
                ingress: ingress.clone(),
                peers: peers.clone(),
                imports: imports.clone(),
                metrics: metrics.clone(),
                bundle_store: bundle_store.clone(),
                applied: applied.clone(),
                reload: reload_kick.clone(),
            },
            dial_stop.clone(),
        );
    }

    let reloader = reload::Reloader {
        cert: cfg.cert.clone(),
        key: cfg.key.clone(),
        bundles: cfg.bundles.clone(),
        bundle_dirs: cfg.bundle_dirs(),
        expected_id: svid.id.clone(),
        own_td: cfg.trust_domain.clone(),
        resolver,
        bundle_store: bundle_store.clone(),
        metrics: metrics.clone(),
        interval: cfg.reload_interval,
        kick: reload_kick.clone(),
        on_bundles: {
            let (ingress, peers, bundles) = (ingress.clone(), peers.clone(), bundle_store.clone());
            Arc::new(move || {
                // Accepted connections, and those we dialed (they carry the peer's
                // streams too).
                let set = bundles.load();
                let n =
                    ingress.close_untrusted() + peers.close_where(|td| set.get_str(td).is_none());
                if n > 0 {
                    warn!(
                        closed = n,
                        "connections from trust domains no longer trusted closed"
                    );
                }
            })
        },
    };
    tokio::spawn(reloader.run(dial_stop.clone()));
    if let Some(r) = &cfg.renew {
        let renewer = renew::Renewer {
            ca: r.ca.clone(),
            ttl: r.ttl,
            id: svid.id.clone(),
            cert: cfg.cert.clone(),
            key: cfg.key.clone(),
            metrics: metrics.clone(),
            reload: reload_kick.clone(),
            bundles: bundle_store.clone(),
        };
        tokio::spawn(renewer.run(dial_stop.clone()));
    }
    if let Some(source) = workload_api {
        tokio::spawn(source.run(metrics.clone(), reload_kick.clone(), dial_stop.clone()));
    }

    let ready = Arc::new(AtomicBool::new(false));
    let admin_stop = CancellationToken::new();
    let admin = meshfed_lifecycle::admin::Admin {
        registry: Arc::new(registry),
        ready: ready.clone(),
        svid_expiry: Some(meshfed_lifecycle::admin::SvidExpiry {
            not_after: metrics.svid_not_after.clone(),
            margin: cfg.reload_interval,
        }),
        // A federated gateway serves only once it has applied a catalog (the cached one
        // at start, or the federation's): before that its imports are not bound.
        check: cfg.federation.is_some().then(|| {
            let applied = applied.subscribe();
            let check: meshfed_lifecycle::admin::ReadyCheck = Arc::new(move || {
                applied.borrow().is_none().then(|| {
                    "no catalog applied yet: the federation has not answered and no cached catalog exists".to_owned()
                })
            });
            check
        }),
        pages: debug_pages(&cfg, &peers, &ingress, &imports, &applied, &metrics),
        probe: Some(probe(imports.clone())),
        html: Vec::new(),
    };
    tokio::spawn(admin.serve(admin_l, admin_stop.clone()));
    ready.store(true, Ordering::Release);
    info!(
        site = %cfg.site, id = %svid.id, quic = %quic_addr, admin = %admin_addr,
        peers = cfg.peers.len(), exports = cfg.exports.len(), imports = cfg.imports.len(),
        federated = cfg.federation.is_some(),
        "gateway listening (a federated gateway is ready once it has applied a catalog)"
    );

    let grace = cfg.drain_grace;
    let stop = streams_w.token();
    let done = tokio::spawn(drain_when_told(Stages {
        streams,
        streams_w,
        dialers,
        endpoint,
        ready,
        admin_stop,
        grace,
    }));

    Ok(RunningGateway {
        quic_addr,
        admin_addr,
        imports: imports.addrs(),
        import_set: imports,
        applied,
        local_id: svid.id,
        peers,
        ingress,
        reload: reload_kick,
        stop,
        done,
    })
}
