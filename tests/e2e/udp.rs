//! UDP across sites: real UDP clients and a real UDP echo server, two gateways, QUIC
//! datagrams between them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshfed_lab::ConfigBuilder;
use tokio::net::UdpSocket;

use crate::harness::*;

/// A loopback UDP socket with 4 MiB buffers, so bursts are not lost to the kernel's
/// default 208 KiB.
fn bind() -> UdpSocket {
    meshfed_gateway::udp::bind_udp(([127, 0, 0, 1], 0).into()).unwrap()
}

/// The kernel's count of UDP datagrams dropped for a full receive buffer (all sockets).
fn rcvbuf_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// A UDP echo server on loopback until aborted.
pub async fn udp_echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let s = bind();
    let addr = s.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    (addr, task)
}

/// West exports `west_cfg`'s services; east imports each `(service, port)` over UDP.
fn sites(name: &str, west_cfg: ConfigBuilder, imports: &[(&str, u16)], idle: Duration) -> TwoSites {
    let west_cfg = ConfigBuilder {
        udp_idle_timeout: Some(idle),
        ..west_cfg
    };
    TwoSites::start_pair(name, west_cfg, |mut ec| {
        ec.udp_idle_timeout = Some(idle);
        for (svc, port) in imports {
            ec = ec.import_udp(svc, *port, "west", ([127, 0, 0, 1], 0).into());
        }
        ec
    })
}

/// Payload `seq` of client `c`: its sequence number, the client, and a pattern, 16 to
/// about 1 KiB long.
fn payload(c: u8, seq: u32) -> Vec<u8> {
    let len = 16 + (seq as usize * 37) % 1000;
    let mut p = Vec::with_capacity(len);
    p.extend_from_slice(&seq.to_be_bytes());
    p.push(c);
    p.extend((5..len).map(|i| (i as u32 ^ seq).wrapping_mul(2_654_435_761) as u8));
    p
}

