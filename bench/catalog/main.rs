//! bench/catalog: catalog convergence through the federation, on the embedded store and
//! on etcd, beside raw etcd's own put→watch latency with the same fan-out, in one run.
//!
//! Setup per store: a real `meshfed federation serve` process; N sites (default 50), each
//! with its own CA, join with tokens and keep one Watch stream; together they publish M
//! services (default 10 000). Then, one at a time, a site publishes its set plus one new
//! probe service; convergence is the time from the Publish call until every site's
//! watcher has applied the delta. Raw etcd: N watchers on a prefix, one put, until all N
//! have the event. Last lines are `name: value`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use meshfed_api::client as node;
use meshfed_api::{change_from_pb, pb};
use meshfed_identity::{TrustBundle, TrustDomain};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

#[derive(Parser, Clone)]
#[command(about = "federation catalog convergence vs raw etcd put→watch")]
struct Args {
    /// Simulated sites, each with a watcher.
    #[arg(long, default_value_t = 50)]
    sites: usize,
    /// Services published in total, spread over the sites.
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Convergence samples per store.
    #[arg(long, default_value_t = 1000)]
    samples: usize,
    /// Stores to run: embedded,etcd.
    #[arg(long, default_value = "embedded,etcd")]
    stores: String,
}

type Client = pb::federation_client::FederationClient<tonic::transport::Channel>;

