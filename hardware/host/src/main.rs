//! `mcu-host`: the microcontroller agent on a PC. The same library as the
//! firmware, wired to a TCP socket (tokio), the operating system's random
//! numbers, its clock and a bundle file instead of a flash partition.
//!
//! ```text
//! mcu-host --bundle bundle.bin [--telemetry N --commands M] [--interval-ms MS] [--qos0]
//!          [--slots FILE [--renewals R]]
//! ```
//!
//! With `--slots`, the device renews its certificate and keeps renewed
//! chains in FILE, two 4 KiB slots that behave as NOR flash (see
//! [`FileSlots`]); it survives a restart the way the firmware's partition
//! does.
//!
//! Exits 0 after a clean stop, or with the failure's code (see
//! `twofold_agent_nostd::Error::exit_code`) when it gives up.

use std::fmt::Display;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;
use embedded_io_adapters::tokio_1::FromTokio;
use twofold_agent_nostd::basic::{BasicApp, Limits};
use twofold_agent_nostd::{
    Agent, Buffers, ChainSlots, Clock, Connect, MCU_MQTT_RX, MCU_MQTT_TX, Settings, SlotError,
    TelemetryQos, Timer,
};
use twofold_protocol::Bundle;

#[derive(Parser)]
#[command(about = "Run the microcontroller agent over TCP on this machine")]
struct Args {
    /// The bundle from `provisioning enroll ID --format nostd`.
    #[arg(long)]
    bundle: std::path::PathBuf,
    /// Stop once this many telemetry messages are acknowledged (and
    /// --commands answered); without it, run until killed.
    #[arg(long)]
    telemetry: Option<u64>,
    /// Commands to answer before stopping (with --telemetry).
    #[arg(long, default_value_t = 0)]
    commands: u32,
    /// Renewed certificates to commit before stopping (with --telemetry).
    #[arg(long, default_value_t = 0)]
    renewals: u32,
    /// Renew the certificate, keeping renewed chains in this file.
    #[arg(long)]
    slots: Option<std::path::PathBuf>,
    /// Give up after this many failed sessions in a row.
    #[arg(long)]
    attempts: Option<u32>,
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Telemetry with QoS 0 (sent once, never acknowledged) instead of 1.
    #[arg(long)]
    qos0: bool,
    #[arg(long, default_value_t = 60)]
    keepalive_secs: u16,
    /// TLS receive buffer: at least the gateway's max_tls_record.
    #[arg(long, default_value_t = 16_640)]
    tls_rx: usize,
    /// Wall-clock offset in seconds (negative: a clock that is behind).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    clock_offset: i64,
}

#[derive(Clone, Copy)]
struct TokioTimer(Instant);

impl Timer for TokioTimer {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    async fn wait_until(&self, deadline: u64) {
        tokio::time::sleep_until((self.0 + Duration::from_millis(deadline)).into()).await;
    }
}

struct SystemClock(i64);

impl Clock for SystemClock {
    fn now(&mut self) -> Option<u64> {
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
        u64::try_from(i64::try_from(secs).ok()? + self.0).ok()
    }
}

struct Tcp;

impl Connect for Tcp {
    type Io = FromTokio<tokio::net::TcpStream>;
    type Error = std::io::Error;

    async fn connect(&mut self, host: &str, port: u16) -> Result<Self::Io, Self::Error> {
        let stream = tokio::net::TcpStream::connect((host, port)).await?;
        stream.set_nodelay(true)?;
        Ok(FromTokio::new(stream))
    }
}

/// Bytes per chain slot: a leaf and a CA certificate with room to spare.
const SLOT: usize = 4096;

/// Two chain slots in a file, programmed as NOR flash is: an erase sets
/// every byte to 0xFF, programming can only clear bits. Every change is
/// written through to the file before it returns.
struct FileSlots {
    path: std::path::PathBuf,
    bytes: Vec<u8>,
}

