//! The operator-facing commands, run as processes.

use std::os::unix::fs::PermissionsExt;

use crate::harness::{Scratch, meshfed};

#[test]
fn ca_issue_bundle_and_verify() {
    let s = Scratch::new("cli");
    let d = |p: &str| s.0.join(p).display().to_string();
    let (code, _, err) = meshfed(&[
        "ca",
        "init",
        "--trust-domain",
        "west.example.org",
        "--out",
        &d("west"),
    ]);
    assert_eq!(code, 0, "{err}");
    let mode = std::fs::metadata(s.0.join("west/ca.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "CA key must not be readable by others");
    let (code, _, err) = meshfed(&[
        "ca",
        "init",
        "--trust-domain",
        "east.example.org",
        "--out",
        &d("east"),
    ]);
    assert_eq!(code, 0, "{err}");

    let id = "spiffe://west.example.org/ns/shop/sa/orders";
    let (code, _, err) = meshfed(&[
        "ca",
        "issue",
        "--ca",
        &d("west"),
        "--spiffe-id",
        id,
        "--cert",
        &d("w.pem"),
        "--key",
        &d("w.key"),
    ]);
    assert_eq!(code, 0, "{err}");
    let mode = std::fs::metadata(s.0.join("w.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    let (code, west_bundle, _) = meshfed(&["bundle", "export", "--ca", &d("west")]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&west_bundle).unwrap();
    assert_eq!(v["keys"][0]["use"], "x509-svid");
    assert!(v["spiffe_sequence"].is_u64() && v["spiffe_refresh_hint"].is_u64());
    std::fs::write(s.0.join("west.json"), &west_bundle).unwrap();
    let (_, east_bundle, _) = meshfed(&["bundle", "export", "--ca", &d("east")]);
    std::fs::write(s.0.join("east.json"), &east_bundle).unwrap();

    let (code, out, _) = meshfed(&[
        "svid",
        "verify",
        "--bundle",
        &d("west.json"),
        "--bundle",
        &d("east.json"),
        &d("w.pem"),
    ]);
    assert_eq!((code, out.trim()), (0, id));

    // Only east's bundle: west's SVID has no bundle to be checked against.
    let (code, out, _) = meshfed(&["svid", "verify", "--bundle", &d("east.json"), &d("w.pem")]);
    assert_eq!(code, 2);
    assert!(
        out.contains("refused [unknown_trust_domain]") && out.contains("west.example.org"),
        "{out}"
    );

    // A foreign ID cannot be issued by this CA.
    let (code, _, err) = meshfed(&[
        "ca",
        "issue",
        "--ca",
        &d("west"),
        "--spiffe-id",
        "spiffe://east.example.org/x",
        "--cert",
        &d("x.pem"),
        "--key",
        &d("x.key"),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("not in this CA's trust domain"), "{err}");
    // A bad ID names the rule it breaks.
    let (code, _, err) = meshfed(&[
        "ca",
        "issue",
        "--ca",
        &d("west"),
        "--spiffe-id",
        "spiffe://west.example.org/a/",
        "--cert",
        &d("x.pem"),
        "--key",
        &d("x.key"),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("--spiffe-id") && err.contains("must not end with"),
        "{err}"
    );
}

#[test]
fn bad_config_names_file_and_field() {
    let s = Scratch::new("badcfg");
    let f = s.0.join("gw.yaml");
    std::fs::write(
        &f,
        "site: west\ntrust_domain: west.example.org\nlisten: 127.0.0.1:0\ntls: {cert: a, key: b, bundles: [c]}\npeers:\n  - site: east\n    spiffe_id: spiffe://east.example.org/../gateway\n",
    )
    .unwrap();
    let (code, _, err) = meshfed(&["gateway", "check", "-c", f.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains(f.to_str().unwrap()) && err.contains("peers[0].spiffe_id"),
        "{err}"
    );

    std::fs::write(&f, "site: west\nsight: typo\n").unwrap();
    let (code, _, err) = meshfed(&["gateway", "check", "-c", f.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("sight"), "{err}");

    // A certificate that is not this site's gateway identity is refused at start.
    let site = s.site("west", "west.example.org");
    std::fs::write(
        &f,
        format!(
            "site: east\ntrust_domain: west.example.org\nlisten: 127.0.0.1:0\nadmin: 127.0.0.1:0\ntls: {{cert: {}, key: {}, bundles: [{}]}}\n",
            site.cert.display(),
            site.key.display(),
            site.bundle.display()
        ),
    )
    .unwrap();
    let (code, _, err) = meshfed(&["gateway", "run", "-c", f.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "is not this site's gateway ID spiffe://west.example.org/meshfed/site/east/gateway"
        ),
        "{err}"
    );
}

#[test]
fn demo_runs_end_to_end() {
    let s = Scratch::new("demo");
    let (code, out, err) = meshfed(&["demo", "--dir", s.0.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}\n{err}");
    for want in [
        "north, same token again: refused: federation refused: [token_reused]",
        "rogue, claiming west's trust domain: refused: federation refused: [trust_domain_owned]",
        "east verified peer west   as spiffe://west.example.org/meshfed/site/west/gateway",
        "east verified peer north  as spiffe://north.example.org/meshfed/site/north/gateway",
        "first call: served by north",
        "MiB echoed back intact",
        "next call: served by west",
        "intact: true); the client saw no error",
        "the client saw no error",
        "north      north.example.org      down",
        "after the lease: served by west",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
}

#[test]
fn register_is_all_or_nothing_and_keeps_what_was_registered() {
    let scratch = Scratch::new("register");
    let dir = scratch.0.to_str().unwrap().to_owned();
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/serviceentry/");
    let (code, out, err) = meshfed(&[
        "register",
        "-f",
        &format!("{data}udp-syslog.yaml"),
        "--dir",
        &dir,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("syslog.ops, legacy-dns.ops"), "{out}");
    let (code, out, err) = meshfed(&[
        "register",
        "-f",
        &format!("{data}unsupported-fields.yaml"),
        "--dir",
        &dir,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("spec.subjectAltNames: not supported by meshfed yet"),
        "warnings name the field: {err}"
    );
    assert!(
        out.contains("3 service(s) and 0 policy(ies) registered in all"),
        "{out}"
    );
    let before = std::fs::read(scratch.0.join("registry.json")).unwrap();
    for bad in [
        "bad-port.yaml",
        "invalid-yaml.yaml",
        "static-hostname.yaml",
        "wrong-kind.yaml",
    ] {
        let (code, _, err) =
            meshfed(&["register", "-f", &format!("{data}bad/{bad}"), "--dir", &dir]);
        assert_eq!(code, 1, "{bad}");
        assert!(err.contains(bad), "the error names the file: {err}");
        assert_eq!(
            std::fs::read(scratch.0.join("registry.json")).unwrap(),
            before,
            "{bad} changed the registry"
        );
    }
    let (_, _, err) = meshfed(&["validate", "-f", &format!("{data}bad/invalid-yaml.yaml")]);
    assert!(err.contains("line 7, column 8"), "{err}");
}

/// `gateway check` is a preflight: the files the config names, and its addresses.
#[test]
fn gateway_check_is_a_preflight() {
    let s = Scratch::new("preflight");
    let site = s.site("west", "west.example.org");
    let other = s.site("other", "west.example.org");
    let cfg = |cert: &std::path::Path, key: &std::path::Path, admin: &str, import: &str| {
        let f = s.0.join("gw.yaml");
        std::fs::write(
            &f,
            format!(
                "site: west\ntrust_domain: west.example.org\nlisten: 127.0.0.1:0\nadmin: {admin}\n\
                 tls: {{cert: {}, key: {}, bundles: [{}]}}\n\
                 peers:\n  - site: east\n    spiffe_id: spiffe://east.example.org/meshfed/site/east/gateway\n    address: 127.0.0.1:9\n\
                 imports:\n  - {{service: orders.shop, port: 8080, site: east, listen: '{import}'}}\n",
                cert.display(),
                key.display(),
                site.bundle.display()
            ),
        )
        .unwrap();
        f
    };
    let f = cfg(&site.cert, &site.key, "127.0.0.1:15999", "127.0.0.1:15998");
    let (code, out, err) = meshfed(&["gateway", "check", "-c", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches("  ok ").count(), 5, "{out}");

    // A key that is not the certificate's: both files named.
    let f = cfg(&site.cert, &other.key, "127.0.0.1:15999", "127.0.0.1:15998");
    let (code, out, _) = meshfed(&["gateway", "check", "-c", f.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        out.contains("FAIL  svid")
            && out.contains(other.key.to_str().unwrap())
            && out.contains(site.cert.to_str().unwrap()),
        "{out}"
    );

    // The admin port and an import listener on one address.
    let f = cfg(&site.cert, &site.key, "127.0.0.1:15999", "127.0.0.1:15999");
    let (code, out, _) = meshfed(&["gateway", "check", "-c", f.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        out.contains("FAIL  addresses") && out.contains("admin") && out.contains("imports[0]"),
        "{out}"
    );

    // Another site's SVID (same trust domain): not this gateway's identity.
    let f = cfg(
        &other.cert,
        &other.key,
        "127.0.0.1:15999",
        "127.0.0.1:15998",
    );
    let (code, out, _) = meshfed(&["gateway", "check", "-c", f.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.contains("FAIL  identity"), "{out}");
}

/// A host belongs to one registered service; `unregister` removes by name or by file.
#[test]
fn register_refuses_a_host_of_another_service_and_unregister_removes() {
    let scratch = Scratch::new("unregister");
    let dir = scratch.0.display().to_string();
    let file = |name: &str, host: &str| {
        let f = scratch.0.join(format!("{name}.yaml"));
        std::fs::write(
            &f,
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  hosts: [{host}]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: STATIC\n  endpoints: [{{address: 10.0.0.1}}]\n"
            ),
        )
        .unwrap();
        f.display().to_string()
    };
    let orders = file("orders", "orders.example");
    let (code, _, err) = meshfed(&["register", "-f", &orders, "--dir", &dir]);
    assert_eq!(code, 0, "{err}");
    let thief = file("thief", "orders.example");
    let (code, _, err) = meshfed(&["register", "-f", &thief, "--dir", &dir]);
    assert_eq!(code, 1);
    assert!(
        err.contains("host orders.example belongs to orders.shop") && err.contains("thief.yaml"),
        "{err}"
    );
    let billing = file("billing", "billing.example");
    assert_eq!(meshfed(&["register", "-f", &billing, "--dir", &dir]).0, 0);

    let (code, _, err) = meshfed(&["unregister", "nope.shop", "orders.shop", "--dir", &dir]);
    assert_eq!(code, 1);
    assert!(err.contains("not registered: nope.shop"), "{err}");
    let (code, out, err) = meshfed(&["unregister", "orders.shop", "--dir", &dir]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("1 service(s) and 0 policy(ies) registered in all"),
        "{out}"
    );
    let (code, out, err) = meshfed(&["unregister", "-f", &billing, "--dir", &dir]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("unregistered billing.shop; 0 service(s)"),
        "{out}"
    );
    // Its host is free again.
    assert_eq!(meshfed(&["register", "-f", &thief, "--dir", &dir]).0, 0);
}

/// TLS origination certificates outside their dates (an expired client certificate, a
/// CA not valid yet) are warned about by file and date when the YAML is validated or
/// registered, and still accepted: a rotation may replace them before they are used,
/// and the handshake that would fail later says little about why.
#[test]
fn tls_origination_certificates_outside_their_dates_are_warned_about() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, date_time_ymd};
    let s = Scratch::new("tlsdates");
    let key = KeyPair::generate().unwrap();
    let mut expired = CertificateParams::new(vec!["client.example".into()]).unwrap();
    expired.not_before = date_time_ymd(2020, 1, 1);
    expired.not_after = date_time_ymd(2021, 1, 1);
    let expired = expired.self_signed(&key).unwrap();
    std::fs::write(s.0.join("client.pem"), expired.pem()).unwrap();
    std::fs::write(s.0.join("client.key"), key.serialize_pem()).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut future = CertificateParams::new(Vec::<String>::new()).unwrap();
    future.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    future.not_before = date_time_ymd(2090, 1, 1);
    future.not_after = date_time_ymd(2091, 1, 1);
    std::fs::write(
        s.0.join("ca.pem"),
        future.self_signed(&ca_key).unwrap().pem(),
    )
    .unwrap();
    let f = s.0.join("ledger.yaml");
    std::fs::write(
        &f,
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ledger, namespace: mainframe}\n\
         spec:\n  hosts: [ledger.mainframe.example]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  resolution: STATIC\n  endpoints: [{address: 10.0.0.1}]\n\
         ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: ledger, namespace: mainframe}\n\
         spec:\n  host: ledger.mainframe.example\n  trafficPolicy:\n    tls:\n      mode: MUTUAL\n      caCertificates: ca.pem\n      clientCertificate: client.pem\n      privateKey: client.key\n",
    )
    .unwrap();
    let (code, out, err) = meshfed(&["validate", "-f", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("warning:")).collect();
    assert!(
        lines.iter().any(|l| l.contains("clientCertificate")
            && l.contains("client.pem")
            && l.contains("expired at")
            && l.contains("2021")),
        "{err}"
    );
    assert!(
        lines.iter().any(|l| l.contains("caCertificates")
            && l.contains("ca.pem")
            && l.contains("not valid before")
            && l.contains("2090")),
        "{err}"
    );
    assert!(out.contains("2 warning(s)"), "{out}");
}

/// Before: a 200 KB name came back twice in a 400 KB error, and a YAML bomb was refused
/// with "budget breached: Nodes { nodes: 250001 }".
#[test]
fn errors_quote_values_briefly_and_limits_in_words() {
    let s = Scratch::new("bigvalues");
    let se = s.0.join("se.yaml");
    std::fs::write(
        &se,
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: \"{}\", namespace: shop}}\nspec: {{hosts: [a.example], ports: [{{number: 80, name: http}}], resolution: STATIC, endpoints: [{{address: 10.0.0.1}}]}}\n",
            "y".repeat(200_000)
        ),
    )
    .unwrap();
    let (code, _, err) = meshfed(&["validate", "-f", se.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.len() < 2_000, "a {} byte error", err.len());
    assert!(
        err.contains("(200013 bytes)") && err.contains("longer than 63 bytes"),
        "{err}"
    );

    let cfg = s.0.join("gw.yaml");
    std::fs::write(
        &cfg,
        format!(
            "site: \"{}\"\ntrust_domain: a.example\nlisten: 127.0.0.1:0\ntls: {{cert: a, key: b, bundles: [c]}}\n",
            "Q".repeat(100_000)
        ),
    )
    .unwrap();
    let (code, _, err) = meshfed(&["gateway", "check", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.len() < 2_000 && err.contains("site"),
        "{} bytes: {}",
        err.len(),
        &err[..err.len().min(300)]
    );

    // A "billion laughs": nine levels of nine aliases.
    let mut bomb = String::from("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    let mut prev = 'a';
    for c in 'b'..='j' {
        let refs = vec![format!("*{prev}"); 9].join(", ");
        bomb.push_str(&format!("{c}: &{c} [{refs}]\n"));
        prev = c;
    }
    let f = s.0.join("bomb.yaml");
    std::fs::write(&f, bomb).unwrap();
    let (code, _, err) = meshfed(&["validate", "-f", f.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("anchors and aliases are expanded") && !err.contains("budget breached"),
        "{err}"
    );
}

/// `--log-format json` writes one JSON object per line, with level, target and fields;
/// the default text format carries no colour codes when stderr is a file.
#[test]
fn log_lines_are_json_on_request_and_plain_text_otherwise() {
    let s = Scratch::new("logfmt");
    let dir = s.0.join("fed");
    let (code, _, err) = meshfed(&[
        "federation",
        "init",
        "--trust-domain",
        "fed.example.org",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    for format in ["json", "text"] {
        let log = s.0.join(format!("serve-{format}.log"));
        let _ = std::fs::remove_file(dir.join("admin_address"));
        let mut child = crate::harness::spawn_meshfed(
            &[
                "federation",
                "serve",
                "--dir",
                dir.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--log-format",
                format,
            ],
            &log,
        )
        .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !dir.join("admin_address").exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "federation did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // SIGTERM, so the drain logs too.
        let _ = std::process::Command::new("kill")
            .arg(child.id().to_string())
            .status();
        let _ = child.wait();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.lines().count() >= 3, "{text}");
        assert!(
            !text.contains('\u{1b}'),
            "colour codes in a log file: {text}"
        );
        for line in text.lines() {
            let parsed = serde_json::from_str::<serde_json::Value>(line);
            match format {
                "json" => {
                    let v = parsed.unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                    assert!(v["level"].is_string() && v["target"].is_string(), "{line}");
                    assert!(v["fields"]["message"].is_string(), "{line}");
                }
                _ => assert!(parsed.is_err(), "text format wrote JSON: {line}"),
            }
        }
        if format == "json" {
            assert!(
                text.contains(r#""message":"federation admin listening""#),
                "{text}"
            );
        }
    }
}
