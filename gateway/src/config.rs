//! Static gateway configuration: a raw serde form that mirrors the YAML file
//! (`deny_unknown_fields`), validated into [`GatewayConfig`]. Every error names the file
//! and the field.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use meshfed_catalog::catalog::{AppProtocol, Protocol};
use meshfed_catalog::{ServiceName, SiteName};
use meshfed_identity::{SpiffeId, TrustDomain};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {detail}")]
    Parse { file: PathBuf, detail: String },
    #[error("{file}: field `{field}`: {reason}")]
    Field {
        file: PathBuf,
        field: String,
        reason: String,
    },
}

// --- raw form ---

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    site: String,
    trust_domain: String,
    tls: RawTls,
    listen: String,
    #[serde(default)]
    source_identity: Option<String>,
    #[serde(default)]
    caller_mtls: bool,
    #[serde(default)]
    caller_pod_ip: bool,
    #[serde(default)]
    quic_congestion: Option<String>,
    #[serde(default)]
    workers: Option<usize>,
    #[serde(default)]
    transport: Option<RawTransport>,
    #[serde(default)]
    admin: Option<String>,
    #[serde(default)]
    drain_grace: Option<String>,
    #[serde(default)]
    connect_timeout: Option<String>,
    #[serde(default)]
    reload_interval: Option<String>,
    #[serde(default)]
    udp_idle_timeout: Option<String>,
    #[serde(default)]
    http_idle_timeout: Option<String>,
    #[serde(default)]
    federation: Option<RawFederation>,
    #[serde(default)]
    dns: Option<RawDns>,
    #[serde(default)]
    peers: Vec<RawPeer>,
    #[serde(default)]
    exports: Vec<RawExport>,
    #[serde(default)]
    imports: Vec<RawImport>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    bundles: Vec<PathBuf>,
    #[serde(default)]
    renew: Option<RawRenew>,
    #[serde(default)]
    workload_api: Option<RawWorkloadApi>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkloadApi {
    /// `unix:///path` or `tcp://ip:port`; absent: `SPIFFE_ENDPOINT_SOCKET`.
    #[serde(default)]
    socket: Option<String>,
    #[serde(default)]
    bundle_dir: Option<PathBuf>,
    #[serde(default)]
    wait: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRenew {
    ca: PathBuf,
    #[serde(default)]
    ttl: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    listen: String,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    zones: Vec<String>,
    #[serde(default)]
    forward: Option<String>,
    #[serde(default)]
    rate_limit: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFederation {
    dir: PathBuf,
    #[serde(default)]
    import_address: Option<String>,
    #[serde(default)]
    vip_range: Option<String>,
    #[serde(default)]
    import_ports: Option<String>,
    #[serde(default)]
    advertise: Option<String>,
    #[serde(default)]
    locality: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    inbound: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    site: String,
    #[serde(default)]
    address: Option<String>,
    spiffe_id: String,
    #[serde(default)]
    transport: Option<String>,
}

/// `transport`: how peers are reached.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTransport {
    /// auto | quic | h2, for every peer not named in `sites` or `peers[]`.
    #[serde(default)]
    default: Option<String>,
    #[serde(default)]
    sites: BTreeMap<String, String>,
    #[serde(default)]
    fallback_after: Option<String>,
    #[serde(default)]
    probe_every: Option<String>,
    /// TCP connections per h2 link (1–16).
    #[serde(default)]
    h2_connections: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExport {
    service: String,
    ports: Vec<RawExportPort>,
    #[serde(default)]
    allowed_peers: Option<Vec<String>>,
    #[serde(default)]
    proxy_protocol: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExportPort {
    port: u16,
    #[serde(default)]
    protocol: Option<String>,
    endpoints: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImport {
    service: String,
    port: u16,
    #[serde(default)]
    protocol: Option<String>,
    site: String,
    listen: String,
    #[serde(default)]
    source_identity: Option<String>,
}

// --- validated form ---

/// Defaults, documented where they are set.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(10);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);
/// A UDP flow with no datagram either way for this long is closed (Envoy's UDP proxy
/// uses the same default).
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Envoy's `idle_timeout` for an HTTP connection with no request in flight.
pub const DEFAULT_HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Most runtime threads `workers` may ask for.
pub const MAX_WORKERS: usize = 256;

#[derive(Clone, Debug, serde::Serialize)]
pub struct GatewayConfig {
    pub site: SiteName,
    pub trust_domain: TrustDomain,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `tls.renew`: the gateway renews its own SVID from a site signing authority.
    pub renew: Option<Renew>,
    /// `tls.workload_api`: the gateway takes its SVID and bundles from the SPIFFE
    /// Workload API (a SPIRE agent's socket) instead.
    pub workload_api: Option<WorkloadApi>,
    pub bundles: Vec<PathBuf>,
    pub listen: SocketAddr,
    /// The caller identity the egress listeners vouch for, declared: every client that
    /// reaches them is this workload (trust in the local network, for VM sites whose
    /// clients present no SVID). In this site's trust domain. `None`: the gateway's own
    /// ID, as before.
    pub source_identity: Option<SpiffeId>,
    /// The egress TCP listeners require mTLS from their clients: each presents an SVID
    /// of this trust domain (verified against its bundle), and that ID is the caller.
    /// Overrides `source_identity` for TCP.
    pub caller_mtls: bool,
    /// Kubernetes: the caller of a TCP client is the workload identity of the pod
    /// whose address connects (`spiffe://<td>/ns/<ns>/sa/<sa>`), from a pod reflector
    /// the binary runs beside the gateway; an address no pod has is refused.
    pub caller_pod_ip: bool,
    /// QUIC congestion control between gateways: `bbr` (default) or `cubic`.
    pub quic_congestion: crate::tunnel::Congestion,
    /// Threads the gateway's runtime runs on (`workers`); `None`: one per core. What
    /// Envoy's `--concurrency`, ztunnel's worker threads and Linkerd's proxy cores set: a
    /// gateway that shares its cores with other busy processes may do better with fewer.
    pub workers: Option<usize>,
    /// `transport` and `peers[].transport`: which transport each peer link uses.
    pub transports: crate::peers::Transports,
    /// Admin HTTP (`/metrics`, `/ready`); default 127.0.0.1:15000.
    pub admin: SocketAddr,
    /// How long in-flight streams may run after SIGTERM; default 10 s.
    #[serde(serialize_with = "as_debug")]
    pub drain_grace: Duration,
    /// Ingress connect timeout to a local endpoint; default 1 s.
    #[serde(serialize_with = "as_debug")]
    pub connect_timeout: Duration,
    /// How often the SVID and bundle files are checked for changes; default 5 s.
    #[serde(serialize_with = "as_debug")]
    pub reload_interval: Duration,
    /// How long a UDP flow lives without datagrams; default 60 s.
    #[serde(serialize_with = "as_debug")]
    pub udp_idle_timeout: Duration,
    /// How long a client's connection to an HTTP import may carry no request before it
    /// is closed gracefully; default 1 h (Envoy's `idle_timeout`).
    #[serde(serialize_with = "as_debug")]
    pub http_idle_timeout: Duration,
    pub peers: Vec<Peer>,
    pub exports: BTreeMap<ServiceName, Export>,
    pub imports: Vec<Import>,
    /// Run peers and imports from a federation's catalog.
    pub federation: Option<Federation>,
    /// Serve federated DNS from this gateway (needs `federation`).
    pub dns: Option<Dns>,
}

/// `tls.renew`: a site signing authority on disk (an intermediate CA directory, `ca.pem`
/// with its chain and `ca.key`; the root stays offline) and the lifetime of the SVIDs it
/// issues. The gateway renews at half that lifetime, writes `tls.cert`/`tls.key` and
/// loads them at once.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Renew {
    pub ca: PathBuf,
    #[serde(serialize_with = "as_debug")]
    pub ttl: Duration,
}

/// `tls.workload_api`: the SPIFFE Workload API (a SPIRE agent) issues and rotates the
/// gateway's SVID. Each SVID it streams is written to `tls.cert`/`tls.key`, and the
/// bundles it streams (its own trust domain's and the federated ones) to `bundle_dir`
/// as `<trust domain>.json`; the reloader loads both as it loads files an operator
/// writes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct WorkloadApi {
    /// `unix:///path` or `tcp://ip:port`.
    pub socket: String,
    pub bundle_dir: PathBuf,
    /// How long start waits for the first SVID (the agent may start after us).
    #[serde(serialize_with = "as_debug")]
    pub wait: Duration,
}

/// Default `tls.workload_api.wait`.
pub const DEFAULT_WORKLOAD_API_WAIT: Duration = Duration::from_secs(30);

/// Default `tls.renew.ttl`.
pub const DEFAULT_RENEW_TTL: Duration = Duration::from_secs(3600);

/// The `dns` section: federated DNS inside the gateway.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Dns {
    /// UDP and TCP.
    pub listen: SocketAddr,
    /// Answer TTL in seconds; default 5.
    pub ttl: u32,
    /// Zones answered like `clusterset.local`.
    pub zones: Vec<String>,
    /// Upstream for every other name; default: off (REFUSED).
    pub forward: Option<SocketAddr>,
    /// UDP queries per second per client address.
    pub rate_limit: Option<u32>,
}

/// A DNS zone name: labels of `[a-z0-9-]`, 1–63 bytes each, at most 253 in all.
pub fn valid_zone(z: &str) -> Result<String, String> {
    let z = z.trim_end_matches('.').to_ascii_lowercase();
    if z.is_empty() || z.len() > 253 {
        return Err(format!("{z:?}: a zone name is 1–253 bytes"));
    }
    for l in z.split('.') {
        if l.is_empty()
            || l.len() > 63
            || !l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            || l.starts_with('-')
            || l.ends_with('-')
        {
            return Err(format!(
                "{z:?}: label {l:?} is not 1–63 of [a-z0-9-] (no leading or trailing '-')"
            ));
        }
    }
    if z == "in-addr.arpa"
        || z == "ip6.arpa"
        || z.ends_with(".in-addr.arpa")
        || z.ends_with(".ip6.arpa")
    {
        return Err(format!("{z:?}: reverse zones are built from the imports"));
    }
    Ok(z)
}

/// The `federation` section: the site directory `meshfed site join` wrote.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Federation {
    /// Holds `federation.json`, `bundles/` and the cached catalog.
    pub dir: PathBuf,
    /// Egress listeners for imported services bind here, on the service's port;
    /// default 127.0.0.1.
    pub import_address: std::net::IpAddr,
    /// One address per imported service from this range (listener and DNS answer),
    /// instead of `import_address` for all.
    pub vip_range: Option<meshfed_catalog::routing::VipRange>,
    /// Each imported (service, port) listens on its own port from this range instead of
    /// the service's port (a Kubernetes pod: derived Services map the ports).
    pub import_ports: Option<meshfed_catalog::routing::PortRange>,
    /// The QUIC address other gateways dial; default `listen`.
    pub advertise: Option<String>,
    /// Where the site is, `region[/zone[/subzone]]` (Istio's form): importing gateways
    /// prefer the nearest sites, and `localityLbSetting` rules match it.
    pub locality: Option<String>,
    /// The gateway's own labels (Kubernetes label syntax): a DestinationRule's
    /// `failoverPriority` compares them with each site's, as Istio compares the client
    /// proxy's labels with the endpoints', beside its site name and locality.
    pub labels: BTreeMap<String, String>,
    /// `false`: nobody can dial this site (behind NAT or a firewall). It publishes no
    /// address, dials every peer, and peers reach its exports over those connections.
    pub inbound: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Peer {
    pub site: SiteName,
    /// Where to dial, `IP:port` or `host:port`; `None` for a peer that only dials us.
    pub address: Option<String>,
    pub spiffe_id: SpiffeId,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Export {
    pub service: ServiceName,
    /// TCP ports and their endpoints.
    pub ports: BTreeMap<u16, Vec<SocketAddr>>,
    /// UDP ports and their endpoints, carried as QUIC datagrams.
    pub udp_ports: BTreeMap<u16, Vec<SocketAddr>>,
    /// Endpoints' labels (ServiceEntry endpoint, WorkloadEntry or pod labels), by the
    /// endpoint address as `ports` lists it: the ingress picks among the endpoints a
    /// request's subset selects, and their distinct sets are published.
    pub endpoint_labels: BTreeMap<SocketAddr, BTreeMap<String, String>>,
    /// `None`: any federated trust domain may connect.
    pub allowed_peers: Option<BTreeSet<SpiffeId>>,
    /// DNS names published with it (a registered legacy service's hosts).
    pub hosts: Vec<String>,
    /// TLS toward the endpoints (a registered service's DestinationRule).
    pub tls: Option<meshfed_catalog::legacy::TlsOrigination>,
    /// Port names (a registered service's), published for DNS SRV records.
    #[serde(serialize_with = "port_names")]
    pub port_names: BTreeMap<(Protocol, u16), String>,
    /// TCP ports that speak HTTP (`http`, `http2`, `grpc`): the ingress terminates HTTP
    /// on their streams and picks an endpoint per request. Absent: bytes.
    pub app_protocols: BTreeMap<u16, AppProtocol>,
    /// HTTP routes registered for this service (a VirtualService), published with it.
    pub http_policy: Option<meshfed_catalog::http_route::HttpPolicy>,
    /// Workload identities behind it (a Kubernetes export's service accounts).
    pub identities: Vec<SpiffeId>,
    /// Send a PROXY protocol v2 header to the endpoint: the client's address at the far
    /// egress, and the caller's SPIFFE ID in TLV 0xE0.
    pub proxy_protocol: bool,
}

impl Export {
    /// What the streams of TCP port `port` carry at this gateway, as the ingress serves
    /// them and as importers are told: the port's protocol (on an HTTP-family port the
    /// ingress originates the service's TLS on its pooled endpoint connections), except
    /// that the PROXY header is per connection, so a port with it carries the client's
    /// bytes (`tcp`) whatever it speaks, and that on a `tls` port whose TLS the gateway
    /// originates the clients speak plain bytes, not TLS an importer could route by
    /// SNI. Pure.
    pub fn served_protocol(&self, port: u16) -> AppProtocol {
        let app = self
            .app_protocols
            .get(&port)
            .copied()
            .unwrap_or(AppProtocol::Tcp);
        if self.proxy_protocol || (self.tls.is_some() && app == AppProtocol::Tls) {
            return AppProtocol::Tcp;
        }
        app
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Import {
    pub service: ServiceName,
    pub port: u16,
    pub protocol: Protocol,
    /// What a TCP import speaks: `http`, `http2` and `grpc` are routed per request.
    pub app_protocol: AppProtocol,
    pub site: SiteName,
    pub listen: SocketAddr,
    /// The caller this listener's clients are, declared (see
    /// [`GatewayConfig::source_identity`]); `None`: the gateway's default.
    pub source_identity: Option<SpiffeId>,
}

/// `tcp` (the default), `udp`, or an HTTP family protocol carried on TCP (`http`,
/// `http2`, `grpc`), in any case.
fn protocol(p: Option<&str>) -> Result<(Protocol, AppProtocol), String> {
    match p.map(str::to_ascii_lowercase).as_deref() {
        None => Ok((Protocol::Tcp, AppProtocol::Tcp)),
        Some("udp") => Ok((Protocol::Udp, AppProtocol::Tcp)),
        Some(other) => AppProtocol::parse(other)
            .filter(|_| !other.is_empty())
            .map(|a| (Protocol::Tcp, a))
            .ok_or_else(|| format!("{other:?} is not tcp, udp, http, http2, grpc or tls")),
    }
}

/// Serializes a value by its `Debug` form (`Duration`: `10s`, `1.5s`), for
/// `/debug/config`.
pub(crate) fn as_debug<T: std::fmt::Debug, S: serde::Serializer>(
    v: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{v:?}"))
}

/// `{"tcp/80": "http"}`: JSON keys are strings.
fn port_names<S: serde::Serializer>(
    v: &BTreeMap<(Protocol, u16), String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(v.iter().map(|((p, port), name)| {
        let p = match p {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        (format!("{p}/{port}"), name)
    }))
}

// === impl GatewayConfig ===

impl GatewayConfig {
    /// Directories of `<trust domain>.json` bundles besides `bundles`, in the order
    /// they override each other: the federation's, then the Workload API's.
    pub fn bundle_dirs(&self) -> Vec<PathBuf> {
        let fed = self.federation.iter().map(|f| f.dir.join("bundles"));
        let api = self.workload_api.iter().map(|w| w.bundle_dir.clone());
        fed.chain(api).collect()
    }

    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_owned(),
            source,
        })?;
        Self::parse(&text, file)
    }

    /// Parses YAML text; `file` names the source in errors and anchors relative paths.
    pub fn parse(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            detail: meshfed_catalog::yaml::yaml_message(&e.to_string()),
        })?;
        let base = file.parent().unwrap_or(Path::new("."));
        let v = Validator { file };
        raw.validate(&v, base)
    }
}

