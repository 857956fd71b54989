//! The device's life on the network: connect, TLS, MQTT, telemetry,
//! commands, keepalive, and reconnecting with jittered exponential backoff.
//!
//! [`Agent::run`] loops over sessions until the [`App`] says stop. One
//! session is: the link from the [`Connect`]or, the TLS 1.3 handshake with
//! the [`StrictVerifier`], MQTT 3.1.1 CONNECT (clean session, the device id
//! as client id), SUBSCRIBE to `devices/<id>/commands`, then telemetry
//! every [`Settings::telemetry_ms`] as QoS 1 PUBLISH on
//! `devices/<id>/telemetry`, each command answered on `devices/<id>/replies`,
//! and a PINGREQ whenever the device has been quiet for three quarters of
//! the keepalive. Every wait has a deadline.
//!
//! # What is not lost
//!
//! One telemetry message is in flight at a time. Until its PUBACK arrives
//! it stays in the agent (not in the session), and the next session sends
//! it again, with the same sequence number, before any new one: a gap in
//! sequence numbers at the subscriber means a device reset, never a lost
//! connection. A command is acknowledged after its reply has been written.
//!
//! # KeyUpdate
//!
//! embedded-tls 0.19 panics on a post-handshake KeyUpdate. rustls (the
//! gateway) sends one by itself only when its record counter reaches the
//! AES-GCM confidentiality limit of 2^24 records. Every TLS 1.3 record is
//! at least [`MIN_RECORD`] bytes, so the session ends cleanly and a new
//! handshake starts once the bytes received (or sent) could amount to
//! [`RECORD_LIMIT`] records, half the limit.

use core::fmt;
use core::future::Future;

use embassy_futures::select::{Either, select};
use embedded_io::{Error as _, ErrorKind};
use embedded_io_async::{Read, Write};
use embedded_tls::{
    Aes128GcmSha256, TlsConfig, TlsConnection, TlsContext, TlsError, alert::AlertDescription,
};
use mqttrs::{ConnectReturnCode, Pid};
use rand_core::{CryptoRng, RngCore};
use twofold_protocol::message::{self, Command, MAX_READINGS, Reading, Reply, ReplyStatus};
use twofold_protocol::topic::{CERT_ANSWER, CERT_STATUS};
use twofold_protocol::{Bundle, Channel, Topic};

use crate::link::Link;
use crate::mqtt::{self, Inbound, MqttError, Outbound};
use crate::provider::{DeviceKey, DeviceProvider};
use crate::renew::{ChainSlots, Chains, NoSlots, RenewEvent, Renewal};
use crate::verify::{Clock, Refusal, StrictVerifier, is_ip_address};

/// The smallest TLS 1.3 record: header, one byte, content type, tag.
pub const MIN_RECORD: u64 = 5 + 1 + 1 + 16;
/// Records per connection before the session ends for a fresh handshake.
pub const RECORD_LIMIT: u64 = 1 << 23;
/// The largest encoded telemetry message.
pub const TELEMETRY_MAX: usize = 256;
/// The most command output sent back in a reply.
pub const OUTPUT_MAX: usize = 96;

/// A monotonic millisecond clock with a wait. Board support provides it
/// (SysTick, an RTOS timer, tokio on the host).
pub trait Timer {
    /// Milliseconds since an arbitrary fixed point, never going back.
    fn now_ms(&self) -> u64;
    /// Completes once `now_ms() >= deadline`.
    fn wait_until(&self, deadline: u64) -> impl Future<Output = ()>;
}

/// Makes the byte link to the gateway: a TCP connection through a network
/// stack, or a modem's transparent-mode connection.
pub trait Connect {
    type Io: Read + Write;
    type Error: embedded_io::Error;
    fn connect(
        &mut self,
        host: &str,
        port: u16,
    ) -> impl Future<Output = Result<Self::Io, Self::Error>>;
}

/// What the device does with the connection: its readings, its commands,
/// its log.
pub trait App {
    /// Fills the readings of the next telemetry message.
    fn sample(&mut self, readings: &mut heapless::Vec<Reading<'static>, MAX_READINGS>);
    /// Runs a command: writes what it printed into `output` and returns
    /// how it ended and how many bytes of `output` it used.
    fn command(&mut self, command: &Command<'_>, output: &mut [u8]) -> (ReplyStatus, usize);
    /// Something the device log should show.
    fn event(&mut self, event: Event<'_>);
    /// Asked after every acknowledged telemetry message and every command:
    /// false ends the session with a clean DISCONNECT and [`Agent::run`].
    fn keep_going(&mut self, stats: &Stats) -> bool;
    /// Asked after a session failed: false makes [`Agent::run`] return the
    /// error instead of retrying after the backoff.
    fn retry(&mut self, error: &Error, stats: &Stats) -> bool {
        let _ = (error, stats);
        true
    }
    /// Unix time in milliseconds, when the device knows it.
    fn time_ms(&mut self) -> Option<u64> {
        None
    }
}

/// Timing of a session.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// MQTT keepalive; a PINGREQ goes out after 3/4 of it without sending.
    pub keepalive_secs: u16,
    /// Time between telemetry messages.
    pub telemetry_ms: u64,
    /// QoS 1 (the default): each message is kept until the gateway
    /// acknowledges it and resent after a reconnect. QoS 0: sent once,
    /// lost if the link drops, for readings that are worthless late.
    pub telemetry_qos: TelemetryQos,
    /// The longest wait for the TLS handshake.
    pub handshake_ms: u64,
    /// The longest wait for CONNACK, SUBACK, PUBACK, PINGRESP, or the rest
    /// of a packet that has begun to arrive.
    pub response_ms: u64,
    /// Reconnect backoff: the first delay and the largest.
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            keepalive_secs: 60,
            telemetry_ms: 10_000,
            telemetry_qos: TelemetryQos::AtLeastOnce,
            handshake_ms: 20_000,
            response_ms: 10_000,
            backoff_min_ms: 1_000,
            backoff_max_ms: 300_000,
        }
    }
}

