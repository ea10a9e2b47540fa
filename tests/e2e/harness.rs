//! Starts real `meshfed` processes on loopback, with real certificates and configs, and
//! gives tests the addresses they bound, their logs and their metrics.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use meshfed_lab::{self as lab, ConfigBuilder, SiteFiles};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

pub const BIN: &str = env!("CARGO_BIN_EXE_meshfed");

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "meshfed-e2e-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Self(p)
    }

    pub fn site(&self, site: &str, td: &str) -> SiteFiles {
        lab::make_site(&self.0, site, td).expect("make site")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Runs `meshfed ARGS` to the end; (exit code, stdout, stderr).
pub fn meshfed(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run meshfed");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts `meshfed ARGS` with its log (stderr) in `log`.
pub fn spawn_meshfed(args: &[&str], log: &Path) -> Result<Child> {
    spawn_meshfed_in(&[], args, log)
}

/// Starts `WRAPPER... meshfed ARGS` (e.g. `prlimit --nofile=64:64 --`), which must exec
/// meshfed in its own process.
pub fn spawn_meshfed_in(wrapper: &[&str], args: &[&str], log: &Path) -> Result<Child> {
    let mut cmd = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    cmd.args(args)
        .env("RUST_LOG", "info,meshfed_gateway=debug")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .context("spawning meshfed")
}

/// A running `meshfed gateway run` process.
pub struct Gw {
    child: Option<Child>,
    pub log: PathBuf,
    pub quic: SocketAddr,
    pub admin: SocketAddr,
    pub imports: serde_json::Value,
    /// The in-gateway DNS server's address, when configured.
    pub dns: Option<SocketAddr>,
}

impl Gw {
    /// Writes the config and starts the gateway; returns once it is ready.
    pub fn start(site: &SiteFiles, cfg: &ConfigBuilder) -> Result<Self> {
        let config = cfg.write(site)?;
        Self::start_config(&config, &site.dir)
    }

    pub fn start_config(config: &Path, dir: &Path) -> Result<Self> {
        Self::start_config_in(&[], config, dir)
    }

    /// Starts the gateway under `wrapper` (see [`spawn_meshfed_in`]).
    pub fn start_in(wrapper: &[&str], site: &SiteFiles, cfg: &ConfigBuilder) -> Result<Self> {
        let config = cfg.write(site)?;
        Self::start_config_in(wrapper, &config, &site.dir)
    }

    fn start_config_in(wrapper: &[&str], config: &Path, dir: &Path) -> Result<Self> {
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let log = dir.join(format!(
            "gateway-{}.log",
            STARTS.fetch_add(1, Ordering::Relaxed)
        ));
        let child = spawn_meshfed_in(
            wrapper,
            &[
                "gateway",
                "run",
                "-c",
                &config.display().to_string(),
                "--ready-file",
                &ready.display().to_string(),
            ],
            &log,
        )?;
        let mut gw = Self {
            child: Some(child),
            log,
            quic: ([0, 0, 0, 0], 0).into(),
            admin: ([0, 0, 0, 0], 0).into(),
            imports: serde_json::Value::Null,
            dns: None,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready)
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            {
                gw.quic = v["quic"].as_str().unwrap_or_default().parse()?;
                gw.admin = v["admin"].as_str().unwrap_or_default().parse()?;
                gw.imports = v["imports"].clone();
                gw.dns = v["dns"].as_str().and_then(|d| d.parse().ok());
                return Ok(gw);
            }
            if let Some(status) = gw.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("gateway exited with {status} before ready:\n{}", gw.logs());
            }
            if Instant::now() > deadline {
                bail!("gateway not ready in 20s:\n{}", gw.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The local listen address of import `service:port`.
    pub fn import(&self, key: &str) -> SocketAddr {
        self.imports[key]
            .as_str()
            .unwrap_or_else(|| panic!("no import {key} in {}", self.imports))
            .parse()
            .expect("import address")
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `limit` for `needle` in the log (a line the gateway writes on its own
    /// schedule, after it reported ready); whether it came.
    pub async fn wait_log(&self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.logs().contains(needle) {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// The gateway process's id (for /proc).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// SIGTERM, then waits up to `within` for the drain to end and the process to
    /// exit; whether it did.
    pub async fn term_and_wait(&mut self, within: Duration) -> bool {
        self.term();
        let deadline = Instant::now() + within;
        let Some(c) = self.child.as_mut() else {
            return true;
        };
        loop {
            if !matches!(c.try_wait(), Ok(None)) {
                self.child = None;
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM (graceful drain).
    pub fn term(&self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(s) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGKILL: a crash, no drain.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Scrapes `/metrics` and returns the value of the first sample whose line starts
    /// with `prefix` (name and labels), or 0.
    pub async fn metric(&self, prefix: &str) -> f64 {
        let text = http_get(self.admin, "/metrics").await.unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until `metric(prefix) >= want`.
    pub async fn wait_metric(&self, prefix: &str, want: f64, limit: Duration) -> f64 {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.metric(prefix).await;
            if v >= want || Instant::now() > deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits up to `within` for `/ready` to give `status`, and returns its body.
    pub async fn wait_ready(&self, status: u16, within: Duration) -> String {
        wait_ready(self.admin, status, within, || self.logs()).await
    }
}

/// Waits up to `within` for the admin port at `admin` to answer `/ready` with `status`,
/// and returns the body; on timeout, panics with `context()` (a log, say).
pub async fn wait_ready(
    admin: SocketAddr,
    status: u16,
    within: Duration,
    context: impl Fn() -> String,
) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (s, body) = meshfed_lifecycle::admin::get(admin, "/ready")
            .await
            .unwrap();
        if s.as_u16() == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/ready stayed {s} ({body}), not {status}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    meshfed_lifecycle::admin::get(addr, path)
        .await
        .map(|(_, body)| body)
        .map_err(anyhow::Error::msg)
}

/// A TCP echo server; echoes until EOF, then closes its write half.
/// Binds like a real server does (nginx: 511): the std default backlog of 128 drops SYNs
/// under a burst of 200.
pub fn listen() -> TcpListener {
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.bind(([127, 0, 0, 1], 0).into()).expect("bind");
    s.listen(1024).expect("listen")
}

pub async fn echo_server() -> SocketAddr {
    serve_echo(listen())
}

/// An echo server on `ip` (e.g. the host side of a test's network namespace).
pub async fn echo_server_at(ip: std::net::IpAddr) -> SocketAddr {
    serve_echo(TcpListener::bind((ip, 0)).await.expect("bind echo"))
}

fn serve_echo(l: TcpListener) -> SocketAddr {
    let addr = l.local_addr().expect("echo addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A loopback address nothing listens on. Port 1 (tcpmux) is privileged and unused
/// here; an ephemeral "bind, note, close" port could be taken by a parallel test.
pub fn closed_port() -> SocketAddr {
    let a: SocketAddr = ([127, 0, 0, 1], 1).into();
    assert!(
        std::net::TcpStream::connect(a).is_err(),
        "something listens on {a}"
    );
    a
}

/// Identity file poll interval in tests.
pub const RELOAD: Duration = Duration::from_millis(100);

/// The standard two-site layout: west exports echo.demo:7000, east imports it.
pub struct TwoSites {
    pub scratch: Scratch,
    pub west: SiteFiles,
    pub east: SiteFiles,
    pub west_gw: Gw,
    pub east_gw: Gw,
}

impl TwoSites {
    pub async fn start(
        name: &str,
        west_exports: &[(&str, u16, Vec<SocketAddr>)],
        east_imports: &[(&str, u16)],
    ) -> Self {
        let mut wc = ConfigBuilder::default();
        for (svc, port, eps) in west_exports {
            wc = wc.export(svc, *port, eps.clone());
        }
        Self::start_with(name, wc, east_imports).await
    }

    /// `west_cfg` gets east added as a peer.
    pub async fn start_with(
        name: &str,
        west_cfg: ConfigBuilder,
        east_imports: &[(&str, u16)],
    ) -> Self {
        Self::start_pair(name, west_cfg, |mut ec| {
            for (svc, port) in east_imports {
                ec = ec.import(svc, *port, "west", ([127, 0, 0, 1], 0).into());
            }
            ec
        })
    }

    /// `west_cfg` gets east added as a peer; `east_cfg` completes east's config, which
    /// already has west as a peer.
    pub fn start_pair(
        name: &str,
        west_cfg: ConfigBuilder,
        east_cfg: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
    ) -> Self {
        let scratch = Scratch::new(name);
        let west = scratch.site("west", "west.example.org");
        let east = scratch.site("east", "east.example.org");
        let west_cfg = ConfigBuilder {
            reload_interval: west_cfg.reload_interval.or(Some(RELOAD)),
            ..west_cfg
        };
        let west_gw = Gw::start(&west, &west_cfg.peer(&east, None)).expect("west gateway");
        let ec = ConfigBuilder {
            reload_interval: Some(RELOAD),
            ..Default::default()
        }
        .peer(&west, Some(west_gw.quic));
        let east_gw = Gw::start(&east, &east_cfg(ec)).expect("east gateway");
        Self {
            scratch,
            west,
            east,
            west_gw,
            east_gw,
        }
    }
}

/// One round trip through an echo path.
pub async fn echo_once(addr: SocketAddr) -> Result<()> {
    use tokio::io::AsyncReadExt;
    let mut c = tokio::net::TcpStream::connect(addr).await?;
    c.write_all(b"ping").await?;
    let mut b = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(3), c.read_exact(&mut b)).await??;
    anyhow::ensure!(&b == b"ping", "echo returned {b:?}");
    Ok(())
}

/// A raw QUIC connection to west with east's SVID, trusting `west_bundle` for west, to
/// speak the wire protocol directly.
pub async fn quic_as_east(
    s: &TwoSites,
    west_bundle: meshfed_identity::TrustBundle,
) -> Result<quinn::Connection, String> {
    quic_as(&s.east, &s.west, s.west_gw.quic, west_bundle).await
}

/// A raw QUIC connection to `to`'s gateway at `addr` with `from`'s SVID, trusting
/// `bundle` for `to`, to speak the wire protocol directly (as a peer gateway would).
pub async fn quic_as(
    from: &SiteFiles,
    to: &SiteFiles,
    addr: SocketAddr,
    bundle: meshfed_identity::TrustBundle,
) -> Result<quinn::Connection, String> {
    use meshfed_identity::{BundleSet, PeerPolicy, SpiffeVerifier, Svid};
    use std::sync::Arc;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let svid = Svid::load(&from.cert, &from.key).map_err(|e| e.to_string())?;
    let bundles: BundleSet = [bundle].into_iter().collect();
    let v = SpiffeVerifier::new(
        Arc::new(arc_swap::ArcSwap::from_pointee(bundles)),
        PeerPolicy::Only([to.id.clone()].into()),
    );
    let resolver =
        Arc::new(meshfed_identity::tls::SvidResolver::new(&svid).map_err(|e| e.to_string())?);
    let cfg = meshfed_gateway::tunnel::client_config(resolver, v, Default::default())
        .map_err(|e| e.to_string())?;
    let ep = quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).map_err(|e| e.to_string())?;
    ep.connect_with(cfg, addr, &to.site)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())
}

/// A real `etcd` process on free loopback ports, with its data in a scratch directory;
/// killed on drop. A missing `etcd` binary fails the test loudly.
pub struct Etcd {
    child: Child,
    pub endpoint: String,
    /// How it was started, for [`Etcd::restart`].
    cmd: Vec<std::ffi::OsString>,
    opts: Option<etcd_client::ConnectOptions>,
    /// How much of `etcd.log` earlier runs wrote: what [`Etcd::wait_serving`] reads
    /// is the current run's.
    log_mark: usize,
    _data: Scratch,
}

/// PEM files for an etcd that speaks TLS: its CA, its serving pair, and a client pair
/// (CN `meshfed`), made with rcgen.
pub struct EtcdTls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl EtcdTls {
    pub fn make(dir: &Path) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose, SanType,
        };
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.distinguished_name
            .push(DnType::CommonName, "etcd test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::from_ca_cert_der(ca_cert.der(), &ca_key).unwrap();
        let leaf = |cn: &str, server: bool| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::default();
            p.distinguished_name.push(DnType::CommonName, cn);
            if server {
                p.subject_alt_names = vec![
                    SanType::IpAddress([127, 0, 0, 1].into()),
                    SanType::DnsName("localhost".try_into().unwrap()),
                ];
            }
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = p.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let write = |name: &str, pem: &str| {
            let p = dir.join(name);
            std::fs::write(&p, pem).unwrap();
            p
        };
        let (sc, sk) = leaf("etcd", true);
        let (cc, ck) = leaf("meshfed", false);
        Self {
            ca: write("ca.pem", &ca_cert.pem()),
            server_cert: write("server.pem", &sc),
            server_key: write("server.key", &sk),
            client_cert: write("client.pem", &cc),
            client_key: write("client.key", &ck),
        }
    }
}

impl Etcd {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// An etcd that serves clients over TLS only and requires client certificates.
    pub async fn start_tls(tls: &EtcdTls) -> Self {
        Self::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<&EtcdTls>) -> Self {
        let data = Scratch::new("etcd");
        let (client, peer) = (free_port(), free_port());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd: Vec<std::ffi::OsString> = Vec::new();
        if let Some(t) = tls {
            cmd.push("--client-cert-auth".into());
            cmd.push(format!("--trusted-ca-file={}", t.ca.display()).into());
            cmd.push(format!("--cert-file={}", t.server_cert.display()).into());
            cmd.push(format!("--key-file={}", t.server_key.display()).into());
        }
        cmd.extend(etcd_args(
            "t",
            &data.0,
            &endpoint,
            &peer_url,
            &format!("t={peer_url}"),
        ));
        // Ready when a client request succeeds, not merely when the port is open.
        let opts = tls.map(|t| {
            let pem = |p: &Path| std::fs::read(p).unwrap();
            etcd_client::ConnectOptions::new().with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(pem(&t.ca)))
                    .identity(etcd_client::Identity::from_pem(
                        pem(&t.client_cert),
                        pem(&t.client_key),
                    )),
            )
        });
        // Owned at once, so a failed wait below still kills it.
        let mut etcd = Self {
            child: Self::spawn(&cmd, &data.0),
            endpoint,
            cmd,
            opts,
            log_mark: 0,
            _data: data,
        };
        etcd.wait_serving().await;
        etcd
    }

    fn spawn(cmd: &[std::ffi::OsString], data: &Path) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.join("etcd.log"))
            .unwrap();
        Command::new("etcd")
            .args(cmd)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start etcd ({e}): these tests need a real etcd; \
                     install it with `apt-get install -y etcd-server`"
                )
            })
    }

    /// Waits until etcd serves a read. An etcd that exited because its port was taken
    /// is started again on the same ports, up to five times: the free ports are
    /// checked by a moment's bind, and another test process's check may hold one just
    /// then ([`crate::federation::free_port`]).
    async fn wait_serving(&mut self) {
        let log = self._data.0.join("etcd.log");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut respawns = 0;
        loop {
            let run = (&mut self.log_mark, &mut respawns);
            if respawn_if_port_taken(&mut self.child, &self.cmd, &self._data.0, run, "etcd").await {
                continue;
            }
            let ok = match etcd_client::Client::connect([self.endpoint.as_str()], self.opts.clone())
                .await
            {
                Ok(mut c) => c.get("/", None).await.is_ok(),
                Err(_) => false,
            };
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become ready:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills etcd (`kill -9`); its data stays for [`Etcd::restart`].
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts etcd again on the same data and address, and waits until it serves.
    pub async fn restart(&mut self) {
        self.kill();
        self.log_mark = log_end(&self._data.0);
        self.child = Self::spawn(&self.cmd, &self._data.0);
        self.wait_serving().await;
    }
}

/// How many times an etcd that exited because its port was taken is started again.
const PORT_RETRIES: u32 = 5;

/// When `child` (etcd run as `cmd` on `data`) exited and the current run's part of its
/// log (after `log_mark`) says its port was taken, and it was started again fewer than
/// [`PORT_RETRIES`] times (`respawns`): starts it again on the same ports 200 ms later,
/// moves the mark to the new run's part, and says so.
async fn respawn_if_port_taken(
    child: &mut Child,
    cmd: &[std::ffi::OsString],
    data: &Path,
    (log_mark, respawns): (&mut usize, &mut u32),
    what: &str,
) -> bool {
    if !matches!(child.try_wait(), Ok(Some(_))) || *respawns >= PORT_RETRIES {
        return false;
    }
    let text = std::fs::read_to_string(data.join("etcd.log")).unwrap_or_default();
    if !text
        .get(*log_mark..)
        .is_some_and(|run| run.contains("address already in use"))
    {
        return false;
    }
    *respawns += 1;
    *log_mark = text.len();
    eprintln!("{what}: its port was taken; starting it again ({respawns}/{PORT_RETRIES})");
    tokio::time::sleep(Duration::from_millis(200)).await;
    *child = Etcd::spawn(cmd, data);
    true
}

/// The length of etcd's log in `data`: where the next run's part begins.
fn log_end(data: &Path) -> usize {
    std::fs::metadata(data.join("etcd.log"))
        .map_or(0, |m| usize::try_from(m.len()).unwrap_or(usize::MAX))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    crate::federation::free_port([127, 0, 0, 1].into())
}

/// etcd's command line for member `name` of `cluster` (`name=peer,...`), its data under
/// `dir`. Faster elections than etcd's defaults also lower its minimum lease TTL to 1 s.
fn etcd_args(
    name: &str,
    dir: &Path,
    client: &str,
    peer: &str,
    cluster: &str,
) -> Vec<std::ffi::OsString> {
    let mut cmd: Vec<std::ffi::OsString> = vec!["--name".into(), name.into(), "--data-dir".into()];
    cmd.push(dir.join("data").into());
    for a in [
        "--listen-client-urls",
        client,
        "--advertise-client-urls",
        client,
        "--listen-peer-urls",
        peer,
        "--initial-advertise-peer-urls",
        peer,
        "--initial-cluster",
        cluster,
        "--initial-cluster-state",
        "new",
        "--initial-cluster-token",
        "meshfed-test",
        "--heartbeat-interval",
        "50",
        "--election-timeout",
        "500",
    ] {
        cmd.push(a.into());
    }
    cmd
}

/// A 3-member etcd cluster on 127.0.0.1 (each member its own data directory and ports),
/// for killing members under load.
pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
}

pub struct EtcdMember {
    pub name: String,
    pub endpoint: String,
    cmd: Vec<std::ffi::OsString>,
    child: Option<Child>,
    data: Scratch,
    /// Where this run's part of its log begins, and how often this run's start was
    /// repeated because its port was taken (as [`Etcd`]'s).
    log_mark: usize,
    respawns: u32,
}

impl EtcdCluster {
    pub async fn start(n: usize) -> Self {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}"))
            .collect();
        let mut members = Vec::new();
        for (i, (c, p)) in ports.iter().enumerate() {
            let data = Scratch::new(&format!("etcd-m{i}"));
            let endpoint = format!("http://127.0.0.1:{c}");
            let peer = format!("http://127.0.0.1:{p}");
            let cmd = etcd_args(
                &format!("m{i}"),
                &data.0,
                &endpoint,
                &peer,
                &initial.join(","),
            );
            let child = Some(Etcd::spawn(&cmd, &data.0));
            members.push(EtcdMember {
                name: format!("m{i}"),
                endpoint,
                cmd,
                child,
                data,
                log_mark: 0,
                respawns: 0,
            });
        }
        let mut c = Self { members };
        c.wait_serving().await;
        c
    }

    /// Every member's client URL, comma-separated (what `--etcd` takes).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.endpoint.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until a quorum serves a linearizable read through any live member. A
    /// member that exited because its port was taken is started again on the same
    /// ports, up to [`PORT_RETRIES`] times a run, as [`Etcd`] is.
    pub async fn wait_serving(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for m in &mut self.members {
                if let Some(child) = &mut m.child {
                    let run = (&mut m.log_mark, &mut m.respawns);
                    respawn_if_port_taken(child, &m.cmd, &m.data.0, run, &m.name).await;
                }
            }
            for m in self.members.iter().filter(|m| m.child.is_some()) {
                if let Ok(mut c) = etcd_client::Client::connect([m.endpoint.as_str()], None).await
                    && c.get("/", None).await.is_ok()
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the etcd cluster did not serve:\n{}",
                self.members
                    .iter()
                    .map(|m| std::fs::read_to_string(m.data.0.join("etcd.log")).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The index of the member that leads now, as the live members report it.
    pub async fn leader(&self) -> Option<usize> {
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let Ok(mut c) = etcd_client::Client::connect([m.endpoint.as_str()], None).await else {
                continue;
            };
            let Ok(s) = c.status().await else { continue };
            let leader = s.leader();
            let Ok(list) = c.member_list().await else {
                continue;
            };
            return list
                .members()
                .iter()
                .find(|x| x.id() == leader)
                .and_then(|x| self.members.iter().position(|m| m.name == x.name()));
        }
        None
    }

    /// `kill -9` of member `i`; its data stays for [`EtcdCluster::restart`].
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Member `i` again, on its data.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        let m = &mut self.members[i];
        (m.log_mark, m.respawns) = (log_end(&m.data.0), 0);
        m.child = Some(Etcd::spawn(&m.cmd, &m.data.0));
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
