//! bench/catalog: catalog convergence through the federation, on the embedded store and
//! on etcd, beside raw etcd's own put→watch latency with the same fan-out, in one run.
//!
//! Setup per store: a real `meshfed federation serve` process; N sites (default 50), each
//! with its own CA, join with tokens and keep one Watch stream (in parts, as gateways
//! ask); together they publish M services (default 10 000). Then, one at a time, a site
//! publishes its set plus one new probe service; convergence is the time from the
//! Publish call until every site's watcher has applied the delta. Raw etcd: N watchers on
//! a prefix, one put, until all N have the event; with `--churn`, again while 8 writers
//! put the same number of changes per second under that prefix (every watcher receives
//! them, as meshfed's do), and the ratios against that figure are printed beside the
//! others (`..._vs_raw_etcd_churn`). Last lines are `name: value`.
//!
//! `--scale` (issue 19): 511 sites and 100 000 services; while the probes run, other
//! sites change endpoint counts at `--churn` changes per second (1000); a real
//! `meshfed gateway` joined as one more site imports every service (its RSS and CPU);
//! then the federation is restarted and the time until every watcher is back at the
//! revision it had is the resync time (watchers resume from their revision, and the
//! bench counts those that needed a snapshot).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use meshfed_api::client as node;
use meshfed_api::pb;
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
    /// The scale run: 511 sites, 100 000 services, 200 samples, 1000 changes/s of churn,
    /// a gateway importing everything, and a federation restart.
    #[arg(long)]
    scale: bool,
    /// Endpoint changes per second published by other sites while the probes run.
    #[arg(long)]
    churn: Option<u32>,
    /// Run a real gateway (one more site) that imports every service.
    #[arg(long)]
    gateway: bool,
    /// Restart the federation at the end and measure the watchers' resync.
    #[arg(long)]
    restart: bool,
}