/// The MQTT QoS of telemetry (commands are always answered with QoS 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TelemetryQos {
    AtMostOnce,
    AtLeastOnce,
}

/// Counters kept across sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Sessions that reached CONNACK.
    pub sessions: u32,
    /// Sessions that failed.
    pub failures: u32,
    /// Telemetry messages the gateway acknowledged (QoS 1).
    pub telemetry_acked: u64,
    /// Telemetry messages sent with QoS 0 (never acknowledged).
    pub telemetry_qos0: u64,
    /// Commands answered.
    pub commands: u32,
    /// Renewed certificates committed.
    pub renewals: u32,
}

/// What a wait with a deadline was waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    Handshake,
    Connack,
    Suback,
    Puback,
    Pingresp,
    /// The rest of a packet that had begun to arrive.
    Packet,
}

/// Why a session ended badly.
#[derive(Debug, Clone, Copy)]
pub enum Error {
    /// The link could not be made.
    Connect(ErrorKind),
    /// The link failed.
    Io(ErrorKind),
    /// The gateway closed the connection.
    Closed,
    /// This device refused the server's certificate: which check failed.
    ServerRefused(Refusal),
    /// The gateway refused this device's certificate: after its own
    /// certificate had passed every check, it ended the connection (a TLS
    /// alert, then close) during our last handshake flight or before
    /// CONNACK. The usual causes are a revoked or expired certificate or
    /// one from a CA the gateway does not trust; the gateway's log has the
    /// precise reason (embedded-tls does not pass the alert's code on).
    CertificateRefused,
    /// The gateway aborted the handshake with this TLS alert.
    HandshakeAlert(AlertDescription),
    /// The gateway sent a TLS alert after the session was up.
    Alert,
    /// Any other TLS failure.
    Tls(TlsError),
    /// The gateway sent something that is not acceptable MQTT.
    Mqtt(MqttError),
    /// The gateway sent a packet that makes no sense at this point.
    Unexpected(&'static str),
    /// The gateway refused the CONNECT.
    ConnectRefused(ConnectReturnCode),
    /// The gateway refused the subscription to the commands topic.
    SubscribeRefused,
    /// Nothing came in time.
    Timeout(Waiting),
    /// The telemetry the app produced does not encode into
    /// [`TELEMETRY_MAX`] bytes.
    TelemetryTooLarge,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Written out rather than `{:?}`: Debug formatting of these enums
        // costs flash the firmware does not have.
        match self {
            Error::Connect(k) => write!(f, "cannot connect to the gateway: {}", io_kind(*k)),
            Error::Io(k) => write!(f, "link failed: {}", io_kind(*k)),
            Error::Closed => f.write_str("the gateway closed the connection"),
            Error::ServerRefused(r) => write!(f, "server certificate refused: {r}"),
            Error::CertificateRefused => f.write_str(
                "the gateway refused our certificate (TLS alert after the handshake): \
                 revoked, expired or not from its device CA; see the gateway's log",
            ),
            Error::HandshakeAlert(a) => {
                write!(
                    f,
                    "the gateway aborted the handshake: TLS alert {}",
                    alert(*a)
                )
            }
            Error::Alert => f.write_str("the gateway ended the session with a TLS alert"),
            Error::Tls(e) => write!(f, "TLS error: {}", tls_error_text(e)),
            Error::Mqtt(e) => write!(f, "MQTT error: {e}"),
            Error::Unexpected(what) => write!(f, "unexpected {what} from the gateway"),
            Error::ConnectRefused(c) => write!(f, "the gateway refused CONNECT: {}", connack(*c)),
            Error::SubscribeRefused => f.write_str("the gateway refused the commands subscription"),
            Error::Timeout(w) => write!(f, "timed out waiting for {}", w.as_str()),
            Error::TelemetryTooLarge => {
                write!(f, "telemetry does not fit in {TELEMETRY_MAX} bytes")
            }
        }
    }
}

impl Waiting {
    pub fn as_str(self) -> &'static str {
        match self {
            Waiting::Handshake => "the TLS handshake",
            Waiting::Connack => "CONNACK",
            Waiting::Suback => "SUBACK",
            Waiting::Puback => "PUBACK",
            Waiting::Pingresp => "PINGRESP",
            Waiting::Packet => "the rest of a packet",
        }
    }
}

fn io_kind(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ConnectionRefused => "connection refused",
        ErrorKind::ConnectionReset => "connection reset",
        ErrorKind::ConnectionAborted => "connection aborted",
        ErrorKind::NotConnected => "not connected",
        ErrorKind::BrokenPipe => "broken pipe",
        ErrorKind::TimedOut => "timed out",
        ErrorKind::AddrNotAvailable => "address not available",
        _ => "I/O error",
    }
}

/// An alert's RFC 8446 name and number, e.g. `certificate_required (116)`.
struct AlertName(u8);

fn alert(a: AlertDescription) -> AlertName {
    AlertName(a as u8)
}

