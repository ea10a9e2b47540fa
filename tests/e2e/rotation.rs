//! Trust-anchor and SVID rotation with no restart of the gateway that rotates or of the
//! gateway that trusts it.

use std::time::{Duration, Instant};

use meshfed_identity::{Ca, TrustBundle, TrustDomain};
use meshfed_lab::ConfigBuilder;

use crate::harness::*;

/// A fresh handshake to west with east's identity, trusting only `west_bundle` for
/// west's trust domain.
async fn handshake(s: &TwoSites, west_bundle: TrustBundle) -> Result<(), String> {
    let conn = quic_as_east(s, west_bundle).await?;
    // TLS 1.3: the server's verdict on our certificate arrives after the client finishes.
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(&[0, 2, 9, 9])
        .await
        .map_err(|e| e.to_string())?;
    meshfed_gateway::tunnel::read_header(&mut recv)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Waits until the gateway has counted `n` reloads of `key`'s kind.
async fn reloaded(gw: &Gw, key: &str, n: f64) {
    let got = gw.wait_metric(key, n, Duration::from_secs(5)).await;
    assert!(got >= n, "{key}: {got} reloads, wanted {n}");
}

fn write_bundle(path: &std::path::Path, b: &TrustBundle) {
    meshfed_identity::ca::write_file(path, b.to_jwks().unwrap().as_bytes(), 0o644).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_anchor_and_svid_rotate_without_restart() {
    let echo = echo_server().await;
    let mut s = TwoSites::start(
        "rotate",
        &[("echo.demo", 7000, vec![echo])],
        &[("echo.demo", 7000)],
    )
    .await;
    let addr = s.east_gw.import("echo.demo:7000");
    echo_once(addr).await.unwrap();

    let td = TrustDomain::new("west.example.org").unwrap();
    let old_ca = Ca::load(&s.west.dir.join("ca")).unwrap();
    let new_ca = Ca::generate(&td, Duration::from_secs(86400)).unwrap();
    let only_new = new_ca.bundle(9);
    let e = handshake(&s, only_new.clone()).await.unwrap_err();
    assert!(
        e.contains("UntrustedChain"),
        "west still presents the old SVID: {e}"
    );

    // 1. Both gateways learn the new anchor beside the old one.
    let both = TrustBundle::new(
        td.clone(),
        vec![old_ca.cert().clone(), new_ca.cert().clone()],
        2,
    );
    write_bundle(&s.west.bundle, &both);
    let key = r#"meshfed_gateway_identity_reloads_total{what="bundles",result="ok"}"#;
    reloaded(&s.west_gw, key, 1.0).await;
    reloaded(&s.east_gw, key, 1.0).await;

    // 2. West's gateway SVID is reissued by the new CA.
    let svid = new_ca.issue(&s.west.id, Duration::from_secs(3600)).unwrap();
    svid.save(&s.west.cert, &s.west.key).unwrap();
    let key = r#"meshfed_gateway_identity_reloads_total{what="svid",result="ok"}"#;
    reloaded(&s.west_gw, key, 1.0).await;
    handshake(&s, only_new.clone())
        .await
        .expect("a new handshake gets the new SVID");
    echo_once(addr)
        .await
        .expect("the established connection carries on");

    // 3. The old anchor is retired everywhere.
    write_bundle(&s.west.bundle, &new_ca.bundle(3));
    let key = r#"meshfed_gateway_identity_reloads_total{what="bundles",result="ok"}"#;
    reloaded(&s.east_gw, key, 2.0).await;
    reloaded(&s.west_gw, key, 2.0).await;
    let e = handshake(&s, old_ca.bundle(1)).await.unwrap_err();
    assert!(e.contains("UntrustedChain"), "{e}");

    // 4. East, never restarted, must now verify west's new certificate against the
    //    bundle it reloaded: restart west (same port) so east has to handshake again.
    let port = s.west_gw.quic;
    s.west_gw.kill();
    let cfg = ConfigBuilder {
        listen: Some(port),
        reload_interval: Some(RELOAD),
        ..Default::default()
    }
    .peer(&s.east, None)
    .export("echo.demo", 7000, vec![echo]);
    let _west = Gw::start(&s.west, &cfg).unwrap();
    let started = Instant::now();
    while let Err(e) = echo_once(addr).await {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "east did not accept west's rotated SVID: {e}\n{}",
            s.east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        s.east_gw
            .metric(r#"meshfed_gateway_handshake_failures_total{reason="untrusted_chain"}"#)
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_rotation_keeps_the_working_identity() {
    let echo = echo_server().await;
    let s = TwoSites::start(
        "badrotate",
        &[("echo.demo", 7000, vec![echo])],
        &[("echo.demo", 7000)],
    )
    .await;
    let addr = s.east_gw.import("echo.demo:7000");
    // An SVID for another identity, and a bundle file that is not JSON.
    let ca = Ca::load(&s.west.dir.join("ca")).unwrap();
    let other = meshfed_identity::SpiffeId::new("spiffe://west.example.org/ns/x/sa/y").unwrap();
    ca.issue(&other, Duration::from_secs(3600))
        .unwrap()
        .save(&s.west.cert, &s.west.key)
        .unwrap();
    std::fs::write(&s.west.bundle, b"{ not json").unwrap();
    let key = r#"meshfed_gateway_identity_reloads_total{what="svid",result="error"}"#;
    reloaded(&s.west_gw, key, 1.0).await;
    let key = r#"meshfed_gateway_identity_reloads_total{what="bundles",result="error"}"#;
    reloaded(&s.west_gw, key, 1.0).await;
    let logs = s.west_gw.logs();
    assert!(
        logs.contains("is not this gateway's spiffe://west.example.org/meshfed/site/west/gateway"),
        "{logs}"
    );
    assert!(logs.contains("not valid JSON"), "{logs}");
    // Still serving with what it had.
    handshake(&s, ca.bundle(1))
        .await
        .expect("west still presents its valid SVID");
    echo_once(addr).await.unwrap();
}