/// Sends `n` datagrams in bursts of `burst` and collects the echoes of each burst
/// (500 ms at most). Returns how many came back intact; a corrupted echo fails.
async fn echo_run(target: SocketAddr, c: u8, n: u32, burst: u32) -> u32 {
    let s = bind();
    s.connect(target).await.unwrap();
    let mut got = 0;
    let mut buf = vec![0u8; 65536];
    let mut seq = 0;
    while seq < n {
        let end = (seq + burst).min(n);
        for i in seq..end {
            s.send(&payload(c, i)).await.unwrap();
        }
        let mut want: std::collections::BTreeSet<u32> = (seq..end).collect();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while !want.is_empty() {
            let Ok(r) = tokio::time::timeout_at(deadline, s.recv(&mut buf)).await else {
                break;
            };
            let len = r.unwrap();
            let i = u32::from_be_bytes(buf[..4].try_into().unwrap());
            assert_eq!(
                &buf[..len],
                payload(c, i).as_slice(),
                "echo {i} of client {c} corrupted"
            );
            if want.remove(&i) {
                got += 1;
            }
        }
        seq = end;
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_echo_of_ten_thousand_datagrams_with_loss_accounted() {
    let (echo, _task) = udp_echo().await;
    let s = sites(
        "udp-echo",
        ConfigBuilder::default().export_udp("echo.demo", 7000, vec![echo]),
        &[("echo.demo", 7000)],
        Duration::from_secs(60),
    );
    let import = s.east_gw.import("echo.demo:7000/udp");
    let kernel_drops = rcvbuf_errors();
    // Two clients at once: two flows, each with its own client address.
    let (a, b) = tokio::join!(
        echo_run(import, 1, 5000, 100),
        echo_run(import, 2, 5000, 100)
    );
    let sent = 10_000;
    let echoed = a + b;
    let kernel_drops = rcvbuf_errors() - kernel_drops;
    let m = |g: &Gw, what: &'static str| {
        let g = g.admin;
        async move {
            let text = http_get(g, "/metrics").await.unwrap_or_default();
            text.lines()
                .filter(|l| l.starts_with(what))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
                + 0.0
        }
    };
    let to_tunnel = m(
        &s.east_gw,
        "meshfed_gateway_udp_datagrams_total{direction=\"egress\",flow=\"to_tunnel\"}",
    )
    .await;
    let east_drops = m(
        &s.east_gw,
        "meshfed_gateway_udp_drops_total{direction=\"egress\"",
    )
    .await;
    let at_endpoint = m(
        &s.west_gw,
        "meshfed_gateway_udp_datagrams_total{direction=\"ingress\",flow=\"from_tunnel\"}",
    )
    .await;
    let west_drops = m(
        &s.west_gw,
        "meshfed_gateway_udp_drops_total{direction=\"ingress\"",
    )
    .await;
    let back = m(
        &s.east_gw,
        "meshfed_gateway_udp_datagrams_total{direction=\"egress\",flow=\"from_tunnel\"}",
    )
    .await;
    eprintln!(
        "UDP echo: {sent} sent, {echoed} echoed, {} lost; east egress: {to_tunnel} into the tunnel, {east_drops} dropped; \
         west ingress: {at_endpoint} to the endpoint, {west_drops} dropped; east: {back} responses back; \
         the kernel dropped {kernel_drops} UDP datagrams for full receive buffers meanwhile (all sockets on this machine)",
        sent - echoed
    );
    // Loopback loses nothing in practice; allow 1 % for a very busy machine.
    assert!(
        echoed * 100 >= sent * 99,
        "lost {} of {sent}",
        sent - echoed
    );
    // Every datagram that reached the egress is accounted for: carried or a counted drop.
    assert_eq!(to_tunnel + east_drops, f64::from(sent), "egress accounting");
    assert!(back >= f64::from(echoed));
    assert_eq!(
        m(
            &s.east_gw,
            "meshfed_gateway_udp_flows_total{direction=\"egress\"}"
        )
        .await,
        2.0
    );
    assert_eq!(
        m(
            &s.west_gw,
            "meshfed_gateway_udp_flows_total{direction=\"ingress\"}"
        )
        .await,
        2.0
    );
}

async fn one(s: &UdpSocket, msg: &[u8], wait: Duration) -> Option<Vec<u8>> {
    s.send(msg).await.unwrap();
    let mut buf = vec![0u8; 65536];
    match tokio::time::timeout(wait, s.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_is_a_counted_drop_idle_flows_close_and_refusals_are_typed() {
    let (echo, _task) = udp_echo().await;
    let s = sites(
        "udp-limits",
        ConfigBuilder::default().export_udp("echo.demo", 7000, vec![echo]),
        &[("echo.demo", 7000), ("nope.demo", 7000)],
        Duration::from_millis(400),
    );
    let c = bind();
    c.connect(s.east_gw.import("echo.demo:7000/udp"))
        .await
        .unwrap();

    // Larger than one QUIC datagram: dropped at the egress and counted, never truncated.
    assert_eq!(
        one(&c, &vec![7u8; 3000], Duration::from_millis(300)).await,
        None
    );
    let oversize = s
        .east_gw
        .wait_metric(
            "meshfed_gateway_udp_drops_total{direction=\"egress\",reason=\"oversize\"}",
            1.0,
            Duration::from_secs(2),
        )
        .await;
    assert_eq!(oversize, 1.0);
    // The flow itself is fine: a datagram that fits goes through.
    assert_eq!(
        one(&c, b"fits", Duration::from_secs(2)).await.as_deref(),
        Some(&b"fits"[..])
    );
    let active = "meshfed_gateway_udp_active_flows{direction=\"egress\"}";
    assert_eq!(s.east_gw.metric(active).await, 1.0);

    // Idle for longer than the timeout: closed on both sides.
    let started = Instant::now();
    loop {
        let e = s.east_gw.metric(active).await;
        let w = s
            .west_gw
            .metric("meshfed_gateway_udp_active_flows{direction=\"ingress\"}")
            .await;
        if e == 0.0 && w == 0.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "flows still open: east {e}, west {w}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "idle flow closed on both sides after {:?}",
        started.elapsed()
    );
    // The client's next datagram opens a new flow.
    assert_eq!(
        one(&c, b"again", Duration::from_secs(2)).await.as_deref(),
        Some(&b"again"[..])
    );
    assert_eq!(
        s.east_gw
            .metric("meshfed_gateway_udp_flows_total{direction=\"egress\"}")
            .await,
        2.0
    );

    // West does not export nope.demo: the flow is refused with the typed reason, and
    // the client's next datagrams are dropped as refused instead of re-asking each time.
    let n = bind();
    n.connect(s.east_gw.import("nope.demo:7000/udp"))
        .await
        .unwrap();
    assert_eq!(one(&n, b"x", Duration::from_millis(300)).await, None);
    let refused = s
        .east_gw
        .wait_metric(
            "meshfed_gateway_refusals_total{direction=\"egress\",reason=\"unknown_service\"}",
            1.0,
            Duration::from_secs(2),
        )
        .await;
    assert_eq!(refused, 1.0);
    assert_eq!(one(&n, b"y", Duration::from_millis(100)).await, None);
    assert!(
        s.east_gw
            .metric("meshfed_gateway_udp_drops_total{direction=\"egress\",reason=\"refused\"}")
            .await
            >= 1.0
    );
    assert!(
        s.west_gw.logs().contains("does not export udp port 7000")
            || s.west_gw.logs().contains("nope.demo is not exported"),
        "{}",
        s.west_gw.logs()
    );
    assert!(
        s.east_gw.logs().contains("UDP flow refused"),
        "{}",
        s.east_gw.logs()
    );
}
