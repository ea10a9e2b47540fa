//! Federation replicas on a real etcd: one catalog served by several replicas, tokens
//! single-use across them, and a replica killed mid-watch with nothing lost or repeated.

use std::time::{Duration, Instant};

use meshfed_api::{change_from_pb, pb, reason_of};
use meshfed_catalog::catalog::{Catalog, Delta, Revision};
use meshfed_catalog::token::JoinToken;
use meshfed_lab::ConfigBuilder;

use crate::federation::{Fed, On, client, export, join, next_event, publish};
use crate::harness::*;

/// Applies a watch event; returns the deltas it carried (none for a snapshot).
pub(crate) fn apply(cat: &mut Catalog, ev: pb::WatchEvent) -> Vec<Delta> {
    if ev.snapshot {
        let mut fresh = Catalog::default();
        for c in ev.changes {
            let d = change_from_pb(c).unwrap();
            fresh
                .apply(&Delta {
                    revision: Revision(1),
                    change: d.change,
                })
                .unwrap();
        }
        fresh.revision = Revision(ev.revision);
        *cat = fresh;
        return vec![];
    }
    let base = cat.revision;
    let mut out = vec![];
    for c in ev.changes {
        let d = change_from_pb(c).unwrap();
        assert!(
            d.revision > base,
            "a delta at or before {base:?} was resent: {d:?}"
        );
        cat.apply(&d).unwrap();
        out.push(d);
    }
    out
}

