//! What meshfed's DNS answers, as data: built from a site's imports whenever the catalog
//! changes, with every answer pre-encoded in DNS wire format so that answering a query
//! is a lookup and a copy. Pure: no sockets.
//!
//! Names (MCS DNS spec v1.0.0, and the same under every extra zone):
//! - `<svc>.<ns>.svc.<zone>` A/AAAA → the address this site's gateway listens on for the
//!   import;
//! - `_<port>._<proto>.<svc>.<ns>.svc.<zone>` SRV 0 0 <port> `<svc>.<ns>.svc.<zone>.`,
//!   where `<port>` is the port's name, or its number when it has none;
//! - `dns-version.<zone>` TXT `"1.0.0"`;
//! - the zone apex: SOA;
//! - PTR `<reversed address>.in-addr.arpa` (or `ip6.arpa`) → every service name on that
//!   address.
//!
//! Names between an apex and a record exist (empty non-terminals): NOERROR with no data.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use meshfed_catalog::ServiceName;
use meshfed_catalog::catalog::Protocol;

pub const MCS_ZONE: &str = "clusterset.local";
pub const DNS_VERSION: &str = "1.0.0";
pub const DEFAULT_TTL: u32 = 5;

pub const TYPE_A: u16 = 1;
pub const TYPE_NS: u16 = 2;
pub const TYPE_SOA: u16 = 6;
pub const TYPE_PTR: u16 = 12;
pub const TYPE_TXT: u16 = 16;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_SRV: u16 = 33;
pub const TYPE_OPT: u16 = 41;
pub const CLASS_IN: u16 = 1;

/// One imported (service, port) and where this site serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportRecord {
    pub service: ServiceName,
    pub port: u16,
    pub protocol: Protocol,
    pub port_name: Option<String>,
    pub address: IpAddr,
}

/// A name registered outside the MCS layout (ServiceEntry hosts, extra records).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRecord {
    /// Fully qualified, without the trailing dot.
    pub name: String,
    pub addresses: Vec<IpAddr>,
}

#[derive(Clone, Debug)]
pub struct ZoneConfig {
    pub ttl: u32,
    /// Zones answered besides `clusterset.local`, each with the same layout.
    pub extra_zones: Vec<String>,
    /// Zones for host records (e.g. `corp.example`): authoritative, NXDOMAIN inside.
    pub host_zones: Vec<String>,
}

impl Default for ZoneConfig {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            extra_zones: vec![],
            host_zones: vec![],
        }
    }
}

/// An answer ready to copy: resource records whose owner is the question name
/// (compression pointer to offset 12).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prebuilt {
    pub count: u16,
    pub bytes: Vec<u8>,
}

#[derive(Debug)]
pub struct Zone {
    /// Lowercase, no trailing dot.
    pub name: String,
    /// Answer NXDOMAIN/NODATA with this SOA for names inside. Reverse zones are not
    /// authoritative: names we do not know there are not ours.
    pub authoritative: bool,
    /// The SOA record's type..rdata (after its owner name).
    pub soa_tail: Vec<u8>,
}

#[derive(Debug, Default)]
struct Node {
    zone: usize,
    answers: Vec<(u16, Prebuilt)>,
}

/// The result of a lookup.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    Answer(&'a Prebuilt),
    /// The name exists, not with this type: NOERROR, empty, SOA of zone `.0`.
    NoData(usize),
    /// Inside authoritative zone `.0`, the name does not exist.
    NxDomain(usize),
    /// Not a name we answer for.
    NotOurs,
}

/// Everything the DNS server answers, for one catalog revision.
#[derive(Debug)]
pub struct Table {
    pub zones: Vec<Zone>,
    nodes: HashMap<Box<[u8]>, Node>,
    pub ttl: u32,
    pub serial: u32,
}

/// Encodes a dotted name in wire format (uncompressed, with the root label).
pub fn encode_name(name: &str, out: &mut Vec<u8>) {
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(label.len().min(63) as u8);
        out.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    out.push(0);
}

fn rr_tail(rtype: u16, ttl: u32, rdata: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    out.extend_from_slice(rdata);
}

fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::new();
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s.push_str("ip6.arpa");
            s
        }
    }
}

fn proto_label(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "_tcp",
        Protocol::Udp => "_udp",
    }
}

#[derive(Default)]
struct Records {
    a: BTreeSet<IpAddr>,
    srv: BTreeSet<(u16, String)>,
    txt: Vec<String>,
    ptr: BTreeSet<String>,
    soa: bool,
}

