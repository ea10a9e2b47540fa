//! SPIFFE federation with foreign trust domains (`federation serve --federates-with`),
//! against bundle endpoints nobody here wrote: `openssl s_server -WWW` serving SPIFFE
//! bundles that openssl made (EC P-256 roots with their `spiffe://` URI SAN, the JWKS
//! assembled from openssl's DER output), in both profiles:
//! - `https_spiffe`: the server presents an SVID that openssl signed with the foreign
//!   root, which the federation verifies against the bootstrap bundle;
//! - `https_web`: a web certificate for 127.0.0.1 from an openssl web CA.
//!
//! The foreign bundle reaches a site's gateway (which then completes a handshake with a
//! foreign gateway SVID), refreshes per `spiffe_refresh_hint` (a new authority arrives),
//! a stale sequence is refused, and no site may join with a foreign trust domain.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meshfed_federation::foreign;
use meshfed_identity::{BundleSet, Svid, TrustDomain};
use meshfed_lab::ConfigBuilder;

use crate::harness::Scratch;
use crate::inproc::{Federation, counter, gateway, open_as};

/// The openssl half: roots, an SVID for the https_spiffe endpoint, a foreign gateway
/// SVID, a web CA and certificate, and `jwks <root>... <sequence>` to write a bundle.
const MAKE: &str = r#"
set -euo pipefail
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key" 2>/dev/null; }
root() { # name, SAN (or "")
  key "$1"
  local san=(); [ -n "$2" ] && san=(-addext "subjectAltName=$2")
  openssl req -x509 -new -key "$1.key" -days 2 -subj "/O=foreign/CN=$1" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    "${san[@]}" -out "$1.pem"
}
leaf() { # name, SAN, issuer
  key "$1"
  openssl req -new -key "$1.key" -subj "/O=foreign" -out "$1.csr"
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=%s\n' "$2" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA "$3.pem" -CAkey "$3.key" -days 1 -extfile "$1.ext" -out "$1.pem" 2>/dev/null
}
root foreign-root "URI:spiffe://foreign.example.org"
root foreign-root2 "URI:spiffe://foreign.example.org"
leaf spire-server "URI:spiffe://foreign.example.org/spire/server" foreign-root
leaf foreign-gw "URI:spiffe://foreign.example.org/meshfed/site/far/gateway" foreign-root
root web-root "URI:spiffe://web.example.org"
root web-ca ""
leaf web-server "IP:127.0.0.1,DNS:localhost" web-ca
"#;