struct Validator<'a> {
    file: &'a Path,
}

impl Validator<'_> {
    fn err(&self, field: impl Into<String>, reason: impl ToString) -> ConfigError {
        ConfigError::Field {
            file: self.file.to_owned(),
            field: meshfed_catalog::names::clip(&field.into(), 200),
            reason: meshfed_catalog::names::clip(&reason.to_string(), 400),
        }
    }

    fn addr(&self, field: impl Into<String>, s: &str) -> Result<SocketAddr, ConfigError> {
        s.parse()
            .map_err(|_| self.err(field, format!("{s:?} is not an IP:port socket address")))
    }

    fn duration(
        &self,
        field: &str,
        s: Option<&str>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match s {
            None => Ok(default),
            Some(s) => {
                humantime::parse_duration(s).map_err(|e| self.err(field, format!("{s:?}: {e}")))
            }
        }
    }
}

fn workload_api(
    v: &Validator<'_>,
    base: &Path,
    cert: &Path,
    w: RawWorkloadApi,
) -> Result<WorkloadApi, ConfigError> {
    let socket = match w.socket {
        Some(s) => s,
        None => std::env::var("SPIFFE_ENDPOINT_SOCKET").map_err(|_| {
            v.err(
                "tls.workload_api.socket",
                "not set, and neither is SPIFFE_ENDPOINT_SOCKET",
            )
        })?,
    };
    spiffe::transport::Endpoint::parse(&socket)
        .map_err(|e| v.err("tls.workload_api.socket", format!("{socket:?}: {e}")))?;
    let wait = v.duration(
        "tls.workload_api.wait",
        w.wait.as_deref(),
        DEFAULT_WORKLOAD_API_WAIT,
    )?;
    let bundle_dir = match w.bundle_dir {
        Some(d) => rel(base, d),
        None => rel(base, cert.to_path_buf())
            .parent()
            .unwrap_or(base)
            .join("workload-api-bundles"),
    };
    Ok(WorkloadApi {
        socket,
        bundle_dir,
        wait,
    })
}

