//! Legacy services as a site registers them (Istio `ServiceEntry` and `WorkloadEntry`,
//! with TLS origination from a `DestinationRule` and health checks from annotations):
//! the model the `istio` parser produces, `registry.json` holds, and the gateway serves.
//! Pure data.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::catalog::Protocol;
use crate::names::ServiceName;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    MeshExternal,
    MeshInternal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    None,
    Static,
    Dns,
    DnsRoundRobin,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyPort {
    pub number: u16,
    /// Istio's protocol as written (HTTP, HTTPS, TCP, TLS, GRPC, HTTP2, MONGO, UDP, ...).
    pub app_protocol: String,
    /// How it travels between sites.
    pub protocol: Protocol,
    pub name: String,
    /// Port on the endpoints; default `number`.
    pub target_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyEndpoint {
    /// An IP address, or a hostname for DNS resolution.
    pub address: String,
    /// Per port name, the endpoint's port (overrides `targetPort`).
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub locality: Option<String>,
    #[serde(default)]
    pub weight: Option<u32>,
}

/// One ServiceEntry, with its WorkloadEntries resolved into endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyService {
    /// `metadata.name`.`metadata.namespace` (namespace `default` when absent).
    pub service: ServiceName,
    pub hosts: Vec<String>,
    pub addresses: Vec<String>,
    pub ports: Vec<LegacyPort>,
    pub location: Location,
    pub resolution: Resolution,
    pub endpoints: Vec<LegacyEndpoint>,
    /// `exportTo`: `*` (default) federates it; `.` keeps it on this site.
    pub export_to: Vec<String>,
    /// Active health checking of the endpoints (`health.meshfed.io/*` annotations).
    #[serde(default)]
    pub health: Option<HealthCheck>,
    /// TLS from the gateway to the endpoints, from a `DestinationRule` for one of the
    /// hosts (`trafficPolicy.tls`), as Istio users configure TLS origination.
    #[serde(default)]
    pub tls: Option<TlsOrigination>,
}

/// Istio `ClientTLSSettings` modes meshfed originates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    /// TLS, the endpoint verified against `ca_certificates` for `sni`.
    Simple,
    /// Also presents `client_certificate` and `private_key`.
    Mutual,
}

/// How the registering site's gateway speaks TLS to the endpoints.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TlsOrigination {
    pub mode: TlsMode,
    /// PEM file of the CA(s) the endpoints' certificates chain to.
    pub ca_certificates: String,
    /// Server name sent and verified; default: the ServiceEntry's first host.
    pub sni: String,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
}

pub const HEALTH_PREFIX: &str = "health.meshfed.io/";

/// How endpoints are checked. Istio has no active health checks for ServiceEntry
/// endpoints, so they are set with annotations, which Istio ignores:
///
/// ```yaml
/// metadata:
///   annotations:
///     health.meshfed.io/check: http      # tcp (connect) or http (GET)
///     health.meshfed.io/path: /healthz   # http only; default /
///     health.meshfed.io/status: "200"    # http only; expected status, default 200
///     health.meshfed.io/port: "8080"     # default: the first port's target
///     health.meshfed.io/interval: 5s     # default 5s
///     health.meshfed.io/timeout: 1s      # default 1s
///     health.meshfed.io/healthy-threshold: "2"    # passes to become healthy; default 2
///     health.meshfed.io/unhealthy-threshold: "3"  # failures to become unhealthy; default 3
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub kind: HealthKind,
    /// Endpoint port to check; `None`: each endpoint's port for the first service port.
    pub port: Option<u16>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum HealthKind {
    Tcp,
    Http { path: String, status: u16 },
}

impl LegacyService {
    /// Whether other sites may import it.
    /// Whether other sites may import it: `exportTo` allows it, and it has endpoints a
    /// remote site can be sent to (resolution NONE forwards to the original destination,
    /// which only this site's clients know).
    pub fn federated(&self) -> bool {
        (self.export_to.is_empty() || self.export_to.iter().any(|e| e == "*"))
            && self.resolution != Resolution::None
    }

    /// The endpoint addresses (`host:port` for hostnames) behind service port `p`.
    pub fn endpoints_for(&self, p: &LegacyPort) -> Vec<String> {
        self.endpoints
            .iter()
            .map(|e| {
                let port = e
                    .ports
                    .get(&p.name)
                    .copied()
                    .or(p.target_port)
                    .unwrap_or(p.number);
                match e.address.parse::<IpAddr>() {
                    Ok(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
                    _ => format!("{}:{port}", e.address),
                }
            })
            .collect()
    }
}
