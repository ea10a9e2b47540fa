//! `flood-bench`: what an unauthenticated QUIC handshake flood costs a gateway, and what
//! its legitimate traffic sees meanwhile. Two gateways on loopback (west exports an echo
//! service, east imports it); west is flooded with real QUIC Initials that never finish
//! (bench/common/flood.rs), from one spoofed source and then from validated addresses
//! that answer Retry. Also measures the bytes west sends an unvalidated address per byte
//! received (RFC 9000 §8.1 allows 3×).
//!
//! `MESHFED_BIN=/path/to/meshfed` measures another build (e.g. before a change) with the
//! same flood. Run with `cargo build --release && target/release/flood-bench`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use meshfed_lab::{self as lab, ConfigBuilder};

#[path = "../common/flood.rs"]
mod flood;

#[derive(Parser)]
struct Args {
    /// Handshakes per flood.
    #[arg(long, default_value_t = 2000)]
    attempts: usize,
    /// Source addresses of the validated flood.
    #[arg(long, default_value_t = 8)]
    sources: usize,
    /// Seconds over which a flood's attempts are sent.
    #[arg(long, default_value_t = 2.0)]
    spread: f64,
    /// Runs of each figure.
    #[arg(long, default_value_t = 2)]
    runs: usize,
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(meshfed: &Path, cfg: &Path, dir: &Path) -> Result<(Proc, serde_json::Value)> {
    let ready = dir.join("ready.json");
    let _ = std::fs::remove_file(&ready);
    let child = Command::new(meshfed)
        .args(["gateway", "run", "-c"])
        .arg(cfg)
        .arg("--ready-file")
        .arg(&ready)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("gateway.log"))?)
        .spawn()
        .with_context(|| format!("starting {}", meshfed.display()))?;
    let p = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(t) = std::fs::read_to_string(&ready)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&t)
        {
            return Ok((p, v));
        }
        if Instant::now() > deadline {
            bail!("gateway in {} not ready", dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn echo_server() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut b = [0u8; 64];
                while let Ok(n) = c.read(&mut b) {
                    if n == 0 || c.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// One round trip on a new connection through the tunnel.
fn echo_once(addr: SocketAddr) -> Result<Duration> {
    let t = Instant::now();
    let mut c = TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.write_all(b"ping")?;
    let mut b = [0u8; 4];
    c.read_exact(&mut b)?;
    Ok(t.elapsed())
}

/// Round trips at `rate` per second for `dur`; (latencies sorted, failures).
fn legit(addr: SocketAddr, dur: Duration, rate: u32) -> (Vec<Duration>, usize) {
    let (mut lat, mut failed) = (Vec::new(), 0);
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < dur {
        let due = start + Duration::from_secs_f64(f64::from(n) / f64::from(rate));
        if let Some(w) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(w);
        }
        match echo_once(addr) {
            Ok(d) => lat.push(
                d + Instant::now()
                    .saturating_duration_since(due)
                    .saturating_sub(d),
            ),
            Err(_) => failed += 1,
        }
        n += 1;
    }
    lat.sort();
    (lat, failed)
}

fn pct(v: &[Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3
}

fn main() -> Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = std::env::temp_dir().join(format!("meshfed-bench-flood-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let meshfed = match std::env::var_os("MESHFED_BIN") {
        Some(p) => p.into(),
        None => std::env::current_exe()?.with_file_name("meshfed"),
    };
    println!("meshfed binary: {}", meshfed.display());
    let echo = echo_server()?;
    let w = lab::make_site(&dir, "west", "west.example.org")?;
    let e = lab::make_site(&dir, "east", "east.example.org")?;
    let west_cfg = ConfigBuilder::default()
        .export("echo.demo", 7000, vec![echo])
        .peer(&e, None)
        .write(&w)?;
    let (west, wr) = start(&meshfed, &west_cfg, &w.dir)?;
    let quic: SocketAddr = wr["quic"].as_str().unwrap_or_default().parse()?;
    let east_cfg = ConfigBuilder::default()
        .peer(&w, Some(quic))
        .import("echo.demo", 7000, "west", ([127, 0, 0, 1], 0).into())
        .write(&e)?;
    let (_east, er) = start(&meshfed, &east_cfg, &e.dir)?;
    let import: SocketAddr = er["imports"]["echo.demo:7000"]
        .as_str()
        .unwrap_or_default()
        .parse()?;
    echo_once(import).context("echo through the tunnel")?;
    let pid = west.0.id();
    let mut lines = Vec::new();

    // Amplification: one attempt at an idle gateway, replies counted for 3 s (PTO
    // retransmissions included).
    let mut amps = Vec::new();
    for _ in 0..args.runs {
        let r = flood::flood(
            quic,
            1,
            1,
            flood::Mode::Spoofed,
            Duration::ZERO,
            Duration::from_secs(3),
        )?;
        println!(
            "amplification: sent {} B, got {} B in {} datagrams ({} Retry): {:.2}x",
            r.sent_bytes, r.received_bytes, r.received_datagrams, r.retries, r.amplification
        );
        amps.push(r.amplification);
        std::thread::sleep(Duration::from_secs(6));
    }
    let spread = Duration::from_secs_f64(args.spread);
    for (mode, sources) in [
        (flood::Mode::Spoofed, 1),
        (flood::Mode::Validated, args.sources),
    ] {
        for run in 0..args.runs {
            let (quiet, qf) = legit(import, Duration::from_secs(2), 20);
            let before = flood::rss_bytes(pid);
            let sampler = std::thread::spawn(move || {
                let mut peak = 0;
                let end = Instant::now() + spread + Duration::from_secs(3);
                while Instant::now() < end {
                    peak = peak.max(flood::rss_bytes(pid));
                    std::thread::sleep(Duration::from_millis(20));
                }
                peak
            });
            let attempts = args.attempts;
            let attack = std::thread::spawn(move || {
                flood::flood(
                    quic,
                    attempts,
                    sources,
                    mode,
                    spread,
                    Duration::from_secs(2),
                )
            });
            let (during, df) = legit(import, spread + Duration::from_secs(1), 20);
            let r = attack
                .join()
                .map_err(|_| anyhow::anyhow!("flood panicked"))??;
            let peak = sampler
                .join()
                .map_err(|_| anyhow::anyhow!("sampler panicked"))?;
            let grown = peak.saturating_sub(before) as f64 / (1 << 20) as f64;
            println!(
                "{mode:?} run {run}: {} attempts from {sources} address(es), {} Retry; west RSS {:.0} -> {:.0} MB (+{grown:.1} MB); \
                 echo p50/p99 quiet {:.2}/{:.2} ms ({qf} failed), during {:.2}/{:.2} ms ({df} failed); p99 ratio {:.2}",
                r.attempts,
                r.retries,
                before as f64 / (1 << 20) as f64,
                peak as f64 / (1 << 20) as f64,
                pct(&quiet, 0.5),
                pct(&quiet, 0.99),
                pct(&during, 0.5),
                pct(&during, 0.99),
                pct(&during, 0.99) / pct(&quiet, 0.99),
            );
            let m = format!("{mode:?}").to_lowercase();
            lines.push((format!("{m}_rss_growth_mb_run{run}"), format!("{grown:.1}")));
            lines.push((
                format!("{m}_p99_ratio_run{run}"),
                format!("{:.2}", pct(&during, 0.99) / pct(&quiet, 0.99)),
            ));
            lines.push((format!("{m}_failed_requests_run{run}"), df.to_string()));
            // Let the half-open attempts expire before the next run.
            std::thread::sleep(Duration::from_secs(12));
        }
    }
    for (i, a) in amps.iter().enumerate() {
        println!("amplification_run{i}: {a:.2}");
    }
    for (k, v) in lines {
        println!("{k}: {v}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
