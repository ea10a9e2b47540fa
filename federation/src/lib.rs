//! The federation: catalog sources (`sources`: ServiceEntry-style registration and
//! Kubernetes), the gRPC API, the service, its stores (embedded, etcd) and the node's
//! files. The model it serves lives in `meshfed-catalog` and is re-exported here under
//! its old paths (`catalog`, `names`, `routing`, `token`) while the split goes on.
#![forbid(unsafe_code)]

pub mod api;
pub mod node;
pub mod server;
pub mod sources;
pub mod store;
pub mod transport;

pub use meshfed_catalog::{catalog, names, routing, token};

pub use catalog::{Catalog, Change, Delta, Export, History, Resume, Revision, SiteRecord};
pub use names::{NameError, ServiceName, SiteName};
