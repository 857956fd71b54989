//! The MQTT session to the gateway: connect with backoff, send what the
//! queue holds, delete each message when its PUBACK arrives, hand commands
//! to the command runner.
//!
//! Every connection starts from nothing: a fresh rumqttc client with a
//! clean session, and the queue replayed from its oldest message. The
//! queue is the only record of what is unacknowledged, so a message is
//! sent again after any break (duplicates are possible, loss is not).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rand_core::{OsRng, RngCore};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    TlsConfiguration, Transport,
};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio::time::timeout;
use twofold_protocol::message::{self, CertStatus};
use twofold_protocol::topic::{CERT_ANSWER, CERT_COMMIT, CERT_RENEW, CERT_STATUS};
use twofold_protocol::{Backoff, Channel, Topic};

use crate::gateway_cert::{self, GatewayRefusal};
use crate::identity::DeviceIdentity;
use crate::queue::Queue;
use crate::renew::{Next, Renewal};

/// Messages sent and not yet acknowledged, at most.
const WINDOW: usize = 32;
/// A connection that lasted this long resets the backoff.
const STABLE: Duration = Duration::from_secs(60);
/// The largest packet either way.
const MAX_PACKET: usize = 256 * 1024;

/// What the link needs.
#[derive(Clone)]
pub struct Link {
    pub identity: DeviceIdentity,
    /// The TLS config to connect with; a new one (a new server CRL) ends
    /// the session, and the next connects with it.
    pub tls: watch::Receiver<Arc<rustls::ClientConfig>>,
    pub host: String,
    pub port: u16,
    pub keep_alive: Duration,
    pub queue: Queue,
    /// Notified when the queue gains a message.
    pub wake: Arc<Notify>,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// How long to wait after the gateway refused this device's own
    /// certificate (revoked, expired): retrying sooner cannot help.
    pub refused_wait: Duration,
    /// The certificate file: a new one (the device enrolled again) ends
    /// that wait at once.
    pub cert_path: std::path::PathBuf,
    /// Payloads that arrived on the commands topic.
    pub commands: mpsc::Sender<Vec<u8>>,
    /// The certificate's renewal through the gateway.
    pub renewal: Arc<Renewal>,
}

/// Why the link stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The agent is stopping.
    Shutdown,
    /// A renewal changed the certificate to connect with: the agent loads
    /// its identity again and starts a new link.
    Renewed,
}

/// The gateway refused this device's own certificate in the handshake
/// (its TLS alert): no retry soon can succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertRefused {
    Revoked,
    /// Expired, or not valid yet (TLS has one alert for both).
    Expired,
}

impl CertRefused {
    /// What the person reading the log should know and do.
    fn explain(self) -> &'static str {
        match self {
            CertRefused::Revoked => {
                "the gateway refused this device's certificate: it is revoked. The operator \
                 must enroll the device again (provisioning enroll or sign-csr); the agent \
                 takes the new certificate as soon as its file changes"
            }
            CertRefused::Expired => {
                "the gateway refused this device's certificate as expired (or not yet valid: \
                 check the clock). It is past any grace for renewal: the operator must enroll \
                 the device again; the agent takes the new certificate as soon as its file \
                 changes"
            }
        }
    }
}

/// Why a session ended with an error: the text for the log, and whether
/// the gateway refused the certificate itself.
#[derive(Debug)]
struct Failure {
    text: String,
    refused: Option<CertRefused>,
    /// It failed before the CONNACK, in the handshake or right after it.
    before_session: bool,
}

impl From<String> for Failure {
    fn from(text: String) -> Self {
        Failure {
            text,
            refused: None,
            before_session: false,
        }
    }
}

impl From<&str> for Failure {
    fn from(text: &str) -> Self {
        Failure::from(text.to_owned())
    }
}

impl From<&ConnectionError> for Failure {
    fn from(e: &ConnectionError) -> Self {
        Failure {
            text: describe(e),
            refused: certificate_refused(e),
            before_session: false,
        }
    }
}

