//! `provisioning`: run the Twofold CA and enroll devices.
//!
//! Parses arguments, opens the PKI, calls the library, prints a report.

use std::io::IsTerminal;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use twofold_protocol::{DeviceId, Principal, ServiceName, TrustDomain};
use twofold_provisioning::atomic::{self, Durability};
use twofold_provisioning::crl::Scope;
use twofold_provisioning::enrollment::{batch_ids, rfc3339};
use twofold_provisioning::keys::{Passphrase, PassphraseSource};
use twofold_provisioning::output::{self, GatewayAddress, files};
use twofold_provisioning::pki::{NewCaKeys, TOKEN_PIN_ENV};
use twofold_provisioning::registry::{
    CertRecord, Filter, Kind, RegistryUrl, RevocationReason, Status, Store,
};
use twofold_provisioning::{
    EnrollOptions, EnrollRequest, Error, KeySource, Pki, RevokeTarget, Serial, profile,
};

mod audit_command;
mod policy_command;

const PASSPHRASE_ENV: &str = "TWOFOLD_CA_PASSPHRASE";

/// Run the Twofold certificate authority and enroll devices.
///
/// A PKI directory holds three CAs (root, device, server), their CRLs and a
/// registry of every certificate issued. Start with `init`, give the gateway
/// a certificate with `gateway-cert`, then `enroll` devices.
#[derive(Parser)]
#[command(name = "provisioning", version, max_term_width = 100)]
struct Cli {
    /// The PKI directory.
    #[arg(long, global = true, env = "TWOFOLD_PKI", default_value = "pki")]
    pki: PathBuf,

