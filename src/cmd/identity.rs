//! `meshfed ca`, `meshfed bundle`, `meshfed svid`: a trust domain's CA, its SPIFFE
//! bundle, and the X.509-SVID verifier the gateway and the federation use.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use meshfed_identity::{BundleSet, Ca, SpiffeId, TrustDomain};

#[derive(Subcommand)]
pub enum CaCmd {
    /// Creates a root CA: DIR/ca.pem and DIR/ca.key (mode 0600).
    Init {
        #[arg(long)]
        trust_domain: String,
        #[arg(long)]
        out: PathBuf,
        /// Root lifetime.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Creates an intermediate CA signed by a root, for a gateway's `tls.renew` (the root
    /// then stays offline): OUT/ca.pem (its chain) and OUT/ca.key.
    Intermediate {
        /// The root's directory.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Issues an X.509-SVID (one URI SAN, not a CA, digitalSignature, server+client auth).
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        spiffe_id: String,
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Certificate chain output (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Private key output (PEM, mode 0600).
        #[arg(long)]
        key: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum BundleCmd {
    /// Prints the CA's trust bundle in SPIFFE JWKS form. Several `--ca` (one trust
    /// domain) give one bundle with all their authorities: a root rotation's overlap.
    Export {
        #[arg(long, required = true)]
        ca: Vec<PathBuf>,
        /// spiffe_sequence; raise it whenever the authorities change.
        #[arg(long, default_value_t = 1)]
        sequence: u64,
    },
}

#[derive(Subcommand)]
pub enum SvidCmd {
    /// Verifies an X.509-SVID against trust bundles; prints the SPIFFE ID or the exact
    /// reason it is refused.
    Verify {
        /// A SPIFFE JWKS bundle file; repeat for several trust domains.
        #[arg(long = "bundle", required = true)]
        bundles: Vec<PathBuf>,
        /// Check the certificate for server use (default: client use).
        #[arg(long)]
        server: bool,
        cert: PathBuf,
    },
}

pub fn ca(cmd: CaCmd) -> Result<()> {
    match cmd {
        CaCmd::Intermediate { ca, out, ttl } => {
            let root = Ca::load(&ca)?;
            let inter = root.intermediate(ttl)?;
            inter.save(&out)?;
            println!(
                "created an intermediate CA of {} in {} (ttl {})",
                inter.trust_domain(),
                out.display(),
                humantime::format_duration(ttl)
            );
        }
        CaCmd::Init {
            trust_domain,
            out,
            ttl,
        } => {
            let td = TrustDomain::new(&trust_domain)
                .with_context(|| format!("--trust-domain {trust_domain:?}"))?;
            let ca = Ca::generate(&td, ttl)?;
            ca.save(&out)?;
            println!("created CA for trust domain {td} in {}", out.display());
        }
        CaCmd::Issue {
            ca,
            spiffe_id,
            ttl,
            cert,
            key,
        } => {
            let id =
                SpiffeId::new(&spiffe_id).with_context(|| format!("--spiffe-id {spiffe_id:?}"))?;
            let svid = Ca::load(&ca)?.issue(&id, ttl)?;
            svid.save(&cert, &key)?;
            println!(
                "issued {id} (ttl {}) to {}",
                humantime::format_duration(ttl),
                cert.display()
            );
        }
    }
    Ok(())
}

pub fn bundle(cmd: BundleCmd) -> Result<()> {
    match cmd {
        BundleCmd::Export { ca, sequence } => {
            let mut bundle: Option<meshfed_identity::TrustBundle> = None;
            for dir in &ca {
                let b = Ca::load(dir)?.bundle(sequence);
                bundle = Some(match bundle {
                    None => b,
                    Some(acc) if acc.trust_domain != b.trust_domain => anyhow::bail!(
                        "--ca {}: trust domain {} is not {}: a bundle is one trust domain's",
                        dir.display(),
                        b.trust_domain,
                        acc.trust_domain
                    ),
                    Some(acc) => meshfed_identity::TrustBundle {
                        sequence,
                        ..acc.union(&b)
                    },
                });
            }
            let bundle = bundle.expect("clap requires one --ca");
            println!("{}", bundle.to_jwks()?);
        }
    }
    Ok(())
}

pub fn svid(cmd: SvidCmd) -> Result<ExitCode> {
    match cmd {
        SvidCmd::Verify {
            bundles,
            server,
            cert,
        } => svid_verify(&bundles, server, &cert),
    }
}

fn svid_verify(bundle_files: &[PathBuf], server: bool, cert: &std::path::Path) -> Result<ExitCode> {
    let mut bundles = BundleSet::new();
    for f in bundle_files {
        bundles.insert(
            BundleSet::read_bundle_file(f, None)
                .with_context(|| format!("bundle {}", f.display()))?,
        );
    }
    let pem = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
    let chain = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{}: not PEM certificates", cert.display()))?
    };
    let Some((leaf, rest)) = chain.split_first() else {
        bail!("{}: no CERTIFICATE block", cert.display());
    };
    let usage = if server {
        meshfed_identity::Usage::Server
    } else {
        meshfed_identity::Usage::Client
    };
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    match meshfed_identity::verify::verify_svid(
        &bundles,
        leaf,
        rest,
        rustls::pki_types::UnixTime::now(),
        usage,
        &algs,
    ) {
        Ok(id) => {
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("refused [{}]: {e}", e.code());
            Ok(ExitCode::from(2))
        }
    }
}
