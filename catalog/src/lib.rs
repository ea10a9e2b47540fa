//! The shared model of a federation, pure: site and service names, the catalog (sites,
//! exports, revisioned changes and their history), the routing plan a gateway applies
//! (peers, imports, backend order, VIP and port ranges), and one-time join tokens.
//!
//! No I/O, no async runtime, no RPC, no Kubernetes: the federation server, its API and
//! client, the sources, the gateway and DNS all speak these types. It depends on
//! `identity` only.
#![forbid(unsafe_code)]

pub mod catalog;
pub mod names;
pub mod routing;
pub mod token;

pub use catalog::{Catalog, Change, Delta, Export, History, Resume, Revision, SiteRecord};
pub use names::{NameError, ServiceName, SiteName};
