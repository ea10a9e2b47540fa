//! Istio's own YAML, accepted as Istio documents it and turned into the catalog's model:
//! `ServiceEntry`, `WorkloadEntry` and `DestinationRule` TLS and subsets (`service_entry`,
//! which reads the whole multi-document file), `VirtualService` HTTP routes
//! (`virtual_service`), `AuthorizationPolicy` (`authorization`), and beside them the
//! Gateway API's mesh routes, `HTTPRoute` and `GRPCRoute` attached to a Service
//! (`gateway_api`): the documents `meshfed register` and `meshfed validate` read. Pure: text in, model and
//! warnings out, errors that name the document and the field path.
#![forbid(unsafe_code)]

pub mod authorization;
pub mod gateway_api;
pub mod service_entry;
pub mod virtual_service;

/// What the parsers' tests share.
#[cfg(test)]
pub(crate) mod test_support {
    use crate::service_entry::{ParseError, parse};

    /// `yaml` is refused, and one of its problems names `field` exactly.
    pub(crate) fn assert_refused_at(yaml: &str, field: &str) {
        match parse(yaml) {
            Err(ParseError::Invalid(p)) => assert!(
                p.iter().any(|p| p.field == field),
                "wanted {field}, got {p:?}\n{yaml}"
            ),
            other => panic!("accepted, wanted {field}: {other:?}\n{yaml}"),
        }
    }
}
