//! TLS origination toward registered legacy endpoints: the registering site's gateway
//! speaks TLS (or mutual TLS) to the endpoint, verified against the CA the operator gave
//! for the configured server name. Configured per service by an Istio `DestinationRule`
//! (`trafficPolicy.tls`: SIMPLE or MUTUAL, caCertificates, clientCertificate,
//! privateKey, sni).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshfed_catalog::legacy::{TlsMode, TlsOrigination};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Refuses what is not a regular file: a FIFO or a device would block the reader (a
/// gateway thread, with the clients' lock held) or never end.
fn regular(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!("{}: not a regular file", path.display())),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The certificates in a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    regular(path)?;
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    regular(path)?;
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A rustls client, and the server name to send and verify.
pub type Client = (Arc<rustls::ClientConfig>, ServerName<'static>);

/// How often a setting's files are looked at again: a replaced CA, client certificate or
/// key (a rotation) is used by the connections made after that, with no restart.
pub const RECHECK: Duration = Duration::from_secs(1);

/// The clients built so far, by setting: without ALPN, and offering only `h2`. Each is
/// built once (it reads PEM files), for the bytes and the HTTP path alike, and looked up
/// by reference (the bytes path asks once per connection). At most every `RECHECK` a
/// lookup looks at the files again; when they changed, the client is built anew from
/// them. Files that no longer load (half written, garbage) leave the client built
/// before in force, with a warning, until they change again.
pub struct Clients {
    built: std::sync::Mutex<std::collections::BTreeMap<TlsOrigination, Built>>,
    recheck: Duration,
}

impl Default for Clients {
    fn default() -> Self {
        Clients::rechecking(RECHECK)
    }
}

#[derive(Default)]
struct Built {
    clients: [Option<Client>; 2],
    /// The files as they were when `clients` were built from them.
    from: Option<Stamps>,
    /// The files as they were when they last failed to load.
    refused: Option<Stamps>,
    checked: Option<Instant>,
}

/// What identifies a file's contents without reading it: device, inode, size, change and
/// modification times (a rename over it or a write into it changes one of them). `None`
/// for a file that cannot be looked at.
type Stamps = Vec<Option<[i64; 6]>>;

/// The stamps of the files `t` reads.
fn stamps(t: &TlsOrigination) -> Stamps {
    use std::os::unix::fs::MetadataExt;
    [
        Some(&t.ca_certificates),
        t.client_certificate.as_ref(),
        t.private_key.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|f| {
        std::fs::metadata(f).ok().map(|m| {
            [
                m.dev() as i64,
                m.ino() as i64,
                m.size() as i64,
                m.ctime() * 1_000_000_000 + m.ctime_nsec(),
                m.mtime() * 1_000_000_000 + m.mtime_nsec(),
                m.mode() as i64,
            ]
        })
    })
    .collect()
}

/// Whether clients built from files stamped `from` are built again now that the files
/// are stamped `now`: only when the files changed, and not into the state that was
/// already refused (so a bad file is reported once, not every `RECHECK`).
fn rebuild(from: Option<&Stamps>, refused: Option<&Stamps>, now: &Stamps) -> bool {
    from.is_some_and(|from| from != now) && refused != Some(now)
}

impl Clients {
    /// Clients whose files are looked at again at most every `recheck`.
    pub fn rechecking(recheck: Duration) -> Self {
        Clients {
            built: Default::default(),
            recheck,
        }
    }

    /// Forgets the clients of settings `keep` refuses (no export has them any more);
    /// returns how many went.
    pub fn retain(&self, keep: impl Fn(&TlsOrigination) -> bool) -> usize {
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        let before = built.len();
        built.retain(|t, _| keep(t));
        before - built.len()
    }

    /// Settings with clients built now.
    pub fn settings(&self) -> usize {
        self.built.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The client for `t`, built on first use and again when its files changed; with
    /// `h2`, one that offers only `h2` in ALPN (toward an h2 or gRPC endpoint).
    pub fn get(&self, t: &TlsOrigination, h2: bool) -> Result<Client, String> {
        let i = usize::from(h2);
        let now = Instant::now();
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if !built.contains_key(t) {
            built.insert(t.clone(), Built::default());
        }
        let b = built.get_mut(t).expect("inserted above");
        if b.checked
            .is_none_or(|at| now.duration_since(at) >= self.recheck)
        {
            b.checked = Some(now);
            let files = stamps(t);
            if rebuild(b.from.as_ref(), b.refused.as_ref(), &files) {
                match build(t, h2) {
                    Ok(c) => {
                        tracing::info!(sni = %t.sni, ca = %t.ca_certificates, "TLS origination: files changed, client rebuilt");
                        *b = Built {
                            clients: Default::default(),
                            from: Some(files),
                            refused: None,
                            checked: Some(now),
                        };
                        b.clients[i] = Some(c.clone());
                        return Ok(c);
                    }
                    Err(e) => {
                        tracing::warn!(sni = %t.sni, error = %e, "TLS origination: changed files do not load; the client built before stays in force");
                        b.refused = Some(files);
                    }
                }
            }
        }
        if let Some(c) = &b.clients[i] {
            return Ok(c.clone());
        }
        // Stamped before reading, so a change made during the read is seen next time.
        let files = stamps(t);
        let c = build(t, h2)?;
        if b.from.as_ref() != Some(&files) {
            b.clients = Default::default();
            b.from = Some(files);
            b.refused = None;
        }
        b.clients[i] = Some(c.clone());
        Ok(c)
    }
}

/// A client for `t`; with `h2`, offering only `h2` in ALPN.
fn build(t: &TlsOrigination, h2: bool) -> Result<Client, String> {
    let (mut cfg, name) = client(t)?;
    if h2 {
        Arc::make_mut(&mut cfg).alpn_protocols = vec![b"h2".to_vec()];
    }
    Ok((cfg, name))
}

/// Speaks TLS over `tcp` as `client` says, the handshake within `within`.
pub async fn handshake(
    (config, name): Client,
    tcp: tokio::net::TcpStream,
    within: std::time::Duration,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let connector = tokio_rustls::TlsConnector::from(config);
    match tokio::time::timeout(within, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("handshake: {e}")),
        Err(_) => Err(format!("handshake timed out after {within:?}")),
    }
}

/// Warns about a certificate of `file` outside its dates now: the handshake that then
/// fails says only that the peer refused, or that verification failed.
fn warn_if_outside_validity(file: &str, what: &str, c: &CertificateDer<'_>) {
    if let Some(why) = meshfed_identity::verify::outside_validity(c, crate::renew::unix_now()) {
        tracing::warn!(file, what, "TLS origination: a certificate {why}");
    }
}

/// A rustls client for `t`, and the server name to send and verify.
pub fn client(t: &TlsOrigination) -> Result<Client, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(Path::new(&t.ca_certificates))? {
        warn_if_outside_validity(&t.ca_certificates, "caCertificates", &c);
        roots
            .add(c)
            .map_err(|e| format!("{}: {e}", t.ca_certificates))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    let cfg = match t.mode {
        TlsMode::Simple => builder.with_no_client_auth(),
        TlsMode::Mutual => {
            let cert = t
                .client_certificate
                .as_deref()
                .ok_or("MUTUAL needs clientCertificate")?;
            let key = t.private_key.as_deref().ok_or("MUTUAL needs privateKey")?;
            let chain = load_certs(Path::new(cert))?;
            warn_if_outside_validity(cert, "clientCertificate", &chain[0]);
            builder
                .with_client_auth_cert(chain, load_key(Path::new(key))?)
                .map_err(|e| format!("{cert}: {e}"))?
        }
    };
    let name = ServerName::try_from(t.sni.clone()).map_err(|e| format!("sni {:?}: {e}", t.sni))?;
    Ok((Arc::new(cfg), name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_rebuilt_only_when_their_files_changed_into_something_new() {
        let a = Some(vec![Some([1, 2, 3, 4, 5, 6])]);
        let b = vec![Some([1, 2, 9, 4, 5, 6])];
        let gone = vec![None];
        // (built from, refused, files now, rebuilt)
        let cases: &[(Option<&Stamps>, Option<&Stamps>, &Stamps, bool)] = &[
            (a.as_ref(), None, a.as_ref().unwrap(), false),
            (a.as_ref(), None, &b, true),
            (a.as_ref(), None, &gone, true),
            (a.as_ref(), Some(&b), &b, false),
            (a.as_ref(), Some(&gone), &b, true),
            (None, None, &b, false),
        ];
        for (i, (from, refused, now, want)) in cases.iter().enumerate() {
            assert_eq!(rebuild(*from, *refused, now), *want, "case {i}");
        }
    }

    fn ca_pem(name: &str) -> String {
        let td = meshfed_identity::TrustDomain::new(name).unwrap();
        let ca = meshfed_identity::ca::Ca::generate(&td, Duration::from_secs(3600)).unwrap();
        meshfed_identity::ca::der_to_pem("CERTIFICATE", ca.cert())
    }

    /// Which CA a client trusts is shown end to end by the e2e
    /// `tls_origination_on_an_http_port`; here, when a client is built again.
    #[test]
    fn a_replaced_ca_file_is_used_and_a_broken_one_is_not() {
        let dir = std::env::temp_dir().join(format!("meshfed-orig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, ca_pem("one.example")).unwrap();
        let t = TlsOrigination {
            mode: TlsMode::Simple,
            ca_certificates: ca.display().to_string(),
            sni: "ledger.example".into(),
            client_certificate: None,
            private_key: None,
        };
        let clients = Clients::rechecking(Duration::ZERO);
        let first = clients.get(&t, false).unwrap();
        let first_h2 = clients.get(&t, true).unwrap();
        assert_eq!(first_h2.0.alpn_protocols, vec![b"h2".to_vec()]);
        // Unchanged files: the same clients.
        assert!(Arc::ptr_eq(&clients.get(&t, false).unwrap().0, &first.0));
        assert!(Arc::ptr_eq(&clients.get(&t, true).unwrap().0, &first_h2.0));

        // Replaced by rename, as a Secret volume or cert-manager does it.
        let next = dir.join("ca.pem.next");
        std::fs::write(&next, ca_pem("two.example")).unwrap();
        std::fs::rename(&next, &ca).unwrap();
        let second = clients.get(&t, false).unwrap();
        assert!(!Arc::ptr_eq(&second.0, &first.0));
        let second_h2 = clients.get(&t, true).unwrap();
        assert!(!Arc::ptr_eq(&second_h2.0, &first_h2.0));
        assert_eq!(second_h2.0.alpn_protocols, vec![b"h2".to_vec()]);

        // Half written, then garbage, then gone: the last good client stays.
        let pem = ca_pem("three.example");
        std::fs::write(&ca, &pem[..pem.len() / 2]).unwrap();
        assert!(Arc::ptr_eq(&clients.get(&t, false).unwrap().0, &second.0));
        std::fs::write(&ca, "not a certificate").unwrap();
        assert!(Arc::ptr_eq(&clients.get(&t, false).unwrap().0, &second.0));
        assert!(Arc::ptr_eq(&clients.get(&t, true).unwrap().0, &second_h2.0));
        std::fs::remove_file(&ca).unwrap();
        assert!(Arc::ptr_eq(&clients.get(&t, false).unwrap().0, &second.0));
        // A FIFO in its place is not read (it would block until a writer came).
        let made = std::process::Command::new("mkfifo")
            .arg(&ca)
            .status()
            .unwrap();
        assert!(made.success());
        assert!(Arc::ptr_eq(&clients.get(&t, false).unwrap().0, &second.0));
        assert!(load_certs(&ca).unwrap_err().contains("not a regular file"));
        std::fs::remove_file(&ca).unwrap();

        // Written whole again: used.
        std::fs::write(&ca, &pem).unwrap();
        let third = clients.get(&t, false).unwrap();
        assert!(!Arc::ptr_eq(&third.0, &second.0));

        // Within the recheck interval, the files are not looked at.
        let lazy = Clients::rechecking(Duration::from_secs(3600));
        let kept = lazy.get(&t, false).unwrap();
        std::fs::write(&ca, ca_pem("four.example")).unwrap();
        assert!(Arc::ptr_eq(&lazy.get(&t, false).unwrap().0, &kept.0));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