    /// Where the registry is: `sqlite` (registry.db in the PKI directory)
    /// or a postgres://user@host/database URL, shared by several
    /// provisioning nodes and CA services. Give the password in PGPASSWORD
    /// or ~/.pgpass, not in the URL, where `ps` would show it.
    #[arg(
        long,
        global = true,
        env = "TWOFOLD_REGISTRY",
        default_value = "sqlite"
    )]
    registry: RegistryUrl,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new PKI: root CA, device CA and server CA (ECDSA P-256).
    ///
    /// Refuses to touch an existing PKI. With --encrypt the three CA keys are
    /// encrypted at rest; the passphrase comes from TWOFOLD_CA_PASSPHRASE or
    /// a prompt, and is asked again by every command that signs.
    Init {
        /// The trust domain named in every identity URI, e.g. iot.example.com.
        #[arg(long)]
        trust_domain: String,
        /// Encrypt the CA keys with a passphrase.
        #[arg(long, conflicts_with = "pkcs11_module")]
        encrypt: bool,
        /// Make the three CA keys inside a PKCS#11 token (an HSM, a TPM
        /// through libtpm2_pkcs11, SoftHSM2) through this module; they are
        /// never written anywhere. Every signing command then uses them
        /// there. Needs --token.
        #[arg(long, value_name = "MODULE", requires = "token")]
        pkcs11_module: Option<PathBuf>,
        /// The token's label.
        #[arg(long, value_name = "LABEL", requires = "pkcs11_module")]
        token: Option<String>,
        /// A file holding the token's user PIN; without it the PIN is read
        /// from TWOFOLD_TOKEN_PIN. Recorded (the path, not the PIN) in
        /// PKI/token.toml for the commands after.
        #[arg(long, value_name = "FILE", requires = "pkcs11_module")]
        pin_file: Option<PathBuf>,
    },

    /// Issue a gateway server certificate (EKU serverAuth only).
    ///
    /// Writes gateway.pem (leaf + server CA), gateway.key (0600), client-ca.pem
    /// (the device CA: what the gateway trusts for clients) and crl.pem.
    /// Revoke it with `revoke --serial`: that updates PKI/server-crl.pem,
    /// which Linux agents check the gateway against.
    GatewayCert {
        /// DNS names devices use to reach the gateway; the first is the CN.
        #[arg(value_name = "NAME")]
        names: Vec<String>,
        /// IP addresses devices use to reach the gateway.
        #[arg(long = "ip", value_name = "ADDR")]
        ips: Vec<IpAddr>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime in days.
        #[arg(long, default_value_t = profile::GATEWAY_DAYS)]
        days: u32,
        /// Where you will publish the server CA's CRL (`provisioning crl
        /// --server --der`), e.g. http://pki.example.com/server-crl.der;
        /// written into the certificate as its CRL distribution point.
        #[arg(long, value_name = "URL")]
        crl_url: Option<String>,
    },

    /// Enroll a device (or, with --service, a backend service).
    ///
    /// Generates a P-256 key and a client certificate (EKU clientAuth only,
    /// CN=ID, SAN URI spiffe://<trust-domain>/device/ID). Writes device.key
    /// (0600), device.pem (leaf + device CA), server-ca.pem (the only CA a
    /// device trusts) and server-crl.pem (revoked gateway certificates).
    /// With --format nostd writes one flashable bundle.bin for a
    /// microcontroller instead.
    Enroll {
        /// The device id: 1-64 characters of a-z, 0-9 and '-'.
        #[arg(required_unless_present = "service", conflicts_with = "service")]
        id: Option<String>,
        /// Issue a backend service certificate for NAME instead.
        #[arg(long, value_name = "NAME")]
        service: Option<String>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        issue: IssueArgs,
        /// pem for Linux agents, nostd for a microcontroller bundle.
        #[arg(long, value_enum, default_value_t = Format::Pem)]
        format: Format,
        /// Gateway address stored in a nostd bundle.
        #[arg(long, value_name = "HOST:PORT", required_if_eq("format", "nostd"))]
        gateway: Option<GatewayAddress>,
        /// Put it in this group of the topic policy (repeatable); see
        /// `groups`.
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
    },

    /// Issue a device certificate for a CSR made on the device.
    ///
    /// The key never leaves the device. The CSR must carry a valid
    /// signature, a P-256 key and CN=<device id>. Writes the chain (leaf +
    /// device CA); give the device the PKI's server-ca.pem too.
    SignCsr {
        /// The CSR file, PEM or DER.
        csr: PathBuf,
        /// Where to write the certificate chain (PEM).
        #[arg(long)]
        out: PathBuf,
        /// Refuse the CSR unless it is for this device id.
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        issue: IssueArgs,
    },

    /// Enroll many devices at once: PREFIX-0001, PREFIX-0002, ...
    ///
    /// Writes each device's bundle to DIR/<id>/ in the same layout as enroll.
    /// All certificates are recorded in one transaction: all or none.
    BulkEnroll {
        /// How many devices.
        #[arg(long)]
        count: u64,
        /// Id prefix; ids are PREFIX-<number>, zero-padded.
        #[arg(long)]
        prefix: String,
        /// First number.
        #[arg(long, default_value_t = 1)]
        start: u64,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        issue: IssueArgs,
    },

    /// Revoke a certificate and regenerate its CA's CRL: PKI/crl.pem for a
    /// device or service (the gateway reads it), PKI/server-crl.pem for a
    /// gateway (devices read it).
    Revoke {
        #[command(flatten)]
        target: Target,
        /// Why.
        #[arg(long, value_enum, default_value_t = RevocationReason::Unspecified)]
        reason: RevocationReason,
        #[command(flatten)]
        push: PushArgs,
    },

    /// Push the device CA's current CRL to every gateway, through the
    /// broker they relay to (as `revoke --push` does): e.g. again after a
    /// broker was rebuilt, or from cron before the CRL's next update.
    PushCrl {
        #[command(flatten)]
        push: PushArgs,
    },

    /// List issued certificates.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Only certificates with this status.
        #[arg(long, value_enum)]
        status: Option<Status>,
        /// Only active certificates expiring within this long, e.g. 30d, 12h.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        expiring_within: Option<std::time::Duration>,
        /// Only certificates of this kind.
        #[arg(long, value_enum)]
        kind: Option<KindArg>,
    },

    /// Show the certificates of one device, service or serial.
    Show {
        #[command(flatten)]
        target: Target,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },

    /// Sign a fresh CRL (next number, new 30-day window) and write it out.
    ///
    /// Also updates PKI/crl.pem (PKI/server-crl.pem with --server). Run both
    /// regularly (e.g. daily) so no one holds an outdated CRL.
    Crl {
        /// Where to write the CRL.
        #[arg(long)]
        out: PathBuf,
        /// DER instead of PEM (what a CRL distribution point URL serves).
        #[arg(long)]
        der: bool,
        /// The server CA's CRL (gateway certificates) instead of the device CA's.
        #[arg(long)]
        server: bool,
    },

    /// Make a one-time token with which a device enrolls over EST.
    ///
    /// The device (or its installer) sends its id and this token as HTTP
    /// Basic credentials to the CA service's /.well-known/est/simpleenroll
    /// with a CSR for its own key (CN = the id). Only a hash of the token is
    /// kept; it works once, within --days.
    EstToken {
        /// The device id the token enrolls.
        id: String,
        /// How long the token is valid, 1 to 30 days.
        #[arg(long, default_value_t = 1)]
        days: u32,
    },

    /// Run the CA service: renewals over HTTPS with client certificates.
    ///
    /// Devices and services renew their own certificate; gateways renew on
    /// a device's behalf if named with --ra. The service needs a server
    /// certificate like a gateway's (`gateway-cert <name> --out DIR`) and
    /// holds the device CA key for as long as it runs (an encrypted key's
    /// passphrase is read once, at start). Logs go to stderr (RUST_LOG).
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: std::net::SocketAddr,
        /// The service's certificate chain (PEM), e.g. DIR/gateway.pem.
        #[arg(long)]
        cert: PathBuf,
        /// The service's key (PEM), e.g. DIR/gateway.key.
        #[arg(long)]
        key: PathBuf,
        /// A service allowed to renew for devices (a registration
        /// authority), by service name; repeat for several gateways.
        #[arg(long = "ra", value_name = "SERVICE")]
        registration_authorities: Vec<String>,
        /// Lifetime of renewed certificates, e.g. 30d. Below an hour is
        /// for tests of renewal itself; 60 s is the floor.
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        lifetime: std::time::Duration,
        /// How long a renewal may wait for the device's commit before the
        /// old certificate is superseded anyway.
        #[arg(long, default_value = "1d", value_parser = humantime::parse_duration)]
        grace: std::time::Duration,
        /// Renewal requests allowed per identity per --rate-window.
        #[arg(long, default_value_t = 10)]
        rate_limit: u32,
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        rate_window: std::time::Duration,
        /// Renew before renewal is due (2/3 of the lifetime less jitter).
        #[arg(long)]
        allow_early: bool,
        /// Let a certificate renew this long after it expired, e.g. 7d
        /// (off by default): for devices that were offline past their
        /// expiry. Gateways admit them with their own `expired_grace`.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        expired_grace: Option<std::time::Duration>,
        /// A CA (PEM) whose certificates, installed at the factory, may
        /// enroll a device over EST simpleenroll, once: the device id is
        /// the certificate's CN. Repeatable.
        #[arg(long = "est-bootstrap-ca", value_name = "FILE")]
        est_bootstrap_cas: Vec<PathBuf>,
        /// Lifetime of the gateway server certificates gateways renew here
        /// (POST /v1/server-cert), e.g. 7d; 60 s at least.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        server_lifetime: std::time::Duration,
    },

    /// Audit the fleet: expiring CAs and certificates, renewals not done,
    /// weak or shared keys, cloned certificates, revoked ones still in use,
    /// gateways behind on the CRL.
    ///
    /// Reads the registry, the gateways' audit logs (--audit-log) and their
    /// /metrics (--gateway). Exit status: 0 if nothing at or above
    /// --fail-on was found, 2 if something was, 1 if the audit could not
    /// run. For cron or CI; --metrics-out writes the findings as Prometheus
    /// gauges for node_exporter's textfile collector.
    Audit(audit_command::AuditArgs),

    /// Groups of devices and services for the topic policy: add, remove,
    /// list, and export the groups file gateways read.
    Groups {
        #[command(subcommand)]
        action: policy_command::GroupsAction,
    },

    /// Check a topic policy file, or explain one of its decisions.
    Policy {
        #[command(subcommand)]
        action: policy_command::PolicyAction,
    },
}