/// The TLS alert the gateway sent, if it ended the handshake with one.
fn alert_received(e: &ConnectionError) -> Option<rustls::AlertDescription> {
    twofold_trust::tls::alert_received(e)
}

/// The gateway's TLS alert refusing our certificate.
pub fn certificate_refused(e: &ConnectionError) -> Option<CertRefused> {
    match alert_received(e)? {
        rustls::AlertDescription::CertificateRevoked => Some(CertRefused::Revoked),
        rustls::AlertDescription::CertificateExpired => Some(CertRefused::Expired),
        _ => None,
    }
}

/// Whether the gateway itself refused this connection: a TLS alert it
/// sent, or a CONNACK refusing the client.
pub fn refused_by_gateway(e: &ConnectionError) -> bool {
    use rumqttc::ConnectReturnCode as Code;
    if let ConnectionError::ConnectionRefused(code) = e {
        return matches!(
            code,
            Code::BadClientId | Code::BadUserNamePassword | Code::NotAuthorized
        );
    }
    alert_received(e).is_some()
}

/// The queue position recorded for the agent's own PUBLISHes (renewal),
/// which the queue does not hold.
const OWN: i64 = -1;

/// The backoff delays, `protocol`'s [`Backoff`] (the microcontroller
/// agent's too): exponential from `min` up to `max`, each drawn from
/// `[d/2, d]`, so that devices dropped together come back spread out.
pub fn backoff(min: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let mut schedule = Backoff::new(ms(min), ms(max));
    std::iter::repeat_with(move || Duration::from_millis(schedule.next_ms(OsRng.next_u64())))
}

impl Link {
    fn options(&self, tls: Arc<rustls::ClientConfig>) -> MqttOptions {
        let mut o = MqttOptions::new(self.identity.id.as_str(), &self.host, self.port);
        o.set_keep_alive(self.keep_alive);
        o.set_clean_session(true);
        o.set_max_packet_size(MAX_PACKET, MAX_PACKET);
        o.set_inflight(WINDOW as u16 + 4);
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        o
    }

