//! `meshfed diagnose SERVICE[:PORT]`: gathers the facts of a cross-site call live at this
//! site (its DNS, its gateway's `/debug/imports`, `/debug/peers` and `/debug/probe`, its
//! cached catalog) and prints the verdicts `meshfed::diagnose` gives them.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use meshfed::diagnose::{DnsFact, ExportFact, Facts, ImportFact, LinkFact, ProbeFact};
use meshfed_catalog::ServiceName;
use meshfed_catalog::catalog::{Catalog, Protocol};
use meshfed_lifecycle::admin::get;

#[derive(clap::Args)]
pub struct DiagnoseArgs {
    /// The service as `name.namespace`, or `name.namespace:port`.
    pub target: String,
    /// The gateway's config: its admin port, DNS and federation directory.
    #[arg(long, short = 'c', default_value = "/etc/meshfed/gateway.yaml")]
    pub config: PathBuf,
    /// Check only this backend site.
    #[arg(long)]
    pub site: Option<String>,
    /// One JSON document instead of the report (stable field names).
    #[arg(long)]
    pub json: bool,
    /// The gateway's admin address, when not the config's (it listens on port 0, say).
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// The site's DNS server, when not the config's `dns.listen`.
    #[arg(long)]
    pub dns: Option<SocketAddr>,
}

/// `web.demo` or `web.demo:8080`.
fn target(t: &str) -> Result<(ServiceName, Option<u16>)> {
    let (name, port) = match t.rsplit_once(':') {
        Some((n, p)) => (
            n,
            Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .with_context(|| format!("{t:?}: {p:?} is not a port"))?,
            ),
        ),
        None => (t, None),
    };
    let svc = ServiceName::parse(name).with_context(|| format!("{t:?}: not name.namespace"))?;
    Ok((svc, port))
}

async fn admin_json(admin: SocketAddr, path: &str) -> Result<serde_json::Value, String> {
    match tokio::time::timeout(Duration::from_secs(15), get(admin, path)).await {
        Err(_) => Err(format!("{admin}{path}: no answer in 15 s")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok((status, body))) if status.is_success() => {
            serde_json::from_str(&body).map_err(|e| format!("{admin}{path}: {e}"))
        }
        Ok(Ok((status, body))) => Err(format!("{admin}{path}: {status}: {}", body.trim())),
    }
}

/// One UDP query to `server`, answered within 2 s (the demo asks with it too).
pub(crate) async fn query(
    server: SocketAddr,
    name: &str,
    t: hickory_proto::rr::RecordType,
) -> Result<hickory_proto::op::Message, String> {
    use hickory_proto::op::{Message, Query};
    let mut q = Message::query();
    q.metadata.id = 0x6d66;
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(
        hickory_proto::rr::Name::from_ascii(name).map_err(|e| e.to_string())?,
        t,
    ));
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let sock = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(|e| e.to_string())?;
    sock.send_to(&q.to_vec().map_err(|e| e.to_string())?, server)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
        .await
        .map_err(|_| format!("no answer from {server} in 2 s"))?
        .map_err(|e| e.to_string())?;
    Message::from_vec(&buf[..n]).map_err(|e| e.to_string())
}

/// One A query at the site's DNS.
async fn resolve(server: SocketAddr, name: &str) -> DnsFact {
    use hickory_proto::op::ResponseCode;
    let failed = |error: String| DnsFact::Failed {
        name: name.to_owned(),
        error,
    };
    match query(server, name, hickory_proto::rr::RecordType::A).await {
        Err(e) => failed(e),
        Ok(m) if m.metadata.response_code != ResponseCode::NoError => {
            failed(format!("{} from {server}", m.metadata.response_code))
        }
        Ok(m) => {
            let addrs: Vec<IpAddr> = m
                .answers
                .iter()
                .filter_map(|r| r.data.to_string().parse().ok())
                .collect();
            if addrs.is_empty() {
                failed(format!("no address in the answer from {server}"))
            } else {
                DnsFact::Answered {
                    name: name.to_owned(),
                    addrs,
                }
            }
        }
    }
}

