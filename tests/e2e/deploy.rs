//! deploy/: the systemd units pass `systemd-analyze verify` and stay hardened.

use std::process::Command;

use crate::harness::*;

fn analyze(args: &[&str]) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("systemd-analyze ({e}): apt-get install -y systemd"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every unit in deploy/systemd, with its `/usr/local/bin/meshfed` pointed at the binary
/// under test (verify checks that the executable exists): `systemd-analyze verify` is
/// clean, and `systemd-analyze security` rates its exposure 2.5 or lower ("OK").
#[test]
fn systemd_units_verify_and_are_hardened() {
    let scratch = Scratch::new("systemd");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/systemd");
    let mut units = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "service") {
            units.push(path);
        }
    }
    units.sort();
    let names: Vec<_> = units
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "meshfed-dns.service",
            "meshfed-federation.service",
            "meshfed-gateway.service"
        ]
    );
    for unit in &units {
        let text = std::fs::read_to_string(unit).unwrap();
        assert!(
            text.contains("ExecStart=/usr/local/bin/meshfed "),
            "{}",
            unit.display()
        );
        for needed in [
            "DynamicUser=yes",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
        ] {
            assert!(text.contains(needed), "{}: no {needed}", unit.display());
        }
        let copy = scratch.0.join(unit.file_name().unwrap());
        std::fs::write(&copy, text.replace("/usr/local/bin/meshfed", BIN)).unwrap();
        let copy = copy.to_str().unwrap();
        let (ok, out) = analyze(&["verify", copy]);
        assert!(ok && out.trim().is_empty(), "{copy}: {out}");
        let (ok, out) = analyze(&["security", "--offline=yes", "--threshold=25", copy]);
        assert!(ok, "{copy}: exposure above 2.5:\n{out}");
        let line = out.lines().last().unwrap_or_default();
        eprintln!("{}", line.trim());
    }
}

/// `kubectl kustomize DIR` (kubectl's built-in kustomize: Debian's kubernetes-client
/// 1.20 on a fresh machine, or any newer kubectl).
fn kustomize(dir: &std::path::Path) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("kubectl ({e}): apt-get install -y kubernetes-client"));
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `kubernetes-validate` from PATH or the tools venv deploy/setup-dev.sh makes.
fn validator() -> std::path::PathBuf {
    let venv = std::path::Path::new("/opt/meshfed-tools/bin/kubernetes-validate");
    if venv.exists() {
        return venv.to_owned();
    }
    "kubernetes-validate".into()
}

fn documents(rendered: &str) -> Vec<serde_json::Value> {
    rendered
        .split("\n---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_saphyr::from_str::<serde_json::Value>(d).unwrap())
        .collect()
}

fn find<'a>(
    docs: &'a [serde_json::Value],
    kind: &str,
    name: &str,
) -> Option<&'a serde_json::Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

