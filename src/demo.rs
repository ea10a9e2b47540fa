//! `meshfed demo`: a federation and three sites on loopback, each with its own CA (no
//! shared root). Sites join with one-time tokens; `west` and `north` export the same
//! service, `east` imports it from the catalog and reaches it through one mTLS QUIC
//! connection per peer; `west` also exports a UDP service, which `east` reaches through
//! QUIC datagrams on the same connection; then `north` stops and traffic fails over live.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use meshfed_gateway::GatewayConfig;
use meshfed_identity::TrustDomain;
use meshfed_lab as lab;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PAYLOAD: usize = 8 * 1024 * 1024;
const LEASE_TTL: Duration = Duration::from_secs(2);

/// A TCP service that prefixes its echo with the site that served it.
async fn service(site: &'static str) -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(format!("served by {site}\n").as_bytes()).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// A UDP service that answers each datagram with `<site>: <datagram>`.
async fn udp_service(site: &'static str) -> Result<SocketAddr> {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let addr = s.local_addr()?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let mut out = format!("{site}: ").into_bytes();
            out.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&out, from).await;
        }
    });
    Ok(addr)
}

/// Sends `count` datagrams to `addr` one at a time; returns how many were answered by
/// `site` and the last answer.
async fn udp_calls(addr: SocketAddr, count: usize, site: &str) -> Result<(usize, String)> {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    s.connect(addr).await?;
    let mut buf = vec![0u8; 65536];
    let (mut ok, mut last) = (0, String::new());
    for i in 0..count {
        let msg = format!("datagram {i}");
        s.send(msg.as_bytes()).await?;
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), s.recv(&mut buf)).await
        {
            last = String::from_utf8_lossy(&buf[..n]).into_owned();
            if last == format!("{site}: {msg}") {
                ok += 1;
            }
        }
    }
    Ok((ok, last))
}

/// Sends `payload` through `addr`; returns who served it and whether it came back intact.
/// The first `nameserver` in /etc/resolv.conf, as the demo's DNS forwarding upstream.
fn system_resolver() -> Option<SocketAddr> {
    let conf = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    conf.lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .find_map(|a| a.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
}

/// One UDP query to `server`; the answers' data as text.
async fn resolve(
    server: SocketAddr,
    name: &str,
    t: hickory_proto::rr::RecordType,
) -> Result<Vec<String>> {
    let m = crate::cmd::diagnose::query(server, name, t)
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(m.answers.iter().map(|r| r.data.to_string()).collect())
}

async fn call(addr: SocketAddr, payload: Vec<u8>) -> Result<(String, bool, Duration)> {
    let started = Instant::now();
    let c = TcpStream::connect(addr).await?;
    let (mut r, mut w) = c.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await?;
        w.shutdown().await
    });
    let mut back = Vec::with_capacity(payload.len() + 32);
    tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut back))
        .await
        .context("no answer in 20 s")??;
    writer.await??;
    let nl = back.iter().position(|&b| b == b'\n').context("no banner")?;
    let who = String::from_utf8_lossy(&back[..nl]).into_owned();
    Ok((who, back[nl + 1..] == payload[..], started.elapsed()))
}

fn free_port(ip: IpAddr) -> Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

