//! bench/kubernetes: the import controller materialising imports in a cluster, beside
//! the floor: the same objects written directly, one request after another, through the
//! same kube client to the same API server, in the same run.
//!
//! The API server is the tests' in-process one (`tests/e2e/kubeapi.rs`; no
//! kube-apiserver can be installed here), so the figures are the controller's own cost
//! (reflectors, file polling, comparisons, expectations) over the bare writes, not a
//! real cluster's latency. Two gateway pods are Ready.
//!
//! - bulk: `imports.json` lists N services (one TCP port each); from a cold start until
//!   every ServiceImport has its clusterset IP and status. Floor: the five writes per
//!   import (ServiceImport, Service, slice, ServiceImport IPs, status) for all N.
//! - one: with N in place, one more service is added to `imports.json`; until its
//!   ServiceImport is complete. Floor: its five writes.
//!
//! Last lines are `name: value`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use k8s_openapi::api::core::v1::{Pod, PodCondition, PodIP, PodSpec, PodStatus, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use meshfed_catalog::catalog::Protocol;
use meshfed_catalog::routing::{IMPORTS_FILE, ImportListener, ImportListeners};
use meshfed_kubernetes::import_controller::ImportController;
use meshfed_kubernetes::imports::{Desired, ServiceImport, desired, owner, ready_gateways};
use tokio_util::sync::CancellationToken;

#[allow(dead_code)]
#[path = "../../tests/e2e/kubeapi.rs"]
mod kubeapi;

use kubeapi::KubeApi;

#[derive(Parser)]
#[command(about = "Kubernetes import controller vs the bare API writes")]
struct Args {
    /// Imported services in the bulk phase.
    #[arg(long, default_value_t = 500)]
    services: usize,
    /// Single-import samples.
    #[arg(long, default_value_t = 60)]
    samples: usize,
}

