//! DNS answer synthesis on untrusted queries: the fast path and the slow path must never
//! panic, and every reply must parse with hickory, carry the query's id, and fit the
//! transport's limit (512 bytes for UDP without EDNS).
#![no_main]
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use meshfed_catalog::ServiceName;
use meshfed_catalog::catalog::Protocol;
use meshfed_dns::slow::{self, Slow};
use meshfed_dns::wire::{self, Outcome};
use meshfed_dns::{ImportRecord, Table, ZoneConfig};

static TABLE: LazyLock<Table> = LazyLock::new(|| {
    let imports: Vec<ImportRecord> = (0..50)
        .map(|i| ImportRecord {
            service: ServiceName::parse(&format!("svc{i}.shop")).unwrap(),
            port: 8000 + i,
            protocol: if i % 2 == 0 {
                Protocol::Tcp
            } else {
                Protocol::Udp
            },
            port_name: (i % 3 == 0).then(|| "http".to_string()),
            address: if i % 5 == 0 {
                "fd00::1".parse().unwrap()
            } else {
                "127.0.0.2".parse().unwrap()
            },
        })
        .collect();
    Table::build(
        &ZoneConfig {
            extra_zones: vec!["mesh.internal".into()],
            ..Default::default()
        },
        &imports,
        &[],
        3,
    )
});

fuzz_target!(|data: &[u8]| {
    let mut out = vec![0u8; wire::MAX_MESSAGE];
    for udp in [true, false] {
        match wire::respond(&TABLE, data, &mut out, udp, true) {
            Outcome::Reply(n) => {
                let m = hickory_proto::op::Message::from_vec(&out[..n]).expect("our reply parses");
                assert_eq!(m.metadata.id, u16::from_be_bytes([data[0], data[1]]));
                let limit = if udp {
                    m.edns
                        .as_ref()
                        .map_or(512, |_| usize::from(wire::EDNS_PAYLOAD))
                } else {
                    wire::MAX_MESSAGE
                };
                assert!(n <= limit, "{n} > {limit}");
            }
            Outcome::Slow => {
                if let (Slow::Reply(b), _) = slow::respond(&TABLE, data, true) {
                    let m = hickory_proto::op::Message::from_vec(&b).expect("slow reply parses");
                    assert_eq!(m.metadata.id, u16::from_be_bytes([data[0], data[1]]));
                }
            }
            Outcome::Drop => {}
        }
    }
});