/// A SPIFFE bundle (JWKS) of openssl-made roots, with `spiffe_refresh_hint: 1`.
fn jwks(dir: &Path, roots: &[&str], sequence: u64) -> String {
    let script = r#"
set -euo pipefail
seq=$1; shift; sep=""
printf '{"keys":['
for r in "$@"; do
  pub() { openssl pkey -in "$r.key" -pubout -outform DER; }
  b64u() { basenc --base64url -w0 | tr -d '='; }
  # The P-256 point ends the DER public key: 0x04, then x and y, 32 bytes each.
  x=$(pub | tail -c 64 | head -c 32 | b64u); y=$(pub | tail -c 32 | b64u)
  x5c=$(openssl x509 -in "$r.pem" -outform DER | base64 -w0)
  printf '%s{"use":"x509-svid","kty":"EC","crv":"P-256","x":"%s","y":"%s","x5c":["%s"]}' "$sep" "$x" "$y" "$x5c"
  sep=","
done
printf '],"spiffe_sequence":%s,"spiffe_refresh_hint":1}' "$seq"
"#;
    let out = Command::new("bash")
        .args(["-c", script, "jwks", &sequence.to_string()])
        .args(roots)
        .current_dir(dir)
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `openssl s_server -WWW` serving `dir`'s files over TLS with `cert`/`key`.
struct Served {
    child: Child,
    addr: SocketAddr,
}

impl Served {
    fn start(dir: &Path, cert: &str, key: &str) -> Self {
        // A free port for openssl to bind.
        let addr = std::net::SocketAddr::from((
            [127, 0, 0, 1],
            crate::federation::free_port([127, 0, 0, 1].into()),
        ));
        let child = Command::new("openssl")
            .args(["s_server", "-WWW", "-quiet", "-accept"])
            .arg(addr.to_string())
            .args(["-cert", cert, "-key", key])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "openssl s_server never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, addr }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write(path: &Path, text: &str) {
    // Replaced whole: s_server reads the file per request.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The foreign trust domain's bundle as east's gateway has it on disk, once it has
/// `n` authorities.
async fn until_site_has(site_dir: &Path, td: &str, n: usize) -> meshfed_identity::TrustBundle {
    let path = site_dir.join("bundles").join(format!("{td}.json"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(b) = BundleSet::read_bundle_file(&path, Some(&TrustDomain::new(td).unwrap()))
            && b.x509_authorities.len() == n
        {
            return b;
        }
        assert!(
            Instant::now() < deadline,
            "{} never held {n} authorities: {:?}",
            path.display(),
            std::fs::read_to_string(&path)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_trust_domains_federate_by_their_bundle_endpoints() {
    let scratch = Scratch::new("spiffe-federation");
    let pki: PathBuf = scratch.0.join("openssl");
    std::fs::create_dir_all(&pki).unwrap();
    let out = Command::new("bash")
        .args(["-c", MAKE])
        .current_dir(&pki)
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let www = pki.join("www");
    std::fs::create_dir_all(&www).unwrap();
    write(&www.join("foreign"), &jwks(&pki, &["foreign-root"], 1));
    write(&www.join("web"), &jwks(&pki, &["web-root"], 1));
    // The bootstrap bundle the operator is given out of band: the same root.
    write(
        &pki.join("bootstrap.json"),
        &jwks(&pki, &["foreign-root"], 1),
    );
    let spire = Served::start(&www, "../spire-server.pem", "../spire-server.key");
    let web = Served::start(&www, "../web-server.pem", "../web-server.key");

    let fed = Federation::start(&scratch).await;
    let east = fed.join(&scratch, "east").await;
    let east_gw = gateway(&east, 2, ConfigBuilder::default()).await;

    // Before: east's gateway refuses a foreign gateway's handshake.
    let foreign_gw = Svid::load(&pki.join("foreign-gw.pem"), &pki.join("foreign-gw.key")).unwrap();
    let east_bundle = meshfed_identity::Ca::load(&east.dir.join("ca"))
        .unwrap()
        .bundle(1);
    let port = 7000;
    let before = open_as(
        &foreign_gw,
        east_gw.gateway.quic_addr,
        &east.id,
        east_bundle.clone(),
        "orders.shop",
        port,
    )
    .await;
    assert!(
        before.as_ref().is_err_and(|e| !e.starts_with("Refuse")),
        "a foreign SVID is refused in the handshake before federating: {before:?}"
    );

    let file = scratch.0.join("federates-with.yaml");
    std::fs::write(
        &file,
        format!(
            "federates_with:\n  - trust_domain: foreign.example.org\n    bundle_endpoint_url: https://{}/foreign\n    bundle_endpoint_profile: https_spiffe\n    endpoint_spiffe_id: spiffe://foreign.example.org/spire/server\n    bundle: openssl/bootstrap.json\n  - trust_domain: web.example.org\n    bundle_endpoint_url: https://{}/web\n    bundle_endpoint_profile: https_web\n    ca: openssl/web-ca.pem\n",
            spire.addr, web.addr
        ),
    )
    .unwrap();
    fed.node
        .federate_with(foreign::load(&file).unwrap())
        .await
        .unwrap();

    // Both bundles reach the site, and east's gateway now completes the handshake: the
    // open gets a typed answer from the ingress.
    until_site_has(&east.dir, "foreign.example.org", 1).await;
    until_site_has(&east.dir, "web.example.org", 1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = open_as(
            &foreign_gw,
            east_gw.gateway.quic_addr,
            &east.id,
            east_bundle.clone(),
            "orders.shop",
            port,
        )
        .await;
        if r.is_ok() || r.as_ref().is_err_and(|e| e.starts_with("Refuse")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "east never accepted the foreign gateway's handshake: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A rotation at the foreign domain: sequence 2 adds a root; the federation fetches
    // it within the refresh hint and every site has both.
    write(
        &www.join("foreign"),
        &jwks(&pki, &["foreign-root", "foreign-root2"], 2),
    );
    let b = until_site_has(&east.dir, "foreign.example.org", 2).await;
    assert_eq!(b.sequence, 2);
    // A stale sequence is refused: the site keeps both roots.
    write(&www.join("foreign"), &jwks(&pki, &["foreign-root"], 1));
    let admin = fed
        .node
        .serve_admin(&fed.dir, ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let (_, m) = meshfed_lifecycle::admin::get(admin, "/metrics")
            .await
            .unwrap();
        if counter(
            &m,
            "meshfed_federation_foreign_bundle_refreshes_total{trust_domain=\"foreign.example.org\",result=\"stale_bundle\"}",
        ) >= 1.0
        {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "no stale_bundle refusal counted: {m}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        until_site_has(&east.dir, "foreign.example.org", 2)
            .await
            .sequence,
        2
    );
    assert!(
        counter(
            &m,
            "meshfed_federation_foreign_bundle_sequence{trust_domain=\"foreign.example.org\"}"
        ) == 2.0,
        "{m}"
    );

    // The federation's own bundle endpoint serves members only, never the foreign ones.
    let members = fed.node.service.member_bundles();
    assert!(
        members.contains_key("east.example.org") && !members.contains_key("foreign.example.org")
    );

    // Each profile authenticates its endpoint: another SPIFFE ID, or a web CA that did
    // not sign the server's certificate, and the fetch fails in TLS.
    let rels = foreign::load(&file).unwrap();
    let mut wrong_id = rels[0].clone();
    if let foreign::Profile::HttpsSpiffe { endpoint_id, .. } = &mut wrong_id.profile {
        *endpoint_id =
            meshfed_identity::SpiffeId::new("spiffe://foreign.example.org/not/the/server").unwrap();
    }
    let mut wrong_ca = rels[1].clone();
    wrong_ca.profile = foreign::Profile::HttpsWeb {
        roots: vec![{
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::CertificateDer::from_pem_file(pki.join("foreign-root.pem")).unwrap()
        }],
    };
    for (what, rel) in [("wrong endpoint ID", wrong_id), ("wrong web CA", wrong_ca)] {
        let r = foreign::fetch(&rel, None).await;
        assert_eq!(
            r.as_ref().map_err(|e| e.code()).err(),
            Some("tls_failed"),
            "{what}: {r:?}"
        );
    }
    for (what, rel) in [("https_spiffe", &rels[0]), ("https_web", &rels[1])] {
        foreign::fetch(rel, None)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }

    // No site may join with a foreign trust domain.
    let s = meshfed_lab::make_site(&scratch.0, "foreign", "foreign.example.org").unwrap();
    let (token, _) = meshfed_api::client::create_token(
        &fed.dir,
        "foreign",
        Duration::from_secs(60),
        None,
        false,
    )
    .await
    .unwrap();
    let err = meshfed_api::client::join(&s.dir, "foreign", &token, vec![])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("foreign trust domain"), "{err}");

    // The federation's own endpoint in the https_web profile, with openssl's web
    // certificate: Python's TLS checks it for 127.0.0.1 against openssl's web CA, and
    // py-spiffe parses east's bundle; the foreign bundles it relays are not served.
    let at = fed
        .node
        .serve_bundle_endpoint(
            ([127, 0, 0, 1], 0).into(),
            Some((&pki.join("web-server.pem"), &pki.join("web-server.key"))),
        )
        .await
        .unwrap();
    let script = r#"
import json, ssl, sys, base64, urllib.request, urllib.error
from spiffe import TrustDomain, X509Bundle
addr, ca = sys.argv[1], sys.argv[2]
ctx = ssl.create_default_context(cafile=ca)
doc = json.load(urllib.request.urlopen(f"https://{addr}/east.example.org", context=ctx))
ders = [base64.b64decode(k["x5c"][0]) for k in doc["keys"] if k.get("use") == "x509-svid"]
b = X509Bundle.parse_raw(TrustDomain("east.example.org"), b"".join(ders))
try:
    urllib.request.urlopen(f"https://{addr}/foreign.example.org", context=ctx)
    status = 200
except urllib.error.HTTPError as e:
    status = e.code
print(b.trust_domain, len(b.x509_authorities), status)
"#;
    let out = tokio::process::Command::new("/opt/meshfed-tools/bin/python")
        .arg("-c")
        .arg(script)
        .arg(at.to_string())
        .arg(pki.join("web-ca.pem"))
        .output()
        .await
        .expect("py-spiffe (deploy/setup-dev.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), "east.example.org 1 404");

    east_gw.shutdown().await;
    fed.node.shutdown().await;
}
