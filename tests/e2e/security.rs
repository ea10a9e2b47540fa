//! Attacks on a running gateway and federation, each the regression test of a defect
//! found by attack (issue 13): unauthenticated handshake floods, trust-domain takeover
//! through join, identities that are not valid now, concurrent writers, signals.

use std::time::{Duration, Instant};

use crate::harness::*;

#[path = "../../bench/common/flood.rs"]
pub(crate) mod flood;

/// West exports an echo server as echo.demo:7000, east imports it; returns the sites
/// and east's import address, once one echo has gone through.
async fn echo_sites(name: &str) -> (TwoSites, std::net::SocketAddr) {
    let echo = echo_server().await;
    let s = TwoSites::start(
        name,
        &[("echo.demo", 7000, vec![echo])],
        &[("echo.demo", 7000)],
    )
    .await;
    let import = s.east_gw.import("echo.demo:7000");
    echo_once(import).await.unwrap();
    (s, import)
}

/// Latencies of `n` echo round trips through `addr`, each on a new TCP connection (a new
/// tunnel stream); panics on any failure.
async fn echo_latencies(addr: std::net::SocketAddr, n: usize, pause: Duration) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        echo_once(addr)
            .await
            .unwrap_or_else(|e| panic!("legitimate echo {i} failed: {e}"));
        out.push(t.elapsed());
        tokio::time::sleep(pause).await;
    }
    out.sort();
    out
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Before: each half-open handshake cost about 1.5 MB (quinn allocated all 16 384
/// streams' state per connection) for ~20 s, with no limit on handshakes in flight; 1000
/// ClientHellos took a gateway to 1.66 GB. Now: Retry under load, per-address and total
/// caps, a 5 s handshake deadline, and streams granted only after authentication.
#[tokio::test(flavor = "multi_thread")]
async fn handshake_flood_moves_rss_under_50_mb_and_traffic_keeps_flowing() {
    let (s, import) = echo_sites("flood").await;
    let quiet = echo_latencies(import, 40, Duration::from_millis(5)).await;
    let pid = s.west_gw.pid();
    let target = s.west_gw.quic;
    for (mode, sources) in [(flood::Mode::Spoofed, 1), (flood::Mode::Validated, 8)] {
        let before = flood::rss_bytes(pid);
        let attack = tokio::task::spawn_blocking(move || {
            flood::flood(
                target,
                2000,
                sources,
                mode,
                Duration::from_secs(2),
                Duration::from_secs(1),
            )
        });
        // Legitimate traffic during the flood, and the peak RSS.
        let sampler = tokio::spawn(async move {
            let mut peak = 0;
            let end = Instant::now() + Duration::from_millis(3500);
            while Instant::now() < end {
                peak = peak.max(flood::rss_bytes(pid));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peak
        });
        let during = echo_latencies(import, 40, Duration::from_millis(50)).await;
        // A peer that (re)connects during the flood still gets in.
        let t = Instant::now();
        let west_bundle = meshfed_identity::Ca::load(&s.west.dir.join("ca"))
            .unwrap()
            .bundle(1);
        let conn = quic_as_east(&s, west_bundle).await;
        let handshake = t.elapsed();
        let report = attack.await.unwrap().unwrap();
        let peak = sampler.await.unwrap();
        let grown = peak.saturating_sub(before);
        eprintln!(
            "{mode:?}: {} attempts, {} retries, west RSS {} -> peak {} MB (+{:.1} MB); \
             echo p50/p99 quiet {:?}/{:?}, during {:?}/{:?}; new peer handshake {handshake:?}",
            report.attempts,
            report.retries,
            before >> 20,
            peak >> 20,
            grown as f64 / (1 << 20) as f64,
            pct(&quiet, 0.5),
            pct(&quiet, 0.99),
            pct(&during, 0.5),
            pct(&during, 0.99),
        );
        assert_eq!(report.attempts, 2000);
        assert!(
            report.retries > 0,
            "{mode:?}: no Retry was sent under load: {report:?}"
        );
        assert!(
            grown < 50 << 20,
            "{mode:?}: 2000 half-open handshakes grew RSS by {} MB",
            grown >> 20
        );
        conn.unwrap_or_else(|e| panic!("{mode:?}: a legitimate peer was kept out: {e}"));
        assert!(
            pct(&during, 0.99) < Duration::from_secs(1).max(pct(&quiet, 0.99) * 20),
            "{mode:?}: legitimate p99 {:?} during the flood (quiet {:?})",
            pct(&during, 0.99),
            pct(&quiet, 0.99)
        );
        // Let the half-open attempts time out before the next round.
        tokio::time::sleep(Duration::from_secs(6)).await;
    }
    let refused = s
        .west_gw
        .metric("meshfed_gateway_handshake_failures_total{reason=\"handshake_limit_per_address\"}")
        .await;
    assert!(
        refused > 0.0,
        "the per-address limit never refused a flood attempt"
    );
    let retries = s.west_gw.metric("meshfed_gateway_quic_retries_total").await;
    assert!(retries > 0.0);
}

/// Writes `site`'s gateway SVID anew, signed by its own CA, valid from `from` to `to`
/// seconds relative to now.
pub(crate) fn write_svid_valid(site: &meshfed_lab::SiteFiles, from: i64, to: i64) {
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType};
    let ca = meshfed_identity::Ca::load(&site.dir.join("ca")).unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(site.id.as_str().try_into().unwrap())];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now + time::Duration::seconds(from);
    p.not_after = now + time::Duration::seconds(to);
    let (cert, key) = ca.sign(p).unwrap();
    meshfed_identity::Svid {
        id: site.id.clone(),
        chain: vec![cert],
        key,
    }
    .save(&site.cert, &site.key)
    .unwrap();
}