fn rel(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() { p } else { base.join(p) }
}

impl RawConfig {
    fn validate(self, v: &Validator<'_>, base: &Path) -> Result<GatewayConfig, ConfigError> {
        let site = SiteName::new(&self.site).map_err(|e| v.err("site", e))?;
        let trust_domain =
            TrustDomain::new(&self.trust_domain).map_err(|e| v.err("trust_domain", e))?;
        if self.tls.bundles.is_empty()
            && self.federation.is_none()
            && self.tls.workload_api.is_none()
        {
            return Err(v.err(
                "tls.bundles",
                "at least one trust bundle is required (or a `federation` or `tls.workload_api` section that provides them)",
            ));
        }
        if self.caller_mtls && self.caller_pod_ip {
            return Err(v.err(
                "caller_pod_ip",
                "set either caller_mtls or caller_pod_ip: one way names the callers",
            ));
        }
        if self.tls.renew.is_some() && self.tls.workload_api.is_some() {
            return Err(v.err(
                "tls.workload_api",
                "set either tls.renew or tls.workload_api: one source issues the SVID",
            ));
        }
        let workload_api = self
            .tls
            .workload_api
            .map(|w| workload_api(v, base, &self.tls.cert, w))
            .transpose()?;
        let source_identity = self
            .source_identity
            .as_deref()
            .map(|s| source_identity(v, "source_identity", s, &trust_domain))
            .transpose()?;
        let renew = match self.tls.renew {
            None => None,
            Some(r) => {
                let ttl = v.duration("tls.renew.ttl", r.ttl.as_deref(), DEFAULT_RENEW_TTL)?;
                if ttl < Duration::from_secs(2) {
                    return Err(v.err("tls.renew.ttl", "must be at least 2s"));
                }
                Some(Renew {
                    ca: rel(base, r.ca),
                    ttl,
                })
            }
        };
        let federation = federation(v, base, self.federation)?;
        let dns = dns(v, self.dns, federation.as_ref())?;
        let listen = v.addr("listen", &self.listen)?;
        let admin = v.addr("admin", self.admin.as_deref().unwrap_or(DEFAULT_ADMIN))?;
        let drain_grace = v.duration(
            "drain_grace",
            self.drain_grace.as_deref(),
            DEFAULT_DRAIN_GRACE,
        )?;
        let connect_timeout = v.duration(
            "connect_timeout",
            self.connect_timeout.as_deref(),
            DEFAULT_CONNECT_TIMEOUT,
        )?;
        let reload_interval = v.duration(
            "reload_interval",
            self.reload_interval.as_deref(),
            DEFAULT_RELOAD_INTERVAL,
        )?;
        if reload_interval.is_zero() {
            return Err(v.err("reload_interval", "must be positive"));
        }
        let udp_idle_timeout = v.duration(
            "udp_idle_timeout",
            self.udp_idle_timeout.as_deref(),
            DEFAULT_UDP_IDLE_TIMEOUT,
        )?;
        if udp_idle_timeout.is_zero() {
            return Err(v.err("udp_idle_timeout", "must be positive"));
        }
        let http_idle_timeout = v.duration(
            "http_idle_timeout",
            self.http_idle_timeout.as_deref(),
            DEFAULT_HTTP_IDLE_TIMEOUT,
        )?;
        if http_idle_timeout.is_zero() {
            return Err(v.err("http_idle_timeout", "must be positive"));
        }
        if let Some(w) = self.workers
            && !(1..=MAX_WORKERS).contains(&w)
        {
            return Err(v.err("workers", format!("{w}: between 1 and {MAX_WORKERS}")));
        }

        let mut transports = transports(v, self.transport.unwrap_or_default())?;
        for (i, p) in self.peers.iter().enumerate() {
            if let Some(t) = &p.transport {
                let mode = t
                    .parse()
                    .map_err(|e| v.err(format!("peers[{i}].transport"), e))?;
                if let Ok(s) = SiteName::new(&p.site) {
                    transports.sites.insert(s, mode);
                }
            }
        }
        let peers = peers(v, self.peers, &site, listen)?;
        let exports = exports(v, self.exports)?;
        let imports = imports(v, self.imports, &peers, &trust_domain)?;

        Ok(GatewayConfig {
            site,
            trust_domain,
            renew,
            workload_api,
            cert: rel(base, self.tls.cert),
            key: rel(base, self.tls.key),
            bundles: self.tls.bundles.into_iter().map(|b| rel(base, b)).collect(),
            listen,
            source_identity,
            caller_mtls: self.caller_mtls,
            caller_pod_ip: self.caller_pod_ip,
            quic_congestion: self
                .quic_congestion
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(|e| v.err("quic_congestion", e))?
                .unwrap_or_default(),
            workers: self.workers,
            transports,
            admin,
            drain_grace,
            connect_timeout,
            reload_interval,
            udp_idle_timeout,
            http_idle_timeout,
            federation,
            dns,
            peers,
            exports,
            imports,
        })
    }
}

