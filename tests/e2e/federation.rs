//! The federation service as a real process: tokens, join, publish authorization,
//! revisioned watches, and the embedded store across restarts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use meshfed_api::{pb, reason_of};
use meshfed_identity::{BundleSet, TrustDomain};
use meshfed_lab::SiteFiles;
use tokio_stream::StreamExt;

use crate::harness::*;

/// A running `meshfed federation serve`.
pub(crate) struct Fed {
    pub dir: PathBuf,
    child: Option<Child>,
    pub addr: String,
    pub log: PathBuf,
}

/// Which store a test federation runs on: embedded, or etcd under a prefix.
#[derive(Clone, Copy)]
pub(crate) enum On<'a> {
    Embedded,
    Etcd(&'a Etcd, &'a str),
    /// Several etcd client URLs (comma-separated, a cluster's members), and a prefix.
    Endpoints(&'a str, &'a str),
}

impl Fed {
    pub fn init(scratch: &Scratch) -> PathBuf {
        let dir = scratch.0.join("fed");
        let out = Command::new(BIN)
            .args([
                "federation",
                "init",
                "--trust-domain",
                "fed.example.org",
                "--dir",
            ])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    }

    /// A copy of a federation directory (its CA and SVIDs) for another replica, as an
    /// operator would install one per host.
    pub fn replica_dir(dir: &Path, name: &str) -> PathBuf {
        let to = dir.with_file_name(name);
        let out = Command::new("cp")
            .arg("-r")
            .arg(dir)
            .arg(&to)
            .output()
            .unwrap();
        assert!(out.status.success());
        let _ = std::fs::remove_file(to.join("store.json"));
        to
    }

    pub fn start(dir: &Path, n: usize) -> Self {
        Self::start_with_lease(dir, n, "10s")
    }

    fn start_with_lease(dir: &Path, n: usize, lease_ttl: &str) -> Self {
        Self::start_on(dir, n, lease_ttl, On::Embedded)
    }

