//! The federation: the catalog model and the names every other crate uses for sites and
//! services (pure), catalog sources (`sources`: ServiceEntry-style registration), the
//! gRPC API, the service, its stores (embedded, etcd) and the node's files.
#![forbid(unsafe_code)]

pub mod api;
pub mod catalog;
pub mod names;
pub mod node;
pub mod routing;
pub mod server;
pub mod sources;
pub mod store;
pub mod token;
pub mod transport;

pub use catalog::{Catalog, Change, Delta, Export, History, Resume, Revision, SiteRecord};
pub use names::{NameError, ServiceName, SiteName};
