//! A partition of one site from the federation (short form 10 s, full 2 min): east's
//! gateway runs in a network namespace whose nftables drop every packet to the
//! federation, while its peer links stay. East serves from its catalog (no call fails);
//! a service west registers during the partition reaches east within seconds of the
//! lift, by deltas from its revision, without a full snapshot.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::federation::{Fed, On, fed_config, joined};
use crate::harness::*;
use crate::netns::Netns;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_cut_from_the_federation_serves_and_resyncs_by_deltas() {
    let cut_for = super::pick(Duration::from_secs(10), Duration::from_secs(120));
    let ns = Netns::new("mfp", 3, 0);
    let (host, inner) = (ns.host.clone(), ns.inner.clone());
    let host_ip: std::net::IpAddr = host.parse().unwrap();
    let inner_ip: std::net::Ipv4Addr = inner.parse().unwrap();

    let scratch = Scratch::new("fault-partition");
    let fed = Fed::start_listening(
        &Fed::init(&scratch),
        0,
        "30s",
        On::Embedded,
        &format!("{host}:0"),
    );
    let fed_port: u16 = fed.addr.rsplit(':').next().unwrap().parse().unwrap();
    let [east, west] = joined(&scratch, &fed, ["east", "west"]);
    let echo = echo_server_at(host_ip).await;
    let port = listen().local_addr().unwrap().port();
    let late_port = listen().local_addr().unwrap().port();
    let _west_gw = Gw::start(
        &west,
        &meshfed_lab::ConfigBuilder {
            listen: Some(SocketAddr::new(host_ip, 0)),
            ..fed_config(&west, [127, 0, 0, 3])
        }
        .export("echo.demo", port, vec![echo]),
    )
    .unwrap();
    let inner_any: SocketAddr = format!("{inner}:0").parse().unwrap();
    let east_gw = Gw::start_in(
        &ns.wrapper(),
        &east,
        &meshfed_lab::ConfigBuilder {
            listen: Some(inner_any),
            admin: Some(inner_any),
            ..fed_config(&east, inner_ip.octets())
        },
    )
    .unwrap();
    let import = SocketAddr::new(inner_ip.into(), port);
    let deadline = Instant::now() + Duration::from_secs(15);
    while echo_once(import).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "east never imported echo.demo\n{}",
            east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Calls all along, 50 a second.
    let (calls, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let (calls, failed, stop) = (calls.clone(), failed.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Err(e) = echo_once(import).await {
                    eprintln!("call failed: {e}");
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                calls.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // The cut: every packet between east and the federation is dropped, both ways (no
    // reset: the session just goes quiet, as behind a broken router). Dropping only
    // east's packets let the federation's still reach east over the open watch until
    // east's keepalive gave up, so a delta could arrive through the cut.
    ns.nft(&format!(
        "table inet partition {{\n  chain output {{\n    type filter hook output priority 0; policy accept;\n    ip daddr {host} tcp dport {fed_port} drop\n  }}\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    ip saddr {host} tcp sport {fed_port} drop\n  }}\n}}\n"
    ));
    let watching_before = east_gw.logs().matches("watching the catalog").count();
    tokio::time::sleep(cut_for / 2).await;
    // West registers a service while east cannot hear of it.
    let entry = west.dir.join("late.yaml");
    std::fs::write(
        &entry,
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: late, namespace: demo}}\n\
             spec:\n  hosts: [late.demo.svc.cluster.local]\n  ports: [{{number: {late_port}, name: tcp, protocol: TCP}}]\n  \
             resolution: STATIC\n  endpoints: [{{address: {host}}}]\n"
        ),
    )
    .unwrap();
    let (code, out, err) = meshfed(&[
        "register",
        "-f",
        entry.to_str().unwrap(),
        "--dir",
        west.dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    tokio::time::sleep(cut_for / 2).await;
    let east_admin = east_gw.admin;
    let imported = || async move {
        crate::harness::http_get(east_admin, "/debug/imports")
            .await
            .unwrap_or_default()
            .contains("\"late.demo\"")
    };
    assert!(!imported().await, "east heard of late.demo through the cut");

    // The lift.
    ns.exec(&["nft", "delete", "table", "inet", "partition"]);
    let lifted = Instant::now();
    let deadline = lifted + Duration::from_secs(60);
    while !imported().await {
        assert!(
            Instant::now() < deadline,
            "east never resynced\n{}",
            east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resync = lifted.elapsed();
    stop.cancel();
    load.await.unwrap();
    // Any watch east started after the cut resumed from its revision.
    let logs = east_gw.logs();
    let snapshots = logs
        .lines()
        .filter(|l| l.contains("watching the catalog"))
        .skip(watching_before)
        .filter(|l| l.contains("snapshot=true"))
        .count();
    let (calls, failed) = (
        calls.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    super::figure("fault_partition_seconds", cut_for.as_secs());
    super::figure("fault_partition_requests", calls);
    super::figure("fault_partition_failed_requests", failed);
    super::figure("fault_partition_resync_ms", resync.as_millis());
    super::figure("fault_partition_full_snapshots", snapshots);
    assert_eq!(
        failed, 0,
        "{failed} of {calls} calls failed during the partition"
    );
    assert_eq!(snapshots, 0, "east resynced with a full snapshot:\n{logs}");
    assert!(resync < Duration::from_secs(30), "resync took {resync:?}");
}