    /// Sends DISCONNECT and gives it two seconds to go out. A command that
    /// arrives meanwhile has been acknowledged to the gateway, so it still
    /// goes to the runner.
    async fn disconnect(&self, client: &AsyncClient, events: &mut EventLoop, commands_topic: &str) {
        let _ = client.try_disconnect();
        let _ = timeout(Duration::from_secs(2), async {
            while let Ok(event) = events.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = event
                    && p.topic == commands_topic
                    && self.commands.try_send(p.payload.to_vec()).is_err()
                {
                    tracing::warn!("commands arrive faster than they run; one was dropped");
                }
            }
        })
        .await;
    }

    fn topic(&self, channel: Channel) -> String {
        Topic::new(self.identity.id, channel).to_string()
    }

    /// Runs until `shutdown` turns true, or a renewal needs a new link.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> End {
        let mut delays = backoff(self.reconnect_min, self.reconnect_max);
        // The refusal last logged, so that a revoked device says so once,
        // not at every retry.
        let mut told: Option<CertRefused> = None;
        // Whether the next connection makes a full handshake.
        let mut full = false;
        // Refusals of the certificate in a row. The first may be a forged
        // alert (before a TLS 1.2 handshake is keyed, anyone on the path
        // can send one): it gets the usual backoff; the second, the long
        // wait.
        let mut refusals = 0u32;
        loop {
            let started = Instant::now();
            // Before the attempt, so that a certificate installed during
            // it still counts as a change.
            let certificate = modified(&self.cert_path);
            let ended = self.session(&mut shutdown, full).await;
            let failure = match ended {
                Ok(end) => return end,
                Err(e) => e,
            };
            if started.elapsed() >= STABLE {
                delays = backoff(self.reconnect_min, self.reconnect_max);
            }
            let gateway = format!("{}:{}", self.host, self.port);
            // A resumed TLS session skips the gateway's certificate
            // checks, so it refuses one after the handshake, when TLS has
            // no alert left to say why: the connection just ends. A full
            // handshake next time gets the reason (revoked, expired).
            full = failure.before_session || failure.refused.is_some();
            refusals = if failure.refused.is_some() {
                refusals + 1
            } else {
                0
            };
            if let Some(refused) = failure.refused.filter(|_| refusals >= 2) {
                let wait = self.refused_wait / 2
                    + self
                        .refused_wait
                        .mul_f64(OsRng.next_u32() as f64 / u32::MAX as f64 / 2.0);
                if told != Some(refused) {
                    tracing::error!(
                        gateway = %gateway,
                        refused = ?refused,
                        retry_in = ?wait,
                        "{}",
                        refused.explain()
                    );
                    told = Some(refused);
                } else {
                    tracing::debug!(gateway = %gateway, refused = ?refused, retry_in = ?wait, "still refused");
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = changed(&self.cert_path, certificate) => {
                        tracing::info!(cert = %self.cert_path.display(), "the certificate file changed: loading it");
                        return End::Renewed;
                    }
                    _ = shutdown.changed() => return End::Shutdown,
                }
                continue;
            }
            told = None;
            let wait = delays.next().unwrap_or(self.reconnect_max);
            let queued = self.queue.len().unwrap_or(0);
            tracing::warn!(
                gateway = %gateway,
                error = %failure.text,
                retry_in = ?wait,
                queued,
                "not connected to the gateway"
            );
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return End::Shutdown,
            }
        }
    }

    /// One connection, from CONNECT to its end. `Ok` on shutdown, or
    /// when a renewal asks for a new link.
    async fn session(
        &self,
        shutdown: &mut watch::Receiver<bool>,
        full: bool,
    ) -> Result<End, Failure> {
        let mut tls = self.tls.clone();
        let mut config = tls.borrow_and_update().clone();
        if full {
            let mut fresh = (*config).clone();
            fresh.resumption = rustls::client::Resumption::disabled();
            config = Arc::new(fresh);
        }
        let (client, mut events) = AsyncClient::new(self.options(config), WINDOW * 2 + 16);
        let staged = self.renewal.staged();
        match timeout(Duration::from_secs(30), connack(&mut events)).await {
            Ok(Ok(())) => {}
            // The gateway refused the renewed certificate (a TLS alert, or
            // a CONNACK refusing the client): back to the one in force.
            // Nothing else says anything about the certificate (a reset,
            // a timeout, a gateway restarting, a token that failed to
            // sign), and the pair may be committed by the CA already.
            Ok(Err(e)) if staged && refused_by_gateway(&e) => {
                self.renewal.roll_back(&describe(&e));
                return Ok(End::Renewed);
            }
            Ok(Err(e)) => {
                return Err(Failure {
                    before_session: true,
                    ..Failure::from(&e)
                });
            }
            Err(_) => return Err("no CONNACK within 30 s".into()),
        }
        let commands_topic = self.topic(Channel::Commands);
        tracing::info!(
            device = self.identity.id.as_str(),
            "connected to the gateway"
        );
        client
            .try_subscribe(&commands_topic, QoS::AtLeastOnce)
            .map_err(|e| e.to_string())?;
        // The gateway says where the certificate is in its life; its
        // answers to renew requests and commits come unasked.
        client
            .try_subscribe(CERT_STATUS, QoS::AtMostOnce)
            .map_err(|e| e.to_string())?;

        // Queue positions handed to rumqttc, in order, until it assigns
        // each a packet id; then by packet id until the PUBACK.
        let mut handed: VecDeque<i64> = VecDeque::new();
        let mut inflight: HashMap<u16, i64> = HashMap::new();
        let mut cursor = 0i64;
        // Connected with a renewed pair: it works, so commit it.
        if staged {
            client
                .try_publish(CERT_COMMIT, QoS::AtLeastOnce, false, Vec::new())
                .map_err(|e| e.to_string())?;
            handed.push_back(OWN);
        }
        // When to ask for a new certificate, once the status has said.
        let mut renew_at: Option<Instant> = None;
        loop {
            let room = WINDOW.saturating_sub(handed.len() + inflight.len());
            if room > 0 {
                let batch = self.queue.after(cursor, room).map_err(|e| e.to_string())?;
                for m in batch {
                    if client
                        .try_publish(m.topic, QoS::AtLeastOnce, false, m.payload)
                        .is_err()
                    {
                        break;
                    }
                    handed.push_back(m.seq);
                    cursor = m.seq;
                }
            }
            tokio::select! {
                event = events.poll() => match event {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let Some(seq) = handed.pop_front() {
                            inflight.insert(pkid, seq);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(seq) = inflight.remove(&ack.pkid).filter(|s| *s != OWN) {
                            self.queue.remove(seq).map_err(|e| e.to_string())?;
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == CERT_STATUS => {
                        renew_at = self.schedule(&p.payload, staged);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == CERT_ANSWER => {
                        match self.renewal.answer(&p.payload) {
                            Next::Reconnect => {
                                self.disconnect(&client, &mut events, &commands_topic).await;
                                return Ok(End::Renewed);
                            }
                            Next::RetryIn(secs) => {
                                renew_at = Some(Instant::now() + Duration::from_secs(secs));
                            }
                            Next::Stop => renew_at = None,
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == commands_topic => {
                        if self.commands.try_send(p.payload.to_vec()).is_err() {
                            tracing::warn!("commands arrive faster than they run; one was dropped");
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                            tracing::error!(topic = %commands_topic, "the gateway refused the commands subscription");
                        }
                    }
                    Ok(Event::Incoming(Packet::Disconnect)) => {
                        return Err("the gateway closed the session".into());
                    }
                    Ok(_) => {}
                    Err(e) => return Err(Failure::from(&e)),
                },
                _ = self.wake.notified() => {}
                _ = sleep_until(renew_at) => {
                    renew_at = None;
                    match self.renewal.request() {
                        Ok(payload) => {
                            client
                                .try_publish(CERT_RENEW, QoS::AtLeastOnce, false, payload)
                                .map_err(|e| e.to_string())?;
                            handed.push_back(OWN);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot make a renew request; trying again in an hour");
                            renew_at = Some(Instant::now() + Duration::from_secs(3600));
                        }
                    }
                }
                Ok(()) = tls.changed() => {
                    self.disconnect(&client, &mut events, &commands_topic).await;
                    return Err("the server CRL changed: reconnecting to check the gateway against it".into());
                }
                _ = shutdown.changed() => {
                    self.disconnect(&client, &mut events, &commands_topic).await;
                    return Ok(End::Shutdown);
                }
            }
        }
    }
}

impl Link {
    /// When to ask for renewal, from the gateway's status: its seconds,
    /// counted on this machine's monotonic clock. Not while a renewed
    /// pair awaits commit.
    fn schedule(&self, payload: &[u8], staged: bool) -> Option<Instant> {
        let status = match message::decode::<CertStatus>(payload) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "not a certificate status; ignored");
                return None;
            }
        };
        let due = i64::try_from(status.now.saturating_add(status.renew_in)).unwrap_or(i64::MAX);
        self.renewal.set_due(due);
        if staged {
            return None;
        }
        tracing::info!(
            renew_in = status.renew_in,
            expires_in = status.expires_in,
            "certificate status from the gateway"
        );
        Some(Instant::now() + Duration::from_secs(status.renew_in))
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn connack(events: &mut EventLoop) -> Result<(), ConnectionError> {
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = events.poll().await? {
            return Ok(());
        }
    }
}

/// An error as the person reading the log needs it, including the TLS
/// alert the gateway sent when it refused our certificate.
pub fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => {
            format!("the gateway refused the MQTT session: {code:?}")
        }
        ConnectionError::Tls(t) => {
            // The agent's own refusal of the gateway's certificate, in its
            // words rather than rustls's debug text of `Other`.
            let refused = match t {
                rumqttc::TlsError::Io(io) => refusal(io),
                _ => None,
            };
            match refused {
                Some(refusal) => format!("TLS: {refusal}"),
                None => format!("TLS: {t}"),
            }
        }
        ConnectionError::MqttState(rumqttc::StateError::Io(io)) => {
            // rustls reports the peer's alert inside an I/O error.
            format!("connection lost: {io}")
        }
        other => other.to_string(),
    }
}

