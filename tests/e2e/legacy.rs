//! Legacy hosts registered ServiceEntry-style: exported by the registering site's
//! gateway, imported and reached from another site, live, with bad files losing nothing.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::federation::{Fed, join};
use crate::harness::*;

fn register(dir: &std::path::Path, file: &std::path::Path) -> (i32, String) {
    let out = Command::new(BIN)
        .args([
            "register",
            "-f",
            file.to_str().unwrap(),
            "--dir",
            dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_legacy_host_is_reachable_from_another_site() {
    let scratch = Scratch::new("legacy");
    let fed = Fed::start(&Fed::init(&scratch), 0);
    let east = scratch.site("east", "east.example.org");
    let west = scratch.site("west", "west.example.org");
    for (s, n) in [(&east, "east"), (&west, "west")] {
        assert_eq!(join(s, n, &fed.token(n, "1h")).0, 0);
    }
    let cfg = |s: &meshfed_gateway::lab::SiteFiles, ip: [u8; 4], dns: bool| {
        meshfed_gateway::lab::ConfigBuilder {
            federation: Some((s.dir.clone(), ip.into())),
            reload_interval: Some(RELOAD),
            dns: dns.then(|| "listen: 127.0.0.1:0".to_string()),
            ..Default::default()
        }
    };
    let _west_gw = Gw::start(&west, &cfg(&west, [127, 0, 0, 8], false)).unwrap();
    let east_gw = Gw::start(&east, &cfg(&east, [127, 0, 0, 9], true)).unwrap();

    // The legacy host: an echo server no meshfed runs on, registered at west.
    let legacy = echo_server().await;
    let svc_port = std::net::TcpListener::bind("127.0.0.9:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let entry = scratch.0.join("billing.yaml");
    std::fs::write(
        &entry,
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: billing\n  namespace: mainframe\nspec:\n  hosts: [billing.mainframe.example]\n  location: MESH_INTERNAL\n  ports:\n  - number: {svc_port}\n    name: tcp\n    protocol: TCP\n    targetPort: {}\n  resolution: STATIC\n  endpoints:\n  - address: {}\n",
            legacy.port(),
            legacy.ip()
        ),
    )
    .unwrap();
    let (code, err) = register(&west.dir, &entry);
    assert_eq!(code, 0, "{err}");

    // East imports it from the catalog and reaches the legacy host through both gateways.
    let import = std::net::SocketAddr::new([127, 0, 0, 9].into(), svc_port);
    let started = Instant::now();
    loop {
        if echo_once(import).await.is_ok() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never reachable:\n{}",
            east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "registered service reachable from east after {:?}",
        started.elapsed()
    );
    // Its MCS name resolves at east.
    let dns = east_gw.dns.unwrap();
    let out = Command::new("dig")
        .args([
            &format!("@{}", dns.ip()),
            "-p",
            &dns.port().to_string(),
            "+short",
            "billing.mainframe.svc.clusterset.local",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "127.0.0.9");
    // And so does its ServiceEntry host, at the importing site.
    let out = Command::new("dig")
        .args([
            &format!("@{}", dns.ip()),
            "-p",
            &dns.port().to_string(),
            "+short",
            "billing.mainframe.example",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "127.0.0.9");

    // A bad file is refused and what was registered keeps working.
    let bad = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/serviceentry/bad/bad-port.yaml"
    );
    let (code, err) = register(&west.dir, std::path::Path::new(bad));
    assert!(code == 1 && err.contains("spec.ports[1].number"), "{err}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    echo_once(import)
        .await
        .expect("still reachable after a refused file");
}