impl fmt::Display for AlertName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            0 => "close_notify",
            10 => "unexpected_message",
            20 => "bad_record_mac",
            22 => "record_overflow",
            40 => "handshake_failure",
            42 => "bad_certificate",
            43 => "unsupported_certificate",
            44 => "certificate_revoked",
            45 => "certificate_expired",
            46 => "certificate_unknown",
            47 => "illegal_parameter",
            48 => "unknown_ca",
            49 => "access_denied",
            50 => "decode_error",
            51 => "decrypt_error",
            70 => "protocol_version",
            71 => "insufficient_security",
            80 => "internal_error",
            109 => "missing_extension",
            116 => "certificate_required",
            _ => "alert",
        };
        write!(f, "{name} ({})", self.0)
    }
}

fn tls_error_text(e: &TlsError) -> &'static str {
    // Grouped: each distinct text is flash, and these say which side of
    // the handshake to look at, which is what a device log can act on.
    match e {
        TlsError::ConnectionClosed => "connection closed",
        TlsError::Unimplemented => "unimplemented TLS feature",
        TlsError::HandshakeAborted(..) | TlsError::AbortHandshake(..) => "handshake aborted",
        TlsError::IoError | TlsError::Io(_) => "I/O",
        TlsError::InsufficientSpace => "record larger than the receive buffer",
        TlsError::InvalidCipherSuite
        | TlsError::InvalidSignatureScheme
        | TlsError::InvalidKeyShare => "the server chose what we did not offer",
        TlsError::InvalidSignature | TlsError::CryptoError => "cryptographic failure",
        TlsError::InvalidCertificate
        | TlsError::InvalidCertificateEntry
        | TlsError::InvalidCertificateRequest => "invalid certificate or request",
        TlsError::InvalidPrivateKey => "invalid private key",
        TlsError::EncodeError | TlsError::OutOfMemory => "message does not fit the buffer",
        _ => "malformed TLS message",
    }
}

fn connack(code: ConnectReturnCode) -> &'static str {
    match code {
        ConnectReturnCode::Accepted => "accepted",
        ConnectReturnCode::RefusedProtocolVersion => "protocol version refused",
        ConnectReturnCode::RefusedIdentifierRejected => "client id rejected",
        ConnectReturnCode::ServerUnavailable => "server unavailable",
        ConnectReturnCode::BadUsernamePassword => "bad user name or password",
        ConnectReturnCode::NotAuthorized => "not authorized",
    }
}

impl From<MqttError> for Error {
    fn from(e: MqttError) -> Self {
        Error::Mqtt(e)
    }
}

/// A line for the device log.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    Connecting {
        host: &'a str,
        port: u16,
    },
    /// The handshake passed every check of the strict verifier.
    TlsUp,
    Connected,
    Subscribed,
    TelemetrySent {
        seq: u64,
        resent: bool,
    },
    TelemetryAcked {
        seq: u64,
    },
    Command {
        id: u32,
        name: &'a str,
        status: ReplyStatus,
    },
    /// A payload on the commands topic that is not a command; acknowledged
    /// and dropped.
    BadCommand,
    /// The session ended before the TLS record limit (see the module docs).
    Rekey,
    /// Certificate renewal (see [`crate::renew`]).
    Renewal(RenewEvent<'a>),
    Failed(&'a Error),
    Backoff {
        ms: u64,
    },
    Disconnected,
}

impl fmt::Display for Event<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Connecting { host, port } => write!(f, "connecting to {host}:{port}"),
            Event::TlsUp => f.write_str("TLS up, gateway certificate verified"),
            Event::Connected => f.write_str("MQTT connected"),
            Event::Subscribed => f.write_str("subscribed to commands"),
            Event::TelemetrySent { seq, resent } => {
                let again = if *resent { " (again)" } else { "" };
                write!(f, "telemetry seq {seq} sent{again}")
            }
            Event::TelemetryAcked { seq } => write!(f, "telemetry seq {seq} acknowledged"),
            Event::Command { id, name, status } => {
                let status = match status {
                    ReplyStatus::Ok => "ok",
                    ReplyStatus::Failed => "failed",
                    ReplyStatus::UnknownCommand => "unknown command",
                    ReplyStatus::Refused => "refused",
                    ReplyStatus::TimedOut => "timed out",
                };
                write!(f, "command {id} {name}: {status}")
            }
            Event::BadCommand => f.write_str("dropped a payload that is not a command"),
            Event::Rekey => f.write_str("reconnecting before the TLS record limit"),
            Event::Renewal(e) => e.fmt(f),
            Event::Failed(e) => write!(f, "session failed: {e}"),
            Event::Backoff { ms } => write!(f, "retrying in {ms} ms"),
            Event::Disconnected => f.write_str("disconnected"),
        }
    }
}

/// The reconnect schedule, the same as the Linux agent's: `protocol`'s.
pub use twofold_protocol::Backoff;

/// [`Buffers::tls_rx`] for the gateway's MCU profile, which sends TLS
/// records of at most `max_tls_record = 2048` bytes and its Certificate
/// message in one of them.
pub const MCU_TLS_RX: usize = 2048;
/// [`Buffers::tls_tx`]: the largest packet this agent sends, plus 128.
pub const MCU_TLS_TX: usize = 1024;
/// [`Buffers::mqtt_rx`]: a renewed chain (a leaf and its CA, about
/// 1,100 bytes of DER, in one PUBLISH), and commands up to about 1,400
/// bytes of body.
pub const MCU_MQTT_RX: usize = 1536;
/// [`Buffers::mqtt_tx`]: telemetry and command replies.
pub const MCU_MQTT_TX: usize = 512;

/// The buffers of one session, usually statics.
pub struct Buffers<'b> {
    /// TLS records from the gateway: at least the gateway's
    /// `max_tls_record` (the whole record, header included), and large
    /// enough for its Certificate message in one record.
    pub tls_rx: &'b mut [u8],
    /// TLS records to the gateway: the largest packet sent plus 128.
    pub tls_tx: &'b mut [u8],
    /// MQTT packets from the gateway: the largest command plus its topic.
    pub mqtt_rx: &'b mut [u8],
    /// MQTT packets to the gateway.
    pub mqtt_tx: &'b mut [u8],
}