/// The certificate file's modification time, if it can be read.
fn modified(path: &std::path::Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Resolves when `path`'s modification time is no longer `then` (checked
/// every 5 s: a few stat calls while a refused device waits an hour), and
/// has then stayed the same for 2 s: a certificate being copied in is
/// taken once it is whole.
async fn changed(path: &std::path::Path, then: Option<std::time::SystemTime>) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = modified(path);
        if now != then {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if modified(path) == now {
                return;
            }
        }
    }
}

/// The agent's refusal of the gateway's certificate inside an I/O error.
fn refusal(io: &std::io::Error) -> Option<&GatewayRefusal> {
    io.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(gateway_cert::refusal_of)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_gateways_own_refusal_rolls_a_renewal_back() {
        use rustls::AlertDescription as A;
        let io = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let reset = || std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        for (e, refused) in [
            (
                ConnectionError::Tls(rumqttc::TlsError::Io(io(rustls::Error::AlertReceived(
                    A::BadCertificate,
                )))),
                true,
            ),
            (
                ConnectionError::ConnectionRefused(rumqttc::ConnectReturnCode::NotAuthorized),
                true,
            ),
            (ConnectionError::Tls(rumqttc::TlsError::Io(reset())), false),
            (ConnectionError::Io(reset()), false),
            (ConnectionError::NetworkTimeout, false),
            (
                ConnectionError::ConnectionRefused(rumqttc::ConnectReturnCode::ServiceUnavailable),
                false,
            ),
            (
                ConnectionError::Tls(rumqttc::TlsError::Io(io(rustls::Error::General(
                    "local".into(),
                )))),
                false,
            ),
        ] {
            assert_eq!(refused_by_gateway(&e), refused, "{e:?}");
        }
    }

    #[test]
    fn the_gateways_refusal_of_our_certificate_is_found_in_the_error() {
        use rustls::AlertDescription as A;
        let io = |alert| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(alert),
            )
        };
        let cases = [
            (
                ConnectionError::Io(io(A::CertificateRevoked)),
                Some(CertRefused::Revoked),
            ),
            (
                ConnectionError::MqttState(rumqttc::StateError::Io(io(A::CertificateRevoked))),
                Some(CertRefused::Revoked),
            ),
            (
                ConnectionError::Tls(rumqttc::TlsError::Io(io(A::CertificateExpired))),
                Some(CertRefused::Expired),
            ),
            // Other refusals and network failures keep the usual backoff.
            (ConnectionError::Io(io(A::UnknownCA)), None),
            (ConnectionError::Io(io(A::BadCertificate)), None),
            (
                ConnectionError::Io(std::io::ErrorKind::ConnectionRefused.into()),
                None,
            ),
            (ConnectionError::NetworkTimeout, None),
        ];
        for (error, expected) in cases {
            assert_eq!(certificate_refused(&error), expected, "{error:?}");
        }
    }

    #[test]
    fn backoff_grows_and_stays_within_bounds() {
        let min = Duration::from_secs(1);
        let max = Duration::from_secs(300);
        let delays: Vec<Duration> = backoff(min, max).take(40).collect();
        assert!(
            delays.iter().all(|d| *d >= min / 2 && *d <= max),
            "{delays:?}"
        );
        assert!(delays[0] <= min);
        assert!(delays[10..].iter().all(|d| *d >= max / 2), "{delays:?}");
        // Jitter: two devices do not wait the same.
        let other: Vec<Duration> = backoff(min, max).take(40).collect();
        assert_ne!(delays, other);
    }
}
