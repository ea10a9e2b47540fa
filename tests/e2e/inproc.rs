//! The in-process component layer: the real federation service on the embedded store,
//! on 127.0.0.1:0, and real gateways started with `meshfed::site::start`, all in this
//! test's runtime: no processes, no fakes. The gateway's federation agent, egress
//! failover and the server's authorization are tested against it. The same idea as
//! `kubeapi.rs`'s in-process Kubernetes API server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use meshfed_api::{Refusal, pb};
use meshfed_catalog::catalog::Protocol;
use meshfed_federation::node::{self, StoreChoice};
use meshfed_gateway::GatewayConfig;
use meshfed_identity::TrustDomain;
use meshfed_lab::{self as lab, ConfigBuilder, SiteFiles};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Scratch, closed_port, echo_server};

/// A federation node serving from a fresh directory, in this process.
pub struct Federation {
    pub dir: PathBuf,
    pub node: node::Running,
}

impl Federation {
    pub async fn start(scratch: &Scratch) -> Self {
        Self::start_with_svid_ttl(scratch, node::DEFAULT_SVID_TTL).await
    }

    /// With the federation's own SVID living `svid_ttl` (renewed at half that).
    pub async fn start_with_svid_ttl(scratch: &Scratch, svid_ttl: Duration) -> Self {
        let dir = scratch.0.join("federation");
        node::init(&dir, &TrustDomain::new("fed.example.org").unwrap()).unwrap();
        let node = node::serve_with(
            &dir,
            ([127, 0, 0, 1], 0).into(),
            vec![],
            Duration::from_secs(2),
            StoreChoice::Embedded { create: false },
            svid_ttl,
        )
        .await
        .expect("federation serves");
        Self { dir, node }
    }

    /// Makes a site with its own CA and joins it with a one-time token.
    pub async fn join(&self, scratch: &Scratch, site: &str) -> SiteFiles {
        let s = lab::make_site(&scratch.0, site, &format!("{site}.example.org")).unwrap();
        let (token, _) = meshfed_api::client::create_token(
            &self.dir,
            site,
            Duration::from_secs(60),
            Some(&s.trust_domain),
            false,
        )
        .await
        .unwrap();
        meshfed_api::client::join(&s.dir, site, &token, vec![])
            .await
            .expect("join");
        s
    }

    /// A client of the federation authenticated as `site`'s gateway.
    pub async fn client_as(
        &self,
        site: &SiteFiles,
    ) -> pb::federation_client::FederationClient<tonic::transport::Channel> {
        let ca = meshfed_identity::Ca::load(&self.dir.join("ca")).unwrap();
        meshfed_api::client::client(
            &[self.node.addr.to_string()],
            ca.bundle(1),
            &site.cert,
            &site.key,
        )
        .await
        .expect("client")
    }
}

/// A gateway (with DNS when `cfg` asks) of a joined site, in this process. Each site
/// binds its imports on its own loopback address (`127.0.0.<host>`): every site
/// imports what the others export, on the service's port.
pub(crate) async fn gateway(
    site: &SiteFiles,
    host: u8,
    cfg: ConfigBuilder,
) -> meshfed::site::RunningSite {
    gateway_with(site, host, cfg, None).await
}

/// [`gateway`], with a Kubernetes client for its pod reflector (`caller_pod_ip`).
async fn gateway_with(
    site: &SiteFiles,
    host: u8,
    cfg: ConfigBuilder,
    kube: Option<kube::Client>,
) -> meshfed::site::RunningSite {
    let cfg = ConfigBuilder {
        federation: Some((site.dir.clone(), [127, 0, 0, host].into())),
        reload_interval: Some(Duration::from_millis(200)),
        ..cfg
    };
    let path = cfg.write(site).unwrap();
    meshfed::site::start_with(GatewayConfig::load(&path).unwrap(), kube)
        .await
        .expect("gateway starts")
}

/// Waits until `gw`'s agent has applied a plan that imports `service` from `backends`.
async fn until_imported(
    gw: &meshfed::site::RunningSite,
    service: &str,
    backends: &[&str],
) -> meshfed_gateway::federated::AppliedPlan {
    let mut plans = gw.gateway.applied_plans();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(a) = plans.borrow_and_update().clone() {
            let found = a
                .plan
                .imports
                .iter()
                .find(|i| i.service.to_string() == service);
            if let Some(im) = found {
                let have: Vec<&str> = im.backends.iter().map(|b| b.as_str()).collect();
                if have == backends {
                    return (*a).clone();
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{service} never imported from {backends:?}; last plan: {:?}",
            plans.borrow().as_ref().map(|a| &a.plan)
        );
        let _ = tokio::time::timeout(left, plans.changed()).await;
    }
}

async fn echo_through(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"ping").await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(out)
}

/// The usual in-process pair: west exports orders.shop (an echo server) and east, with
/// the config `east_cfg` makes (it may write files into east's directory first),
/// imports it; returned once a call through east's import answers (without caller mTLS:
/// a plain call cannot prove itself there).
struct Pair {
    scratch: Scratch,
    fed: Federation,
    east: SiteFiles,
    west: SiteFiles,
    east_gw: meshfed::site::RunningSite,
    west_gw: meshfed::site::RunningSite,
    port: u16,
    /// East's import of orders.shop.
    addr: SocketAddr,
}

/// East's config with a signing authority: an intermediate of its root, on disk in
/// `<east>/intermediate`, issuing SVIDs that live `ttl`.
fn renewing(east: &SiteFiles, ttl: Duration) -> ConfigBuilder {
    use meshfed_identity::{Ca, ca::DEFAULT_CA_TTL};
    let authority = east.dir.join("intermediate");
    Ca::load(&east.dir.join("ca"))
        .unwrap()
        .intermediate(DEFAULT_CA_TTL)
        .unwrap()
        .save(&authority)
        .unwrap();
    ConfigBuilder {
        renew: Some((authority, ttl)),
        ..Default::default()
    }
}

