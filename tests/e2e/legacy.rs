//! Legacy hosts registered ServiceEntry-style: exported by the registering site's
//! gateway, imported and reached from another site, live, with bad files losing nothing.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::federation::{Fed, fed_config, free_port, joined};
use crate::harness::*;

fn register(dir: &std::path::Path, file: &std::path::Path) -> (i32, String) {
    let out = Command::new(BIN)
        .args([
            "register",
            "-f",
            file.to_str().unwrap(),
            "--dir",
            dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A federation with west (gateway on 127.0.0.8) and east (127.0.0.9, with DNS), both
/// joined and running: returns the federation, west's files and both gateways.
pub(crate) fn east_and_west(scratch: &Scratch) -> (Fed, meshfed_lab::SiteFiles, Gw, Gw) {
    let fed = Fed::start(&Fed::init(scratch), 0);
    let [east, west] = joined(scratch, &fed, ["east", "west"]);
    let cfg = |s: &meshfed_lab::SiteFiles, ip: [u8; 4], dns: bool| meshfed_lab::ConfigBuilder {
        dns: dns.then(|| "listen: 127.0.0.1:0".to_string()),
        ..fed_config(s, ip)
    };
    let west_gw = Gw::start(&west, &cfg(&west, [127, 0, 0, 8], false)).unwrap();
    let east_gw = Gw::start(&east, &cfg(&east, [127, 0, 0, 9], true)).unwrap();
    (fed, west, west_gw, east_gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_legacy_host_is_reachable_from_another_site() {
    let scratch = Scratch::new("legacy");
    let (_fed, west, _west_gw, east_gw) = east_and_west(&scratch);

    // The legacy host: an echo server no meshfed runs on, registered at west by
    // hostname (resolution DNS; `localhost` resolves through the hosts file).
    let legacy = echo_server().await;
    let svc_port = free_port([127, 0, 0, 9].into());
    let entry = scratch.0.join("billing.yaml");
    std::fs::write(
        &entry,
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: billing\n  namespace: mainframe\nspec:\n  hosts: [billing.mainframe.example]\n  location: MESH_INTERNAL\n  ports:\n  - number: {svc_port}\n    name: tcp\n    protocol: TCP\n    targetPort: {}\n  resolution: DNS\n  endpoints:\n  - address: localhost\n",
            legacy.port()
        ),
    )
    .unwrap();
    let (code, err) = register(&west.dir, &entry);
    assert_eq!(code, 0, "{err}");

    // East imports it from the catalog and reaches the legacy host through both gateways.
    let import = std::net::SocketAddr::new([127, 0, 0, 9].into(), svc_port);
    let started = Instant::now();
    loop {
        if echo_once(import).await.is_ok() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never reachable:\n{}",
            east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "registered service reachable from east after {:?}",
        started.elapsed()
    );
    let dns = east_gw.dns.unwrap();
    // Its MCS name and its ServiceEntry host both resolve at the importing site.
    for name in [
        "billing.mainframe.svc.clusterset.local",
        "billing.mainframe.example",
    ] {
        let d = crate::dns::dig(dns, &[name, "A"]);
        assert_eq!(d.answer.len(), 1, "{name}: {d:?}");
        assert!(d.answer[0].ends_with(" A 127.0.0.9"), "{name}: {d:?}");
    }

    // A bad file is refused and what was registered keeps working.
    let bad = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/serviceentry/bad/bad-port.yaml"
    );
    let (code, err) = register(&west.dir, std::path::Path::new(bad));
    assert!(code == 1 && err.contains("spec.ports[1].number"), "{err}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    echo_once(import)
        .await
        .expect("still reachable after a refused file");
}

/// The banner server on `addr`, until aborted (then the port is closed).
fn legacy_server(name: &'static str, addr: std::net::SocketAddr) -> tokio::task::JoinHandle<()> {
    let l = std::net::TcpListener::bind(addr).unwrap();
    l.set_nonblocking(true).unwrap();
    crate::federation::banner_on(name, tokio::net::TcpListener::from_std(l).unwrap())
}

/// West registers a legacy service whose endpoints are health-checked; north exports the
/// same service. While west's endpoints pass, east is served by west (more ready
/// endpoints); when they all fail, west publishes 0 ready and east is served by north;
/// when they come back, west again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_health_check_moves_traffic_between_sites() {
    use crate::federation::{banner_server, wait_answer, who_answers};
    let scratch = Scratch::new("health");
    let fed = Fed::start(&Fed::init(&scratch), 0);
    let [east, west, north] = joined(&scratch, &fed, ["east", "west", "north"]);
    let import_ip: std::net::IpAddr = [127, 0, 0, 11].into();
    let svc_port = free_port(import_ip);
    let cfg = fed_config;
    let west_gw = Gw::start(&west, &cfg(&west, [127, 0, 0, 12])).unwrap();
    let _north_gw = Gw::start(
        &north,
        &cfg(&north, [127, 0, 0, 13]).export(
            "inventory.legacy",
            svc_port,
            vec![banner_server("north").await],
        ),
    )
    .unwrap();
    let east_gw = Gw::start(&east, &cfg(&east, [127, 0, 0, 11])).unwrap();

    // Two legacy endpoints on one port number, on two loopback addresses.
    let legacy_port = crate::federation::free_port([127, 0, 0, 1].into());
    let eps: [std::net::SocketAddr; 2] = [
        ([127, 0, 0, 1], legacy_port).into(),
        ([127, 0, 0, 14], legacy_port).into(),
    ];
    let mut servers: Vec<_> = eps.iter().map(|a| legacy_server("legacy", *a)).collect();
    let entry = scratch.0.join("inventory.yaml");
    std::fs::write(
        &entry,
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: inventory\n  namespace: legacy\n  annotations:\n    health.meshfed.io/check: tcp\n    health.meshfed.io/interval: 100ms\n    health.meshfed.io/timeout: 200ms\n    health.meshfed.io/unhealthy-threshold: \"2\"\n    health.meshfed.io/healthy-threshold: \"1\"\nspec:\n  hosts: [inventory.corp.example]\n  ports:\n  - {{number: {svc_port}, name: tcp, protocol: TCP, targetPort: {legacy_port}}}\n  resolution: STATIC\n  endpoints:\n  - address: 127.0.0.1\n  - address: 127.0.0.14\n"
        ),
    )
    .unwrap();
    let (code, err) = register(&west.dir, &entry);
    assert_eq!(code, 0, "{err}");
    let import = std::net::SocketAddr::new(import_ip, svc_port);
    wait_answer(import, "legacy:ping", &east_gw).await;

    // Both endpoints go down. Calls move to north at once (west refuses before any
    // payload byte and east retries north); then west's checks fail, it publishes 0
    // ready, and east stops even trying west.
    for s in servers.drain(..) {
        s.abort();
    }
    let started = Instant::now();
    let count = |needle: &str| west_gw.logs().matches(needle).count();
    while count("endpoint unhealthy") < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{}",
            west_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "both endpoints unhealthy {:?} after they went down",
        started.elapsed()
    );
    loop {
        let before = east_gw.metric("meshfed_gateway_failovers_total").await;
        assert_eq!(who_answers(import).await.unwrap(), "north:ping");
        if east_gw.metric("meshfed_gateway_failovers_total").await == before {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "east kept trying west after its endpoints were unhealthy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "east routes to north without trying west {:?} after",
        started.elapsed()
    );

    // They come back: one passing check each and west serves again.
    servers.extend(eps.iter().map(|a| legacy_server("legacy", *a)));
    let started = Instant::now();
    wait_answer(import, "legacy:ping", &east_gw).await;
    eprintln!(
        "back to west {:?} after the endpoints came back",
        started.elapsed()
    );
    assert!(count("endpoint healthy") >= 1);
}

/// A test CA with a server certificate for `host` and a client certificate, as PEM files
/// in `dir`: ca.pem, server.pem/key, client.pem/key.
pub(crate) fn tls_files(dir: &std::path::Path, host: &str) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "legacy test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    for (name, sans) in [
        ("server", vec![host.to_string()]),
        ("client", vec!["client.example".to_string()]),
    ] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(sans)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

/// A TLS echo server for `dir`'s server certificate; with `client_ca`, it requires a
/// client certificate from that CA. Returns its address.
async fn tls_echo(dir: &std::path::Path, require_client: bool) -> std::net::SocketAddr {
    tls_echo_as(dir, require_client, "tls").await
}

/// A server config for `dir`'s server certificate; with `require_client`, one that
/// requires a client certificate from `dir`'s CA.
fn server_config(dir: &std::path::Path, require_client: bool) -> rustls::ServerConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = if require_client {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .unwrap();
        builder.with_client_cert_verifier(v)
    } else {
        builder.with_no_client_auth()
    };
    builder.with_single_cert(certs, key).unwrap()
}

