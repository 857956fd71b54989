//! `provisioning audit`: reads the registry, the audit logs and the
//! gateways' metrics, runs [`twofold_provisioning::audit`] and reports.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use twofold_provisioning::audit::{self, Options, Severity};
use twofold_provisioning::registry::{Filter, Store};
use twofold_provisioning::{Error, Pki, atomic};

/// How long one gateway's /metrics may take.
const GATEWAY_TIMEOUT: Duration = Duration::from_secs(5);
/// Items listed per finding in the human report.
const SHOWN: usize = 20;

#[derive(clap::Args)]
pub struct AuditArgs {
    /// A gateway's audit log (JSON lines); repeat for every gateway and
    /// rotated file to read.
    #[arg(long = "audit-log", value_name = "FILE")]
    audit_logs: Vec<PathBuf>,
    /// A gateway's metrics address, http://host:port (its `metrics`
    /// setting); repeat for every gateway.
    #[arg(long = "gateway", value_name = "URL")]
    gateways: Vec<String>,
    /// The gateways' topic policy file, to check for rules that grant
    /// more than an identity's own subtree.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// The groups file that goes with --policy.
    #[arg(long, value_name = "FILE", requires = "policy")]
    groups: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Exit 2 if anything this severe or worse was found.
    #[arg(long, value_enum, default_value_t = Severity::High)]
    fail_on: Severity,
    /// Also write the findings as Prometheus gauges to this file
    /// (atomically), e.g. /var/lib/node_exporter/textfile/twofold.prom.
    #[arg(long, value_name = "FILE")]
    metrics_out: Option<PathBuf>,
    /// Report CA certificates expiring within this.
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    ca_warning: Duration,
    /// Report device and service certificates expiring within this.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    expiry_warning: Duration,
    /// Report certificates issued longer ago than this.
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    max_age: Duration,
    /// Report an expired certificate if its device was seen in the audit
    /// logs within this.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    seen_within: Duration,
    /// Times one identity may be seen from the same two addresses at once
    /// before it is reported as a cloned certificate (fewer, or each time
    /// a new address, as a device moving between networks: simultaneous
    /// use). A device that flaps between two networks looks the same as a
    /// clone: check its addresses.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    clone_threshold: u32,
    /// How long after a revocation a gateway may still admit the
    /// certificate before that is reported (the CRL's way to the gateways:
    /// a push takes a second, a pull up to its interval).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    crl_grace: Duration,
}

pub fn run(pki: Result<Pki, Error>, args: &AuditArgs) -> anyhow::Result<ExitCode> {
    let pki = pki?;
    let records = pki.store().find(&Filter::default())?;
    let crl_number = match pki.store().setting("crl_number")? {
        None => 0,
        Some(n) => n
            .parse()
            .with_context(|| format!("the registry's crl_number {n:?} is not a number"))?,
    };
    let mut logs = Vec::new();
    for path in &args.audit_logs {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot read the audit log {}", path.display()))?;
        logs.push((path.display().to_string(), file));
    }
    let log = audit::log::read(logs).context("reading the audit logs")?;
    let policy = args
        .policy
        .as_deref()
        .map(|p| twofold_trust::policy::file::load(p, args.groups.as_deref()))
        .transpose()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let gateways: Vec<_> = args
        .gateways
        .iter()
        .map(|g| audit::gateway::read(g, GATEWAY_TIMEOUT))
        .collect();
    let mut options = Options::new(twofold_provisioning::registry::now());
    options.ca_warning = args.ca_warning;
    options.expiry_warning = args.expiry_warning;
    options.max_age = args.max_age;
    options.seen_within = args.seen_within;
    options.clone_threshold = args.clone_threshold as usize;
    options.crl_grace = args.crl_grace;
    let report = audit::audit(
        &audit::Inputs {
            records: &records,
            crl_number,
            log: &log,
            gateways: &gateways,
            policy: policy.as_ref(),
        },
        &options,
    );
    if let Some(path) = &args.metrics_out {
        atomic::write(
            path,
            audit::render_metrics(&report).as_bytes(),
            0o644,
            atomic::Durability::Sync,
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", audit::render_text(&report, SHOWN));
    }
    Ok(match report.worst() {
        Some(worst) if worst >= args.fail_on => ExitCode::from(2),
        _ => ExitCode::SUCCESS,
    })
}
