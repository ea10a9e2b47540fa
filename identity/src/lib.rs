//! SPIFFE identity for meshfed: SPIFFE IDs and trust domains, a CA per trust domain that
//! issues X.509-SVIDs (a root, or an intermediate that keeps the root offline; `ca::
//! renew_in` says when an SVID is due), SPIFFE trust bundles (JWKS), and rustls verifiers that check a
//! peer only against the bundle of its own trust domain; and `fs`, the atomic, durable
//! file writes and directory locks every meshfed process uses.
//!
//! This crate knows nothing of catalogs, sites' services or sockets; it depends on no
//! other meshfed crate (`.ci/deps.sh` checks it).
#![forbid(unsafe_code)]

pub mod bundle;
pub mod ca;
pub mod fs;
pub mod id;
pub mod tls;
pub mod verify;

pub use bundle::{BundleError, BundleSet, TrustBundle};
pub use ca::{Ca, CaError, Svid};
pub use id::{IdError, SpiffeId, TrustDomain};
pub use verify::{PeerPolicy, SpiffeVerifier, Usage, VerifyError};