/// Options of every command that issues client certificates.
#[derive(Args)]
struct IssueArgs {
    /// Lifetime in days.
    #[arg(long, default_value_t = profile::DEVICE_DAYS)]
    days: u32,
    /// Replace an active certificate (the old one is revoked as superseded)
    /// and overwrite the files in --out.
    #[arg(long)]
    replace: bool,
    /// A lifetime shorter than a day instead of --days, e.g. 2m: for tests
    /// and demonstrations of renewal through the CA service (60 s at least).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, conflicts_with = "days")]
    lifetime: Option<std::time::Duration>,
}

impl IssueArgs {
    fn options(&self) -> EnrollOptions {
        EnrollOptions {
            days: self.days,
            replace: self.replace,
            lifetime: self
                .lifetime
                .map(|l| time::Duration::try_from(l).unwrap_or(time::Duration::MAX)),
        }
    }
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct Target {
    /// A device id.
    id: Option<String>,
    /// A service name.
    #[arg(long, value_name = "NAME")]
    service: Option<String>,
    /// A certificate serial (hex, as `list` or `openssl x509 -serial` show it).
    #[arg(long, value_name = "SERIAL")]
    serial: Option<String>,
}

/// Where a new device CRL is pushed: the broker the gateways relay to.
#[derive(Args)]
struct PushArgs {
    /// mqtt://HOST:PORT or mqtts://HOST:PORT of the broker the gateways
    /// relay to (repeat for the nodes of a cluster: tried in order). The
    /// CRL is published retained on `twofold/v1/crl`; every gateway takes
    /// it within a second and closes the revoked sessions.
    #[arg(long = "push", value_name = "URL")]
    urls: Vec<String>,
    /// The broker user to push as.
    #[arg(long = "push-username", value_name = "USER", requires = "urls")]
    username: Option<String>,
    /// A file holding that user's password (never on the command line).
    #[arg(long = "push-password-file", value_name = "FILE", requires = "urls")]
    password_file: Option<PathBuf>,
    /// For mqtts://: the CA certificates (PEM) the broker's certificate
    /// must chain to; nothing else is trusted.
    #[arg(long = "push-ca", value_name = "FILE", requires = "urls")]
    ca: Option<PathBuf>,
    /// For mqtts:// brokers that require a client certificate: its chain
    /// (PEM), e.g. a service bundle's device.pem.
    #[arg(long = "push-cert", value_name = "FILE", requires_all = ["urls", "key"])]
    cert: Option<PathBuf>,
    /// The key of --push-cert (PEM).
    #[arg(long = "push-key", value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
}

impl PushArgs {
    fn target(&self) -> anyhow::Result<Option<twofold_provisioning::push::Target>> {
        if self.urls.is_empty() {
            return Ok(None);
        }
        let password = match &self.password_file {
            None => None,
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("--push-password-file {}", f.display()))?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
            ),
        };
        let ca = match &self.ca {
            None => Vec::new(),
            Some(f) => pem_certs("--push-ca", std::slice::from_ref(f))?
                .into_iter()
                .map(rustls::pki_types::CertificateDer::from)
                .collect(),
        };
        let identity = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = pem_certs("--push-cert", std::slice::from_ref(cert))?
                    .into_iter()
                    .map(rustls::pki_types::CertificateDer::from)
                    .collect();
                if let Some(plain) = self.urls.iter().find(|u| !u.starts_with("mqtts://")) {
                    bail!("--push-cert needs mqtts:// URLs; {plain} is not one");
                }
                use rustls::pki_types::pem::PemObject as _;
                let pem =
                    std::fs::read(key).with_context(|| format!("--push-key {}", key.display()))?;
                // The first private key in the file, whatever comes before
                // it (openssl's EC PARAMETERS block).
                let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
                    anyhow::anyhow!("--push-key {}: no private key in it ({e})", key.display())
                })?;
                Some(std::sync::Arc::new((chain, key)))
            }
            _ => None,
        };
        Ok(Some(twofold_provisioning::push::Target {
            urls: self.urls.clone(),
            username: self.username.clone(),
            password,
            ca,
            identity,
        }))
    }
}

/// Pushes the PKI's device CRL to `target`.
fn push_crl(pki: &Pki, target: &twofold_provisioning::push::Target) -> anyhow::Result<()> {
    let pem = pki.crl_pem()?;
    let at = twofold_provisioning::push::crl(target, pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("the CRL was not pushed: {e}"))?;
    println!(
        "  pushed       to {at} (retained on {}); every gateway listening takes it",
        twofold_provisioning::push::TOPIC
    );
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Pem,
    Nostd,
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    Device,
    Service,
    Gateway,
    Ca,
}