/// How a session ended without an error.
enum End {
    Stopped,
    Rekey,
    /// A renewed chain is staged: reconnect with it.
    Renewed,
}

/// The agent: its identity from the bundle, its app, its timer, and what
/// outlives a session.
pub struct Agent<'a, A, T, S = NoSlots> {
    bundle: &'a Bundle<'a>,
    slots: S,
    renewal: Renewal,
    settings: Settings,
    app: A,
    timer: T,
    stats: Stats,
    next_seq: u64,
    /// Telemetry sent but not acknowledged: sequence number, payload.
    unacked: Option<(u64, heapless::Vec<u8, TELEMETRY_MAX>)>,
}

/// A received packet, by what the exchange does with it.
enum Incoming {
    Puback(Pid),
    Pingresp,
    Suback {
        pid: Pid,
        granted: bool,
    },
    /// A PUBLISH on a certificate topic (no PUBACK: QoS 0).
    Cert,
    /// A PUBLISH, with its packet id when it wants a PUBACK.
    Publish(Option<Pid>),
}

/// One published QoS 1 message waiting for its PUBACK.
#[derive(Clone, Copy)]
struct InFlight {
    pid: Pid,
    deadline: u64,
    /// The telemetry sequence number, or `None` for a reply.
    seq: Option<u64>,
}

impl<'a, A: App, T: Timer> Agent<'a, A, T> {
    /// An agent that keeps the bundle's certificate (no renewal).
    pub fn new(bundle: &'a Bundle<'a>, settings: Settings, app: A, timer: T) -> Self {
        Agent {
            bundle,
            slots: NoSlots,
            renewal: Renewal::new(Chains::default(), 0),
            settings,
            app,
            timer,
            stats: Stats::default(),
            next_seq: 0,
            unacked: None,
        }
    }

    /// Renews the certificate through the gateway, keeping renewed
    /// chains in `slots` (see [`crate::renew`]).
    pub fn with_slots<S: ChainSlots>(self, slots: S) -> Agent<'a, A, T, S> {
        Agent {
            bundle: self.bundle,
            renewal: Renewal::new(Chains::scan(&slots), 0),
            slots,
            settings: self.settings,
            app: self.app,
            timer: self.timer,
            stats: self.stats,
            next_seq: self.next_seq,
            unacked: self.unacked,
        }
    }
}

impl<'a, A: App, T: Timer, S: ChainSlots> Agent<'a, A, T, S> {
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The chains the device holds: which generation is committed, and
    /// whether one is staged.
    pub fn chains(&self) -> Chains {
        self.renewal.chains
    }

    pub fn app(&mut self) -> &mut A {
        &mut self.app
    }

    /// Sessions until the app stops: `Ok` after a clean stop, `Err` with
    /// the last error when [`App::retry`] says not to go on.
    pub async fn run<N, R, K, C>(
        &mut self,
        net: &mut N,
        rng: &mut R,
        key: &mut K,
        clock: &mut C,
        bufs: &mut Buffers<'_>,
    ) -> Result<Stats, Error>
    where
        N: Connect,
        R: RngCore + CryptoRng,
        K: DeviceKey,
        C: Clock,
    {
        let mut backoff = Backoff::new(self.settings.backoff_min_ms, self.settings.backoff_max_ms);
        // Request ids differ from boot to boot (see `Renewal`).
        self.renewal.nonce = rng.next_u32();
        loop {
            let (host, port) = (self.bundle.gateway_host, self.bundle.gateway_port);
            self.app.event(Event::Connecting { host, port });
            let before = self.stats.sessions;
            let result = match net.connect(host, port).await {
                Ok(io) => {
                    let link = Link::new(io);
                    self.session(&link, rng, key, clock, bufs).await
                }
                Err(e) => Err(Error::Connect(e.kind())),
            };
            if self.stats.sessions > before {
                backoff.reset();
            }
            match result {
                Ok(End::Stopped) => return Ok(self.stats),
                Ok(End::Rekey) => self.app.event(Event::Rekey),
                Ok(End::Renewed) => {}
                Err(e) => {
                    self.stats.failures += 1;
                    self.app.event(Event::Failed(&e));
                    // Refused with the staged certificate: back to the last.
                    if self.slots.enabled()
                        && matches!(e, Error::CertificateRefused | Error::HandshakeAlert(_))
                        && let Some(done) = self.renewal.roll_back(&mut self.slots)
                    {
                        self.app.event(Event::Renewal(done));
                    }
                    if !self.app.retry(&e, &self.stats) {
                        return Err(e);
                    }
                    let ms = backoff.next_ms(rng.next_u64());
                    self.app.event(Event::Backoff { ms });
                    self.timer.wait_until(self.timer.now_ms() + ms).await;
                }
            }
        }
    }

