//! W3C trace context across the gateway hop: each HTTP request's span at the egress
//! continues the client's `traceparent`, and the request leaves with the span's own;
//! the ingress does the same toward the endpoint. So a client's trace continues at the
//! far site's endpoint, with a span at each gateway between. The spans (target `otel`)
//! exist only when the binary exports traces (`--otlp-endpoint`); otherwise they are
//! disabled, and a client's `traceparent` passes through untouched.

use http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct Read<'a>(&'a HeaderMap);

impl Extractor for Read<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct Write<'a>(&'a mut HeaderMap);

impl Injector for Write<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// Makes `span` a child of the trace context the request carries, if any.
pub fn continue_from(span: &tracing::Span, headers: &HeaderMap) {
    if span.is_disabled() {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Read(headers)));
    let _ = span.set_parent(parent);
}

/// Writes `span`'s context into the request's headers (replacing the caller's
/// `traceparent`, whose trace it continues).
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    if span.is_disabled() {
        return;
    }
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut Write(headers)));
}