/// Passphrases from TWOFOLD_CA_PASSPHRASE, else a prompt on the terminal.
struct CliPassphrase;

impl PassphraseSource for CliPassphrase {
    fn passphrase(&self, file: &Path) -> twofold_provisioning::Result<Option<Passphrase>> {
        if let Ok(p) = std::env::var(PASSPHRASE_ENV) {
            return Passphrase::new(p).map(Some);
        }
        if !std::io::stdin().is_terminal() {
            return Ok(None);
        }
        let p = rpassword::prompt_password(format!("Passphrase for {}: ", file.display()))
            .map_err(|source| Error::Io {
                path: "/dev/tty".into(),
                source,
            })?;
        Passphrase::new(p).map(Some)
    }
}

fn new_passphrase() -> anyhow::Result<Passphrase> {
    if let Ok(p) = std::env::var(PASSPHRASE_ENV) {
        return Ok(Passphrase::new(p)?);
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "--encrypt needs a passphrase: set {PASSPHRASE_ENV} or run on a terminal to be prompted"
        );
    }
    let first = rpassword::prompt_password("New CA key passphrase: ")?;
    let again = rpassword::prompt_password("Repeat the passphrase: ")?;
    if first != again {
        bail!("the two passphrases differ; nothing was created");
    }
    Ok(Passphrase::new(first)?)
}

/// An `init` killed mid-way leaves its staging directory, with CA keys in
/// it, beside the PKI. Say so rather than delete it: another init may be
/// running right now.
fn warn_about_interrupted_inits(pki: &Path) {
    let parent = match pki.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(".twofold-init-")
        {
            eprintln!(
                "warning: {} is left from an interrupted init and holds CA keys; delete it once no init is running",
                entry.path().display()
            );
        }
    }
}

fn device_id(s: &str) -> Result<DeviceId, Error> {
    DeviceId::parse(s).map_err(|reason| Error::InvalidName {
        what: "device id",
        value: s.into(),
        reason,
    })
}

fn service_name(s: &str) -> Result<ServiceName, Error> {
    ServiceName::parse(s).map_err(|reason| Error::InvalidName {
        what: "service name",
        value: s.into(),
        reason,
    })
}

fn open(cli: &Cli) -> Result<Pki, Error> {
    Pki::open_with(&cli.pki, Box::new(CliPassphrase), &cli.registry)
}

/// The certificates (DER) in each PEM file of `paths`, given with `flag`;
/// a file with none is an error.
fn pem_certs(flag: &str, paths: &[PathBuf]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for path in paths {
        let text =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let certs: Vec<Vec<u8>> = pem::parse_many(&text)
            .with_context(|| format!("{} is not PEM", path.display()))?
            .into_iter()
            .filter(|p| p.tag() == "CERTIFICATE")
            .map(|p| p.into_contents())
            .collect();
        if certs.is_empty() {
            bail!("{flag} {}: no certificate in it", path.display());
        }
        out.extend(certs);
    }
    Ok(out)
}