impl Table {
    /// Builds the table. `serial` goes into the SOA (the catalog revision).
    pub fn build(
        cfg: &ZoneConfig,
        imports: &[ImportRecord],
        hosts: &[HostRecord],
        serial: u32,
    ) -> Self {
        let ttl = cfg.ttl;
        let mut zones = Vec::new();
        let mut zone_names: Vec<(String, bool)> = vec![(MCS_ZONE.to_owned(), true)];
        for z in cfg.extra_zones.iter().chain(&cfg.host_zones) {
            let z = z.trim_end_matches('.').to_ascii_lowercase();
            if !z.is_empty() && !zone_names.iter().any(|(n, _)| n == &z) {
                zone_names.push((z, true));
            }
        }
        zone_names.push(("in-addr.arpa".into(), false));
        zone_names.push(("ip6.arpa".into(), false));
        // A host outside every zone answers for itself only: names around it are not
        // ours (forwarded, or REFUSED).
        for h in hosts {
            let name = h.name.trim_end_matches('.').to_ascii_lowercase();
            let covered = zone_names
                .iter()
                .any(|(z, _)| name == *z || name.ends_with(&format!(".{z}")));
            if !covered && !name.is_empty() {
                zone_names.push((name, false));
            }
        }
        for (name, authoritative) in zone_names {
            let mut rdata = Vec::new();
            encode_name(&format!("ns.{name}"), &mut rdata);
            encode_name(&format!("hostmaster.{name}"), &mut rdata);
            for v in [serial, 60, 10, 3600, ttl] {
                rdata.extend_from_slice(&v.to_be_bytes());
            }
            let mut soa_tail = Vec::new();
            rr_tail(TYPE_SOA, ttl, &rdata, &mut soa_tail);
            zones.push(Zone {
                name,
                authoritative,
                soa_tail,
            });
        }

        let mut recs: BTreeMap<String, Records> = BTreeMap::new();
        let mcs_zones: Vec<String> = std::iter::once(MCS_ZONE.to_owned())
            .chain(
                cfg.extra_zones
                    .iter()
                    .map(|z| z.trim_end_matches('.').to_ascii_lowercase()),
            )
            .collect();
        for zone in &mcs_zones {
            recs.entry(zone.clone()).or_default().soa = true;
            recs.entry(format!("dns-version.{zone}"))
                .or_default()
                .txt
                .push(DNS_VERSION.into());
            for im in imports {
                let host = format!(
                    "{}.{}.svc.{zone}",
                    im.service.name(),
                    im.service.namespace()
                )
                .to_ascii_lowercase();
                recs.entry(host.clone()).or_default().a.insert(im.address);
                let port_label = im
                    .port_name
                    .as_deref()
                    .map_or_else(|| im.port.to_string(), str::to_ascii_lowercase);
                let srv = format!("_{port_label}.{}.{host}", proto_label(im.protocol));
                recs.entry(srv)
                    .or_default()
                    .srv
                    .insert((im.port, host.clone()));
                if zone == MCS_ZONE {
                    recs.entry(reverse_name(im.address))
                        .or_default()
                        .ptr
                        .insert(host);
                }
            }
        }
        for z in &cfg.host_zones {
            recs.entry(z.trim_end_matches('.').to_ascii_lowercase())
                .or_default()
                .soa = true;
        }
        for h in hosts {
            let name = h.name.trim_end_matches('.').to_ascii_lowercase();
            let r = recs.entry(name.clone()).or_default();
            r.a.extend(h.addresses.iter().copied());
            for a in &h.addresses {
                recs.entry(reverse_name(*a))
                    .or_default()
                    .ptr
                    .insert(name.clone());
            }
        }

        let zone_of = |name: &str| -> Option<usize> {
            // Longest zone that contains `name`.
            zones
                .iter()
                .enumerate()
                .filter(|(_, z)| name == z.name || name.ends_with(&format!(".{}", z.name)))
                .max_by_key(|(_, z)| z.name.len())
                .map(|(i, _)| i)
        };
        let mut nodes: HashMap<Box<[u8]>, Node> = HashMap::new();
        for (name, r) in &recs {
            let Some(zi) = zone_of(name) else { continue };
            let mut answers: Vec<(u16, Prebuilt)> = Vec::new();
            let mut add = |t: u16, rdatas: Vec<Vec<u8>>| {
                if rdatas.is_empty() {
                    return;
                }
                let mut p = Prebuilt::default();
                for rd in rdatas {
                    p.bytes.extend_from_slice(&[0xC0, 0x0C]);
                    rr_tail(t, ttl, &rd, &mut p.bytes);
                    p.count += 1;
                }
                answers.push((t, p));
            };
            add(
                TYPE_A,
                r.a.iter()
                    .filter_map(|a| match a {
                        IpAddr::V4(v4) => Some(v4.octets().to_vec()),
                        IpAddr::V6(_) => None,
                    })
                    .collect(),
            );
            add(
                TYPE_AAAA,
                r.a.iter()
                    .filter_map(|a| match a {
                        IpAddr::V6(v6) => Some(v6.octets().to_vec()),
                        IpAddr::V4(_) => None,
                    })
                    .collect(),
            );
            add(
                TYPE_SRV,
                r.srv
                    .iter()
                    .map(|(port, target)| {
                        let mut rd = vec![0, 0, 0, 0];
                        rd.extend_from_slice(&port.to_be_bytes());
                        encode_name(target, &mut rd);
                        rd
                    })
                    .collect(),
            );
            add(
                TYPE_TXT,
                r.txt
                    .iter()
                    .map(|t| {
                        let b = &t.as_bytes()[..t.len().min(255)];
                        let mut rd = vec![b.len() as u8];
                        rd.extend_from_slice(b);
                        rd
                    })
                    .collect(),
            );
            add(
                TYPE_PTR,
                r.ptr
                    .iter()
                    .map(|n| {
                        let mut rd = Vec::new();
                        encode_name(n, &mut rd);
                        rd
                    })
                    .collect(),
            );
            if r.soa {
                let mut p = Prebuilt {
                    count: 1,
                    bytes: vec![0xC0, 0x0C],
                };
                p.bytes.extend_from_slice(&zones[zi].soa_tail);
                answers.push((TYPE_SOA, p));
            }
            nodes.insert(name.as_bytes().into(), Node { zone: zi, answers });
            // Empty non-terminals up to the apex.
            let apex = &zones[zi].name;
            let mut rest = name.as_str();
            while rest != apex {
                let Some((_, parent)) = rest.split_once('.') else {
                    break;
                };
                rest = parent;
                nodes.entry(rest.as_bytes().into()).or_insert(Node {
                    zone: zi,
                    answers: vec![],
                });
            }
        }
        Self {
            zones,
            nodes,
            ttl,
            serial,
        }
    }

