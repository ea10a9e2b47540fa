//! Processes for the benchmarks that run real processes on loopback (http-bench,
//! sni-bench): children killed on drop, commands run or spawned with their output in a
//! log, free ports, CPU from `/proc`, a federation with joined sites, nginx, haproxy's
//! PEM files, endpoint certificates from a bench CA, and the figures' ratios and ranges.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use meshfed_lab::{self as lab, SiteFiles};

/// A bench CA and a certificate for `name` (a DNS name, `*.` allowed) signed by it, as
/// PEM files in `dir`: (CA, certificate, key).
pub fn endpoint_certs(
    dir: &Path,
    name: &str,
) -> Result<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "meshfed bench CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec![name.to_string()])?.signed_by(&key, &issuer)?;
    let paths = (
        dir.join("endpoint-ca.pem"),
        dir.join("endpoint.pem"),
        dir.join("endpoint.key"),
    );
    std::fs::write(&paths.0, ca_cert.pem())?;
    std::fs::write(&paths.1, cert.pem())?;
    std::fs::write(&paths.2, key.serialize_pem())?;
    Ok(paths)
}

/// Child processes, killed on drop.
pub struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn free_port(ip: [u8; 4]) -> Result<u16> {
    Ok(std::net::TcpListener::bind(SocketAddr::from((ip, 0)))?
        .local_addr()?
        .port())
}

/// Runs `cmd` to its end: its stdout, or an error with both outputs.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts `cmd` with stdout and stderr in `log`.
pub fn spawn(cmd: &mut Command, log: &Path) -> Result<Child> {
    let f = std::fs::File::create(log)?;
    cmd.stdout(Stdio::from(f.try_clone()?))
        .stderr(Stdio::from(f))
        .spawn()
        .with_context(|| format!("{cmd:?}"))
}

pub async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        ensure!(Instant::now() < deadline, "{what}: not within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// CPU seconds (user and system) the processes `pids` have used, from `/proc` (in
/// clock ticks of 1/100 s, Linux's `USER_HZ`).
pub fn cpu_secs(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|stat| {
            // After the command's closing parenthesis: state is field 3, utime 14, stime 15.
            let rest = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split(' ').collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum::<u64>() as f64
        / 100.0
}

/// A federation (`fed.example.org`) serving from `dir/fed`, and the sites `names`
/// joined to it (`<name>.example.org`, gateway address 127.0.0.1:15443); the server is
/// pushed to `procs`.
pub async fn federation(
    meshfed: &Path,
    dir: &Path,
    names: &[&str],
    procs: &mut Procs,
) -> Result<Vec<SiteFiles>> {
    let fed = dir.join("fed");
    run(Command::new(meshfed)
        .args([
            "federation",
            "init",
            "--trust-domain",
            "fed.example.org",
            "--dir",
        ])
        .arg(&fed))?;
    procs.0.push(spawn(
        Command::new(meshfed)
            .args(["federation", "serve", "--dir"])
            .arg(&fed)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]),
        &dir.join("fed.log"),
    )?);
    wait_for("federation", || fed.join("address").exists()).await?;
    let mut sites = Vec::new();
    for name in names {
        let s = lab::make_site(dir, name, &format!("{name}.example.org"))?;
        let token = run(Command::new(meshfed)
            .args(["federation", "token", "create", "--dir"])
            .arg(&fed)
            .args(["--site", name, "--ttl", "1h"]))?;
        run(Command::new(meshfed)
            .args(["site", "join", "--dir"])
            .arg(&s.dir)
            .args([
                "--site",
                name,
                "--gateway-address",
                "127.0.0.1:15443",
                token.trim(),
            ]))?;
        sites.push(s);
    }
    Ok(sites)
}

/// nginx in the foreground with one worker and these `servers` (its `http` block's
/// server lines), its files in `dir`.
pub fn nginx(dir: &Path, servers: &str) -> Result<Child> {
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {}/nginx.pid;\nerror_log {}/nginx.err;\n\
             events {{ worker_connections 8192; }}\nhttp {{\n  access_log off;\n{servers}}}\n",
            dir.display(),
            dir.display()
        ),
    )?;
    spawn(
        Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir),
        &dir.join("nginx.log"),
    )
    .context("nginx (apt-get install nginx)")
}

/// A site's gateway certificate and key in one PEM file (haproxy's `crt`), and its CA's
/// certificate (haproxy's `ca-file`), written to `dir`.
pub fn haproxy_pems(dir: &Path, s: &SiteFiles) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let pem = dir.join(format!("{}-haproxy.pem", s.site));
    std::fs::write(
        &pem,
        std::fs::read_to_string(&s.cert)? + &std::fs::read_to_string(&s.key)?,
    )?;
    let ca_pem = dir.join(format!("{}-ca.pem", s.site));
    let ca = meshfed_identity::Ca::load(&s.dir.join("ca"))?;
    std::fs::write(
        &ca_pem,
        meshfed_identity::ca::der_to_pem("CERTIFICATE", ca.cert()),
    )?;
    Ok((pem, ca_pem))
}

/// The lowest, highest and mean of `v`.
pub fn range(v: &[f64]) -> (f64, f64, f64) {
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
    (lo, hi, v.iter().sum::<f64>() / v.len().max(1) as f64)
}

/// `a / b`, figure by figure (round by round).
pub fn ratio(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}
