//! Active-active gateways: two replicas of one site (real `meshfed gateway run`
//! processes, the same identity, each its own directory) both serve it; a peer spreads
//! its streams over them; `kill -9` of one under load costs at most a few requests,
//! and its address leaves the site's list through its own lease while the site stays up.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::federation::{Fed, On, fed_config, joined};
use crate::harness::{Gw, Scratch, echo_server};

/// A second replica's directory: the site's identity and membership, nothing else.
fn replica_dir(site: &meshfed_lab::SiteFiles, name: &str) -> meshfed_lab::SiteFiles {
    let dir = site.dir.with_file_name(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["federation.json", "bundles", "ca"] {
        let out = std::process::Command::new("cp")
            .arg("-r")
            .arg(site.dir.join(f))
            .arg(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{f}: {out:?}");
    }
    let file = |p: &Path| dir.join(p.file_name().unwrap());
    for p in [&site.cert, &site.key, &site.bundle] {
        std::fs::copy(p, file(p)).unwrap();
    }
    meshfed_lab::SiteFiles {
        dir: dir.clone(),
        cert: file(&site.cert),
        key: file(&site.key),
        bundle: file(&site.bundle),
        ..site.clone()
    }
}

async fn call(addr: SocketAddr) -> bool {
    let once = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"ping").await?;
        s.shutdown().await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out == b"ping")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(10), once).await,
        Ok(Ok(true))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_a_site_and_one_killed_costs_almost_nothing() {
    replica_killed_under_load("replicas", 500, Duration::from_secs(8)).await;
}

/// What a replica's `kill -9` cost: requests made, failed, and the time from the kill to
/// the last failed or slow (over 1 s) request.
pub(crate) struct KillCost {
    pub total: u32,
    pub failed: u32,
    pub recovered: Duration,
}

/// Two replicas of west serve `orders.shop`; east calls it `rate` times a second (a new
/// connection and an echo each) for `secs`, and west-a is killed -9 after 2 s. Asserts
/// issue 16's bounds (at most 0.5 % failed, recovered within 5 s) and that the dead
/// replica's address leaves the site's list while the site stays up.
pub(crate) async fn replica_killed_under_load(name: &str, rate: u32, secs: Duration) -> KillCost {
    let scratch = Scratch::new(name);
    let fed = Fed::start_on(&Fed::init(&scratch), 0, "2s", On::Embedded);
    let [east, west] = joined(&scratch, &fed, ["east", "west"]);
    let west_b = replica_dir(&west, "west-b");
    let port = crate::harness::listen().local_addr().unwrap().port();
    let echo = echo_server().await;
    let west_cfg = |ip| fed_config(&west, ip).export("orders.shop", port, vec![echo]);
    let mut wa = Gw::start(&west, &west_cfg([127, 0, 0, 8])).unwrap();
    let wb = Gw::start(
        &west_b,
        &fed_config(&west_b, [127, 0, 0, 9]).export("orders.shop", port, vec![echo]),
    )
    .unwrap();
    let east_gw = Gw::start(&east, &fed_config(&east, [127, 0, 0, 10])).unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 10], port));

    // Both replicas serve: east's streams reach each.
    let ingress = "meshfed_gateway_connections_total{direction=\"ingress\"}";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        call(addr).await;
        if wa.metric(ingress).await >= 5.0 && wb.metric(ingress).await >= 5.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "streams not spread: a {} b {}",
            wa.metric(ingress).await,
            wb.metric(ingress).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let site_addresses = || {
        let out = std::process::Command::new(crate::harness::BIN)
            .args(["status", "--dir", fed.dir.to_str().unwrap()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let before = site_addresses();
    assert!(
        before.contains(&wa.quic.to_string()) && before.contains(&wb.quic.to_string()),
        "{before}"
    );

    // `rate` requests per second for `secs`; west-a is killed -9 after 2 s.
    let start = Instant::now();
    let mut tasks = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    let mut killed = None;
    while start.elapsed() < secs {
        tick.tick().await;
        if killed.is_none() && start.elapsed() >= Duration::from_secs(2) {
            wa.kill();
            killed = Some(Instant::now());
        }
        let t = Instant::now();
        tasks.push(tokio::spawn(
            async move { (t, call(addr).await, t.elapsed()) },
        ));
    }
    let killed = killed.unwrap();
    let (mut ok, mut failed, mut last_bad) = (0u32, 0u32, None::<Instant>);
    let mut slow_after = None::<Instant>;
    for t in tasks {
        let (at, good, took) = t.await.unwrap();
        if good {
            ok += 1;
        } else {
            failed += 1;
            last_bad = last_bad.max(Some(at));
        }
        // A request that took over a second was held up by the dead replica.
        if took > Duration::from_secs(1) {
            slow_after = slow_after.max(Some(at));
            if std::env::var_os("MESHFED_DEBUG_SLOW").is_some() {
                eprintln!(
                    "slow: started {:?} after the kill, took {took:?}",
                    at.saturating_duration_since(killed)
                );
            }
        }
    }
    let total = ok + failed;
    let recovered = [last_bad, slow_after]
        .into_iter()
        .flatten()
        .max()
        .map_or(Duration::ZERO, |t| t.saturating_duration_since(killed));
    eprintln!(
        "replica killed under {rate} rps: {total} requests, {failed} failed ({:.3} %), recovered {recovered:?} after the kill",
        f64::from(failed) * 100.0 / f64::from(total)
    );
    assert!(
        f64::from(failed) <= f64::from(total) * 0.005,
        "{failed} of {total} failed"
    );
    assert!(
        recovered <= Duration::from_secs(5),
        "recovery took {recovered:?}"
    );

    // The dead replica's address leaves the list through its own lease; the site
    // stays up on the other.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = site_addresses();
        if !s.contains(&wa.quic.to_string()) && s.contains(&wb.quic.to_string()) {
            assert!(!s.contains("down"), "{s}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead replica's address stayed: {s}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(east_gw);
    drop(wb);
    KillCost {
        total,
        failed,
        recovered,
    }
}
