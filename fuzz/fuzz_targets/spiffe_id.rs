//! SPIFFE IDs from certificates and configs: parsing never panics, and an accepted ID
//! prints back exactly as given.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshfed_identity::{SpiffeId, TrustDomain};

fuzz_target!(|s: &str| {
    if let Ok(id) = SpiffeId::new(s) {
        assert_eq!(id.as_str(), s);
        assert!(id.as_str().len() <= 2048);
        assert!(TrustDomain::new(id.trust_domain_str()).is_ok());
    }
    let _ = TrustDomain::new(s);
});