pub async fn run(dir: Option<PathBuf>) -> Result<()> {
    let root = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("meshfed-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    println!("meshfed demo — files in {}\n", root.display());

    // 1. Trust: a CA per site and one for the federation; nothing shared.
    let fed_dir = root.join("federation");
    let fed_td = TrustDomain::new("fed.example.org")?;
    meshfed_federation::node::init(&fed_dir, &fed_td)?;
    let fed = meshfed_federation::node::serve(
        &fed_dir,
        ([127, 0, 0, 1], 0).into(),
        vec![],
        LEASE_TTL,
        meshfed_federation::node::StoreChoice::Embedded { create: false },
    )
    .await?;
    let sites = [
        lab::make_site(&root, "east", "east.example.org")?,
        lab::make_site(&root, "west", "west.example.org")?,
        lab::make_site(&root, "north", "north.example.org")?,
    ];
    let fed_admin = fed
        .serve_admin(&fed_dir, ([127, 0, 0, 1], 0).into())
        .await?;
    println!("1. trust: four CAs, no shared root");
    println!("   federation {:<18} {}", fed_td, fed.addr);
    println!("   topology page: http://{fed_admin}/topology (live while the demo runs)");
    for s in &sites {
        println!("   {:<10} {:<18} gateway {}", s.site, s.trust_domain, s.id);
    }

    // 2. Join with one-time tokens.
    println!("\n2. join: one token per site, each good once");
    let mut last_token = String::new();
    for s in &sites {
        let (token, _) = meshfed_api::client::create_token(
            &fed_dir,
            &s.site,
            Duration::from_secs(600),
            Some(&s.trust_domain),
            false,
        )
        .await?;
        let m = meshfed_api::client::join(&s.dir, &s.site, &token, vec![]).await?;
        println!(
            "   {:<6} joined at revision {:<3} token {}…",
            s.site,
            m.revision,
            &token[..28]
        );
        last_token = token;
    }
    match meshfed_api::client::join(&sites[2].dir, "north", &last_token, vec![]).await {
        Err(e) => println!("   north, same token again: refused: {e}"),
        Ok(_) => bail!("a reused token was accepted"),
    }
    // A token holder whose own CA claims west's trust domain would take it over.
    let rogue = lab::make_site(&root, "rogue", "west.example.org")?;
    let (token, _) =
        meshfed_api::client::create_token(&fed_dir, "rogue", Duration::from_secs(600), None, false)
            .await?;
    match meshfed_api::client::join(&rogue.dir, "rogue", &token, vec![]).await {
        Err(e) => println!("   rogue, claiming west's trust domain: refused: {e}"),
        Ok(_) => bail!("a join took over another site's trust domain"),
    }

    // 3. Gateways from the catalog: west and north export orders.shop; east imports it.
    let ips: [IpAddr; 3] = [
        [127, 0, 0, 2].into(),
        [127, 0, 0, 3].into(),
        [127, 0, 0, 4].into(),
    ];
    let port = free_port(ips[0])?;
    let uport = free_port(ips[0])?;
    let mut gateways = Vec::new();
    let mut east_config = PathBuf::new();
    for (i, s) in sites.iter().enumerate() {
        let mut b = lab::ConfigBuilder {
            federation: Some((s.dir.clone(), ips[i])),
            reload_interval: Some(Duration::from_millis(500)),
            ..Default::default()
        };
        if i > 0 {
            let who = if i == 1 { "west" } else { "north" };
            b = b.export("orders.shop", port, vec![service(who).await?]);
            if who == "west" {
                b = b.export_udp("echo.ops", uport, vec![udp_service(who).await?]);
            }
        } else {
            // East answers DNS for its imports, and forwards other names to the
            // machine's resolver.
            let mut dns = "listen: 127.0.0.1:0".to_string();
            if let Some(up) = system_resolver() {
                dns.push_str(&format!("\nforward: {up}"));
            }
            b.dns = Some(dns);
        }
        let config = b.write(s)?;
        if i == 0 {
            east_config = config.clone();
        }
        gateways.push(Some(
            meshfed::site::start(GatewayConfig::load(&config)?).await?,
        ));
    }
    let import = SocketAddr::new(ips[0], port);
    println!("\n3. catalog: west and north export orders.shop:{port}; east imports it");
    // Wait until east has applied both sites' exports: north (first by name at equal
    // capacity) then answers.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (who, _, _) = loop {
        match call(import, b"hello".to_vec()).await {
            Ok(r) if r.0.ends_with("north") || Instant::now() >= deadline => break r,
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "import not ready yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => bail!("east never got the import: {e:#}"),
        }
    };
    println!(
        "   client ──tcp──▶ east egress {import} ══QUIC mTLS (meshfed/1)══▶ a site's gateway ──tcp──▶ orders.shop"
    );
    if let Some(east) = &gateways[0] {
        // The first call needs one link; the others are dialed beside it. Wait (a
        // little) for every link's handshake before showing who was verified.
        let deadline = Instant::now() + Duration::from_secs(10);
        let out = loop {
            let (out, _) = east.gateway.connected_peers();
            if out.iter().all(|(_, id)| id.is_some()) || Instant::now() >= deadline {
                break out;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        for (site, id) in out {
            println!(
                "   east verified peer {site:<6} as {}",
                id.map_or("-".into(), |i| i.to_string())
            );
        }
    }
    println!("   first call: {who}");
    if let Some(dns) = gateways[0].as_ref().and_then(|g| g.dns) {
        let name = "orders.shop.svc.clusterset.local";
        let a = resolve(dns.0, name, hickory_proto::rr::RecordType::A).await?;
        let srv = resolve(
            dns.0,
            &format!("_{port}._tcp.{name}"),
            hickory_proto::rr::RecordType::SRV,
        )
        .await?;
        println!(
            "   east DNS {}: {name} A {}; SRV {}",
            dns.0,
            a.join(","),
            srv.join(",")
        );
        let ip: IpAddr = a
            .first()
            .and_then(|a| a.parse().ok())
            .context("no A record")?;
        let (who, _, _) = call(SocketAddr::new(ip, port), b"by name".to_vec()).await?;
        println!("   a call by name: {who}");
    }

    // 4. Bytes.
    let payload: Vec<u8> = (0..PAYLOAD).map(|i| (i * 7 % 251) as u8).collect();
    let (who, intact, took) = call(import, payload).await?;
    if !intact {
        bail!("the tunnel corrupted data");
    }
    println!(
        "\n4. bytes: {} MiB echoed back intact in {:.0} ms, {who}",
        PAYLOAD >> 20,
        took.as_secs_f64() * 1e3
    );

    // UDP: west's echo.ops, carried as QUIC datagrams on the same peer connection.
    let uimport = SocketAddr::new(ips[0], uport);
    let deadline = Instant::now() + Duration::from_secs(10);
    while udp_calls(uimport, 1, "west").await?.0 == 0 {
        if Instant::now() >= deadline {
            bail!("east never got the UDP import echo.ops:{uport}");
        }
    }
    let (ok, last) = udp_calls(uimport, 100, "west").await?;
    println!(
        "   UDP: client ──udp──▶ east {uimport} ══QUIC datagrams══▶ west ──udp──▶ echo.ops: {ok} of 100 datagrams answered (last: {last:?})"
    );

    // 5. Failover, live.
    println!("\n5. failover: north's gateway stops");
    if let Some(north) = gateways[2].take() {
        north.shutdown().await;
    }
    let (who, intact, took) = call(import, b"still there?".to_vec()).await?;
    if !intact {
        bail!("the failover call's data came back corrupted");
    }
    println!(
        "   next call: {who} ({:.0} ms, intact: {intact}); the client saw no error",
        took.as_secs_f64() * 1e3
    );
    tokio::time::sleep(LEASE_TTL + Duration::from_millis(500)).await;
    let status = meshfed_api::client::status(&fed_dir).await?;
    for line in meshfed_api::client::status_table(fed_td.as_str(), &status).lines() {
        println!("   {line}");
    }
    let (who, intact, took) = call(import, b"and now?".to_vec()).await?;
    if !intact {
        bail!("the call after the lease came back corrupted");
    }
    println!(
        "   after the lease: {who} in {:.1} ms",
        took.as_secs_f64() * 1e3
    );

    if let Some(east) = &gateways[0] {
        let (_, metrics) = meshfed_lifecycle::admin::get(east.gateway.admin_addr, "/metrics")
            .await
            .map_err(anyhow::Error::msg)?;
        for line in metrics
            .lines()
            .filter(|l| l.starts_with("meshfed_gateway_failovers_total"))
        {
            println!("   east {line}");
        }
    }

    // A failing call, diagnosed: a name nobody exports (a typo, say).
    if let Some(east) = &gateways[0] {
        println!("\n   meshfed diagnose payments.shop:{port} at east (nobody exports it):");
        let mut cfg = GatewayConfig::load(&east_config)?;
        cfg.admin = east.gateway.admin_addr;
        if let (Some(d), Some((udp, _))) = (cfg.dns.as_mut(), east.dns) {
            d.listen = udp;
        }
        let facts = crate::cmd::diagnose::gather(
            &cfg,
            meshfed_catalog::ServiceName::parse("payments.shop")?,
            Some(port),
            None,
        )
        .await?;
        let report = meshfed::diagnose::judge(&facts);
        for line in meshfed::diagnose::render(&report).lines() {
            println!("   {line}");
        }
    }

    println!("\n6. drain: SIGTERM-style shutdown of every gateway and the federation");
    for g in gateways.into_iter().flatten() {
        g.shutdown().await;
    }
    fed.shutdown().await;
    println!(
        "   done. Configs, certificates and the catalog cache are in {}",
        root.display()
    );
    Ok(())
}
