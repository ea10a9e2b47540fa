//! The h2 transport (HTTP/2 CONNECT over mTLS on TCP, the HBONE shape) between real
//! gateway processes: bulk data, the same typed refusals as QUIC, garbage at its port,
//! and `transport: auto` moving to h2 under a real UDP block (nftables in a network
//! namespace) and back to QUIC when the block lifts, without a client error.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use meshfed_lab::ConfigBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

/// Sends `total` pseudo-random bytes through `addr` (an echo path) and checks every
/// byte that comes back.
async fn echo_bulk(addr: SocketAddr, total: usize) {
    let c = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = c.into_split();
    let writer = tokio::spawn(async move {
        let mut seed = 0x2545f4914f6cdd1du64;
        let mut buf = vec![0u8; 256 << 10];
        for _ in 0..total / buf.len() {
            crate::tunnel::fill(&mut buf, &mut seed);
            w.write_all(&buf).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut seed = 0x2545f4914f6cdd1du64;
    let mut want = vec![0u8; 256 << 10];
    let mut got = vec![0u8; 256 << 10];
    for _ in 0..total / want.len() {
        crate::tunnel::fill(&mut want, &mut seed);
        r.read_exact(&mut got).await.unwrap();
        assert!(got == want, "echoed bytes differ");
    }
    assert_eq!(
        r.read(&mut got).await.unwrap(),
        0,
        "clean end after the data"
    );
    writer.await.unwrap();
}

fn link_metric(site: &str, addr: SocketAddr, transport: &str) -> String {
    format!(
        r#"meshfed_gateway_peer_link_transport{{site="{site}",address="{addr}",transport="{transport}"}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_on_h2_carry_data_and_refuse_with_the_quic_codes() {
    let echo = echo_server().await;
    let dead = {
        let l = listen();
        l.local_addr().unwrap()
    };
    let (udp_echo, _udp) = crate::udp::udp_echo().await;
    let west = ConfigBuilder::default()
        .export("echo.demo", 7000, vec![echo])
        .export_udp("echo.demo", 7000, vec![udp_echo])
        .export("down.demo", 7001, vec![dead]);
    let s = TwoSites::start_pair("h2-basic", west, |ec| ConfigBuilder {
        transport: Some("default: h2".into()),
        ..ec.import("echo.demo", 7000, "west", ([127, 0, 0, 1], 0).into())
            .import_udp("echo.demo", 7000, "west", ([127, 0, 0, 1], 0).into())
            .import("down.demo", 7001, "west", ([127, 0, 0, 1], 0).into())
            .import("gone.demo", 7002, "west", ([127, 0, 0, 1], 0).into())
    });
    let echo_at = s.east_gw.import("echo.demo:7000");
    echo_once(echo_at).await.unwrap();
    assert_eq!(
        s.east_gw
            .wait_metric(
                &link_metric("west", s.west_gw.quic, "h2"),
                1.0,
                Duration::from_secs(5)
            )
            .await,
        1.0,
        "east's link to west is on h2"
    );
    assert_eq!(
        s.east_gw
            .metric(&link_metric("west", s.west_gw.quic, "quic"))
            .await,
        0.0
    );
    // 32 MiB each way, every byte checked, on 8 streams at once.
    let bulk: Vec<_> = (0..8)
        .map(|_| tokio::spawn(echo_bulk(echo_at, 4 << 20)))
        .collect();
    for b in bulk {
        b.await.unwrap();
    }
    assert!(
        s.west_gw
            .metric(r#"meshfed_gateway_bytes_total{direction="ingress",flow="from_tunnel"}"#)
            .await
            >= (32 << 20) as f64
    );

    // UDP crosses h2 as capsules on a connect-udp stream: two clients, two flows, every
    // datagram echoed in order (TCP under it neither loses nor reorders).
    for client in 0..2u8 {
        let c = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.connect(s.east_gw.import("echo.demo:7000/udp"))
            .await
            .unwrap();
        let mut buf = vec![0u8; 2048];
        for i in 0..200u16 {
            let msg: Vec<u8> = [&[client][..], &i.to_be_bytes()[..], &[7u8; 1200][..]].concat();
            c.send(&msg).await.unwrap();
            let n = tokio::time::timeout(Duration::from_secs(5), c.recv(&mut buf))
                .await
                .expect("echo over h2 in time")
                .unwrap();
            assert_eq!(&buf[..n], &msg[..], "datagram {i} of client {client}");
        }
    }
    assert!(
        s.west_gw
            .metric(
                r#"meshfed_gateway_udp_datagrams_total{direction="ingress",flow="from_tunnel"}"#
            )
            .await
            >= 400.0
    );

    // Refusals carry the same stable reasons as on QUIC, at both ends.
    for (import, reason) in [
        ("down.demo:7001", "endpoint_connect_failed"),
        ("gone.demo:7002", "unknown_service"),
    ] {
        // The refusal resets the client, which may come before connect() returns.
        if let Ok(mut c) = TcpStream::connect(s.east_gw.import(import)).await {
            let mut b = [0u8; 1];
            let r = tokio::time::timeout(Duration::from_secs(10), c.read(&mut b))
                .await
                .expect("a refusal ends the client connection");
            assert!(!matches!(r, Ok(n) if n > 0), "{import}: {r:?}");
        }
        for (gw, dir) in [(&s.east_gw, "egress"), (&s.west_gw, "ingress")] {
            let m =
                format!(r#"meshfed_gateway_refusals_total{{direction="{dir}",reason="{reason}"}}"#);
            assert!(
                gw.wait_metric(&m, 1.0, Duration::from_secs(5)).await >= 1.0,
                "{m} after {import}"
            );
        }
    }
    assert!(
        s.east_gw.logs().contains("endpoint_connect_failed"),
        "east logs the far side's reason"
    );

    // Garbage and a TLS client without a certificate at the h2 port: dropped, and the
    // gateway serves on.
    let h2_port = SocketAddr::new(s.west_gw.quic.ip(), s.west_gw.quic.port());
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff][..],
        &[0u8; 4096][..],
    ] {
        let mut c = TcpStream::connect(h2_port).await.unwrap();
        let _ = c.write_all(junk).await;
        let mut b = [0u8; 256];
        let closed = tokio::time::timeout(Duration::from_secs(8), async {
            loop {
                match c.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the h2 port kept a garbage connection open");
    }
    // In TLS 1.3 the client finishes first; whether openssl prints the gateway's alert
    // 116 before it exits is a race, so the gateway's own count is the evidence.
    let refused = openssl_s_client_no_cert(h2_port);
    assert!(
        s.west_gw
            .wait_metric(
                r#"meshfed_gateway_handshake_failures_total{reason="no_certificate"}"#,
                1.0,
                Duration::from_secs(5)
            )
            .await
            >= 1.0,
        "the refusal is counted with its reason, as on QUIC: {refused}"
    );
    // East's SVID expired, then future-dated: west's h2 port refuses each with its reason
    // (east's gateway keeps its working SVID; only openssl presents the bad one).
    for (from, to, reason) in [(-7200, -3600, "expired"), (3600, 7200, "not_yet_valid")] {
        crate::security::write_svid_valid(&s.east, from, to);
        let out = openssl_s_client(
            h2_port,
            &[
                "-cert",
                s.east.cert.to_str().unwrap(),
                "-key",
                s.east.key.to_str().unwrap(),
            ],
        );
        let m = format!("meshfed_gateway_handshake_failures_total{{reason=\"{reason}\"}}");
        assert!(
            s.west_gw.wait_metric(&m, 1.0, Duration::from_secs(5)).await >= 1.0,
            "{reason}: {out}"
        );
    }
    echo_once(echo_at).await.unwrap();
}

/// The TCP connections from anyone to `port` on 127.0.0.1, by their source port.
fn connections_to(port: u16) -> Vec<u16> {
    let out = Command::new("ss")
        .args([
            "-Htn",
            "state",
            "established",
            &format!("( dport = :{port} )"),
        ])
        .output()
        .expect("ss (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(2)?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// A pool member that dies while the others live is dialed again: the link stays up on
/// the survivors (streams open meanwhile), and the pool is back to its full count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_link_dials_its_lost_connections_again() {
    let west = ConfigBuilder::default().export("echo.demo", 7000, vec![echo_server().await]);
    let s = TwoSites::start_pair("h2-redial", west, |ec| ConfigBuilder {
        transport: Some("default: h2".into()),
        ..ec.import("echo.demo", 7000, "west", ([127, 0, 0, 1], 0).into())
    });
    let echo_at = s.east_gw.import("echo.demo:7000");
    echo_once(echo_at).await.unwrap();
    let port = s.west_gw.quic.port();
    let members = |live: bool| {
        let admin = s.east_gw.admin;
        async move {
            let (_, body) = meshfed_lifecycle::admin::get(admin, "/debug/peers")
                .await
                .unwrap();
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            v["dialed"]["west"]["links"][0]["h2_connections"][if live { "live" } else { "of" }]
                .as_u64()
                .unwrap_or_else(|| panic!("{v:#}"))
        }
    };
    let full = members(false).await;
    assert!(full >= 2, "a pool of {full}");
    let started = Instant::now();
    while connections_to(port).len() < full as usize {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            connections_to(port)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Cut all but one (ss -K: the kernel aborts them, with a reset to the far side).
    let before = connections_to(port);
    for sport in &before[1..] {
        let out = Command::new("ss")
            .args(["-K", "state", "established"])
            .arg(format!("( sport = :{sport} and dport = :{port} )"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    // The survivor carries streams at once.
    for _ in 0..20 {
        echo_once(echo_at).await.unwrap();
    }
    let started = Instant::now();
    loop {
        let now = connections_to(port);
        if members(true).await == full && now.len() == before.len() {
            assert!(
                now.contains(&before[0]),
                "the survivor stayed: {before:?} → {now:?}"
            );
            assert!(
                before[1..].iter().all(|p| !now.contains(p)),
                "the cut connections are gone: {before:?} → {now:?}"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} of {full} live; connections {before:?} → {now:?}",
            members(true).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "{} of {} connections cut, pool full again after {:?}",
        before.len() - 1,
        before.len(),
        started.elapsed()
    );
    echo_once(echo_at).await.unwrap();
}

/// One 1000-byte round trip on an echo connection.
async fn round(c: &mut TcpStream, n: u8) {
    let msg = [n; 1000];
    let mut back = [0u8; 1000];
    c.write_all(&msg).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(back, msg);
}

/// `openssl s_client` offering ALPN h2 without a client certificate.
fn openssl_s_client_no_cert(addr: SocketAddr) -> String {
    openssl_s_client(addr, &[])
}

/// `openssl s_client` offering ALPN h2, with `extra` arguments.
fn openssl_s_client(addr: SocketAddr, extra: &[&str]) -> String {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-alpn",
            "h2",
            "-brief",
        ])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every UDP packet coming into the namespace is dropped.
const UDP_BLOCK: &str = "table inet udp_block {\n  chain input {\n    type filter hook input priority 0; policy accept;\n    iif \"lo\" accept\n    meta l4proto udp drop\n  }\n}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_block_moves_the_link_to_h2_and_back_without_a_client_error() {
    let ns = crate::netns::Netns::new("mfu", 2, 0);
    ns.nft(UDP_BLOCK);
    let (host, inner) = (ns.host.clone(), ns.inner.clone());
    let host_ip: std::net::IpAddr = host.parse().unwrap();

    // West's endpoint is on the host side; west runs in the namespace.
    let echo = crate::harness::echo_server_at(host_ip).await;
    let scratch = Scratch::new("udp-block");
    let west = scratch.site("west", "west.example.org");
    let east = scratch.site("east", "east.example.org");
    let inner_any: SocketAddr = format!("{inner}:0").parse().unwrap();
    let west_gw = Gw::start_in(
        &ns.wrapper(),
        &west,
        &ConfigBuilder {
            listen: Some(inner_any),
            admin: Some(inner_any),
            ..Default::default()
        }
        .peer(&east, None)
        .export("echo.demo", 7000, vec![echo]),
    )
    .unwrap();
    let fallback = Duration::from_secs(1);
    let east_gw = Gw::start(
        &east,
        &ConfigBuilder {
            listen: Some(SocketAddr::new(host_ip, 0)),
            transport: Some("default: auto\nfallback_after: 1s\nprobe_every: 1s".into()),
            ..Default::default()
        }
        .peer(&west, Some(west_gw.quic))
        .import("echo.demo", 7000, "west", ([127, 0, 0, 1], 0).into()),
    )
    .unwrap();
    let echo_at = east_gw.import("echo.demo:7000");

    // The block is real: a QUIC handshake cannot complete.
    // Calls flow over h2 within the fallback deadline (plus the h2 dial).
    let t0 = Instant::now();
    echo_once(echo_at).await.expect("the first call, over h2");
    let first = t0.elapsed();
    assert!(
        first < fallback + Duration::from_secs(2),
        "first call took {first:?}"
    );
    let h2 = link_metric("west", west_gw.quic, "h2");
    let quic = link_metric("west", west_gw.quic, "quic");
    assert_eq!(east_gw.metric(&h2).await, 1.0, "{}", east_gw.logs());
    // `meshfed diagnose` at east: the call succeeds, and the link step says it runs on
    // h2 and why.
    let out = std::process::Command::new(crate::harness::BIN)
        .args(["diagnose", "echo.demo:7000", "--json", "--config"])
        .arg(east.dir.join("gateway.yaml"))
        .args(["--admin", &east_gw.admin.to_string()])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&out.stderr));
    });
    assert!(out.status.success(), "{report:#}");
    let link = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "link")
        .cloned()
        .unwrap();
    let detail = link["detail"].as_str().unwrap();
    assert!(detail.starts_with("h2 ("), "{report:#}");
    assert!(detail.contains("QUIC"), "the reason names QUIC: {report:#}");
    eprintln!("diagnose under the UDP block: link {detail}");

    // Clients call all along; not one may see an error.
    let (calls, errors) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stop = tokio_util::sync::CancellationToken::new();
    let caller = {
        let (calls, errors, stop) = (calls.clone(), errors.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                match echo_once(echo_at).await {
                    Ok(()) => calls.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("call failed: {e}");
                        errors.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // A long-lived connection, opened on h2: it must outlive the move back to QUIC.
    let mut long = TcpStream::connect(echo_at).await.unwrap();
    round(&mut long, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    ns.exec(&["nft", "delete", "table", "inet", "udp_block"]);
    let moved = Instant::now();
    assert_eq!(
        east_gw
            .wait_metric(&quic, 1.0, Duration::from_secs(10))
            .await,
        1.0,
        "the link did not move back to QUIC: {}",
        east_gw.logs()
    );
    let back_after = moved.elapsed();
    assert_eq!(east_gw.metric(&h2).await, 0.0);
    assert!(
        east_gw
            .metric(r#"meshfed_gateway_transport_moves_total{site="west",reason="quic_restored"}"#)
            .await
            >= 1.0
    );
    // The connection opened on h2 still works, and new ones go over QUIC.
    round(&mut long, 2).await;
    let before = calls.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    round(&mut long, 3).await;
    stop.cancel();
    caller.await.unwrap();
    drop(long);
    assert!(
        calls.load(Ordering::Relaxed) > before,
        "calls after the move"
    );
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "client errors across both moves ({} calls)",
        calls.load(Ordering::Relaxed)
    );
    eprintln!(
        "first call over h2 after {first:?}; back on QUIC {back_after:?} after the block lifted; {} calls, 0 errors",
        calls.load(Ordering::Relaxed)
    );
}
