//! The SPIFFE Workload API as a SPIRE agent serves it, in this test: a tonic server of
//! the real `workload.proto` (the SPIFFE spec's, `proto/workload.proto`, generated
//! server side and checked in as `gen/workload.rs`), on a Unix socket. It refuses a
//! request without the `workload.spiffe.io: true` header, as SPIRE does, and streams
//! every X.509 context the test publishes. The gateway's side is the `spiffe` crate's
//! client (`tls.workload_api`).

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use meshfed_identity::{Svid, TrustBundle};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

#[allow(clippy::all, clippy::pedantic, dead_code, unused_qualifications)]
pub mod pb {
    include!("gen/workload.rs");
}

use pb::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};

type Ctx = Option<pb::X509svidResponse>;

/// A Workload API server on `socket`, streaming what [`WorkloadApi::publish`] sets.
pub struct WorkloadApi {
    pub socket: PathBuf,
    tx: tokio::sync::watch::Sender<Ctx>,
    stop: CancellationToken,
    /// Requests that carried the security header, and those that did not.
    pub with_header: Arc<AtomicUsize>,
    pub without_header: Arc<AtomicUsize>,
}

struct Svc {
    rx: tokio::sync::watch::Receiver<Ctx>,
    with_header: Arc<AtomicUsize>,
    without_header: Arc<AtomicUsize>,
}

impl Svc {
    fn check(&self, meta: &tonic::metadata::MetadataMap) -> Result<(), tonic::Status> {
        if meta.get("workload.spiffe.io").is_some_and(|v| v == "true") {
            self.with_header.fetch_add(1, Ordering::Relaxed);
            Ok(())
        } else {
            self.without_header.fetch_add(1, Ordering::Relaxed);
            Err(tonic::Status::invalid_argument(
                "security header missing from request",
            ))
        }
    }
}

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send + 'static>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for Svc {
    type FetchX509SVIDStream = Streamed<pb::X509svidResponse>;
    type FetchX509BundlesStream = Streamed<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = Streamed<pb::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: tonic::Request<pb::X509svidRequest>,
    ) -> Result<tonic::Response<Self::FetchX509SVIDStream>, tonic::Status> {
        self.check(req.metadata())?;
        let s = tokio_stream::wrappers::WatchStream::new(self.rx.clone()).filter_map(|c| c.map(Ok));
        Ok(tonic::Response::new(Box::pin(s)))
    }

    async fn fetch_x509_bundles(
        &self,
        _: tonic::Request<pb::X509BundlesRequest>,
    ) -> Result<tonic::Response<Self::FetchX509BundlesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not served by this test"))
    }

    async fn fetch_jwtsvid(
        &self,
        _: tonic::Request<pb::JwtsvidRequest>,
    ) -> Result<tonic::Response<pb::JwtsvidResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not served by this test"))
    }

    async fn fetch_jwt_bundles(
        &self,
        _: tonic::Request<pb::JwtBundlesRequest>,
    ) -> Result<tonic::Response<Self::FetchJWTBundlesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not served by this test"))
    }

    async fn validate_jwtsvid(
        &self,
        _: tonic::Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<tonic::Response<pb::ValidateJwtsvidResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not served by this test"))
    }
}

fn der_concat(certs: &[rustls::pki_types::CertificateDer<'_>]) -> Vec<u8> {
    certs.iter().flat_map(|c| c.as_ref().to_vec()).collect()
}

impl WorkloadApi {
    /// Binds `socket` and serves until dropped or [`WorkloadApi::stop`].
    pub fn start(socket: &Path) -> Self {
        let _ = std::fs::remove_file(socket);
        let listener =
            tokio::net::UnixListener::bind(socket).expect("bind the workload API socket");
        let (tx, rx) = tokio::sync::watch::channel(None);
        let stop = CancellationToken::new();
        let (with_header, without_header) = (Arc::default(), Arc::default());
        let svc = Svc {
            rx,
            with_header: Arc::clone(&with_header),
            without_header: Arc::clone(&without_header),
        };
        let s = stop.clone();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(SpiffeWorkloadApiServer::new(svc))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    s.cancelled(),
                )
                .await
                .expect("workload API serves");
        });
        Self {
            socket: socket.to_owned(),
            tx,
            stop,
            with_header,
            without_header,
        }
    }

    /// Streams a context with `svid` (and its trust domain's `bundle`) plus federated
    /// bundles, to every open stream and each new one.
    pub fn publish(&self, svid: &Svid, bundle: &TrustBundle, federated: &[&TrustBundle]) {
        let key = match &svid.key {
            rustls::pki_types::PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
            _ => panic!("the workload API carries PKCS#8 keys"),
        };
        let msg = pb::X509svidResponse {
            svids: vec![pb::X509svid {
                spiffe_id: svid.id.to_string(),
                x509_svid: der_concat(&svid.chain),
                x509_svid_key: key,
                bundle: der_concat(&bundle.x509_authorities),
                hint: String::new(),
            }],
            crl: vec![],
            federated_bundles: federated
                .iter()
                .map(|b| {
                    (
                        b.trust_domain.id().to_string(),
                        der_concat(&b.x509_authorities),
                    )
                })
                .collect(),
        };
        self.tx.send_replace(Some(msg));
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for WorkloadApi {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[test]
fn generated_code_is_fresh() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
    let out = std::env::temp_dir().join(format!("meshfed-workload-proto-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    tonic_prost_build::configure()
        .build_client(false)
        .out_dir(&out)
        .emit_rerun_if_changed(false)
        .compile_protos(&[root.join("proto/workload.proto")], &[root.join("proto")])
        .expect(
            "protoc must be installed (apt-get install protobuf-compiler; tests/run.sh does it)",
        );
    let fresh = std::fs::read_to_string(out.join("_.rs")).unwrap();
    let checked_in = root.join("gen/workload.rs");
    if std::env::var_os("MESHFED_BLESS").is_some() {
        std::fs::write(&checked_in, &fresh).unwrap();
    }
    let current = std::fs::read_to_string(&checked_in).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&out);
    assert!(
        current == fresh,
        "tests/e2e/gen/workload.rs is stale: MESHFED_BLESS=1 tests/run.sh generated_code_is_fresh"
    );
}