pub fn run(a: DiagnoseArgs) -> Result<ExitCode> {
    let mut cfg = meshfed_gateway::GatewayConfig::load(&a.config)?;
    if let Some(admin) = a.admin {
        cfg.admin = admin;
    }
    if let (Some(dns), Some(d)) = (a.dns, cfg.dns.as_mut()) {
        d.listen = dns;
    }
    let (service, port) = target(&a.target)?;
    let report = super::runtime()?.block_on(gather(&cfg, service, port, a.site.as_deref()))?;
    let report = meshfed::diagnose::judge(&report);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", meshfed::diagnose::render(&report));
    }
    Ok(if report.succeeds {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub(crate) async fn gather(
    cfg: &meshfed_gateway::GatewayConfig,
    service: ServiceName,
    port: Option<u16>,
    only: Option<&str>,
) -> Result<Facts> {
    // The cached catalog: who exports it, with leases and ready endpoints.
    let catalog: Option<Catalog> = match &cfg.federation {
        None => None,
        Some(f) => {
            let path = f.dir.join("catalog.json");
            Some(match std::fs::read(&path) {
                Ok(b) => serde_json::from_slice(&b)
                    .with_context(|| format!("{}: not a catalog", path.display()))?,
                Err(_) => Catalog::default(),
            })
        }
    };
    let exports = catalog.as_ref().map(|c| {
        c.exports
            .iter()
            .filter(|((_, s), _)| *s == service)
            .map(|((site, _), e)| {
                (
                    site.to_string(),
                    ExportFact {
                        up: c.sites.get(site).is_some_and(|r| r.up),
                        ready_endpoints: e.ready_endpoints,
                        ports: e
                            .ports
                            .iter()
                            .filter(|p| p.protocol == Protocol::Tcp)
                            .map(|p| p.port)
                            .collect(),
                    },
                )
            })
            .collect::<BTreeMap<_, _>>()
    });

    // The import, as the gateway has it.
    let imports = admin_json(cfg.admin, "/debug/imports").await;
    let mine: Vec<ImportFact> = match &imports {
        Ok(v) => v["imports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["service"] == service.to_string() && i["protocol"] == "tcp")
            .filter_map(|i| {
                Some(ImportFact {
                    port: u16::try_from(i["port"].as_u64()?).ok()?,
                    listen: i["listen"].as_str()?.parse().ok()?,
                    backends: i["backends"]
                        .as_array()?
                        .iter()
                        .filter_map(|b| b.as_str().map(str::to_owned))
                        .collect(),
                })
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    let port = match port {
        Some(p) => p,
        None => {
            let mut ports: Vec<u16> = mine.iter().map(|i| i.port).collect();
            if ports.is_empty() {
                ports = exports
                    .iter()
                    .flat_map(|e| e.values().flat_map(|x| x.ports.iter().copied()))
                    .collect();
            }
            ports.sort_unstable();
            ports.dedup();
            match ports.as_slice() {
                [p] => *p,
                [] => bail!(
                    "{service}: no port known here (not imported, not in the cached catalog): say {service}:PORT"
                ),
                many => bail!("{service} has ports {many:?}: say which, as {service}:PORT"),
            }
        }
    };
    let import = match imports {
        Err(e) => Err(e),
        Ok(_) => Ok(mine.into_iter().find(|i| i.port == port)),
    };

    // DNS, at the site's own server.
    let dns = match &cfg.dns {
        None => DnsFact::NotServed,
        Some(d) => {
            let zone = d
                .zones
                .first()
                .map_or("clusterset.local", String::as_str)
                .to_owned();
            let name = format!("{}.{}.svc.{zone}.", service.name(), service.namespace());
            resolve(d.listen, &name).await
        }
    };

    // Links and probes, for each backend site (or the one asked for).
    let mut sites: Vec<String> = import
        .as_ref()
        .ok()
        .and_then(|i| i.as_ref())
        .map(|i| i.backends.clone())
        .unwrap_or_default();
    if let Some(s) = only {
        sites.retain(|x| x == s);
        if sites.is_empty() {
            bail!("{s} is not a backend of {service}:{port} here");
        }
    }
    let mut links = BTreeMap::new();
    let mut probes = BTreeMap::new();
    if !sites.is_empty() {
        let peers = admin_json(cfg.admin, "/debug/peers").await;
        for site in &sites {
            let link = match &peers {
                Err(e) => LinkFact {
                    up: false,
                    transport: None,
                    why: format!("the gateway's /debug/peers did not answer: {e}"),
                },
                Ok(p) => link_fact(p, site),
            };
            links.insert(site.clone(), link);
            let q = format!("/debug/probe?service={service}&port={port}&site={site}");
            let probe = match admin_json(cfg.admin, &q).await {
                Err(e) => ProbeFact::Error(e),
                Ok(v) if v["result"] == "accepted" => ProbeFact::Accepted {
                    transport: v["transport"].as_str().unwrap_or("?").to_owned(),
                    open_ms: v["open_ms"].as_f64().unwrap_or(0.0),
                },
                Ok(v) => ProbeFact::Refused {
                    reason: v["reason"].as_str().unwrap_or("?").to_owned(),
                    message: v["message"].as_str().unwrap_or_default().to_owned(),
                },
            };
            probes.insert(site.clone(), probe);
        }
    }
    Ok(Facts {
        service: service.to_string(),
        port,
        here: cfg.site.to_string(),
        dns: Some(dns),
        import: Some(import),
        exports,
        links,
        probes,
    })
}

/// A site's link from `/debug/peers`: up when any dialed link is up, or when the site
/// dialed us (an outbound-only site).
fn link_fact(peers: &serde_json::Value, site: &str) -> LinkFact {
    let dialed = peers["dialed"][site]["links"].as_array();
    let up = dialed.into_iter().flatten().find(|l| l["up"] == true);
    if let Some(l) = up {
        return LinkFact {
            up: true,
            transport: l["transport"].as_str().map(str::to_owned),
            why: l["why"].as_str().unwrap_or_default().to_owned(),
        };
    }
    let accepted = peers["accepted"].as_object().and_then(|a| {
        a.iter().find(|(id, _)| {
            meshfed_identity::SpiffeId::new(id)
                .ok()
                .is_some_and(|i| i.gateway_site() == Some(site))
        })
    });
    if let Some((_, c)) = accepted {
        let quic = c["quic"].as_array().is_some_and(|q| !q.is_empty());
        let h2 = c["reverse_h2_pools"].as_u64().unwrap_or(0) > 0;
        if quic || h2 {
            return LinkFact {
                up: true,
                transport: Some(if quic { "quic" } else { "h2" }.into()),
                why: format!("{site} dialed this gateway (it accepts no inbound connections)"),
            };
        }
    }
    let whys: Vec<String> = dialed
        .into_iter()
        .flatten()
        .map(|l| {
            format!(
                "{}: {}",
                l["address"].as_str().unwrap_or("?"),
                l["why"].as_str().unwrap_or("no connection")
            )
        })
        .collect();
    LinkFact {
        up: false,
        transport: None,
        why: if whys.is_empty() {
            "no address to dial and no connection from it".into()
        } else {
            whys.join("; ")
        },
    }
}
