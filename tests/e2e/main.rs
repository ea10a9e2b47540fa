//! End-to-end tests: real `meshfed` processes for several sites on loopback, and
//! (`inproc`) the same components in this process. One test binary for all of `tests/`
//! keeps link time down.

mod cli;
mod deploy;
mod diagnose;
mod dns;
mod etcd;
#[path = "../faults/mod.rs"]
mod faults;
mod federation;
mod harness;
mod hbone;
mod http;
mod inproc;
mod kubeapi;
mod kubernetes;
mod legacy;
mod netns;
mod outbound;
mod replicas;
mod rotation;
mod security;
mod spiffe_federation;
mod tunnel;
mod udp;
mod workload_api;