impl Args {
    /// `--scale` fills what was not given.
    fn scaled(mut self) -> Self {
        if self.scale {
            let given = |flag: &str| {
                std::env::args().any(|a| a == flag || a.starts_with(&format!("{flag}=")))
            };
            if !given("--sites") {
                self.sites = 511;
            }
            if !given("--services") {
                self.services = 100_000;
            }
            if !given("--samples") {
                self.samples = 200;
            }
            self.churn = self.churn.or(Some(1000));
            self.gateway = true;
            self.restart = true;
        }
        self
    }
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

impl Site {
    /// Its whole export set, as a gateway publishes it.
    fn request(&self) -> pb::PublishRequest {
        pb::PublishRequest {
            site: self.name.clone(),
            exports: self.exports.clone(),
            gateway_addresses: vec![],
            outbound_only: false,
        }
    }
}

/// What one store's run measured.
struct StoreRun {
    /// Convergence per probe, ms.
    lat: Vec<f64>,
    /// Federation RSS now and at its peak, MiB (the peak over both processes when it was
    /// restarted).
    rss: f64,
    hwm: f64,
    /// Endpoint changes per second the churn achieved (`None`: no churn).
    churn: Option<f64>,
    /// The gateway's RSS (MiB, with every import applied) and vCPU while the probes and
    /// the churn ran, and how many imports it listened on.
    gateway: Option<(f64, f64, usize)>,
    /// Seconds from the restarted federation's start until every watcher was back at the
    /// revision it had, and how many of them needed a snapshot.
    resync: Option<(f64, usize)>,
    /// The federation's vCPU (utime + stime over wall time) while the probes and the churn
    /// ran.
    fed_vcpu: f64,
    /// Per probe, ms from its Publish until the gateway had applied a plan at its
    /// revision (`meshfed_gateway_catalog_revision`; empty for a gateway without it).
    gateway_lat: Vec<f64>,
}

/// Every watcher's progress, shared with the bench.
struct Watch {
    /// The revision each watcher has applied.
    rev: Vec<std::sync::atomic::AtomicU64>,
    /// Full snapshots received, in all.
    snapshots: std::sync::atomic::AtomicUsize,
    /// Streams each watcher had its first event on.
    streams: Vec<std::sync::atomic::AtomicU64>,
}

/// One site's watcher, as a gateway's: a Watch in parts, resumed from its revision
/// whenever the stream ends (the channel reconnects). Reports each probe it applies.
async fn watcher(
    i: usize,
    mut c: Client,
    state: Arc<Watch>,
    tx: mpsc::UnboundedSender<(String, Instant)>,
) {
    use std::sync::atomic::Ordering;
    loop {
        let from = state.rev[i].load(Ordering::Acquire);
        let req = pb::WatchRequest {
            from_revision: (from > 0).then_some(from),
            gateway_address: String::new(),
            parts: true,
        };
        if let Ok(r) = c.watch(req).await {
            let mut stream = r.into_inner();
            let mut parts = meshfed_api::parts::Assembler::default();
            let mut first = true;
            while let Some(Ok(part)) = stream.next().await {
                let Ok(Some(ev)) = meshfed_api::parts::event(part).and_then(|p| parts.push(p))
                else {
                    continue;
                };
                let now = Instant::now();
                if ev.snapshot {
                    state.snapshots.fetch_add(1, Ordering::Relaxed);
                }
                for c in &ev.changes {
                    if let Some(pb::change::Op::PutExport(pe)) = &c.op
                        && let Some(e) = &pe.export
                        && e.service.starts_with("probe")
                    {
                        let _ = tx.send((e.service.clone(), now));
                    }
                }
                state.rev[i].fetch_max(ev.revision, Ordering::AcqRel);
                if std::mem::take(&mut first) {
                    state.streams[i].fetch_add(1, Ordering::AcqRel);
                }
            }
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// This process's hard limit on open files (`/proc/self/limits`).
fn nofile_hard() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(4).map(str::to_owned))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

/// The gateway's catalog applies so far: (count, seconds in all), from
/// `meshfed_gateway_catalog_apply_seconds` on its admin port, and its cache writes
/// (`..._catalog_cache_write_seconds`; before, the applies counted them).
async fn applies(admin: std::net::SocketAddr) -> Result<((f64, f64), Option<(f64, f64)>)> {
    let (status, body) = meshfed_lifecycle::admin::get(admin, "/metrics")
        .await
        .map_err(anyhow::Error::msg)?;
    anyhow::ensure!(status.is_success(), "GET /metrics on {admin}: {status}");
    let sample = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .with_context(|| format!("{name} not on the gateway's /metrics"))
    };
    let writes = match (
        sample("meshfed_gateway_catalog_cache_write_seconds_count"),
        sample("meshfed_gateway_catalog_cache_write_seconds_sum"),
    ) {
        (Ok(c), Ok(s)) => Some((c, s)),
        _ => None,
    };
    Ok((
        (
            sample("meshfed_gateway_catalog_apply_seconds_count")?,
            sample("meshfed_gateway_catalog_apply_seconds_sum")?,
        ),
        writes,
    ))
}

/// The catalog revision of the plan the gateway applied last
/// (`meshfed_gateway_catalog_revision` on its admin port).
async fn gateway_revision(admin: std::net::SocketAddr) -> Option<u64> {
    let (status, body) = meshfed_lifecycle::admin::get(admin, "/metrics")
        .await
        .ok()?;
    if !status.is_success() {
        return None;
    }
    body.lines().find_map(|l| {
        l.strip_prefix("meshfed_gateway_catalog_revision ")?
            .parse::<f64>()
            .ok()
            .map(|v| v as u64)
    })
}

/// CPU seconds (user + system) of `pid` so far.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Starts `meshfed federation serve` on `dir` at `listen`.
fn serve(
    bin: &Path,
    root: &Path,
    dir: &Path,
    store: &str,
    etcd: Option<&str>,
    listen: &str,
    n: usize,
) -> Result<Proc> {
    let _ = std::fs::remove_file(dir.join("admin_address"));
    let mut cmd = Command::new(bin);
    cmd.args(["federation", "serve", "--dir"]).arg(dir).args([
        "--listen",
        listen,
        "--admin",
        "127.0.0.1:0",
        "--lease-ttl",
        "60s",
    ]);
    if let Some(e) = etcd {
        cmd.args(["--etcd", e, "--etcd-prefix", "/bench/"]);
    }
    Ok(Proc(
        cmd.env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(
                root.join(format!("fed-{store}-{n}.log")),
            )?)
            .spawn()?,
    ))
}

async fn wait_file(path: &Path, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        if Instant::now() > deadline {
            bail!("{what} did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// One store's run.
async fn run_store(args: &Args, root: &Path, store: &str, etcd: Option<&str>) -> Result<StoreRun> {
    use std::sync::atomic::Ordering;
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
    // A fixed port, so that a restarted federation is found where it was.
    let listen = format!("127.0.0.1:{}", free_port());
    let mut fed = serve(&bin, root, &dir, store, etcd, &listen, 0)?;
    wait_file(&dir.join("admin_address"), &format!("federation ({store})")).await?;

    // Sites: own CA each, joined with a token, one client each.
    let t = Instant::now();
    let fed_td = TrustDomain::new("fed.bench")?;
    let per_site = args.services.div_ceil(args.sites);
    let mut sites = Vec::with_capacity(args.sites);
    let join_site = |name: String| {
        let (root, dir, fed_td) = (root.join(store), dir.clone(), fed_td.clone());
        async move {
            let files = meshfed_lab::make_site(&root, &name, &format!("{name}.bench.example"))?;
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
            let bundle = TrustBundle::from_jwks(fed_td, &fb)?;
            let addr = std::fs::read_to_string(dir.join("address"))?;
            let client =
                node::client(&[addr.trim().to_owned()], bundle, &files.cert, &files.key).await?;
            anyhow::Ok((files, client))
        }
    };
    for i in 0..args.sites {
        let name = format!("s{i:03}");
        let (_, client) = join_site(name.clone()).await?;
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
    let state = Arc::new(Watch {
        rev: (0..sites.len()).map(|_| Default::default()).collect(),
        snapshots: Default::default(),
        streams: (0..sites.len()).map(|_| Default::default()).collect(),
    });
    let mut watchers = Vec::new();
    for (i, s) in sites.iter().enumerate() {
        watchers.push(tokio::spawn(watcher(
            i,
            s.client.clone(),
            state.clone(),
            tx.clone(),
        )));
    }
    drop(tx);

    // The initial load: every site publishes its share.
    let t = Instant::now();
    let mut last_rev = 0;
    for s in &mut sites {
        let r = s.client.publish(s.request()).await?.into_inner();
        last_rev = r.revision;
    }
    eprintln!(
        "  {store}: {} services published in {:.1}s",
        args.services,
        t.elapsed().as_secs_f64()
    );
    // Until every watcher has the whole catalog.
    let t = Instant::now();
    while state
        .rev
        .iter()
        .any(|r| r.load(Ordering::Acquire) < last_rev)
    {
        if t.elapsed() > Duration::from_secs(600) {
            bail!("{store}: watchers not at revision {last_rev} after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "  {store}: every watcher at revision {last_rev} after {:.1}s more",
        t.elapsed().as_secs_f64()
    );

    // The gateway: one more site, importing every service, each on its own VIP.
    let mut gateway = None;
    if args.gateway {
        let (files, _) = join_site("gw".into()).await?;
        let admin = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let cfg = meshfed_lab::ConfigBuilder {
            federation: Some((files.dir.clone(), [127, 0, 0, 1].into())),
            vip_range: Some("127.128.0.0/9".into()),
            admin: Some(admin),
            ..Default::default()
        };
        let path = cfg.write(&files)?;
        // A listener per import: as many descriptors as this machine allows (the hard
        // limit; raising it needs CAP_SYS_RESOURCE).
        let hard = nofile_hard();
        eprintln!("  {store}: the gateway may open {hard} descriptors");
        let child = Command::new("prlimit")
            .arg(format!("--nofile={hard}:{hard}"))
            .arg("--")
            .arg(&bin)
            .args(["gateway", "run", "-c"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(root.join(format!("gw-{store}.log")))?)
            .spawn()
            .context("starting the gateway (needs prlimit, util-linux)")?;
        let gw = Proc(child);
        let imports = files.dir.join(meshfed_catalog::routing::IMPORTS_FILE);
        let t = Instant::now();
        let count = || -> usize {
            std::fs::read(&imports)
                .ok()
                .and_then(|b| {
                    serde_json::from_slice::<meshfed_catalog::routing::ImportListeners>(&b).ok()
                })
                .map_or(0, |l| l.imports.len())
        };
        // It binds at most half its open-file limit (the rest stay unbound).
        let want = args
            .services
            .min(usize::try_from(hard / 2).unwrap_or(usize::MAX));
        loop {
            let n = count();
            if n >= want {
                eprintln!(
                    "  {store}: the gateway listens on {n} of {} imports after {:.1}s",
                    args.services,
                    t.elapsed().as_secs_f64()
                );
                break;
            }
            if t.elapsed() > Duration::from_secs(600) {
                bail!(
                    "{store}: the gateway has {n} of {} imports after 600 s; see {}",
                    args.services,
                    root.join(format!("gw-{store}.log")).display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        gateway = Some((gw, count(), admin));
    }

    // Churn: other sites than the probes' (even ones) change endpoint counts.
    let stop = tokio_util::sync::CancellationToken::new();
    let changed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut churners = Vec::new();
    if let Some(rate) = args.churn.filter(|r| *r > 0) {
        // CHURNERS publishers at once (a publish takes longer than a tick under load);
        // each ticks every 20 ms and publishes one of its sites' sets with its share of
        // the changes.
        const CHURNERS: usize = 8;
        let per_tick = (rate as usize).div_ceil(50 * CHURNERS);
        let mut groups: Vec<Vec<Site>> = (0..CHURNERS).map(|_| Vec::new()).collect();
        let mut keep = Vec::new();
        for (i, s) in sites.into_iter().enumerate() {
            if i % 2 == 0 {
                groups[(i / 2) % CHURNERS].push(s);
            } else {
                keep.push(s);
            }
        }
        sites = keep;
        for mut mine in groups.into_iter().filter(|g| !g.is_empty()) {
            let (stop, changed) = (stop.clone(), changed.clone());
            churners.push(tokio::spawn(async move {
                let began = Instant::now();
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut k = 0usize;
                while !stop.is_cancelled() {
                    tick.tick().await;
                    let m = mine.len();
                    let s = &mut mine[k % m];
                    let n = s.exports.len();
                    for j in 0..per_tick.min(n) {
                        let e = &mut s.exports[(k / m * per_tick + j) % n];
                        e.ready_endpoints = if e.ready_endpoints == 3 { 4 } else { 3 };
                    }
                    k += 1;
                    let r = s.client.publish(s.request()).await;
                    if let Ok(r) = r {
                        changed.fetch_add(u64::from(r.into_inner().changes), Ordering::Relaxed);
                    }
                }
                began.elapsed().as_secs_f64()
            }));
        }
    }

    // Probes, one at a time, round-robin over the probing sites.
    eprintln!("  {store}: probing");
    let gw_cpu0 = gateway.as_ref().map(|(g, _, _)| cpu_s(g.0.id()));
    let fed_cpu0 = cpu_s(fed.0.id());
    let gw_applies0 = match &gateway {
        Some((_, _, admin)) => Some(applies(*admin).await?),
        None => None,
    };
    let t_probes = Instant::now();
    let mut lat = Vec::with_capacity(args.samples);
    let mut gateway_lat = Vec::with_capacity(args.samples);
    // A gateway without the revision gauge (an older build) is not polled.
    let gw_admin = match &gateway {
        Some((_, _, admin)) => gateway_revision(*admin).await.map(|_| *admin),
        None => None,
    };
    for k in 0..args.samples {
        let i = (k * 7) % sites.len();
        let probe = format!("probe{k}.{}", sites[i].name);
        let s = &mut sites[i];
        s.exports.push(export(&probe));
        let t0 = Instant::now();
        let rev = s.client.publish(s.request()).await?.into_inner().revision;
        // The gateway is polled every 5 ms until it applied a plan at the probe's revision.
        let gw_wait = gw_admin.map(|admin| {
            tokio::spawn(async move {
                while t0.elapsed() < Duration::from_secs(30) {
                    if gateway_revision(admin).await.is_some_and(|r| r >= rev) {
                        return Some(t0.elapsed().as_secs_f64() * 1e3);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                None
            })
        });
        let mut seen = 0;
        let mut last = t0;
        while seen < args.sites {
            let (svc, at) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .with_context(|| format!("probe {probe}: only {seen} watchers in 30 s"))?
                .context("watchers ended")?;
            if svc == probe {
                seen += 1;
                last = last.max(at);
            }
        }
        lat.push(last.duration_since(t0).as_secs_f64() * 1e3);
        if let Some(w) = gw_wait {
            gateway_lat.push(
                w.await?.with_context(|| {
                    format!("probe {probe}: the gateway did not apply it in 30 s")
                })?,
            );
        }
        if (k + 1) % 50 == 0 {
            eprintln!("  {store}: {} probes", k + 1);
        }
    }
    let probes_s = t_probes.elapsed().as_secs_f64();
    let fed_vcpu = (cpu_s(fed.0.id()) - fed_cpu0) / probes_s;
    stop.cancel();
    let mut churn_s: f64 = 0.0;
    for c in churners {
        churn_s = churn_s.max(c.await.unwrap_or(probes_s));
    }
    let churn_s = if churn_s > 0.0 { churn_s } else { probes_s };
    let churn = args
        .churn
        .filter(|r| *r > 0)
        .map(|_| changed.load(Ordering::Relaxed) as f64 / churn_s);
    let gateway = match gateway {
        Some((gw, n, admin)) => {
            let cpu = cpu_s(gw.0.id()) - gw_cpu0.unwrap_or(0.0);
            let ((count, sum), writes) = applies(admin).await?;
            let (a0, w0) = gw_applies0.unwrap_or(((0.0, 0.0), None));
            let (count, sum) = (count - a0.0, sum - a0.1);
            let each = |count: f64, sum: f64| if count > 0.0 { sum / count * 1e3 } else { 0.0 };
            eprintln!(
                "  {store}: the gateway applied the catalog {count:.0} times during the probes and churn ({:.1}/s), {:.1} ms each on average (applying {:.0} % of the time)",
                count / probes_s,
                each(count, sum),
                sum / probes_s * 100.0
            );
            if let (Some((wc, ws)), Some((wc0, ws0))) = (writes, w0) {
                let (wc, ws) = (wc - wc0, ws - ws0);
                eprintln!(
                    "  {store}: the gateway wrote its catalog cache and imports.json {wc:.0} times, {:.1} ms each on average ({:.0} % of the time; the applies above do not count them)",
                    each(wc, ws),
                    ws / probes_s * 100.0
                );
            }
            let (rss, _) = rss_mib(gw.0.id());
            drop(gw);
            Some((rss, cpu / probes_s, n))
        }
        None => None,
    };
    let (mut rss, mut hwm) = rss_mib(fed.0.id());

    // Restart: SIGTERM (a drain, as an upgrade does), then the same directory and port.
    let mut resync = None;
    if args.restart {
        let load = |v: &[std::sync::atomic::AtomicU64]| -> Vec<u64> {
            v.iter().map(|r| r.load(Ordering::Acquire)).collect()
        };
        let (rev_before, streams_before) = (load(&state.rev), load(&state.streams));
        let snaps_before = state.snapshots.load(Ordering::Acquire);
        let _ = Command::new("kill")
            .args(["-TERM", &fed.0.id().to_string()])
            .status();
        let _ = fed.0.wait();
        let t = Instant::now();
        fed = serve(&bin, root, &dir, store, etcd, &listen, 1)?;
        wait_file(
            &dir.join("admin_address"),
            &format!("restarted federation ({store})"),
        )
        .await?;
        // Back: a watcher has a new stream's first event, at the revision it had.
        let snaps = || state.snapshots.load(Ordering::Acquire) - snaps_before;
        loop {
            let (rev, streams) = (load(&state.rev), load(&state.streams));
            let back = (0..rev.len())
                .filter(|&i| streams[i] > streams_before[i] && rev[i] >= rev_before[i])
                .count();
            if back == state.rev.len() {
                break;
            }
            if t.elapsed() > Duration::from_secs(600) {
                bail!(
                    "{store}: {back} of {} watchers back after 600 s",
                    state.rev.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        resync = Some((t.elapsed().as_secs_f64(), snaps()));
        let (r2, h2) = rss_mib(fed.0.id());
        rss = r2;
        hwm = hwm.max(h2);
    }
    for w in watchers {
        w.abort();
    }
    drop(fed);
    Ok(StoreRun {
        lat,
        rss,
        hwm,
        churn,
        gateway,
        resync,
        fed_vcpu,
        gateway_lat,
    })
}

/// Raw etcd: `n` watchers on one prefix; a put, until all `n` have its event. With
/// `churn` (changes per second), meshfed's load on etcd's terms meanwhile: 8 writers
/// each commit every 20 ms a transaction of their share of puts of export-sized values
/// under the same prefix, so every watcher receives every change, as meshfed's watchers
/// do. Returns the latencies and the changes per second achieved.
async fn raw_etcd(
    endpoint: &str,
    n: usize,
    samples: usize,
    churn: Option<u32>,
) -> Result<(Vec<f64>, Option<f64>)> {
    use std::sync::atomic::Ordering;
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
    let stop = tokio_util::sync::CancellationToken::new();
    let changed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut writers = vec![];
    if let Some(rate) = churn.filter(|r| *r > 0) {
        const WRITERS: usize = 8;
        let per_tick = (rate as usize).div_ceil(50 * WRITERS);
        // About the size of one export as the federation's watchers receive it.
        let value = "e".repeat(160);
        for w in 0..WRITERS {
            let mut c = etcd_client::Client::connect([endpoint], None).await?;
            let (stop, changed, value) = (stop.clone(), changed.clone(), value.clone());
            writers.push(tokio::spawn(async move {
                let began = Instant::now();
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut k = 0usize;
                while !stop.is_cancelled() {
                    tick.tick().await;
                    let ops: Vec<etcd_client::TxnOp> = (0..per_tick)
                        .map(|j| {
                            let key = format!("/raw/churn/{w}/{}", (k * per_tick + j) % 196);
                            etcd_client::TxnOp::put(key, format!("{value}{k}"), None)
                        })
                        .collect();
                    k += 1;
                    if c.txn(etcd_client::Txn::new().and_then(ops)).await.is_ok() {
                        changed.fetch_add(per_tick as u64, Ordering::Relaxed);
                    }
                }
                began.elapsed().as_secs_f64()
            }));
        }
        // Let the writers reach their pace before the first probe.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
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
    stop.cancel();
    let mut secs: f64 = 0.0;
    for w in writers {
        secs = secs.max(w.await.unwrap_or(0.0));
    }
    for t in tasks {
        t.abort();
    }
    let achieved = churn
        .filter(|r| *r > 0 && secs > 0.0)
        .map(|_| changed.load(Ordering::Relaxed) as f64 / secs);
    Ok((lat, achieved))
}

fn main() -> Result<()> {
    let args = Args::parse().scaled();
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
        "catalog bench: {} sites, {} services, {} samples per store{}{}{}",
        args.sites,
        args.services,
        args.samples,
        args.churn
            .map(|c| format!(", {c} endpoint changes/s during the probes"))
            .unwrap_or_default(),
        if args.gateway {
            ", a gateway importing everything"
        } else {
            ""
        },
        if args.restart {
            ", a federation restart"
        } else {
            ""
        },
    );
    let (_etcd, endpoint) = start_etcd(&root).await?;

    let raw = stats(raw_etcd(&endpoint, args.sites, args.samples, None).await?.0);
    println!(
        "raw etcd put→watch ({} watchers): p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        args.sites, raw.p50, raw.p99, raw.max
    );
    // The same under the churn meshfed's watchers get (every change to every watcher).
    let raw_churn = match args.churn.filter(|r| *r > 0) {
        Some(rate) => {
            let (lat, achieved) = raw_etcd(&endpoint, args.sites, args.samples, Some(rate)).await?;
            let r = stats(lat);
            println!(
                "raw etcd put→watch ({} watchers) with {:.0} changes/s of churn: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
                args.sites,
                achieved.unwrap_or(0.0),
                r.p50,
                r.p99,
                r.max
            );
            Some(r)
        }
        None => None,
    };
    let mut worst_p99: f64 = 0.0;
    let mut worst_rss: f64 = 0.0;
    let mut worst_fed_vcpu: f64 = 0.0;
    let mut worst_resync: Option<f64> = None;
    let mut worst_gw: Option<(f64, f64, usize)> = None;
    let mut worst_gw_p99: Option<f64> = None;
    let mut ratios = Vec::new();
    for store in args.stores.split(',') {
        let etcd = match store {
            "embedded" => None,
            "etcd" => Some(endpoint.as_str()),
            other => bail!("unknown store {other:?} (embedded, etcd)"),
        };
        let r = run_store(&args, &root, store, etcd).await?;
        if !r.gateway_lat.is_empty() {
            let g = stats(r.gateway_lat.clone());
            println!(
                "  {store}: the gateway applied each probe in p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms after its Publish  (p99 ratio vs raw etcd {:.2})",
                g.p50,
                g.p99,
                g.max,
                g.p99 / raw.p99
            );
            worst_gw_p99 = Some(worst_gw_p99.unwrap_or(0.0).max(g.p99));
        }
        let s = stats(r.lat);
        println!(
            "meshfed {store:<8} convergence: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (p99 ratio vs raw etcd {:.2})  federation RSS {:.0} MiB (peak {:.0} MiB)",
            s.p50,
            s.p99,
            s.max,
            s.p99 / raw.p99,
            r.rss,
            r.hwm
        );
        match r.churn {
            Some(c) => println!(
                "  {store}: churn achieved {c:.0} endpoint changes/s during the probes; federation {:.3} vCPU ({:.3} per 1000 changes/s)",
                r.fed_vcpu,
                if c > 0.0 { r.fed_vcpu / c * 1e3 } else { 0.0 }
            ),
            None => println!(
                "  {store}: federation {:.3} vCPU during the probes",
                r.fed_vcpu
            ),
        }
        worst_fed_vcpu = worst_fed_vcpu.max(r.fed_vcpu);
        if let Some((rss, vcpu, n)) = r.gateway {
            println!(
                "  {store}: gateway with {n} of {} imports bound (half its open-file limit {}): RSS {rss:.0} MiB, {vcpu:.3} vCPU during the probes and churn",
                args.services,
                nofile_hard()
            );
            let w = worst_gw.get_or_insert((0.0, 0.0, usize::MAX));
            *w = (w.0.max(rss), w.1.max(vcpu), w.2.min(n));
        }
        if let Some((secs, snaps)) = r.resync {
            println!(
                "  {store}: after a federation restart, all {} watchers back in {secs:.2} s ({snaps} needed a snapshot)",
                args.sites
            );
            worst_resync = Some(worst_resync.unwrap_or(0.0).max(secs));
        }
        worst_p99 = worst_p99.max(s.p99);
        worst_rss = worst_rss.max(r.hwm);
        ratios.push((
            store.to_owned(),
            s.p50,
            s.p99 / raw.p99,
            raw_churn.as_ref().map(|r| s.p99 / r.p99),
        ));
    }
    let _ = std::fs::remove_dir_all(&*root);
    // Both stores' ratios, then the worst of each figure.
    for (store, _, ratio, _) in &ratios {
        println!("catalog_convergence_ratio_{store}_vs_raw_etcd: {ratio:.2}");
    }
    // Against raw etcd carrying the same churn (reported beside, not instead).
    for (store, _, _, ratio) in &ratios {
        if let Some(r) = ratio {
            println!("catalog_convergence_ratio_{store}_vs_raw_etcd_churn: {r:.2}");
        }
    }
    if args.scale {
        let p50 = ratios.iter().map(|r| r.1).fold(0.0, f64::max);
        println!("catalog_scale_convergence_p50_ms: {p50:.2}");
        println!("catalog_scale_convergence_p99_ms: {worst_p99:.2}");
        println!("catalog_scale_federation_rss_mib: {worst_rss:.0}");
        println!("catalog_scale_federation_vcpu: {worst_fed_vcpu:.3}");
        if let Some((rss, vcpu, n)) = worst_gw {
            if let Some(p99) = worst_gw_p99 {
                println!("catalog_scale_gateway_convergence_p99_ms: {p99:.2}");
            }
            println!("catalog_scale_gateway_imports_bound: {n}");
            println!("catalog_scale_gateway_vcpu: {vcpu:.3}");
            println!("catalog_scale_gateway_rss_mib: {rss:.0}");
        }
        if let Some(s) = worst_resync {
            println!("catalog_scale_resync_s: {s:.2}");
        }
    } else {
        // The ratio line of old is the etcd store's (the one built on etcd).
        let ratio = ratios
            .iter()
            .find(|r| r.0 == "etcd")
            .or(ratios.first())
            .map_or(0.0, |r| r.2);
        println!("catalog_convergence_p99_ms: {worst_p99:.2}");
        println!("catalog_convergence_ratio_vs_raw_etcd: {ratio:.2}");
        println!("federation_rss_mib: {worst_rss:.0}");
    }
    Ok(())
}