/// The `transport` section.
fn transports(
    v: &Validator<'_>,
    raw: RawTransport,
) -> Result<crate::peers::Transports, ConfigError> {
    let d = crate::peers::Transports::default();
    let mut sites = BTreeMap::new();
    for (site, mode) in raw.sites {
        let f = format!("transport.sites.{site}");
        let name = SiteName::new(&site).map_err(|e| v.err(&f, e))?;
        sites.insert(name, mode.parse().map_err(|e| v.err(&f, e))?);
    }
    let fallback_after = v.duration(
        "transport.fallback_after",
        raw.fallback_after.as_deref(),
        d.fallback_after,
    )?;
    let probe_every = v.duration(
        "transport.probe_every",
        raw.probe_every.as_deref(),
        d.probe_every,
    )?;
    for (field, value) in [
        ("transport.fallback_after", fallback_after),
        ("transport.probe_every", probe_every),
    ] {
        if value < Duration::from_millis(100) {
            return Err(v.err(field, format!("{value:?}: at least 100ms")));
        }
    }
    Ok(crate::peers::Transports {
        default: raw
            .default
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e| v.err("transport.default", e))?
            .unwrap_or_default(),
        sites,
        fallback_after,
        probe_every,
        // Set by the gateway from `federation.inbound`.
        reverse: false,
        h2_connections: match raw.h2_connections {
            None => d.h2_connections,
            Some(n @ 1..=16) => n,
            Some(n) => return Err(v.err("transport.h2_connections", format!("{n}: 1 to 16"))),
        },
    })
}

/// The `federation` section.
fn federation(
    v: &Validator<'_>,
    base: &Path,
    raw: Option<RawFederation>,
) -> Result<Option<Federation>, ConfigError> {
    raw.map(|f| {
        let import_address = f
            .import_address
            .as_deref()
            .unwrap_or("127.0.0.1")
            .parse()
            .map_err(|_| v.err("federation.import_address", "not an IP address"))?;
        if f.inbound == Some(false) && f.advertise.is_some() {
            return Err(v.err(
                "federation.advertise",
                "an outbound-only site (inbound: false) has no address to advertise",
            ));
        }
        Ok::<_, ConfigError>(Federation {
            dir: rel(base, f.dir),
            import_address,
            vip_range: f
                .vip_range
                .as_deref()
                .map(meshfed_catalog::routing::VipRange::parse)
                .transpose()
                .map_err(|e| v.err("federation.vip_range", e))?,
            import_ports: f
                .import_ports
                .as_deref()
                .map(meshfed_catalog::routing::PortRange::parse)
                .transpose()
                .map_err(|e| v.err("federation.import_ports", e))?,
            inbound: f.inbound.unwrap_or(true),
            labels: match meshfed_catalog::http_route::check_labels(&f.labels) {
                Ok(()) => f.labels,
                Err((k, e)) => return Err(v.err(format!("federation.labels{k}"), e)),
            },
            advertise: f.advertise,
            locality: match f.locality {
                Some(l) => Some(
                    meshfed_catalog::locality::check(&l)
                        .map(|()| l)
                        .map_err(|e| v.err("federation.locality", e))?,
                ),
                None => None,
            },
        })
    })
    .transpose()
}