async fn pair(name: &str, east_cfg: impl FnOnce(&SiteFiles) -> ConfigBuilder) -> Pair {
    let scratch = Scratch::new(name);
    let fed = Federation::start(&scratch).await;
    let east = fed.join(&scratch, "east").await;
    let west = fed.join(&scratch, "west").await;
    let port = crate::harness::listen().local_addr().unwrap().port();
    let west_gw = gateway(
        &west,
        4,
        ConfigBuilder::default().export("orders.shop", port, vec![echo_server().await]),
    )
    .await;
    let cfg = east_cfg(&east);
    let plain = !cfg.caller_mtls;
    let east_gw = gateway(&east, 2, cfg).await;
    let applied = until_imported(&east_gw, "orders.shop", &["west"]).await;
    let addr = SocketAddr::new(
        applied
            .address_of(&applied.plan.imports[0].service)
            .unwrap(),
        port,
    );
    if plain {
        until_call(addr, true, "through the pair").await;
    }
    Pair {
        scratch,
        fed,
        east,
        west,
        east_gw,
        west_gw,
        port,
        addr,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_applies_the_federations_plan_and_traffic_follows_it() {
    let scratch = Scratch::new("inproc-agent");
    let fed = Federation::start(&scratch).await;
    let (east, west) = (
        fed.join(&scratch, "east").await,
        fed.join(&scratch, "west").await,
    );
    let port = crate::harness::listen().local_addr().unwrap().port();
    let west_gw = gateway(
        &west,
        4,
        ConfigBuilder::default().export("orders.shop", port, vec![echo_server().await]),
    )
    .await;
    let east_gw = gateway(&east, 2, ConfigBuilder::default()).await;

    let applied = until_imported(&east_gw, "orders.shop", &["west"]).await;
    let im = &applied.plan.imports[0];
    assert_eq!((im.port, im.protocol), (port, Protocol::Tcp));
    assert!(applied.revision > 0);
    let addr = SocketAddr::new(applied.address_of(&im.service).unwrap(), port);
    assert_eq!(echo_through(addr).await.unwrap(), b"ping");

    // West withdraws (its gateway stops and its lease runs out): the plan drops it.
    west_gw.shutdown().await;
    let mut plans = east_gw.gateway.applied_plans();
    let deadline = Instant::now() + Duration::from_secs(15);
    while plans
        .borrow_and_update()
        .as_ref()
        .is_some_and(|a| a.plan.imports.iter().any(|i| !i.backends.is_empty()))
    {
        assert!(Instant::now() < deadline, "west's lease never ran out");
        let _ = tokio::time::timeout(Duration::from_secs(1), plans.changed()).await;
    }
    east_gw.shutdown().await;
    fed.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_fails_over_past_a_site_whose_endpoint_refuses() {
    let scratch = Scratch::new("inproc-failover");
    let fed = Federation::start(&scratch).await;
    let east = fed.join(&scratch, "east").await;
    let north = fed.join(&scratch, "north").await;
    let west = fed.join(&scratch, "west").await;
    let port = crate::harness::listen().local_addr().unwrap().port();
    // Both export with one ready endpoint each; north (first by name at equal
    // capacity) has an endpoint that refuses every connection.
    let north_gw = gateway(
        &north,
        3,
        ConfigBuilder::default().export("orders.shop", port, vec![closed_port()]),
    )
    .await;
    let west_gw = gateway(
        &west,
        4,
        ConfigBuilder::default().export("orders.shop", port, vec![echo_server().await]),
    )
    .await;
    let east_gw = gateway(&east, 2, ConfigBuilder::default()).await;
    let applied = until_imported(&east_gw, "orders.shop", &["north", "west"]).await;
    let addr = SocketAddr::new(
        applied
            .address_of(&applied.plan.imports[0].service)
            .unwrap(),
        port,
    );

    for _ in 0..5 {
        assert_eq!(echo_through(addr).await.unwrap(), b"ping");
    }
    let (_, metrics) = meshfed_lifecycle::admin::get(east_gw.gateway.admin_addr, "/metrics")
        .await
        .unwrap();
    let failovers = metrics
        .lines()
        .find(|l| {
            l.starts_with("meshfed_gateway_failovers_total{reason=\"endpoint_connect_failed\"}")
        })
        .unwrap_or_else(|| panic!("no failover counted:\n{metrics}"));
    assert!(failovers.ends_with(" 5"), "{failovers}");
    for g in [east_gw, west_gw, north_gw] {
        g.shutdown().await;
    }
    fed.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_refuses_what_a_caller_may_not_do_with_typed_reasons() {
    let scratch = Scratch::new("inproc-authz");
    let fed = Federation::start(&scratch).await;
    let east = fed.join(&scratch, "east").await;
    let _west = fed.join(&scratch, "west").await;
    let mut c = fed.client_as(&east).await;

    let publish = |site: &str| pb::PublishRequest {
        site: site.into(),
        exports: vec![],
        gateway_addresses: vec!["127.0.0.1:4433".into()],
        outbound_only: false,
    };
    c.publish(publish("east"))
        .await
        .expect("a site publishes for itself");
    let s = c.publish(publish("west")).await.unwrap_err();
    assert_eq!(
        Refusal::of_status(&s),
        Some(Refusal::PublishForeignSite),
        "{s:?}"
    );

    // Operator calls need the operator's SVID, not a site's.
    let s = c
        .create_token(pb::CreateTokenRequest {
            site: "south".into(),
            ttl_seconds: 60,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(Refusal::of_status(&s), Some(Refusal::NotOperator), "{s:?}");
    let s = c.status(pb::StatusRequest {}).await.unwrap_err();
    assert_eq!(Refusal::of_status(&s), Some(Refusal::NotOperator), "{s:?}");

    // The counters say the same reasons.
    let m = |r: Refusal| {
        fed.node
            .service
            .metrics
            .refusals
            .get_or_create(&meshfed_federation::server::ReasonLabels { reason: r.code() })
            .get()
    };
    assert_eq!(m(Refusal::PublishForeignSite), 1);
    assert_eq!(m(Refusal::NotOperator), 2);
    fed.node.shutdown().await;
}

/// Polls `addr` until a call's outcome is `want` (true: echoed), or fails the test.
async fn until_call(addr: SocketAddr, want: bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ok = matches!(echo_through(addr).await, Ok(b) if b == b"ping");
        if ok == want {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: still {ok} after 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A gateway's `/metrics` text.
async fn metrics(gw: &meshfed::site::RunningSite) -> String {
    let (_, m) = meshfed_lifecycle::admin::get(gw.gateway.admin_addr, "/metrics")
        .await
        .unwrap();
    m
}

/// Drains the gateways, then the federation.
async fn shutdown<const N: usize>(gws: [meshfed::site::RunningSite; N], fed: Federation) {
    for g in gws {
        g.shutdown().await;
    }
    fed.node.shutdown().await;
}

pub(crate) fn counter(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_policies_decide_which_caller_reaches_an_export() {
    use crate::harness::meshfed;
    let scratch = Scratch::new("inproc-policy");
    let fed = Federation::start(&scratch).await;
    let east = fed.join(&scratch, "east").await;
    let north = fed.join(&scratch, "north").await;
    let west = fed.join(&scratch, "west").await;
    let port = crate::harness::listen().local_addr().unwrap().port();
    let west_gw = gateway(
        &west,
        4,
        ConfigBuilder::default().export("orders.shop", port, vec![echo_server().await]),
    )
    .await;
    // East's clients are its frontend (declared: a VM site's local network); north's
    // calls carry its gateway's own ID.
    let east_gw = gateway(
        &east,
        2,
        ConfigBuilder {
            source_identity: Some("spiffe://east.example.org/ns/shop/sa/frontend".into()),
            ..Default::default()
        },
    )
    .await;
    let north_gw = gateway(&north, 3, ConfigBuilder::default()).await;
    let at = |a: meshfed_gateway::federated::AppliedPlan| {
        SocketAddr::new(a.address_of(&a.plan.imports[0].service).unwrap(), port)
    };
    let east_addr = at(until_imported(&east_gw, "orders.shop", &["west"]).await);
    let north_addr = at(until_imported(&north_gw, "orders.shop", &["west"]).await);
    until_call(east_addr, true, "east, no policy").await;
    until_call(north_addr, true, "north, no policy").await;

    // ALLOW east's frontend only: north's gateway is no longer let in.
    let allow = scratch.0.join("allow.yaml");
    std::fs::write(
        &allow,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: frontend-only, namespace: shop}\n\
         spec:\n  targetRefs: [{kind: Service, name: orders}]\n  rules:\n  - from:\n    - source:\n        principals: [\"east.example.org/ns/shop/sa/frontend\"]\n",
    )
    .unwrap();
    let dir = west.dir.to_str().unwrap();
    let (code, out, err) = meshfed(&["validate", "-f", allow.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("policy shop/frontend-only Allow applies to orders.shop"),
        "{out}"
    );
    let (code, out, err) = meshfed(&["register", "-f", allow.to_str().unwrap(), "--dir", dir]);
    assert_eq!(code, 0, "{out}{err}");
    until_call(north_addr, false, "north under frontend-only").await;
    until_call(east_addr, true, "east under frontend-only").await;

    // DENY the shop namespace: DENY comes first, so east is refused too, by name.
    let deny = scratch.0.join("deny.yaml");
    std::fs::write(
        &deny,
        "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: no-shop, namespace: shop}\n\
         spec:\n  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [shop]}\n    to:\n    - operation: {ports: [\"" .to_owned()
            + &port.to_string()
            + "\"]}\n",
    )
    .unwrap();
    let (code, out, err) = meshfed(&["register", "-f", deny.to_str().unwrap(), "--dir", dir]);
    assert_eq!(code, 0, "{out}{err}");
    until_call(east_addr, false, "east under no-shop").await;
    // That failure may have been a stream opened just before the policy arrived and cut
    // by it (counted as a cut, not a refusal); an open made now is refused.
    assert!(
        !matches!(echo_through(east_addr).await, Ok(b) if b == b"ping"),
        "east under no-shop, a new open"
    );

    let (_, metrics) = meshfed_lifecycle::admin::get(west_gw.gateway.admin_addr, "/metrics")
        .await
        .unwrap();
    let denied = |p: &str| {
        counter(
            &metrics,
            &format!("meshfed_gateway_authz_denials_total{{policy=\"{p}\"}}"),
        )
    };
    assert!(denied("no_allow_match") >= 1.0, "{metrics}");
    assert!(denied("shop/no-shop") >= 1.0, "{metrics}");
    assert!(
        counter(
            &metrics,
            "meshfed_gateway_refusals_total{direction=\"ingress\",reason=\"denied\"}"
        ) >= 2.0,
        "{metrics}"
    );
    // The caller's side says why, with the policy's name, and did not fail over.
    let (_, east_metrics) = meshfed_lifecycle::admin::get(east_gw.gateway.admin_addr, "/metrics")
        .await
        .unwrap();
    assert!(
        counter(
            &east_metrics,
            "meshfed_gateway_refusals_total{direction=\"egress\",reason=\"denied\"}"
        ) >= 1.0,
        "{east_metrics}"
    );

    // Both withdrawn: everyone is back.
    let (code, out, err) = meshfed(&[
        "unregister",
        "shop/no-shop",
        "shop/frontend-only",
        "--dir",
        dir,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    until_call(north_addr, true, "north without policies").await;
    until_call(east_addr, true, "east without policies").await;
    // Removing what is not there removes nothing.
    let (code, _, err) = meshfed(&["unregister", "shop/no-shop", "--dir", dir]);
    assert_ne!(code, 0);
    assert!(err.contains("not registered: shop/no-shop"), "{err}");

    for g in [east_gw, north_gw, west_gw] {
        g.shutdown().await;
    }
    fed.node.shutdown().await;
}

/// Opens a raw QUIC connection to `to` presenting `svid`, and one stream for
/// `service:port`; `Ok` when the far side accepted.
pub(crate) async fn open_as(
    svid: &meshfed_identity::Svid,
    to: SocketAddr,
    expect: &meshfed_identity::SpiffeId,
    trust: meshfed_identity::TrustBundle,
    service: &str,
    port: u16,
) -> Result<(), String> {
    use meshfed_gateway::wire::{self, Response};
    use meshfed_identity::{BundleSet, PeerPolicy, SpiffeVerifier};
    use std::sync::Arc;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bundles: BundleSet = [trust].into_iter().collect();
    let v = SpiffeVerifier::new(
        Arc::new(arc_swap::ArcSwap::from_pointee(bundles)),
        PeerPolicy::Only([expect.clone()].into()),
    );
    let resolver =
        Arc::new(meshfed_identity::tls::SvidResolver::new(svid).map_err(|e| e.to_string())?);
    let cfg = meshfed_gateway::tunnel::client_config(resolver, v, Default::default())
        .map_err(|e| e.to_string())?;
    let ep = quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).map_err(|e| e.to_string())?;
    let conn = ep
        .connect_with(cfg, to, "peer")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let open = wire::Open {
        service: service.parse().unwrap(),
        port,
        source: svid.id.clone(),
        flow: None,
        client: None,
        selector: None,
        subset: None,
    };
    send.write_all(&open.encode())
        .await
        .map_err(|e| e.to_string())?;
    let header = meshfed_gateway::tunnel::read_header(&mut recv)
        .await
        .map_err(|e| format!("no answer: {e}"))?;
    let r = wire::decode_response(&header).map_err(|e| e.to_string());
    conn.close(0u32.into(), b"done");
    match r? {
        Response::Accept => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_reaches_every_site_without_a_restart() {
    use meshfed_identity::{Ca, TrustBundle, ca::DEFAULT_CA_TTL, ca::DEFAULT_SVID_TTL};
    let Pair {
        scratch: _scratch,
        fed,
        east,
        west,
        east_gw,
        west_gw,
        port,
        addr: east_addr,
    } = pair("inproc-rotation", |_| ConfigBuilder::default()).await;

    // East's new root; an SVID from it is refused by west until west trusts that root.
    let old_ca = Ca::load(&east.dir.join("ca")).unwrap();
    let new_ca = Ca::generate(&east.trust_domain, DEFAULT_CA_TTL).unwrap();
    let new_svid = new_ca.issue(&east.id, DEFAULT_SVID_TTL).unwrap();
    let west_bundle = Ca::load(&west.dir.join("ca")).unwrap().bundle(1);
    let west_quic = west_gw.gateway.quic_addr;
    let before = open_as(
        &new_svid,
        west_quic,
        &west.id,
        west_bundle.clone(),
        "orders.shop",
        port,
    )
    .await;
    assert!(
        before.is_err(),
        "west took an SVID of a root it does not know yet"
    );

    // The overlap bundle (old and new root), one sequence later, through the federation.
    let overlap = TrustBundle {
        sequence: 2,
        ..old_ca.bundle(1).union(&new_ca.bundle(1))
    };
    let seq = meshfed_api::client::update_bundle(
        &east.dir,
        &east.cert,
        &east.key,
        overlap.to_jwks().unwrap(),
    )
    .await
    .expect("the federation takes a newer bundle");
    assert_eq!(seq, 2);
    // The same sequence again is stale: a typed refusal.
    let stale = meshfed_api::client::update_bundle(
        &east.dir,
        &east.cert,
        &east.key,
        overlap.to_jwks().unwrap(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            stale,
            meshfed_api::client::ClientError::Refused {
                refusal: Some(meshfed_api::Refusal::StaleBundle),
                ..
            }
        ),
        "{stale}"
    );

    // West, never restarted, takes the new root: a new-root SVID is accepted, and old
    // connections keep working.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match open_as(
            &new_svid,
            west_quic,
            &west.id,
            west_bundle.clone(),
            "orders.shop",
            port,
        )
        .await
        {
            Ok(()) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "west never took the new root: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until_call(east_addr, true, "after the rotation").await;
    let on_disk = std::fs::read(west.dir.join("bundles/east.example.org.json")).unwrap();
    let on_disk = TrustBundle::from_jwks(east.trust_domain.clone(), &on_disk).unwrap();
    assert_eq!((on_disk.sequence, on_disk.x509_authorities.len()), (2, 2));

    shutdown([east_gw, west_gw], fed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_site_is_distrusted_everywhere_and_its_connections_close() {
    use meshfed_identity::{Ca, Svid};
    let Pair {
        scratch: _scratch,
        fed,
        east,
        west,
        east_gw,
        west_gw,
        port,
        addr: east_addr,
    } = pair("inproc-remove", |_| ConfigBuilder::default()).await;
    let east_svid = Svid::load(&east.cert, &east.key).unwrap();
    let west_bundle = Ca::load(&west.dir.join("ca")).unwrap().bundle(1);
    let west_quic = west_gw.gateway.quic_addr;
    open_as(
        &east_svid,
        west_quic,
        &west.id,
        west_bundle.clone(),
        "orders.shop",
        port,
    )
    .await
    .expect("east is trusted before its removal");
    assert!(west.dir.join("bundles/east.example.org.json").exists());

    // An operator removes east; a site cannot remove another.
    let not_operator = {
        let mut c = fed.client_as(&west).await;
        c.remove_site(meshfed_api::pb::RemoveSiteRequest {
            site: "east".into(),
        })
        .await
        .unwrap_err()
    };
    assert_eq!(
        meshfed_api::Refusal::of_status(&not_operator),
        Some(meshfed_api::Refusal::NotOperator)
    );
    let started = Instant::now();
    meshfed_api::client::remove_site(&fed.dir, "east")
        .await
        .unwrap();

    // West drops east's bundle and closes east's connection: a new handshake with
    // east's SVID is refused, and east's clients are refused.
    let deadline = started + Duration::from_secs(10);
    while open_as(
        &east_svid,
        west_quic,
        &west.id,
        west_bundle.clone(),
        "orders.shop",
        port,
    )
    .await
    .is_ok()
    {
        assert!(
            Instant::now() < deadline,
            "west still trusts east 10 s after its removal"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let distrusted = started.elapsed();
    until_call(east_addr, false, "east after its removal").await;
    let cut_off = started.elapsed();
    assert!(!west.dir.join("bundles/east.example.org.json").exists());
    // No connection from east is left open at west (one that slipped in while the
    // bundle was withdrawn is closed when the reloaded set lands).
    let from_east = || {
        west_gw
            .gateway
            .connected_peers()
            .1
            .iter()
            .any(|id| id.trust_domain_str() == "east.example.org")
    };
    while from_east() {
        assert!(
            Instant::now() < deadline,
            "a connection from east stayed open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "removed site: new handshakes refused after {} ms, its clients refused after {} ms",
        distrusted.as_millis(),
        cut_off.as_millis()
    );
    let unknown = meshfed_api::client::remove_site(&fed.dir, "east")
        .await
        .unwrap_err();
    assert!(
        matches!(
            unknown,
            meshfed_api::client::ClientError::Refused {
                refusal: Some(meshfed_api::Refusal::UnknownSite),
                ..
            }
        ),
        "{unknown}"
    );

    shutdown([east_gw, west_gw], fed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_renews_its_svid_from_an_intermediate_with_calls_flowing() {
    use meshfed_identity::{Ca, Svid};
    let Pair {
        scratch: _scratch,
        fed,
        east,
        west,
        east_gw,
        west_gw,
        port,
        addr: east_addr,
    } = pair("inproc-renew", |east| {
        renewing(east, Duration::from_secs(4))
    })
    .await;

    // Calls at about 40 per second for 11 s: the SVID is renewed about every 2 s.
    let (mut ok, mut failed) = (0u32, 0u32);
    let end = Instant::now() + Duration::from_secs(11);
    while Instant::now() < end {
        match echo_through(east_addr).await {
            Ok(b) if b == b"ping" => ok += 1,
            _ => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let m = metrics(&east_gw).await;
    let renewed = counter(&m, "meshfed_gateway_svid_renewals_total{result=\"ok\"}");
    let reloaded = counter(
        &m,
        "meshfed_gateway_identity_reloads_total{what=\"svid\",result=\"ok\"}",
    );
    eprintln!("SVID renewals: {renewed}, loaded: {reloaded}; calls ok {ok}, failed {failed}");
    assert_eq!(failed, 0, "{ok} calls went through, {failed} failed");
    assert!(renewed >= 4.0 && reloaded >= 4.0, "{m}");
    // The SVID on disk is the renewer's: leaf and intermediate, short-lived, and west
    // takes it in a new handshake.
    let svid = Svid::load(&east.cert, &east.key).unwrap();
    assert_eq!(svid.chain.len(), 2);
    let life = svid.not_after_unix().unwrap() - svid.not_before_unix().unwrap();
    assert!(life <= 4 + 60, "lifetime {life} s");
    let west_bundle = Ca::load(&west.dir.join("ca")).unwrap().bundle(1);
    open_as(
        &svid,
        west_gw.gateway.quic_addr,
        &west.id,
        west_bundle,
        "orders.shop",
        port,
    )
    .await
    .expect("a renewed SVID is accepted");

    shutdown([east_gw, west_gw], fed).await;
}

/// What a load run saw: calls that succeeded and failed, and when the last call that
/// succeeded started.
struct Load {
    ok: u32,
    failed: u32,
    last_ok: Option<Instant>,
}

/// Calls `addr` at `rate` per second from spawned tasks until `stop`.
async fn load(addr: SocketAddr, rate: u32, stop: tokio_util::sync::CancellationToken) -> Load {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};
    let (ok, failed) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let last_ok = Arc::new(Mutex::new(None::<Instant>));
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    let tasks = tokio_util::task::TaskTracker::new();
    while !stop.is_cancelled() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        let (ok, failed, last_ok) = (ok.clone(), failed.clone(), last_ok.clone());
        tasks.spawn(async move {
            let started = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(5), echo_through(addr)).await;
            match r {
                Ok(Ok(b)) if b == b"ping" => {
                    ok.fetch_add(1, Ordering::Relaxed);
                    let mut l = last_ok.lock().unwrap();
                    *l = Some(l.map_or(started, |t: Instant| t.max(started)));
                }
                _ => {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    tasks.close();
    tasks.wait().await;
    let last_ok = *last_ok.lock().unwrap();
    Load {
        ok: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        last_ok,
    }
}

/// Issue 15's load test, at a short TTL: while 200 calls per second cross sites, east's
/// SVID renews itself every second and east rotates its root with an overlap (new root
/// published beside the old, signing authority switched, old root withdrawn): no call
/// fails, and new handshakes use the new root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_and_a_root_rotation_under_load_fail_no_call() {
    use meshfed_identity::{Ca, Svid, TrustBundle, ca::DEFAULT_CA_TTL};
    let Pair {
        scratch: _scratch,
        fed,
        east,
        west,
        east_gw,
        west_gw,
        port,
        addr: east_addr,
    } = pair("inproc-churn", |east| {
        renewing(east, Duration::from_secs(2))
    })
    .await;
    let old_root = Ca::load(&east.dir.join("ca")).unwrap();
    let authority = east.dir.join("intermediate");

    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(load(east_addr, 200, stop.clone()));
    let update = |b: TrustBundle| {
        let east = east.clone();
        async move {
            meshfed_api::client::update_bundle(
                &east.dir,
                &east.cert,
                &east.key,
                b.to_jwks().unwrap(),
            )
            .await
            .unwrap()
        }
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    // 1. The overlap: old and new root, published through the federation.
    let new_root = Ca::generate(&east.trust_domain, DEFAULT_CA_TTL).unwrap();
    update(TrustBundle {
        sequence: 2,
        ..old_root.bundle(1).union(&new_root.bundle(1))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // 2. The signing authority moves to the new root; renewals issue new-root SVIDs.
    new_root
        .intermediate(DEFAULT_CA_TTL)
        .unwrap()
        .save(&authority)
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // 3. The old root is withdrawn.
    update(TrustBundle {
        sequence: 3,
        ..new_root.bundle(3)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let Load { ok, failed, .. } = running.await.unwrap();

    let m = metrics(&east_gw).await;
    let renewed = counter(&m, "meshfed_gateway_svid_renewals_total{result=\"ok\"}");
    let loaded = counter(
        &m,
        "meshfed_gateway_identity_reloads_total{what=\"svid\",result=\"ok\"}",
    );
    let refused: f64 = m
        .lines()
        .filter(|l| l.starts_with("meshfed_gateway_svid_refusals_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        + 0.0;
    eprintln!(
        "under load: {ok} calls ok, {failed} failed; {renewed} SVID renewals, {loaded} loaded, {refused} refused; one root rotation"
    );
    assert_eq!(refused, 0.0, "east refused a renewed SVID of its own:\n{m}");
    assert!(
        loaded >= renewed - 1.0,
        "renewed {renewed}, loaded {loaded}"
    );
    assert_eq!(failed, 0, "{ok} ok, {failed} failed");
    assert!(ok >= 1500, "the load ran: {ok} calls");
    assert!(renewed >= 10.0, "{renewed} renewals");
    // East's SVID now chains to the new root alone, and west takes it in a handshake.
    let svid = Svid::load(&east.cert, &east.key).unwrap();
    let west_bundle = Ca::load(&west.dir.join("ca")).unwrap().bundle(1);
    open_as(
        &svid,
        west_gw.gateway.quic_addr,
        &west.id,
        west_bundle,
        "orders.shop",
        port,
    )
    .await
    .expect("a new-root SVID after the rotation");
    let on_disk = std::fs::read(west.dir.join("bundles/east.example.org.json")).unwrap();
    let on_disk = TrustBundle::from_jwks(east.trust_domain.clone(), &on_disk).unwrap();
    assert_eq!(on_disk.x509_authorities, vec![new_root.cert().clone()]);

    shutdown([east_gw, west_gw], fed).await;
}

/// One echo over TLS to a `caller_mtls` listener, presenting `svid` (or no certificate),
/// trusting `bundle` for the gateway `gw`.
async fn tls_echo(
    addr: SocketAddr,
    svid: Option<&meshfed_identity::Svid>,
    bundle: meshfed_identity::TrustBundle,
    gw: &meshfed_identity::SpiffeId,
) -> Result<Vec<u8>, String> {
    use meshfed_identity::{BundleSet, PeerPolicy, SpiffeVerifier};
    use std::sync::Arc;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bundles: BundleSet = [bundle].into_iter().collect();
    let v = SpiffeVerifier::new(
        Arc::new(arc_swap::ArcSwap::from_pointee(bundles)),
        PeerPolicy::Only([gw.clone()].into()),
    );
    let cfg = match svid {
        Some(s) => {
            let r =
                Arc::new(meshfed_identity::tls::SvidResolver::new(s).map_err(|e| e.to_string())?);
            meshfed_identity::tls::client_config(r, v, &[]).map_err(|e| e.to_string())?
        }
        None => rustls::ClientConfig::builder_with_provider(meshfed_identity::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(v))
            .with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("gateway").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    s.write_all(b"ping").await.map_err(|e| e.to_string())?;
    s.shutdown().await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_prove_who_they_are_with_their_svid_at_the_egress() {
    use crate::harness::meshfed;
    use meshfed_identity::{Ca, SpiffeId, ca::DEFAULT_SVID_TTL};
    let Pair {
        scratch,
        fed,
        east,
        west,
        east_gw,
        west_gw,
        port: _,
        addr,
    } = pair("inproc-caller-mtls", |_| ConfigBuilder {
        caller_mtls: true,
        ..Default::default()
    })
    .await;
    // West denies east's batch namespace.
    let deny = scratch.0.join("deny.yaml");
    std::fs::write(
        &deny,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-batch, namespace: shop}\n\
         spec:\n  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [batch]}\n",
    )
    .unwrap();
    let (code, out, err) = meshfed(&[
        "register",
        "-f",
        deny.to_str().unwrap(),
        "--dir",
        west.dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");

    let east_ca = Ca::load(&east.dir.join("ca")).unwrap();
    let svid = |id: &str| {
        east_ca
            .issue(&SpiffeId::new(id).unwrap(), DEFAULT_SVID_TTL)
            .unwrap()
    };
    let frontend = svid("spiffe://east.example.org/ns/shop/sa/frontend");
    let batch = svid("spiffe://east.example.org/ns/batch/sa/report");
    let bundle = east_ca.bundle(1);
    let echo = |s: Option<meshfed_identity::Svid>| {
        let (bundle, gw) = (bundle.clone(), east.id.clone());
        async move { tls_echo(addr, s.as_ref(), bundle, &gw).await }
    };
    // The frontend reaches west; the batch job is denied by west's policy, by name.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let f = echo(Some(frontend.clone())).await;
        let b = echo(Some(batch.clone())).await;
        if f.as_deref() == Ok(b"ping") && b.as_deref() != Ok(b"ping") {
            break;
        }
        assert!(Instant::now() < deadline, "frontend {f:?}, batch {b:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // No certificate, or one of another trust domain: no handshake, nothing opened.
    assert!(echo(None).await.is_err());
    let west_ca = Ca::load(&west.dir.join("ca")).unwrap();
    let foreign = west_ca
        .issue(
            &SpiffeId::new("spiffe://west.example.org/ns/shop/sa/frontend").unwrap(),
            DEFAULT_SVID_TTL,
        )
        .unwrap();
    assert!(echo(Some(foreign)).await.is_err());

    // A client nobody here wrote: openssl s_client with the frontend's SVID.
    let dir = scratch.0.join("frontend");
    std::fs::create_dir_all(&dir).unwrap();
    frontend
        .save(&dir.join("svid.pem"), &dir.join("svid.key"))
        .unwrap();
    east_ca.save(&dir.join("east-ca")).unwrap();
    let mut child = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-ign_eof",
            "-verify_return_error",
            "-connect",
        ])
        .arg(addr.to_string())
        .arg("-cert")
        .arg(dir.join("svid.pem"))
        .arg("-key")
        .arg(dir.join("svid.key"))
        .arg("-CAfile")
        .arg(dir.join("east-ca/ca.pem"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"ping-from-openssl").await.unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut got = vec![0u8; 17];
    tokio::time::timeout(Duration::from_secs(5), stdout.read_exact(&mut got))
        .await
        .expect("openssl got its echo in time")
        .unwrap();
    assert_eq!(&got, b"ping-from-openssl");
    let _ = child.kill().await;

    let m = metrics(&west_gw).await;
    assert!(
        counter(
            &m,
            "meshfed_gateway_authz_denials_total{policy=\"shop/no-batch\"}"
        ) >= 1.0,
        "{m}"
    );
    shutdown([east_gw, west_gw], fed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_federation_renews_its_own_svid_without_a_restart() {
    use meshfed_identity::Svid;
    let scratch = Scratch::new("inproc-fed-svid");
    let fed = Federation::start_with_svid_ttl(&scratch, Duration::from_secs(4)).await;
    let served = || {
        Svid::load(
            &fed.dir.join("federation.pem"),
            &fed.dir.join("federation.key"),
        )
        .unwrap()
        .not_after_unix()
        .unwrap()
    };
    let east = fed.join(&scratch, "east").await;
    let first = served();
    // Past the first SVID's expiry: the node has renewed it, and new handshakes, both
    // a joined site's (verified against the federation's CA) and a joining one's (CA
    // pinned by the token), succeed.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(first < now, "the first SVID has expired ({first} < {now})");
    assert!(served() > now, "renewed: {} > {now}", served());
    let mut c = fed.client_as(&east).await;
    c.publish(pb::PublishRequest {
        site: "east".into(),
        exports: vec![],
        gateway_addresses: vec!["127.0.0.1:4433".into()],
        outbound_only: false,
    })
    .await
    .expect("a site's new handshake after the renewal");
    fed.join(&scratch, "west").await;
    fed.node.shutdown().await;
}

/// An endpoint that reads a PROXY v2 header with meshfed's parser and answers with what
/// it said: `<source> <caller>`.
async fn proxy_reader() -> SocketAddr {
    let l = crate::harness::listen();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                let parsed = loop {
                    match s.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => n += k,
                    }
                    if let Some(p) = meshfed_gateway::proxy_protocol::parse(&buf[..n]) {
                        break p;
                    }
                };
                let caller = parsed
                    .tlvs
                    .iter()
                    .find(|(t, _)| *t == meshfed_gateway::proxy_protocol::TLV_SPIFFE_ID)
                    .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                let _ = s
                    .write_all(format!("{} {caller}", parsed.src).as_bytes())
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_learns_the_client_and_the_caller_by_proxy_protocol() {
    let scratch = Scratch::new("inproc-proxy");
    let fed = Federation::start(&scratch).await;
    let east = fed.join(&scratch, "east").await;
    let west = fed.join(&scratch, "west").await;
    // haproxy, a PROXY-protocol consumer nobody here wrote, answers HTTP with the
    // source address the header gave it.
    let ha = crate::harness::listen().local_addr().unwrap();
    let cfg = scratch.0.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "defaults\n  mode http\n  timeout connect 5s\n  timeout client 10s\n  timeout server 10s\n\
             frontend f\n  bind {ha} accept-proxy\n  http-request return status 200 content-type text/plain lf-string \"src=%[src]:%[src_port]\"\n"
        ),
    )
    .unwrap();
    let mut haproxy = std::process::Command::new("haproxy")
        .arg("-f")
        .arg(&cfg)
        .arg("-db")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("haproxy (deploy/setup-dev.sh installs it)");
    let (ha_port, own_port) = (
        crate::harness::listen().local_addr().unwrap().port(),
        crate::harness::listen().local_addr().unwrap().port(),
    );
    let west_gw = gateway(
        &west,
        4,
        ConfigBuilder {
            proxy_protocol: vec!["web.shop".into(), "raw.shop".into()],
            ..Default::default()
        }
        .export("web.shop", ha_port, vec![ha])
        .export("raw.shop", own_port, vec![proxy_reader().await]),
    )
    .await;
    let caller = "spiffe://east.example.org/ns/shop/sa/frontend";
    let east_gw = gateway(
        &east,
        2,
        ConfigBuilder {
            source_identity: Some(caller.into()),
            ..Default::default()
        },
    )
    .await;
    let web = until_imported(&east_gw, "web.shop", &["west"]).await;
    let web = SocketAddr::new(
        web.address_of(&"web.shop".parse().unwrap()).unwrap(),
        ha_port,
    );
    let raw = until_imported(&east_gw, "raw.shop", &["west"]).await;
    let raw = SocketAddr::new(
        raw.address_of(&"raw.shop".parse().unwrap()).unwrap(),
        own_port,
    );

    // haproxy sees the client's own address, not a gateway's.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (client, body) = loop {
        let got = async {
            let mut s = tokio::net::TcpStream::connect(web).await?;
            let me = s.local_addr()?;
            s.write_all(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n").await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            Ok::<_, std::io::Error>((me, out))
        }
        .await;
        match got {
            Ok((me, out)) if out.contains("200") => break (me, out),
            other => assert!(
                Instant::now() < deadline,
                "no answer from haproxy: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        body.contains(&format!("src={client}")),
        "client {client}: {body}"
    );

    // meshfed's parser sees the caller's SPIFFE ID in its TLV.
    let mut s = tokio::net::TcpStream::connect(raw).await.unwrap();
    let me = s.local_addr().unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out, format!("{me} {caller}"));

    let _ = haproxy.kill();
    let _ = haproxy.wait();
    shutdown([east_gw, west_gw], fed).await;
}

/// Issue 15's load test, the removal: while 200 calls per second cross from east, the
/// operator removes east; from a moment shortly after, no call of east's gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_removed_under_load_is_cut_off_within_the_convergence_target() {
    let Pair {
        scratch: _scratch,
        fed,
        east_gw,
        west_gw,
        addr,
        ..
    } = pair("inproc-remove-load", |_| ConfigBuilder::default()).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(load(addr, 200, stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let removed = Instant::now();
    meshfed_api::client::remove_site(&fed.dir, "east")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let Load {
        ok,
        failed,
        last_ok,
    } = running.await.unwrap();
    let cut_off = last_ok.map(|t| t.saturating_duration_since(removed));
    eprintln!(
        "removal under load: {ok} calls ok (before), {failed} refused (after); last success started {} ms after the removal call",
        cut_off.map_or(0, |d| d.as_millis())
    );
    assert!(ok >= 300, "the load ran before the removal: {ok}");
    assert!(
        failed >= 300,
        "calls after the removal were refused: {failed}"
    );
    let cut_off = cut_off.expect("some calls succeeded");
    assert!(
        cut_off < Duration::from_secs(1),
        "east's calls still got through {cut_off:?} after its removal"
    );
    shutdown([east_gw, west_gw], fed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spiffe_bundle_endpoint_serves_what_py_spiffe_parses() {
    let scratch = Scratch::new("inproc-bundle-endpoint");
    let fed = Federation::start(&scratch).await;
    let east = fed.join(&scratch, "east").await;
    let at = fed
        .node
        .serve_bundle_endpoint(([127, 0, 0, 1], 0).into(), None)
        .await
        .unwrap();
    // An independent SPIFFE implementation reads it: Python's TLS verifies the server
    // against the federation's CA (https_spiffe: no DNS name, so no hostname check),
    // py-spiffe parses the X.509 authorities of the served JWKS.
    let script = r#"
import base64, json, ssl, sys, urllib.request
from spiffe import TrustDomain, X509Bundle
addr, ca, td = sys.argv[1], sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
ctx.check_hostname = False
doc = json.load(urllib.request.urlopen(f"https://{addr}/{td}", context=ctx))
ders = [base64.b64decode(k["x5c"][0]) for k in doc["keys"] if k.get("use") == "x509-svid"]
bundle = X509Bundle.parse_raw(TrustDomain(td), b"".join(ders))
print(bundle.trust_domain, len(bundle.x509_authorities), doc["spiffe_sequence"], doc["spiffe_refresh_hint"], ders[0].hex())
"#;
    let out = tokio::process::Command::new("/opt/meshfed-tools/bin/python")
        .arg("-c")
        .arg(script)
        .arg(at.to_string())
        .arg(fed.dir.join("ca/ca.pem"))
        .arg(east.trust_domain.as_str())
        .output()
        .await
        .expect("py-spiffe (deploy/setup-dev.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(got[..2], ["east.example.org", "1"], "{stdout}");
    // What the endpoint serves is east's own root, with a sequence and a refresh hint.
    let root = meshfed_identity::Ca::load(&east.dir.join("ca")).unwrap();
    let hex: String = root.cert().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(got[4], hex, "the served authority is east's root");
    assert!(
        got[2].parse::<u64>().is_ok() && got[3].parse::<u64>().unwrap() > 0,
        "{stdout}"
    );
    fed.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_signing_authority_never_replaces_the_working_svid() {
    use meshfed_identity::{Ca, Svid};
    let Pair {
        scratch: _scratch,
        fed,
        east,
        east_gw,
        west_gw,
        addr,
        ..
    } = pair("inproc-renew-expired", |east| {
        // A signing authority that has expired by the time the gateway starts.
        let authority = east.dir.join("intermediate");
        Ca::load(&east.dir.join("ca"))
            .unwrap()
            .intermediate(Duration::from_secs(1))
            .unwrap()
            .save(&authority)
            .unwrap();
        std::thread::sleep(Duration::from_millis(2500));
        ConfigBuilder {
            renew: Some((authority, Duration::from_secs(4))),
            ..Default::default()
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m = metrics(&east_gw).await;
    assert!(
        counter(&m, "meshfed_gateway_svid_renewals_total{result=\"failed\"}") >= 1.0,
        "{m}"
    );
    assert_eq!(
        counter(&m, "meshfed_gateway_svid_renewals_total{result=\"ok\"}"),
        0.0,
        "{m}"
    );
    // The working SVID (the root's, for an hour) is still on disk, and calls cross.
    let on_disk = Svid::load(&east.cert, &east.key).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        on_disk.not_after_unix().unwrap() > now,
        "the SVID on disk is alive"
    );
    until_call(addr, true, "after the authority expired").await;
    shutdown([east_gw, west_gw], fed).await;
}

/// Waits until the SVID on disk at `cert` is `want`'s leaf.
async fn until_on_disk(cert: &std::path::Path, want: &meshfed_identity::Svid, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::fs::read_to_string(cert).ok().as_deref() != Some(want.cert_pem().as_str()) {
        assert!(
            Instant::now() < deadline,
            "{what}: the SVID on disk never became the published one"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_takes_its_svid_from_the_workload_api_and_follows_it() {
    use crate::workload_api::WorkloadApi;
    use meshfed_identity::{Ca, SpiffeId, Svid};
    let ttl = Duration::from_secs(120);
    let (api_tx, api_rx) = tokio::sync::oneshot::channel();
    let Pair {
        scratch: _scratch,
        fed,
        east,
        west,
        east_gw,
        west_gw,
        port,
        addr,
    } = pair("inproc-workload-api", |east| {
        // No SVID on disk, and the agent comes up only after the gateway has started
        // waiting for it.
        std::fs::remove_file(&east.cert).unwrap();
        std::fs::remove_file(&east.key).unwrap();
        let socket = east.dir.join("agent.sock");
        let (id, dir) = (east.id.clone(), east.dir.clone());
        let sock = socket.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let api = WorkloadApi::start(&sock);
            let ca = Ca::load(&dir.join("ca")).unwrap();
            api.publish(&ca.issue(&id, ttl).unwrap(), &ca.bundle(1), &[]);
            let _ = api_tx.send(api);
        });
        ConfigBuilder {
            workload_api: Some(format!("unix://{}", socket.display())),
            ..Default::default()
        }
    })
    .await;
    let api = api_rx.await.unwrap();
    let ca = Ca::load(&east.dir.join("ca")).unwrap();
    let (east_b, west_b) = (
        ca.bundle(1),
        Ca::load(&west.dir.join("ca")).unwrap().bundle(1),
    );
    assert!(api.with_header.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    assert_eq!(
        api.without_header
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let bundle_dir = east.dir.join("workload-api-bundles");
    assert!(bundle_dir.join("east.example.org.json").exists());

    // Under load: three rotations, a context without this gateway's SVID, and an agent
    // restart.
    let stop = tokio_util::sync::CancellationToken::new();
    let calls = tokio::spawn(load(addr, 100, stop.clone()));
    let mut last = None;
    for i in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let s = ca.issue(&east.id, ttl).unwrap();
        // The second one also brings west's bundle, federated.
        let fed_b: Vec<_> = if i >= 1 { vec![&west_b] } else { vec![] };
        api.publish(&s, &east_b, &fed_b);
        until_on_disk(&east.cert, &s, &format!("rotation {i}")).await;
        last = Some(s);
    }
    assert!(bundle_dir.join("west.example.org.json").exists());
    let frontend = SpiffeId::new("spiffe://east.example.org/ns/shop/sa/frontend").unwrap();
    api.publish(&ca.issue(&frontend, ttl).unwrap(), &east_b, &[&west_b]);
    tokio::time::sleep(Duration::from_millis(700)).await;
    until_on_disk(&east.cert, last.as_ref().unwrap(), "after a foreign SVID").await;

    let socket = api.socket.clone();
    api.stop();
    drop(api);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let api = WorkloadApi::start(&socket);
    let s = ca.issue(&east.id, ttl).unwrap();
    api.publish(&s, &east_b, &[]);
    until_on_disk(&east.cert, &s, "after the agent restarted").await;
    // West's bundle is no longer sent: its file goes (west stays trusted through the
    // federation's bundles).
    assert!(!bundle_dir.join("west.example.org.json").exists());
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let l = calls.await.unwrap();

    let m = metrics(&east_gw).await;
    let renewed = counter(&m, "meshfed_gateway_svid_renewals_total{result=\"ok\"}");
    let refused = counter(
        &m,
        "meshfed_gateway_svid_refusals_total{reason=\"workload_api_no_svid\"}",
    );
    eprintln!(
        "workload API: {renewed} updates applied, {refused} refused; calls ok {}, failed {}",
        l.ok, l.failed
    );
    assert_eq!(
        l.failed, 0,
        "{} calls went through, {} failed",
        l.ok, l.failed
    );
    assert!(l.ok > 100, "{}", l.ok);
    assert!(renewed >= 4.0 && refused >= 1.0, "{m}");
    // West accepts the SVID the agent issued last, in a new handshake.
    let svid = Svid::load(&east.cert, &east.key).unwrap();
    open_as(
        &svid,
        west_gw.gateway.quic_addr,
        &west.id,
        west_b,
        "orders.shop",
        port,
    )
    .await
    .expect("the agent's SVID is accepted");
    shutdown([east_gw, west_gw], fed).await;
}

/// West exporting `raw.shop` on `port` (an endpoint that answers with the PROXY
/// header's source and the caller it names), east importing it with `caller_pod_ip`
/// over `api`'s pods; the gateways and the import's address once east has it.
async fn pod_ip_sites(
    west: &SiteFiles,
    east: &SiteFiles,
    api: &crate::kubeapi::KubeApi,
    port: u16,
    west_more: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
) -> (
    meshfed::site::RunningSite,
    meshfed::site::RunningSite,
    SocketAddr,
) {
    let west_gw = gateway(
        west,
        4,
        west_more(
            ConfigBuilder {
                proxy_protocol: vec!["raw.shop".into()],
                ..Default::default()
            }
            .export("raw.shop", port, vec![proxy_reader().await]),
        ),
    )
    .await;
    let east_gw = gateway_with(
        east,
        2,
        ConfigBuilder {
            caller_pod_ip: true,
            ..Default::default()
        },
        Some(api.client()),
    )
    .await;
    let raw = until_imported(&east_gw, "raw.shop", &["west"]).await;
    let raw = SocketAddr::new(raw.address_of(&"raw.shop".parse().unwrap()).unwrap(), port);
    (west_gw, east_gw, raw)
}

/// A running pod of namespace `shop` with service account `sa`, address `ip` and
/// `labels`, as the Kubernetes API serves it.
fn running_pod(
    name: &str,
    sa: &str,
    ip: &str,
    host_network: bool,
    labels: &[(&str, &str)],
) -> k8s_openapi::api::core::v1::Pod {
    use k8s_openapi::api::core::v1::{Pod, PodIP, PodSpec, PodStatus};
    let mut p = Pod::default();
    p.metadata.name = Some(name.into());
    p.metadata.namespace = Some("shop".into());
    if !labels.is_empty() {
        p.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
    }
    p.spec = Some(PodSpec {
        service_account_name: Some(sa.into()),
        host_network: host_network.then_some(true),
        ..Default::default()
    });
    p.status = Some(PodStatus {
        phase: Some("Running".into()),
        pod_ip: Some(ip.into()),
        pod_ips: Some(vec![PodIP { ip: ip.into() }]),
        ..Default::default()
    });
    p
}

/// Connects to `to` from the local address `from` (a "pod IP" on loopback) and returns
/// what the endpoint answered, or the error a refusal (a reset) gives.
async fn call_from(from: std::net::IpAddr, to: SocketAddr) -> std::io::Result<String> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(from, 0))?;
    let mut s = s.connect(to).await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await??;
    if out.is_empty() {
        return Err(std::io::Error::other("closed without an answer"));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_kubernetes_the_caller_is_the_pod_whose_address_connects() {
    let pod = |name: &str, sa: &str, ip: &str, host_network: bool| {
        running_pod(name, sa, ip, host_network, &[])
    };
    let api = crate::kubeapi::KubeApi::start().await;
    api.put(&pod("frontend-1", "frontend", "127.0.0.7", false));
    api.put(&pod("node-agent", "agent", "127.0.0.8", true));

    let scratch = Scratch::new("inproc-pod-ip");
    let fed = Federation::start(&scratch).await;
    let east = fed.join(&scratch, "east").await;
    let west = fed.join(&scratch, "west").await;
    let port = crate::harness::listen().local_addr().unwrap().port();
    let (west_gw, east_gw, raw) = pod_ip_sites(&west, &east, &api, port, |c| c).await;
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();

    // The pod's address: the endpoint learns its service account's identity.
    let deadline = Instant::now() + Duration::from_secs(10);
    let got = loop {
        match call_from(ip("127.0.0.7"), raw).await {
            Ok(out) => break out,
            Err(e) => assert!(Instant::now() < deadline, "no answer for the pod: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        got.starts_with("127.0.0.7:")
            && got.ends_with(" spiffe://east.example.org/ns/shop/sa/frontend"),
        "{got}"
    );
    // An address no pod has, and a host-network pod's (its node's, shared): refused.
    for from in ["127.0.0.9", "127.0.0.8"] {
        let r = call_from(ip(from), raw).await;
        assert!(r.is_err(), "{from} was let through: {r:?}");
    }
    // The pod goes: its address names nobody any more.
    api.delete("pods", "shop", "frontend-1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while call_from(ip("127.0.0.7"), raw).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "a deleted pod's address still calls"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = metrics(&east_gw).await;
    assert!(
        counter(
            &m,
            "meshfed_gateway_refusals_total{direction=\"egress\",reason=\"caller_unauthenticated\"}"
        ) >= 3.0,
        "{m}"
    );
    shutdown([east_gw, west_gw], fed).await;
}

/// Istio's `sourceLabels`, for callers the egress knows by their pod address
/// (`caller_pod_ip`): a TCP route registered at west for pods labelled `track: canary`
/// sends their connections to a subset no serving site is in (refused
/// `no_ready_endpoint`), while another pod of the same service account, labelled
/// otherwise, takes the default route. On an HTTP port the same labels pick a route
/// whose fault aborts (418). Relabelling the pod moves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_labels_route_the_connections_of_labelled_pods() {
    let pod = |name: &str, ip: &str, track: &str| {
        running_pod(name, "frontend", ip, false, &[("track", track)])
    };
    let api = crate::kubeapi::KubeApi::start().await;
    api.put(&pod("canary-1", "127.0.0.7", "canary"));
    api.put(&pod("stable-1", "127.0.0.10", "stable"));

    let scratch = Scratch::new("inproc-source-labels");
    let fed = Federation::start(&scratch).await;
    let east = fed.join(&scratch, "east").await;
    let west = fed.join(&scratch, "west").await;
    let port = crate::harness::listen().local_addr().unwrap().port();
    let http_port = crate::harness::listen().local_addr().unwrap().port();
    let out = crate::http::register_yaml(
        &west,
        "routes.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: raw, namespace: shop}\n\
         spec:\n  hosts: [raw.shop]\n  tcp:\n  - match: [{sourceLabels: {track: canary}}]\n\
         \x20   route: [{destination: {host: raw.shop, subset: north}}]\n  - route: [{destination: {host: raw.shop}}]\n\
         ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: raw, namespace: shop}\n\
         spec:\n  host: raw.shop\n  subsets: [{name: north, labels: {topology.istio.io/cluster: north}}]\n\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  hosts: [web.shop]\n  http:\n  - match: [{sourceLabels: {track: canary}}]\n\
         \x20   fault: {abort: {httpStatus: 418, percentage: {value: 100}}}\n\
         \x20   route: [{destination: {host: web.shop}}]\n  - route: [{destination: {host: web.shop}}]\n",
    );
    assert!(out.contains("routes:raw.shop"), "{out}");
    let (web_ep, _) = crate::http::http_endpoint("west", 200).await;
    let (west_gw, east_gw, raw) = pod_ip_sites(&west, &east, &api, port, |c| {
        c.export("web.shop", http_port, vec![web_ep])
            .speaks("web.shop", http_port, "http")
    })
    .await;
    let web = SocketAddr::new(raw.ip(), http_port);
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    // The stable pod is served once the import is up; the canary pod is refused (TCP)
    // and aborted (HTTP) once the routes are applied.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stable = call_from(ip("127.0.0.10"), raw).await;
        let canary = call_from(ip("127.0.0.7"), raw).await;
        let http = (
            http_status_from(ip("127.0.0.10"), web).await,
            http_status_from(ip("127.0.0.7"), web).await,
        );
        if stable.is_ok() && canary.is_err() && http == (Some(200), Some(418)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "routes never applied: stable {stable:?}, canary {canary:?}, HTTP {http:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..10 {
        assert!(call_from(ip("127.0.0.10"), raw).await.is_ok());
        assert!(call_from(ip("127.0.0.7"), raw).await.is_err());
        assert_eq!(http_status_from(ip("127.0.0.10"), web).await, Some(200));
        assert_eq!(http_status_from(ip("127.0.0.7"), web).await, Some(418));
    }
    let m = metrics(&east_gw).await;
    assert!(
        counter(
            &m,
            "meshfed_gateway_refusals_total{direction=\"egress\",reason=\"no_ready_endpoint\"}"
        ) >= 10.0,
        "{m}"
    );
    let import = format!("raw.shop:{port}");
    assert!(
        counter(
            &m,
            &format!(
                "meshfed_gateway_tcp_route_connections_total{{import=\"{import}\",route=\"#0\",site=\"none\"}}"
            )
        ) >= 10.0
            && counter(
                &m,
                &format!(
                    "meshfed_gateway_tcp_route_connections_total{{import=\"{import}\",route=\"#1\",site=\"west\"}}"
                )
            ) >= 10.0,
        "{m}"
    );
    // Relabelled: the pod takes the default route.
    api.put(&pod("canary-1", "127.0.0.7", "stable"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while call_from(ip("127.0.0.7"), raw).await.is_err()
        || http_status_from(ip("127.0.0.7"), web).await != Some(200)
    {
        assert!(
            Instant::now() < deadline,
            "the relabelled pod is still refused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown([east_gw, west_gw], fed).await;
}

/// One HTTP/1.1 GET to `to` from the local address `from`: the answer's status.
async fn http_status_from(from: std::net::IpAddr, to: SocketAddr) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = tokio::net::TcpSocket::new_v4().ok()?;
    s.bind(SocketAddr::new(from, 0)).ok()?;
    let mut s = s.connect(to).await.ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: web.shop\r\nconnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .ok()?
        .ok()?;
    out.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_cannot_hold_more_than_the_caller_handshake_limit() {
    use meshfed_gateway::egress::MAX_CALLER_HANDSHAKES;
    use meshfed_identity::{Ca, SpiffeId, ca::DEFAULT_SVID_TTL};
    let Pair {
        scratch: _scratch,
        fed,
        east,
        east_gw,
        west_gw,
        addr,
        ..
    } = pair("inproc-caller-limit", |_| ConfigBuilder {
        caller_mtls: true,
        ..Default::default()
    })
    .await;
    // More silent clients than the limit: each holds a handshake slot until its
    // deadline; the ones past the limit are reset at once and counted.
    let mut silent = Vec::new();
    for _ in 0..MAX_CALLER_HANDSHAKES + 50 {
        // Those past the limit may be reset before connect returns.
        if let Ok(s) = tokio::net::TcpStream::connect(addr).await {
            silent.push(s);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(&east_gw).await;
        let n = counter(
            &m,
            "meshfed_gateway_refusals_total{direction=\"egress\",reason=\"caller_handshake_limit\"}",
        );
        if n >= 40.0 {
            break;
        }
        assert!(Instant::now() < deadline, "limit never reached: {n}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Once they go, a workload with its SVID gets through.
    drop(silent);
    let east_ca = Ca::load(&east.dir.join("ca")).unwrap();
    let frontend = east_ca
        .issue(
            &SpiffeId::new("spiffe://east.example.org/ns/shop/sa/frontend").unwrap(),
            DEFAULT_SVID_TTL,
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match tls_echo(addr, Some(&frontend), east_ca.bundle(1), &east.id).await {
            Ok(b) if b == b"ping" => break,
            other => assert!(
                Instant::now() < deadline,
                "no call after the flood: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shutdown([east_gw, west_gw], fed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_address_may_be_a_host_name() {
    let scratch = Scratch::new("inproc-hostname");
    let fed = Federation::start(&scratch).await;
    let east = fed.join(&scratch, "east").await;
    let west = fed.join(&scratch, "west").await;
    let port = crate::harness::listen().local_addr().unwrap().port();
    // West's port must be known before it starts (to advertise it): taken from the
    // kernel and released, retried if another process takes it in between.
    let echo = echo_server().await;
    let (quic, west_gw) = 'start: {
        for _ in 0..5 {
            let quic = std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            let cfg = ConfigBuilder {
                listen: Some(quic),
                advertise: Some(format!("localhost:{}", quic.port())),
                federation: Some((west.dir.clone(), [127, 0, 0, 4].into())),
                reload_interval: Some(Duration::from_millis(200)),
                ..Default::default()
            }
            .export("orders.shop", port, vec![echo]);
            let path = cfg.write(&west).unwrap();
            if let Ok(gw) = meshfed::site::start(GatewayConfig::load(&path).unwrap()).await {
                break 'start (quic, gw);
            }
        }
        panic!("west never bound a port it could advertise");
    };
    let east_gw = gateway(&east, 2, ConfigBuilder::default()).await;
    let applied = until_imported(&east_gw, "orders.shop", &["west"]).await;
    let addr = SocketAddr::new(
        applied
            .address_of(&applied.plan.imports[0].service)
            .unwrap(),
        port,
    );
    until_call(addr, true, "through a host-name address").await;
    // East resolved west's name (from /etc/hosts here) and dials what it resolved to.
    // The call may have gone over the connection west dialed to east, before east's own
    // dial is up: wait for it.
    let west_site: meshfed_catalog::SiteName = "west".parse().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut links = east_gw.gateway.peers.links(&west_site);
    while !links.contains(&(quic, true)) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        links = east_gw.gateway.peers.links(&west_site);
    }
    assert!(links.contains(&(quic, true)), "{links:?}");
    shutdown([east_gw, west_gw], fed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbound_only_sites_exports_are_reached_over_the_connections_it_dials() {
    let scratch = Scratch::new("inproc-outbound-only");
    let fed = Federation::start(&scratch).await;
    let east = fed.join(&scratch, "east").await;
    let west = fed.join(&scratch, "west").await;
    let port = crate::harness::listen().local_addr().unwrap().port();
    // West cannot be dialed: it publishes no address and dials east itself.
    let west_gw = gateway(
        &west,
        4,
        ConfigBuilder {
            outbound_only: true,
            ..Default::default()
        }
        .export("orders.shop", port, vec![echo_server().await]),
    )
    .await;
    let east_gw = gateway(&east, 2, ConfigBuilder::default()).await;
    let applied = until_imported(&east_gw, "orders.shop", &["west"]).await;
    let addr = SocketAddr::new(
        applied
            .address_of(&applied.plan.imports[0].service)
            .unwrap(),
        port,
    );
    until_call(addr, true, "to an outbound-only site").await;
    let west_site: meshfed_catalog::SiteName = "west".parse().unwrap();
    let peer = applied
        .plan
        .peers
        .iter()
        .find(|p| p.site == west_site)
        .expect("west is east's peer");
    assert!(peer.addresses.is_empty(), "{:?}", peer.addresses);
    assert!(east_gw.gateway.peers.links(&west_site).is_empty());
    for _ in 0..20 {
        assert_eq!(echo_through(addr).await.unwrap(), b"ping");
    }
    shutdown([east_gw, west_gw], fed).await;
}

/// A NAT between east and west, in user space: east's packets to `listen` leave for
/// `target` from an upstream socket, and replies come back; `rebind` moves to a new
/// upstream socket (a new source port), as a NAT that forgot the mapping does.
struct Nat {
    listen: SocketAddr,
    target: std::sync::Arc<std::sync::Mutex<Option<SocketAddr>>>,
    rebind: std::sync::Arc<tokio::sync::Notify>,
}

impl Nat {
    async fn start() -> Self {
        use std::sync::{Arc, Mutex};
        let down = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let listen = down.local_addr().unwrap();
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let rebind = Arc::new(tokio::sync::Notify::new());
        let (t, r) = (target.clone(), rebind.clone());
        tokio::spawn(async move {
            let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
            // Replies from whichever upstream socket, back to the client.
            let reply = |up: Arc<tokio::net::UdpSocket>| {
                let (down, client) = (down.clone(), client.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(n) = up.recv(&mut buf).await {
                        let to = *client.lock().unwrap();
                        if let Some(to) = to {
                            let _ = down.send_to(&buf[..n], to).await;
                        }
                    }
                });
            };
            let mut up = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
            reply(up.clone());
            let mut buf = vec![0u8; 65536];
            loop {
                tokio::select! {
                    r = down.recv_from(&mut buf) => {
                        let Ok((n, from)) = r else { return };
                        *client.lock().unwrap() = Some(from);
                        let to = *t.lock().unwrap();
                        if let Some(to) = to {
                            let _ = up.send_to(&buf[..n], to).await;
                        }
                    }
                    _ = r.notified() => {
                        up = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
                        reply(up.clone());
                    }
                }
            }
        });
        Self {
            listen,
            target,
            rebind,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nat_rebinding_mid_transfer_keeps_every_stream() {
    let scratch = Scratch::new("inproc-migration");
    let fed = Federation::start(&scratch).await;
    let east = fed.join(&scratch, "east").await;
    let west = fed.join(&scratch, "west").await;
    let nat = Nat::start().await;
    let port = crate::harness::listen().local_addr().unwrap().port();
    // West is dialed through the NAT.
    let west_gw = gateway(
        &west,
        4,
        ConfigBuilder {
            advertise: Some(nat.listen.to_string()),
            ..Default::default()
        }
        .export("bulk.shop", port, vec![echo_server().await]),
    )
    .await;
    *nat.target.lock().unwrap() = Some(west_gw.gateway.quic_addr);
    let east_gw = gateway(&east, 2, ConfigBuilder::default()).await;
    let applied = until_imported(&east_gw, "bulk.shop", &["west"]).await;
    let addr = SocketAddr::new(
        applied
            .address_of(&applied.plan.imports[0].service)
            .unwrap(),
        port,
    );
    until_call(addr, true, "through the NAT").await;

    // Four streams echo 16 KiB chunks for 3 s; the NAT rebinds after 1 s.
    let mut streams = Vec::new();
    for _ in 0..4 {
        streams.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            let chunk = vec![7u8; 16 * 1024];
            let mut back = vec![0u8; chunk.len()];
            let (end, mut moved) = (Instant::now() + Duration::from_secs(3), 0usize);
            while Instant::now() < end {
                s.write_all(&chunk).await?;
                tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await??;
                moved += chunk.len();
            }
            Ok::<_, std::io::Error>(moved)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    nat.rebind.notify_one();
    for s in streams {
        let moved = s.await.unwrap().expect("the stream survives the rebinding");
        assert!(moved > 0);
    }
    // New streams work too.
    assert_eq!(echo_through(addr).await.unwrap(), b"ping");
    shutdown([east_gw, west_gw], fed).await;
}
