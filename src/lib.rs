//! The composition root: what the `meshfed` binary (and the demo and the tests) put
//! together from the crates. Today that is one thing, a site (`site`): a gateway and,
//! when its config has a `dns` section, the federated DNS server that answers from the
//! gateway's applied plans. The gateway crate and the DNS crate do not know each other.
#![forbid(unsafe_code)]

pub mod diagnose;
pub mod site;
pub mod telemetry;
