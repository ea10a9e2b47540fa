//! Federated DNS with real `dig`: a gateway's DNS answers from the live catalog, and
//! `meshfed dns` answers from a gateway's catalog cache and forwards the rest.

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::federation::{Fed, fed_config, free_port, joined};
use crate::harness::echo_once;
use crate::harness::*;

/// What `dig` printed, by section.
#[derive(Debug, Default)]
pub(crate) struct Dig {
    pub status: String,
    pub flags: String,
    pub answer: Vec<String>,
    pub authority: Vec<String>,
}

pub(crate) fn dig(server: SocketAddr, args: &[&str]) -> Dig {
    match try_dig(server, args) {
        Ok(d) => d,
        Err(text) => panic!("dig {args:?} got no answer:\n{text}"),
    }
}

/// `dig`, or its output when no response came.
pub(crate) fn try_dig(server: SocketAddr, args: &[&str]) -> Result<Dig, String> {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+tries=1", "+time=2"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("dig ({e}): apt-get install -y dnsutils"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut d = Dig::default();
    let mut section = "";
    for line in text.lines() {
        if let Some(rest) = line.split("status: ").nth(1) {
            d.status = rest.split(',').next().unwrap_or_default().to_owned();
        }
        if let Some(rest) = line.strip_prefix(";; flags: ") {
            d.flags = rest.split(';').next().unwrap_or_default().to_owned();
        }
        if line.starts_with(";; ANSWER SECTION") {
            section = "answer";
        } else if line.starts_with(";; AUTHORITY SECTION") {
            section = "authority";
        } else if line.starts_with(";;") || line.trim().is_empty() {
            section = "";
        } else if !line.starts_with(';') {
            let fields = line.split_whitespace().collect::<Vec<_>>().join(" ");
            match section {
                "answer" => d.answer.push(fields),
                "authority" => d.authority.push(fields),
                _ => {}
            }
        }
    }
    if d.status.is_empty() {
        return Err(text);
    }
    Ok(d)
}