    /// One connection, from the handshake to DISCONNECT or failure.
    async fn session<L, R, K, C>(
        &mut self,
        link: &Link<L>,
        rng: &mut R,
        key: &mut K,
        clock: &mut C,
        bufs: &mut Buffers<'_>,
    ) -> Result<End, Error>
    where
        L: Read + Write,
        R: RngCore + CryptoRng,
        K: DeviceKey,
        C: Clock,
    {
        let b = self.bundle;
        // RFC 6066 allows host names only in SNI (a strict server aborts
        // on an address with illegal_parameter); the verifier checks the
        // name, DNS or IP address, either way.
        let config = if is_ip_address(b.server_name) {
            TlsConfig::new()
        } else {
            TlsConfig::new().with_server_name(b.server_name)
        };
        link.gate().arm();
        self.renewal.start();
        let floor = self.renewal.floor(self.timer.now_ms());
        let verifier = StrictVerifier::new(b.server_ca, b.server_name, clock)
            .with_floor(floor)
            .opening(link.gate());
        let leaf = self.renewal.chains.leaf(b, &self.slots);
        let mut provider = DeviceProvider::new(rng, key, leaf, verifier);
        let mut tls: TlsConnection<'_, &Link<L>, Aes128GcmSha256> =
            TlsConnection::new(link, bufs.tls_rx, bufs.tls_tx);
        let deadline = self.timer.now_ms() + self.settings.handshake_ms;
        let opened = match select(
            tls.open(TlsContext::new(&config, &mut provider)),
            self.timer.wait_until(deadline),
        )
        .await
        {
            Either::First(r) => r,
            Either::Second(()) => return Err(Error::Timeout(Waiting::Handshake)),
        };
        let verifier = provider.verifier();
        // Refused by a check, or it finished without proving itself (the
        // gate held our answer back; or, were the gate not there, the
        // handshake went through without a Certificate or CertificateVerify).
        let unproven = link.gate().held_back() || (opened.is_ok() && !verifier.verified());
        if let Some(why) = verifier
            .refusal()
            .or_else(|| unproven.then(|| verifier.unproven()))
        {
            // The gate let nothing encrypted out yet; the gateway can record why
            // (a failed alert changes nothing: we close either way).
            let _ = link.send_alert(why.alert()).await;
            return Err(Error::ServerRefused(why));
        }
        match opened {
            Ok(()) => {}
            Err(TlsError::HandshakeAborted(_, alert)) => return Err(Error::HandshakeAlert(alert)),
            // The gateway checks our certificate after it has sent all of
            // its flight; when it refuses, it sends an alert and closes
            // while we are still writing our Finished.
            Err(
                TlsError::Io(_)
                | TlsError::IoError
                | TlsError::ConnectionClosed
                | TlsError::InternalError,
            ) if provider.verifier().verified() => return Err(Error::CertificateRefused),
            Err(e) => return Err(tls_error(e)),
        }
        self.app.event(Event::TlsUp);

        let mut s = Wire {
            out: Out {
                tls,
                tx: &mut *bufs.mqtt_tx,
                last_send: self.timer.now_ms(),
            },
            inb: In {
                rx: &mut *bufs.mqtt_rx,
                filled: 0,
                more: false,
            },
            link,
            connected: false,
        };
        let result = self.mqtt(&mut s).await;
        if result.is_ok() {
            // The session is over either way; a failed goodbye changes nothing.
            let _ = s.out.send(Outbound::Disconnect, &self.timer).await;
            let _ = s.out.tls.close().await;
            self.app.event(Event::Disconnected);
        }
        result
    }

    async fn mqtt<L: Read + Write>(&mut self, s: &mut Wire<'_, '_, L>) -> Result<End, Error> {
        let id = self.bundle.device_id;
        let connect = Outbound::Connect {
            client_id: id.as_str(),
            keep_alive: self.settings.keepalive_secs,
        };
        // The gateway checks our certificate once the handshake is over
        // on our side; it refuses with an alert and a close, which reach
        // us as the alert, an end of stream, or, when our CONNECT was
        // still unread there, a reset. Before CONNACK each means that.
        let refused = |e| match e {
            Error::Io(_) | Error::Closed | Error::Alert => Error::CertificateRefused,
            e => e,
        };
        s.out.send(connect, &self.timer).await.map_err(refused)?;
        let n = s
            .frame(&self.timer, self.settings.response_ms, Waiting::Connack)
            .await
            .map_err(refused)?;
        match mqtt::decode(&s.inb.rx[..n])? {
            Inbound::Connack(ConnectReturnCode::Accepted) => {}
            Inbound::Connack(code) => return Err(Error::ConnectRefused(code)),
            _ => return Err(Error::Unexpected("packet before CONNACK")),
        }
        s.inb.consume(n);
        s.connected = true;
        self.stats.sessions += 1;
        self.app.event(Event::Connected);

        let sub_pid = Pid::new();
        let commands = Topic::new(id, Channel::Commands).to_heapless();
        let subscribe = Outbound::Subscribe {
            pid: sub_pid,
            topic: commands.as_str(),
        };
        let n = mqtt::encode(subscribe, s.out.tx)?;
        s.out.write(n, &self.timer).await?;
        let n = s
            .frame(&self.timer, self.settings.response_ms, Waiting::Suback)
            .await?;
        let granted = match mqtt::decode(&s.inb.rx[..n])? {
            Inbound::Suback { pid, granted } if pid == sub_pid => granted,
            _ => return Err(Error::Unexpected("packet before SUBACK")),
        };
        // A device that renews goes on without its commands: a session
        // whose certificate expired in the gateway's grace period may
        // only renew, and is refused them.
        if !granted && !self.slots.enabled() {
            return Err(Error::SubscribeRefused);
        }
        s.inb.consume(n);
        if granted {
            self.app.event(Event::Subscribed);
        }

        if self.slots.enabled() {
            // Its SUBACK and the status come in the exchange, perhaps
            // after a command.
            let subscribe = Outbound::Subscribe {
                pid: status_pid(),
                topic: CERT_STATUS,
            };
            s.out.send(subscribe, &self.timer).await?;
        }
        self.exchange(s).await
    }