    /// A handle on a federation someone else started from `dir` (not killed on drop).
    pub fn attach(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            child: None,
            addr: std::fs::read_to_string(dir.join("address"))
                .unwrap()
                .trim()
                .to_owned(),
            log: dir.join("attached.log"),
        }
    }

    pub fn start_on(dir: &Path, n: usize, lease_ttl: &str, on: On) -> Self {
        Self::start_listening(dir, n, lease_ttl, on, "127.0.0.1:0")
    }

    /// [`Fed::start_on`], listening on `listen`.
    pub fn start_listening(dir: &Path, n: usize, lease_ttl: &str, on: On, listen: &str) -> Self {
        let _ = std::fs::remove_file(dir.join("address"));
        let _ = std::fs::remove_file(dir.join("admin_address"));
        let log = dir.join(format!("serve-{n}.log"));
        let mut args = vec![
            "federation",
            "serve",
            "--dir",
            dir.to_str().unwrap(),
            "--listen",
            listen,
            "--admin",
            "127.0.0.1:0",
            "--lease-ttl",
            lease_ttl,
        ];
        match on {
            On::Embedded => {}
            On::Etcd(etcd, prefix) => {
                args.extend(["--etcd", etcd.endpoint.as_str(), "--etcd-prefix", prefix]);
            }
            On::Endpoints(endpoints, prefix) => {
                args.extend(["--etcd", endpoints, "--etcd-prefix", prefix]);
            }
        }
        let child = spawn_meshfed(&args, &log).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        let addr = loop {
            if let (Ok(a), true) = (
                std::fs::read_to_string(dir.join("address")),
                dir.join("admin_address").exists(),
            ) {
                break a.trim().to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "federation did not start:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Self {
            dir: dir.to_owned(),
            child: Some(child),
            addr,
            log,
        }
    }

    /// A sample from the federation's /metrics, or 0.
    pub async fn metric(&self, prefix: &str) -> f64 {
        let admin: std::net::SocketAddr = std::fs::read_to_string(self.dir.join("admin_address"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let text = http_get(admin, "/metrics").await.unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits up to `within` for `/ready` to give `status`, and returns its body.
    pub async fn wait_ready(&self, status: u16, within: Duration) -> String {
        let admin: std::net::SocketAddr = std::fs::read_to_string(self.dir.join("admin_address"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        wait_ready(admin, status, within, || {
            std::fs::read_to_string(&self.log).unwrap_or_default()
        })
        .await
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn token(&self, site: &str, ttl: &str) -> String {
        let out = Command::new(BIN)
            .args([
                "federation",
                "token",
                "create",
                "--dir",
                self.dir.to_str().unwrap(),
                "--site",
                site,
                "--ttl",
                ttl,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

impl Drop for Fed {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sites `names`, each with its own CA (trust domain `<name>.example.org`), joined to
/// `fed` with a token each.
pub(crate) fn joined<const N: usize>(
    scratch: &Scratch,
    fed: &Fed,
    names: [&str; N],
) -> [SiteFiles; N] {
    names.map(|n| {
        let s = scratch.site(n, &format!("{n}.example.org"));
        assert_eq!(join(&s, n, &fed.token(n, "1h")).0, 0, "{n} joins");
        s
    })
}

/// A gateway config that runs from the federation, its imports listening on `ip`.
pub(crate) fn fed_config(s: &SiteFiles, ip: [u8; 4]) -> meshfed_lab::ConfigBuilder {
    meshfed_lab::ConfigBuilder {
        federation: Some((s.dir.clone(), ip.into())),
        reload_interval: Some(RELOAD),
        ..Default::default()
    }
}

/// `meshfed site join`; returns (exit code, stderr).
pub(crate) fn join(site: &SiteFiles, name: &str, token: &str) -> (i32, String) {
    let out = Command::new(BIN)
        .args([
            "site",
            "join",
            "--dir",
            site.dir.to_str().unwrap(),
            "--site",
            name,
            "--gateway-address",
            "127.0.0.1:15443",
            token,
        ])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub(crate) async fn client(
    fed: &Fed,
    site: &SiteFiles,
    cert: &Path,
    key: &Path,
) -> pb::federation_client::FederationClient<tonic::transport::Channel> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let b = BundleSet::read_bundle_file(
        &site.dir.join("bundles/fed.example.org.json"),
        Some(&TrustDomain::new("fed.example.org").unwrap()),
    )
    .unwrap();
    meshfed_api::client::client(std::slice::from_ref(&fed.addr), b, cert, key)
        .await
        .unwrap()
}

pub(crate) fn export(svc: &str) -> pb::ServiceExport {
    pb::ServiceExport {
        service: svc.into(),
        ports: vec![pb::Port {
            app_protocol: Default::default(),
            port: 8080,
            protocol: "tcp".into(),
            name: "http".into(),
        }],
        ready_endpoints: 2,
        ..Default::default()
    }
}

pub(crate) async fn publish(
    c: &mut pb::federation_client::FederationClient<tonic::transport::Channel>,
    site: &str,
    exports: Vec<pb::ServiceExport>,
) -> Result<pb::PublishResponse, tonic::Status> {
    c.publish(pb::PublishRequest {
        site: site.into(),
        exports,
        gateway_addresses: vec![],
        outbound_only: false,
    })
    .await
    .map(|r| r.into_inner())
}

/// The next event, its changes decoded ([`meshfed_api::parts::event`]).
pub(crate) async fn next_event(s: &mut tonic::Streaming<pb::WatchFrame>) -> pb::WatchEvent {
    let frame = tokio::time::timeout(Duration::from_secs(5), s.next())
        .await
        .expect("watch event in time")
        .expect("stream open")
        .expect("event");
    meshfed_api::parts::event(frame).expect("changes decode")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_publish_watch_and_typed_refusals() {
    let scratch = Scratch::new("fed");
    let fed = Fed::start(&Fed::init(&scratch), 0);
    let west = scratch.site("west", "west.example.org");
    let east = scratch.site("east", "east.example.org");

    // One token per site, each good once.
    let tw = fed.token("west", "1h");
    assert_eq!(join(&west, "west", &tw).0, 0);
    let (code, err) = join(&west, "west", &tw);
    assert_eq!(code, 1);
    assert!(
        err.contains("token_reused") && err.contains("already used"),
        "{err}"
    );
    let te = fed.token("east", "1h");
    let (code, err) = join(&east, "south", &te);
    assert!(code == 1 && err.contains("token_wrong_site"), "{err}");
    let te = fed.token("east", "1h");
    assert_eq!(join(&east, "east", &te).0, 0);
    let short = fed.token("north", "1s");
    std::thread::sleep(Duration::from_millis(1500));
    let north = scratch.site("north", "north.example.org");
    let (code, err) = join(&north, "north", &short);
    assert!(
        code == 1 && err.contains("token_expired") && err.contains("expired"),
        "{err}"
    );
    // East received every bundle known when it joined: west's and the federation's.
    assert!(east.dir.join("bundles/west.example.org.json").exists());

    let mut wc = client(&fed, &west, &west.cert, &west.key).await;
    let mut ec = client(&fed, &east, &east.cert, &east.key).await;

    let mut watch = ec
        .watch(pb::WatchRequest {
            parts: false,
            from_revision: None,
            gateway_address: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = next_event(&mut watch).await;
    assert!(first.snapshot);
    assert_eq!(first.changes.len(), 2, "two sites: {first:?}");

    let r = publish(&mut wc, "west", vec![export("orders.shop")])
        .await
        .unwrap();
    assert_eq!(r.changes, 1);
    let ev = next_event(&mut watch).await;
    assert!(!ev.snapshot);
    assert_eq!(ev.revision, r.revision);
    match &ev.changes[0].op {
        Some(pb::change::Op::PutExport(pe)) => {
            assert_eq!(pe.site, "west");
            assert_eq!(pe.export.as_ref().unwrap().service, "orders.shop");
        }
        other => panic!("{other:?}"),
    }
    // Publishing the same set again changes nothing.
    let again = publish(&mut wc, "west", vec![export("orders.shop")])
        .await
        .unwrap();
    assert_eq!((again.changes, again.revision), (0, r.revision));

    // West may not publish for east.
    let s = publish(&mut wc, "east", vec![export("evil.shop")])
        .await
        .unwrap_err();
    assert_eq!(
        (s.code(), reason_of(&s)),
        (tonic::Code::PermissionDenied, Some("publish_foreign_site"))
    );
    // Nor may a certificate from east's CA that claims to be west's gateway.
    let east_ca = meshfed_identity::Ca::load(&east.dir.join("ca")).unwrap();
    let forged = east_ca
        .issue(
            &meshfed_identity::SpiffeId::new("spiffe://east.example.org/meshfed/site/west/gateway")
                .unwrap(),
            Duration::from_secs(600),
        )
        .unwrap();
    let (fc, fk) = (scratch.0.join("forged.pem"), scratch.0.join("forged.key"));
    forged.save(&fc, &fk).unwrap();
    let mut forger = client(&fed, &east, &fc, &fk).await;
    let s = publish(&mut forger, "west", vec![]).await.unwrap_err();
    assert_eq!(reason_of(&s), Some("publish_foreign_site"), "{s:?}");
    // Bad input names the field.
    let mut bad = export("orders.shop");
    bad.ports[0].protocol = "sctp".into();
    let s = publish(&mut wc, "west", vec![bad]).await.unwrap_err();
    assert!(
        reason_of(&s) == Some("bad_request")
            && s.message().contains("exports[0].ports[0].protocol"),
        "{s:?}"
    );
    let logs = std::fs::read_to_string(&fed.log).unwrap();
    assert!(
        logs.contains("publish_foreign_site"),
        "refusals are logged with their reason"
    );
    let m = |r: &str| format!("meshfed_federation_refusals_total{{reason=\"{r}\"}}");
    assert_eq!(fed.metric(&m("publish_foreign_site")).await, 2.0);
    assert_eq!(fed.metric(&m("token_reused")).await, 1.0);
    assert_eq!(fed.metric(&m("token_expired")).await, 1.0);
    assert_eq!(fed.metric(&m("token_wrong_site")).await, 1.0);
    assert_eq!(fed.metric("meshfed_federation_watchers").await, 1.0);

    // Resume from the publish: only what came after.
    publish(
        &mut wc,
        "west",
        vec![export("orders.shop"), export("db.prod")],
    )
    .await
    .unwrap();
    let mut resumed = ec
        .watch(pb::WatchRequest {
            parts: false,
            from_revision: Some(r.revision),
            gateway_address: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let ev = next_event(&mut resumed).await;
    assert!(!ev.snapshot, "the federation still has the history");
    assert_eq!(ev.changes.len(), 1, "{ev:?}");
    assert!(ev.changes[0].revision > r.revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_restart_keeps_revisions_monotonic() {
    let scratch = Scratch::new("fedrestart");
    let dir = Fed::init(&scratch);
    let mut fed = Fed::start(&dir, 0);
    let west = scratch.site("west", "west.example.org");
    assert_eq!(join(&west, "west", &fed.token("west", "1h")).0, 0);
    let mut wc = client(&fed, &west, &west.cert, &west.key).await;
    let before = publish(&mut wc, "west", vec![export("a.b")])
        .await
        .unwrap()
        .revision;
    tokio::time::sleep(Duration::from_millis(200)).await; // let the debounced snapshot land
    fed.kill();
    let fed = Fed::start(&dir, 1);
    let mut wc = client(&fed, &west, &west.cert, &west.key).await;
    let after = publish(&mut wc, "west", vec![export("a.b"), export("c.d")])
        .await
        .unwrap()
        .revision;
    assert!(
        after > before,
        "revision went from {before} to {after} across a restart"
    );
    // The site and its export survived; a watcher from before the restart resyncs.
    let mut w = wc
        .watch(pb::WatchRequest {
            parts: false,
            from_revision: Some(before),
            gateway_address: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let ev = next_event(&mut w).await;
    assert!(ev.snapshot);
    assert_eq!(ev.changes.len(), 3, "west + a.b + c.d: {ev:?}");
}

/// Answers `<name>:` followed by the first 4 bytes it reads, then closes.
pub(crate) async fn banner_server(name: &'static str) -> std::net::SocketAddr {
    let l = listen();
    let addr = l.local_addr().unwrap();
    banner_on(name, l);
    addr
}

/// Serves the banner on `l` until the task is aborted (then the port is closed).
pub(crate) fn banner_on(
    name: &'static str,
    l: tokio::net::TcpListener,
) -> tokio::task::JoinHandle<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 4];
                if s.read_exact(&mut b).await.is_ok() {
                    let _ = s.write_all(format!("{name}:").as_bytes()).await;
                    let _ = s.write_all(&b).await;
                }
                let _ = s.shutdown().await;
            });
        }
    })
}

/// Which site answered through `addr`, or the error.
pub(crate) async fn who_answers(addr: std::net::SocketAddr) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    c.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    String::from_utf8(out).map_err(|e| e.to_string())
}

/// Waits up to 15 s until a call through `addr` is answered with `want`.
pub(crate) async fn wait_answer(addr: std::net::SocketAddr, want: &str, gw: &Gw) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match who_answers(addr).await {
            Ok(a) if a == want => return,
            r => {
                assert!(
                    Instant::now() < deadline,
                    "never answered {want:?}: {r:?}\n{}",
                    gw.logs()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A free port on `ip` for a listener a test hands to another process (an import
/// listener, etcd, openssl), which binds it a moment later.
///
/// The port comes from below the kernel's ephemeral range: a port taken by `bind(0)` is
/// in that range, and so is every outgoing connection's, so in the moment between this
/// check and the other process's bind any parallel test could take it (etcd failed CI
/// once with "address already in use" that way). Below the range only another caller
/// of this function could, and each process starts at its own random place in it.
pub(crate) fn free_port(ip: std::net::IpAddr) -> u16 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    // 10,000 ports under the range, above the well-known and registered busy ones.
    let (low, span) = (ephemeral_low.saturating_sub(10_000).max(10_000), 10_000);
    if ephemeral_low < low + span {
        // A machine whose ephemeral range starts low: nothing is outside it.
        return std::net::TcpListener::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    }
    let _ = NEXT.compare_exchange(
        u32::MAX,
        {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            (h.finish() % u64::from(span)) as u32
        },
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let port = (low + NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
        let tcp = std::net::TcpListener::bind((ip, port));
        let udp = std::net::UdpSocket::bind((ip, port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free port in {low}..{} on {ip}", low + span)
}

/// `meshfed status` from the replica in `dir`: the table, and one site's row.
fn status_row(dir: &Path, site: &str) -> (String, String) {
    let out = Command::new(BIN)
        .args(["status", "--dir", dir.to_str().unwrap()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = table
        .lines()
        .find(|l| l.starts_with(site))
        .unwrap_or_default()
        .to_owned();
    (table, row)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_run_from_the_catalog_fail_over_and_survive_the_federation() {
    gateway_scenario(On::Embedded).await;
}

/// The same on etcd, with two replicas: the one the gateways use dies after the catalog
/// converged; they move to the other and resume from their revision (no snapshot), and
/// north's lease — an etcd lease — still expires into a failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_on_etcd_replicas_move_resume_and_fail_over() {
    let etcd = Etcd::start().await;
    gateway_scenario(On::Etcd(&etcd, "/gw/")).await;
}

async fn gateway_scenario(on: On<'_>) {
    let scratch = Scratch::new("fedgw");
    let dir = Fed::init(&scratch);
    let mut feds = vec![Fed::start_on(&dir, 0, "1s", on)];
    if let On::Etcd(..) = on {
        feds.push(Fed::start_on(&Fed::replica_dir(&dir, "fed-b"), 1, "1s", on));
    }
    let fed = &feds[0];
    let east = scratch.site("east", "east.example.org");
    let west = scratch.site("west", "west.example.org");
    let north = scratch.site("north", "north.example.org");
    for (s, n) in [(&east, "east"), (&west, "west"), (&north, "north")] {
        assert_eq!(join(s, n, &fed.token(n, "1h")).0, 0);
    }
    // Each site's imports bind on its own loopback address, as on separate hosts.
    let import_ip: std::net::IpAddr = [127, 0, 0, 2].into();
    let port = free_port(import_ip);
    let ip_of = |s: &SiteFiles| -> std::net::IpAddr {
        match s.site.as_str() {
            "east" => [127, 0, 0, 2],
            "west" => [127, 0, 0, 3],
            _ => [127, 0, 0, 4],
        }
        .into()
    };
    let fed_cfg = |s: &SiteFiles| meshfed_lab::ConfigBuilder {
        federation: Some((s.dir.clone(), ip_of(s))),
        reload_interval: Some(RELOAD),
        ..Default::default()
    };
    let west_gw = Gw::start(
        &west,
        &fed_cfg(&west).export("orders.shop", port, vec![banner_server("west").await]),
    )
    .unwrap();
    let mut north_gw = Gw::start(
        &north,
        &fed_cfg(&north).export("orders.shop", port, vec![banner_server("north").await]),
    )
    .unwrap();
    let east_cfg = fed_cfg(&east);
    let mut east_gw = Gw::start(&east, &east_cfg).unwrap();
    let import = std::net::SocketAddr::new(import_ip, port);

    // East learns the import and both backends from the catalog.
    // North answers once east has both sites (equal capacity: ordered by name).
    wait_answer(import, "north:ping", &east_gw).await;

    if feds.len() > 1 {
        // Gateways use the first token address that answers: kill that replica.
        let first = feds
            .iter()
            .enumerate()
            .min_by_key(|(_, f)| f.addr.clone())
            .map(|(i, _)| i)
            .unwrap();
        feds.remove(first).kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let logs = east_gw.logs();
            let starts: Vec<&str> = logs
                .lines()
                .filter(|l| l.contains("watching the catalog"))
                .collect();
            if starts.len() >= 2 {
                let last = starts.last().unwrap();
                assert!(
                    last.contains("snapshot=false") && last.contains("from=Some("),
                    "east resumed on the other replica with a full resync: {last}"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "east never moved to the other replica:\n{logs}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut fed = feds.pop().unwrap();
    drop(feds);

    // North's gateway crashes: clients still get an answer, from west.
    north_gw.kill();
    let started = Instant::now();
    assert_eq!(
        who_answers(import).await.unwrap(),
        "west:ping",
        "failover is invisible to the client"
    );
    let first_failover = started.elapsed();
    let started = Instant::now();
    assert_eq!(who_answers(import).await.unwrap(), "west:ping");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "later connections fail over fast: {:?}",
        started.elapsed()
    );
    assert!(east_gw.metric("meshfed_gateway_failovers_total").await >= 1.0);
    eprintln!("first failover took {first_failover:?}");

    // North's lease expires: the federation marks it down, east drops it from the
    // backends, and new connections no longer even try it.
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let (table, north) = status_row(&fed.dir, "north");
        if north.contains(" down ") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "north's lease never expired:\n{table}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // East re-routes: connections reach west without trying north first.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let before = east_gw.metric("meshfed_gateway_failovers_total").await;
        let started = Instant::now();
        assert_eq!(who_answers(import).await.unwrap(), "west:ping");
        let took = started.elapsed();
        if east_gw.metric("meshfed_gateway_failovers_total").await == before
            && took < Duration::from_millis(500)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "east kept trying north after its lease expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The operator's view, with each gateway's links (transport and why) as they
    // report them.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (table, _) = status_row(&fed.dir, "east");
        let link = |peer: &str, state: &str| {
            table
                .lines()
                .any(|l| l.contains(&format!("link → {peer} ")) && l.contains(state))
        };
        if link("west", "quic: auto: QUIC handshake completed") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed east's links:\n{table}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (table, _) = status_row(&fed.dir, "east");
    let row = |site: &str| status_row(&fed.dir, site).1;
    assert!(row("north").contains(" down "), "{table}");
    assert!(
        row("west").contains(" up ") && row("west").contains(&format!("orders.shop:{port}")),
        "{table}"
    );
    assert!(
        row("east").ends_with(&format!("orders.shop:{port}")),
        "east imports it: {table}"
    );
    let east_seen: u64 = row("east")
        .split_whitespace()
        .nth(4)
        .unwrap()
        .parse()
        .unwrap();
    assert!(east_seen > 0, "{table}");
    // The same facts for scripts: `status --json`.
    let out = Command::new(BIN)
        .args(["status", "--json", "--dir", fed.dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let site = |name: &str| {
        doc["sites"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["site"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} missing: {doc:#}"))
    };
    assert_eq!(doc["federation"], "fed.example.org");
    assert_eq!(site("north")["lease"], "down", "{doc:#}");
    assert_eq!(site("west")["lease"], "up", "{doc:#}");
    assert_eq!(
        site("east")["imports"],
        serde_json::json!([format!("orders.shop:{port}")])
    );
    // West's addresses include the one it joined with, where no gateway listens: that
    // link is down; the one to its gateway is up, on QUIC.
    let to_west: Vec<serde_json::Value> = site("east")["links"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["peer_site"] == "west")
        .cloned()
        .collect();
    assert!(
        to_west
            .iter()
            .any(|l| l["transport"] == "quic" && l["up"] == true),
        "{doc:#}"
    );
    assert!(
        to_west
            .iter()
            .all(|l| (l["up"] == true) == l["transport"].is_string()),
        "{doc:#}"
    );

    // The federation goes away and east restarts: it serves from its cached catalog.
    fed.kill();
    east_gw.kill();
    let east_gw = Gw::start(&east, &east_cfg).unwrap();
    wait_answer(import, "west:ping", &east_gw).await;
    assert!(
        east_gw
            .wait_log("serving from the cached catalog", Duration::from_secs(10))
            .await
    );
    // Its cached catalog is applied: it is ready with no federation.
    east_gw.wait_ready(200, Duration::from_secs(5)).await;
    drop(west_gw);
}

/// A federated gateway is not ready until it has applied a catalog: before the
/// federation first answers (and with no cached catalog) its imports are not bound, and
/// `/ready` says why. It turns ready once the federation is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_gateway_is_ready_only_once_it_has_applied_a_catalog() {
    let scratch = Scratch::new("fedready");
    let dir = Fed::init(&scratch);
    let mut fed = Fed::start(&dir, 0);
    let east = scratch.site("east", "east.example.org");
    assert_eq!(join(&east, "east", &fed.token("east", "1h")).0, 0);
    let addr = fed.addr.clone();
    fed.kill();
    let gw = Gw::start(
        &east,
        &meshfed_lab::ConfigBuilder {
            federation: Some((east.dir.clone(), [127, 0, 0, 2].into())),
            reload_interval: Some(RELOAD),
            ..Default::default()
        },
    )
    .unwrap();
    let body = gw.wait_ready(503, Duration::from_secs(5)).await;
    assert!(body.contains("no catalog applied yet"), "{body}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, body) = meshfed_lifecycle::admin::get(gw.admin, "/ready")
        .await
        .unwrap();
    assert_eq!(status, 503, "ready with no catalog: {body}");

    let fed = Fed::start_listening(&dir, 1, "10s", On::Embedded, &addr);
    gw.wait_ready(200, Duration::from_secs(15)).await;
    assert_eq!(fed.wait_ready(200, Duration::from_secs(1)).await, "ready\n");
}

/// A full disk under the embedded store: a publish inside the store's reservation is
/// still acknowledged and served, `/ready` turns false naming the failing snapshot
/// write, and turns true again on its own once space frees, with the publish on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_makes_the_federation_unready_until_space_frees() {
    let scratch = Scratch::new("fedfull");
    let mnt = scratch.0.join("fed");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a tmpfs needs root");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let dir = Fed::init(&scratch);
    assert_eq!(dir, mnt);
    let fed = Fed::start(&dir, 0);
    let west = scratch.site("west", "west.example.org");
    assert_eq!(join(&west, "west", &fed.token("west", "1h")).0, 0);
    fed.wait_ready(200, Duration::from_secs(5)).await;
    let mut wc = client(&fed, &west, &west.cert, &west.key).await;

    // Fill the disk.
    let fill = dir.join("fill");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&fill).unwrap();
        let chunk = vec![0u8; 16 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    publish(&mut wc, "west", vec![export("orders.shop")])
        .await
        .expect("a publish inside the reservation is acknowledged");
    let body = fed.wait_ready(503, Duration::from_secs(5)).await;
    assert!(body.contains("snapshot writes failing"), "{body}");
    // Still served to watchers.
    let mut watch = wc
        .watch(pb::WatchRequest {
            parts: false,
            from_revision: None,
            gateway_address: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let ev = next_event(&mut watch).await;
    assert!(
        format!("{ev:?}").contains("orders.shop"),
        "the acknowledged publish is not served: {ev:?}"
    );

    std::fs::remove_file(&fill).unwrap();
    fed.wait_ready(200, Duration::from_secs(5)).await;
    let snap = std::fs::read_to_string(dir.join("store.json")).unwrap();
    assert!(
        snap.contains("orders.shop"),
        "the snapshot lacks the publish"
    );
}

/// The federation's `/metrics`, after joins, a publish and a watch, pass `promtool check
/// metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_metrics_pass_promtool() {
    let scratch = Scratch::new("fedprom");
    let fed = Fed::start(&Fed::init(&scratch), 0);
    let west = scratch.site("west", "west.example.org");
    assert_eq!(join(&west, "west", &fed.token("west", "1h")).0, 0);
    let mut wc = client(&fed, &west, &west.cert, &west.key).await;
    publish(&mut wc, "west", vec![export("orders.shop")])
        .await
        .unwrap();
    let mut watch = wc
        .watch(pb::WatchRequest {
            parts: false,
            from_revision: None,
            gateway_address: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    next_event(&mut watch).await;
    let admin: std::net::SocketAddr = std::fs::read_to_string(fed.dir.join("admin_address"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let text = http_get(admin, "/metrics").await.unwrap();
    assert!(
        text.contains("meshfed_federation_publishes_total"),
        "{text}"
    );
    // Lease state and revision lag per site, read at the scrape; commit latency.
    assert!(
        text.contains("meshfed_federation_site_up{site=\"west\"} 1"),
        "{text}"
    );
    let revision: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("meshfed_federation_revision "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no revision: {text}"));
    assert!(revision > 0);
    assert!(
        text.contains("meshfed_federation_site_revision_lag{site=\"west\"} 0"),
        "west watched up to the head: {text}"
    );
    assert!(
        text.lines()
            .any(|l| l
                .starts_with("meshfed_federation_store_commit_seconds_count{store=\"embedded\"} ")),
        "{text}"
    );
    crate::tunnel::promtool_check(&text).unwrap_or_else(|e| panic!("promtool: {e}\n{text}"));
}

/// Headless chromium on `url`: the DOM after its scripts ran (at most 5 s of virtual
/// time), with its own profile directory.
pub(crate) fn chromium_dom(url: &str, profile: &Path) -> String {
    let out = Command::new("chromium")
        .args(CHROMIUM)
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(url)
        .output()
        .expect("chromium runs (Debian chromium; deploy/setup-dev.sh installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const CHROMIUM: [&str; 5] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--virtual-time-budget=5000",
];

/// Headless chromium on `url`: the DOM after its scripts ran, and a screenshot at `png`.
fn chromium(url: &str, profile: &Path, png: &Path) -> String {
    let base = |c: &mut Command| {
        c.args(CHROMIUM)
            .arg(format!("--user-data-dir={}", profile.display()));
    };
    let dom = chromium_dom(url, profile);
    let mut shot = Command::new("chromium");
    base(&mut shot);
    let s = shot
        .arg("--window-size=1000,1300")
        .arg(format!("--screenshot={}", png.display()))
        .arg(url)
        .output()
        .unwrap();
    assert!(
        png.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&s.stderr)
    );
    dom
}

/// The federation's topology page in a real browser: three sites with their links and
/// traffic, the service's exporters and importers; once north's gateway dies and its
/// lease expires, the page shows north down. The screenshots are kept under
/// `target/tmp/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_topology_page_shows_the_sites_and_a_site_going_down() {
    let scratch = Scratch::new("topology");
    let dir = Fed::init(&scratch);
    let fed = Fed::start_on(&dir, 0, "1s", On::Embedded);
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
    let mut north_gw = Gw::start(
        &north,
        &fed_config(&north, [127, 0, 0, 4]).export(
            "orders.shop",
            port,
            vec![banner_server("north").await],
        ),
    )
    .unwrap();
    let east_gw = Gw::start(&east, &fed_config(&east, [127, 0, 0, 2])).unwrap();
    let import = std::net::SocketAddr::new(import_ip, port);
    wait_answer(import, "north:ping", &east_gw).await;
    let admin = std::fs::read_to_string(dir.join("admin_address")).unwrap();
    let url = format!("http://{}/topology", admin.trim());
    let artifacts = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let profile = scratch.0.join("chromium");

    // Links reported with traffic (east reports every 2 s while it changes).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        for _ in 0..5 {
            let _ = who_answers(import).await;
        }
        let t: serde_json::Value = serde_json::from_str(
            &http_get(admin.trim().parse().unwrap(), "/topology.json")
                .await
                .unwrap(),
        )
        .unwrap();
        let busy = t["links"].as_array().unwrap().iter().any(|l| {
            l["from"] == "east"
                && l["transport"] == "quic"
                && l["sent_bps"].as_f64().unwrap_or(0.0) > 0.0
        });
        if busy {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no link with traffic from east: {t:#}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let dom = chromium(&url, &profile, &artifacts.join("topology-up.png"));
    for site in ["east", "west", "north"] {
        assert!(
            dom.contains(&format!(r#"data-site="{site}" data-state="up""#)),
            "{site} not shown up:\n{dom}"
        );
    }
    assert!(
        dom.contains(r#"data-from="east""#) && dom.contains(r#"data-transport="quic""#),
        "{dom}"
    );
    assert!(dom.contains("orders.shop"), "{dom}");

    // North's gateway dies; its lease expires; the page shows it down.
    north_gw.kill();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, row) = status_row(&dir, "north");
        if row.contains(" down ") {
            break;
        }
        assert!(Instant::now() < deadline, "north's lease never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dom = chromium(&url, &profile, &artifacts.join("topology-north-down.png"));
    assert!(
        dom.contains(r#"data-site="north" data-state="down""#),
        "north not shown down:\n{dom}"
    );
    assert!(dom.contains(r#"data-site="west" data-state="up""#), "{dom}");
    eprintln!(
        "screenshots: {} and {}",
        artifacts.join("topology-up.png").display(),
        artifacts.join("topology-north-down.png").display()
    );
}

/// Issue 19 (scale): a catalog whose snapshot is past gRPC's 4 MiB message limit. Three
/// sites publish 30,000 services each (about 6 MiB of changes). A watcher that takes one
/// message per event (as every gateway did before) cannot receive the snapshot at all:
/// its stream fails with the message-size error, so a gateway of such a federation never
/// synced. A watcher that asks for `parts` gets the snapshot in parts of about 1 MiB,
/// and then a large delta (one site's 30,000 services changed at once) the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_past_the_grpc_message_limit_arrives_in_parts() {
    use meshfed_api::parts::Assembler;
    let scratch = Scratch::new("fed-parts");
    let fed = Fed::start(&Fed::init(&scratch), 0);
    let sites = joined(&scratch, &fed, ["west", "east", "north"]);
    const EACH: usize = 30_000;
    let many = |site: &str, ready: u32| -> Vec<pb::ServiceExport> {
        (0..EACH)
            .map(|i| pb::ServiceExport {
                ready_endpoints: ready,
                ..export(&format!("service-number-{i:05}.{site}-namespace"))
            })
            .collect()
    };
    for s in &sites {
        let mut c = client(&fed, s, &s.cert, &s.key).await;
        let r = publish(&mut c, &s.site, many(&s.site, 2)).await.unwrap();
        assert_eq!(r.changes as usize, EACH);
    }
    let s = &sites[1];
    let mut c = client(&fed, s, &s.cert, &s.key).await;
    // One message per event: the snapshot cannot be received.
    let mut whole = watch_from(&mut c, None, false).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(20), whole.next())
        .await
        .expect("an answer in time")
        .expect("the stream yields")
    {
        Err(e) => assert!(e.message().contains("message length too large"), "{e:?}"),
        Ok(ev) => panic!(
            "a snapshot of {} changes ({} bytes) arrived in one message",
            ev.changes.len(),
            prost::Message::encoded_len(&ev)
        ),
    }

    // In parts: every part within the limit, the whole put back together.
    let mut watch = watch_from(&mut c, None, true).await.unwrap();
    let mut a = Assembler::default();
    let mut n = 0;
    let snapshot = loop {
        n += 1;
        if let Some(ev) = a.push(next_event(&mut watch).await).unwrap() {
            break ev;
        }
    };
    assert!(snapshot.snapshot);
    let exports = snapshot
        .changes
        .iter()
        .filter(|c| matches!(c.op, Some(pb::change::Op::PutExport(_))))
        .count();
    eprintln!("snapshot: {} changes in {n} parts", snapshot.changes.len());
    assert_eq!(exports, 3 * EACH);
    assert!(n >= 6, "about 1 MiB per part: {n}");
    // A delta as large: north changes all of its services at once.
    let north = &sites[2];
    let mut nc = client(&fed, north, &north.cert, &north.key).await;
    let r = publish(&mut nc, "north", many("north", 3)).await.unwrap();
    let mut n = 0;
    let delta = loop {
        n += 1;
        if let Some(ev) = a.push(next_event(&mut watch).await).unwrap() {
            break ev;
        }
    };
    assert!(!delta.snapshot);
    assert_eq!(delta.revision, r.revision);
    assert_eq!(delta.changes.len(), EACH, "in {n} parts");
    assert!(n >= 2, "{n}");
}

/// Before: SIGTERM to a federation with a watching gateway never finished: the gRPC
/// server's graceful shutdown waited for every stream to end, and Watch and Bundles
/// streams never end by themselves, so a restart (an upgrade) hung until someone sent
/// SIGKILL. Now the drain ends them with the typed `draining` refusal first: the
/// federation exits within seconds, and the watcher resumes from its revision when it
/// comes back on the same address, with no snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_watch_streams_and_the_watcher_resumes_after_the_restart() {
    let scratch = Scratch::new("fed-term");
    let dir = Fed::init(&scratch);
    let listen = format!("127.0.0.1:{}", free_port([127, 0, 0, 1].into()));
    let mut fed = Fed::start_listening(&dir, 0, "10s", On::Embedded, &listen);
    let [west, east] = joined(&scratch, &fed, ["west", "east"]);
    let mut wc = client(&fed, &west, &west.cert, &west.key).await;
    let mut ec = client(&fed, &east, &east.cert, &east.key).await;
    let r = publish(&mut wc, "west", vec![export("orders.shop")])
        .await
        .unwrap();
    let mut watch = watch_from(&mut ec, None, true).await.unwrap();
    let first = next_event(&mut watch).await;
    assert!(first.snapshot && first.revision >= r.revision);
    let mut bundles = ec
        .bundles(pb::BundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(bundles.next().await.unwrap().is_ok());

    let at = Instant::now();
    let pid = fed.pid();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    // Both streams end with the typed refusal.
    for (what, end) in [
        ("watch", next_status(&mut watch).await),
        ("bundles", next_status(&mut bundles).await),
    ] {
        assert_eq!(
            meshfed_api::reason_of(&end),
            Some("draining"),
            "{what}: {end:?}"
        );
    }
    while fed.alive() {
        assert!(
            at.elapsed() < Duration::from_secs(10),
            "the federation did not exit within 10 s of SIGTERM with streams open\n{}",
            std::fs::read_to_string(&fed.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("exited {:?} after SIGTERM", at.elapsed());

    // Back on the same address: the watch resumes from its revision, with no snapshot.
    let _fed = Fed::start_listening(&dir, 1, "10s", On::Embedded, &listen);
    let mut watch = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match watch_from(&mut ec, Some(first.revision), true).await {
                Ok(w) => break w,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .expect("the watch resumes at the restarted federation");
    let resumed = next_event(&mut watch).await;
    assert!(!resumed.snapshot, "resumed, not a snapshot: {resumed:?}");
    assert_eq!(resumed.revision, first.revision);
    let r = publish(
        &mut wc,
        "west",
        vec![export("orders.shop"), export("pay.shop")],
    )
    .await
    .unwrap();
    let ev = next_event(&mut watch).await;
    assert_eq!((ev.snapshot, ev.revision), (false, r.revision));
}

/// The status a stream ends with (its next item must be an error).
async fn next_status<T: std::fmt::Debug>(s: &mut tonic::Streaming<T>) -> tonic::Status {
    match tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("the stream ends in time")
    {
        Some(Err(st)) => st,
        other => panic!("expected an error status, got {other:?}"),
    }
}

/// Before: a gateway bound a listener for every import the catalog offered, each a
/// descriptor, with no bound but the open-file limit. A catalog larger than the limit
/// (here 60 imports at 64 descriptors) took every descriptor: binds failed one by one,
/// each logged, and nothing was left for connections. Now the listeners get half the
/// limit (32); the rest stay unbound (`meshfed_gateway_imports_unbound`, one warning),
/// and the bound imports carry traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_past_the_listener_budget_leaves_descriptors_for_connections() {
    let scratch = Scratch::new("fed-budget");
    let fed = Fed::start(&Fed::init(&scratch), 0);
    let [west, east, north] = joined(&scratch, &fed, ["west", "east", "north"]);
    // North's 10 services sort first: the first plan binds them before west's.
    let mut nc = client(&fed, &north, &north.cert, &north.key).await;
    let north_services = (0..10u32)
        .map(|i| {
            let mut e = export(&format!("a{i}.demo"));
            e.ports[0].port = 9000 + i;
            e
        })
        .collect();
    publish(&mut nc, "north", north_services).await.unwrap();
    let echo = echo_server().await;
    let mut wc = fed_config(&west, [127, 0, 0, 3]);
    for i in 0..60u16 {
        wc = wc.export(&format!("svc{i}.demo"), 7100 + i, vec![echo]);
    }
    let west_gw = Gw::start(&west, &wc).unwrap();
    let east_gw = Gw::start_in(
        &["prlimit", "--nofile=64:64", "--"],
        &east,
        &fed_config(&east, [127, 0, 0, 2]),
    )
    .unwrap();
    let unbound = east_gw
        .wait_metric(
            "meshfed_gateway_imports_unbound",
            38.0,
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(unbound, 38.0, "{}", east_gw.logs());
    assert_eq!(east_gw.metric("meshfed_gateway_imports_bound").await, 32.0);
    // North withdraws its services: the listeners they free go to west's that waited
    // (the gateway applies only what changed, so it must try those again).
    publish(&mut nc, "north", vec![]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut unbound = 38.0;
    while unbound != 28.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        unbound = east_gw.metric("meshfed_gateway_imports_unbound").await;
    }
    assert_eq!(unbound, 28.0, "{}", east_gw.logs());
    assert_eq!(east_gw.metric("meshfed_gateway_imports_bound").await, 32.0);
    let logs = east_gw.logs();
    assert_eq!(
        logs.matches("listener budget is spent").count(),
        2,
        "one warning when the budget ran out and one when freed listeners went to waiting imports, not one per import:\n{logs}"
    );
    assert!(!logs.contains("import listener not bound"), "{logs}");
    // `imports.json` follows (it is written with the catalog cache, just after).
    let read = || -> Option<meshfed_catalog::routing::ImportListeners> {
        serde_json::from_slice(
            &std::fs::read(east.dir.join(meshfed_catalog::routing::IMPORTS_FILE)).ok()?,
        )
        .ok()
    };
    let only_west = |l: &meshfed_catalog::routing::ImportListeners| {
        l.imports.len() == 32
            && l.imports
                .iter()
                .all(|l| l.service.name().starts_with("svc"))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut listeners = read();
    while !listeners.as_ref().is_some_and(only_west) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        listeners = read();
    }
    let listeners = listeners.unwrap();
    assert!(only_west(&listeners), "{listeners:?}");
    // The bound imports carry traffic, several connections at once.
    let tasks: Vec<_> = listeners.imports[..8]
        .iter()
        .map(|l| {
            let addr = l.listen;
            tokio::spawn(async move { echo_once(addr).await })
        })
        .collect();
    for t in tasks {
        t.await
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}\n{}", east_gw.logs()));
    }
    drop(west_gw);
}

/// A Watch from `from` (`None`: a snapshot first), in parts or not.
async fn watch_from(
    c: &mut pb::federation_client::FederationClient<tonic::transport::Channel>,
    from: Option<u64>,
    parts: bool,
) -> Result<tonic::Streaming<pb::WatchFrame>, tonic::Status> {
    c.watch(pb::WatchRequest {
        parts,
        from_revision: from,
        gateway_address: String::new(),
    })
    .await
    .map(tonic::Response::into_inner)
}
