//! The fast path: a plain query (one question, class IN, at most an EDNS0 OPT record) is
//! answered straight from the [`Table`]'s pre-encoded records into a caller's buffer —
//! no parsing into objects, no allocation. Anything else goes to the slow path
//! (`slow.rs`, hickory), which also owns malformed packets. Pure.

use crate::zone::{CLASS_IN, Lookup, TYPE_OPT, Table};

/// What to do with a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `out[..n]` is the response.
    Reply(usize),
    /// Not a plain query for our names: the slow path decides.
    Slow,
    /// Never answered (a response, or shorter than a header).
    Drop,
}

/// Our EDNS UDP payload size (the DNS flag day 2020 value).
pub const EDNS_PAYLOAD: u16 = 1232;
/// Largest response we build (TCP).
pub const MAX_MESSAGE: usize = 65535;
pub const RCODE_NXDOMAIN: u8 = 3;

/// A parsed plain query.
pub struct Query<'a> {
    pub id: [u8; 2],
    pub rd: bool,
    /// The question section as received (name case preserved, 0x20-safe).
    pub question: &'a [u8],
    /// Wire length of the question name.
    pub name_len: usize,
    pub qtype: u16,
    /// Client's EDNS UDP payload size, if it sent OPT.
    pub edns: Option<u16>,
}

/// Parses a plain query; `None` for anything the fast path does not handle. `name`
/// receives the lowercase dotted name; its length is returned alongside.
pub fn parse<'a>(q: &'a [u8], name: &mut [u8; 256]) -> Result<(Query<'a>, usize), Outcome> {
    if q.len() < 12 || q[2] & 0x80 != 0 {
        return Err(Outcome::Drop);
    }
    let opcode = (q[2] >> 3) & 0x0f;
    let count = |i: usize| u16::from_be_bytes([q[i], q[i + 1]]);
    if opcode != 0 || count(4) != 1 || count(6) != 0 || count(8) != 0 || count(10) > 1 {
        return Err(Outcome::Slow);
    }
    // The question name: plain labels only.
    let mut i = 12;
    let mut n = 0;
    loop {
        let Some(&len) = q.get(i) else {
            return Err(Outcome::Slow);
        };
        let len = len as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 || i + len > q.len() || n + len + 1 > 255 {
            return Err(Outcome::Slow);
        }
        if n > 0 {
            name[n] = b'.';
            n += 1;
        }
        for &b in &q[i..i + len] {
            if b == b'.' {
                return Err(Outcome::Slow); // a dot inside a label is never one of ours
            }
            name[n] = b.to_ascii_lowercase();
            n += 1;
        }
        i += len;
    }
    let name_len = i - 12;
    if i + 4 > q.len() {
        return Err(Outcome::Slow);
    }
    let qtype = u16::from_be_bytes([q[i], q[i + 1]]);
    let qclass = u16::from_be_bytes([q[i + 2], q[i + 3]]);
    let qend = i + 4;
    if qclass != CLASS_IN {
        return Err(Outcome::Slow);
    }
    let mut edns = None;
    if count(10) == 1 {
        // Root name, type OPT, class = payload, ttl = ext rcode/version/flags, rdlen.
        let o = &q[qend..];
        if o.len() < 11 || o[0] != 0 || u16::from_be_bytes([o[1], o[2]]) != TYPE_OPT {
            return Err(Outcome::Slow);
        }
        if o[6] != 0 {
            return Err(Outcome::Slow); // EDNS version > 0: BADVERS on the slow path
        }
        let rdlen = u16::from_be_bytes([o[9], o[10]]) as usize;
        if o.len() != 11 + rdlen {
            return Err(Outcome::Slow);
        }
        edns = Some(u16::from_be_bytes([o[3], o[4]]).max(512));
    } else if qend != q.len() {
        return Err(Outcome::Slow);
    }
    Ok((
        Query {
            id: [q[0], q[1]],
            rd: q[2] & 0x01 != 0,
            question: &q[12..qend],
            name_len,
            qtype,
            edns,
        },
        n,
    ))
}

