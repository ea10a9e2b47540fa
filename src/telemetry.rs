//! Traces: when an OTLP endpoint is configured (`--otlp-endpoint` or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT`), spans of target `otel` (tunnel opens and accepts,
//! federation publishes and catalog applications, HTTP requests at both gateways) are
//! exported over OTLP/gRPC (opentelemetry-otlp on tonic) in batches. Off by default: then
//! those spans are filtered out where they are created and cost a level check.
//!
//! The exporter runs on a runtime of its own (one worker thread), so export never
//! competes with the data plane's runtime, and a slow or absent collector never blocks
//! it: the batch processor drops spans past its queue.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;

/// The target of the spans that are exported (and never logged).
pub const TARGET: &str = "otel";

/// Flushes and stops the exporter when dropped (at the end of `main`).
pub struct Guard {
    provider: SdkTracerProvider,
    _runtime: tokio::runtime::Runtime,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.provider.force_flush();
        let _ = self.provider.shutdown();
    }
}

/// The OTLP layer for `tracing`, exporting to `endpoint` (`http://host:4317`) as
/// `service` (the OTel `service.name`, e.g. `meshfed-gateway`).
pub fn otlp_layer<S>(
    endpoint: &str,
    service: &str,
) -> anyhow::Result<(
    tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>,
    Guard,
)>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    use opentelemetry_otlp::WithExportConfig;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()?;
    let provider = runtime.block_on(async {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()?;
        anyhow::Ok(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    Resource::builder()
                        .with_service_name(service.to_owned())
                        .build(),
                )
                .build(),
        )
    })?;
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let tracer = provider.tracer("meshfed");
    Ok((
        tracing_opentelemetry::layer().with_tracer(tracer),
        Guard {
            provider,
            _runtime: runtime,
        },
    ))
}