/// The `dns` section: it answers from the catalog, so it needs `federation`.
fn dns(
    v: &Validator<'_>,
    raw: Option<RawDns>,
    federation: Option<&Federation>,
) -> Result<Option<Dns>, ConfigError> {
    raw.map(|d| {
            if federation.is_none() {
                return Err(v.err(
                    "dns",
                    "needs a `federation` section (answers come from the catalog)",
                ));
            }
            if federation.is_some_and(|f| f.import_ports.is_some()) {
                return Err(v.err(
                    "dns",
                    "cannot answer with `federation.import_ports`: clients reach such imports through their derived Services (`meshfed kubernetes controller`), named by the cluster's DNS",
                ));
            }
            let ttl = v.duration("dns.ttl", d.ttl.as_deref(), Duration::from_secs(5))?;
            let zones = d
                .zones
                .iter()
                .enumerate()
                .map(|(i, z)| valid_zone(z).map_err(|e| v.err(format!("dns.zones[{i}]"), e)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Dns {
                listen: v.addr("dns.listen", &d.listen)?,
                ttl: u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX),
                zones,
                forward: d
                    .forward
                    .as_deref()
                    .map(|f| v.addr("dns.forward", f))
                    .transpose()?,
                rate_limit: match d.rate_limit {
                    Some(0) => return Err(v.err("dns.rate_limit", "must be positive")),
                    r => r,
                },
            })
        })
        .transpose()
}

/// `peers`: distinct sites other than ours, each dialable from `listen`.
fn peers(
    v: &Validator<'_>,
    raw: Vec<RawPeer>,
    site: &SiteName,
    listen: SocketAddr,
) -> Result<Vec<Peer>, ConfigError> {
    let mut peers = Vec::new();
    let mut peer_sites = BTreeSet::new();
    for (i, p) in raw.into_iter().enumerate() {
        let f = |name: &str| format!("peers[{i}].{name}");
        let psite = SiteName::new(&p.site).map_err(|e| v.err(f("site"), e))?;
        if psite == *site {
            return Err(v.err(f("site"), "a gateway cannot peer with its own site"));
        }
        if !peer_sites.insert(psite.clone()) {
            return Err(v.err(f("site"), format!("peer {psite} is listed twice")));
        }
        // IP:port, or host:port (resolved, and again on its TTL).
        if let Some(a) = p.address.as_deref()
            && meshfed_catalog::names::GatewayAddress::parse(a).is_none()
        {
            return Err(v.err(
                f("address"),
                format!("{a:?} is neither IP:port nor host:port"),
            ));
        }
        if let Some(a) = p
            .address
            .as_deref()
            .and_then(|a| a.parse::<SocketAddr>().ok())
            && listen.ip().is_loopback()
            && !a.ip().is_loopback()
        {
            return Err(v.err(
                f("address"),
                format!("{a} is not on loopback, but `listen` {listen} is: the QUIC endpoint could not send to it (listen on 0.0.0.0 or a routable address)"),
            ));
        }
        let spiffe_id = SpiffeId::new(&p.spiffe_id)
            .map_err(|e| v.err(f("spiffe_id"), format!("{:?}: {e}", p.spiffe_id)))?;
        peers.push(Peer {
            site: psite,
            address: p.address,
            spiffe_id,
        });
    }
    Ok(peers)
}

/// `exports`: each service once, each (protocol, port) once, with its endpoints.
fn exports(
    v: &Validator<'_>,
    raw: Vec<RawExport>,
) -> Result<BTreeMap<ServiceName, Export>, ConfigError> {
    let mut exports = BTreeMap::new();
    for (i, e) in raw.into_iter().enumerate() {
        let f = |name: &str| format!("exports[{i}].{name}");
        let service = ServiceName::parse(&e.service).map_err(|err| v.err(f("service"), err))?;
        if e.ports.is_empty() {
            return Err(v.err(f("ports"), "an export needs at least one port"));
        }
        let mut ports = BTreeMap::new();
        let mut udp_ports = BTreeMap::new();
        let mut app_protocols = BTreeMap::new();
        for (j, p) in e.ports.into_iter().enumerate() {
            if p.port == 0 {
                return Err(v.err(f(&format!("ports[{j}].port")), "port 0"));
            }
            let (protocol, app) = protocol(p.protocol.as_deref())
                .map_err(|e| v.err(f(&format!("ports[{j}].protocol")), e))?;
            if !app.is_tcp() {
                app_protocols.insert(p.port, app);
            }
            let ports = match protocol {
                Protocol::Tcp => &mut ports,
                Protocol::Udp => &mut udp_ports,
            };
            let eps = p
                .endpoints
                .iter()
                .enumerate()
                .map(|(k, a)| v.addr(f(&format!("ports[{j}].endpoints[{k}]")), a))
                .collect::<Result<Vec<_>, _>>()?;
            if ports.insert(p.port, eps).is_some() {
                return Err(v.err(
                    f(&format!("ports[{j}].port")),
                    format!("{protocol} port {} is listed twice", p.port),
                ));
            }
        }
        let allowed_peers = e
            .allowed_peers
            .map(|ids| {
                ids.iter()
                    .enumerate()
                    .map(|(k, s)| {
                        SpiffeId::new(s).map_err(|err| {
                            v.err(f(&format!("allowed_peers[{k}]")), format!("{s:?}: {err}"))
                        })
                    })
                    .collect::<Result<BTreeSet<_>, _>>()
            })
            .transpose()?;
        if exports.contains_key(&service) {
            return Err(v.err(f("service"), format!("{service} is exported twice")));
        }
        exports.insert(
            service.clone(),
            Export {
                endpoint_labels: Default::default(),
                http_policy: None,
                service,
                ports,
                udp_ports,
                allowed_peers,
                hosts: vec![],
                tls: None,
                port_names: BTreeMap::new(),
                app_protocols,
                identities: vec![],
                proxy_protocol: e.proxy_protocol,
            },
        );
    }
    Ok(exports)
}

