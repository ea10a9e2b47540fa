//! `meshfed gateway check`: what would stop this config from serving, found before it
//! runs. The address check is pure ([`collisions`]); the identity checks read the files
//! the config names.
//!
//! Checks, in order: the SVID loads and its key matches it; it is this site's gateway
//! ID; the trust bundles load and include our own trust domain; the SVID is valid now and
//! chains to our bundle (and does not expire within the reload interval); no two
//! listeners (QUIC, admin, DNS, imports) want the same address and protocol.

use std::net::SocketAddr;

use meshfed_catalog::catalog::Protocol;
use meshfed_identity::{SpiffeId, Svid};

use crate::config::GatewayConfig;
use crate::reload;

/// One check's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub what: &'static str,
    pub result: Result<String, String>,
}

/// Runs every check; all are run even after a failure, so one pass lists every problem.
pub fn run(cfg: &GatewayConfig) -> Vec<Check> {
    let mut out = Vec::new();
    let mut push = |what, result| out.push(Check { what, result });
    let svid = Svid::load(&cfg.cert, &cfg.key).map_err(|e| e.to_string());
    push(
        "svid",
        svid.as_ref().map_err(Clone::clone).and_then(|s| {
            meshfed_identity::tls::SvidResolver::new(s).map_err(|e| {
                format!(
                    "key {} does not match certificate {}: {e}",
                    cfg.key.display(),
                    cfg.cert.display()
                )
            })?;
            Ok(format!("{} ({})", s.id, cfg.cert.display()))
        }),
    );
    let expected = SpiffeId::gateway(&cfg.trust_domain, cfg.site.as_str());
    push(
        "identity",
        match (&svid, &expected) {
            (Ok(s), Ok(want)) if s.id == *want => {
                Ok(format!("{want} is site {}'s gateway", cfg.site))
            }
            (Ok(s), Ok(want)) => Err(format!(
                "{}: SPIFFE ID {} is not this site's gateway ID {want}",
                cfg.cert.display(),
                s.id
            )),
            (Err(_), _) => Err("no SVID to check".into()),
            (_, Err(e)) => Err(format!("site {}: {e}", cfg.site)),
        },
    );
    if let Some(r) = &cfg.renew {
        push(
            "renew",
            match meshfed_identity::Ca::load(&r.ca) {
                Err(e) => Err(format!("tls.renew.ca: {e}")),
                Ok(ca) if ca.trust_domain() != &cfg.trust_domain => Err(format!(
                    "tls.renew.ca {}: trust domain {} is not this site's {}",
                    r.ca.display(),
                    ca.trust_domain(),
                    cfg.trust_domain
                )),
                Ok(ca) => Ok(format!(
                    "{} signs SVIDs of {:?}{}",
                    r.ca.display(),
                    r.ttl,
                    if ca.is_intermediate() {
                        ""
                    } else {
                        " (a root: keep the root offline and give an intermediate)"
                    }
                )),
            },
        );
    }
    let files = reload::bundle_files(&cfg.bundles, &cfg.bundle_dirs());
    let bundles = reload::load_bundles(&files, &cfg.trust_domain);
    push(
        "bundles",
        bundles.as_ref().map_err(ToString::to_string).map(|b| {
            let tds: Vec<String> = b.trust_domains().map(|t| t.to_string()).collect();
            format!("{} file(s): {}", files.len(), tds.join(", "))
        }),
    );
    push(
        "validity",
        match (&svid, &bundles) {
            (Ok(s), Ok(b)) => reload::check_svid(s, b, rustls::pki_types::UnixTime::now())
                .map_err(|e| format!("{}: [{}] {e}", cfg.cert.display(), e.code()))
                .and_then(|()| {
                    let not_after = s.not_after_unix().unwrap_or_default();
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs() as i64);
                    match meshfed_lifecycle::admin::svid_not_ready(
                        not_after,
                        cfg.reload_interval,
                        now,
                    ) {
                        Some(why) => Err(format!("{}: {why}", cfg.cert.display())),
                        None => Ok(format!("valid for {}s more", not_after - now)),
                    }
                }),
            _ => Err("needs the SVID and the bundles".into()),
        },
    );
    let bound = listeners(cfg);
    let clashes = collisions(&bound);
    push(
        "addresses",
        if clashes.is_empty() {
            Ok(format!("{} listener(s), no collision", bound.len()))
        } else {
            Err(clashes.join("; "))
        },
    );
    out
}