/// Answers `q` into `out` (at least 512 bytes) from `table`. `udp`: truncate to the
/// client's limit; `recursion`: set RA (forwarding is on).
pub fn respond(table: &Table, q: &[u8], out: &mut [u8], udp: bool, recursion: bool) -> Outcome {
    let mut name = [0u8; 256];
    let (query, n) = match parse(q, &mut name) {
        Ok(v) => v,
        Err(o) => return o,
    };
    let (rcode, answers, soa_zone) = match table.lookup(&name[..n], query.qtype) {
        Lookup::Answer(p) => (0u8, Some(p), None),
        Lookup::NoData(z) => (0, None, Some(z)),
        Lookup::NxDomain(z) => (RCODE_NXDOMAIN, None, Some(z)),
        Lookup::NotOurs => return Outcome::Slow,
    };
    let limit = if udp {
        query
            .edns
            .map_or(512, |p| p.min(EDNS_PAYLOAD) as usize)
            .min(out.len())
    } else {
        MAX_MESSAGE.min(out.len())
    };
    let opt_len = if query.edns.is_some() { 11 } else { 0 };
    let head = 12 + query.question.len();
    let (an, ns, body_len) = match (answers, soa_zone) {
        (Some(p), _) => (p.count, 0u16, p.bytes.len()),
        (None, Some(z)) => (0, 1, 2 + table.zones[z].soa_tail.len()),
        (None, None) => (0, 0, 0),
    };
    let truncated = head + body_len + opt_len > limit;
    if head + opt_len > out.len() {
        return Outcome::Slow;
    }
    // Header.
    out[0..2].copy_from_slice(&query.id);
    out[2] = 0x80 | 0x04 | u8::from(truncated) << 1 | u8::from(query.rd); // QR AA TC RD
    out[3] = u8::from(recursion) << 7 | rcode;
    out[4..6].copy_from_slice(&1u16.to_be_bytes());
    let (an, ns) = if truncated { (0, 0) } else { (an, ns) };
    out[6..8].copy_from_slice(&an.to_be_bytes());
    out[8..10].copy_from_slice(&ns.to_be_bytes());
    out[10..12].copy_from_slice(&u16::from(query.edns.is_some()).to_be_bytes());
    out[12..head].copy_from_slice(query.question);
    let mut at = head;
    if !truncated {
        match (answers, soa_zone) {
            (Some(p), _) => {
                out[at..at + p.bytes.len()].copy_from_slice(&p.bytes);
                at += p.bytes.len();
            }
            (None, Some(z)) => {
                // The SOA's owner is the zone apex: a pointer to where the question name
                // reaches it (the question is copied verbatim at offset 12).
                let zone = &table.zones[z];
                let zone_wire = if zone.name.is_empty() {
                    1
                } else {
                    zone.name.len() + 2
                };
                let off = 12 + query.name_len - zone_wire;
                out[at] = 0xC0 | (off >> 8) as u8;
                out[at + 1] = off as u8;
                at += 2;
                out[at..at + zone.soa_tail.len()].copy_from_slice(&zone.soa_tail);
                at += zone.soa_tail.len();
            }
            (None, None) => {}
        }
    }
    if query.edns.is_some() {
        out[at] = 0;
        out[at + 1..at + 3].copy_from_slice(&TYPE_OPT.to_be_bytes());
        out[at + 3..at + 5].copy_from_slice(&EDNS_PAYLOAD.to_be_bytes());
        out[at + 5..at + 11].fill(0); // ext rcode, version 0, no DO, rdlen 0
        at += 11;
    }
    Outcome::Reply(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zone::{ImportRecord, TYPE_A, TYPE_SRV, TYPE_TXT, ZoneConfig};
    use hickory_proto::op::{Message, ResponseCode};
    use hickory_proto::rr::{Name, RData, RecordType};
    use meshfed_catalog::ServiceName;
    use meshfed_catalog::catalog::Protocol;

    fn table(n: usize) -> Table {
        let imports: Vec<ImportRecord> = (0..n)
            .map(|i| ImportRecord {
                service: ServiceName::parse(&format!("svc{i}.shop")).unwrap(),
                port: 8080,
                protocol: Protocol::Tcp,
                port_name: Some("http".into()),
                address: "127.0.0.2".parse().unwrap(),
            })
            .collect();
        Table::build(&ZoneConfig::default(), &imports, &[], 7)
    }

    fn query(name: &str, t: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0x1234;
        m.metadata.recursion_desired = true;
        m.add_query(hickory_proto::op::Query::query(
            Name::from_ascii(name).unwrap(),
            t,
        ));
        if edns {
            let mut e = hickory_proto::op::Edns::new();
            e.set_max_payload(4096);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn ask(t: &Table, q: &[u8], udp: bool) -> Message {
        let mut out = vec![0u8; MAX_MESSAGE];
        match respond(t, q, &mut out, udp, false) {
            Outcome::Reply(n) => Message::from_vec(&out[..n]).expect("hickory parses our answer"),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn answers_parse_with_hickory_and_keep_the_question_case() {
        let t = table(3);
        let m = ask(
            &t,
            &query("SVC1.Shop.svc.clusterset.local.", RecordType::A, true),
            true,
        );
        assert_eq!(m.metadata.id, 0x1234);
        assert!(m.metadata.authoritative && m.metadata.recursion_desired);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(
            m.queries[0].name().to_ascii(),
            "SVC1.Shop.svc.clusterset.local."
        );
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.answers[0].ttl, 5);
        assert!(
            matches!(m.answers[0].data, RData::A(a) if a.0 == std::net::Ipv4Addr::new(127, 0, 0, 2))
        );
        assert!(m.edns.is_some());
        let m = ask(
            &t,
            &query(
                "_http._tcp.svc0.shop.svc.clusterset.local.",
                RecordType::SRV,
                false,
            ),
            true,
        );
        match &m.answers[0].data {
            RData::SRV(s) => {
                assert_eq!(s.port, 8080);
                assert_eq!(s.target.to_ascii(), "svc0.shop.svc.clusterset.local.");
            }
            other => panic!("{other:?}"),
        }
        let m = ask(
            &t,
            &query("dns-version.clusterset.local.", RecordType::TXT, false),
            true,
        );
        assert_eq!(m.answers[0].data.to_string(), "1.0.0");
        let _ = (TYPE_A, TYPE_SRV, TYPE_TXT);
    }

    #[test]
    fn negative_answers_carry_the_zone_soa() {
        let t = table(1);
        let m = ask(
            &t,
            &query("nope.shop.svc.clusterset.local.", RecordType::A, false),
            true,
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(m.answers.is_empty());
        assert_eq!(m.authorities.len(), 1);
        assert_eq!(m.authorities[0].name.to_ascii(), "clusterset.local.");
        assert!(matches!(&m.authorities[0].data, RData::SOA(s) if s.serial == 7));
        let m = ask(
            &t,
            &query("svc0.shop.svc.clusterset.local.", RecordType::TXT, true),
            true,
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty() && m.authorities.len() == 1);
    }

    #[test]
    fn too_large_for_udp_sets_tc() {
        // 200 PTRs on one address do not fit in 512 bytes.
        let t = table(200);
        let q = query("2.0.0.127.in-addr.arpa.", RecordType::PTR, false);
        let m = ask(&t, &q, true);
        assert!(m.metadata.truncation && m.answers.is_empty());
        let m = ask(&t, &q, false);
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 200);
    }

    #[test]
    fn the_rest_goes_to_the_slow_path_or_is_dropped() {
        let t = table(1);
        let mut out = [0u8; 512];
        assert_eq!(respond(&t, &[0; 5], &mut out, true, false), Outcome::Drop);
        let mut resp = query("svc0.shop.svc.clusterset.local.", RecordType::A, false);
        resp[2] |= 0x80;
        assert_eq!(respond(&t, &resp, &mut out, true, false), Outcome::Drop);
        let q = query("example.com.", RecordType::A, false);
        assert_eq!(respond(&t, &q, &mut out, true, false), Outcome::Slow);
        let mut trailing = query("svc0.shop.svc.clusterset.local.", RecordType::A, false);
        trailing.push(0);
        assert_eq!(respond(&t, &trailing, &mut out, true, false), Outcome::Slow);
    }
}
