//! `meshfed`: the one binary. This file parses the command line and dispatches: each
//! group of commands has its module under `src/cmd/` (arguments and a call into the
//! crates), `demo` the multi-site demo. The daemons' signal policy is
//! `meshfed_lifecycle::signals`; the gateway-with-DNS composition is the library's `site`.

mod cmd;
mod demo;

/// The data plane slices big buffers and frees them as peers acknowledge; glibc returns
/// those pages to the kernel and faults them back in. mimalloc keeps them.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "meshfed",
    version,
    about = "Multi-cluster mesh gateway and federation service"
)]
struct Cli {
    /// Log lines as `text` (for people) or `json` (one object per line, for log
    /// pipelines). Also `MESHFED_LOG_FORMAT`. Colour only on a terminal.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "MESHFED_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Export traces over OTLP/gRPC to this endpoint (`http://collector:4317`). Off
    /// when unset. Also `OTEL_EXPORTER_OTLP_ENDPOINT`.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Certificate authority of a trust domain.
    #[command(subcommand)]
    Ca(cmd::identity::CaCmd),
    /// SPIFFE trust bundles.
    #[command(subcommand)]
    Bundle(cmd::identity::BundleCmd),
    /// X.509-SVIDs.
    #[command(subcommand)]
    Svid(cmd::identity::SvidCmd),
    /// The gateway (data plane).
    #[command(subcommand)]
    Gateway(cmd::gateway::GatewayCmd),
    /// The federation service (catalog and trust exchange).
    #[command(subcommand)]
    Federation(Box<cmd::federation::FederationCmd>),
    /// This site's membership in a federation.
    #[command(subcommand)]
    Site(cmd::site::SiteCmd),
    /// Prints the federation's sites: trust domains, lease, exports, imports, revisions.
    Status(cmd::site::StatusArgs),
    /// Walks a cross-site call to SERVICE[:PORT] from this site, live: DNS, import,
    /// lease, link, a real open, endpoints; a verdict per step and the fix for the first
    /// failure. Exit status 0 when the call would succeed.
    Diagnose(cmd::diagnose::DiagnoseArgs),
    /// Kubernetes as a catalog source (MCS ServiceExport), run in the cluster beside the
    /// gateway; uses the in-cluster service account or the local kubeconfig.
    #[command(subcommand)]
    Kubernetes(cmd::kubernetes::KubernetesCmd),
    /// Serves federated DNS for a site from its gateway's catalog cache (to run DNS
    /// outside the gateway; inside it, use the gateway config's `dns` section).
    Dns(cmd::dns::DnsArgs),
    /// Checks Istio ServiceEntry/WorkloadEntry YAML; prints what it would register and
    /// a warning for every field meshfed does not support yet.
    Validate(cmd::registry::ValidateArgs),
    /// Registers legacy services (Istio ServiceEntry/WorkloadEntry YAML) for this site:
    /// its gateway exports them. A file with any error registers nothing.
    Register(cmd::registry::RegisterArgs),
    /// Removes registered services (by `name.namespace`, or every service registered
    /// from a file) from this site; its gateway stops exporting them.
    Unregister(cmd::registry::UnregisterArgs),
    /// Runs a federation and three sites on loopback, with live failover.
    Demo {
        /// Keep certificates and configs here instead of a temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; its components only log errors unless RUST_LOG says
    // otherwise (expected refusals and redials would drown it).
    let service = match &cli.cmd {
        Cmd::Gateway(_) => "meshfed-gateway",
        Cmd::Federation(_) => "meshfed-federation",
        _ => "meshfed",
    };
    let _traces = match init_tracing(
        if matches!(cli.cmd, Cmd::Demo { .. }) {
            "error"
        } else {
            "info"
        },
        cli.log_format,
        cli.otlp_endpoint.as_deref().filter(|e| !e.is_empty()),
        service,
    ) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: --otlp-endpoint: {}", error_chain(&e));
            return ExitCode::from(1);
        }
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes, `a: b: c`, leaving out a cause whose text the message
/// before it already holds (typed errors keep their source and also say it).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    let mut prev = out.clone();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !prev.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        prev = text;
    }
    out
}

fn init_tracing(
    default: &str,
    format: LogFormat,
    otlp: Option<&str>,
    service: &str,
) -> Result<Option<meshfed::telemetry::Guard>> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    if otlp.is_some() {
        filter = filter.add_directive(
            format!("{}=trace", meshfed::telemetry::TARGET)
                .parse()
                .expect("a valid directive"),
        );
    }
    // The exported spans are never log lines.
    let not_otel =
        tracing_subscriber::filter::filter_fn(|m| m.target() != meshfed::telemetry::TARGET);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        // Colour codes only for a person at a terminal, never in log files or journald.
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(not_otel)
            .boxed(),
        // One JSON object per line: `timestamp`, `level`, `target`, `fields` (with
        // `message`), and the current span's fields.
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_ansi(false)
            .with_filter(not_otel)
            .boxed(),
    };
    let registry = tracing_subscriber::registry().with(filter).with(fmt);
    match otlp {
        None => {
            registry.init();
            Ok(None)
        }
        Some(endpoint) => {
            let (layer, guard) = meshfed::telemetry::otlp_layer(endpoint, service)?;
            registry.with(layer).init();
            Ok(Some(guard))
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Ca(c) => cmd::identity::ca(c)?,
        Cmd::Bundle(c) => cmd::identity::bundle(c)?,
        Cmd::Svid(c) => return cmd::identity::svid(c),
        Cmd::Gateway(c) => cmd::gateway::run(c)?,
        Cmd::Demo { dir } => cmd::runtime()?.block_on(demo::run(dir))?,
        Cmd::Validate(a) => cmd::registry::validate(a)?,
        Cmd::Register(a) => cmd::registry::register(a)?,
        Cmd::Unregister(a) => cmd::registry::unregister(a)?,
        Cmd::Kubernetes(c) => cmd::kubernetes::run(c)?,
        Cmd::Dns(a) => cmd::dns::run(a)?,
        Cmd::Status(a) => cmd::site::status(a)?,
        Cmd::Diagnose(a) => return cmd::diagnose::run(a),
        Cmd::Federation(c) => cmd::federation::federation(*c)?,
        Cmd::Site(c) => cmd::site::site(c)?,
    }
    Ok(ExitCode::SUCCESS)
}
