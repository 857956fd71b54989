//! `gateway`: parse arguments and the config file, start the broker, serve.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::sync::watch;
use twofold_gateway::audit::Audit;
use twofold_gateway::broker::{self, BrokerTarget, Credential, EmbeddedLimits};
use twofold_gateway::config::{BrokerChoice, BrokerUrls, File};
use twofold_gateway::server::Gateway;
use twofold_gateway::session::Limits;
use twofold_gateway::tls::TlsFiles;

/// jemalloc instead of glibc's malloc. An idle session holds many buffers
/// that were reserved but never filled (rumqttd's per-link queues alone
/// reserve room for 200 packets each way); jemalloc leaves their untouched
/// pages out of resident memory, glibc's heap does not, and a gateway holds
/// thousands of idle sessions. `cargo bench -p twofold-gateway --bench
/// rumqttd_floor` shows the difference.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The Twofold gateway: mutual-TLS MQTT for devices, bound to the identity
/// in each client certificate.
///
/// Settings come from --config (TOML; see gateway/gateway.example.toml);
/// flags override the file.
#[derive(Parser)]
#[command(name = "gateway", version, max_term_width = 100)]
struct Cli {
    /// The config file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:8883.
    #[arg(long)]
    listen: Option<String>,
    /// Server certificate chain (PEM), as written by `provisioning gateway-cert`.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// CA certificates trusted for client certificates (PEM).
    #[arg(long)]
    client_ca: Option<PathBuf>,
    /// The CRL (PEM); reloaded when it changes.
    #[arg(long)]
    crl: Option<PathBuf>,
    /// The trust domain of device identities.
    #[arg(long)]
    trust_domain: Option<String>,
    /// `embedded` or mqtt://HOST:PORT.
    #[arg(long)]
    broker: Option<String>,
    /// Audit log file (JSON lines); stdout when absent.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Serve /metrics and /healthz on this address, e.g. 127.0.0.1:9100.
    #[arg(long)]
    metrics: Option<String>,
}

