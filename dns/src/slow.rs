//! The slow path, on hickory's parser: everything the fast path passed on. Malformed
//! packets get FORMERR (or nothing, when not even a header is there), other opcodes
//! NOTIMP, several questions FORMERR, EDNS versions above 0 BADVERS, ANY NOTIMP, other
//! classes REFUSED; names outside our zones are forwarded when forwarding is on, and
//! REFUSED otherwise. Pure.

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, RecordType};

use crate::zone::Table;

#[derive(Debug, PartialEq, Eq)]
pub enum Slow {
    Reply(Vec<u8>),
    /// Send the query as it is to the upstream resolver.
    Forward,
    Drop,
}

/// Why a packet took the slow path's answer (metric label).
pub fn reason(r: ResponseCode) -> &'static str {
    match r {
        ResponseCode::FormErr => "formerr",
        ResponseCode::NotImp => "notimp",
        ResponseCode::Refused => "refused",
        ResponseCode::BADVERS => "badvers",
        _ => "other",
    }
}

fn error(id: u16, op: OpCode, rcode: ResponseCode, req: Option<&Message>) -> Slow {
    let mut m = Message::error_msg(id, op, rcode);
    if let Some(req) = req {
        m.add_queries(req.queries.iter().cloned());
        m.metadata.recursion_desired = req.metadata.recursion_desired;
        if req.edns.is_some() {
            let mut e = Edns::new();
            e.set_max_payload(crate::wire::EDNS_PAYLOAD);
            m.set_edns(e);
        }
    }
    m.to_vec().map_or(Slow::Drop, Slow::Reply)
}

/// SERVFAIL to a query (its question echoed), e.g. when the upstream did not answer;
/// `None` for what is not a query.
pub fn servfail(q: &[u8]) -> Option<Vec<u8>> {
    if q.len() < 12 || q[2] & 0x80 != 0 {
        return None;
    }
    let id = u16::from_be_bytes([q[0], q[1]]);
    let op = OpCode::from_u8((q[2] >> 3) & 0x0f);
    match error(
        id,
        op,
        ResponseCode::ServFail,
        Message::from_vec(q).ok().as_ref(),
    ) {
        Slow::Reply(b) => Some(b),
        _ => None,
    }
}

/// Decides what to do with a packet the fast path did not answer.
pub fn respond(table: &Table, q: &[u8], forwarding: bool) -> (Slow, Option<ResponseCode>) {
    if q.len() < 12 || q[2] & 0x80 != 0 {
        return (Slow::Drop, None);
    }
    let id = u16::from_be_bytes([q[0], q[1]]);
    let op = OpCode::from_u8((q[2] >> 3) & 0x0f);
    let req = match Message::from_vec(q) {
        Ok(m) => m,
        Err(_) => {
            let r = ResponseCode::FormErr;
            return (error(id, op, r, None), Some(r));
        }
    };
    let fail = |r: ResponseCode| (error(id, op, r, Some(&req)), Some(r));
    if req.metadata.message_type != MessageType::Query {
        return (Slow::Drop, None);
    }
    if req.metadata.op_code != OpCode::Query {
        return fail(ResponseCode::NotImp);
    }
    if req.queries.len() != 1 {
        return fail(ResponseCode::FormErr);
    }
    if req.edns.as_ref().is_some_and(|e| e.version() > 0) {
        return fail(ResponseCode::BADVERS);
    }
    let query = &req.queries[0];
    let name = query.name().to_lowercase().to_ascii();
    let name = name.trim_end_matches('.').as_bytes();
    let ours = table
        .zone_of(name)
        .is_some_and(|z| table.zones[z].authoritative)
        || !matches!(
            table.lookup(name, u16::from(query.query_type())),
            crate::zone::Lookup::NotOurs
        );
    if !ours {
        return if forwarding && query.query_class() == DNSClass::IN {
            (Slow::Forward, None)
        } else {
            fail(ResponseCode::Refused)
        };
    }
    if query.query_class() != DNSClass::IN {
        return fail(ResponseCode::Refused);
    }
    if query.query_type() == RecordType::ANY {
        return fail(ResponseCode::NotImp);
    }
    // Ours and plain, but with extra records the fast path does not take (TSIG, a
    // second OPT, ...): refuse rather than guess.
    fail(ResponseCode::Refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zone::ZoneConfig;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    fn table() -> Table {
        Table::build(&ZoneConfig::default(), &[], &[], 1)
    }

    fn msg(name: &str, t: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.id = 9;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m
    }

    fn rcode(s: &Slow) -> ResponseCode {
        match s {
            Slow::Reply(b) => Message::from_vec(b).unwrap().metadata.response_code,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn edge_cases_get_typed_answers() {
        let t = table();
        // Garbage with a header: FORMERR with the same id.
        let (s, _) = respond(&t, &[0, 9, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xff], false);
        assert_eq!(rcode(&s), ResponseCode::FormErr);
        // Other opcode.
        let mut m = msg("a.clusterset.local.", RecordType::A);
        m.metadata.op_code = OpCode::Status;
        assert_eq!(
            rcode(&respond(&t, &m.to_vec().unwrap(), false).0),
            ResponseCode::NotImp
        );
        // Two questions.
        let mut m = msg("a.clusterset.local.", RecordType::A);
        m.add_query(Query::query(
            Name::from_ascii("b.clusterset.local.").unwrap(),
            RecordType::A,
        ));
        assert_eq!(
            rcode(&respond(&t, &m.to_vec().unwrap(), false).0),
            ResponseCode::FormErr
        );
        // EDNS version 1.
        let mut m = msg("a.clusterset.local.", RecordType::A);
        let mut e = Edns::new();
        e.set_version(1);
        m.set_edns(e);
        // BADVERS and BADSIG share code 16; hickory decodes it as BADSIG.
        assert!(matches!(
            rcode(&respond(&t, &m.to_vec().unwrap(), false).0),
            ResponseCode::BADVERS | ResponseCode::BADSIG
        ));
        // ANY for our names.
        let m = msg("clusterset.local.", RecordType::ANY);
        assert_eq!(
            rcode(&respond(&t, &m.to_vec().unwrap(), false).0),
            ResponseCode::NotImp
        );
    }

    #[test]
    fn other_names_are_forwarded_only_when_forwarding_is_on() {
        let t = table();
        let q = msg("example.com.", RecordType::A).to_vec().unwrap();
        assert_eq!(respond(&t, &q, true).0, Slow::Forward);
        assert_eq!(rcode(&respond(&t, &q, false).0), ResponseCode::Refused);
        // Responses and runts are never answered.
        let mut r = q.clone();
        r[2] |= 0x80;
        assert_eq!(respond(&t, &r, true).0, Slow::Drop);
        assert_eq!(respond(&t, &q[..5], true).0, Slow::Drop);
    }
}
