//! The two-host topology the data-path benchmarks share: two network namespaces
//! (`mfb-a`: clients and client-side proxies; `mfb-b`: servers and server-side proxies)
//! joined by a veth pair with MTU 1500. Without root it falls back to loopback and says so.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};
use meshfed_lab::{self as lab, ConfigBuilder};

pub const NS_A: &str = "mfb-a";
pub const NS_B: &str = "mfb-b";
/// The router of the delayed path (`Topo::delay_path`).
pub const NS_R: &str = "mfb-r";
/// B's address on the delayed path.
pub const B_DELAYED: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);

/// The benchmark's scratch directory and the release `meshfed` binary beside it.
pub fn scratch(name: &str) -> Result<(PathBuf, PathBuf)> {
    let dir = std::env::temp_dir().join(format!("meshfed-bench-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let meshfed = std::env::current_exe()?.with_file_name("meshfed");
    if !meshfed.exists() {
        bail!(
            "{} not found: cargo build --release first",
            meshfed.display()
        );
    }
    Ok((dir, meshfed))
}

pub struct Topo {
    pub netns: bool,
    /// Address of host B (server side) as seen from A.
    pub b: IpAddr,
    pub procs: Vec<(String, Child)>,
    pub dir: PathBuf,
}

impl Topo {
    pub fn setup(loopback: bool, dir: PathBuf) -> Result<Self> {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false);
        let netns = !loopback && root && Command::new("ip").arg("-V").output().is_ok();
        if netns {
            cleanup_netns();
            let sh = ip;
            sh(&format!("netns add {NS_A}"))?;
            sh(&format!("netns add {NS_B}"))?;
            sh("link add mfb-va type veth peer name mfb-vb")?;
            sh(&format!("link set mfb-va netns {NS_A}"))?;
            sh(&format!("link set mfb-vb netns {NS_B}"))?;
            // 198.18.0.0/15 is the benchmarking range (RFC 2544); it exists only on this veth.
            sh(&format!("-n {NS_A} addr add 198.18.0.1/24 dev mfb-va"))?;
            sh(&format!("-n {NS_B} addr add 198.18.0.2/24 dev mfb-vb"))?;
            for (ns, dev) in [(NS_A, "mfb-va"), (NS_B, "mfb-vb")] {
                sh(&format!("-n {ns} link set {dev} mtu 1500 up"))?;
                sh(&format!("-n {ns} link set lo up"))?;
                // Connection-rate runs open tens of thousands of connections; ephemeral
                // ports stay above the fixed ones the benchmarks listen on (< 20000).
                let _ = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        ns,
                        "sysctl",
                        "-q",
                        "-w",
                        "net.ipv4.tcp_tw_reuse=1",
                        "net.ipv4.ip_local_port_range=20000 65000",
                    ])
                    .status();
            }
        } else {
            println!("NOTE: not root (or --loopback): measuring on loopback, not on two hosts");
        }
        Ok(Self {
            netns,
            b: if netns {
                IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2))
            } else {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            },
            procs: Vec::new(),
            dir,
        })
    }

    pub fn cmd(&self, ns: &str, program: &Path) -> Command {
        if self.netns {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    pub fn spawn(&mut self, name: &str, ns: &str, program: &Path, args: &[&str]) -> Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let child = self
            .cmd(ns, program)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        self.procs.push((name.into(), child));
        Ok(())
    }

    /// The process ID of the process spawned as `name` (`ip netns exec` execs it, so
    /// the ID is the program's).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.id())
    }

    /// Runs one load measurement in A and returns its JSON.
    /// What the measurements run on, for the output.
    pub fn describe(&self) -> &'static str {
        if self.netns {
            "two network namespaces, veth MTU 1500 (198.18.0.1 ↔ 198.18.0.2)"
        } else {
            "loopback"
        }
    }

    /// Starts meshfed's west gateway in B (QUIC on B's address, port 15443) and east in
    /// A, each peering the other; `west` and `east` add exports, imports and settings.
    pub fn gateways(
        &mut self,
        meshfed: &Path,
        west: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
        east: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
    ) -> Result<()> {
        self.gateway_pair(meshfed, "", (self.b, 15443).into(), west, east)
    }

    /// A second (third, ...) pair of gateways beside the first: `label` names its
    /// processes (`meshfed-west<label>`) and directory; west listens on `quic` (UDP and
    /// TCP).
    pub fn gateway_pair(
        &mut self,
        meshfed: &Path,
        label: &str,
        quic: std::net::SocketAddr,
        west: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
        east: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
    ) -> Result<()> {
        let dir = self.dir.join(format!("pair{label}"));
        let w = lab::make_site(&dir, "west", "west.example.org")?;
        let e = lab::make_site(&dir, "east", "east.example.org")?;
        let west_cfg = west(ConfigBuilder {
            listen: Some(quic),
            ..Default::default()
        })
        .peer(&e, None)
        .write(&w)?;
        let east_cfg = east(ConfigBuilder {
            listen: Some((Ipv4Addr::UNSPECIFIED, 0).into()),
            ..Default::default()
        })
        .peer(&w, Some(quic))
        .write(&e)?;
        for (name, ns, cfg) in [
            (format!("meshfed-west{label}"), NS_B, &west_cfg),
            (format!("meshfed-east{label}"), NS_A, &east_cfg),
        ] {
            self.spawn(
                &name,
                ns,
                meshfed,
                &["gateway", "run", "-c", cfg.to_str().unwrap_or_default()],
            )?;
        }
        Ok(())
    }

    /// A second path from A to B through a router namespace whose user-space relay
    /// (`delay_relay.py`, a TUN device) delays every packet by `one_way_ms` each way:
    /// B is [`B_DELAYED`] on it. A's and B's other addresses are untouched.
    pub fn delay_path(&mut self, one_way_ms: u32) -> Result<()> {
        anyhow::ensure!(
            self.netns,
            "the delay path needs the network namespaces (root)"
        );
        let sh = ip;
        sh(&format!("netns add {NS_R}"))?;
        sh("link add mfb-ar type veth peer name mfb-ra")?;
        sh("link add mfb-br type veth peer name mfb-rb")?;
        sh(&format!("link set mfb-ar netns {NS_A}"))?;
        sh(&format!("link set mfb-br netns {NS_B}"))?;
        sh(&format!("link set mfb-ra netns {NS_R}"))?;
        sh(&format!("link set mfb-rb netns {NS_R}"))?;
        sh(&format!("-n {NS_A} addr add 198.19.0.1/24 dev mfb-ar"))?;
        sh(&format!("-n {NS_R} addr add 198.19.0.2/24 dev mfb-ra"))?;
        sh(&format!("-n {NS_R} addr add 198.19.1.1/24 dev mfb-rb"))?;
        sh(&format!("-n {NS_B} addr add {B_DELAYED}/24 dev mfb-br"))?;
        for (ns, dev) in [
            (NS_A, "mfb-ar"),
            (NS_R, "mfb-ra"),
            (NS_R, "mfb-rb"),
            (NS_B, "mfb-br"),
        ] {
            sh(&format!("-n {ns} link set {dev} mtu 1500 up"))?;
        }
        sh(&format!("-n {NS_R} link set lo up"))?;
        sh(&format!("-n {NS_A} route add 198.19.1.0/24 via 198.19.0.2"))?;
        sh(&format!("-n {NS_B} route add 198.19.0.0/24 via 198.19.1.1"))?;
        sh(&format!("-n {NS_R} tuntap add dev mfb-tun mode tun"))?;
        sh(&format!("-n {NS_R} link set mfb-tun mtu 1500 up"))?;
        // Everything that arrives from A or B goes into the relay; what the relay writes
        // back is routed on by the main table.
        sh(&format!(
            "-n {NS_R} rule add iif mfb-ra lookup 100 pref 100"
        ))?;
        sh(&format!(
            "-n {NS_R} rule add iif mfb-rb lookup 100 pref 101"
        ))?;
        sh(&format!(
            "-n {NS_R} route add default dev mfb-tun table 100"
        ))?;
        let st = Command::new("ip")
            .args(["netns", "exec", NS_R, "sysctl", "-q", "-w"])
            .args([
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
                "net.ipv4.conf.mfb-tun.rp_filter=0",
            ])
            .status()?;
        anyhow::ensure!(st.success(), "sysctl in {NS_R}");
        let script = self.dir.join("delay_relay.py");
        std::fs::write(&script, include_str!("delay_relay.py"))?;
        let python = need("python3", "python3")?;
        self.spawn(
            "delay-relay",
            NS_R,
            &python,
            &[
                script.to_str().unwrap_or_default(),
                "mfb-tun",
                &one_way_ms.to_string(),
            ],
        )
    }

    /// Runs this benchmark's own binary with `args` in namespace A (the client side) and
    /// parses the last line of its output as JSON.
    pub fn run_a(&self, args: &[String]) -> Result<serde_json::Value> {
        let me = std::env::current_exe()?;
        let out = self.cmd(NS_A, &me).args(args).output()?;
        if !out.status.success() {
            bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.lines().last().unwrap_or("{}")).context("load output")
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        for (_, c) in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.netns {
            cleanup_netns();
        }
    }
}

/// Runs `ip` with `args` (split on whitespace); it must succeed.
fn ip(args: &str) -> Result<()> {
    let st = Command::new("ip").args(args.split_whitespace()).status()?;
    if !st.success() {
        bail!("ip {args} failed");
    }
    Ok(())
}

pub fn cleanup_netns() {
    for ns in [NS_A, NS_B, NS_R] {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
}

pub fn need(program: &str, package: &str) -> Result<PathBuf> {
    let find = || {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
                .map(|d| d.join(program))
                .find(|p| p.exists())
        })
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    println!("installing {package} ...");
    let _ = Command::new("apt-get")
        .args(["install", "-y", "-qq", package])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    find().with_context(|| format!("{program} not found; apt-get install {package}"))
}

// === the run ===