    /// Telemetry, commands and keepalive until the app stops or something
    /// fails.
    async fn exchange<L: Read + Write>(&mut self, s: &mut Wire<'_, '_, L>) -> Result<End, Error> {
        let keepalive_ms = u64::from(self.settings.keepalive_secs) * 1000;
        let mut next_pid = Pid::new();
        let mut telemetry: Option<InFlight> = None;
        let mut reply: Option<InFlight> = None;
        let mut ping_deadline: Option<u64> = None;
        let mut next_sample = self.timer.now_ms();
        let mut stopping = false;
        loop {
            // A whole packet already here?
            if let Some(n) = s.inb.complete()? {
                // What the packet is, without keeping it borrowed.
                let incoming = match mqtt::decode(&s.inb.rx[..n])? {
                    Inbound::Puback(pid) => Incoming::Puback(pid),
                    Inbound::Pingresp => Incoming::Pingresp,
                    Inbound::Suback { pid, granted } => Incoming::Suback { pid, granted },
                    // Without slots this is constant false, and the
                    // renewal code is left out of the firmware.
                    Inbound::Publish { topic, .. }
                        if self.slots.enabled()
                            && (topic == CERT_STATUS || topic == CERT_ANSWER) =>
                    {
                        Incoming::Cert
                    }
                    Inbound::Publish { pid, .. } => Incoming::Publish(pid),
                    Inbound::PublishQos2 => return Err(Error::Unexpected("QoS 2 PUBLISH")),
                    _ => return Err(Error::Unexpected("packet type")),
                };
                match incoming {
                    Incoming::Puback(pid) if telemetry.is_some_and(|f| f.pid == pid) => {
                        let seq = telemetry.take().and_then(|f| f.seq).unwrap_or_default();
                        self.unacked = None;
                        self.stats.telemetry_acked += 1;
                        self.app.event(Event::TelemetryAcked { seq });
                        stopping |= !self.app.keep_going(&self.stats);
                    }
                    Incoming::Puback(pid) if reply.is_some_and(|f| f.pid == pid) => reply = None,
                    Incoming::Puback(_) => {
                        return Err(Error::Unexpected("PUBACK for nothing sent"));
                    }
                    Incoming::Pingresp => ping_deadline = None,
                    Incoming::Suback { pid, granted } if pid == status_pid() => {
                        self.renewal.offered = granted;
                        if !granted {
                            self.app.event(Event::Renewal(RenewEvent::Unavailable));
                        }
                    }
                    Incoming::Suback { .. } => return Err(Error::Unexpected("SUBACK")),
                    Incoming::Cert => self.certificate(&s.inb.rx[..n]),
                    Incoming::Publish(ack) => {
                        if let Some(f) = self.command(s, n, &mut next_pid).await? {
                            reply = Some(f);
                        }
                        if let Some(pid) = ack {
                            s.out.send(Outbound::Puback(pid), &self.timer).await?;
                        }
                        stopping |= !self.app.keep_going(&self.stats);
                    }
                }
                s.inb.consume(n);
                continue;
            }

            let now = self.timer.now_ms();
            for f in [telemetry, reply].into_iter().flatten() {
                if now >= f.deadline {
                    return Err(Error::Timeout(Waiting::Puback));
                }
            }
            if ping_deadline.is_some_and(|d| now >= d) {
                return Err(Error::Timeout(Waiting::Pingresp));
            }
            if stopping && telemetry.is_none() && reply.is_none() {
                return Ok(End::Stopped);
            }
            // Telemetry in flight is kept by the agent and sent again.
            if self.renewal.staged_now && reply.is_none() {
                return Ok(End::Renewed);
            }
            if let Some(n) = self.renewal.poll(now, s.out.tx)? {
                s.out.write(n, &self.timer).await?;
                if !self.renewal.trying {
                    let generation = self.renewal.asking();
                    self.app
                        .event(Event::Renewal(RenewEvent::Asked { generation }));
                }
                continue;
            }
            let limit = RECORD_LIMIT * MIN_RECORD;
            if telemetry.is_none() && (s.link.received() >= limit || s.link.sent() >= limit) {
                return Ok(End::Rekey);
            }
            if telemetry.is_none() && !stopping && now >= next_sample {
                telemetry = self.publish_telemetry(s, &mut next_pid).await?;
                if telemetry.is_none() {
                    stopping |= !self.app.keep_going(&self.stats);
                }
                next_sample = now.max(next_sample) + self.settings.telemetry_ms;
                if next_sample <= now {
                    next_sample = now + self.settings.telemetry_ms;
                }
                continue;
            }
            if ping_deadline.is_none() && now >= s.out.last_send + keepalive_ms * 3 / 4 {
                s.out.send(Outbound::Pingreq, &self.timer).await?;
                ping_deadline = Some(now + self.settings.response_ms);
                continue;
            }

            // Wait for the gateway or the next thing due.
            let mut due = s.out.last_send + keepalive_ms * 3 / 4;
            if telemetry.is_none() && !stopping {
                due = due.min(next_sample);
            }
            for d in [
                telemetry.map(|f| f.deadline),
                reply.map(|f| f.deadline),
                ping_deadline,
                self.renewal.wake(),
            ]
            .into_iter()
            .flatten()
            {
                due = due.min(d);
            }
            if s.inb.more || s.inb.filled > 0 {
                // Decrypted bytes are waiting, or a packet has begun.
                s.fill(&self.timer, now + self.settings.response_ms).await?;
                continue;
            }
            match select(s.link.readable(), self.timer.wait_until(due)).await {
                Either::First(Ok(())) => {
                    s.fill(&self.timer, now + self.settings.response_ms).await?;
                }
                Either::First(Err(e)) => return Err(Error::Io(e.kind())),
                Either::Second(()) => {}
            }
        }
    }