/// Waits until `name A` at `server` is `status` (NOERROR with `want` in the answer).
pub(crate) fn wait_dig(
    server: SocketAddr,
    name: &str,
    status: &str,
    want: Option<&str>,
) -> Duration {
    let started = Instant::now();
    loop {
        let d = dig(server, &[name, "A"]);
        let answered = want.is_none_or(|w| d.answer.iter().any(|l| l.contains(w)));
        if d.status == status && answered {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name}: still {d:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_from_the_live_catalog_with_real_dig() {
    let scratch = Scratch::new("dns");
    let fed = Fed::start(&Fed::init(&scratch), 0);
    let [east, west, north] = joined(&scratch, &fed, ["east", "west", "north"]);
    let import_ip: std::net::IpAddr = [127, 0, 0, 5].into();
    let port = free_port(import_ip);
    let fed_cfg = |s: &meshfed_lab::SiteFiles, ip: [u8; 4]| fed_config(s, ip);
    let _west_gw = Gw::start(
        &west,
        &fed_cfg(&west, [127, 0, 0, 6]).export("orders.shop", port, vec![echo_server().await]),
    )
    .unwrap();
    let mut east_cfg = fed_cfg(&east, [127, 0, 0, 5]);
    east_cfg.dns = Some("listen: 127.0.0.1:0\nzones: [mesh.internal]\nttl: 7s".into());
    let east_gw = Gw::start(&east, &east_cfg).unwrap();
    let dns = east_gw.dns.expect("the gateway reports its DNS address");

    // A, from the catalog, pointing at east's import address.
    wait_dig(
        dns,
        "orders.shop.svc.clusterset.local",
        "NOERROR",
        Some("127.0.0.5"),
    );
    let a = dig(dns, &["orders.shop.svc.clusterset.local", "A"]);
    assert_eq!(
        a.answer,
        vec!["orders.shop.svc.clusterset.local. 7 IN A 127.0.0.5"]
    );
    assert!(a.flags.contains("aa"), "{a:?}");
    // SRV (an unnamed port is labelled by its number), TXT, PTR, the extra zone.
    let srv = dig(
        dns,
        &[
            &format!("_{port}._tcp.orders.shop.svc.clusterset.local"),
            "SRV",
        ],
    );
    assert_eq!(
        srv.answer,
        vec![format!(
            "_{port}._tcp.orders.shop.svc.clusterset.local. 7 IN SRV 0 0 {port} orders.shop.svc.clusterset.local."
        )]
    );
    let txt = dig(dns, &["dns-version.clusterset.local", "TXT"]);
    assert_eq!(
        txt.answer,
        vec!["dns-version.clusterset.local. 7 IN TXT \"1.0.0\""]
    );
    let ptr = dig(dns, &["-x", "127.0.0.5"]);
    assert!(
        ptr.answer
            .iter()
            .any(|l| l.ends_with("PTR orders.shop.svc.clusterset.local.")),
        "{ptr:?}"
    );
    let extra = dig(dns, &["ORDERS.shop.svc.mesh.internal", "A"]);
    assert_eq!(extra.answer.len(), 1, "{extra:?}");
    assert!(
        extra.answer[0].starts_with("ORDERS.shop.svc.mesh.internal."),
        "the question's case comes back: {extra:?}"
    );
    // Negative answers: NXDOMAIN and NODATA, both with the zone's SOA.
    let nx = dig(dns, &["nope.shop.svc.clusterset.local", "A"]);
    assert_eq!(nx.status, "NXDOMAIN");
    assert!(
        nx.answer.is_empty() && nx.authority[0].starts_with("clusterset.local. 7 IN SOA"),
        "{nx:?}"
    );
    let nodata = dig(dns, &["orders.shop.svc.clusterset.local", "TXT"]);
    assert_eq!(nodata.status, "NOERROR");
    assert!(
        nodata.answer.is_empty() && nodata.authority.len() == 1,
        "{nodata:?}"
    );
    // TCP.
    let tcp = dig(dns, &["+tcp", "orders.shop.svc.clusterset.local", "A"]);
    assert_eq!(tcp.answer, a.answer);
    let tcp_nx = dig(dns, &["+tcp", "nope.shop.svc.clusterset.local", "A"]);
    assert_eq!(tcp_nx.status, "NXDOMAIN");
    // Not ours, forwarding off.
    assert_eq!(dig(dns, &["example.com", "A"]).status, "REFUSED");

    // A malformed packet gets FORMERR and the server keeps answering.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    sock.send_to(&[0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 63, b'x'], dns)
        .unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = sock.recv_from(&mut buf).expect("an answer to garbage");
    assert!(n >= 12 && buf[..2] == [0xab, 0xcd], "same id");
    assert_eq!(buf[3] & 0x0f, 1, "FORMERR");
    assert_eq!(
        dig(dns, &["orders.shop.svc.clusterset.local", "A"]).answer,
        a.answer
    );

    // Live: north exports a new service; it resolves with no restart. Then north
    // withdraws it (restarted without exports) and the name is NXDOMAIN.
    let mut north_gw = Gw::start(
        &north,
        &fed_cfg(&north, [127, 0, 0, 7]).export("billing.shop", port, vec![echo_server().await]),
    )
    .unwrap();
    let appeared = wait_dig(
        dns,
        "billing.shop.svc.clusterset.local",
        "NOERROR",
        Some("127.0.0.5"),
    );
    north_gw.kill();
    let north_gw = Gw::start(&north, &fed_cfg(&north, [127, 0, 0, 7])).unwrap();
    let withdrawn = wait_dig(dns, "billing.shop.svc.clusterset.local", "NXDOMAIN", None);
    eprintln!("new export resolvable after {appeared:?}; withdrawal NXDOMAIN after {withdrawn:?}");
    drop(north_gw);

    // `meshfed dns` on its own, from east's catalog cache, forwarding other names to the
    // gateway's DNS (which knows mesh.internal; the standalone one does not).
    let (mut standalone, addr) = standalone_dns(
        &east.dir,
        &[
            "--import-address",
            "127.0.0.5",
            "--forward",
            &dns.to_string(),
        ],
    );
    let d = dig(addr, &["orders.shop.svc.clusterset.local", "A"]);
    assert_eq!(
        d.answer[0].split(' ').next_back(),
        Some("127.0.0.5"),
        "{d:?}"
    );
    let fwd = dig(addr, &["orders.shop.svc.mesh.internal", "A"]);
    assert_eq!(fwd.status, "NOERROR", "forwarded: {fwd:?}");
    assert!(
        fwd.answer.iter().any(|l| l.ends_with("127.0.0.5")),
        "the upstream's answer, relayed: {fwd:?}"
    );
    let _ = standalone.kill();
    let _ = standalone.wait();
}

/// With `federation.vip_range`, every import gets its own address: two services on the
/// same port both get a listener, DNS answers each with its own VIP, and PTR maps a VIP
/// back to its one service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vips_give_each_import_its_own_address() {
    let scratch = Scratch::new("vips");
    let fed = Fed::start(&Fed::init(&scratch), 0);
    let [east, west] = joined(&scratch, &fed, ["east", "west"]);
    let port = free_port([127, 0, 0, 1].into());
    let _west_gw = Gw::start(
        &west,
        &fed_config(&west, [127, 0, 0, 21])
            .export("orders.shop", port, vec![echo_server().await])
            .export("billing.shop", port, vec![echo_server().await]),
    )
    .unwrap();
    let mut cfg = fed_config(&east, [127, 0, 0, 22]);
    cfg.vip_range = Some("127.77.0.0/16".into());
    cfg.dns = Some("listen: 127.0.0.1:0".into());
    let east_gw = Gw::start(&east, &cfg).unwrap();
    let dns = east_gw.dns.unwrap();
    let mut vips = Vec::new();
    for svc in ["orders", "billing"] {
        let name = format!("{svc}.shop.svc.clusterset.local");
        wait_dig(dns, &name, "NOERROR", Some(" A 127.77."));
        let d = dig(dns, &[&name, "A"]);
        let ip: std::net::IpAddr = d.answer[0].rsplit(' ').next().unwrap().parse().unwrap();
        // Reachable at its own address, on the shared port.
        let started = Instant::now();
        while echo_once(SocketAddr::new(ip, port)).await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{name} at {ip}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let ptr = dig(dns, &["-x", &ip.to_string()]);
        assert_eq!(ptr.answer.len(), 1, "{ptr:?}");
        assert!(ptr.answer[0].ends_with(&format!("PTR {name}.")), "{ptr:?}");
        vips.push(ip);
    }
    assert_ne!(vips[0], vips[1]);
}

/// `meshfed dns --site east` on its own, from the site directory `dir`, with `extra`
/// flags; returns the process and the address it answers on.
fn standalone_dns(dir: &std::path::Path, extra: &[&str]) -> (std::process::Child, SocketAddr) {
    standalone_dns_in(&[], dir, extra)
}

/// [`standalone_dns`] run under `wrapper` (e.g. `prlimit --nofile=128:128 --`).
fn standalone_dns_in(
    wrapper: &[&str],
    dir: &std::path::Path,
    extra: &[&str],
) -> (std::process::Child, SocketAddr) {
    let (program, before) = match wrapper.split_first() {
        Some((p, rest)) => (*p, [rest, &[BIN]].concat()),
        None => (BIN, vec![]),
    };
    let mut child = Command::new(program)
        .args(before)
        .args([
            "dns",
            "--site",
            "east",
            "--dir",
            dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: SocketAddr = line
        .split_whitespace()
        .nth(4)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    (child, addr)
}

/// The address `name A` answers at `server` (the first).
fn a_record(server: SocketAddr, name: &str) -> String {
    let d = dig(server, &[name, "A"]);
    d.answer
        .first()
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or_else(|| panic!("{name}: {d:?}"))
        .to_owned()
}

/// A VIP stays with its service while the service is imported, across a restart of
/// the gateway, and in `meshfed dns` beside it: a newcomer whose hash collides and whose
/// name sorts first takes the next free address. (Before, addresses were given afresh
/// in name order on every plan, so the newcomer took the older service's address in
/// DNS while the older listener stayed where it was.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vip_stays_with_its_service_when_a_colliding_one_comes() {
    use meshfed_catalog::routing::fnv;
    // A /30 has 2 usable addresses: slot = FNV of `name.namespace` mod 2.
    let slot = |s: &str| fnv(s) % 2;
    let late = (0..64)
        .map(|i| format!("a{i}.shop"))
        .find(|n| slot(n) == slot("zz.shop"))
        .unwrap();
    let scratch = Scratch::new("vip-stays");
    let fed = Fed::start(&Fed::init(&scratch), 0);
    let [east, west, north] = joined(&scratch, &fed, ["east", "west", "north"]);
    let mut cfg = fed_config(&east, [127, 0, 0, 23]);
    cfg.vip_range = Some("127.78.0.0/30".into());
    cfg.dns = Some("listen: 127.0.0.1:0".into());
    let mut east_gw = Gw::start(&east, &cfg).unwrap();
    let dns = east_gw.dns.unwrap();
    let mut wc = crate::federation::client(&fed, &west, &west.cert, &west.key).await;
    crate::federation::publish(&mut wc, "west", vec![crate::federation::export("zz.shop")])
        .await
        .unwrap();
    let zz = "zz.shop.svc.clusterset.local";
    wait_dig(dns, zz, "NOERROR", Some(" A 127.78."));
    let zz_ip = a_record(dns, zz);
    let mut nc = crate::federation::client(&fed, &north, &north.cert, &north.key).await;
    crate::federation::publish(&mut nc, "north", vec![crate::federation::export(&late)])
        .await
        .unwrap();
    let late_name = format!("{late}.svc.clusterset.local");
    wait_dig(dns, &late_name, "NOERROR", Some(" A 127.78."));
    assert_ne!(a_record(dns, &late_name), zz_ip);
    assert_eq!(a_record(dns, zz), zz_ip, "zz.shop kept its address");

    // Restarted on the same directory, the gateway gives the same addresses.
    east_gw.kill();
    let east_gw = Gw::start(&east, &cfg).unwrap();
    let dns = east_gw.dns.unwrap();
    wait_dig(dns, &late_name, "NOERROR", Some(" A 127.78."));
    assert_eq!(
        a_record(dns, zz),
        zz_ip,
        "after a restart: {}",
        east_gw.logs()
    );

    // `meshfed dns` on its own, from the site directory, answers the same.
    let (mut standalone, addr) = standalone_dns(
        &east.dir,
        &[
            "--import-address",
            "127.0.0.23",
            "--vip-range",
            "127.78.0.0/30",
        ],
    );
    let standalone_ip = a_record(addr, zz);
    let _ = standalone.kill();
    let _ = standalone.wait();
    assert_eq!(standalone_ip, zz_ip, "meshfed dns beside the gateway");
}

/// Before: DNS over TCP was hickory-server's, with no bound on connections: under
/// nofile 128, 171 idle connections took every descriptor of `meshfed dns`, and its
/// accept loop then spun on EMFILE (1.15 cores). Now at most an eighth of the limit (16
/// here) are held and the rest are closed at once; UDP answers throughout, the process
/// stays idle, and once the holders time out (5 s without a message) TCP answers again.
#[tokio::test(flavor = "multi_thread")]
async fn a_tcp_flood_holds_at_most_the_dns_servers_share() {
    use std::io::Read;
    let scratch = Scratch::new("dns-tcp-flood");
    let dir = scratch.0.join("east");
    std::fs::create_dir_all(&dir).unwrap();
    let (mut child, dns) = standalone_dns_in(&["prlimit", "--nofile=128:128", "--"], &dir, &[]);
    let ticks = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    assert_eq!(
        dig(dns, &["+tcp", "a.shop.svc.clusterset.local"]).status,
        "NXDOMAIN"
    );

    let mut conns = Vec::new();
    for i in 0..150 {
        match std::net::TcpStream::connect_timeout(&dns, Duration::from_secs(2)) {
            Ok(c) => conns.push(c),
            Err(e) => panic!("connection {i} of the flood: {e}"),
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let (before, t) = (ticks(), Instant::now());
    // UDP goes on.
    assert_eq!(
        dig(dns, &["a.shop.svc.clusterset.local"]).status,
        "NXDOMAIN"
    );
    std::thread::sleep(Duration::from_secs(2));
    let cores = (ticks() - before) as f64 / 100.0 / t.elapsed().as_secs_f64();
    let mut open = 0;
    for c in &mut conns {
        c.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
        let mut b = [0u8; 1];
        if let Err(e) = c.read(&mut b)
            && matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )
        {
            open += 1;
        }
    }
    assert!(open <= 16, "{open} of 150 connections held (nofile 128)");
    assert!(
        cores < 0.3,
        "meshfed dns used {cores:.2} cores while flooded"
    );
    // The holders are cut after 5 s without a message; TCP answers again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while try_dig(dns, &["+tcp", "a.shop.svc.clusterset.local"]).is_err() {
        assert!(Instant::now() < deadline, "TCP never answered again");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(conns);
    let _ = child.kill();
    let _ = child.wait();
}