fn main() -> std::process::ExitCode {
    twofold_gateway::logging::init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(Cli::parse())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Every device connection, and every socket still in its handshake, takes
/// a file descriptor; the usual soft limit (1,024) is far below a fleet's,
/// and at that limit accept fails and the next device waits. So the soft
/// limit is raised to the hard one, and a hard limit below `floor` stops
/// the start with what to change.
fn raise_open_files_limit(floor: u64) -> anyhow::Result<()> {
    let (before, hard) = rlimit::Resource::NOFILE
        .get()
        .context("cannot read the open files limit (RLIMIT_NOFILE)")?;
    let in_force = rlimit::increase_nofile_limit(u64::MAX)
        .with_context(|| format!("cannot raise the open files limit from {before} to {hard}"))?;
    tracing::info!(
        open_files = in_force,
        hard,
        was = before,
        "open files limit"
    );
    if in_force < floor {
        anyhow::bail!(
            "open files limit: {in_force} (hard limit {hard}) is below limits.min_open_files = \
             {floor}; every device connection takes a file descriptor. Raise the hard limit: \
             LimitNOFILE=65536 in the gateway's systemd unit, or `ulimit -Hn 65536` (as root) \
             in the shell that starts it; or lower limits.min_open_files"
        );
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut file = match &cli.config {
        Some(path) => File::read(path)?,
        None => File::default(),
    };
    file.listen = cli.listen.or(file.listen);
    file.cert = cli.cert.or(file.cert);
    file.key = cli.key.or(file.key);
    file.client_ca = cli.client_ca.or(file.client_ca);
    file.crl = cli.crl.or(file.crl);
    file.trust_domain = cli.trust_domain.or(file.trust_domain);
    file.broker = cli.broker.map(BrokerUrls::One).or(file.broker);
    file.audit_log = cli.audit_log.or(file.audit_log);
    file.metrics = cli.metrics.or(file.metrics);
    let config = file.check()?;
    raise_open_files_limit(config.min_open_files)?;

    let audit = match &config.audit_log {
        Some(path) => Audit::to_file(path)
            .with_context(|| format!("audit_log: cannot open {}", path.display()))?,
        None => Audit::to_writer(Box::new(std::io::stdout())),
    };
    let policy = twofold_gateway::policy::start(config.policy.clone()).map_err(|e| {
        anyhow::anyhow!("policy: {e}; the gateway does not start on a broken policy")
    })?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen: cannot bind {}", config.listen))?;
    let broker = match &config.broker {
        BrokerChoice::Embedded => {
            let limits = EmbeddedLimits {
                max_payload_size: config.max_packet_size,
                segment_size: config.embedded_segment_size,
                segment_count: config.embedded_segment_count,
                fan_in_segment_size: config.embedded_fan_in_segment_size,
                fan_in_segment_count: config.embedded_fan_in_segment_count,
                ..EmbeddedLimits::default()
            };
            BrokerTarget::Embedded(broker::Embedded::start(&limits)?)
        }
        BrokerChoice::External {
            nodes,
            username,
            password,
            tls,
            v311_only,
            max_qos,
        } => {
            let mut resolved = Vec::new();
            for node in nodes {
                let addr = tokio::net::lookup_host(node.as_str())
                    .await
                    .with_context(|| format!("broker: cannot resolve {node}"))?
                    .next()
                    .with_context(|| format!("broker: {node} has no address"))?;
                let host = node
                    .rsplit_once(':')
                    .map_or(node.as_str(), |(h, _)| h)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let server_name = rustls_pki_types::ServerName::try_from(host.to_owned())
                    .with_context(|| format!("broker: {host:?} is not a valid server name"))?;
                resolved.push(broker::Node { addr, server_name });
            }
            let credential = match (username, password) {
                (Some(u), p) => Some(Credential {
                    username: u.clone(),
                    password: p.clone().unwrap_or_default(),
                }),
                (None, _) => None,
            };
            let tls = tls
                .as_ref()
                .map(broker::upstream_tls)
                .transpose()
                .context("broker TLS")?;
            BrokerTarget::External(broker::External {
                nodes: resolved,
                credential,
                tls,
                v311_only: *v311_only,
                max_qos: *max_qos,
            })
        }
    };

    let config_ca_service = config.ca_service.clone();
    let ca = match &config.ca_service {
        None => None,
        Some(c) => {
            let read = |p: &std::path::Path| {
                std::fs::read(p).with_context(|| format!("ca_service: {}", p.display()))
            };
            let client = twofold_gateway::renewal::CaClient::new(
                &c.address,
                &read(&c.ca)?,
                &read(&c.cert)?,
                &read(&c.key)?,
            )
            .map_err(|e| anyhow::anyhow!("ca_service: {e}"))?;
            tracing::info!(ca_service = %c.address, "devices renew through the CA service");
            Some(std::sync::Arc::new(client))
        }
    };
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = stop.send(true);
    });

    let gateway = Gateway {
        trust_domain: config.trust_domain,
        files: TlsFiles {
            cert: config.cert,
            key: config.key,
            client_ca: config.client_ca,
            crl: config.crl,
            expired_grace: config.expired_grace,
        },
        max_fragment_size: config.max_tls_record,
        broker,
        audit,
        handshake_timeout: config.handshake_timeout,
        max_handshakes: config.max_concurrent_handshakes,
        handshake_grace: config.handshake_grace,
        limits: Limits {
            max_packet_size: config.max_packet_size,
            connect_timeout: config.handshake_timeout,
        },
        metrics: config.metrics,
        ca,
        crl_poll: config.ca_service.as_ref().and_then(|c| c.crl_poll),
        policy,
    };
    if let (Some(ca), Some(c)) = (&gateway.ca, &config_ca_service)
        && c.renew_server_cert
    {
        tokio::spawn(twofold_gateway::renewal::keep_server_cert(
            ca.clone(),
            gateway.files.clone(),
            stopped.clone(),
        ));
    }
    // The accept loop runs on a worker, not on this thread: block_on's
    // thread would be woken by a worker for every new connection, and would
    // wake a worker back for its session (two thread switches per connect).
    tokio::spawn(gateway.serve(listener, stopped, Duration::from_secs(5)))
        .await
        .context("the accept loop stopped")??;
    tracing::info!("stopped");
    Ok(())
}
