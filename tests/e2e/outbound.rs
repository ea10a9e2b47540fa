//! An outbound-only site for real: west's gateway runs in a network namespace whose
//! nftables firewall drops every new inbound connection (only replies to what it dialed
//! get in), joined to the host by a veth pair. The federation and east run on the
//! host side. West publishes no address; east reaches west's export over the QUIC
//! connection west dialed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::federation::{Fed, On, fed_config, joined};
use crate::harness::{Gw, Scratch};
use crate::netns::Netns;

/// Every new inbound connection is dropped inside; replies to what it dialed get in.
const OUTBOUND_ONLY: &str = "table inet outbound_only {\n  chain input {\n    type filter hook input priority 0; policy drop;\n    iif \"lo\" accept\n    ct state established,related accept\n  }\n}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_that_can_only_dial_out_still_serves_its_exports() {
    outbound_only(None, 0).await;
}

/// The same with both sites on the h2 transport: west dials a reverse h2 connection on
/// which east opens its streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_that_can_only_dial_out_serves_its_exports_over_h2() {
    outbound_only(Some("default: h2"), 1).await;
}

async fn outbound_only(transport: Option<&str>, variant: u32) {
    let ns = Netns::new("mfo", 1, variant);
    ns.nft(OUTBOUND_ONLY);
    let (host, inner) = (ns.host.clone(), ns.inner.clone());
    let host_ip: std::net::IpAddr = host.parse().unwrap();

    let scratch = Scratch::new("outbound-only");
    let fed = Fed::start_listening(
        &Fed::init(&scratch),
        0,
        "2s",
        On::Embedded,
        &format!("{host}:0"),
    );
    let [east, west] = joined(&scratch, &fed, ["east", "west"]);
    // West's endpoint is on the host side: west reaches it by dialing out.
    let echo = crate::harness::echo_server_at(host_ip).await;
    let port = crate::harness::listen().local_addr().unwrap().port();
    let inner_any: SocketAddr = format!("{inner}:0").parse().unwrap();
    let west_gw = Gw::start_in(
        &ns.wrapper(),
        &west,
        &meshfed_lab::ConfigBuilder {
            listen: Some(inner_any),
            admin: Some(inner_any),
            outbound_only: true,
            transport: transport.map(str::to_owned),
            ..fed_config(&west, [127, 0, 0, 1])
        }
        .export("orders.shop", port, vec![echo]),
    )
    .unwrap();
    let east_gw = Gw::start(
        &east,
        &meshfed_lab::ConfigBuilder {
            listen: Some(SocketAddr::new(host_ip, 0)),
            transport: transport.map(str::to_owned),
            ..fed_config(&east, [127, 0, 0, 12])
        },
    )
    .unwrap();

    // The firewall is real: nothing on the host side can open a connection to west.
    let blocked = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(west_gw.admin),
    )
    .await;
    assert!(
        !matches!(blocked, Ok(Ok(_))),
        "west's admin port took a new inbound connection"
    );

    // East's calls reach west's export over the connection west dialed.
    let addr = SocketAddr::from(([127, 0, 0, 12], port));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ok = 0;
    while ok < 20 {
        match crate::harness::echo_once(addr).await {
            Ok(()) => ok += 1,
            Err(e) => assert!(
                Instant::now() < deadline,
                "no call reached the outbound-only site: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if transport.is_some() {
        // Over the reverse h2 connection west dialed, not QUIC.
        assert!(
            west_gw.logs().contains("reverse h2 connection up"),
            "{}",
            west_gw.logs()
        );
        assert!(
            east_gw
                .logs()
                .contains("reverse h2 connection from an outbound-only peer")
        );
    }
    drop(east_gw);
    drop(west_gw);
}