/// [`tls_echo`] answering `{name}:` and the 4 bytes.
pub(crate) async fn tls_echo_as(
    dir: &std::path::Path,
    require_client: bool,
    name: &'static str,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls_server(
        server_config(dir, require_client),
        move |mut tls| async move {
            let mut b = [0u8; 4];
            if tls.read_exact(&mut b).await.is_ok() {
                let _ = tls.write_all(format!("{name}:").as_bytes()).await;
                let _ = tls.write_all(&b).await;
            }
            let _ = tls.shutdown().await;
        },
    )
    .await
}

/// A TLS server on a free loopback port with `cfg`: each accepted connection, once its
/// handshake is done, goes to `serve` on a task of its own. Returns its address.
async fn tls_server<F, Fut>(cfg: rustls::ServerConfig, serve: F) -> std::net::SocketAddr
where
    F: Fn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (acceptor, serve) = (acceptor.clone(), serve.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(s).await {
                    serve(tls).await;
                }
            });
        }
    });
    addr
}

/// East and west in a federation with their gateways (east's imports on 127.0.0.16),
/// and a test CA's files for `billing.mainframe.example` in the scratch's `certs/`.
struct TlsSites {
    scratch: Scratch,
    _fed: Fed,
    east: meshfed_lab::SiteFiles,
    west: meshfed_lab::SiteFiles,
    west_gw: Gw,
    east_gw: Gw,
    certs: std::path::PathBuf,
}

