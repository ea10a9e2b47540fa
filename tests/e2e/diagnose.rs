//! `meshfed diagnose` against real sites, each failure class made real: a healthy call,
//! a name nobody exports, an endpoint that is not listening, an export closed to this
//! site, trust withdrawn from the far site's gateway, and a site whose lease expired.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use meshfed_lab::SiteFiles;

use crate::federation::{Fed, On, banner_server, fed_config, free_port, joined, wait_answer};
use crate::harness::*;

/// `meshfed diagnose TARGET --json` at `site`: exit code and report.
fn diagnose(site: &SiteFiles, gw: &Gw, target: &str) -> (i32, serde_json::Value) {
    let mut cmd = Command::new(BIN);
    cmd.args(["diagnose", target, "--json", "--config"])
        .arg(site.dir.join("gateway.yaml"))
        .args(["--admin", &gw.admin.to_string()]);
    if let Some(dns) = gw.dns {
        cmd.args(["--dns", &dns.to_string()]);
    }
    let out = cmd.output().unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not a report ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

/// The first failing step: (number, name, site).
fn first_fail(r: &serde_json::Value) -> Option<(u64, String, Option<String>)> {
    r["steps"].as_array().unwrap().iter().find_map(|s| {
        (s["verdict"] == "fail").then(|| {
            (
                s["step"].as_u64().unwrap(),
                s["name"].as_str().unwrap().to_owned(),
                s["site"].as_str().map(str::to_owned),
            )
        })
    })
}

/// Runs `diagnose` until its first failure is `want` (the far side's state takes a
/// moment to reach this site), and returns the report.
async fn until(
    site: &SiteFiles,
    gw: &Gw,
    target: &str,
    want: Option<(u64, &str, Option<&str>)>,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, r) = diagnose(site, gw, target);
        let got = first_fail(&r);
        let matches = got.as_ref().map(|(n, s, x)| (*n, s.as_str(), x.as_deref())) == want;
        if matches {
            assert_eq!(code == 0, r["succeeds"] == true, "{r:#}");
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "wanted {want:?}, got {got:?}: {r:#}\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnose_names_each_failure_class() {
    let scratch = Scratch::new("diagnose");
    let dir = Fed::init(&scratch);
    let _fed = Fed::start_on(&dir, 0, "2s", On::Embedded);
    let [east, west] = joined(&scratch, &_fed, ["east", "west"]);
    let import_ip: std::net::IpAddr = [127, 0, 0, 2].into();
    let port = free_port(import_ip);
    let (gone_port, private_port) = (free_port(import_ip), free_port(import_ip));
    // An endpoint address nothing listens on.
    let closed: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let west_cfg = fed_config(&west, [127, 0, 0, 3])
        .export("web.demo", port, vec![banner_server("west").await])
        .export("gone.demo", gone_port, vec![closed])
        .export_to(
            "private.demo",
            private_port,
            vec![banner_server("west").await],
            vec![
                meshfed_identity::SpiffeId::new(
                    "spiffe://north.example.org/meshfed/site/north/gateway",
                )
                .unwrap(),
            ],
        );
    let mut west_gw = Gw::start(&west, &west_cfg).unwrap();
    let dns_port = free_port([127, 0, 0, 1].into());
    let mut east_cfg = fed_config(&east, [127, 0, 0, 2]);
    east_cfg.dns = Some(format!("listen: 127.0.0.1:{dns_port}"));
    let east_gw = Gw::start(&east, &east_cfg).unwrap();
    let import = SocketAddr::new(import_ip, port);
    wait_answer(import, "west:ping", &east_gw).await;
    let web = format!("web.demo:{port}");

    // Healthy: every step passes, exit 0, through west.
    let r = until(&east, &east_gw, &web, None).await;
    assert_eq!(r["through"], "west", "{r:#}");
    let names: Vec<&str> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["dns", "import", "lease", "link", "open", "endpoints"],
        "{r:#}"
    );
    // The text form, for people.
    let out = Command::new(BIN)
        .args(["diagnose", &web, "--config"])
        .arg(east.dir.join("gateway.yaml"))
        .args([
            "--admin",
            &east_gw.admin.to_string(),
            "--dns",
            &east_gw.dns.unwrap().to_string(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("verdict: a call succeeds now, through west"),
        "{text}"
    );

    // The probe reaches no further than the imports, and says how to ask.
    for (path, status) in [
        (
            format!("/debug/probe?service=nope.demo&port={port}&site=west"),
            404,
        ),
        ("/debug/probe?service=web.demo".to_string(), 400),
        ("/debug/probe?%00%ff=&&&".to_string(), 400),
    ] {
        let (got, body) = meshfed_lifecycle::admin::get(east_gw.admin, &path)
            .await
            .unwrap();
        assert_eq!(got.as_u16(), status, "{path}: {body}");
    }

    // A name nobody exports: no DNS answer because it is not imported.
    let r = until(
        &east,
        &east_gw,
        &format!("nope.demo:{port}"),
        Some((1, "dns", None)),
    )
    .await;
    assert!(
        r["steps"][0]["fix"].as_str().unwrap().contains("step 2"),
        "{r:#}"
    );
    assert!(
        r["first_fix"].as_str().unwrap().starts_with("export it"),
        "{r:#}"
    );
    let import_step = &r["steps"][1];
    assert_eq!(import_step["verdict"], "fail", "{r:#}");
    assert!(
        import_step["detail"]
            .as_str()
            .unwrap()
            .contains("no site exports nope.demo"),
        "{r:#}"
    );

    // The endpoint is not listening: the far gateway cannot connect.
    let r = until(
        &east,
        &east_gw,
        &format!("gone.demo:{gone_port}"),
        Some((6, "endpoints", Some("west"))),
    )
    .await;
    assert!(r.to_string().contains("endpoint_connect_failed"), "{r:#}");

    // Exported only to north: west refuses east, typed.
    let r = until(
        &east,
        &east_gw,
        &format!("private.demo:{private_port}"),
        Some((5, "open", Some("west"))),
    )
    .await;
    assert!(r.to_string().contains("not_exported_to_peer"), "{r:#}");
    assert!(
        r["first_fix"].as_str().unwrap().contains("add east"),
        "{r:#}"
    );

    // Trust withdrawn: west's trust domain moves to a new CA (the federation hands every
    // site the new bundle, without the old CA) while west's gateway restarts on its old
    // SVID: east refuses it at the handshake, and the link step says why.
    let new_ca = scratch.0.join("west-new-ca");
    let bundle_of = |ca: &std::path::Path, seq: &str, name: &str| {
        let (code, jwks, err) = meshfed(&[
            "bundle",
            "export",
            "--ca",
            ca.to_str().unwrap(),
            "--sequence",
            seq,
        ]);
        assert_eq!(code, 0, "{err}");
        let file = scratch.0.join(name);
        std::fs::write(&file, jwks).unwrap();
        file
    };
    let update = |file: &std::path::Path| {
        let (code, out, err) = meshfed(&[
            "site",
            "update-bundle",
            "--dir",
            west.dir.to_str().unwrap(),
            "--bundle",
            file.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{out}{err}");
    };
    let (code, _, err) = meshfed(&[
        "ca",
        "init",
        "--trust-domain",
        "west.example.org",
        "--out",
        new_ca.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    update(&bundle_of(&new_ca, "2", "west-new.json"));
    // Live connections keep going across a rotation; east's gateway restarts, so its
    // next handshake with west meets the new bundle.
    let east_bundle = east.dir.join("bundles/west.example.org.json");
    let deadline = Instant::now() + Duration::from_secs(15);
    let sequence = || {
        std::fs::read(&east_bundle)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["spiffe_sequence"].as_u64())
    };
    while sequence() != Some(2) {
        assert!(
            Instant::now() < deadline,
            "east never got west's new bundle"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut east_gw = east_gw;
    assert!(
        east_gw.term_and_wait(Duration::from_secs(15)).await,
        "east did not drain"
    );
    drop(east_gw);
    let east_gw = Gw::start(&east, &east_cfg).unwrap();
    let r = until(&east, &east_gw, &web, Some((4, "link", Some("west")))).await;
    eprintln!("trust withdrawn: {}", r["steps"][3]["detail"]);
    // (West cannot take it back with its old SVID: the federation now refuses it too.)

    // West's gateway dies: once its lease expires, the import has no backend and the
    // lease step names west.
    west_gw.kill();
    let r = until(&east, &east_gw, &web, Some((2, "import", None))).await;
    let lease = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "lease")
        .cloned()
        .unwrap_or_else(|| panic!("no lease step: {r:#}"));
    assert_eq!(
        (lease["verdict"].as_str(), lease["site"].as_str()),
        (Some("fail"), Some("west")),
        "{r:#}"
    );
    assert!(
        r["first_fix"]
            .as_str()
            .unwrap()
            .contains("west's gateway is not watching"),
        "{r:#}"
    );
}
