//! The federation's catalog model: the names every other crate uses for sites and
//! services. The gRPC API and the federation service itself arrive with the federation
//! issue; this crate must stay free of sockets so that `gateway` and `dns` can depend on
//! its types without pulling in a server or a store.
#![forbid(unsafe_code)]

pub mod api;
pub mod catalog;
pub mod names;
pub mod node;
pub mod routing;
pub mod server;
pub mod store;
pub mod token;
pub mod transport;

pub use catalog::{Catalog, Change, Delta, Export, History, Resume, Revision, SiteRecord};
pub use names::{NameError, ServiceName, SiteName};
