//! A handshake flood (validated and spoofed QUIC Initials, half-open) at a gateway while
//! clients call through it: the gateway's RSS stays bounded, and the legitimate p99 is
//! compared with the quiet figure of the same run (target: within 2×).

use std::time::{Duration, Instant};

use crate::harness::*;

use crate::security::flood as attack;

async fn latencies(addr: std::net::SocketAddr, n: usize, pause: Duration) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        echo_once(addr)
            .await
            .unwrap_or_else(|e| panic!("legitimate call {i} failed: {e}"));
        out.push(t.elapsed());
        tokio::time::sleep(pause).await;
    }
    out.sort();
    out
}

fn p99(sorted: &[Duration]) -> Duration {
    sorted[((sorted.len() - 1) as f64 * 0.99).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_keeps_rss_bounded_and_calls_flowing() {
    let attempts = if super::full() { 20_000 } else { 2_000 };
    let spread = super::pick(Duration::from_secs(2), Duration::from_secs(20));
    let calls = if super::full() { 400 } else { 60 };
    let s = TwoSites::start(
        "fault-flood",
        &[("echo.demo", 7000, vec![echo_server().await])],
        &[("echo.demo", 7000)],
    )
    .await;
    let import = s.east_gw.import("echo.demo:7000");
    echo_once(import).await.unwrap();
    let pace = spread / calls as u32;
    let quiet = latencies(import, calls, pace).await;
    let pid = s.west_gw.pid();
    let target = s.west_gw.quic;
    for (mode, sources, name) in [
        (attack::Mode::Spoofed, 1, "spoofed"),
        (attack::Mode::Validated, 8, "validated"),
    ] {
        let before = attack::rss_bytes(pid);
        let flood = tokio::task::spawn_blocking(move || {
            attack::flood(
                target,
                attempts,
                sources,
                mode,
                spread,
                Duration::from_secs(1),
            )
        });
        let sampler = tokio::spawn(async move {
            let mut peak = 0;
            let end = Instant::now() + spread + Duration::from_millis(1500);
            while Instant::now() < end {
                peak = peak.max(attack::rss_bytes(pid));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peak
        });
        let during = latencies(import, calls, pace).await;
        let report = flood.await.unwrap().unwrap();
        let peak = sampler.await.unwrap();
        assert!(before > 0 && peak > 0, "no RSS read for pid {pid}");
        let grown = peak.saturating_sub(before);
        let ratio = p99(&during).as_secs_f64() / p99(&quiet).as_secs_f64().max(1e-6);
        super::figure(&format!("fault_flood_{name}_attempts"), report.attempts);
        super::figure(
            &format!("fault_flood_{name}_rss_peak_mib"),
            format!("{:.1}", peak as f64 / f64::from(1 << 20)),
        );
        super::figure(
            &format!("fault_flood_{name}_rss_growth_mib"),
            format!("{:.1}", grown as f64 / f64::from(1 << 20)),
        );
        super::figure(
            &format!("fault_flood_{name}_p99_ms"),
            format!("{:.2}", p99(&during).as_secs_f64() * 1e3),
        );
        super::figure(
            &format!("fault_flood_{name}_quiet_p99_ms"),
            format!("{:.2}", p99(&quiet).as_secs_f64() * 1e3),
        );
        super::figure(
            &format!("fault_flood_{name}_p99_ratio"),
            format!("{ratio:.2}"),
        );
        assert!(
            grown < 50 << 20,
            "{name}: {attempts} half-open handshakes grew RSS by {} MiB",
            grown >> 20
        );
        // The 2× target is asserted in the full form; the short one (CI, on a shared
        // 2-core machine, 60 calls) reports it.
        if super::full() {
            assert!(
                ratio <= 2.0,
                "{name}: legitimate p99 {ratio:.2}× the quiet one"
            );
        }
        // Let the half-open attempts time out before the next round.
        tokio::time::sleep(Duration::from_secs(6)).await;
    }
}