    /// Sends the unacknowledged telemetry again, or samples a new one;
    /// returns it in flight when it is QoS 1.
    async fn publish_telemetry<L: Read + Write>(
        &mut self,
        s: &mut Wire<'_, '_, L>,
        next_pid: &mut Pid,
    ) -> Result<Option<InFlight>, Error> {
        if self.settings.telemetry_qos == TelemetryQos::AtMostOnce && self.unacked.is_none() {
            let seq = self.next_seq;
            let n = self.encode_telemetry_qos0(s.out.tx)?;
            s.out.write(n, &self.timer).await?;
            self.next_seq += 1;
            self.stats.telemetry_qos0 += 1;
            self.app.event(Event::TelemetrySent { seq, resent: false });
            return Ok(None);
        }
        let resent = self.unacked.is_some();
        if self.unacked.is_none() {
            let mut payload = heapless::Vec::new();
            // The capacity is TELEMETRY_MAX; `len` is at most that.
            let _ = payload.resize(TELEMETRY_MAX, 0);
            let len = self.sample_telemetry(&mut payload)?;
            payload.truncate(len);
            self.unacked = Some((self.next_seq, payload));
            self.next_seq += 1;
        }
        let Some((seq, payload)) = &self.unacked else {
            return Err(Error::TelemetryTooLarge);
        };
        let seq = *seq;
        let pid = take_pid(next_pid);
        let topic = Topic::new(self.bundle.device_id, Channel::Telemetry).to_heapless();
        let publish = Outbound::Publish {
            pid: Some(pid),
            topic: topic.as_str(),
            payload,
        };
        let n = mqtt::encode(publish, s.out.tx)?;
        s.out.write(n, &self.timer).await?;
        let mut sent = self.in_flight(pid);
        sent.seq = Some(seq);
        self.app.event(Event::TelemetrySent { seq, resent });
        Ok(Some(sent))
    }

    /// Samples the next telemetry message (sequence number `next_seq`)
    /// and encodes it into `out`, returning its length.
    fn sample_telemetry(&mut self, out: &mut [u8]) -> Result<usize, Error> {
        let mut readings = heapless::Vec::new();
        self.app.sample(&mut readings);
        let t = message::Telemetry {
            seq: self.next_seq,
            time_ms: self.app.time_ms(),
            readings,
        };
        match message::encode(&t, out) {
            Ok(bytes) if bytes.len() <= TELEMETRY_MAX => Ok(bytes.len()),
            _ => Err(Error::TelemetryTooLarge),
        }
    }

    /// Samples the next telemetry message and encodes it as a QoS 0
    /// PUBLISH into `tx`, returning the packet's length.
    #[inline(never)]
    fn encode_telemetry_qos0(&mut self, tx: &mut [u8]) -> Result<usize, Error> {
        let mut buf = [0u8; TELEMETRY_MAX];
        let len = self.sample_telemetry(&mut buf)?;
        let payload = &buf[..len];
        let topic = Topic::new(self.bundle.device_id, Channel::Telemetry).to_heapless();
        let publish = Outbound::Publish {
            pid: None,
            topic: topic.as_str(),
            payload,
        };
        Ok(mqtt::encode(publish, tx)?)
    }

    /// A PUBLISH on the certificate status or answer topic.
    #[inline(never)]
    fn certificate(&mut self, frame: &[u8]) {
        let Ok(Inbound::Publish { topic, payload, .. }) = mqtt::decode(frame) else {
            return;
        };
        let now = self.timer.now_ms();
        let event = if topic == CERT_STATUS {
            self.renewal.status(payload, now)
        } else {
            self.renewal
                .answer(payload, now, self.bundle, &mut self.slots)
        };
        if let Some(event) = event {
            if let RenewEvent::Committed { .. } = event {
                self.stats.renewals += 1;
            }
            self.app.event(Event::Renewal(event));
        }
    }

    /// Answers the PUBLISH in `s.rx[..frame]` if it is a command on our
    /// commands topic. Returns the reply in flight.
    async fn command<L: Read + Write>(
        &mut self,
        s: &mut Wire<'_, '_, L>,
        frame: usize,
        next_pid: &mut Pid,
    ) -> Result<Option<InFlight>, Error> {
        let pid = *next_pid;
        let Some(n) = self.answer(&s.inb.rx[..frame], s.out.tx, pid)? else {
            return Ok(None);
        };
        take_pid(next_pid);
        s.out.write(n, &self.timer).await?;
        Ok(Some(self.in_flight(pid)))
    }

    /// Runs the command in `frame` and encodes the reply PUBLISH (packet
    /// id `pid`) into `tx`, returning its length; `None` for a payload
    /// that is not a command. Not async, so the output and payload
    /// buffers are never part of the agent's future.
    #[inline(never)]
    fn answer(&mut self, frame: &[u8], tx: &mut [u8], pid: Pid) -> Result<Option<usize>, Error> {
        let Inbound::Publish { topic, payload, .. } = mqtt::decode(frame)? else {
            return Ok(None);
        };
        let ours = Topic::new(self.bundle.device_id, Channel::Commands).to_heapless();
        if topic != ours.as_str() {
            return Err(Error::Unexpected("PUBLISH on a topic not subscribed"));
        }
        let Ok(cmd) = message::decode::<Command>(payload) else {
            self.app.event(Event::BadCommand);
            return Ok(None);
        };
        let mut output = [0u8; OUTPUT_MAX];
        let (status, used) = self.app.command(&cmd, &mut output);
        let reply = Reply {
            id: cmd.id,
            status,
            exit_code: None,
            output: output.get(..used).unwrap_or(&output),
        };
        let mut payload = [0u8; OUTPUT_MAX + 32];
        let len = message::encode(&reply, &mut payload)
            .map_err(|_| Error::Unexpected("reply too large"))?
            .len();
        self.stats.commands += 1;
        self.app.event(Event::Command {
            id: cmd.id,
            name: cmd.name,
            status,
        });
        let topic = Topic::new(self.bundle.device_id, Channel::Replies).to_heapless();
        let publish = Outbound::Publish {
            pid: Some(pid),
            topic: topic.as_str(),
            payload: &payload[..len],
        };
        Ok(Some(mqtt::encode(publish, tx)?))
    }