/// Before: an expired or future-dated SVID was loaded at startup and on rotation; the
/// gateway logged "SVID rotated", stayed ready, and every handshake failed.
#[test]
fn a_gateway_refuses_to_start_on_an_svid_that_is_not_valid_now() {
    let scratch = Scratch::new("svid-start");
    for (name, from, to, code) in [
        ("expired", -7200, -3600, "expired"),
        ("future", 3600, 7200, "not_yet_valid"),
    ] {
        let site = scratch.site(name, &format!("{name}.example.org"));
        write_svid_valid(&site, from, to);
        let config = meshfed_lab::ConfigBuilder::default().write(&site).unwrap();
        let (exit, _, err) = meshfed(&["gateway", "run", "-c", config.to_str().unwrap()]);
        assert_ne!(exit, 0, "{name}: started anyway: {err}");
        assert!(
            err.contains(&format!("[{code}]")) && err.contains(site.cert.to_str().unwrap()),
            "{name}: the error names neither the file nor the reason: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_to_an_svid_that_is_not_valid_now_keeps_the_working_one() {
    let (s, import) = echo_sites("svid-rotate").await;
    let west_bundle = meshfed_identity::Ca::load(&s.west.dir.join("ca"))
        .unwrap()
        .bundle(1);
    for (from, to, reason) in [(-7200, -3600, "expired"), (3600, 7200, "not_yet_valid")] {
        write_svid_valid(&s.west, from, to);
        let metric = format!("meshfed_gateway_svid_refusals_total{{reason=\"{reason}\"}}");
        s.west_gw
            .wait_metric(&metric, 1.0, Duration::from_secs(5))
            .await;
        // Still presenting the working SVID: new handshakes succeed, and west is ready.
        quic_as_east(&s, west_bundle.clone())
            .await
            .unwrap_or_else(|e| panic!("{reason}: west lost its working identity: {e}"));
        let (status, body) = meshfed_lifecycle::admin::get(s.west_gw.admin, "/ready")
            .await
            .unwrap();
        assert_eq!(status, 200, "{reason}: {body}");
    }
    assert!(
        !s.west_gw.logs().contains("SVID rotated"),
        "a bad SVID was swapped in"
    );
    // A valid one is still taken.
    write_svid_valid(&s.west, -60, 3600);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s.west_gw.logs().contains("SVID rotated") {
        assert!(Instant::now() < deadline, "a valid rotation was not taken");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    echo_once(import).await.unwrap();
}

/// `/ready` turns false once the SVID in use expires within the reload interval: nothing
/// on disk can replace it in time.
#[tokio::test(flavor = "multi_thread")]
async fn ready_turns_false_before_the_svid_expires() {
    let scratch = Scratch::new("svid-ready");
    let site = scratch.site("west", "west.example.org");
    write_svid_valid(&site, -60, 8);
    let cfg = meshfed_lab::ConfigBuilder {
        reload_interval: Some(Duration::from_secs(5)),
        ..Default::default()
    };
    let gw = Gw::start(&site, &cfg).unwrap();
    let (status, body) = meshfed_lifecycle::admin::get(gw.admin, "/ready")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let (status, body) = meshfed_lifecycle::admin::get(gw.admin, "/ready")
            .await
            .unwrap();
        if status == 503 {
            assert!(body.contains("SVID expires in"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still ready with an SVID about to expire"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn fed_init(scratch: &Scratch) -> std::path::PathBuf {
    crate::federation::Fed::init(scratch)
}

/// Before: any token holder could join with another site's trust domain; the
/// federation replaced that domain's bundle, trusted the newcomer's CA for it and cut the
/// owner off.
#[tokio::test(flavor = "multi_thread")]
async fn a_join_cannot_take_over_another_sites_trust_domain() {
    use crate::federation::{Fed, join, joined};
    let scratch = Scratch::new("takeover");
    let dir = fed_init(&scratch);
    let fed = Fed::start(&dir, 0);
    let [west] = joined(&scratch, &fed, ["west"]);
    let west_ca = meshfed_identity::Ca::load(&west.dir.join("ca")).unwrap();

    // The attack: its own CA, west's trust domain, any token.
    let rogue = scratch.site("rogue", "west.example.org");
    let (code, err) = join(&rogue, "rogue", &fed.token("rogue", "1h"));
    assert_ne!(code, 0, "rogue joined with west's trust domain");
    assert!(
        err.contains("trust_domain_owned") && err.contains("west"),
        "{err}"
    );
    assert_eq!(
        fed.metric("meshfed_federation_refusals_total{reason=\"trust_domain_owned\"}")
            .await,
        1.0
    );

    // A token bound to a trust domain admits only that one.
    let east = scratch.site("east", "east.example.org");
    let (code, err) = token_bound(&fed, "east", "elsewhere.example.org", false);
    assert_eq!(code, 0, "{err}");
    let (code, err) = join(&east, "east", &err_or_token(&err));
    assert_ne!(code, 0);
    assert!(err.contains("trust_domain_mismatch"), "{err}");

    // West's bundle is untouched: a site joining now gets west's own CA for it.
    let [north] = joined(&scratch, &fed, ["north"]);
    let got = std::fs::read(north.dir.join("bundles/west.example.org.json")).unwrap();
    let got = meshfed_identity::TrustBundle::from_jwks(west.trust_domain.clone(), &got).unwrap();
    assert_eq!(got.x509_authorities, vec![west_ca.cert().clone()]);

    // Sharing is an explicit operator choice: the bundle becomes the union.
    let west2 = scratch.site("west2", "west.example.org");
    let (code, out) = token_bound(&fed, "west2", "west.example.org", true);
    assert_eq!(code, 0, "{out}");
    let (code, err) = join(&west2, "west2", &err_or_token(&out));
    assert_eq!(code, 0, "{err}");
    let got = std::fs::read(west2.dir.join("bundles/west.example.org.json")).unwrap();
    let got = meshfed_identity::TrustBundle::from_jwks(west.trust_domain.clone(), &got).unwrap();
    assert_eq!(got.x509_authorities.len(), 2, "west's and west2's CAs");
    assert!(got.x509_authorities.contains(west_ca.cert()));
}

/// `meshfed federation token create --trust-domain TD [--share-trust-domain]`: (exit, stdout+stderr).
fn token_bound(fed: &crate::federation::Fed, site: &str, td: &str, share: bool) -> (i32, String) {
    let dir = fed.dir.display().to_string();
    let mut args = vec![
        "federation",
        "token",
        "create",
        "--dir",
        &dir,
        "--site",
        site,
        "--trust-domain",
        td,
    ];
    if share {
        args.push("--share-trust-domain");
    }
    let (code, out, err) = meshfed(&args);
    (code, format!("{out}\n{err}"))
}

fn err_or_token(out: &str) -> String {
    out.lines()
        .find(|l| l.starts_with("meshfed-join-v1."))
        .unwrap_or_else(|| panic!("no token in {out}"))
        .to_owned()
}

/// Before: 20 concurrent `meshfed register` runs shared one registry.tmp and took no
/// lock; 4–7 entries that exited 0 were lost.
#[test]
fn concurrent_registrations_lose_nothing() {
    let scratch = Scratch::new("register-race");
    let site = scratch.site("west", "west.example.org");
    let files: Vec<_> = (0..20)
        .map(|i| {
            let f = scratch.0.join(format!("svc{i}.yaml"));
            std::fs::write(
                &f,
                format!(
                    "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: svc{i}\n  namespace: legacy\nspec:\n  hosts: [svc{i}.legacy.example]\n  ports:\n  - {{number: {}, name: tcp, protocol: TCP}}\n  resolution: STATIC\n  endpoints:\n  - address: 127.0.0.1\n",
                    9000 + i
                ),
            )
            .unwrap();
            f
        })
        .collect();
    let children: Vec<_> = files
        .iter()
        .map(|f| {
            std::process::Command::new(BIN)
                .args([
                    "register",
                    "-f",
                    f.to_str().unwrap(),
                    "--dir",
                    site.dir.to_str().unwrap(),
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let reg = meshfed_catalog::site::Registry::load(&site.dir).unwrap();
    assert_eq!(
        reg.services.len(),
        20,
        "{:?}",
        reg.services.keys().collect::<Vec<_>>()
    );
    let strays: Vec<_> = std::fs::read_dir(&site.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(strays.is_empty(), "{strays:?}");
}

/// Before: two `federation serve` on one directory both started, and one overwrote the
/// other's tokens. A deleted store.json started an empty federation at revision 0.
#[test]
fn one_federation_per_directory_and_no_silent_empty_store() {
    use crate::federation::Fed;
    let scratch = Scratch::new("fed-dir");
    let dir = fed_init(&scratch);
    let fed = Fed::start(&dir, 0);
    let d = dir.display().to_string();
    let serve = [
        "federation",
        "serve",
        "--dir",
        &d,
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ];
    let (code, _, err) = meshfed(&serve);
    assert_ne!(code, 0, "a second federation served the same directory");
    assert!(
        err.contains("federation.lock") && err.contains("pid"),
        "{err}"
    );
    drop(fed);

    std::fs::remove_file(dir.join("store.json")).unwrap();
    let (code, _, err) = meshfed(&serve);
    assert_ne!(code, 0, "served an empty store in place of a lost one");
    assert!(
        err.contains("store.json") && err.contains("--init-store"),
        "{err}"
    );

    // Initialising twice would replace the federation's CA.
    let (code, _, err) = meshfed(&[
        "federation",
        "init",
        "--trust-domain",
        "fed.example.org",
        "--dir",
        &d,
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("already holds a federation"), "{err}");
}

/// Before: SIGHUP killed every daemon with no drain and no log line.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_is_logged_and_survived_by_gateway_and_federation() {
    use crate::federation::Fed;
    let (mut s, import) = echo_sites("sighup").await;
    let fed_scratch = Scratch::new("sighup-fed");
    let mut fed = Fed::start(&fed_init(&fed_scratch), 0);
    let hup = |pid: u32| {
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    hup(s.west_gw.pid());
    hup(fed.pid());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(s.west_gw.logs().contains("SIGHUP"), "{}", s.west_gw.logs());
    assert!(
        std::fs::read_to_string(&fed.log)
            .unwrap()
            .contains("SIGHUP")
    );
    echo_once(import)
        .await
        .expect("west still serves after SIGHUP");
    let (status, _) = meshfed_lifecycle::admin::get(s.west_gw.admin, "/ready")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(fed.alive(), "the federation died of SIGHUP");
    // SIGTERM still drains and exits cleanly.
    s.west_gw.term();
    let st = s
        .west_gw
        .wait_exit(Duration::from_secs(10))
        .expect("exits on SIGTERM");
    assert!(st.success(), "{st}");
    assert!(s.west_gw.logs().contains("SIGTERM"));
}

/// Before: each UDP flow held a socket on the exporting gateway for the idle timeout,
/// with no cap but the open-file limit; at 1024 descriptors, 1000 flows took down every
/// TCP service through that gateway. Now the flows get a quarter of the descriptors (half
/// of that per peer), refusals are typed (`flow_limit`), and TCP keeps working.
#[tokio::test(flavor = "multi_thread")]
async fn udp_flows_cannot_starve_tcp_of_descriptors() {
    udp_flows_are_bounded_per_peer("quic").await
}

/// The same over h2, where a peer's flows are spread over a pool of connections. Before,
/// the h2 ingress counted them against the gateway's total only (16 here), so one peer
/// could take every flow; now against the peer's budget across all its connections.
#[tokio::test(flavor = "multi_thread")]
async fn udp_flows_on_h2_are_bounded_per_peer() {
    udp_flows_are_bounded_per_peer("h2").await
}

async fn udp_flows_are_bounded_per_peer(transport: &str) {
    use meshfed_lab::ConfigBuilder;
    let scratch = Scratch::new(&format!("udp-fds-{transport}"));
    let west = scratch.site("west", "west.example.org");
    let east = scratch.site("east", "east.example.org");
    let (uecho, _task) = crate::udp::udp_echo().await;
    let techo = echo_server().await;
    let wc = ConfigBuilder {
        reload_interval: Some(RELOAD),
        ..Default::default()
    }
    .export("echo.demo", 7000, vec![techo])
    .export_udp("echo.demo", 7000, vec![uecho])
    .peer(&east, None);
    // 64 descriptors, soft and hard: 16 UDP flows in all, 8 per peer.
    let west_gw = Gw::start_in(&["prlimit", "--nofile=64:64", "--"], &west, &wc).unwrap();
    let ec = ConfigBuilder {
        reload_interval: Some(RELOAD),
        transport: Some(format!("default: {transport}")),
        ..Default::default()
    }
    .peer(&west, Some(west_gw.quic))
    .import("echo.demo", 7000, "west", ([127, 0, 0, 1], 0).into())
    .import_udp("echo.demo", 7000, "west", ([127, 0, 0, 1], 0).into());
    let east_gw = Gw::start(&east, &ec).unwrap();
    let tcp = east_gw.import("echo.demo:7000");
    let udp = east_gw.import("echo.demo:7000/udp");
    echo_once(tcp).await.unwrap();

    // 80 clients, one flow each, all alive at once.
    let mut clients = Vec::new();
    for _ in 0..80 {
        let c = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.connect(udp).await.unwrap();
        c.send(b"hello").await.unwrap();
        clients.push(c);
    }
    // Wait for west to open what it may (slow when the machine is busy), then a little
    // longer: no more may follow.
    let opened = "meshfed_gateway_udp_flows_total{direction=\"ingress\"}";
    west_gw
        .wait_metric(opened, 8.0, Duration::from_secs(10))
        .await;
    let refused = "meshfed_gateway_refusals_total{direction=\"ingress\",reason=\"flow_limit\"}";
    west_gw
        .wait_metric(refused, 1.0, Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        west_gw.metric(opened).await,
        8.0,
        "flows opened at west (the per-peer limit at 64 descriptors)"
    );
    assert!(
        west_gw.metric(refused).await >= 1.0,
        "no flow_limit refusal counted"
    );
    // The clients whose flows were opened hear their echo. A datagram may be lost on a
    // loaded machine (QUIC datagrams are not retransmitted), so each client that has not
    // heard yet sends again, as UDP clients do; the refused ones stay refused, for every
    // flow the gateway allows is held open by its client.
    let mut heard = vec![false; clients.len()];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !heard.contains(&true) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for (c, heard) in clients.iter().zip(heard.iter_mut()) {
            let mut b = [0u8; 16];
            while let Ok(n) = c.try_recv(&mut b) {
                assert_eq!(&b[..n], b"hello");
                *heard = true;
            }
        }
        for (c, _) in clients.iter().zip(&heard).filter(|(_, h)| !**h) {
            let _ = c.try_send(b"hello");
        }
    }
    let answered = heard.iter().filter(|h| **h).count();
    if !(1..=8).contains(&answered) {
        let drops = |text: String| -> String {
            text.lines()
                .filter(|l| l.starts_with("meshfed_gateway_udp"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        panic!(
            "{answered} clients answered, with 8 flows open\neast:\n{}\nwest:\n{}\n{}",
            drops(
                http_get(east_gw.admin, "/metrics")
                    .await
                    .unwrap_or_default()
            ),
            drops(
                http_get(west_gw.admin, "/metrics")
                    .await
                    .unwrap_or_default()
            ),
            west_gw.logs()
        );
    }
    assert_eq!(
        west_gw.metric(opened).await,
        8.0,
        "flows opened at west after the clients sent again"
    );
    // TCP through the same gateway, while every UDP flow it allows is open.
    for i in 0..20 {
        echo_once(tcp).await.unwrap_or_else(|e| {
            panic!(
                "TCP echo {i} failed with UDP flows open: {e}\n{}",
                west_gw.logs()
            )
        });
    }
    assert!(
        west_gw.logs().contains("udp_flows=16"),
        "{}",
        west_gw.logs()
    );
}

/// Before: one peer's clients could make a gateway spend every descriptor on endpoint
/// connections (one per TCP stream, with no bound but 16 384 streams per connection and
/// 256 connections per peer), and every other site's streams then failed to connect.
/// Now one peer holds at most a quarter of the open-file limit in TCP streams (32 at
/// 128 here); the next are refused as `flow_limit`, and another site's TCP goes on.
#[tokio::test(flavor = "multi_thread")]
async fn one_peers_tcp_streams_cannot_starve_another_peer_of_descriptors() {
    use meshfed_lab::ConfigBuilder;
    let scratch = Scratch::new("tcp-fds");
    let west = scratch.site("west", "west.example.org");
    let east = scratch.site("east", "east.example.org");
    let north = scratch.site("north", "north.example.org");
    let echo = echo_server().await;
    let wc = ConfigBuilder::default()
        .export("echo.demo", 7000, vec![echo])
        .peer(&east, None)
        .peer(&north, None);
    let west_gw = Gw::start_in(&["prlimit", "--nofile=128:128", "--"], &west, &wc).unwrap();
    let importer = |me: &meshfed_lab::SiteFiles| {
        Gw::start(
            me,
            &ConfigBuilder::default()
                .peer(&west, Some(west_gw.quic))
                .import("echo.demo", 7000, "west", ([127, 0, 0, 1], 0).into()),
        )
        .unwrap()
    };
    let (east_gw, north_gw) = (importer(&east), importer(&north));
    let (at_east, at_north) = (
        east_gw.import("echo.demo:7000"),
        north_gw.import("echo.demo:7000"),
    );
    echo_once(at_east).await.unwrap();
    echo_once(at_north).await.unwrap();

    // 120 connections through east, each held open once it echoed.
    let (mut held, failed, hung) = hold_clients(at_east, 120, Handshake::Echo).await;
    // Never more than the share; fewer only if an echo timed out on a loaded machine.
    assert!(
        (24..=32).contains(&held.len()),
        "east holds {} streams at west (nofile 128), {failed} failed, {hung} hung\n{}",
        held.len(),
        west_gw.logs()
    );
    let refused = "meshfed_gateway_refusals_total{direction=\"ingress\",reason=\"flow_limit\"}";
    assert!(west_gw.metric(refused).await >= 80.0, "{}", west_gw.logs());
    assert!(west_gw.logs().contains("tcp_streams_per_peer=32"));
    // North's TCP goes on while east holds its whole share.
    for i in 0..10 {
        echo_once(at_north).await.unwrap_or_else(|e| {
            panic!(
                "north's echo {i} failed while east holds its share: {e}\n{}",
                west_gw.logs()
            )
        });
    }
    // East gets streams again as its own end.
    held.truncate(20);
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = echo_once(at_east).await {
        assert!(
            Instant::now() < deadline,
            "east never got a stream back: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What each client of [`hold_clients`] does before it is held open.
#[derive(Clone, Copy)]
enum Handshake {
    /// Sends `ping` and reads its echo (an import of an echo server).
    Echo,
    /// Asks an HTTP import for h2c (`Upgrade: h2c`), sends the h2 preface and reads the
    /// `101`.
    H2c,
    /// A WebSocket handshake to an HTTP import of a WebSocket server; reads the `101`.
    WebSocket,
}

/// `n` clients of the import `addr` one after another, each held open once its
/// `handshake` succeeded: (held, failed, hung). A refused one is reset (at times before
/// its connect returns) and counts as failed; one with no answer within 5 s counts as
/// hung, and three of those end the flood (a gateway out of descriptors no longer
/// accepts).
async fn hold_clients(
    addr: std::net::SocketAddr,
    n: usize,
    handshake: Handshake,
) -> (Vec<tokio::net::TcpStream>, usize, usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut held = Vec::new();
    let (mut failed, mut hung) = (0, 0);
    for _ in 0..n {
        if hung > 2 {
            break;
        }
        let Ok(mut c) = tokio::net::TcpStream::connect(addr).await else {
            failed += 1;
            continue;
        };
        let done = async {
            match handshake {
                Handshake::Echo => {
                    let mut b = [0u8; 4];
                    c.write_all(b"ping").await?;
                    c.read_exact(&mut b).await?;
                }
                Handshake::H2c | Handshake::WebSocket => {
                    c.write_all(match handshake {
                        Handshake::H2c => b"GET / HTTP/1.1\r\nHost: web.demo\r\nConnection: Upgrade, HTTP2-Settings\r\n\
                          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n\
                          PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0".as_slice(),
                        _ => b"GET /chat HTTP/1.1\r\nHost: chat.demo\r\nConnection: Upgrade\r\n\
                          Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat.v1\r\n\
                          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".as_slice(),
                    })
                    .await?;
                    let mut b = [0u8; 12];
                    c.read_exact(&mut b).await?;
                    anyhow::ensure!(&b == b"HTTP/1.1 101", "{:?}", String::from_utf8_lossy(&b));
                }
            }
            anyhow::Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(5), done).await {
            Ok(Ok(())) => held.push(c),
            Ok(Err(_)) => failed += 1,
            Err(_) => hung += 1,
        }
    }
    (held, failed, hung)
}

/// Before: local clients of an import could take every descriptor of the importing
/// gateway (each client connection is one), after which its admin endpoint, its other
/// listeners and any file it had to open failed with EMFILE. Now the import listeners'
/// clients hold at most a quarter of the open-file limit together (at least 16); the
/// next is reset, counted as `refusals_total{direction="egress",reason=
/// "client_connection_limit"}`, and a slot comes back when a client leaves.
#[tokio::test(flavor = "multi_thread")]
async fn import_clients_cannot_take_every_descriptor() {
    use meshfed_lab::ConfigBuilder;
    let scratch = Scratch::new("client-fds");
    let west = scratch.site("west", "west.example.org");
    let east = scratch.site("east", "east.example.org");
    let echo = echo_server().await;
    let west_gw = Gw::start(
        &west,
        &ConfigBuilder::default()
            .export("echo.demo", 7000, vec![echo])
            .peer(&east, None),
    )
    .unwrap();
    let east_gw = Gw::start_in(
        &["prlimit", "--nofile=128:128", "--"],
        &east,
        &ConfigBuilder::default()
            .peer(&west, Some(west_gw.quic))
            .import("echo.demo", 7000, "west", ([127, 0, 0, 1], 0).into()),
    )
    .unwrap();
    let at_east = east_gw.import("echo.demo:7000");
    echo_once(at_east).await.unwrap();

    // 150 clients, each held open once it echoed.
    let (mut held, failed, hung) = hold_clients(at_east, 150, Handshake::Echo).await;
    assert!(
        (24..=32).contains(&held.len()),
        "east holds {} clients (nofile 128), {failed} failed, {hung} hung\n{}",
        held.len(),
        east_gw.logs()
    );
    assert!(east_gw.logs().contains("client_connections=32"));
    // The gateway itself still has descriptors: its admin endpoint answers.
    let metrics = http_get(east_gw.admin, "/metrics")
        .await
        .expect("east's admin endpoint while its clients hold their whole share");
    let refused =
        "meshfed_gateway_refusals_total{direction=\"egress\",reason=\"client_connection_limit\"}";
    let n = metrics
        .lines()
        .find(|l| l.starts_with(refused))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(n >= 100.0, "{refused} = {n}");
    // A client that leaves gives its slot back.
    held.truncate(20);
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = echo_once(at_east).await {
        assert!(
            Instant::now() < deadline,
            "no client got through after 12 left: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Before: a client that asked an HTTP import for h2c (`Upgrade: h2c`) gave its client
/// slot back once the `101` was sent, while its connection lived on as h2: clients that
/// upgraded were not bounded at all, and could take every descriptor of the gateway
/// as [`import_clients_cannot_take_every_descriptor`] describes. Now an upgraded
/// connection, h2c or WebSocket, keeps its slot until it ends.
#[tokio::test(flavor = "multi_thread")]
async fn upgraded_clients_keep_their_client_slot() {
    use meshfed_lab::ConfigBuilder;
    let scratch = Scratch::new("upgrade-fds");
    let west = scratch.site("west", "west.example.org");
    let east = scratch.site("east", "east.example.org");
    let (web, _) = crate::http::http_endpoint("west", 200).await;
    let chat = crate::http::WsServer::start("west");
    let west_gw = Gw::start(
        &west,
        &ConfigBuilder::default()
            .export("web.demo", 8080, vec![web])
            .speaks("web.demo", 8080, "http")
            .export("chat.demo", 8081, vec![chat.1])
            .speaks("chat.demo", 8081, "http")
            .peer(&east, None),
    )
    .unwrap();
    let east_gw = Gw::start_in(
        &["prlimit", "--nofile=128:128", "--"],
        &east,
        &ConfigBuilder::default()
            .peer(&west, Some(west_gw.quic))
            .import("web.demo", 8080, "west", ([127, 0, 0, 1], 0).into())
            .speaks("web.demo", 8080, "http")
            .import("chat.demo", 8081, "west", ([127, 0, 0, 1], 0).into())
            .speaks("chat.demo", 8081, "http"),
    )
    .unwrap();
    let refused =
        "meshfed_gateway_refusals_total{direction=\"egress\",reason=\"client_connection_limit\"}";
    for (i, (import, handshake)) in [
        ("web.demo:8080", Handshake::H2c),
        ("chat.demo:8081", Handshake::WebSocket),
    ]
    .into_iter()
    .enumerate()
    {
        let at_east = east_gw.import(import);
        // Once the clients of the round before have gone and given their slots back.
        let deadline = Instant::now() + Duration::from_secs(10);
        let one = loop {
            let (held, ..) = hold_clients(at_east, 1, handshake).await;
            if held.len() == 1 || Instant::now() > deadline {
                break held;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(one.len(), 1, "{import}\n{}", east_gw.logs());
        drop(one);

        let (held, failed, hung) = hold_clients(at_east, 150, handshake).await;
        assert!(
            (24..=32).contains(&held.len()),
            "east holds {} upgraded clients of {import} (nofile 128), {failed} failed, {hung} hung\n{}",
            held.len(),
            east_gw.logs()
        );
        let metrics = http_get(east_gw.admin, "/metrics")
            .await
            .expect("east's admin endpoint while upgraded clients hold their whole share");
        let n = metrics
            .lines()
            .find(|l| l.starts_with(refused))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(n >= 100.0 * (i + 1) as f64, "{import}: {refused} = {n}");
    }
}

/// Before: an authenticated peer could hold any number of connections, and each may pin
/// buffers (an h2 one up to its 32 MiB window). Now one peer identity holds at most 256
/// (QUIC, h2 and reverse h2 together); the next is closed with the `refused` code, counted
/// as `handshake_failures{reason="peer_connection_limit"}`, and its gateway's traffic is
/// untouched. A connection that ends gives its slot back.
#[tokio::test(flavor = "multi_thread")]
async fn a_peer_cannot_hold_unbounded_connections() {
    let (s, import) = echo_sites("peer-links").await;
    echo_once(import).await.unwrap();
    let west_bundle = meshfed_identity::Ca::load(&s.west.dir.join("ca"))
        .unwrap()
        .bundle(1);
    // 264 connections as east, 4 at a time (within the handshake gate's 16 per address).
    // A handshake that times out on a loaded machine (seen once in 264 under the whole
    // suite) is tried again: the limit, not the handshake, is under test.
    let dial = || async {
        match quic_as_east(&s, west_bundle.clone()).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("a handshake as east failed ({e}); trying again");
                quic_as_east(&s, west_bundle.clone())
                    .await
                    .expect("a handshake as east, the second time")
            }
        }
    };
    let mut conns = Vec::new();
    for _ in 0..66 {
        let (a, b, c, d) = tokio::join!(dial(), dial(), dial(), dial());
        conns.extend([a, b, c, d]);
    }
    let metric = r#"meshfed_gateway_handshake_failures_total{reason="peer_connection_limit"}"#;
    s.west_gw
        .wait_metric(metric, 8.0, Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = |c: &quinn::Connection| {
        matches!(c.close_reason(),
            Some(quinn::ConnectionError::ApplicationClosed(a)) if a.error_code == quinn::VarInt::from_u32(0x3))
    };
    let n = conns.iter().filter(|c| refused(c)).count();
    // East's own gateway holds at least one of the 256.
    assert!((9..=16).contains(&n), "{n} of 264 refused");
    assert_eq!(s.west_gw.metric(metric).await, n as f64);
    assert!(s.west_gw.logs().contains("peer_connection_limit"));
    // The peer's gateway carries on over the connection it had.
    for _ in 0..5 {
        echo_once(import).await.unwrap();
    }
    // Slots come back when connections end.
    conns.retain(|c| !refused(c));
    conns.truncate(conns.len() - 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fresh = quic_as_east(&s, west_bundle).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(fresh.close_reason().is_none(), "{:?}", fresh.close_reason());
    assert_eq!(s.west_gw.metric(metric).await, n as f64);
}

/// An AuthorizationPolicy registered while a TCP connection is open through the tunnel
/// resets that connection (as ztunnel closes connections a new policy denies), not
/// only the connections opened after it; the cut is counted by reason and logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_now_denies_resets_the_open_streams_it_denies() {
    use crate::federation::{Fed, fed_config, free_port, joined};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let scratch = Scratch::new("authz-cut");
    let fed = Fed::start(&Fed::init(&scratch), 0);
    let [east, west] = joined(&scratch, &fed, ["east", "west"]);
    let ip: std::net::IpAddr = [127, 0, 0, 2].into();
    let port = free_port(ip);
    let west_gw = Gw::start(
        &west,
        &fed_config(&west, [127, 0, 0, 3]).export("echo.demo", port, vec![echo_server().await]),
    )
    .unwrap();
    let _east_gw = Gw::start(&east, &fed_config(&east, [127, 0, 0, 2])).unwrap();
    let import = std::net::SocketAddr::new(ip, port);
    let deadline = Instant::now() + Duration::from_secs(20);
    while echo_once(import).await.is_err() {
        assert!(Instant::now() < deadline, "the import never worked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut open = tokio::net::TcpStream::connect(import).await.unwrap();
    let mut buf = [0u8; 4];
    open.write_all(b"ping").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");

    crate::http::register_yaml(
        &west,
        "deny.yaml",
        &format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: closed, namespace: demo}}\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation: {{ports: [\"{port}\"]}}\n"
        ),
    );
    let started = Instant::now();
    // The open connection ends with an error or EOF once the gateway applied it.
    let ended = loop {
        let r = tokio::time::timeout(Duration::from_millis(500), async {
            open.write_all(b"ping").await?;
            open.read_exact(&mut buf).await
        })
        .await;
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => break e,
            Err(_) => panic!("an echo hung"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the open connection still echoes after the policy\n{}",
            west_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "open connection ended {:?} after the policy: {ended}",
        started.elapsed()
    );
    assert!(
        west_gw
            .wait_metric(
                r#"meshfed_gateway_streams_cut_total{reason="denied"}"#,
                1.0,
                Duration::from_secs(5)
            )
            .await
            >= 1.0
    );
    assert!(
        west_gw
            .metric(r#"meshfed_gateway_authz_denials_total{policy="demo/closed"}"#)
            .await
            >= 1.0
    );
    assert!(
        west_gw
            .logs()
            .contains("open stream reset: no longer allowed")
    );
    assert!(
        echo_once(import).await.is_err(),
        "a new connection was let through"
    );
}

/// `meshfed status` as the federation's operator: its output, which must succeed.
fn operator_status(fed: &crate::federation::Fed) -> String {
    let out = std::process::Command::new(BIN)
        .args(["status", "--dir", fed.dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits up to 10 s for the federation's `metric` to reach `at_least`.
async fn wait_fed_metric(fed: &crate::federation::Fed, metric: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while fed.metric(metric).await < at_least {
        assert!(
            Instant::now() < deadline,
            "{metric}: {}",
            fed.metric(metric).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Before: the federation let any number of clients without a certificate complete TLS
/// and then hold their connections for ever by sending nothing (about 40 KiB and a
/// descriptor each: 2000 such took it from 35 to 117 MB, and at its descriptor limit
/// no site could connect). Now at most 32 per address (128 in all) are served, each for
/// 30 s (a Join takes milliseconds; every other call needs an SVID); the rest are closed
/// after their handshake and counted by reason, and a joined site's calls go on.
#[tokio::test(flavor = "multi_thread")]
async fn anonymous_federation_connections_are_bounded_in_number_and_time() {
    use crate::federation::{Fed, join, joined};
    use tokio::io::AsyncReadExt;
    let scratch = Scratch::new("fed-anon");
    let fed = Fed::start(&Fed::init(&scratch), 0);
    let [east] = joined(&scratch, &fed, ["east"]);
    let tls = std::sync::Arc::new({
        let mut c = flood::no_verify().unwrap();
        c.alpn_protocols = vec![b"h2".to_vec()];
        c
    });
    let addr: std::net::SocketAddr = fed.addr.parse().unwrap();
    let started = Instant::now();
    let mut held = Vec::new();
    for _ in 0..40 {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("federation").unwrap();
        let c = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .expect("the handshake itself completes");
        held.push(c);
    }
    // Each reads until the federation closes it (its SETTINGS frame first), or 45 s.
    let closes = held.into_iter().map(|mut c| {
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let deadline = Instant::now() + Duration::from_secs(45);
            loop {
                match tokio::time::timeout_at(deadline.into(), c.read(&mut buf)).await {
                    Ok(Ok(0) | Err(_)) => return Some(Instant::now()),
                    Ok(Ok(_)) => continue,
                    Err(_) => return None,
                }
            }
        })
    });
    let closes: Vec<tokio::task::JoinHandle<Option<Instant>>> = closes.collect();
    let metric = r#"meshfed_federation_connections_refused_total{reason="anonymous_limit"}"#;
    wait_fed_metric(&fed, metric, 8.0).await;
    // Calls with an SVID go on meanwhile (they hold no anonymous place): the
    // operator's status lists the joined site.
    assert!(operator_status(&fed).contains(&east.site));
    let mut early = 0;
    let mut timed = Vec::new();
    for c in closes {
        let at = c
            .await
            .unwrap()
            .expect("an anonymous connection held past 45 s");
        let after = at - started;
        if after < Duration::from_secs(10) {
            early += 1;
        } else {
            timed.push(after);
        }
    }
    assert_eq!(
        early, 8,
        "past 32 from one address, closed at once: {timed:?}"
    );
    assert_eq!(timed.len(), 32);
    assert!(
        timed.iter().all(|t| *t >= Duration::from_secs(29)),
        "{timed:?}"
    );
    assert_eq!(fed.metric(metric).await, 8.0);
    // The places are back: a site joins from the same address.
    let west = scratch.site("west", "west.example.org");
    assert_eq!(join(&west, "west", &fed.token("west", "1h")).0, 0);
}

/// One verified identity holds at most 256 connections to the federation (as at a
/// gateway, `a_peer_cannot_hold_unbounded_connections`); the next is closed after its
/// handshake and counted, other identities are untouched, and a slot comes back when a
/// connection ends. Before, a joined site could open connections without bound.
#[tokio::test(flavor = "multi_thread")]
async fn one_identity_holds_a_bounded_number_of_federation_connections() {
    use crate::federation::{Fed, joined};
    use tokio::io::AsyncReadExt;
    let scratch = Scratch::new("fed-per-id");
    let fed = Fed::start(&Fed::init(&scratch), 0);
    let [east] = joined(&scratch, &fed, ["east"]);
    let tls = {
        let certs = meshfed_gateway::origination::load_certs(&east.cert).unwrap();
        let key = meshfed_gateway::origination::load_key(&east.key).unwrap();
        let mut c = flood::no_verify_as(Some((certs, key))).unwrap();
        c.alpn_protocols = vec![b"h2".to_vec()];
        std::sync::Arc::new(c)
    };
    let addr: std::net::SocketAddr = fed.addr.parse().unwrap();
    let dial = || async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("federation").unwrap();
        tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .expect("a handshake as east")
    };
    let mut conns = Vec::new();
    for _ in 0..264 {
        conns.push(dial().await);
    }
    let metric =
        r#"meshfed_federation_connections_refused_total{reason="identity_connection_limit"}"#;
    wait_fed_metric(&fed, metric, 8.0).await;
    // Which ones were closed: a read that ends at once (the others get the server's
    // SETTINGS and then nothing).
    let reads = conns.into_iter().map(|mut c| {
        tokio::spawn(async move {
            let mut buf = [0u8; 256];
            loop {
                match tokio::time::timeout(Duration::from_secs(1), c.read(&mut buf)).await {
                    Ok(Ok(0) | Err(_)) => return None,
                    Ok(Ok(_)) => continue,
                    Err(_) => return Some(c),
                }
            }
        })
    });
    let reads: Vec<_> = reads.collect();
    let mut open = Vec::new();
    let mut closed = 0;
    for r in reads {
        match r.await.unwrap() {
            Some(c) => open.push(c),
            None => closed += 1,
        }
    }
    assert_eq!((closed, open.len()), (8, 256));
    // Another identity (the operator) is not held up.
    assert!(operator_status(&fed).contains(&east.site));
    // A slot comes back when a connection ends.
    open.truncate(250);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut fresh = dial().await;
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(2), fresh.read(&mut buf))
        .await
        .expect("served: the server's SETTINGS")
        .unwrap();
    assert!(n > 0);
    assert_eq!(fed.metric(metric).await, 8.0);
}
