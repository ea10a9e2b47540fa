//! The SPIFFE bundle endpoint ("SPIFFE Trust Domain and Bundle", section 5): every
//! member trust domain's bundle over HTTPS at `/<trust domain>`, as a SPIFFE bundle
//! (JWKS with `spiffe_sequence` and `spiffe_refresh_hint`), in the `https_spiffe`
//! profile (the server authenticates with the federation's SVID, which a client
//! verifies against the federation's bundle or its CA) or, with a web certificate, the
//! `https_web` profile. Anyone may read a bundle: it holds only public keys.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use meshfed_identity::tls::{SvidResolver, provider};
use meshfed_identity::{TrustBundle, TrustDomain};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::server::FederationService;

/// The TLS server side: the federation's SVID, no client certificate.
pub fn tls(resolver: Arc<SvidResolver>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The TLS server side of the `https_web` profile: a web certificate chain (PEM, leaf
/// first) and its key, which clients verify with their web roots.
pub fn web_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("{} and its key: {e}", cert.display()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The answer to `path`: the bundle of the trust domain it names, or why not. Pure
/// apart from reading the store's current bundles.
pub fn answer(
    bundles: &std::collections::BTreeMap<String, String>,
    path: &str,
) -> (StatusCode, String) {
    let name = path.trim_start_matches('/');
    let Ok(td) = TrustDomain::new(name) else {
        return (
            StatusCode::NOT_FOUND,
            "not a trust domain: GET /<trust domain>\n".into(),
        );
    };
    let Some(jwks) = bundles.get(td.as_str()) else {
        return (
            StatusCode::NOT_FOUND,
            format!("{td} is not a member of this federation\n"),
        );
    };
    // Re-serialized from the parsed bundle: what is served is always a valid SPIFFE
    // bundle with its sequence and refresh hint.
    match TrustBundle::from_jwks(td, jwks.as_bytes()).and_then(|b| b.to_jwks()) {
        Ok(j) => (StatusCode::OK, j),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// Connections served at once; more are closed at accept (a bundle is small and
/// cacheable: a client needs one connection now and then).
const MAX_CONNECTIONS: usize = 256;

/// Serves until `stop`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    service: Arc<FederationService>,
    stop: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    debug!(error = %e, "bundle endpoint accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!("bundle endpoint at its connection limit; connection closed");
            continue;
        };
        let (acceptor, service) = (acceptor.clone(), service.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let hs = tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp));
            let Ok(Ok(tls)) = hs.await else { return };
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let service = service.clone();
                async move {
                    let (status, body) = if req.method() == hyper::Method::GET {
                        answer(&service.member_bundles(), req.uri().path())
                    } else {
                        (StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into())
                    };
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = status;
                    let ctype = if status == StatusCode::OK {
                        "application/json"
                    } else {
                        "text/plain"
                    };
                    if let Ok(v) = ctype.parse() {
                        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
                    }
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            // One request per connection, its head within 10 s: a slot is never held
            // by an idle or slow client.
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await
            {
                debug!(error = %e, "bundle endpoint connection");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshfed_identity::Ca;

    #[test]
    fn a_member_bundle_or_a_clear_404() {
        let td = TrustDomain::new("east.example.org").unwrap();
        let ca = Ca::generate(&td, std::time::Duration::from_secs(3600)).unwrap();
        let bundles = [(td.to_string(), ca.bundle(7).to_jwks().unwrap())].into();
        let (s, body) = answer(&bundles, "/east.example.org");
        assert_eq!(s, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["spiffe_sequence"], 7);
        assert!(v["spiffe_refresh_hint"].as_u64().is_some());
        assert_eq!(v["keys"][0]["use"], "x509-svid");
        assert_eq!(
            answer(&bundles, "/west.example.org").0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(answer(&bundles, "/../etc/passwd").0, StatusCode::NOT_FOUND);
        assert_eq!(answer(&bundles, "/").0, StatusCode::NOT_FOUND);
    }
}
