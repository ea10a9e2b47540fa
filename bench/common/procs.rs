//! Processes for the benchmarks that run real processes on loopback (http-bench,
//! ws-bench, sni-bench): children killed on drop, commands run or spawned with their
//! output in a log, free ports, CPU from `/proc`, a federation with joined sites, nginx,
//! haproxy's PEM files and its `mode http` mTLS pair, endpoint certificates from a bench
//! CA, and the figures' ratios and ranges.

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

/// The haproxy pair: A at `front_h1`/`front_h2` (plain HTTP/1.1 and h2c), a backend
/// shared equally (`roundrobin`) over mTLS to B's frontends, one per entry of `sites`
/// (name, B's port, its nginx block's port), each in front of its nginx block
/// (`to_nginx` ends that server line: TLS options toward an HTTPS block). With `split`,
/// A and each B frontend are processes of their own (one per site, as meshfed's
/// gateways are), else one process holds them all; `nbthread` `threads` each. `tag`
/// names the config files.
#[allow(clippy::too_many_arguments)]
pub fn haproxy_pair(
    dir: &Path,
    (a, b): (&SiteFiles, &SiteFiles),
    front: (u16, u16),
    sites: &[(&str, u16, u16)],
    to_nginx: &str,
    (split, threads): (bool, usize),
    tag: &str,
) -> Result<Vec<Child>> {
    let ((a_pem, a_ca), (b_pem, b_ca)) = (haproxy_pems(dir, a)?, haproxy_pems(dir, b)?);
    let server = |name: &str, port: u16, alpn: &str| {
        format!(
            "  server {name} 127.0.0.1:{port} weight 50 ssl verify required ca-file {} crt {} alpn {alpn}\n",
            b_ca.display(),
            a_pem.display()
        )
    };
    let bind_b = |port: u16| {
        format!(
            "  bind 127.0.0.1:{port} ssl crt {} ca-file {} verify required alpn h2,http/1.1\n",
            b_pem.display(),
            a_ca.display()
        )
    };
    // A pair backend per client protocol: HTTP/1.1 clients over pooled HTTP/1.1
    // connections to B (across h2 the reason phrase is lost, and h2load's HTTP/1.1
    // parser counts `HTTP/1.1 200 ` as a failure), h2 clients over h2.
    let pair = |name: &str, alpn: &str| {
        let servers: String = sites
            .iter()
            .map(|(site, port, _)| server(site, *port, alpn))
            .collect();
        format!(
            "backend {name}\n  balance roundrobin\n  retries 2\n  option redispatch 1\n  retry-on conn-failure empty-response 502 503 504\n{servers}"
        )
    };
    let head = format!(
        "global\n  maxconn 8000\n  nbthread {threads}\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  http-reuse always\n"
    );
    let side_a = format!(
        "frontend a_h1\n  bind 127.0.0.1:{}\n  default_backend pair_h1\n\
         frontend a_h2\n  bind 127.0.0.1:{} proto h2\n  default_backend pair_h2\n{}{}",
        front.0,
        front.1,
        pair("pair_h1", "http/1.1"),
        pair("pair_h2", "h2"),
    );
    let side_b = |name: &str, bind: u16, nginx: u16| {
        format!(
            "frontend b_{name}\n{}  default_backend nginx_{name}\nbackend nginx_{name}\n  server n 127.0.0.1:{nginx}{to_nginx}\n",
            bind_b(bind)
        )
    };
    let bs: Vec<(&str, String)> = sites
        .iter()
        .map(|(site, port, nginx)| (*site, side_b(site, *port, *nginx)))
        .collect();
    let configs: Vec<(String, String)> = if split {
        let mut c = vec![(format!("{tag}-a"), format!("{head}{side_a}"))];
        c.extend(
            bs.iter()
                .map(|(site, b)| (format!("{tag}-{site}"), format!("{head}{b}"))),
        );
        c
    } else {
        let all: String = bs.iter().map(|(_, b)| b.as_str()).collect();
        vec![(tag.to_owned(), format!("{head}{side_a}{all}"))]
    };
    let mut children = Vec::new();
    for (name, cfg) in configs {
        let path = dir.join(format!("haproxy-{name}.cfg"));
        std::fs::write(&path, cfg)?;
        run(Command::new("haproxy").arg("-c").arg("-f").arg(&path)).context("haproxy -c")?;
        children.push(
            spawn(
                Command::new("haproxy").arg("-f").arg(&path).arg("-db"),
                &dir.join(format!("haproxy-{name}.log")),
            )
            .context("haproxy (apt-get install haproxy)")?,
        );
    }
    Ok(children)
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