    /// Looks up a lowercase dotted name (no trailing dot) and a query type.
    pub fn lookup(&self, name: &[u8], qtype: u16) -> Lookup<'_> {
        if let Some(node) = self.nodes.get(name) {
            return match node.answers.iter().find(|(t, _)| *t == qtype) {
                Some((_, p)) => Lookup::Answer(p),
                None => Lookup::NoData(node.zone),
            };
        }
        match self.zone_of(name) {
            Some(zi) if self.zones[zi].authoritative => Lookup::NxDomain(zi),
            _ => Lookup::NotOurs,
        }
    }

    /// Whether a name has any data of any type (for ANY and the slow path).
    pub fn zone_of(&self, name: &[u8]) -> Option<usize> {
        let mut best: Option<usize> = None;
        for (i, z) in self.zones.iter().enumerate() {
            let zn = z.name.as_bytes();
            let inside = name == zn
                || (name.len() > zn.len()
                    && name.ends_with(zn)
                    && name[name.len() - zn.len() - 1] == b'.');
            if inside && best.is_none_or(|b| self.zones[b].name.len() < zn.len()) {
                best = Some(i);
            }
        }
        best
    }

    /// Every name the table holds (tests, bench query files).
    pub fn names(&self) -> impl Iterator<Item = (&str, Vec<u16>)> {
        self.nodes.iter().map(|(k, n)| {
            (
                std::str::from_utf8(k).unwrap_or(""),
                n.answers.iter().map(|(t, _)| *t).collect(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn import(svc: &str, port: u16, name: Option<&str>, addr: &str) -> ImportRecord {
        ImportRecord {
            service: ServiceName::parse(svc).unwrap(),
            port,
            protocol: Protocol::Tcp,
            port_name: name.map(Into::into),
            address: addr.parse().unwrap(),
        }
    }

    fn table() -> Table {
        Table::build(
            &ZoneConfig {
                extra_zones: vec!["mesh.internal".into()],
                ..Default::default()
            },
            &[
                import("orders.shop", 8080, Some("http"), "127.0.0.2"),
                import("orders.shop", 9090, None, "127.0.0.2"),
                import("db.prod", 5432, Some("pg"), "fd00::7"),
            ],
            &[],
            42,
        )
    }

    #[test]
    fn mcs_names_answer_with_the_import_address() {
        let t = table();
        let Lookup::Answer(a) = t.lookup(b"orders.shop.svc.clusterset.local", TYPE_A) else {
            panic!()
        };
        assert_eq!(a.count, 1, "two ports, one address, one A");
        assert!(a.bytes.ends_with(&[0, 4, 127, 0, 0, 2]));
        let Lookup::Answer(aaaa) = t.lookup(b"db.prod.svc.clusterset.local", TYPE_AAAA) else {
            panic!()
        };
        assert_eq!(aaaa.count, 1);
        // The same under an extra zone.
        assert!(matches!(
            t.lookup(b"orders.shop.svc.mesh.internal", TYPE_A),
            Lookup::Answer(_)
        ));
    }

    #[test]
    fn srv_by_port_name_or_number() {
        let t = table();
        for name in [
            &b"_http._tcp.orders.shop.svc.clusterset.local"[..],
            b"_9090._tcp.orders.shop.svc.clusterset.local",
        ] {
            let Lookup::Answer(p) = t.lookup(name, TYPE_SRV) else {
                panic!("{}", String::from_utf8_lossy(name))
            };
            assert_eq!(p.count, 1);
        }
        assert!(matches!(
            t.lookup(b"_http._udp.orders.shop.svc.clusterset.local", TYPE_SRV),
            Lookup::NxDomain(0)
        ));
    }

    #[test]
    fn txt_version_ptr_and_soa() {
        let t = table();
        let Lookup::Answer(p) = t.lookup(b"dns-version.clusterset.local", TYPE_TXT) else {
            panic!()
        };
        assert!(p.bytes.ends_with(b"\x051.0.0"));
        let Lookup::Answer(p) = t.lookup(b"2.0.0.127.in-addr.arpa", TYPE_PTR) else {
            panic!()
        };
        assert_eq!(p.count, 1);
        assert!(matches!(
            t.lookup(b"clusterset.local", TYPE_SOA),
            Lookup::Answer(_)
        ));
    }

    #[test]
    fn negative_answers() {
        let t = table();
        // Known name, other type.
        assert_eq!(
            t.lookup(b"orders.shop.svc.clusterset.local", TYPE_TXT),
            Lookup::NoData(0)
        );
        // Empty non-terminals exist.
        assert_eq!(
            t.lookup(b"shop.svc.clusterset.local", TYPE_A),
            Lookup::NoData(0)
        );
        assert_eq!(t.lookup(b"svc.clusterset.local", TYPE_A), Lookup::NoData(0));
        // Unknown inside our zone.
        assert_eq!(
            t.lookup(b"nope.shop.svc.clusterset.local", TYPE_A),
            Lookup::NxDomain(0)
        );
        // Outside, and unknown reverse names, are not ours.
        assert_eq!(t.lookup(b"example.com", TYPE_A), Lookup::NotOurs);
        assert_eq!(t.lookup(b"xclusterset.local", TYPE_A), Lookup::NotOurs);
        assert_eq!(t.lookup(b"9.9.9.9.in-addr.arpa", TYPE_PTR), Lookup::NotOurs);
    }

    #[test]
    fn host_records_in_host_zones() {
        let t = Table::build(
            &ZoneConfig {
                host_zones: vec!["corp.example".into()],
                ..Default::default()
            },
            &[],
            &[HostRecord {
                name: "DB.corp.example.".into(),
                addresses: vec!["10.0.0.9".parse().unwrap()],
            }],
            1,
        );
        assert!(matches!(
            t.lookup(b"db.corp.example", TYPE_A),
            Lookup::Answer(_)
        ));
        assert!(matches!(
            t.lookup(b"web.corp.example", TYPE_A),
            Lookup::NxDomain(_)
        ));
    }

    #[test]
    fn hosts_outside_every_zone_answer_only_for_themselves() {
        let t = Table::build(
            &ZoneConfig::default(),
            &[],
            &[HostRecord {
                name: "mymongodb.somedomain".into(),
                addresses: vec!["127.0.0.2".parse().unwrap()],
            }],
            1,
        );
        assert!(matches!(
            t.lookup(b"mymongodb.somedomain", TYPE_A),
            Lookup::Answer(_)
        ));
        assert!(matches!(
            t.lookup(b"mymongodb.somedomain", TYPE_TXT),
            Lookup::NoData(_)
        ));
        assert_eq!(t.lookup(b"other.somedomain", TYPE_A), Lookup::NotOurs);
        assert_eq!(t.lookup(b"x.mymongodb.somedomain", TYPE_A), Lookup::NotOurs);
    }
}