/// What binds an address, with which protocol.
pub type Listener = (String, Protocol, SocketAddr);

/// Every address the config binds, with what binds it and the protocol.
pub fn listeners(cfg: &GatewayConfig) -> Vec<Listener> {
    let mut out = vec![
        ("listen (QUIC)".to_owned(), Protocol::Udp, cfg.listen),
        ("admin".to_owned(), Protocol::Tcp, cfg.admin),
    ];
    if let Some(d) = &cfg.dns {
        out.push(("dns.listen".into(), Protocol::Udp, d.listen));
        out.push(("dns.listen".into(), Protocol::Tcp, d.listen));
    }
    for (i, im) in cfg.imports.iter().enumerate() {
        out.push((
            format!("imports[{i}] ({}:{})", im.service, im.port),
            im.protocol,
            im.listen,
        ));
    }
    out
}

/// Pairs of listeners that cannot both bind: same protocol and port (not 0), and the same
/// IP or either one the wildcard of its family. Pure.
pub fn collisions(addrs: &[Listener]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, (wa, pa, a)) in addrs.iter().enumerate() {
        for (wb, pb, b) in &addrs[i + 1..] {
            let same_ip = a.ip() == b.ip()
                || (a.is_ipv4() == b.is_ipv4()
                    && (a.ip().is_unspecified() || b.ip().is_unspecified()));
            if pa == pb && a.port() != 0 && a.port() == b.port() && same_ip {
                let proto = match pa {
                    Protocol::Tcp => "tcp",
                    Protocol::Udp => "udp",
                };
                out.push(format!(
                    "{wa} {a} and {wb} {b} both bind {proto} port {}",
                    a.port()
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(what: &str, p: Protocol, a: &str) -> Listener {
        (what.into(), p, a.parse().unwrap())
    }

    #[test]
    fn collisions_by_protocol_port_and_address() {
        use Protocol::{Tcp, Udp};
        let rows: &[(&[Listener], usize)] = &[
            (
                &[l("a", Tcp, "127.0.0.1:80"), l("b", Tcp, "127.0.0.1:80")],
                1,
            ),
            // TCP and UDP on one port: two sockets, no clash (DNS does it).
            (
                &[l("a", Tcp, "127.0.0.1:53"), l("b", Udp, "127.0.0.1:53")],
                0,
            ),
            (
                &[l("a", Tcp, "127.0.0.1:80"), l("b", Tcp, "127.0.0.2:80")],
                0,
            ),
            // The wildcard takes the port on every address of its family.
            (
                &[l("a", Udp, "0.0.0.0:443"), l("b", Udp, "127.0.0.1:443")],
                1,
            ),
            (&[l("a", Tcp, "[::]:80"), l("b", Tcp, "127.0.0.1:80")], 0),
            // Port 0 is any free port.
            (&[l("a", Tcp, "127.0.0.1:0"), l("b", Tcp, "127.0.0.1:0")], 0),
            (
                &[
                    l("a", Tcp, "127.0.0.1:1"),
                    l("b", Tcp, "127.0.0.1:1"),
                    l("c", Tcp, "0.0.0.0:1"),
                ],
                3,
            ),
        ];
        for (i, (addrs, want)) in rows.iter().enumerate() {
            let got = collisions(addrs);
            assert_eq!(got.len(), *want, "row {i}: {got:?}");
        }
        let msg = &collisions(&[
            l("admin", Tcp, "127.0.0.1:15000"),
            l("imports[0] (a.b:15000)", Tcp, "127.0.0.1:15000"),
        ])[0];
        assert!(
            msg.contains("admin") && msg.contains("imports[0]") && msg.contains("15000"),
            "{msg}"
        );
    }
}
