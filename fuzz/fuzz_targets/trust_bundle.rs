//! SPIFFE JWKS bundles fetched from peers and files.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshfed_identity::{TrustBundle, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let td = TrustDomain::new("fuzz.example.org").expect("valid");
    if let Ok(b) = TrustBundle::from_jwks(td, data) {
        assert!(!b.x509_authorities.is_empty());
    }
});
