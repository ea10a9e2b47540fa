//! The shared model of a federation, pure: site and service names, the catalog (sites,
//! exports, revisioned changes and their history), the routing plan a gateway applies
//! (peers, imports, backend order by locality, VIP and port ranges; kept current
//! incrementally by `planner`), one-time join tokens, legacy
//! services as registered, and the site directory's files.
//!
//! No async runtime, no RPC, no Kubernetes: the federation server, its API and client,
//! the sources, the gateway and DNS all speak these types. Its only I/O is reading and
//! atomically writing the site directory's small files (`site`). It depends on
//! `identity` only.
#![forbid(unsafe_code)]

pub mod affinity;
pub mod authz;
pub mod catalog;
pub mod cors;
pub mod http_route;
pub mod legacy;
pub mod locality;
pub mod names;
pub mod planner;
pub mod routing;
pub mod site;
pub mod token;
pub mod yaml;

pub use catalog::{Catalog, Change, Delta, Export, History, Resume, Revision, SiteRecord};
pub use names::{NameError, ServiceName, SiteName};
