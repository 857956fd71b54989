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
use twofold_protocol::{Backoff, Channel, Topic};

use crate::gateway_cert::{self, GatewayRefusal};
use crate::identity::DeviceIdentity;
use crate::queue::Queue;

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
    /// Payloads that arrived on the commands topic.
    pub commands: mpsc::Sender<Vec<u8>>,
}

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

    /// Runs until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut delays = backoff(self.reconnect_min, self.reconnect_max);
        loop {
            let started = Instant::now();
            let ended = self.session(&mut shutdown).await;
            let error = match ended {
                Ok(()) => return,
                Err(e) => e,
            };
            if started.elapsed() >= STABLE {
                delays = backoff(self.reconnect_min, self.reconnect_max);
            }
            let wait = delays.next().unwrap_or(self.reconnect_max);
            let queued = self.queue.len().unwrap_or(0);
            tracing::warn!(
                gateway = %format!("{}:{}", self.host, self.port),
                error = %error,
                retry_in = ?wait,
                queued,
                "not connected to the gateway"
            );
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One connection, from CONNECT to its end. `Ok` only on shutdown.
    async fn session(&self, shutdown: &mut watch::Receiver<bool>) -> Result<(), String> {
        let mut tls = self.tls.clone();
        let config = tls.borrow_and_update().clone();
        let (client, mut events) = AsyncClient::new(self.options(config), WINDOW * 2 + 16);
        match timeout(Duration::from_secs(30), connack(&mut events)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(describe(&e)),
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

        // Queue positions handed to rumqttc, in order, until it assigns
        // each a packet id; then by packet id until the PUBACK.
        let mut handed: VecDeque<i64> = VecDeque::new();
        let mut inflight: HashMap<u16, i64> = HashMap::new();
        let mut cursor = 0i64;
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
                        if let Some(seq) = inflight.remove(&ack.pkid) {
                            self.queue.remove(seq).map_err(|e| e.to_string())?;
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
                    Err(e) => return Err(describe(&e)),
                },
                _ = self.wake.notified() => {}
                Ok(()) = tls.changed() => {
                    self.disconnect(&client, &mut events, &commands_topic).await;
                    return Err("the server CRL changed: reconnecting to check the gateway against it".into());
                }
                _ = shutdown.changed() => {
                    self.disconnect(&client, &mut events, &commands_topic).await;
                    return Ok(());
                }
            }
        }
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
