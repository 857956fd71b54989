//! `agent`: run the device agent, publish through it, make a key and CSR.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio::sync::watch;
use twofold_agent::config::{self, Config};
use twofold_protocol::{DeviceId, TrustDomain};

#[derive(Parser)]
#[command(name = "agent", version, about = "The Twofold device agent")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connect to the gateway and run until SIGTERM.
    Run {
        #[arg(long, default_value = "/etc/twofold/agent.toml")]
        config: PathBuf,
    },
    /// Check files, certificate, clock, DNS, TCP, TLS and MQTT, one line each,
    /// with a fix for anything wrong. Exits non-zero when a check fails.
    Doctor {
        #[arg(long, default_value = "/etc/twofold/agent.toml")]
        config: PathBuf,
    },
    /// Publish one message under this device's topics through the running agent.
    Publish {
        /// Under devices/<id>/, e.g. app/door.
        #[arg(long)]
        topic: String,
        #[arg(long, conflicts_with = "file", required_unless_present = "file")]
        data: Option<String>,
        #[arg(long)]
        file: Option<PathBuf>,
        #[arg(long, default_value = config::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Make a P-256 key (0600) and a CSR for `provisioning sign-csr`. With
    /// --config naming an [identity.pkcs11] token, the key is made inside
    /// the token (never extractable) and only the CSR is written.
    Keygen {
        /// The directory for device.key and device.csr (only device.csr
        /// with a token).
        #[arg(long)]
        out: PathBuf,
        /// The agent's config: its [identity.pkcs11] says which token.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The device id the CSR asks for.
        #[arg(long)]
        id: String,
        #[arg(long)]
        trust_domain: String,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttc=warn".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if pin_refused(&e) {
                std::process::ExitCode::from(PIN_REFUSED)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}

/// The exit status when the token refused the PIN (or has locked it):
/// the packaged unit does not restart on it (RestartPreventExitStatus),
/// since every start would spend another try towards locking the token.
const PIN_REFUSED: u8 = 78;

fn pin_refused(e: &anyhow::Error) -> bool {
    use twofold_token::TokenError;
    e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<twofold_agent::identity::IdentityError>(),
            Some(twofold_agent::identity::IdentityError::Token(
                TokenError::WrongPin { .. } | TokenError::PinLocked { .. }
            ))
        ) || matches!(
            cause.downcast_ref::<TokenError>(),
            Some(TokenError::WrongPin { .. } | TokenError::PinLocked { .. })
        )
    })
}

async fn command(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Run { config } => {
            let config = Config::load(&config)?;
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
            twofold_agent::run::run(config, stopped).await
        }
        Cmd::Doctor { config } => {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let mut report = twofold_agent::doctor::Report::new(std::io::stdout());
            twofold_agent::doctor::diagnose(&config, now, &mut report).await;
            if report.failed() {
                anyhow::bail!("some checks failed; see the fixes above");
            }
            Ok(())
        }
        Cmd::Publish {
            topic,
            data,
            file,
            socket,
        } => {
            let payload = match (data, file) {
                (Some(d), _) => d.into_bytes(),
                (None, Some(f)) => {
                    std::fs::read(&f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?
                }
                (None, None) => unreachable!("clap requires one"),
            };
            let seq = twofold_agent::api::publish(&socket, &topic, &payload).await?;
            println!("queued as {seq}");
            Ok(())
        }
        Cmd::Keygen {
            out,
            config,
            id,
            trust_domain,
        } => {
            let id = DeviceId::parse(&id).map_err(|e| anyhow::anyhow!("--id: {e}"))?;
            let td = TrustDomain::parse(&trust_domain)
                .map_err(|e| anyhow::anyhow!("--trust-domain: {e}"))?;
            let token = match config {
                None => None,
                Some(path) => match Config::load(&path)?.identity.key {
                    config::KeyStore::Token { spec, label } => Some((spec, label)),
                    config::KeyStore::File(_) => anyhow::bail!(
                        "{}: the key is a file there, not in a token ([identity.pkcs11]); run without --config to make a key file",
                        path.display()
                    ),
                },
            };
            let csr = match token {
                Some((spec, label)) => {
                    let (key_id, csr) =
                        twofold_agent::keygen::keygen_in_token(&spec, &label, &out, &id, &td)?;
                    println!(
                        "key: \"{label}\" (id {}) in token \"{}\", sensitive and never extractable\ncsr: {}",
                        hex::encode(key_id),
                        spec.token,
                        csr.display()
                    );
                    csr
                }
                None => {
                    let (key, csr) = twofold_agent::keygen::keygen(&out, &id, &td)?;
                    println!("key: {}\ncsr: {}", key.display(), csr.display());
                    csr
                }
            };
            println!(
                "next, on the operator's machine: provisioning sign-csr {} --out device.pem; copy device.pem and the PKI's server-ca.pem where [identity] points",
                csr.display()
            );
            Ok(())
        }
    }
}