/// A declared caller identity: a SPIFFE ID of this site's trust domain.
fn source_identity(
    v: &Validator<'_>,
    field: &str,
    s: &str,
    td: &TrustDomain,
) -> Result<SpiffeId, ConfigError> {
    let id = SpiffeId::new(s).map_err(|e| v.err(field, format!("{s:?}: {e}")))?;
    if id.trust_domain_str() != td.as_str() {
        return Err(v.err(
            field,
            format!("{id} is not in this site's trust domain {td}: a gateway vouches only for its own workloads"),
        ));
    }
    Ok(id)
}

/// `imports`: each from a peer with an address, each listen address once per protocol.
fn imports(
    v: &Validator<'_>,
    raw: Vec<RawImport>,
    peers: &[Peer],
    td: &TrustDomain,
) -> Result<Vec<Import>, ConfigError> {
    let mut imports = Vec::new();
    let mut listens = BTreeSet::new();
    for (i, im) in raw.into_iter().enumerate() {
        let f = |name: &str| format!("imports[{i}].{name}");
        let service = ServiceName::parse(&im.service).map_err(|e| v.err(f("service"), e))?;
        let isite = SiteName::new(&im.site).map_err(|e| v.err(f("site"), e))?;
        match peers.iter().find(|p| p.site == isite) {
            None => return Err(v.err(f("site"), format!("{isite} is not in `peers`"))),
            Some(p) if p.address.is_none() => {
                return Err(v.err(f("site"), format!("peer {isite} has no address to dial")));
            }
            Some(_) => {}
        }
        if im.port == 0 {
            return Err(v.err(f("port"), "port 0"));
        }
        let (protocol, app_protocol) =
            protocol(im.protocol.as_deref()).map_err(|e| v.err(f("protocol"), e))?;
        let listen = v.addr(f("listen"), &im.listen)?;
        if listen.port() != 0 && !listens.insert((listen, protocol)) {
            return Err(v.err(f("listen"), format!("{listen} is used by another import")));
        }
        let source_identity = im
            .source_identity
            .as_deref()
            .map(|s| source_identity(v, &f("source_identity"), s, td))
            .transpose()?;
        imports.push(Import {
            service,
            port: im.port,
            protocol,
            app_protocol,
            site: isite,
            listen,
            source_identity,
        });
    }
    Ok(imports)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
site: west
trust_domain: west.example.org
tls:
  cert: certs/svid.pem
  key: certs/svid.key
  bundles: [west.json, /etc/meshfed/east.json]
listen: 0.0.0.0:15443
drain_grace: 3s
peers:
  - site: east
    address: 10.0.0.2:15443
    spiffe_id: spiffe://east.example.org/meshfed/site/east/gateway
exports:
  - service: echo.demo
    ports:
      - port: 7000
        endpoints: [127.0.0.1:9000, 127.0.0.1:9001]
imports:
  - service: orders.shop
    port: 8080
    site: east
    listen: 127.0.0.1:18080
"#;

    fn parse(s: &str) -> Result<GatewayConfig, ConfigError> {
        GatewayConfig::parse(s, Path::new("/etc/meshfed/west.yaml"))
    }

    /// A port serves what it speaks, with TLS origination too, unless the PROXY header
    /// (per connection) makes it carry bytes.
    #[test]
    fn a_port_with_tls_origination_or_the_proxy_header_carries_bytes() {
        let tls = meshfed_catalog::legacy::TlsOrigination {
            mode: meshfed_catalog::legacy::TlsMode::Simple,
            ca_certificates: "ca.pem".into(),
            sni: "a.example".into(),
            client_certificate: None,
            private_key: None,
        };
        let export = |tls: Option<&meshfed_catalog::legacy::TlsOrigination>, proxy: bool| Export {
            service: ServiceName::parse("web.demo").unwrap(),
            ports: BTreeMap::new(),
            udp_ports: BTreeMap::new(),
            endpoint_labels: BTreeMap::new(),
            allowed_peers: None,
            hosts: vec![],
            tls: tls.cloned(),
            port_names: BTreeMap::new(),
            app_protocols: [
                (80, AppProtocol::Http),
                (443, AppProtocol::Tls),
                (90, AppProtocol::Grpc),
            ]
            .into(),
            http_policy: None,
            identities: vec![],
            proxy_protocol: proxy,
        };
        use AppProtocol::*;
        for (tls, proxy, port, want) in [
            (None, false, 80, Http),
            (None, false, 90, Grpc),
            (None, false, 443, Tls),
            (None, false, 22, Tcp),
            (Some(&tls), false, 80, Http),
            (Some(&tls), false, 90, Grpc),
            (Some(&tls), false, 443, Tcp),
            (None, true, 80, Tcp),
            (None, true, 90, Tcp),
        ] {
            assert_eq!(
                export(tls, proxy).served_protocol(port),
                want,
                "tls {}, proxy {proxy}, port {port}",
                tls.is_some()
            );
        }
    }

    #[test]
    fn parses_good_config() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.site.as_str(), "west");
        assert_eq!(c.cert, Path::new("/etc/meshfed/certs/svid.pem"));
        assert_eq!(c.bundles[1], Path::new("/etc/meshfed/east.json"));
        assert_eq!(c.drain_grace, Duration::from_secs(3));
        assert_eq!(c.admin.to_string(), DEFAULT_ADMIN);
        let e = &c.exports[&ServiceName::parse("echo.demo").unwrap()];
        assert_eq!(e.ports[&7000].len(), 2);
        assert_eq!(e.allowed_peers, None);
        assert_eq!(c.imports[0].site.as_str(), "east");
    }

    fn field_err(yaml: &str) -> (String, String) {
        match parse(yaml).unwrap_err() {
            ConfigError::Field {
                field,
                reason,
                file,
            } => {
                assert_eq!(file, Path::new("/etc/meshfed/west.yaml"));
                (field, reason)
            }
            other => panic!("expected a field error, got {other}"),
        }
    }

    #[test]
    fn workload_api_source() {
        let with = |tls: &str| {
            GOOD.replace(
                "  bundles: [west.json, /etc/meshfed/east.json]\n",
                &format!("  bundles: []\n{tls}"),
            )
        };
        let c = parse(&with(
            "  workload_api: {socket: unix:///run/spire/agent.sock, wait: 5s}\n",
        ))
        .unwrap();
        let w = c.workload_api.as_ref().unwrap();
        assert_eq!(w.socket, "unix:///run/spire/agent.sock");
        assert_eq!(w.wait, Duration::from_secs(5));
        assert_eq!(
            w.bundle_dir,
            Path::new("/etc/meshfed/certs/workload-api-bundles")
        );
        assert_eq!(c.bundle_dirs(), vec![w.bundle_dir.clone()]);
        for (tls, field, reason) in [
            (
                "  workload_api: {socket: \"/run/spire/agent.sock\"}\n",
                "tls.workload_api.socket",
                "/run/spire/agent.sock",
            ),
            (
                "  workload_api: {socket: \"http://x\"}\n",
                "tls.workload_api.socket",
                "http://x",
            ),
            (
                "  workload_api: {socket: \"unix:///s\", wait: soon}\n",
                "tls.workload_api.wait",
                "soon",
            ),
            (
                "  workload_api: {socket: \"unix:///s\"}\n  renew: {ca: ca}\n",
                "tls.workload_api",
                "either tls.renew or tls.workload_api",
            ),
            ("", "tls.bundles", "tls.workload_api"),
        ] {
            let (f, r) = field_err(&with(tls));
            assert_eq!(f, field, "{tls}: {r}");
            assert!(r.contains(reason), "{tls}: {r}");
        }
    }

    #[test]
    fn one_way_names_the_callers() {
        let c = parse(&format!("{GOOD}caller_pod_ip: true\n")).unwrap();
        assert!(c.caller_pod_ip && !c.caller_mtls);
        let (f, r) = field_err(&format!("{GOOD}caller_pod_ip: true\ncaller_mtls: true\n"));
        assert_eq!(f, "caller_pod_ip");
        assert!(r.contains("either caller_mtls or caller_pod_ip"), "{r}");
    }

    #[test]
    fn workers_are_counted_threads() {
        assert_eq!(parse(GOOD).unwrap().workers, None);
        assert_eq!(
            parse(&format!("{GOOD}workers: 1\n")).unwrap().workers,
            Some(1)
        );
        for bad in ["0", "257"] {
            let (f, r) = field_err(&format!("{GOOD}workers: {bad}\n"));
            assert_eq!(f, "workers");
            assert!(r.contains("between 1 and 256"), "{r}");
        }
    }

    #[test]
    fn udp_ports_and_imports() {
        let y = GOOD
            .replace(
                "        endpoints: [127.0.0.1:9000, 127.0.0.1:9001]\n",
                "        endpoints: [127.0.0.1:9000, 127.0.0.1:9001]\n      - {port: 7000, protocol: UDP, endpoints: [127.0.0.1:9053]}\n",
            )
            .replace(
                "    listen: 127.0.0.1:18080\n",
                "    listen: 127.0.0.1:18080\n  - {service: orders.shop, port: 8080, protocol: udp, site: east, listen: 127.0.0.1:18080}\n",
            )
            + "udp_idle_timeout: 30s\nhttp_idle_timeout: 5m\n";
        let c = GatewayConfig::parse(&y, Path::new("/etc/meshfed/west.yaml")).unwrap();
        let e = &c.exports[&ServiceName::parse("echo.demo").unwrap()];
        assert_eq!(e.ports[&7000].len(), 2, "TCP 7000 stays");
        assert_eq!(e.udp_ports[&7000], vec!["127.0.0.1:9053".parse().unwrap()]);
        // The same listen address for TCP and UDP is two sockets, not a clash.
        assert_eq!(
            c.imports.iter().map(|i| i.protocol).collect::<Vec<_>>(),
            vec![Protocol::Tcp, Protocol::Udp]
        );
        assert_eq!(c.udp_idle_timeout, Duration::from_secs(30));
        assert_eq!(c.http_idle_timeout, Duration::from_secs(300));
        assert_eq!(
            GatewayConfig::parse(GOOD, Path::new("x.yaml"))
                .unwrap()
                .udp_idle_timeout,
            DEFAULT_UDP_IDLE_TIMEOUT
        );
        let (f, r) = field_err(&y.replace("protocol: UDP", "protocol: SCTP"));
        assert_eq!(f, "exports[0].ports[1].protocol");
        assert!(
            r.contains("\"sctp\" is not tcp, udp, http, http2, grpc or tls"),
            "{r}"
        );
        let (f, r) = field_err(&y.replace("protocol: UDP, endpoints: [127.0.0.1:9053]", "protocol: udp, endpoints: []}\n      - {port: 7000, protocol: udp, endpoints: [127.0.0.1:1]"));
        assert_eq!(f, "exports[0].ports[2].port");
        assert!(r.contains("udp port 7000 is listed twice"), "{r}");
        let (f, _) = field_err(&y.replace("udp_idle_timeout: 30s", "udp_idle_timeout: 0s"));
        assert_eq!(f, "udp_idle_timeout");
        let (f, _) = field_err(&y.replace("http_idle_timeout: 5m", "http_idle_timeout: 0s"));
        assert_eq!(f, "http_idle_timeout");
        let (f, _) = field_err(&y.replace("http_idle_timeout: 5m", "http_idle_timeout: soon"));
        assert_eq!(f, "http_idle_timeout");
    }

    #[test]
    fn errors_name_the_field() {
        let (f, _) = field_err(&GOOD.replace("site: west", "site: West"));
        assert_eq!(f, "site");
        let (f, r) = field_err(&GOOD.replace(
            "spiffe://east.example.org/meshfed",
            "spiffe://east.example.org//meshfed",
        ));
        assert_eq!(f, "peers[0].spiffe_id");
        assert!(r.contains("empty segment"), "{r}");
        let (f, _) = field_err(&GOOD.replace("127.0.0.1:9001", "localhost"));
        assert_eq!(f, "exports[0].ports[0].endpoints[1]");
        let (f, r) = field_err(&GOOD.replace("site: east\n    listen", "site: north\n    listen"));
        assert_eq!(f, "imports[0].site");
        assert!(r.contains("not in `peers`"), "{r}");
        let (f, r) = field_err(&GOOD.replace("listen: 0.0.0.0:15443", "listen: 127.0.0.1:15443"));
        assert_eq!(f, "peers[0].address");
        assert!(r.contains("not on loopback"), "{r}");
        let c = parse(&GOOD.replace("10.0.0.2:15443", "gw.east.example.org:15443")).unwrap();
        assert_eq!(
            c.peers[0].address.as_deref(),
            Some("gw.east.example.org:15443")
        );
        let (f, r) = field_err(&GOOD.replace("10.0.0.2:15443", "gw east:15443"));
        assert_eq!(f, "peers[0].address");
        assert!(r.contains("neither IP:port nor host:port"), "{r}");
        let (f, _) = field_err(&GOOD.replace("drain_grace: 3s", "drain_grace: soon"));
        assert_eq!(f, "drain_grace");
        let (f, _) = field_err(&GOOD.replace("service: echo.demo", "service: echo"));
        assert_eq!(f, "exports[0].service");
        // The transport section and a peer's transport.
        let with = |t: &str| format!("{GOOD}transport:\n{t}\n");
        for (yaml, field) in [
            ("  default: udp", "transport.default"),
            ("  sites: {East: h2}", "transport.sites.East"),
            ("  sites: {east: tcp}", "transport.sites.east"),
            ("  fallback_after: 10ms", "transport.fallback_after"),
            ("  probe_every: never", "transport.probe_every"),
            ("  h2_connections: 0", "transport.h2_connections"),
            ("  h2_connections: 17", "transport.h2_connections"),
        ] {
            let (f, r) = field_err(&with(yaml));
            assert_eq!(f, field, "{yaml}: {r}");
        }
        let c = parse(&with(
            "  default: h2\n  sites: {east: quic}\n  h2_connections: 8",
        ))
        .unwrap();
        assert_eq!(c.transports.default, crate::peers::TransportMode::H2);
        assert_eq!(c.transports.h2_connections, 8);
        let (f, _) = field_err(&GOOD.replace(
            "spiffe_id: spiffe://east.example.org/meshfed",
            "transport: carrier-pigeon\n    spiffe_id: spiffe://east.example.org/meshfed",
        ));
        assert_eq!(f, "peers[0].transport");
    }

    #[test]
    fn a_declared_caller_is_one_of_this_sites_workloads() {
        let c = parse(&format!(
            "{GOOD}source_identity: spiffe://west.example.org/ns/shop/sa/frontend\n"
        ))
        .unwrap();
        assert_eq!(
            c.source_identity.unwrap().as_str(),
            "spiffe://west.example.org/ns/shop/sa/frontend"
        );
        let (f, r) = field_err(&format!(
            "{GOOD}source_identity: spiffe://east.example.org/ns/shop/sa/frontend\n"
        ));
        assert!(
            f == "source_identity" && r.contains("trust domain"),
            "{f}: {r}"
        );
        let (f, _) = field_err(&format!("{GOOD}source_identity: not-an-id\n"));
        assert_eq!(f, "source_identity");
        let per_import = GOOD.replace(
            "    listen: 127.0.0.1:18080\n",
            "    listen: 127.0.0.1:18080\n    source_identity: spiffe://other.org/ns/a/sa/b\n",
        );
        let (f, r) = field_err(&per_import);
        assert!(
            f == "imports[0].source_identity" && r.contains("trust domain"),
            "{f}: {r}"
        );
    }

    #[test]
    fn dns_section_is_checked() {
        let fed = "federation:\n  dir: site\n";
        let dns = |body: &str| format!("{GOOD}{fed}dns:\n{body}");
        let c = parse(&dns(
            "  listen: 127.0.0.1:5353\n  zones: [Mesh.Internal.]\n",
        ))
        .unwrap();
        let d = c.dns.unwrap();
        assert_eq!(
            (d.ttl, d.zones, d.forward),
            (5, vec!["mesh.internal".to_string()], None)
        );
        let (f, r) = field_err(&format!("{GOOD}dns:\n  listen: 127.0.0.1:5353\n"));
        assert!(f == "dns" && r.contains("federation"), "{f}: {r}");
        let (f, r) = field_err(&dns(
            "  listen: 127.0.0.1:5353\n  zones: [ok.example, \"bad_zone\"]\n",
        ));
        assert!(f == "dns.zones[1]" && r.contains("bad_zone"), "{f}: {r}");
        let (f, _) = field_err(&dns(
            "  listen: 127.0.0.1:5353\n  zones: [1.0.10.in-addr.arpa]\n",
        ));
        assert_eq!(f, "dns.zones[0]");
        let (f, _) = field_err(&dns("  listen: 127.0.0.1:5353\n  rate_limit: 0\n"));
        assert_eq!(f, "dns.rate_limit");
        let (f, _) = field_err(&dns("  listen: nowhere\n"));
        assert_eq!(f, "dns.listen");
        let (f, r) = field_err(&format!(
            "{GOOD}federation:\n  dir: site\n  vip_range: 10.0.0.0/31\n"
        ));
        assert!(f == "federation.vip_range" && r.contains("/31"), "{f}: {r}");
        let ported =
            "federation:\n  dir: site\n  import_address: 0.0.0.0\n  import_ports: 20000-29999\n";
        let c = parse(&format!("{GOOD}{ported}")).unwrap();
        assert_eq!(
            c.federation.unwrap().import_ports,
            Some(meshfed_catalog::routing::PortRange {
                first: 20000,
                last: 29999
            })
        );
        let (f, r) = field_err(&format!(
            "{GOOD}federation:\n  dir: site\n  import_ports: 30000-20000\n"
        ));
        assert!(
            f == "federation.import_ports" && r.contains("above"),
            "{f}: {r}"
        );
        let (f, r) = field_err(&format!("{GOOD}{ported}dns:\n  listen: 127.0.0.1:5353\n"));
        assert!(f == "dns" && r.contains("import_ports"), "{f}: {r}");
    }

    #[test]
    fn the_gateways_own_labels_are_kubernetes_labels() {
        let with = |labels: &str| format!("{GOOD}federation:\n  dir: site\n  labels: {labels}\n");
        let c = parse(&with(
            "{topology.istio.io/network: n1, example.com/tier: gold}",
        ))
        .unwrap();
        assert_eq!(
            c.federation.unwrap().labels,
            BTreeMap::from([
                ("example.com/tier".to_string(), "gold".to_string()),
                ("topology.istio.io/network".to_string(), "n1".to_string()),
            ])
        );
        let c = parse(&format!("{GOOD}federation:\n  dir: site\n")).unwrap();
        assert!(c.federation.unwrap().labels.is_empty());
        for bad in ["{\"bad key\": x}", "{tier: \"a b\"}", "{\"\": x}"] {
            let (f, r) = field_err(&with(bad));
            assert!(f.starts_with("federation.labels"), "{bad}: {f}: {r}");
        }
    }

    #[test]
    fn every_example_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                GatewayConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 2, "found {n} example configs in {}", dir.display());
        // The configs the Kubernetes manifests carry in their ConfigMaps.
        let k8s = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
        for f in ["base/gateway-config.yaml", "overlays/site/gateway.yaml"] {
            let c = GatewayConfig::load(&k8s.join(f)).unwrap_or_else(|e| panic!("{e}"));
            let fed = c.federation.expect("federated");
            assert!(
                fed.import_ports.is_some(),
                "{f}: pods listen on import_ports"
            );
        }
    }

    #[test]
    fn unknown_fields_and_bad_yaml_are_refused() {
        let e =
            parse(&GOOD.replace("drain_grace: 3s", "drain_grace: 3s\nlisten_port: 4")).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("/etc/meshfed/west.yaml") && s.contains("listen_port"),
            "{s}"
        );
        let e = parse("site: [").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
        let e = parse("site: west\n").unwrap_err();
        assert!(
            e.to_string().contains("trust_domain") || e.to_string().contains("missing"),
            "{e}"
        );
    }
}