fn gateway_pod(name: &str, ip: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            namespace: Some("meshfed".into()),
            name: Some(name.into()),
            labels: Some(
                [(
                    "app.kubernetes.io/name".to_string(),
                    "meshfed-gateway".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        spec: Some(PodSpec::default()),
        status: Some(PodStatus {
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            pod_ip: Some(ip.into()),
            pod_ips: Some(vec![PodIP { ip: ip.into() }]),
            ..Default::default()
        }),
    }
}

fn listeners(n: usize) -> ImportListeners {
    ImportListeners {
        imports: (0..n)
            .map(|i| ImportListener {
                service: format!("svc-{i}.bench").parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
                name: Some("http".into()),
                listen: ([0, 0, 0, 0], 20000 + (i % 10000) as u16).into(),
                backends: vec!["west".parse().unwrap()],
            })
            .collect(),
    }
}

fn write(dir: &Path, l: &ImportListeners) {
    let tmp = dir.join("imports.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(l).unwrap()).unwrap();
    std::fs::rename(tmp, dir.join(IMPORTS_FILE)).unwrap();
}

fn complete(si: &serde_json::Value) -> bool {
    si["spec"]["ips"].as_array().is_some_and(|a| !a.is_empty())
        && si["status"]["clusters"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
}

/// The floor: the five writes the controller makes for a new import, back to back.
async fn raw_writes(client: &kube::Client, d: &Desired) -> Result<()> {
    let ns = d.namespace();
    let pp = PostParams::default();
    let sis = Api::<ServiceImport>::namespaced(client.clone(), ns);
    let si = sis.create(&pp, &d.import).await?;
    let o = owner(&si).unwrap();
    let mut svc = d.service.clone();
    svc.metadata.owner_references = Some(vec![o.clone()]);
    let svc = Api::<Service>::namespaced(client.clone(), ns)
        .create(&pp, &svc)
        .await?;
    for s in &d.slices {
        let mut s = s.clone();
        s.metadata.owner_references = Some(vec![o.clone()]);
        Api::<EndpointSlice>::namespaced(client.clone(), ns)
            .create(&pp, &s)
            .await?;
    }
    let mut next = si.clone();
    next.spec.ips = svc.spec.and_then(|s| s.cluster_ip).into_iter().collect();
    sis.replace(d.name(), &pp, &next).await?;
    let patch = serde_json::json!({ "status": d.import.status });
    sis.patch_status(d.name(), &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

fn pct(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

async fn run(a: Args) -> Result<()> {
    let n = a.services;
    let dir = std::env::temp_dir().join(format!("meshfed-kube-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!(
        "kube-bench: {n} imports, {} single-import samples, 2 Ready gateway pods",
        a.samples
    );

    // meshfed: the controller, cold, on N imports.
    let api = KubeApi::start().await;
    api.put(&gateway_pod("gw-a", "10.1.0.1"));
    api.put(&gateway_pod("gw-b", "10.1.0.2"));
    let mut l = listeners(n);
    write(&dir, &l);
    let stop = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(
        ImportController {
            client: api.client(),
            dir: dir.clone(),
            gateway_namespace: "meshfed".into(),
            gateway_selector: "app.kubernetes.io/name=meshfed-gateway".into(),
        }
        .run(stop.clone()),
    );
    loop {
        let done = api
            .all("serviceimports")
            .iter()
            .filter(|s| complete(s))
            .count();
        if done == n {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "only {done}/{n} imports after 300 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let bulk = started.elapsed().as_secs_f64() * 1e3;
    let writes: usize = ["POST", "PUT", "PATCH", "DELETE"]
        .iter()
        .map(|m| {
            api.count(m, "/apis/multicluster.x-k8s.io")
                + api.count(m, "/api/v1/namespaces/bench")
                + api.count(m, "/apis/discovery.k8s.io")
        })
        .sum();
    // One more import at a time.
    let mut one = Vec::new();
    for i in 0..a.samples {
        let k = n + i;
        l.imports.push(listeners(k + 1).imports.pop().unwrap());
        let name = format!("svc-{k}");
        let t = Instant::now();
        write(&dir, &l);
        loop {
            if api
                .get("serviceimports", "bench", &name)
                .is_some_and(|s| complete(&s))
            {
                break;
            }
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(30),
                "{name} never complete"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        one.push(t.elapsed().as_secs_f64() * 1e3);
    }
    stop.cancel();
    let _ = task.await;

    // The floor: the same objects, written directly.
    let raw_api = KubeApi::start().await;
    let client = raw_api.client();
    let gws = ready_gateways(&[
        gateway_pod("gw-a", "10.1.0.1"),
        gateway_pod("gw-b", "10.1.0.2"),
    ]);
    let all = desired(&listeners(n + a.samples), &gws);
    let t = Instant::now();
    for d in &all[..n] {
        raw_writes(&client, d).await?;
    }
    let raw_bulk = t.elapsed().as_secs_f64() * 1e3;
    let mut raw_one = Vec::new();
    for d in &all[n..] {
        let t = Instant::now();
        raw_writes(&client, d).await?;
        raw_one.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!();
    println!(
        "{:<34} {:>12} {:>12} {:>8}",
        "figure", "meshfed", "raw writes", "ratio"
    );
    println!(
        "{:<34} {:>9.1} ms {:>9.1} ms {:>8.2}",
        format!("bulk: {n} imports complete"),
        bulk,
        raw_bulk,
        bulk / raw_bulk
    );
    let (p50, p99, r50, r99) = (
        pct(one.clone(), 0.5),
        pct(one, 0.99),
        pct(raw_one.clone(), 0.5),
        pct(raw_one, 0.99),
    );
    println!(
        "{:<34} {:>9.2} ms {:>9.2} ms {:>8.2}",
        "one import p50",
        p50,
        r50,
        p50 / r50
    );
    println!(
        "{:<34} {:>9.2} ms {:>9.2} ms {:>8.2}",
        "one import p99",
        p99,
        r99,
        p99 / r99
    );
    println!(
        "{:<34} {:>12.2} {:>12} {:>8}",
        "writes per import (bulk)",
        writes as f64 / n as f64,
        5,
        ""
    );
    println!();
    println!("kube_import_bulk_ms: {bulk:.1}");
    println!("kube_import_one_p99_ms: {p99:.2}");
    println!(
        "kube_import_bulk_ratio_vs_raw_writes: {:.2}",
        bulk / raw_bulk
    );
    Ok(())
}

fn main() -> Result<()> {
    let a = Args::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(a))
}