/// Every overlay under deploy/kubernetes renders with kustomize, every object validates
/// strictly against the Kubernetes schemas (offline), and the manifests keep what they
/// promise: an HA gateway (≥ 2 replicas, PDB, anti-affinity), restricted containers,
/// no Secret in any RBAC rule, ConfigMap references that resolve, a gateway config the
/// gateway accepts, and on etcd three federation replicas that only reach their etcd.
#[test]
fn kustomize_overlays_render_validate_and_keep_their_promises() {
    use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
    let scratch = Scratch::new("kustomize");
    let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes"));
    for overlay in ["site", "federation", "federation-etcd"] {
        let rendered = kustomize(&root.join("overlays").join(overlay));
        let file = scratch.0.join(format!("{overlay}.yaml"));
        std::fs::write(&file, &rendered).unwrap();
        let out = Command::new(validator())
            .args(["--strict", "--quiet"])
            .arg(&file)
            .output()
            .unwrap_or_else(|e| {
                panic!("kubernetes-validate ({e}): run deploy/setup-dev.sh (pip install kubernetes-validate)")
            });
        assert!(
            out.status.success(),
            "{overlay}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let docs = documents(&rendered);
        assert!(
            docs.iter().all(|d| d["metadata"]["namespace"] == "meshfed"
                || [
                    "Namespace",
                    "CustomResourceDefinition",
                    "ClusterRole",
                    "ClusterRoleBinding"
                ]
                .contains(&d["kind"].as_str().unwrap())),
            "{overlay}: everything namespaced lives in meshfed"
        );

        // The gateway: HA.
        let gw: Deployment = serde_json::from_value(
            find(&docs, "Deployment", "meshfed-gateway")
                .unwrap()
                .clone(),
        )
        .unwrap();
        let spec = gw.spec;
        assert!(spec.replicas.unwrap() >= 2, "{overlay}: gateway replicas");
        let pod = spec.template.spec.unwrap();
        assert!(
            pod.affinity.and_then(|a| a.pod_anti_affinity).is_some(),
            "{overlay}: gateway anti-affinity"
        );
        let pdb: PodDisruptionBudget = serde_json::from_value(
            find(&docs, "PodDisruptionBudget", "meshfed-gateway")
                .unwrap()
                .clone(),
        )
        .unwrap();
        assert_eq!(
            pdb.spec.unwrap().selector.unwrap().match_labels,
            spec.selector.match_labels,
            "{overlay}: the PDB guards the gateway pods"
        );

        // Restricted containers everywhere.
        for d in docs
            .iter()
            .filter(|d| d["kind"] == "Deployment" || d["kind"] == "StatefulSet")
        {
            let pod = &d["spec"]["template"]["spec"];
            assert_eq!(
                pod["securityContext"]["runAsNonRoot"], true,
                "{}",
                d["metadata"]["name"]
            );
            for c in pod["containers"].as_array().unwrap() {
                let sc = &c["securityContext"];
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{}", c["name"]);
                assert_eq!(sc["allowPrivilegeEscalation"], false, "{}", c["name"]);
                assert_eq!(
                    sc["capabilities"]["drop"],
                    serde_json::json!(["ALL"]),
                    "{}",
                    c["name"]
                );
            }
            // Every ConfigMap a pod names is rendered (generated names included).
            let named = pod["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v["configMap"]["name"].as_str())
                .chain(
                    pod["containers"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .flat_map(|c| c["envFrom"].as_array().into_iter().flatten())
                        .filter_map(|e| e["configMapRef"]["name"].as_str()),
                );
            for cm in named {
                assert!(
                    find(&docs, "ConfigMap", cm).is_some(),
                    "{overlay}: ConfigMap {cm} missing"
                );
            }
        }

        // Least privilege: no Secrets, no wildcards.
        for d in docs
            .iter()
            .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
        {
            let rules = if d["kind"] == "Role" {
                let role: Role = serde_json::from_value(d.clone()).unwrap();
                role.rules
            } else {
                let role: ClusterRole = serde_json::from_value(d.clone()).unwrap();
                role.rules
            };
            for rule in rules.unwrap_or_default() {
                let resources = rule.resources.unwrap_or_default();
                assert!(
                    !resources.iter().any(|r| r == "secrets" || r == "*")
                        && !rule.verbs.iter().any(|v| v == "*"),
                    "{overlay}: {} grants {resources:?} {:?}",
                    d["metadata"]["name"],
                    rule.verbs
                );
            }
        }

        // The gateway config in its ConfigMap is one the gateway accepts.
        let cm_name = pod
            .volumes
            .unwrap()
            .into_iter()
            .find_map(|v| v.config_map.map(|c| c.name))
            .unwrap();
        let cm = find(&docs, "ConfigMap", &cm_name).unwrap();
        let cfg = scratch.0.join(format!("{overlay}-gateway.yaml"));
        std::fs::write(&cfg, cm["data"]["gateway.yaml"].as_str().unwrap()).unwrap();
        meshfed_gateway::config::GatewayConfig::load(&cfg)
            .unwrap_or_else(|e| panic!("{overlay}: {e}"));

        let has_federation = find(&docs, "StatefulSet", "meshfed-federation");
        assert_eq!(
            has_federation.is_some(),
            overlay != "site",
            "{overlay}: federation"
        );
        if overlay == "federation-etcd" {
            let fed: StatefulSet = serde_json::from_value(has_federation.unwrap().clone()).unwrap();
            let fspec = fed.spec;
            assert_eq!(fspec.replicas, Some(3));
            let args = fspec.template.spec.unwrap().containers[0]
                .args
                .clone()
                .unwrap();
            assert!(args.iter().any(|a| a == "--etcd"), "{args:?}");
            assert!(find(&docs, "StatefulSet", "meshfed-etcd").is_some());
            assert!(find(&docs, "NetworkPolicy", "meshfed-etcd").is_some());
        }
    }
}
