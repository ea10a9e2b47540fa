//! etcd members killed under a publish load: a 3-member etcd cluster, two federation
//! replicas on it, a site publishing a growing export set through both replicas as fast
//! as they acknowledge, and a watcher on each replica (resuming by revision if its
//! stream breaks, as a gateway does). The etcd leader is killed (`kill -9`); once
//! publishes are acknowledged again and for a phase more, a second member: the cluster
//! loses its quorum and publishes fail (never acknowledged) until that member is back. Then: every acknowledged publish is
//! in etcd and in both watchers' catalogs, and each watcher's export deltas are exactly
//! etcd's own export history after its snapshot (the same revisions, none missing, none
//! extra), with no snapshot after the first: the watches resumed gap-free.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshfed_api::{change_from_pb, pb};
use meshfed_catalog::catalog::{Catalog, Change, Revision};

use crate::etcd::apply;
use crate::federation::{Fed, On, client, export, join};
use crate::harness::*;

const PREFIX: &str = "/members/";

/// What one watcher saw: its catalog, the revisions of its export deltas, and how many
/// snapshots it was sent (1 when nothing was ever missed).
#[derive(Default)]
struct Seen {
    catalog: Catalog,
    export_revisions: BTreeSet<u64>,
    snapshots: usize,
    /// The revision of its first snapshot: etcd's history after it must all arrive.
    since: u64,
    reconnects: usize,
}

