//! Static stability: the federation goes away (short form 15 s, full 10 min) while
//! clients call a service two sites export, and one exporting gateway restarts (SIGTERM,
//! then a fresh process on the same config) in the middle. The importing site runs from
//! its catalog and its peer links: no request may fail.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::federation::{
    Fed, On, banner_server, fed_config, free_port, joined, wait_answer, who_answers,
};
use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_down_with_a_gateway_restart_fails_no_request() {
    let down_for = super::pick(Duration::from_secs(15), Duration::from_secs(600));
    let scratch = Scratch::new("fault-fed-down");
    let dir = Fed::init(&scratch);
    let mut fed = Fed::start_on(&dir, 0, "10s", On::Embedded);
    let [east, west, north] = joined(&scratch, &fed, ["east", "west", "north"]);
    let import_ip: std::net::IpAddr = [127, 0, 0, 2].into();
    let port = free_port(import_ip);
    let _west_gw = Gw::start(
        &west,
        &fed_config(&west, [127, 0, 0, 3]).export(
            "orders.shop",
            port,
            vec![banner_server("west").await],
        ),
    )
    .unwrap();
    let north_cfg = fed_config(&north, [127, 0, 0, 4]).export(
        "orders.shop",
        port,
        vec![banner_server("north").await],
    );
    let north_gw = Gw::start(&north, &north_cfg).unwrap();
    let east_gw = Gw::start(&east, &fed_config(&east, [127, 0, 0, 2])).unwrap();
    let import = std::net::SocketAddr::new(import_ip, port);
    // Both sites known (north answers first: equal capacity, by name).
    wait_answer(import, "north:ping", &east_gw).await;

    // A steady load: 50 calls a second, each on a new connection.
    let (calls, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let (calls, failed, stop) = (calls.clone(), failed.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut tasks = tokio::task::JoinSet::new();
            while !stop.is_cancelled() {
                tick.tick().await;
                let (calls, failed) = (calls.clone(), failed.clone());
                tasks.spawn(async move {
                    match who_answers(import).await {
                        Ok(who) if who.ends_with(":ping") => {}
                        other => {
                            eprintln!("call failed: {other:?}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    calls.fetch_add(1, Ordering::Relaxed);
                });
            }
            while tasks.join_next().await.is_some() {}
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The federation goes away.
    fed.kill();
    let started = Instant::now();
    tokio::time::sleep(down_for / 2).await;
    // North restarts in the middle: drained, then a new process on the same config.
    let mut north_gw = north_gw;
    north_gw.term_and_wait(Duration::from_secs(15)).await;
    drop(north_gw);
    let north_gw = Gw::start(&north, &north_cfg).unwrap();
    // Logged as the cache is applied, which may come just after the gateway reports
    // itself started (seen once in CI).
    assert!(
        north_gw
            .wait_log("serving from the cached catalog", Duration::from_secs(10))
            .await,
        "north restarted without its cache:\n{}",
        north_gw.logs()
    );
    tokio::time::sleep(down_for.saturating_sub(started.elapsed())).await;
    stop.cancel();
    load.await.unwrap();
    let (calls, failed) = (
        calls.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    super::figure("fault_federation_down_seconds", down_for.as_secs());
    super::figure("fault_federation_down_requests", calls);
    super::figure("fault_federation_down_failed_requests", failed);
    assert!(
        calls as u64 > down_for.as_secs() * 30,
        "the load ran: {calls}"
    );
    assert_eq!(
        failed,
        0,
        "{failed} of {calls} calls failed\n{}",
        east_gw.logs()
    );
}