fn tls_sites(name: &str) -> TlsSites {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let scratch = Scratch::new(name);
    let fed = Fed::start(&Fed::init(&scratch), 0);
    let [east, west] = joined(&scratch, &fed, ["east", "west"]);
    let west_gw = Gw::start(&west, &fed_config(&west, [127, 0, 0, 15])).unwrap();
    let east_gw = Gw::start(&east, &fed_config(&east, [127, 0, 0, 16])).unwrap();
    let certs = scratch.0.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    tls_files(&certs, "billing.mainframe.example");
    TlsSites {
        scratch,
        _fed: fed,
        east,
        west,
        west_gw,
        east_gw,
        certs,
    }
}

/// TLS origination toward a legacy endpoint signed by a test CA: SIMPLE to a server, and
/// MUTUAL to one that requires a client certificate; a wrong SNI is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_origination_simple_and_mutual() {
    use crate::federation::who_answers;
    let TlsSites {
        scratch,
        _fed,
        east: _,
        west,
        west_gw: _west_gw,
        east_gw,
        certs,
    } = tls_sites("tlsorig");
    let simple = tls_echo(&certs, false).await;
    let mutual = tls_echo(&certs, true).await;
    let port = |ip: [u8; 4]| free_port(ip.into());
    let (p1, p2, p3) = (
        port([127, 0, 0, 16]),
        port([127, 0, 0, 16]),
        port([127, 0, 0, 16]),
    );
    let doc = |name: &str, svc_port: u16, ep: std::net::SocketAddr, tls: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: mainframe}}\nspec:\n  hosts: [{name}.mainframe.example]\n  ports: [{{number: {svc_port}, name: tls, protocol: TLS, targetPort: {}}}]\n  resolution: STATIC\n  endpoints: [{{address: {}}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}-tls, namespace: mainframe}}\nspec:\n  host: {name}.mainframe.example\n  trafficPolicy:\n    tls:\n{tls}",
            ep.port(),
            ep.ip()
        )
    };
    let file = scratch.0.join("tls.yaml");
    std::fs::write(
        &file,
        [
            doc(
                "billing",
                p1,
                simple,
                "      mode: SIMPLE\n      caCertificates: certs/ca.pem\n",
            ),
            doc(
                "ledger",
                p2,
                mutual,
                "      mode: MUTUAL\n      sni: billing.mainframe.example\n      caCertificates: certs/ca.pem\n      clientCertificate: certs/client.pem\n      privateKey: certs/client.key\n",
            ),
            doc(
                "wrongname",
                p3,
                simple,
                "      mode: SIMPLE\n      sni: other.example\n      caCertificates: certs/ca.pem\n",
            ),
        ]
        .join("---\n"),
    )
    .unwrap();
    let (code, err) = register(&west.dir, &file);
    assert_eq!(code, 0, "{err}");
    let at = |p: u16| std::net::SocketAddr::new([127, 0, 0, 16].into(), p);
    for (p, what) in [(p1, "SIMPLE"), (p2, "MUTUAL")] {
        let started = Instant::now();
        loop {
            match who_answers(at(p)).await {
                Ok(a) if a == "tls:ping" => break,
                r => {
                    assert!(
                        started.elapsed() < Duration::from_secs(10),
                        "{what}: {r:?}\n{}",
                        east_gw.logs()
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    // A certificate that does not match the SNI: refused at west (its own refusal, for
    // this service, naming the handshake), and the client never gets an answer. Waits
    // for that refusal, so a listener that is not up yet cannot pass for it.
    let started = Instant::now();
    let logs = loop {
        let r = who_answers(at(p3)).await;
        assert!(
            r.as_ref().map_or(true, |a| a.is_empty()),
            "a wrong SNI was served: {r:?}"
        );
        let logs = _west_gw.logs();
        if logs.contains("wrongname.mainframe:") && logs.contains("TLS to") {
            break logs;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "west never refused the wrong SNI:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let line = logs
        .lines()
        .find(|l| l.contains("wrongname.mainframe:") && l.contains("TLS to"))
        .unwrap();
    assert!(
        line.contains("endpoint_connect_failed")
            && line.contains("not valid for name \"other.example\""),
        "the refusal does not say the certificate is not valid for the name: {line}"
    );
    // A bad TLS file is refused by register, naming the field.
    let bad = scratch.0.join("bad.yaml");
    std::fs::write(
        &bad,
        doc(
            "x",
            p3,
            simple,
            "      mode: SIMPLE\n      caCertificates: certs/nope.pem\n",
        ),
    )
    .unwrap();
    let (code, err) = register(&west.dir, &bad);
    assert!(
        code == 1 && err.contains("caCertificates") && err.contains("nope.pem"),
        "{err}"
    );
}

/// An HTTPS server (HTTP/1.1, or h2 when ALPN picks it) for `dir`'s server
/// certificate, answering `https path=<path> host=<Host> xfcc=<x-forwarded-client-cert>`
/// and, on h2, ` h2`. Returns its address.
async fn https_endpoint(dir: &std::path::Path) -> std::net::SocketAddr {
    let mut cfg = server_config(dir, false);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tls_server(cfg, |tls| async move {
        let svc =
            hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let host = req
                    .headers()
                    .get(hyper::header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let xfcc = req
                    .headers()
                    .get("x-forwarded-client-cert")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                // h2 carries the authority in the URI, HTTP/1.1 in Host.
                let host = req.uri().authority().map_or(host, |a| a.to_string());
                let h2 = if req.version() == hyper::Version::HTTP_2 {
                    " h2"
                } else {
                    ""
                };
                let body = format!(
                    "https path={} host={host} xfcc={xfcc}{h2}\n",
                    req.uri().path()
                );
                Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from(body),
                )))
            });
        let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
            .await;
    })
    .await
}

/// Istio's way to reach an HTTPS host from plain-HTTP clients: a ServiceEntry port with
/// `protocol: HTTP` and a DestinationRule `tls: SIMPLE`. The exporting gateway
/// originates TLS on its pooled HTTP/1.1 connections to the endpoint, so the port keeps
/// per-request handling (the caller's identity in `x-forwarded-client-cert`, which only
/// the HTTP path sets); an importer's HTTP clients get its answers. A CA that did not
/// sign the endpoint is a typed 503 `endpoint_connect_failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_origination_on_an_http_port() {
    let TlsSites {
        scratch,
        _fed,
        east,
        west,
        west_gw: _west_gw,
        east_gw: _east_gw,
        certs,
    } = tls_sites("tlshttp");
    let ep = https_endpoint(&certs).await;
    // Registers at west `name.mainframe.example` on a free port of east's import address,
    // `protocol` to `endpoint`, with TLS as `tls` says; its URL at east.
    let service = |name: &str, protocol: &str, endpoint: std::net::SocketAddr, tls: &str| {
        let port = free_port([127, 0, 0, 16].into());
        let file = scratch.0.join(format!("{name}.yaml"));
        std::fs::write(
            &file,
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: mainframe}}\nspec:\n  hosts: [{name}.mainframe.example]\n  ports: [{{number: {port}, name: p, protocol: {protocol}, targetPort: {}}}]\n  resolution: STATIC\n  endpoints: [{{address: {}}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}-tls, namespace: mainframe}}\nspec:\n  host: {name}.mainframe.example\n  trafficPolicy:\n    tls:\n      mode: SIMPLE\n{tls}",
                endpoint.port(),
                endpoint.ip()
            ),
        )
        .unwrap();
        let (code, err) = register(&west.dir, &file);
        assert_eq!(code, 0, "{err}");
        format!("http://127.0.0.16:{port}")
    };
    // curl with `args` until its output starts with `want`, within 15 s; the output and
    // the time the answering request took.
    let until = |args: Vec<String>, want: &'static str| async move {
        let started = Instant::now();
        loop {
            let asked = Instant::now();
            let out = Command::new("curl")
                .args(["-sS", "--max-time", "8"])
                .args(&args)
                .output()
                .unwrap();
            let text = [out.stdout, out.stderr].concat();
            let text = String::from_utf8_lossy(&text).into_owned();
            if text.starts_with(want) {
                return (text, asked.elapsed());
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{args:?}: no {want:?} in time: {text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let ca = "      caCertificates: certs/ca.pem\n";

    // HTTP/1.1 to the endpoint, the client's Host kept.
    let url = service("billing", "HTTP", ep, ca);
    let (body, _) = until(
        vec![
            "-H".into(),
            "host: billing.mainframe.example".into(),
            format!("{url}/hello"),
        ],
        "https ",
    )
    .await;
    assert_eq!(
        body,
        format!(
            "https path=/hello host=billing.mainframe.example xfcc=URI={}\n",
            east.id
        )
    );

    // An h2 port (gRPC's transport) to the same host: TLS with ALPN h2 on the
    // gateway's h2 connection to the endpoint, the client's authority and the caller's
    // identity set there too.
    let sni = "      sni: billing.mainframe.example\n      caCertificates: certs/ca.pem\n";
    let url = service("stream", "HTTP2", ep, sni);
    let (body, _) = until(
        vec!["--http2-prior-knowledge".into(), format!("{url}/over-h2")],
        "https ",
    )
    .await;
    let authority = url.trim_start_matches("http://");
    assert_eq!(
        body,
        format!(
            "https path=/over-h2 host={authority} xfcc=URI={} h2\n",
            east.id
        )
    );

    // A CA that did not sign the endpoint's certificate: no connection to it, and a
    // typed answer, not a reset.
    let other = scratch.0.join("other");
    std::fs::create_dir_all(&other).unwrap();
    tls_files(&other, "ledger.mainframe.example");
    let head_only = |url: &str| {
        vec![
            "-D".into(),
            "/dev/stderr".into(),
            "-o".into(),
            "/dev/null".into(),
            format!("{url}/"),
        ]
    };
    let url = service(
        "ledger",
        "HTTP",
        ep,
        "      sni: billing.mainframe.example\n      caCertificates: other/ca.pem\n",
    );
    let (head, _) = until(head_only(&url), "HTTP/1.1 503").await;
    assert!(
        head.contains("meshfed-error: endpoint_connect_failed"),
        "{head}"
    );
    // The operator replaces that CA file with the right one (a rotation, by rename as
    // a Secret volume does it): the next connections trust it, with no restart and no
    // new registration.
    let next = other.join("ca.pem.next");
    std::fs::copy(certs.join("ca.pem"), &next).unwrap();
    std::fs::rename(&next, other.join("ca.pem")).unwrap();
    let (head, _) = until(head_only(&url), "HTTP/1.1 200").await;
    assert!(!head.contains("meshfed-error"), "{head}");

    // An endpoint that accepts and never answers the handshake: the same typed answer
    // once the connect timeout is spent (per attempt), not a request held for ever.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_at = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let url = service("mute", "HTTP", silent_at, sni);
    let (head, took) = until(head_only(&url), "HTTP/1.1 503").await;
    assert!(
        head.contains("meshfed-error: endpoint_connect_failed"),
        "{head}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
}

/// A real Knot DNS server on `127.0.0.1:port`, authoritative for `corp.example`, until
/// dropped. A missing `knotd` fails loudly.
struct Knot(std::process::Child);

impl Knot {
    fn start(dir: &std::path::Path, port: u16) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("corp.example.zone"),
            "$ORIGIN corp.example.\n$TTL 60\n@ SOA ns hostmaster 1 60 10 3600 60\n@ NS ns\nns A 192.0.2.53\nwww A 192.0.2.10\n",
        )
        .unwrap();
        let conf = format!(
            "server:\n  listen: 127.0.0.1@{port}\n  rundir: {d}\n  udp-workers: 1\n  tcp-workers: 1\n  background-workers: 1\n\
             database:\n  storage: {d}\n\
             log:\n  - target: stderr\n    any: warning\n\
             template:\n  - id: default\n    storage: {d}\n    file: \"%s.zone\"\n\
             zone:\n  - domain: corp.example\n",
            d = dir.display()
        );
        std::fs::write(dir.join("knot.conf"), conf).unwrap();
        let child = Command::new("knotd")
            .args(["-c", dir.join("knot.conf").to_str().unwrap()])
            .stderr(std::fs::File::create(dir.join("knot.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("knotd ({e}): apt-get install -y knot"));
        let k = Self(child);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let started = Instant::now();
        while crate::dns::try_dig(addr, &["www.corp.example", "A"]).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "knotd did not answer: {}",
                std::fs::read_to_string(dir.join("knot.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        k
    }
}

impl Drop for Knot {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_from_another_site_reaches_a_legacy_dns_server_through_the_tunnel() {
    let scratch = Scratch::new("legacy-dns");
    // The legacy DNS server: Knot, on a host no meshfed runs on, reached only by west.
    let kport = free_port([127, 0, 0, 1].into());
    let _knot = Knot::start(&scratch.0.join("knot"), kport);
    let (_fed, west, _west_gw, east_gw) = east_and_west(&scratch);

    // Registered at west as Istio writes it: DNS over UDP and TCP on one port number.
    let port = free_port([127, 0, 0, 9].into());
    let entry = scratch.0.join("ns.yaml");
    std::fs::write(
        &entry,
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: ns\n  namespace: corp\nspec:\n  hosts: [ns.corp.example]\n  location: MESH_INTERNAL\n  ports:\n  - {{number: {port}, name: dns, protocol: UDP, targetPort: {kport}}}\n  - {{number: {port}, name: dns-tcp, protocol: TCP, targetPort: {kport}}}\n  resolution: STATIC\n  endpoints:\n  - address: 127.0.0.1\n"
        ),
    )
    .unwrap();
    let (code, err) = register(&west.dir, &entry);
    assert_eq!(code, 0, "{err}");

    // From east, real dig over UDP (its default) reaches Knot at west.
    let import = std::net::SocketAddr::new([127, 0, 0, 9].into(), port);
    let started = Instant::now();
    let d = loop {
        let d = crate::dns::try_dig(import, &["www.corp.example", "A"]);
        if let Ok(d) = d {
            break d;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never answered: {d:?}\n{}",
            east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "dig through the tunnel answered after {:?}: {d:?}",
        started.elapsed()
    );
    assert_eq!(d.status, "NOERROR");
    assert!(d.flags.contains("aa"), "Knot's authoritative answer: {d:?}");
    assert_eq!(d.answer, vec!["www.corp.example. 60 IN A 192.0.2.10"]);
    assert!(
        east_gw
            .metric(
                "meshfed_gateway_udp_datagrams_total{direction=\"egress\",flow=\"from_tunnel\"}"
            )
            .await
            >= 1.0,
        "the answer came back as a QUIC datagram"
    );
    // The same port over TCP is a separate import and reaches the same server.
    let t = crate::dns::dig(import, &["+tcp", "ns.corp.example", "A"]);
    assert_eq!(
        t.answer,
        vec!["ns.corp.example. 60 IN A 192.0.2.53"],
        "{t:?}"
    );
    // East's federated DNS names the service, with SRV records per protocol and the
    // ServiceEntry's port names.
    let dns = east_gw.dns.unwrap();
    let a = crate::dns::dig(dns, &["ns.corp.example", "A"]);
    assert_eq!(a.answer.len(), 1, "{a:?}");
    assert!(a.answer[0].ends_with(" A 127.0.0.9"), "{a:?}");
    for (name, what) in [
        ("_dns._udp.ns.corp.svc.clusterset.local", "udp"),
        ("_dns-tcp._tcp.ns.corp.svc.clusterset.local", "tcp"),
    ] {
        let s = crate::dns::dig(dns, &[name, "SRV"]);
        assert_eq!(s.answer.len(), 1, "{what}: {s:?}");
        assert!(
            s.answer[0].ends_with(&format!(" {port} ns.corp.svc.clusterset.local.")),
            "{what}: {s:?}"
        );
    }
}