fn watcher(
    mut c: pb::federation_client::FederationClient<tonic::transport::Channel>,
    stop: Arc<AtomicBool>,
) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let out = seen.clone();
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let from = {
                let s = seen.lock().unwrap();
                (s.snapshots > 0).then_some(s.catalog.revision.0)
            };
            let req = pb::WatchRequest {
                parts: false,
                from_revision: from,
                gateway_address: String::new(),
            };
            let mut stream = match c.watch(req).await {
                Ok(s) => s.into_inner(),
                Err(_) => {
                    seen.lock().unwrap().reconnects += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            loop {
                let ev = tokio::select! {
                    m = stream.message() => m,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {
                        if stop.load(Ordering::Relaxed) { return; }
                        continue;
                    }
                };
                let Ok(Some(ev)) = ev else {
                    seen.lock().unwrap().reconnects += 1;
                    break;
                };
                let ev = meshfed_api::parts::event(ev).expect("changes decode");
                let mut s = seen.lock().unwrap();
                if ev.snapshot {
                    s.snapshots += 1;
                    if s.snapshots == 1 {
                        s.since = ev.revision;
                    }
                }
                for c in &ev.changes {
                    if let Ok(d) = change_from_pb(c.clone())
                        && !ev.snapshot
                        && matches!(
                            d.change,
                            Change::PutExport { .. } | Change::DeleteExport { .. }
                        )
                    {
                        s.export_revisions.insert(d.revision.0);
                    }
                }
                apply(&mut s.catalog, ev);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_members_killed_under_publishes_lose_no_acknowledged_write() {
    let phase = super::pick(Duration::from_secs(3), Duration::from_secs(20));
    let mut cluster = EtcdCluster::start(3).await;
    let endpoints = cluster.endpoints();
    let scratch = Scratch::new("fault-etcd-members");
    let dir = Fed::init(&scratch);
    let on = On::Endpoints(&endpoints, PREFIX);
    let a = Fed::start_on(&dir, 0, "30s", on);
    let b = Fed::start_on(&Fed::replica_dir(&dir, "fed-b"), 1, "30s", on);
    let west = scratch.site("west", "west.example.org");
    assert_eq!(join(&west, "west", &a.token("west", "1h")).0, 0);
    let at = [
        client(&a, &west, &west.cert, &west.key).await,
        client(&b, &west, &west.cert, &west.key).await,
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let watchers = [
        watcher(at[0].clone(), stop.clone()),
        watcher(at[1].clone(), stop.clone()),
    ];

    // The load: publish {svc-0 .. svc-k} for k = 0, 1, 2, ... through A and B in turn;
    // an acknowledged k is recorded with when it was acknowledged.
    let acked: Arc<Mutex<Vec<(usize, Instant)>>> = Arc::default();
    let failed = Arc::new(Mutex::new(0usize));
    let load = {
        let (acked, failed, stop, at) = (acked.clone(), failed.clone(), stop.clone(), at.clone());
        tokio::spawn(async move {
            let mut k = 0usize;
            let mut at = at;
            while !stop.load(Ordering::Relaxed) {
                let exports = (0..=k).map(|i| export(&format!("svc-{i}.load"))).collect();
                let req = pb::PublishRequest {
                    site: "west".into(),
                    exports,
                    gateway_addresses: vec![],
                    outbound_only: false,
                };
                let c = &mut at[k % 2];
                match tokio::time::timeout(Duration::from_secs(5), c.publish(req)).await {
                    Ok(Ok(_)) => {
                        acked.lock().unwrap().push((k, Instant::now()));
                        k += 1;
                    }
                    _ => {
                        *failed.lock().unwrap() += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    tokio::time::sleep(phase).await;
    let leader = cluster.leader().await.expect("a leader");
    let acked_before = acked.lock().unwrap().len();
    cluster.kill(leader);
    let first_kill = Instant::now();
    // The other two elect a leader and publishes resume: wait for that, then for a
    // phase of publishing on two members.
    let deadline = first_kill + Duration::from_secs(30);
    while acked.lock().unwrap().len() == acked_before {
        assert!(
            Instant::now() < deadline,
            "no publish acknowledged within 30 s of the leader's death"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(phase).await;
    let other = (leader + 1) % 3;
    eprintln!(
        "killed the leader {} ({}), now {} ({})",
        cluster.members[leader].name,
        cluster.members[leader].endpoint,
        cluster.members[other].name,
        cluster.members[other].endpoint
    );
    cluster.kill(other);
    let second_kill = Instant::now();
    tokio::time::sleep(phase).await;
    let restarted = Instant::now();
    cluster.restart(other);
    cluster.wait_serving().await;
    let quorum_back = Instant::now();
    tokio::time::sleep(phase).await;
    cluster.restart(leader);
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();

    let acked = acked.lock().unwrap().clone();
    let failed = *failed.lock().unwrap();
    let first_after = |t: Instant| {
        acked
            .iter()
            .find(|(_, at)| *at > t)
            .map(|(_, at)| at.duration_since(t))
    };
    let after_leader =
        first_after(first_kill).expect("no publish acknowledged after the leader died");
    let after_quorum =
        first_after(quorum_back).expect("no publish acknowledged after the quorum came back");
    // (An answer already on its way when the member died may land just after.)
    let in_quorum_loss = acked
        .iter()
        .filter(|(_, t)| *t > second_kill + Duration::from_millis(300) && *t < restarted)
        .count();
    let last = acked.last().expect("publishes acknowledged").0;

    // etcd's own export history and state, read directly through one member that
    // serves (the restarted one may still be starting).
    let exports_prefix = format!("{PREFIX}exports/west/");
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut etcd, state) = 'read: loop {
        for e in endpoints.split(',') {
            if let Ok(mut c) = etcd_client::Client::connect([e], None).await
                && let Ok(r) = c
                    .get(
                        exports_prefix.as_str(),
                        Some(etcd_client::GetOptions::new().with_prefix()),
                    )
                    .await
            {
                break 'read (c, r);
            }
        }
        assert!(Instant::now() < deadline, "no etcd member serves reads");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let in_etcd: BTreeSet<String> = state
        .kvs()
        .iter()
        .map(|kv| {
            String::from_utf8_lossy(kv.key())
                .trim_start_matches(&exports_prefix)
                .to_owned()
        })
        .collect();
    let lost: Vec<usize> = (0..=last)
        .filter(|i| !in_etcd.contains(&format!("svc-{i}.load")))
        .collect();
    let head = state.header().map_or(0, |h| h.revision()) as u64;
    let last_export = state
        .kvs()
        .iter()
        .map(|kv| kv.mod_revision())
        .max()
        .unwrap_or(0);
    let since = watchers
        .iter()
        .map(|w| w.lock().unwrap().since)
        .min()
        .unwrap();
    let mut history = etcd
        .watch(
            exports_prefix.as_str(),
            Some(
                etcd_client::WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(since as i64 + 1),
            ),
        )
        .await
        .unwrap();
    let mut etcd_revisions = BTreeSet::new();
    while etcd_revisions.last().copied().unwrap_or(0) < last_export as u64 {
        let r = tokio::time::timeout(Duration::from_secs(10), history.message())
            .await
            .expect("etcd's history in time")
            .unwrap()
            .expect("etcd's history");
        etcd_revisions.extend(
            r.events()
                .iter()
                .filter_map(|e| e.kv())
                .map(|kv| kv.mod_revision() as u64),
        );
    }

    // The watchers catch up with etcd's last export change (later revisions may be
    // replica and lease keys, which are no catalog change).
    let deadline = Instant::now() + Duration::from_secs(20);
    while watchers
        .iter()
        .any(|w| w.lock().unwrap().catalog.revision < Revision(last_export as u64))
    {
        assert!(
            Instant::now() < deadline,
            "watchers behind etcd's last export change {last_export} (head {head}): {:?}",
            watchers
                .iter()
                .map(|w| w.lock().unwrap().catalog.revision)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut gaps = 0usize;
    for (i, w) in watchers.iter().enumerate() {
        let w = w.lock().unwrap();
        let want: BTreeSet<u64> = etcd_revisions
            .iter()
            .copied()
            .filter(|r| *r > w.since)
            .collect();
        let got: BTreeSet<u64> = w
            .export_revisions
            .iter()
            .copied()
            .filter(|r| *r <= last_export as u64)
            .collect();
        let missing = want.difference(&got).count();
        let extra = got.difference(&want).count();
        gaps += missing + extra + w.snapshots.saturating_sub(1);
        let listed: BTreeSet<String> = w
            .catalog
            .exports
            .keys()
            .filter(|(s, _)| s.as_str() == "west")
            .map(|(_, svc)| svc.to_string())
            .collect();
        let lost_here = (0..=last)
            .filter(|k| !listed.contains(&format!("svc-{k}.load")))
            .count();
        eprintln!(
            "watcher {i}: {} export deltas ({missing} missing, {extra} extra vs etcd), {} snapshots, {} reconnects, {lost_here} acknowledged services missing",
            got.len(),
            w.snapshots,
            w.reconnects
        );
        assert_eq!(lost_here, 0, "watcher {i} lacks acknowledged services");
    }
    super::figure("etcd_members_acked_publishes", acked.len());
    super::figure("etcd_members_acked_before_kill", acked_before);
    super::figure("etcd_members_failed_publishes", failed);
    super::figure("etcd_members_acked_during_quorum_loss", in_quorum_loss);
    super::figure(
        "etcd_members_leader_kill_to_ack_ms",
        after_leader.as_millis(),
    );
    super::figure(
        "etcd_members_quorum_back_to_ack_ms",
        after_quorum.as_millis(),
    );
    super::figure("etcd_members_lost_acknowledged_writes", lost.len());
    super::figure("etcd_members_watch_gaps", gaps);
    assert!(lost.is_empty(), "acknowledged publishes lost: {lost:?}");
    // Two members of three still make a quorum: publishes resume once one leads (an
    // election, then at worst one publish that waited on the dead leader until etcd's
    // request timeout).
    assert!(
        after_leader < Duration::from_secs(12),
        "no publish acknowledged for {after_leader:?} after the leader died, with a quorum left"
    );
    assert_eq!(gaps, 0, "watch history differs from etcd's");
    assert_eq!(
        in_quorum_loss, 0,
        "a publish was acknowledged without a quorum"
    );
    drop((a, b));
}
