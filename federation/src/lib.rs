//! The federation service: the gRPC server of `meshfed.federation.v1` (`server`; the
//! API itself, its client and the model are `meshfed-api` and `meshfed-catalog`), its
//! TLS acceptor (`transport`), its stores (`store`: embedded, etcd, and `store::mirror`,
//! the pure etcd key layout and event→delta translation), and a node's directory, init
//! and serve (`node`), the SPIFFE bundle endpoint (`bundle_endpoint`), and federation with foreign trust
//! domains by their bundle endpoints (`foreign`), what gateways report about their peer links
//! (`links`, in memory, for Status). Only the binary depends on it: no gateway or DNS code does.
#![forbid(unsafe_code)]

pub mod bundle_endpoint;
pub mod foreign;
pub mod links;
pub mod node;
pub mod replicas;
pub mod server;
pub mod store;
pub mod topology;
pub mod transport;