/// Reads `s` until `cat` reaches `rev`, collecting the deltas.
async fn follow_until(
    s: &mut tonic::Streaming<pb::WatchFrame>,
    cat: &mut Catalog,
    rev: Revision,
    seq: &mut Vec<Delta>,
) {
    while cat.revision < rev {
        seq.extend(apply(cat, next_event(s).await));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_replicas_share_one_catalog_and_a_killed_replica_loses_no_delta() {
    let etcd = Etcd::start().await;
    let scratch = Scratch::new("etcdrep");
    let dir = Fed::init(&scratch);
    let on = On::Etcd(&etcd, "/rep/");
    let mut a = Fed::start_on(&dir, 0, "60s", on);
    let b = Fed::start_on(&Fed::replica_dir(&dir, "fed-b"), 1, "60s", on);
    let west = scratch.site("west", "west.example.org");
    let east = scratch.site("east", "east.example.org");

    // A token from either replica lists both.
    let tw = a.token("west", "1h");
    let decoded = JoinToken::decode(&tw).unwrap();
    assert!(
        decoded.addresses.contains(&a.addr) && decoded.addresses.contains(&b.addr),
        "{:?}",
        decoded.addresses
    );
    assert_eq!(join(&west, "west", &tw).0, 0);
    // Replayed at the other replica: still one use.
    let mut at_b = decoded.clone();
    at_b.addresses = vec![b.addr.clone()];
    let (code, err) = join(&west, "west", &at_b.encode());
    assert!(code == 1 && err.contains("token_reused"), "{err}");
    assert_eq!(join(&east, "east", &b.token("east", "1h")).0, 0);

    let mut west_b = client(&b, &west, &west.cert, &west.key).await;
    let mut east_a = client(&a, &east, &east.cert, &east.key).await;
    let mut east_b = client(&b, &east, &east.cert, &east.key).await;

    // A site may not publish for another, on etcd too; refused and counted.
    let s = publish(&mut west_b, "east", vec![export("evil.shop")])
        .await
        .unwrap_err();
    assert_eq!(reason_of(&s), Some("publish_foreign_site"), "{s:?}");
    assert_eq!(
        b.metric("meshfed_federation_refusals_total{reason=\"publish_foreign_site\"}")
            .await,
        1.0
    );

    // A reference watcher on B, and east watching on A, both from the same revision.
    let mut reference = Catalog::default();
    let mut ref_stream = east_b
        .watch(pb::WatchRequest {
            parts: false,
            from_revision: None,
            gateway_address: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    apply(&mut reference, next_event(&mut ref_stream).await);
    let r0 = reference.revision;
    assert!(reference.sites.len() == 2, "{reference:?}");
    let mut east_cat = reference.clone();
    let mut east_stream = east_a
        .watch(pb::WatchRequest {
            parts: false,
            from_revision: Some(r0.0),
            gateway_address: String::new(),
        })
        .await
        .unwrap()
        .into_inner();

    // West publishes a growing export set on B while A dies halfway.
    let publisher = tokio::spawn(async move {
        let mut last = 0;
        for i in 0..40 {
            let set = (0..=i).map(|j| export(&format!("svc{j}.shop"))).collect();
            last = publish(&mut west_b, "west", set).await.unwrap().revision;
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        last
    });
    let mut east_seq = vec![];
    let mut ref_seq = vec![];
    // Follow on A until it dies.
    let started = Instant::now();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(5), east_stream.message()).await;
        match ev {
            Ok(Ok(Some(ev))) => {
                let ev = meshfed_api::parts::event(ev).expect("changes decode");
                east_seq.extend(apply(&mut east_cat, ev));
                if east_seq.len() == 15 {
                    a.kill();
                }
            }
            Ok(Ok(None)) | Ok(Err(_)) => break, // A is gone
            Err(_) => panic!("no event from A in 5 s"),
        }
        assert!(started.elapsed() < Duration::from_secs(20));
    }
    assert!(east_seq.len() >= 15);
    // East moves to B and resumes from its revision: deltas, not a snapshot.
    let mut east_stream = east_b
        .watch(pb::WatchRequest {
            parts: false,
            from_revision: Some(east_cat.revision.0),
            gateway_address: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let ev = next_event(&mut east_stream).await;
    assert!(
        !ev.snapshot,
        "resuming on another replica needed a full resync"
    );
    east_seq.extend(apply(&mut east_cat, ev));

    let last = Revision(publisher.await.unwrap());
    follow_until(&mut east_stream, &mut east_cat, last, &mut east_seq).await;
    follow_until(&mut ref_stream, &mut reference, last, &mut ref_seq).await;
    assert_eq!(
        east_seq, ref_seq,
        "east saw exactly the reference's deltas, across the replica's death"
    );
    assert_eq!(
        east_seq
            .iter()
            .filter(|d| matches!(d.change, meshfed_catalog::Change::PutExport { .. }))
            .count(),
        40,
        "one delta per publish"
    );
    // And a fresh snapshot from B is the catalog east built.
    let mut fresh = Catalog::default();
    let mut s = east_b
        .watch(pb::WatchRequest {
            parts: false,
            from_revision: None,
            gateway_address: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    apply(&mut fresh, next_event(&mut s).await);
    assert_eq!(fresh.revision, east_cat.revision);
    assert_eq!(fresh, east_cat);
    assert_eq!(east_cat.exports.len(), 40);
}

/// `meshfed federation serve` on `etcd` with `extra` flags; Ok once it serves, Err with
/// its log if it exits first.
fn serve_on_etcd(
    dir: &std::path::Path,
    etcd: &Etcd,
    extra: &[String],
) -> Result<std::process::Child, String> {
    let _ = std::fs::remove_file(dir.join("address"));
    let log = dir.join("serve-tls.log");
    let mut args = vec![
        "federation".to_owned(),
        "serve".into(),
        "--dir".into(),
        dir.display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--admin".into(),
        "127.0.0.1:0".into(),
        "--etcd".into(),
        etcd.endpoint.clone(),
    ];
    args.extend(extra.iter().cloned());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = spawn_meshfed(&argv, &log).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if dir.join("address").exists() {
            return Ok(child);
        }
        if let Ok(Some(_)) = child.try_wait() {
            return Err(std::fs::read_to_string(&log).unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "neither served nor failed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The etcd store over TLS with client certificates (etcd `--client-cert-auth`), and with
/// etcd users: before, it spoke plaintext only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_client_certificates_and_users() {
    let scratch = Scratch::new("etcdtls");
    let tls = EtcdTls::make(&scratch.0.join("etcd-pki"));
    let etcd = Etcd::start_tls(&tls).await;
    let dir = Fed::init(&scratch);
    let ca = format!("--etcd-ca={}", tls.ca.display());
    let cert = format!("--etcd-cert={}", tls.client_cert.display());
    let key = format!("--etcd-key={}", tls.client_key.display());

    // Without a client certificate etcd refuses the connection, and serve says so.
    let log = serve_on_etcd(&dir, &etcd, std::slice::from_ref(&ca)).unwrap_err();
    assert!(log.contains("etcd"), "{log}");
    // Without the CA, https:// is refused before any connection.
    let log = serve_on_etcd(&dir, &etcd, &[cert.clone(), key.clone()]).unwrap_err();
    assert!(log.contains("--etcd-ca"), "{log}");

    // With both it serves, and a site joins through it.
    let mut child = serve_on_etcd(&dir, &etcd, &[ca.clone(), cert.clone(), key.clone()])
        .unwrap_or_else(|log| panic!("did not serve over TLS:\n{log}"));
    let fed = Fed::attach(&dir);
    let [_west] = crate::federation::joined(&scratch, &fed, ["west"]);
    let _ = child.kill();
    let _ = child.wait();

    // etcd users: enable auth (root), then the federation must log in.
    {
        let pem = |p: &std::path::Path| std::fs::read(p).unwrap();
        let opts = etcd_client::ConnectOptions::new().with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(pem(&tls.ca)))
                .identity(etcd_client::Identity::from_pem(
                    pem(&tls.client_cert),
                    pem(&tls.client_key),
                )),
        );
        let mut c = etcd_client::Client::connect([etcd.endpoint.as_str()], Some(opts))
            .await
            .unwrap();
        c.user_add("root", "s3cret-root", None).await.unwrap();
        c.user_grant_role("root", "root").await.unwrap();
        c.auth_enable().await.unwrap();
    }
    let pw = scratch.0.join("etcd-password");
    std::fs::write(&pw, "wrong\n").unwrap();
    let user = [
        "--etcd-user=root".to_owned(),
        format!("--etcd-password-file={}", pw.display()),
    ];
    let mut args = vec![ca.clone(), cert.clone(), key.clone()];
    args.extend(user.iter().cloned());
    let log = serve_on_etcd(&dir, &etcd, &args).unwrap_err();
    assert!(
        log.contains("etcd") && log.to_lowercase().contains("auth"),
        "{log}"
    );
    std::fs::write(&pw, "s3cret-root\n").unwrap();
    let mut child = serve_on_etcd(&dir, &etcd, &args)
        .unwrap_or_else(|log| panic!("did not serve as etcd user root:\n{log}"));
    let fed = Fed::attach(&dir);
    let [_east] = crate::federation::joined(&scratch, &fed, ["east"]);
    let _ = child.kill();
    let _ = child.wait();
}

/// Issue 15 §4: a site learns, on its Bundles stream, a federation replica added after
/// it joined, keeps it in `federation.json`, and reaches it when the replica it joined
/// through dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_learns_a_replica_added_after_it_joined_and_moves_to_it() {
    let etcd = Etcd::start().await;
    let scratch = Scratch::new("etcd-learn");
    let dir = Fed::init(&scratch);
    let on = On::Etcd(&etcd, "/learn/");
    let mut a = Fed::start_on(&dir, 0, "60s", on);
    let east = scratch.site("east", "east.example.org");
    assert_eq!(join(&east, "east", &a.token("east", "1h")).0, 0);
    let known = || {
        let m: meshfed_catalog::site::Membership =
            serde_json::from_slice(&std::fs::read(east.dir.join("federation.json")).unwrap())
                .unwrap();
        m.addresses
    };
    assert_eq!(known(), vec![a.addr.clone()], "only A existed at the join");
    let cfg = ConfigBuilder {
        federation: Some((east.dir.clone(), [127, 0, 0, 1].into())),
        reload_interval: Some(RELOAD),
        ..Default::default()
    };
    let _east_gw = Gw::start(&east, &cfg).expect("east gateway");

    // Replica B joins the federation after east did; east's gateway hears of it.
    let b = Fed::start_on(&Fed::replica_dir(&dir, "fed-b"), 1, "60s", on);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !known().contains(&b.addr) {
        assert!(
            Instant::now() < deadline,
            "east never learned B: {:?}",
            known()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(known().contains(&a.addr));

    // A dies: east's gateway watches the catalog on B.
    a.kill();
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.metric("meshfed_federation_watchers").await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "east never reached B after A died"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A replica is ready only while it follows etcd: `kill -9` etcd and `/ready` turns
/// false with the reason; etcd back on its data, and the replica is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_is_unready_while_etcd_is_down() {
    let mut etcd = Etcd::start().await;
    let scratch = Scratch::new("etcdready");
    let dir = Fed::init(&scratch);
    let fed = Fed::start_on(&dir, 0, "60s", On::Etcd(&etcd, "/ready/"));
    fed.wait_ready(200, Duration::from_secs(5)).await;
    etcd.kill();
    let body = fed.wait_ready(503, Duration::from_secs(10)).await;
    assert!(body.contains("etcd watch broken"), "{body}");
    etcd.restart().await;
    fed.wait_ready(200, Duration::from_secs(20)).await;
}

/// Issue 16 §4 on etcd: a gateway address stays in its site's list while a stream that
/// names it is open on any federation replica, and leaves once none is, whichever
/// replica saw it. Before, a replica dropped only addresses it had tracked itself, so
/// the address `site join` recorded (which no gateway names) stayed forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_addresses_live_by_leases_held_on_any_replica() {
    let etcd = Etcd::start().await;
    let scratch = Scratch::new("etcd-addrs");
    let dir = Fed::init(&scratch);
    let on = On::Etcd(&etcd, "/addrs/");
    let a = Fed::start_on(&dir, 0, "2s", on);
    let b = Fed::start_on(&Fed::replica_dir(&dir, "fed-b"), 1, "2s", on);
    let west = scratch.site("west", "west.example.org");
    assert_eq!(join(&west, "west", &a.token("west", "1h")).0, 0);
    let mut at_a = client(&a, &west, &west.cert, &west.key).await;
    let mut at_b = client(&b, &west, &west.cert, &west.key).await;
    let watch = |address: &str| pb::WatchRequest {
        parts: false,
        from_revision: None,
        gateway_address: address.into(),
    };
    let _on_a = at_a.watch(watch("127.0.0.1:20001")).await.unwrap();
    let on_b = at_b.watch(watch("127.0.0.1:20002")).await.unwrap();
    // What a peer reads: the site's addresses in a fresh snapshot from A.
    let mut reader = at_a.clone();
    let mut addresses = async || {
        let mut s = reader.watch(watch("")).await.unwrap().into_inner();
        let mut cat = Catalog::default();
        apply(&mut cat, next_event(&mut s).await);
        let site = meshfed_catalog::names::SiteName::new("west").unwrap();
        let mut v = cat.sites[&site].gateway_addresses.clone();
        v.sort();
        v
    };
    let both = vec!["127.0.0.1:20001".to_owned(), "127.0.0.1:20002".to_owned()];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = addresses().await;
        if now == both {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the join-time address did not leave: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Stable for two TTLs: neither replica drops the address the other holds.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert_eq!(addresses().await, both);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The replica on B goes: its address leaves, though A never tracked it.
    drop(on_b);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = addresses().await;
        if now == ["127.0.0.1:20001"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B's closed replica stayed: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A replica that starts on an etcd with a large recent history catches up by a watch
/// whose first response carries up to 1000 revisions: 1200 revisions of 8 KiB each are
/// about 8 MiB in that response. Before, the store took at most tonic's default 4 MiB
/// from etcd, its watch broke on that response at every retry, and the replica gave up
/// ("register replica: not visible after 10s"); the scale bench's federation restart
/// after a burst of endpoint changes failed so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_starts_on_an_etcd_with_a_large_recent_history() {
    let etcd = Etcd::start().await;
    let mut c = etcd_client::Client::connect([etcd.endpoint.as_str()], None)
        .await
        .unwrap();
    // Under the federation's prefix, where it ignores what it does not know (a warning).
    let value = "x".repeat(8 << 10);
    for i in 0..1200 {
        c.put(format!("/large/other/{i}"), value.as_str(), None)
            .await
            .unwrap();
    }
    let scratch = Scratch::new("etcdlarge");
    let dir = Fed::init(&scratch);
    let fed = Fed::start_on(&dir, 0, "60s", On::Etcd(&etcd, "/large/"));
    fed.wait_ready(200, Duration::from_secs(20)).await;
    let log = std::fs::read_to_string(dir.join("serve-0.log")).unwrap_or_default();
    assert!(!log.contains("etcd watch broke"), "{log}");
}

/// The harness itself: an etcd whose port another process holds for a moment (as a
/// parallel test's free-port check does) is started again until it binds, not failed
/// (a CI run once failed that way). Failed with the retries off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_starts_etcd_again_when_its_port_was_held_for_a_moment() {
    let mut etcd = Etcd::start().await;
    etcd.kill();
    let port: u16 = etcd.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let held = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(500));
        drop(held);
    });
    etcd.restart().await;
    let mut c = etcd_client::Client::connect([etcd.endpoint.as_str()], None)
        .await
        .unwrap();
    c.put("k", "v", None).await.unwrap();
}

/// The same for a member of a three-member cluster (the fault suite's): a member
/// restarted while its client port is held for a moment is started again until it
/// binds, and the cluster serves through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_starts_a_cluster_member_again_when_its_port_was_held_for_a_moment() {
    let mut cluster = crate::harness::EtcdCluster::start(3).await;
    cluster.kill(0);
    let endpoint = cluster.members[0].endpoint.clone();
    let port: u16 = endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let held = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        drop(held);
    });
    cluster.restart(0);
    cluster.wait_serving().await;
    // The restarted member itself serves (the wait above is satisfied by any member).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut c) = etcd_client::Client::connect([endpoint.as_str()], None).await
            && c.put("k", "v", None).await.is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted member did not serve"
        );
        cluster.wait_serving().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
