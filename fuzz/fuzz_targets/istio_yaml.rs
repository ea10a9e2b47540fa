//! Istio YAML as operators register it (ServiceEntry, WorkloadEntry, DestinationRule,
//! VirtualService, AuthorizationPolicy, and Gateway API HTTPRoute and GRPCRoute, several
//! documents a file): a registration or errors naming fields, never a panic; what parses
//! compiles.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|s: &str| {
    if let Ok(r) = meshfed_istio::service_entry::parse(s) {
        for p in r.http_policies {
            p.compile().expect("a parsed policy compiles");
        }
    }
});
