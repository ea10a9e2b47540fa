//! The Kubernetes export controller, run unchanged through the real kube client against
//! the in-process API server (`kubeapi`): MCS ServiceExports become the site's exports,
//! with status conditions written back.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    ObjectReference, Pod, PodSpec, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use meshfed_catalog::site::{KUBE_EXPORTS_FILE as EXPORTS_FILE, KubeExports};
use meshfed_kubernetes::controller::ExportController;
use meshfed_kubernetes::{SERVICE_NAME_LABEL, ServiceExport};
use tokio_util::sync::CancellationToken;

use crate::harness::Scratch;
use crate::kubeapi::KubeApi;

fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(ns.into()),
        name: Some(name.into()),
        generation: Some(1),
        ..Default::default()
    }
}

fn service() -> Service {
    Service {
        metadata: meta("shop", "orders"),
        spec: Some(ServiceSpec {
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The Service's EndpointSlice: pods `orders-<i>` at 10.0.0.<i>:8080, ready as given.
fn slice(ready: &[bool]) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            labels: Some([(SERVICE_NAME_LABEL.to_string(), "orders".to_string())].into()),
            ..meta("shop", "orders-x1")
        },
        address_type: "IPv4".into(),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        endpoints: Some(
            ready
                .iter()
                .enumerate()
                .map(|(i, r)| Endpoint {
                    addresses: vec![format!("10.0.0.{}", i + 1)],
                    conditions: Some(EndpointConditions {
                        ready: Some(*r),
                        ..Default::default()
                    }),
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".into()),
                        name: Some(format!("orders-{}", i + 1)),
                        namespace: Some("shop".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

fn pod(i: usize) -> Pod {
    Pod {
        metadata: meta("shop", &format!("orders-{i}")),
        spec: Some(PodSpec {
            service_account_name: Some("orders".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn read(dir: &Path) -> KubeExports {
    std::fs::read(dir.join(EXPORTS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Waits until `kubernetes.json` satisfies `ok`.
async fn wait_file(dir: &Path, what: &str, ok: impl Fn(&KubeExports) -> bool) -> KubeExports {
    let started = Instant::now();
    loop {
        let e = read(dir);
        if ok(&e) {
            return e;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{what}: {e:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the ServiceExport's condition `type_` has `status`; returns its reason.
async fn wait_condition(api: &KubeApi, type_: &str, status: &str) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let se = api.get("serviceexports", "shop", "orders");
        let c = se.as_ref().and_then(|se| {
            se["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == type_)
                .cloned()
        });
        if let Some(c) = c
            && c["status"] == status
        {
            return c;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{type_} never {status}: {se:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A catalog (as the gateway caches it) where site east exports orders.shop with port
/// `http` on `port`.
fn other_site_exports(port: u16) -> meshfed_catalog::Catalog {
    use meshfed_catalog::catalog::{
        Change, Delta, Export, ExportedPort, Protocol, Revision, SiteRecord,
    };
    let mut c = meshfed_catalog::Catalog::default();
    let east: meshfed_catalog::SiteName = "east".parse().unwrap();
    let changes = [
        Change::PutSite(SiteRecord {
            site: east.clone(),
            trust_domain: meshfed_identity::TrustDomain::new("east.example.org").unwrap(),
            gateway_addresses: vec![],
            up: true,
        }),
        Change::PutExport {
            site: east,
            export: Export {
                endpoint_labels: Vec::new(),
                http_policy: None,
                service: "orders.shop".parse().unwrap(),
                ports: vec![ExportedPort {
                    app_protocol: Default::default(),
                    port,
                    protocol: Protocol::Tcp,
                    name: Some("http".into()),
                }],
                ready_endpoints: 1,
                identities: vec![],
                locality: None,
                labels: Default::default(),
                hosts: vec![],
            },
        },
    ];
    for (i, change) in changes.into_iter().enumerate() {
        c.apply(&Delta {
            revision: Revision(i as u64 + 1),
            change,
        })
        .unwrap();
    }
    c
}

fn controller(api: &KubeApi, dir: &Path) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let c = ExportController {
        client: api.client(),
        site: "west".parse().unwrap(),
        trust_domain: meshfed_identity::TrustDomain::new("west.example.org").unwrap(),
        dir: dir.to_owned(),
        leading: None,
    };
    (stop.clone(), tokio::spawn(c.run(stop)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_exports_become_exports_with_status_through_the_kube_client() {
    let scratch = Scratch::new("kube-export");
    let dir = scratch.0.clone();
    let api = KubeApi::start().await;
    api.put(&service());
    api.put(&slice(&[true, true, false]));
    for i in 1..=3 {
        api.put(&pod(i));
    }
    let (stop, task) = controller(&api, &dir);

    // A Service without a ServiceExport is not exported.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(read(&dir).exports.is_empty(), "{:?}", read(&dir));

    // Export: ports, ready endpoints (2 of 3), identities from the pods' service account.
    api.put(&ServiceExport {
        metadata: meta("shop", "orders"),
        status: None,
    });
    let e = wait_file(&dir, "export", |e| e.exports.len() == 1).await;
    let x = &e.exports[0];
    assert_eq!(x.service.to_string(), "orders.shop");
    assert_eq!(
        (x.ports[0].port, x.ports[0].name.as_deref()),
        (80, Some("http"))
    );
    assert_eq!(
        x.ports[0].endpoints,
        vec![
            "10.0.0.1:8080".parse().unwrap(),
            "10.0.0.2:8080".parse().unwrap()
        ]
    );
    assert_eq!(x.ready, 2);
    assert_eq!(
        x.identities.iter().map(|i| i.as_str()).collect::<Vec<_>>(),
        vec!["spiffe://west.example.org/ns/shop/sa/orders"]
    );
    let valid = wait_condition(&api, "Valid", "True").await;
    assert_eq!(valid["reason"], "ServiceExported");
    wait_condition(&api, "Conflict", "False").await;

    // Readiness changes propagate: the third pod becomes ready, then all go unready.
    api.put(&slice(&[true, true, true]));
    wait_file(&dir, "3 ready", |e| {
        e.exports.first().is_some_and(|x| x.ready == 3)
    })
    .await;
    api.put(&slice(&[false, false, false]));
    let e = wait_file(&dir, "0 ready", |e| {
        e.exports.first().is_some_and(|x| x.ready == 0)
    })
    .await;
    assert!(e.exports[0].ports[0].endpoints.is_empty());

    // A change whose event was compacted away, then the watches break: the controller's
    // watchers resume from a resourceVersion that is gone, get 410 Gone, relist, and so
    // still see the change.
    let lists_before = api.count("GET", "/apis/discovery.k8s.io/v1/endpointslices");
    api.put_unseen(&slice(&[true, false, false]));
    api.break_watches();
    wait_file(&dir, "after relist", |e| {
        e.exports.first().is_some_and(|x| x.ready == 1)
    })
    .await;
    assert!(
        api.count("GET", "/apis/discovery.k8s.io/v1/endpointslices") > lists_before + 1,
        "the watcher re-watched and relisted"
    );

    // Conflict: another site exports orders.shop with port "http" on another number.
    let catalog = other_site_exports(8443);
    std::fs::write(
        dir.join("catalog.json"),
        serde_json::to_vec(&catalog).unwrap(),
    )
    .unwrap();
    let c = wait_condition(&api, "Conflict", "True").await;
    assert_eq!(c["reason"], "PortConflict");
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("8443/tcp at site east"),
        "{c}"
    );
    std::fs::remove_file(dir.join("catalog.json")).unwrap();
    wait_condition(&api, "Conflict", "False").await;

    // A restart changes nothing: no status write, no rewrite of the exports file.
    stop.cancel();
    task.await.unwrap();
    let patches = api.count("PATCH", "/apis/multicluster.x-k8s.io");
    let file = std::fs::metadata(dir.join(EXPORTS_FILE))
        .unwrap()
        .modified()
        .unwrap();
    let (stop, task) = controller(&api, &dir);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        api.count("PATCH", "/apis/multicluster.x-k8s.io"),
        patches,
        "status churn on restart"
    );
    assert_eq!(
        std::fs::metadata(dir.join(EXPORTS_FILE))
            .unwrap()
            .modified()
            .unwrap(),
        file,
        "exports rewritten on restart"
    );

    // Unexport: the Service stays, the export goes.
    api.delete("serviceexports", "shop", "orders");
    wait_file(&dir, "unexport", |e| e.exports.is_empty()).await;

    // A ServiceExport without its Service is invalid, and says why.
    api.delete("services", "shop", "orders");
    api.put(&ServiceExport {
        metadata: meta("shop", "orders"),
        status: None,
    });
    let v = wait_condition(&api, "Valid", "False").await;
    assert_eq!(v["reason"], "NoService");
    assert!(read(&dir).exports.is_empty());
    stop.cancel();
    task.await.unwrap();
}

/// What the export controller writes is what the site's gateway publishes: another site
/// imports it and reaches the endpoints through the tunnel, and its identities are in
/// the federation's catalog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_exports_are_published_by_the_gateway_and_imported_elsewhere() {
    use meshfed_catalog::site::{KubeExport, KubePort};
    let scratch = Scratch::new("kube-publish");
    let (_fed, west, _west_gw, east_gw) = crate::legacy::east_and_west(&scratch);
    let echo = crate::harness::echo_server().await;
    let port = crate::federation::free_port([127, 0, 0, 9].into());
    let exports = KubeExports {
        exports: vec![KubeExport {
            labels: Default::default(),
            service: "orders.shop".parse().unwrap(),
            ports: vec![KubePort {
                app_protocol: Default::default(),
                port,
                protocol: meshfed_catalog::catalog::Protocol::Tcp,
                name: Some("http".into()),
                endpoints: vec![echo],
            }],
            ready: 1,
            identities: vec![
                meshfed_identity::SpiffeId::new("spiffe://west.example.org/ns/shop/sa/orders")
                    .unwrap(),
            ],
        }],
    };
    meshfed_identity::ca::write_file(
        &west.dir.join(EXPORTS_FILE),
        &serde_json::to_vec(&exports).unwrap(),
        0o644,
    )
    .unwrap();
    let import = std::net::SocketAddr::new([127, 0, 0, 9].into(), port);
    let started = Instant::now();
    while crate::harness::echo_once(import).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never imported:\n{}",
            east_gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // East's catalog cache carries the workload identity west published.
    let cache =
        std::fs::read_to_string(east_gw.log.parent().unwrap().join("catalog.json")).unwrap();
    assert!(
        cache.contains("spiffe://west.example.org/ns/shop/sa/orders"),
        "{cache}"
    );
    // SRV carries the Service's port name.
    let s = crate::dns::dig(
        east_gw.dns.unwrap(),
        &["_http._tcp.orders.shop.svc.clusterset.local", "SRV"],
    );
    assert_eq!(s.answer.len(), 1, "{s:?}");
}

/// A gateway pod in namespace `meshfed` at `ip`, Ready or not.
fn gateway_pod(name: &str, ip: &str, ready: bool) -> Pod {
    use k8s_openapi::api::core::v1::{PodCondition, PodIP, PodStatus};
    Pod {
        metadata: ObjectMeta {
            labels: Some(
                [(
                    "app.kubernetes.io/name".to_string(),
                    "meshfed-gateway".to_string(),
                )]
                .into(),
            ),
            ..meta("meshfed", name)
        },
        spec: Some(PodSpec {
            node_name: Some("node-1".into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            pod_ip: Some(ip.into()),
            pod_ips: Some(vec![PodIP { ip: ip.into() }]),
            ..Default::default()
        }),
    }
}

/// The writes the import controller made so far (creates, replaces, deletes, patches).
fn import_writes(api: &KubeApi) -> usize {
    ["POST", "PUT", "DELETE", "PATCH"]
        .iter()
        .map(|m| {
            api.count(
                m,
                "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/shop/serviceimports",
            ) + api.count(m, "/api/v1/namespaces/shop/services")
                + api.count(
                    m,
                    "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices",
                )
        })
        .sum()
}

async fn wait_api(what: &str, ok: impl Fn() -> bool) {
    let started = Instant::now();
    while !ok() {
        assert!(started.elapsed() < Duration::from_secs(15), "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn import_controller(
    api: &KubeApi,
    dir: &Path,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    use meshfed_kubernetes::import_controller::ImportController;
    let stop = CancellationToken::new();
    let c = ImportController {
        client: api.client(),
        dir: dir.to_owned(),
        gateway_namespace: "meshfed".into(),
        gateway_selector: "app.kubernetes.io/name=meshfed-gateway".into(),
    };
    (stop.clone(), tokio::spawn(c.run(stop)))
}

/// East's gateway runs as a pod would (`federation.import_ports`); the import
/// controller gives each service it imports a ServiceImport, a derived Service and an
/// EndpointSlice of the ready gateway pods. Dialled the way kube-proxy forwards (the
/// slice port named like the Service port), it reaches west's endpoint. A restart
/// writes nothing; a withdrawn import is garbage-collected through owner references.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_become_service_imports_reaching_the_gateway_and_are_collected_when_withdrawn() {
    use crate::federation::{Fed, fed_config, joined};
    use meshfed_catalog::catalog::Protocol;
    use meshfed_catalog::site::{KubeExport, KubePort};
    let scratch = Scratch::new("kube-import");
    let fed = Fed::start(&Fed::init(&scratch), 0);
    let [east, west] = joined(&scratch, &fed, ["east", "west"]);
    let _west_gw = crate::harness::Gw::start(&west, &fed_config(&west, [127, 0, 0, 8])).unwrap();
    let east_gw = crate::harness::Gw::start(
        &east,
        &meshfed_lab::ConfigBuilder {
            import_ports: Some("21000-21999".into()),
            ..fed_config(&east, [127, 0, 0, 9])
        },
    )
    .unwrap();
    let echo = crate::harness::echo_server().await;
    let port = |port, name: &str| KubePort {
        app_protocol: Default::default(),
        port,
        protocol: Protocol::Tcp,
        name: Some(name.into()),
        endpoints: vec![echo],
    };
    let exports = |e: Vec<KubeExport>| {
        meshfed_identity::ca::write_file(
            &west.dir.join(EXPORTS_FILE),
            &serde_json::to_vec(&KubeExports { exports: e }).unwrap(),
            0o644,
        )
        .unwrap()
    };
    exports(vec![KubeExport {
        labels: Default::default(),
        service: "orders.shop".parse().unwrap(),
        ports: vec![port(80, "http"), port(9090, "metrics")],
        ready: 1,
        identities: vec![],
    }]);

    let api = KubeApi::start().await;
    api.put(&gateway_pod("gw-a", "127.0.0.9", true));
    api.put(&gateway_pod("gw-b", "127.0.0.10", false));
    // Someone else's ServiceImport: never touched.
    let foreign = meshfed_kubernetes::imports::ServiceImport {
        metadata: meta("shop", "legacy"),
        ..Default::default()
    };
    api.put(&foreign);
    let (stop, task) = import_controller(&api, &east.dir);
    let started = Instant::now();
    wait_api(
        "ServiceImport with its clusterset IP and west as cluster",
        || {
            api.get("serviceimports", "shop", "orders")
                .is_some_and(|si| {
                    si["spec"]["ips"].as_array().is_some_and(|a| a.len() == 1)
                        && si["status"]["clusters"] == serde_json::json!([{"cluster": "west"}])
                })
        },
    )
    .await;
    eprintln!("ServiceImport ready {:?} after start", started.elapsed());
    let si = api.get("serviceimports", "shop", "orders").unwrap();
    assert_eq!(si["spec"]["type"], "ClusterSetIP");
    let svcs = api.all("services");
    assert_eq!(svcs.len(), 1, "{svcs:?}");
    let svc = &svcs[0];
    assert_eq!(si["spec"]["ips"][0], svc["spec"]["clusterIP"]);
    assert_eq!(
        svc["metadata"]["ownerReferences"][0]["uid"], si["metadata"]["uid"],
        "the derived Service is owned by the ServiceImport"
    );
    assert_eq!(
        svc["metadata"]["labels"]["multicluster.kubernetes.io/service-name"],
        "orders"
    );
    let slices = api.all("endpointslices");
    assert_eq!(slices.len(), 1, "{slices:?}");
    let slice = &slices[0];
    assert_eq!(
        slice["metadata"]["ownerReferences"][0]["uid"],
        si["metadata"]["uid"]
    );
    assert_eq!(
        slice["metadata"]["labels"]["kubernetes.io/service-name"],
        svc["metadata"]["name"]
    );
    let addrs = |s: &serde_json::Value| -> Vec<String> {
        s["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["addresses"][0].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(addrs(slice), ["127.0.0.9"], "only the Ready gateway pod");

    // As kube-proxy forwards: clusterIP:80 → the slice port named like Service port 80.
    for svc_port in [80, 9090] {
        let sp = svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["port"] == svc_port)
            .unwrap();
        let target = slice["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == sp["name"])
            .unwrap()["port"]
            .as_u64()
            .unwrap() as u16;
        assert!((21000..=21999).contains(&target), "{target}");
        assert_eq!(sp["targetPort"], target);
        let dial = std::net::SocketAddr::new([127, 0, 0, 9].into(), target);
        crate::harness::echo_once(dial)
            .await
            .unwrap_or_else(|e| panic!("port {svc_port} via {dial}: {e}\n{}", east_gw.logs()));
    }

    // A second gateway pod becomes Ready: it joins the slice.
    api.put(&gateway_pod("gw-b", "127.0.0.10", true));
    wait_api("the second gateway in the slice", || {
        api.all("endpointslices")
            .first()
            .is_some_and(|s| addrs(s).len() == 2)
    })
    .await;

    // A restart: synced again, two recheck periods pass, and nothing is written.
    stop.cancel();
    task.await.unwrap();
    let before = import_writes(&api);
    let (stop, task) = import_controller(&api, &east.dir);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(import_writes(&api), before, "a restart writes nothing");
    assert_eq!(api.all("serviceimports").len(), 2);
    assert_eq!(api.all("services").len(), 1);
    assert_eq!(api.all("endpointslices").len(), 1);

    // Withdrawn at west: east's gateway drops the import, the controller deletes the
    // ServiceImport, and the garbage collector the Service and the slice.
    exports(vec![]);
    let started = Instant::now();
    wait_api("the import withdrawn and collected", || {
        api.get("serviceimports", "shop", "orders").is_none()
            && api.all("services").is_empty()
            && api.all("endpointslices").is_empty()
    })
    .await;
    eprintln!(
        "withdrawn import collected {:?} after unexport",
        started.elapsed()
    );
    assert!(
        api.get("serviceimports", "shop", "legacy").is_some(),
        "a ServiceImport meshfed does not manage stays"
    );
    stop.cancel();
    task.await.unwrap();
}

/// Kills the child process when dropped (a failed assertion leaves no server behind).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `meshfed dns --kubernetes`, pointed at the API server by a kubeconfig, answers
/// clusterset.local from the cluster's ServiceImports: their clusterset IP, SRV for
/// named ports, and NXDOMAIN once the ServiceImport is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_in_a_cluster_answers_from_service_imports() {
    use crate::dns::{dig, wait_dig};
    use meshfed_kubernetes::imports::{ServiceImport, ServiceImportPort, ServiceImportSpec};
    use std::io::BufRead;
    let scratch = Scratch::new("kube-dns");
    let api = KubeApi::start().await;
    let kubeconfig = scratch.0.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: http://{}\nusers:\n- name: t\n  user: {{}}\ncontexts:\n- name: t\n  context:\n    cluster: t\n    user: t\ncurrent-context: t\n",
            api.addr
        ),
    )
    .unwrap();
    let mut child = Child(
        std::process::Command::new(crate::harness::BIN)
            .args([
                "dns",
                "--kubernetes",
                "--listen",
                "127.0.0.1:0",
                "--ttl",
                "3s",
            ])
            .env("KUBECONFIG", &kubeconfig)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let dns: std::net::SocketAddr = line
        .split_whitespace()
        .nth(4)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    let name = "orders.shop.svc.clusterset.local";
    assert_eq!(dig(dns, &[name, "A"]).status, "NXDOMAIN");

    let mut si = ServiceImport {
        metadata: meta("shop", "orders"),
        spec: ServiceImportSpec {
            ports: vec![
                ServiceImportPort {
                    name: Some("http".into()),
                    protocol: Some("TCP".into()),
                    port: 80,
                },
                ServiceImportPort {
                    name: Some("dns".into()),
                    protocol: Some("UDP".into()),
                    port: 53,
                },
            ],
            ips: vec![],
            type_: "ClusterSetIP".into(),
        },
        status: None,
    };
    // No clusterset IP yet: not answered.
    api.put(&si);
    si.spec.ips = vec!["10.96.0.42".into()];
    api.put(&si);
    let took =
        tokio::task::spawn_blocking(move || wait_dig(dns, name, "NOERROR", Some("10.96.0.42")))
            .await
            .unwrap();
    eprintln!("answered {took:?} after the clusterset IP was set");
    let a = dig(dns, &[name, "A"]);
    assert_eq!(a.answer, [format!("{name}. 3 IN A 10.96.0.42")]);
    let srv = dig(dns, &[&format!("_http._tcp.{name}"), "SRV"]);
    assert_eq!(srv.answer.len(), 1, "{srv:?}");
    assert!(srv.answer[0].ends_with(&format!("80 {name}.")), "{srv:?}");
    let srv = dig(dns, &[&format!("_dns._udp.{name}"), "SRV"]);
    assert!(srv.answer[0].ends_with(&format!("53 {name}.")), "{srv:?}");

    api.delete("serviceimports", "shop", "orders");
    tokio::task::spawn_blocking(move || wait_dig(dns, name, "NXDOMAIN", None))
        .await
        .unwrap();
}

fn election(api: &KubeApi, identity: &str, secs: u64) -> meshfed_kubernetes::leader::Election {
    meshfed_kubernetes::leader::Election {
        api: kube::Api::namespaced(api.client(), "meshfed"),
        name: "meshfed-export-west".into(),
        identity: identity.into(),
        duration: Duration::from_secs(secs),
    }
}

/// Replicas of the export controller beside each gateway replica elect one leader
/// through a coordination.k8s.io Lease: a follower writes its own `kubernetes.json` but
/// no ServiceExport status; it takes over when the leader releases the Lease, and when
/// a leader that crashed lets it expire; two candidates never lead at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_replicas_elect_one_leader_through_a_lease() {
    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use meshfed_kubernetes::leader::lead;
    let scratch = Scratch::new("kube-leader");
    let api = KubeApi::start().await;
    api.put(&service());
    api.put(&slice(&[true, true, false]));
    for i in 1..=3 {
        api.put(&pod(i));
    }
    api.put(&ServiceExport {
        metadata: meta("shop", "orders"),
        status: None,
    });
    // Another replica holds the Lease, and keeps renewing it (for 60 s).
    let mut other = Lease {
        metadata: meta("meshfed", "meshfed-export-west"),
        spec: Some(LeaseSpec {
            holder_identity: Some("gateway-0".into()),
            lease_duration_seconds: Some(60),
            renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            ..Default::default()
        }),
    };
    api.put(&other);

    // Replica gateway-1 follows: its file is written, the status is not.
    let (tx, rx) = tokio::sync::watch::channel(false);
    let stop = CancellationToken::new();
    let dir = scratch.0.join("replica-1");
    std::fs::create_dir_all(&dir).unwrap();
    let c = ExportController {
        client: api.client(),
        site: "west".parse().unwrap(),
        trust_domain: meshfed_identity::TrustDomain::new("west.example.org").unwrap(),
        dir: dir.clone(),
        leading: Some(rx.clone()),
    };
    let controller = tokio::spawn(c.run(stop.clone()));
    let elect = tokio::spawn(lead(
        election(&api, "gateway-1", 2),
        tx,
        stop.clone(),
        |t| async move { t.cancelled().await },
    ));
    wait_file(&dir, "the follower's own file", |e| e.exports.len() == 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status =
        "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/shop/serviceexports/orders/status";
    assert_eq!(api.count("PATCH", status), 0, "a follower wrote status");
    assert!(!*rx.borrow());

    // gateway-0 releases the Lease: gateway-1 leads within its retry and writes status.
    other.spec.as_mut().unwrap().holder_identity = None;
    api.put(&other);
    wait_condition(&api, "Valid", "True").await;
    assert!(*rx.borrow());
    stop.cancel();
    let _ = elect.await;
    let _ = controller.await;
    // Stopping released it.
    let l = api.get("leases", "meshfed", "meshfed-export-west").unwrap();
    assert!(l["spec"]["holderIdentity"].is_null(), "{l}");

    // Two candidates race; they never both lead. The leader crashes (no release): the
    // other leads once the Lease expires (2 s), and not before.
    let (a_tx, a_rx) = tokio::sync::watch::channel(false);
    let (b_tx, b_rx) = tokio::sync::watch::channel(false);
    let (a_stop, b_stop) = (CancellationToken::new(), CancellationToken::new());
    let idle = |t: CancellationToken| async move { t.cancelled().await };
    let a = tokio::spawn(lead(election(&api, "a", 2), a_tx, a_stop.clone(), idle));
    let b = tokio::spawn(lead(election(&api, "b", 2), b_tx, b_stop.clone(), idle));
    let started = Instant::now();
    let mut leader = None;
    while started.elapsed() < Duration::from_secs(3) {
        let (x, y) = (*a_rx.borrow(), *b_rx.borrow());
        assert!(!(x && y), "two leaders at once");
        if leader.is_none() && (x || y) {
            leader = Some(if x { "a" } else { "b" });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leader = leader.expect("someone leads");
    let stops = [a_stop.clone(), b_stop.clone()];
    let (dead, survivor) = if leader == "a" { (a, b_rx) } else { (b, a_rx) };
    dead.abort();
    let crashed = Instant::now();
    while !*survivor.borrow() {
        assert!(
            crashed.elapsed() < Duration::from_secs(5),
            "no takeover after the crash"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = crashed.elapsed();
    eprintln!("takeover after a crash: {took:?} (lease 2 s, retry 666 ms)");
    assert!(
        took >= Duration::from_millis(500),
        "took over a live lease: {took:?}"
    );
    let l = api.get("leases", "meshfed", "meshfed-export-west").unwrap();
    assert!(l["spec"]["leaseTransitions"].as_i64().unwrap() >= 2, "{l}");
    for s in stops {
        s.cancel();
    }
}