struct Stats {
    p50: f64,
    p99: f64,
    max: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    Stats {
        p50: at(0.50),
        p99: at(0.99),
        max: *v.last().unwrap_or(&0.0),
    }
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

async fn start_etcd(dir: &Path) -> Result<(Proc, String)> {
    let (c, p) = (free_port(), free_port());
    let endpoint = format!("http://127.0.0.1:{c}");
    let peer = format!("http://127.0.0.1:{p}");
    let child = Command::new("etcd")
        .args(["--name", "b", "--data-dir"])
        .arg(dir.join("etcd"))
        .args([
            "--listen-client-urls",
            &endpoint,
            "--advertise-client-urls",
            &endpoint,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("b={peer}"),
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("etcd.log"))?)
        .spawn()
        .context("starting etcd (apt-get install -y etcd-server)")?;
    let proc = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut c) = etcd_client::Client::connect([endpoint.as_str()], None).await
            && c.get("/", None).await.is_ok()
        {
            return Ok((proc, endpoint));
        }
        if Instant::now() > deadline {
            bail!("etcd did not start; see {}", dir.join("etcd.log").display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0)
}

fn export(name: &str) -> pb::ServiceExport {
    pb::ServiceExport {
        service: name.to_owned(),
        ports: vec![pb::Port {
            app_protocol: Default::default(),
            port: 8080,
            protocol: "tcp".into(),
            name: "http".into(),
        }],
        ready_endpoints: 3,
        ..Default::default()
    }
}

struct Site {
    name: String,
    client: Client,
    exports: Vec<pb::ServiceExport>,
}

/// One store's run: (convergence ms per sample, federation RSS MiB now, peak).
async fn run_store(
    args: &Args,
    root: &Path,
    store: &str,
    etcd: Option<&str>,
) -> Result<(Vec<f64>, f64, f64)> {
    let bin = std::env::current_exe()?.with_file_name("meshfed");
    let dir = root.join(format!("fed-{store}"));
    let out = Command::new(&bin)
        .args(["federation", "init", "--trust-domain", "fed.bench", "--dir"])
        .arg(&dir)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!("federation init: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut cmd = Command::new(&bin);
    cmd.args(["federation", "serve", "--dir"]).arg(&dir).args([
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--lease-ttl",
        "60s",
    ]);
    if let Some(e) = etcd {
        cmd.args(["--etcd", e, "--etcd-prefix", "/bench/"]);
    }
    let fed = Proc(
        cmd.env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(
                root.join(format!("fed-{store}.log")),
            )?)
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dir.join("admin_address").exists() {
        if Instant::now() > deadline {
            bail!("federation ({store}) did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Sites: own CA each, joined with a token, one client each.
    let t = Instant::now();
    let fed_td = TrustDomain::new("fed.bench")?;
    let per_site = args.services.div_ceil(args.sites);
    let mut sites = Vec::with_capacity(args.sites);
    for i in 0..args.sites {
        let name = format!("s{i:03}");
        let files =
            meshfed_lab::make_site(&root.join(store), &name, &format!("{name}.bench.example"))?;
        let (token, _) = node::create_token(
            &dir,
            &name,
            Duration::from_secs(600),
            Some(&files.trust_domain),
            false,
        )
        .await?;
        node::join(&files.dir, &name, &token, vec!["127.0.0.1:1".into()]).await?;
        let fb = std::fs::read(files.dir.join("bundles/fed.bench.json"))?;
        let bundle = TrustBundle::from_jwks(fed_td.clone(), &fb)?;
        let addr = std::fs::read_to_string(dir.join("address"))?;
        let client =
            node::client(&[addr.trim().to_owned()], bundle, &files.cert, &files.key).await?;
        let exports = (0..per_site)
            .filter(|j| i * per_site + j < args.services)
            .map(|j| export(&format!("svc{j}.{name}")))
            .collect();
        sites.push(Site {
            name,
            client,
            exports,
        });
    }
    eprintln!(
        "  {store}: {} sites joined in {:.1}s",
        sites.len(),
        t.elapsed().as_secs_f64()
    );

    // Every site watches; a watcher reports (probe, when) for each probe it applies.
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, Instant)>();
    let mut watchers = Vec::new();
    for s in &sites {
        let mut c = s.client.clone();
        let mut stream = c
            .watch(pb::WatchRequest {
                parts: false,
                from_revision: None,
                gateway_address: String::new(),
            })
            .await?
            .into_inner();
        let tx = tx.clone();
        watchers.push(tokio::spawn(async move {
            while let Some(Ok(ev)) = stream.next().await {
                let now = Instant::now();
                for c in ev.changes {
                    if let Ok(d) = change_from_pb(c)
                        && let meshfed_catalog::Change::PutExport { export, .. } = d.change
                        && export.service.name().starts_with("probe")
                    {
                        let _ = tx.send((export.service.to_string(), now));
                    }
                }
            }
        }));
    }
    drop(tx);

    // The initial load: every site publishes its share.
    let t = Instant::now();
    for s in &mut sites {
        s.client
            .publish(pb::PublishRequest {
                site: s.name.clone(),
                exports: s.exports.clone(),
                gateway_addresses: vec![],
                outbound_only: false,
            })
            .await?;
    }
    eprintln!(
        "  {store}: {} services published in {:.1}s",
        args.services,
        t.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Probes, one at a time, round-robin over sites.
    let mut lat = Vec::with_capacity(args.samples);
    for k in 0..args.samples {
        let i = (k * 7) % sites.len();
        let probe = format!("probe{k}.{}", sites[i].name);
        let s = &mut sites[i];
        s.exports.push(export(&probe));
        let t0 = Instant::now();
        s.client
            .publish(pb::PublishRequest {
                site: s.name.clone(),
                exports: s.exports.clone(),
                gateway_addresses: vec![],
                outbound_only: false,
            })
            .await?;
        let mut seen = 0;
        let mut last = t0;
        while seen < args.sites {
            let (svc, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .with_context(|| format!("probe {probe}: only {seen} watchers in 10 s"))?
                .context("watchers ended")?;
            if svc == probe {
                seen += 1;
                last = last.max(at);
            }
        }
        lat.push(last.duration_since(t0).as_secs_f64() * 1e3);
    }
    let (rss, hwm) = rss_mib(fed.0.id());
    for w in watchers {
        w.abort();
    }
    drop(fed);
    Ok((lat, rss, hwm))
}

/// Raw etcd: `n` watchers on one prefix; a put, until all `n` have its event.
async fn raw_etcd(endpoint: &str, n: usize, samples: usize) -> Result<Vec<f64>> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(i64, Instant)>();
    let mut tasks = vec![];
    for _ in 0..n {
        let mut c = etcd_client::Client::connect([endpoint], None).await?;
        let mut w = c
            .watch(
                "/raw/",
                Some(etcd_client::WatchOptions::new().with_prefix()),
            )
            .await?;
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let _keep = c;
            while let Ok(Some(r)) = w.message().await {
                let now = Instant::now();
                for ev in r.events() {
                    if let Some(kv) = ev.kv() {
                        let _ = tx.send((kv.mod_revision(), now));
                    }
                }
            }
        }));
    }
    drop(tx);
    let mut c = etcd_client::Client::connect([endpoint], None).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut lat = vec![];
    for k in 0..samples {
        let t0 = Instant::now();
        let r = c.put(format!("/raw/probe{k}"), "x", None).await?;
        let rev = r.header().map_or(0, |h| h.revision());
        let mut seen = 0;
        let mut last = t0;
        while seen < n {
            let (r, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .context("raw etcd watcher timed out")?
                .context("raw watchers ended")?;
            if r == rev {
                seen += 1;
                last = last.max(at);
            }
        }
        lat.push(last.duration_since(t0).as_secs_f64() * 1e3);
    }
    for t in tasks {
        t.abort();
    }
    Ok(lat)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let root: PathBuf =
        std::env::temp_dir().join(format!("meshfed-catalog-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    let root = Arc::new(root);
    println!(
        "catalog bench: {} sites, {} services, {} samples per store",
        args.sites, args.services, args.samples
    );
    let (_etcd, endpoint) = start_etcd(&root).await?;

    let raw = stats(raw_etcd(&endpoint, args.sites, args.samples).await?);
    println!(
        "raw etcd put→watch ({} watchers): p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        args.sites, raw.p50, raw.p99, raw.max
    );
    let mut worst_p99: f64 = 0.0;
    let mut worst_rss: f64 = 0.0;
    let mut etcd_p99 = None;
    for store in args.stores.split(',') {
        let etcd = match store {
            "embedded" => None,
            "etcd" => Some(endpoint.as_str()),
            other => bail!("unknown store {other:?} (embedded, etcd)"),
        };
        let (lat, rss, hwm) = run_store(&args, &root, store, etcd).await?;
        let s = stats(lat);
        println!(
            "meshfed {store:<8} convergence: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (p99 ratio vs raw etcd {:.2})  federation RSS {:.0} MiB (peak {:.0} MiB)",
            s.p50,
            s.p99,
            s.max,
            s.p99 / raw.p99,
            rss,
            hwm
        );
        worst_p99 = worst_p99.max(s.p99);
        worst_rss = worst_rss.max(hwm);
        if store == "etcd" {
            etcd_p99 = Some(s.p99);
        }
    }
    let _ = std::fs::remove_dir_all(&*root);
    // The ratio is the etcd store's (the one built on etcd); p99 and RSS are the worst
    // of the stores run.
    let ratio = etcd_p99.unwrap_or(worst_p99) / raw.p99;
    println!("catalog_convergence_p99_ms: {worst_p99:.2}");
    println!("catalog_convergence_ratio_vs_raw_etcd: {ratio:.2}");
    println!("federation_rss_mib: {worst_rss:.0}");
    Ok(())
}