impl FileSlots {
    fn open(path: &std::path::Path) -> anyhow::Result<Self> {
        let bytes = match std::fs::read(path) {
            Ok(b) if b.len() == 2 * SLOT => b,
            Ok(b) => bail!(
                "{}: {} bytes, not two {SLOT}-byte slots",
                path.display(),
                b.len()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![0xff; 2 * SLOT],
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        Ok(FileSlots {
            path: path.to_owned(),
            bytes,
        })
    }

    fn save(&self) -> Result<(), SlotError> {
        use std::io::Write;
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(|_| SlotError)?;
        f.write_all(&self.bytes).map_err(|_| SlotError)?;
        f.sync_all().map_err(|_| SlotError)?;
        std::fs::rename(&tmp, &self.path).map_err(|_| SlotError)
    }
}

impl ChainSlots for FileSlots {
    fn slot(&self, i: usize) -> &[u8] {
        self.bytes.get(i * SLOT..(i + 1) * SLOT).unwrap_or_default()
    }

    fn erase(&mut self, i: usize) -> Result<(), SlotError> {
        self.bytes
            .get_mut(i * SLOT..(i + 1) * SLOT)
            .ok_or(SlotError)?
            .fill(0xff);
        self.save()
    }

    fn program(&mut self, i: usize, offset: usize, data: &[u8]) -> Result<(), SlotError> {
        if i > 1 || offset + data.len() > SLOT {
            return Err(SlotError);
        }
        let at = i * SLOT + offset;
        for (b, d) in self.bytes[at..at + data.len()].iter_mut().zip(data) {
            *b &= d;
        }
        self.save()
    }
}

fn unix_ms() -> Option<u64> {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    u64::try_from(d.as_millis()).ok()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let data = std::fs::read(&args.bundle)
        .with_context(|| format!("cannot read {}", args.bundle.display()))?;
    let bundle = match Bundle::decode(&data) {
        Ok(b) => b,
        Err(e) => bail!("{}: {e}", args.bundle.display()),
    };
    let mut key = p256::ecdsa::SigningKey::from_slice(bundle.private_key)
        .map_err(|_| anyhow::anyhow!("the bundle's private key is not a P-256 scalar"))?;
    let timer = TokioTimer(Instant::now());
    let limits = Limits {
        telemetry: args.telemetry,
        commands: args.commands,
        renewals: args.renewals,
        failures: args.attempts,
    };
    let log = |e: &dyn Display| eprintln!("twofold: {e}");
    let app = BasicApp::new(timer, limits, log).with_time(unix_ms);
    let settings = Settings {
        keepalive_secs: args.keepalive_secs,
        telemetry_ms: args.interval_ms,
        telemetry_qos: if args.qos0 {
            TelemetryQos::AtMostOnce
        } else {
            TelemetryQos::AtLeastOnce
        },
        backoff_min_ms: 200,
        backoff_max_ms: 5_000,
        ..Settings::default()
    };
    let slots = match &args.slots {
        Some(path) => Some(FileSlots::open(path)?),
        None => None,
    };
    let mut agent = Agent::new(&bundle, settings, app, timer).with_slots(slots);
    if args.slots.is_some() {
        let chains = agent.chains();
        let staged = if chains.staged() {
            ", a renewed one staged"
        } else {
            ""
        };
        eprintln!(
            "twofold: certificate generation {} committed{staged}",
            chains.generation()
        );
    }
    let mut tls_rx = vec![0u8; args.tls_rx];
    let mut tls_tx = [0u8; 1024];
    let mut mqtt_rx = [0u8; MCU_MQTT_RX];
    let mut mqtt_tx = [0u8; MCU_MQTT_TX];
    let mut bufs = Buffers {
        tls_rx: &mut tls_rx,
        tls_tx: &mut tls_tx,
        mqtt_rx: &mut mqtt_rx,
        mqtt_tx: &mut mqtt_tx,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(agent.run(
        &mut Tcp,
        &mut rand_core::OsRng,
        &mut key,
        &mut SystemClock(args.clock_offset),
        &mut bufs,
    ));
    match result {
        Ok(stats) => {
            eprintln!("twofold: stopped after {stats:?}");
            Ok(())
        }
        Err(e) => {
            eprintln!("twofold: giving up: {e}");
            std::process::exit(e.exit_code().into());
        }
    }
}