    /// A QoS 1 message just sent with `pid`; its PUBACK is due within the
    /// response time.
    fn in_flight(&self, pid: Pid) -> InFlight {
        InFlight {
            pid,
            deadline: self.timer.now_ms() + self.settings.response_ms,
            seq: None,
        }
    }
}

/// The packet id of the status SUBSCRIBE: the last one, which the
/// session's PUBLISH ids (from 1 up) do not reach while it is unanswered.
fn status_pid() -> Pid {
    Pid::try_from(u16::MAX).unwrap_or_default()
}

fn take_pid(next: &mut Pid) -> Pid {
    let pid = *next;
    *next = pid + 1;
    pid
}

/// Maps embedded-tls errors after the handshake to what a log should say.
fn tls_error(e: TlsError) -> Error {
    match e {
        TlsError::Io(k) => Error::Io(k),
        TlsError::IoError | TlsError::ConnectionClosed => Error::Closed,
        other => Error::Tls(other),
    }
}

/// The MQTT side of an open TLS connection: what goes out, what comes
/// in, kept apart so a received command can be answered while it is
/// still borrowed from the receive buffer.
struct Wire<'t, 'l, L: Read + Write> {
    out: Out<'t, 'l, L>,
    inb: In<'t>,
    link: &'l Link<L>,
    /// CONNACK has arrived: a TLS alert is no longer about our certificate.
    connected: bool,
}

struct Out<'t, 'l, L: Read + Write> {
    tls: TlsConnection<'t, &'l Link<L>, Aes128GcmSha256>,
    tx: &'t mut [u8],
    last_send: u64,
}

struct In<'t> {
    rx: &'t mut [u8],
    /// Bytes of `rx` holding received data.
    filled: usize,
    /// The last TLS read filled `rx`: more decrypted data may be waiting.
    more: bool,
}

impl<L: Read + Write> Out<'_, '_, L> {
    async fn send<T: Timer>(&mut self, p: Outbound<'_>, timer: &T) -> Result<(), Error> {
        let n = mqtt::encode(p, self.tx)?;
        self.write(n, timer).await
    }

    /// Sends the packet encoded in `tx[..n]`.
    async fn write<T: Timer>(&mut self, n: usize, timer: &T) -> Result<(), Error> {
        let mut sent = 0;
        while sent < n {
            sent += self.tls.write(&self.tx[sent..n]).await.map_err(tls_error)?;
        }
        self.tls.flush().await.map_err(tls_error)?;
        self.last_send = timer.now_ms();
        Ok(())
    }
}

impl In<'_> {
    /// The length of a complete packet at the start of `rx`, if one is there.
    fn complete(&self) -> Result<Option<usize>, Error> {
        match mqtt::frame_len(&self.rx[..self.filled])? {
            Some(n) if n > self.rx.len() => Err(Error::Mqtt(MqttError::TooLarge {
                len: n,
                max: self.rx.len(),
            })),
            Some(n) if n <= self.filled => Ok(Some(n)),
            _ => Ok(None),
        }
    }

    /// Drops the first `n` bytes of `rx` (a handled packet).
    fn consume(&mut self, n: usize) {
        self.rx.copy_within(n..self.filled, 0);
        self.filled -= n;
    }
}

impl<L: Read + Write> Wire<'_, '_, L> {
    /// Reads from TLS into `rx` once, by `deadline`.
    async fn fill<T: Timer>(&mut self, timer: &T, deadline: u64) -> Result<(), Error> {
        let inb = &mut self.inb;
        let free = inb.rx.len() - inb.filled;
        if free == 0 {
            return Err(Error::Mqtt(MqttError::TooLarge {
                len: inb.filled + 1,
                max: inb.rx.len(),
            }));
        }
        let read = select(
            self.out.tls.read(&mut inb.rx[inb.filled..]),
            timer.wait_until(deadline),
        )
        .await;
        match read {
            Either::First(Ok(0)) => Err(Error::Closed),
            Either::First(Ok(n)) => {
                inb.filled += n;
                inb.more = n == free;
                Ok(())
            }
            Either::First(Err(TlsError::InternalError)) if !self.connected => {
                Err(Error::CertificateRefused)
            }
            Either::First(Err(TlsError::InternalError)) => Err(Error::Alert),
            Either::First(Err(e)) => Err(tls_error(e)),
            Either::Second(()) => Err(Error::Timeout(Waiting::Packet)),
        }
    }

    /// Waits for one whole packet; returns its length.
    async fn frame<T: Timer>(
        &mut self,
        timer: &T,
        within_ms: u64,
        waiting: Waiting,
    ) -> Result<usize, Error> {
        let deadline = timer.now_ms() + within_ms;
        loop {
            if let Some(n) = self.inb.complete()? {
                return Ok(n);
            }
            match self.fill(timer, deadline).await {
                Err(Error::Timeout(_)) => return Err(Error::Timeout(waiting)),
                other => other?,
            }
        }
    }
}