/// sqlx adds a PostgreSQL URL's `sslrootcert` to the system's CA store
/// instead of trusting it alone, so any CA the system trusts could vouch
/// for the registry's host. The system store it reads (rustls-native-certs)
/// is `SSL_CERT_FILE` when that is set: pointing it at `sslrootcert` (or
/// PGSSLROOTCERT) leaves that CA alone trusted. Nothing else in this
/// program uses the system store: every other TLS connection names its CA.
fn trust_only_the_registrys_root(registry: &RegistryUrl) {
    let RegistryUrl::Postgres(text) = registry else {
        return;
    };
    let from_url = url::Url::parse(text).ok().and_then(|u| {
        u.query_pairs()
            .find(|(k, _)| matches!(&**k, "sslrootcert" | "ssl-root-cert" | "ssl-ca"))
            .map(|(_, v)| v.into_owned())
    });
    let Some(root) = from_url.or_else(|| std::env::var("PGSSLROOTCERT").ok()) else {
        return;
    };
    // SAFETY: called first thing in main, before any other thread exists
    // to read the environment.
    unsafe {
        std::env::set_var("SSL_CERT_FILE", root);
        std::env::remove_var("SSL_CERT_DIR");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    trust_only_the_registrys_root(&cli.registry);
    if let Command::Policy { action } = &cli.command {
        return match policy_command::policy(|| open(&cli), action) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::Audit(args) = &cli.command {
        return match audit_command::run(open(&cli), args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Init {
            trust_domain,
            encrypt,
            pkcs11_module,
            token,
            pin_file,
        } => {
            let td =
                TrustDomain::parse(trust_domain).map_err(|reason| Error::InvalidTrustDomain {
                    value: trust_domain.clone(),
                    reason,
                })?;
            warn_about_interrupted_inits(&cli.pki);
            let keys = match (pkcs11_module, token) {
                (Some(module), Some(_)) if !module.is_absolute() => anyhow::bail!(
                    "--pkcs11-module {}: give an absolute path (it is recorded for the commands after, run from anywhere)",
                    module.display()
                ),
                (Some(module), Some(token)) => NewCaKeys::Token(twofold_token::TokenSpec {
                    module: module.clone(),
                    token: token.clone(),
                    pin: match pin_file {
                        Some(path) => twofold_token::PinSource::File(std::path::absolute(path)?),
                        None => twofold_token::PinSource::Env(TOKEN_PIN_ENV.into()),
                    },
                }),
                _ if *encrypt => NewCaKeys::Files(Some(new_passphrase()?)),
                _ => NewCaKeys::Files(None),
            };
            let pki = Pki::init_keys(&cli.pki, td, keys, &cli.registry)?;
            println!(
                "created PKI for trust domain {} in {}",
                pki.trust_domain(),
                pki.dir().display()
            );
            println!("  root CA    {}", pki.dir().join("root-ca.pem").display());
            println!(
                "  device CA  {}  (issues device and service certificates, signs crl.pem)",
                pki.dir().join("device-ca.pem").display()
            );
            println!(
                "  server CA  {}  (issues gateway certificates, signs server-crl.pem; devices trust only this)",
                pki.dir().join("server-ca.pem").display()
            );
            match (pkcs11_module, token) {
                (Some(module), Some(token)) => println!(
                    "  CA keys    in token \"{token}\" ({}), labelled twofold-root-ca, twofold-device-ca and twofold-server-ca; sensitive, never extractable, on no disk",
                    module.display()
                ),
                _ if *encrypt => println!("  CA keys    encrypted with your passphrase"),
                _ => println!(
                    "  CA keys    not encrypted (use --encrypt, or --pkcs11-module, to protect them)"
                ),
            }
            println!(
                "next: provisioning --pki {} gateway-cert <gateway-dns-name> --out gateway/",
                cli.pki.display()
            );
            if pkcs11_module.is_some() {
                println!(
                    "note: the root CA's key is not needed after init; a token of its own can be kept offline."
                );
            } else {
                println!("note: root-ca.key is not needed after init; keep it offline.");
            }
        }
        Command::GatewayCert {
            names,
            ips,
            out,
            days,
            crl_url,
        } => {
            if names.is_empty() && ips.is_empty() {
                bail!("give at least one DNS name or --ip address for the gateway");
            }
            let mut pki = open(cli)?;
            let out_dir = prepare_out(
                out,
                &[files::GATEWAY_KEY, files::GATEWAY_CHAIN],
                None,
                "write it to another --out (the old certificate stays valid until it expires)",
            )?;
            let cert = pki.issue_gateway(names, ips, *days, crl_url.as_deref())?;
            out_dir.keep();
            let written = output::write_gateway(out, &cert, &pki.device_ca_pem()?, &pki.crl_pem()?);
            written_or_explain(written, &cert.record)?;
            println!("issued gateway certificate {}", cert.record.name);
            print_record_summary(&cert.record);
            println!(
                "  files        {}",
                file_list(
                    out,
                    &[
                        files::GATEWAY_KEY,
                        files::GATEWAY_CHAIN,
                        files::CLIENT_CA,
                        files::CRL
                    ]
                )
            );
        }
        Command::Enroll {
            id,
            service,
            out,
            issue,
            format,
            gateway,
            groups,
        } => {
            let principal = match (id, service) {
                (Some(id), None) => Principal::Device(device_id(id)?),
                (None, Some(name)) => Principal::Service(service_name(name)?),
                _ => bail!("give either a device ID or --service NAME"),
            };
            if *format == Format::Pem && gateway.is_some() {
                bail!("--gateway is stored only in a microcontroller bundle; add --format nostd");
            }
            if *format == Format::Nostd && matches!(principal, Principal::Service(_)) {
                bail!("--format nostd is for microcontroller devices, not services");
            }
            let mut pki = open(cli)?;
            let written: &[&str] = match format {
                Format::Nostd => &[files::NOSTD_BUNDLE],
                Format::Pem => &[
                    files::DEVICE_KEY,
                    files::DEVICE_CHAIN,
                    files::SERVER_CA,
                    files::SERVER_CRL,
                ],
            };
            let out_dir = prepare_out(
                out,
                written,
                issue.replace.then_some(principal.name()),
                "choose another --out, or pass --replace to re-enroll",
            )?;
            // Memberships first: one left behind by a failed enrollment
            // names an id that has no certificate yet, which grants nothing.
            for g in groups {
                let member = match principal {
                    Principal::Device(id) => id.as_str().to_owned(),
                    Principal::Service(name) => format!("service:{name}"),
                };
                policy_command::set(&mut pki, g, &[member], true)?;
            }
            let options = issue.options();
            let request = EnrollRequest {
                principal,
                key: KeySource::Generate,
            };
            let e = pki
                .enroll(vec![request], options, &mut |_| {})?
                .pop()
                .context("nothing was issued")?;
            out_dir.keep();
            let server_ca = pki.server_ca_pem()?;
            let server_crl = pki.server_crl_pem()?;
            let result = match (format, gateway) {
                (Format::Nostd, Some(gw)) => output::write_nostd(out, &e, &server_ca, gw),
                _ => output::write_device(
                    out,
                    &e,
                    &server_ca,
                    server_crl.as_deref(),
                    Durability::Sync,
                ),
            };
            written_or_explain(result, &e.record)?;
            println!("enrolled {} {}", principal.kind(), principal.name());
            print_record_summary(&e.record);
            for old in &e.superseded {
                println!("  superseded   {old} (revoked, listed in the CRL)");
            }
            // A PKI made before there was a server CRL has none to hand out.
            let listed: Vec<&str> = written
                .iter()
                .copied()
                .filter(|f| *f != files::SERVER_CRL || server_crl.is_some())
                .collect();
            println!("  files        {}", file_list(out, &listed));
            if *format == Format::Pem && server_crl.is_none() {
                println!(
                    "  note         this PKI has no server-crl.pem yet: run `provisioning crl --server --out ...` once"
                );
            }
        }
        Command::SignCsr {
            csr,
            out,
            id,
            issue,
        } => {
            let expected = id.as_deref().map(device_id).transpose()?;
            if issue.replace && expected.is_none() {
                bail!(
                    "sign-csr --replace needs --id: name the device whose certificate the CSR replaces"
                );
            }
            let mut pki = open(cli)?;
            if out.exists() && !issue.replace {
                bail!(
                    "{} already exists; choose another --out, or pass --replace to re-enroll",
                    out.display()
                );
            }
            let bytes = std::fs::read(csr).map_err(|source| Error::Io {
                path: csr.clone(),
                source,
            })?;
            let request =
                twofold_provisioning::csr::parse(&bytes, pki.trust_domain(), expected.as_ref())
                    .map_err(|reason| Error::Csr {
                        file: csr.clone(),
                        reason,
                    })?;
            let e = pki.sign_csr(request, issue.options())?;
            let written = atomic::write(
                out,
                e.chain_pem.as_bytes(),
                atomic::PUBLIC,
                Durability::Sync,
            );
            written_or_explain(written, &e.record)?;
            println!("signed CSR for device {}", e.record.name);
            print_record_summary(&e.record);
            println!("  files        {}", out.display());
            println!(
                "give the device {}, {} and {}",
                out.display(),
                pki.dir().join(files::SERVER_CA).display(),
                pki.dir().join(Scope::Server.file()).display()
            );
        }
        Command::BulkEnroll {
            count,
            prefix,
            start,
            out,
            issue,
        } => {
            bulk_enroll(cli, *count, prefix, *start, out, issue.options())?;
        }
        Command::Revoke {
            target,
            reason,
            push,
        } => {
            let target = revoke_target(target)?;
            let push = push.target()?;
            let mut pki = open(cli)?;
            let record = pki.revoke(target, *reason)?;
            println!(
                "revoked {} {} (serial {}, reason {})",
                record.kind,
                record.name,
                record.serial,
                reason.as_str()
            );
            match Scope::of(record.kind) {
                Some(Scope::Server) => println!(
                    "  CRL          {} regenerated; publish it (crl --server --der) at the \
                     gateway certificates' CRL URL and give it to devices as server-crl.pem",
                    pki.dir().join(Scope::Server.file()).display()
                ),
                _ => {
                    println!(
                        "  CRL          {} regenerated; give it to the gateway{}",
                        pki.dir().join(Scope::Device.file()).display(),
                        if push.is_some() {
                            ""
                        } else {
                            " (or --push it)"
                        }
                    );
                    if let Some(target) = &push {
                        push_crl(&pki, target)?;
                    }
                }
            }
        }
        Command::PushCrl { push } => {
            let Some(target) = push.target()? else {
                bail!("name the broker with --push mqtt://HOST:PORT");
            };
            let mut pki = open(cli)?;
            // Another node sharing the registry may have revoked since
            // this node's CRL was signed, or this node's last revoke lost
            // its COMMIT: gateways would ignore such a CRL, or worse.
            if let Some(number) = pki.catch_up_crl_if_needed()? {
                println!("  signed again CRL {number}, as the shared registry has it");
            }
            push_crl(&pki, &target)?;
        }
        Command::List {
            json,
            status,
            expiring_within,
            kind,
        } => {
            let pki = open(cli)?;
            let now = twofold_provisioning::registry::now();
            let mut records = pki.store().find(&Filter::default())?;
            records.retain(|r| {
                let kind_ok = match kind {
                    None => true,
                    Some(KindArg::Device) => r.kind == Kind::Device,
                    Some(KindArg::Service) => r.kind == Kind::Service,
                    Some(KindArg::Gateway) => r.kind == Kind::Gateway,
                    Some(KindArg::Ca) => {
                        matches!(r.kind, Kind::RootCa | Kind::DeviceCa | Kind::ServerCa)
                    }
                };
                let status_ok = status.is_none_or(|s| r.status(now) == s);
                // A window past the end of time means "no limit", never a panic.
                let horizon = expiring_within.and_then(|w| {
                    time::Duration::try_from(w)
                        .ok()
                        .and_then(|w| now.checked_add(w))
                });
                let expiry_ok = expiring_within.is_none()
                    || (r.status(now) == Status::Active
                        && horizon.is_none_or(|h| r.not_after <= h));
                kind_ok && status_ok && expiry_ok
            });
            if *json {
                let rows: Vec<_> = records.iter().map(|r| record_json(r, now, false)).collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print_table(&records, now);
            }
        }
        Command::Show { target, json } => {
            let pki = open(cli)?;
            let now = twofold_provisioning::registry::now();
            let records = match revoke_target(target)? {
                RevokeTarget::Principal(p) => pki.history(&p)?,
                RevokeTarget::Serial(s) => {
                    let found = pki.store().find(&Filter {
                        serial: Some(s.clone()),
                        ..Filter::default()
                    })?;
                    if found.is_empty() {
                        return Err(Error::UnknownSerial {
                            serial: s.to_string(),
                        }
                        .into());
                    }
                    found
                }
            };
            if *json {
                let rows: Vec<_> = records.iter().map(|r| record_json(r, now, true)).collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for (i, r) in records.iter().enumerate() {
                    if i > 0 {
                        println!();
                    }
                    print_record_detail(r, now);
                }
            }
        }
        Command::Crl { out, der, server } => {
            let scope = if *server {
                Scope::Server
            } else {
                Scope::Device
            };
            let mut pki = open(cli)?;
            let crl = pki.refresh_crl(scope)?;
            if *der {
                atomic::write(out, crl.der(), atomic::PUBLIC, Durability::Sync)?;
            } else {
                atomic::write(out, crl.pem()?.as_bytes(), atomic::PUBLIC, Durability::Sync)?;
            }
            println!(
                "wrote a fresh CRL to {} (and {})",
                out.display(),
                pki.dir().join(scope.file()).display()
            );
        }
        Command::EstToken { id, days } => {
            let id = device_id(id)?;
            let mut pki = open(cli)?;
            let token = pki.create_enrollment_token(
                &id,
                time::Duration::days(i64::from(*days)),
                time::OffsetDateTime::now_utc(),
            )?;
            println!("{token}");
            eprintln!(
                "one-time EST enrollment token for {id}, valid {days} day(s): use it as the \
                 password, with user {id}, at /.well-known/est/simpleenroll",
                id = id.as_str()
            );
        }
        Command::Serve {
            listen,
            cert,
            key,
            registration_authorities,
            lifetime,
            grace,
            rate_limit,
            rate_window,
            allow_early,
            expired_grace,
            est_bootstrap_cas,
            server_lifetime,
        } => {
            let pki = open(cli)?;
            let trust_domain = *pki.trust_domain();
            let registration_authorities = registration_authorities
                .iter()
                .map(|name| {
                    Ok(twofold_protocol::Identity::service(
                        trust_domain,
                        service_name(name)?,
                    ))
                })
                .collect::<Result<Vec<_>, Error>>()?;
            let lifetime = time::Duration::try_from(*lifetime)?;
            if lifetime < twofold_provisioning::renewal::MIN_LIFETIME {
                bail!("--lifetime must be at least 60 s");
            }
            let config = twofold_provisioning::service::Config {
                listen: *listen,
                cert: cert.clone(),
                key: key.clone(),
                registration_authorities,
                renew: twofold_provisioning::renewal::RenewOptions {
                    lifetime,
                    enforce_due: !allow_early,
                    expired_grace: time::Duration::try_from(expired_grace.unwrap_or_default())?,
                },
                grace: time::Duration::try_from(*grace)?,
                rate_limit: (*rate_limit).max(1),
                rate_window: *rate_window,
                bootstrap_cas: pem_certs("--est-bootstrap-ca", est_bootstrap_cas)?,
                server_lifetime: time::Duration::try_from(*server_lifetime)?
                    .max(twofold_provisioning::renewal::MIN_LIFETIME),
            };
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(twofold_provisioning::service::run(pki, config, async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("a SIGTERM handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }))?;
        }
        Command::Audit(_) | Command::Policy { .. } => unreachable!("handled in main"),
        Command::Groups { action } => policy_command::groups(open(cli), action)?,
    }
    Ok(())
}

fn revoke_target(t: &Target) -> anyhow::Result<RevokeTarget> {
    Ok(match (&t.id, &t.service, &t.serial) {
        (Some(id), None, None) => RevokeTarget::Principal(Principal::Device(device_id(id)?)),
        (None, Some(name), None) => {
            RevokeTarget::Principal(Principal::Service(service_name(name)?))
        }
        (None, None, Some(serial)) => RevokeTarget::Serial(serial.parse::<Serial>()?),
        _ => bail!("give exactly one of a device ID, --service NAME or --serial SERIAL"),
    })
}

fn bulk_enroll(
    cli: &Cli,
    count: u64,
    prefix: &str,
    start: u64,
    out: &Path,
    options: EnrollOptions,
) -> anyhow::Result<()> {
    let ids = batch_ids(prefix, start, count)?;
    let bundle = [files::DEVICE_KEY, files::DEVICE_CHAIN, files::SERVER_CA];
    let out_dir = NewDir::create(out)?;
    for id in &ids {
        let dir = out.join(id.as_str());
        if dir.exists() {
            let hint = "choose another --out, or pass --replace to re-enroll";
            prepare_out(&dir, &bundle, options.replace.then_some(id.as_str()), hint)?.keep();
        }
    }
    let mut pki = open(cli)?;
    let started = Instant::now();
    let bar = indicatif::ProgressBar::new(count);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:8} [{bar:40}] {pos}/{len} {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("signing");
    let requests = ids
        .iter()
        .map(|id| EnrollRequest {
            principal: Principal::Device(*id),
            key: KeySource::Generate,
        })
        .collect();
    let issued = pki.enroll(requests, options, &mut |n| bar.set_position(n as u64))?;
    out_dir.keep();
    let signed = started.elapsed();
    bar.set_message("writing");
    bar.set_position(0);
    let server_ca = pki.server_ca_pem()?;
    let server_crl = pki.server_crl_pem()?;
    for (i, e) in issued.iter().enumerate() {
        let written = output::write_device(
            &out.join(&e.record.name),
            e,
            &server_ca,
            server_crl.as_deref(),
            Durability::Deferred,
        );
        if let Err(err) = written {
            bail!(
                "all {} certificates were recorded, but writing the bundle of {} failed ({err}); \
                 {} bundles are missing. Fix the cause and re-run the same command with --replace",
                issued.len(),
                e.record.name,
                issued.len() - i
            );
        }
        bar.set_position(i as u64 + 1);
    }
    // One filesystem sync for the whole batch instead of one per file.
    let dir = std::fs::File::open(out).with_context(|| format!("opening {}", out.display()))?;
    rustix::fs::syncfs(&dir).with_context(|| format!("syncing {}", out.display()))?;
    bar.finish_and_clear();
    let total = started.elapsed();
    println!(
        "enrolled {} devices {}..{} in {:.2}s ({:.2}s signing and recording, {:.2}s writing files)",
        issued.len(),
        ids.first().map(|i| i.as_str()).unwrap_or_default(),
        ids.last().map(|i| i.as_str()).unwrap_or_default(),
        total.as_secs_f64(),
        signed.as_secs_f64(),
        (total - signed).as_secs_f64(),
    );
    println!(
        "  bundles      {}/<id>/{{{},{},{}}}",
        out.display(),
        files::DEVICE_KEY,
        files::DEVICE_CHAIN,
        files::SERVER_CA
    );
    let superseded: usize = issued.iter().map(|e| e.superseded.len()).sum();
    if superseded > 0 {
        println!("  superseded   {superseded} earlier certificates (revoked, listed in the CRL)");
    }
    Ok(())
}

/// Refuses to overwrite an existing bundle, which may hold another
/// device's key. With --replace it may be overwritten only when it is the
/// bundle of the same identity. Checked before anything is issued, so a
/// refusal changes nothing. Also creates `dir`, so that an unwritable
/// --out fails now rather than after the certificate is recorded.
fn prepare_out(
    dir: &Path,
    names: &[&str],
    replacing: Option<&str>,
    hint: &str,
) -> anyhow::Result<NewDir> {
    if let Some(path) = names.iter().map(|n| dir.join(n)).find(|p| p.exists()) {
        let owner = bundle_owner(dir);
        match (replacing, owner.as_deref()) {
            (Some(name), Some(owner)) if owner == name => {}
            (Some(name), Some(owner)) => bail!(
                "{} holds the bundle of {owner}, not {name}; choose another --out",
                dir.display()
            ),
            (Some(_), None) => bail!(
                "{} already exists and its owner cannot be read; choose another --out",
                path.display()
            ),
            (None, _) => bail!("{} already exists; {hint}", path.display()),
        }
    }
    NewDir::create(dir)
}

/// An output directory this command created: removed again (if still
/// empty) when the command fails before writing into it.
struct NewDir(Option<PathBuf>);

impl NewDir {
    fn create(dir: &Path) -> anyhow::Result<NewDir> {
        let created = !dir.exists();
        output::create_dir(dir)?;
        Ok(NewDir(created.then(|| dir.to_owned())))
    }

    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for NewDir {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            // remove_dir only removes an empty directory: nothing is lost.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Whose bundle a directory holds: the CN of device.pem, or the device id
/// in bundle.bin.
fn bundle_owner(dir: &Path) -> Option<String> {
    if let Ok(pem_bytes) = std::fs::read(dir.join(files::DEVICE_CHAIN)) {
        let leaf = pem::parse(pem_bytes).ok()?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.contents()).ok()?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()?
            .as_str()
            .ok()?
            .to_owned();
        return Some(cn);
    }
    let bytes = std::fs::read(dir.join(files::NOSTD_BUNDLE)).ok()?;
    twofold_protocol::Bundle::decode(&bytes)
        .ok()
        .map(|b| b.device_id.to_string())
}

/// Explains a failure to write files after the certificate was recorded.
fn written_or_explain(
    result: twofold_provisioning::Result<()>,
    record: &CertRecord,
) -> anyhow::Result<()> {
    result.with_context(|| {
        format!(
            "certificate {} for {} {} was recorded but its files could not be written; \
             fix the cause and re-run with --replace (this revokes {})",
            record.serial, record.kind, record.name, record.serial
        )
    })
}

fn file_list(dir: &Path, names: &[&str]) -> String {
    names
        .iter()
        .map(|n| dir.join(n).display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_record_summary(r: &CertRecord) {
    if let Some(identity) = &r.identity {
        println!("  identity     {identity}");
    }
    println!("  serial       {}", r.serial);
    println!(
        "  valid        {} to {}",
        rfc3339(r.not_before),
        rfc3339(r.not_after)
    );
    println!("  fingerprint  sha256:{}", r.fingerprint);
}

fn status_text(r: &CertRecord, now: time::OffsetDateTime) -> String {
    match (r.status(now), r.revocation) {
        (Status::Revoked, Some(rev)) => format!("revoked ({})", rev.reason.as_str()),
        (Status::Active, _) => "active".into(),
        (Status::Expired, _) => "expired".into(),
        (Status::Revoked, None) => "revoked".into(),
    }
}

fn print_table(records: &[CertRecord], now: time::OffsetDateTime) {
    let name_w = records
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:<9}  {:<name_w$}  {:<32}  {:<30}  NOT AFTER",
        "KIND", "NAME", "SERIAL", "STATUS"
    );
    for r in records {
        println!(
            "{:<9}  {:<name_w$}  {:<32}  {:<30}  {}",
            r.kind.as_str(),
            r.name,
            r.serial.to_string(),
            status_text(r, now),
            rfc3339(r.not_after)
        );
    }
    println!("{} certificates", records.len());
}

fn print_record_detail(r: &CertRecord, now: time::OffsetDateTime) {
    println!("{} {}", r.kind, r.name);
    print_record_summary(r);
    println!("  status       {}", status_text(r, now));
    if let Some(rev) = r.revocation {
        println!("  revoked at   {}", rfc3339(rev.at));
    }
    println!("  issued at    {}", rfc3339(r.issued_at));
}

fn record_json(r: &CertRecord, now: time::OffsetDateTime, with_pem: bool) -> serde_json::Value {
    let mut v = serde_json::json!({
        "serial": r.serial.to_string(),
        "kind": r.kind,
        "name": r.name,
        "identity": r.identity,
        "status": r.status(now),
        "not_before": rfc3339(r.not_before),
        "not_after": rfc3339(r.not_after),
        "fingerprint_sha256": r.fingerprint,
        "issued_at": rfc3339(r.issued_at),
        "revoked_at": r.revocation.map(|x| rfc3339(x.at)),
        "revocation_reason": r.revocation.map(|x| x.reason),
    });
    if with_pem {
        v["certificate_pem"] =
            twofold_provisioning::enrollment::pem_encode("CERTIFICATE", &r.der).into();
    }
    v
}
