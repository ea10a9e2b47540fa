//! Builds sites on disk — a CA per trust domain, the gateway's SVID, the bundle, and a
//! gateway config — for `meshfed demo`, the end-to-end tests and the benchmarks. Real
//! certificates and real config files: the same ones an operator would write. Its own
//! crate so that the gateway carries no fixtures.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshfed_identity::{Ca, CaError, SpiffeId, TrustDomain, ca::write_file};

/// One site's identity files.
#[derive(Clone, Debug)]
pub struct SiteFiles {
    pub site: String,
    pub trust_domain: TrustDomain,
    pub id: SpiffeId,
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Bundle(#[from] meshfed_identity::BundleError),
    #[error("invalid name: {0}")]
    Id(#[from] meshfed_identity::IdError),
}

/// Creates `root/<site>/` with a fresh CA for `td`, the gateway SVID and `bundle.json`.
pub fn make_site(root: &Path, site: &str, td: &str) -> Result<SiteFiles, LabError> {
    let td = TrustDomain::new(td)?;
    let ca = Ca::generate(&td, meshfed_identity::ca::DEFAULT_CA_TTL)?;
    site_with_ca(root, site, &ca)
}

/// Creates `root/<site>/` for a site whose gateway SVID is issued by an existing `ca`
/// (several sites sharing one trust domain).
pub fn site_with_ca(root: &Path, site: &str, ca: &Ca) -> Result<SiteFiles, LabError> {
    let td = ca.trust_domain().clone();
    let dir = root.join(site);
    ca.save(&dir.join("ca"))?;
    let id = SpiffeId::gateway(&td, site)?;
    let svid = ca.issue(&id, Duration::from_secs(24 * 3600))?;
    let cert = dir.join("gateway.pem");
    let key = dir.join("gateway.key");
    svid.save(&cert, &key)?;
    let bundle = dir.join("bundle.json");
    write_file(&bundle, ca.bundle(1).to_jwks()?.as_bytes(), 0o644)?;
    Ok(SiteFiles {
        site: site.to_owned(),
        trust_domain: td,
        id,
        dir,
        cert,
        key,
        bundle,
    })
}

/// (service, port, endpoints, allowed peers)
pub type ExportSpec = (String, u16, Vec<SocketAddr>, Option<Vec<SpiffeId>>);

/// A gateway config, written as the YAML an operator would write.
#[derive(Clone, Debug, Default)]
pub struct ConfigBuilder {
    pub listen: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub drain_grace: Option<Duration>,
    pub reload_interval: Option<Duration>,
    /// (site directory, import address): run peers and imports from the federation.
    pub federation: Option<(PathBuf, std::net::IpAddr)>,
    /// `federation.vip_range`.
    pub vip_range: Option<String>,
    /// `federation.import_ports`.
    pub import_ports: Option<String>,
    /// The `dns` section, as YAML lines under `dns:` (e.g. `listen: 127.0.0.1:0`).
    pub dns: Option<String>,
    pub bundles: Vec<PathBuf>,
    /// (site, address, SPIFFE ID)
    pub peers: Vec<(String, Option<SocketAddr>, SpiffeId)>,
    pub exports: Vec<ExportSpec>,
    /// (service, port, site, listen)
    pub imports: Vec<(String, u16, String, SocketAddr)>,
    /// UDP exports (service, port, endpoints), merged into `exports` of the same service.
    pub udp_exports: Vec<(String, u16, Vec<SocketAddr>)>,
    /// UDP imports (service, port, site, listen).
    pub udp_imports: Vec<(String, u16, String, SocketAddr)>,
    pub udp_idle_timeout: Option<Duration>,
    /// `http_idle_timeout`.
    pub http_idle_timeout: Option<Duration>,
    /// `source_identity`: the caller the egress listeners vouch for.
    pub source_identity: Option<String>,
    /// `tls.renew`: (signing authority directory, SVID lifetime).
    pub renew: Option<(PathBuf, Duration)>,
    /// `caller_mtls: true`.
    pub caller_mtls: bool,
    /// `federation.advertise`: the address peers dial (IP:port or host:port).
    pub advertise: Option<String>,
    /// `federation.inbound: false`: an outbound-only site.
    pub outbound_only: bool,
    /// `federation.locality`.
    pub locality: Option<String>,
    /// `federation.labels`, as a YAML flow map (e.g. `{topology.istio.io/network: n1}`).
    pub labels: Option<String>,
    /// `caller_pod_ip: true`.
    pub caller_pod_ip: bool,
    /// `tls.workload_api.socket`: the SVID and this trust domain's bundle come from the
    /// Workload API (the site's own bundle file is then not listed).
    pub workload_api: Option<String>,
    /// Exports (by service) whose endpoints get a PROXY protocol v2 header.
    pub proxy_protocol: Vec<String>,
    /// The `transport` section's lines (e.g. `default: h2`).
    pub transport: Option<String>,
    /// `workers`: the gateway runtime's threads.
    pub workers: Option<usize>,
    /// (service, port, protocol): TCP export and import ports that speak `http`,
    /// `http2` or `grpc`.
    pub app_protocols: Vec<(String, u16, String)>,
}

impl ConfigBuilder {
    pub fn peer(mut self, p: &SiteFiles, address: Option<SocketAddr>) -> Self {
        self.bundles.push(p.bundle.clone());
        self.peers.push((p.site.clone(), address, p.id.clone()));
        self
    }

    pub fn export(mut self, service: &str, port: u16, endpoints: Vec<SocketAddr>) -> Self {
        self.exports.push((service.into(), port, endpoints, None));
        self
    }

    /// Exports to the listed peers only.
    pub fn export_to(
        mut self,
        service: &str,
        port: u16,
        endpoints: Vec<SocketAddr>,
        allowed: Vec<SpiffeId>,
    ) -> Self {
        self.exports
            .push((service.into(), port, endpoints, Some(allowed)));
        self
    }

    pub fn import(mut self, service: &str, port: u16, site: &str, listen: SocketAddr) -> Self {
        self.imports
            .push((service.into(), port, site.into(), listen));
        self
    }

    /// Declares that `service:port` (exported or imported over TCP) speaks `protocol`.
    pub fn speaks(mut self, service: &str, port: u16, protocol: &str) -> Self {
        self.app_protocols
            .push((service.into(), port, protocol.into()));
        self
    }

    fn app_protocol(&self, service: &str, port: u16) -> String {
        self.app_protocols
            .iter()
            .find(|(s, p, _)| s == service && *p == port)
            .map(|(_, _, a)| format!("protocol: {a}"))
            .unwrap_or_default()
    }

    pub fn export_udp(mut self, service: &str, port: u16, endpoints: Vec<SocketAddr>) -> Self {
        self.udp_exports.push((service.into(), port, endpoints));
        self
    }

    pub fn import_udp(mut self, service: &str, port: u16, site: &str, listen: SocketAddr) -> Self {
        self.udp_imports
            .push((service.into(), port, site.into(), listen));
        self
    }

    pub fn yaml(&self, me: &SiteFiles) -> String {
        let mut y = String::new();
        let lo: SocketAddr = ([127, 0, 0, 1], 0).into();
        let _ = writeln!(y, "site: {}", me.site);
        let _ = writeln!(y, "trust_domain: {}", me.trust_domain);
        let _ = writeln!(y, "listen: {}", self.listen.unwrap_or(lo));
        let _ = writeln!(y, "admin: {}", self.admin.unwrap_or(lo));
        if let Some(g) = self.drain_grace {
            let _ = writeln!(y, "drain_grace: {}", humantime::format_duration(g));
        }
        if let Some(r) = self.reload_interval {
            let _ = writeln!(y, "reload_interval: {}", humantime::format_duration(r));
        }
        if let Some(t) = self.udp_idle_timeout {
            let _ = writeln!(y, "udp_idle_timeout: {}", humantime::format_duration(t));
        }
        if let Some(t) = self.http_idle_timeout {
            let _ = writeln!(y, "http_idle_timeout: {}", humantime::format_duration(t));
        }
        if let Some(id) = &self.source_identity {
            let _ = writeln!(y, "source_identity: {id}");
        }
        if self.caller_mtls {
            y.push_str("caller_mtls: true\n");
        }
        if self.caller_pod_ip {
            y.push_str("caller_pod_ip: true\n");
        }
        let _ = writeln!(
            y,
            "tls:\n  cert: {}\n  key: {}",
            me.cert.display(),
            me.key.display()
        );
        if let Some(socket) = &self.workload_api {
            let _ = writeln!(y, "  workload_api:\n    socket: {socket}");
        }
        let own = self.workload_api.is_none().then_some(&me.bundle);
        if own.is_none() && self.bundles.is_empty() {
            y.push_str("  bundles: []\n");
        } else {
            y.push_str("  bundles:\n");
        }
        for b in own.into_iter().chain(&self.bundles) {
            let _ = writeln!(y, "    - {}", b.display());
        }
        if let Some((ca, ttl)) = &self.renew {
            let _ = writeln!(
                y,
                "  renew:\n    ca: {}\n    ttl: {}",
                ca.display(),
                humantime::format_duration(*ttl)
            );
        }
        if let Some((dir, ip)) = &self.federation {
            let _ = writeln!(
                y,
                "federation:\n  dir: {}\n  import_address: {ip}",
                dir.display()
            );
            if let Some(r) = &self.vip_range {
                let _ = writeln!(y, "  vip_range: {r}");
            }
            if let Some(a) = &self.advertise {
                let _ = writeln!(y, "  advertise: {a}");
            }
            if self.outbound_only {
                y.push_str("  inbound: false\n");
            }
            if let Some(l) = &self.locality {
                let _ = writeln!(y, "  locality: {l}");
            }
            if let Some(l) = &self.labels {
                let _ = writeln!(y, "  labels: {l}");
            }
            if let Some(r) = &self.import_ports {
                let _ = writeln!(y, "  import_ports: {r}");
            }
        }
        if let Some(w) = self.workers {
            let _ = writeln!(y, "workers: {w}");
        }
        if let Some(t) = &self.transport {
            y.push_str("transport:\n");
            for l in t.lines() {
                let _ = writeln!(y, "  {l}");
            }
        }
        if let Some(dns) = &self.dns {
            y.push_str("dns:\n");
            for l in dns.lines() {
                let _ = writeln!(y, "  {l}");
            }
        }
        if !self.peers.is_empty() {
            y.push_str("peers:\n");
        }
        for (site, addr, id) in &self.peers {
            let _ = writeln!(y, "  - site: {site}\n    spiffe_id: {id}");
            if let Some(a) = addr {
                let _ = writeln!(y, "    address: {a}");
            }
        }
        if !self.exports.is_empty() || !self.udp_exports.is_empty() {
            y.push_str("exports:\n");
        }
        let list = |eps: &[SocketAddr]| {
            eps.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let udp_ports = |y: &mut String, svc: &str| {
            for (_, port, eps) in self.udp_exports.iter().filter(|u| u.0 == svc) {
                let _ = writeln!(
                    y,
                    "      - port: {port}\n        protocol: udp\n        endpoints: [{}]",
                    list(eps)
                );
            }
        };
        for (i, (svc, _, _, allowed)) in self.exports.iter().enumerate() {
            // A service exported on several ports is one entry with each port.
            if self.exports[..i].iter().any(|e| e.0 == *svc) {
                continue;
            }
            let _ = writeln!(y, "  - service: {svc}\n    ports:");
            for (_, port, eps, _) in self.exports[i..].iter().filter(|e| e.0 == *svc) {
                let _ = writeln!(
                    y,
                    "      - port: {port}\n        {}\n        endpoints: [{}]",
                    self.app_protocol(svc, *port),
                    list(eps)
                );
            }
            udp_ports(&mut y, svc);
            if self.proxy_protocol.contains(svc) {
                y.push_str("    proxy_protocol: true\n");
            }
            if let Some(a) = allowed {
                let ids: Vec<String> = a.iter().map(|i| i.to_string()).collect();
                let _ = writeln!(y, "    allowed_peers: [{}]", ids.join(", "));
            }
        }
        let mut udp_only: Vec<&str> = self
            .udp_exports
            .iter()
            .map(|u| u.0.as_str())
            .filter(|s| !self.exports.iter().any(|e| e.0 == *s))
            .collect();
        udp_only.dedup();
        for svc in udp_only {
            let _ = writeln!(y, "  - service: {svc}\n    ports:");
            udp_ports(&mut y, svc);
        }
        if !self.imports.is_empty() || !self.udp_imports.is_empty() {
            y.push_str("imports:\n");
        }
        for (svc, port, site, listen) in &self.imports {
            let _ = writeln!(
                y,
                "  - service: {svc}\n    port: {port}\n    {}\n    site: {site}\n    listen: {listen}",
                self.app_protocol(svc, *port),
            );
        }
        for (svc, port, site, listen) in &self.udp_imports {
            let _ = writeln!(
                y,
                "  - service: {svc}\n    port: {port}\n    protocol: udp\n    site: {site}\n    listen: {listen}"
            );
        }
        y
    }

    /// Writes `<site dir>/gateway.yaml` and returns its path.
    pub fn write(&self, me: &SiteFiles) -> Result<PathBuf, LabError> {
        let path = me.dir.join("gateway.yaml");
        write_file(&path, self.yaml(me).as_bytes(), 0o644)?;
        Ok(path)
    }
}
