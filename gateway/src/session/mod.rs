//! One device session after the TLS handshake: bind the MQTT CONNECT to the
//! certificate's identity, then relay packets both ways, checking every
//! PUBLISH, SUBSCRIBE, will and response topic against the policy.
//!
//! The session is a state machine without I/O, [`Session`]: bytes, a new
//! CRL, a shutdown and the time go in, [`Action`]s come out. The parts:
//! - `frame`: whole packets off a stream, and the packets the gateway
//!   encodes itself (rumqttc's codecs for 3.1.1 and 5 do the rest);
//! - `connect`: the CONNECT decision ([`Quirks`] of the broker included)
//!   and the broker's CONNACK as the device gets it;
//! - `inspect`: the [`Inspector`]'s verdict on each later frame;
//! - `from_broker` and `order`: what the broker sends, and the order in
//!   which it and the gateway's own answers reach the device;
//! - `task`: [`run`], the tokio shell that performs the actions.
//!
//! The device's frames are forwarded unchanged once checked; only the
//! CONNECT is rewritten (broker-side client id and credential), and the
//! broker's UNSUBACKs and MQTT 5 CONNACK are replaced by the gateway's.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use twofold_protocol::Principal;
use twofold_protocol::message::{self, CertAnswer, CertStatus, RenewRefusal, RenewRequest};
use twofold_protocol::topic::{CERT_ANSWER, CERT_COMMIT, CERT_PREFIX, CERT_RENEW, CERT_STATUS};

use crate::audit::{Audit, Event, EventKind, Presence};
use crate::broker::{BrokerTarget, Credential, External};
use crate::embedded::{Embedded, LocalLink, Will};
use crate::identity::{self, CertInfo};
use crate::metrics::Direction;
use crate::policy::{self, InForce};
use crate::reason::Reason;
use crate::tls::TlsContext;

mod connect;
mod downgrade;
mod frame;
mod from_broker;
mod inspect;
mod order;
mod task;

use connect::*;
pub use connect::{KEEPALIVE_OFF, Quirks};
use frame::*;
use from_broker::*;
use inspect::*;
pub use inspect::{Inspector, MAX_REFUSALS, shown};
use order::*;
pub use task::{Backends, run};
/// Who is connected, as established by the handshake.
#[derive(Clone, Debug)]
pub struct Peer {
    pub principal: Principal,
    /// The identity URI, for the audit log.
    pub identity: String,
    pub cert: CertInfo,
    pub addr: SocketAddr,
}

/// The certificate a session was opened with, as the gateway tells the
/// device on [`CERT_STATUS`], and the wall clock at one instant.
#[derive(Clone, Debug)]
pub struct CertLife {
    /// Big-endian, without leading zero bytes.
    pub serial: Vec<u8>,
    /// Unix seconds.
    pub not_after: i64,
    /// When renewal is due ([`twofold_trust::renewal::due_at`]).
    pub due: i64,
    /// Unix seconds at `at`.
    pub unix: i64,
    pub at: Instant,
}

impl CertLife {
    /// Unix seconds at `now`.
    fn unix_at(&self, now: Instant) -> i64 {
        let since = now.saturating_duration_since(self.at).as_secs();
        self.unix
            .saturating_add(i64::try_from(since).unwrap_or(i64::MAX))
    }
}

/// What a device asked of the CA through its session, for the shell to
/// take to the CA service ([`crate::renewal::CaClient`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertRequest {
    /// Renew the session's certificate: with the same key, or for the
    /// key of a PKCS#10 CSR (DER).
    Renew {
        request_id: String,
        csr: Option<Vec<u8>>,
    },
    /// The session's certificate is a renewed one the device has stored:
    /// supersede its predecessor.
    Commit,
}

impl CertRequest {
    /// The request id, empty for a commit.
    pub fn request_id(&self) -> &str {
        match self {
            CertRequest::Renew { request_id, .. } => request_id,
            CertRequest::Commit => "",
        }
    }
}

/// The CA's answer to a [`CertRequest`], as the device gets it on
/// [`CERT_ANSWER`] ([`CertAnswer`], owned).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertReply {
    Issued {
        request_id: String,
        /// The new certificate's DER, then its CA's.
        certs: Vec<u8>,
    },
    Refused {
        request_id: String,
        code: RenewRefusal,
        retry_after: u32,
        reason: String,
    },
    Committed {
        serial: Vec<u8>,
    },
}

impl CertReply {
    /// The bytes its fields carry.
    fn len(&self) -> usize {
        match self {
            CertReply::Issued { request_id, certs } => request_id.len() + certs.len(),
            CertReply::Refused {
                request_id, reason, ..
            } => request_id.len() + reason.len(),
            CertReply::Committed { serial } => serial.len(),
        }
    }
}

/// Session limits.
#[derive(Clone, Debug)]
pub struct Limits {
    /// The largest MQTT packet accepted from a device, CONNECT included.
    pub max_packet_size: usize,
    /// How long a device has to send CONNECT after the handshake.
    pub connect_timeout: Duration,
}

/// The MQTT protocol version of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

/// What a session makes of a device's bytes: see [`screen`].
#[derive(Debug, Default)]
pub struct Screened {
    /// The protocol version, once a CONNECT was admitted.
    pub version: Option<Version>,
    /// The bytes after the CONNECT that would reach the broker, frame by
    /// frame (the gateway's own PINGREQ after an UNSUBSCRIBE included).
    pub forwarded: Vec<Bytes>,
    /// The gateway's own answers to the device, in order.
    pub answered: Vec<Bytes>,
    /// Every refusal, in order (each would be one audit event).
    pub refusals: Vec<Reason>,
    /// Whether the session would be closed (after the last refusal).
    pub closed: bool,
}

impl Screened {
    fn close(mut self, reason: Reason) -> Screened {
        self.refusals.push(reason);
        self.closed = true;
        self
    }
}

/// Runs the session's checks on `input`, bytes from a device that
/// authenticated as `principal`, without any I/O: the CONNECT decision,
/// then the [`Inspector`] on every later frame, as [`run`] uses them,
/// against the embedded broker. Bytes after the last whole frame are
/// ignored (a session would wait for more). The fuzz target
/// `gateway_inbound` runs it on arbitrary input.
pub fn screen(principal: &Principal, input: &[u8], max: usize) -> Screened {
    let out = Screened::default();
    let mut buf = BytesMut::from(input);
    if buf.first().is_some_and(|&b| b != 0x10) {
        return out.close(Reason::ProtocolError);
    }
    let frame = match next_frame(&mut buf, max) {
        Ok(Some(frame)) => frame,
        Ok(None) => return out,
        Err(_) => return out.close(Reason::ProtocolError),
    };
    let quirks = Quirks::EMBEDDED;
    let version = match admit(frame, principal, &InForce::default(), None, max, quirks) {
        Ok((version, _)) => version,
        Err(refusal) => return out.close(refusal.reason),
    };
    let mut out = Screened {
        version: Some(version),
        ..out
    };
    // As the session does it, with everything read at once.
    let now = Instant::now();
    let mut session = Session::new(version, *principal, max, quirks, 0, now);
    for action in session.handle_device(&mut buf, now) {
        match action {
            Action::ToBroker(frames) => {
                let mut frames = BytesMut::from(&frames[..]);
                while let Ok(Some(frame)) = next_frame(&mut frames, usize::MAX) {
                    out.forwarded.push(frame.freeze());
                }
                assert!(
                    frames.is_empty(),
                    "the session forwarded bytes that are not whole frames"
                );
            }
            Action::ToDevice(bytes) => out.answered.push(bytes),
            Action::Refused(reason, _) => out.refusals.push(reason),
            Action::Close(_) => out.closed = true,
            Action::Relayed { .. } | Action::Cert(_) => {}
        }
    }
    out
}

/// One thing the session asks its shell to do, in the order given.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Bytes for the device, in the order MQTT wants them.
    ToDevice(Bytes),
    /// Whole frames for the broker.
    ToBroker(Bytes),
    /// A refusal for the audit log (the session may go on).
    Refused(Reason, String),
    /// Messages and bytes relayed, for the metrics.
    Relayed {
        direction: Direction,
        messages: u64,
        bytes: u64,
    },
    /// The session is over; the reason, when neither side simply closed.
    Close(Option<String>),
    /// Take this to the CA; its answer comes back through
    /// [`Session::handle_cert_reply`].
    Cert(CertRequest),
}

/// A device's MQTT session once the broker has accepted its CONNECT, as a
/// state machine without I/O (quinn-proto's `Connection` is the model):
/// bytes from the device or the broker, a new CRL, a shutdown or the time
/// go in; [`Action`]s come out, for the shell ([`run`]) to perform in
/// order. The checks on the device's frames are the [`Inspector`]'s; the
/// order of what goes to the device is [`DeviceOrder`]'s.
pub struct Session {
    version: Version,
    inspector: Inspector,
    from_broker: FromBroker,
    order: DeviceOrder,
    /// QoS 1 and 2 PUBLISHes sent to the broker so far: the gateway's own
    /// packets go to the device after the broker's answers to them.
    sent: u64,
    /// 1.5 times the device's keepalive, if it keeps one.
    silence: Option<Duration>,
    heard: Instant,
    closed: bool,
    /// A withheld delivery has been audited in this session.
    withheld_said: bool,
}

impl Session {
    /// A session of `principal` speaking `version`, whose CONNECT asked
    /// for `keep_alive` seconds (0: none), heard from at `now`.
    pub fn new(
        version: Version,
        principal: Principal,
        max: usize,
        quirks: Quirks,
        keep_alive: u16,
        now: Instant,
    ) -> Session {
        Session {
            version,
            inspector: Inspector::new(version, principal, max, quirks),
            from_broker: FromBroker {
                version,
                upgrade: version == Version::V5 && quirks.v311_only,
            },
            order: DeviceOrder::default(),
            sent: 0,
            silence: (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
            heard: now,
            closed: false,
            withheld_said: false,
        }
    }

    /// The session of a device (or service) whose certificate is `life`:
    /// it answers a SUBSCRIBE to [`CERT_STATUS`] with its status.
    /// A certificate that has expired was admitted within the grace
    /// period (no other way in): the session may only renew.
    /// Decides with `policy` rather than the built-in policy.
    pub fn with_policy(mut self, policy: InForce) -> Session {
        self.inspector.policy = policy;
        self
    }

    pub fn with_certificate(mut self, life: CertLife) -> Session {
        if life.not_after <= life.unix {
            let at = time::OffsetDateTime::from_unix_timestamp(life.not_after)
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_default();
            let ago = u64::try_from(life.unix - life.not_after).unwrap_or_default();
            self.inspector.renew_only = Some(format!(
                "the certificate expired at {at}, {} ago, and was admitted within the grace \
                 period: this session may only renew ({CERT_RENEW}, {CERT_COMMIT})",
                humantime::format_duration(Duration::from_secs(ago))
            ));
        }
        self.inspector.certificate = Some(life);
        self
    }

    /// Why this session may only renew, if it may only renew.
    pub fn renew_only(&self) -> Option<&str> {
        self.inspector.renew_only.as_deref()
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// When [`Session::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed {
            return None;
        }
        self.silence.map(|s| self.heard + s)
    }

    /// The whole frames at the front of `buf`, read from the device at
    /// `now`; a partial frame stays in `buf`.
    pub fn handle_device(&mut self, buf: &mut BytesMut, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.closed {
            return actions;
        }
        self.heard = now;
        self.inspector.now = Some(now);
        let Batch {
            forward,
            publishes,
            answered,
            replies,
            refused,
            stop,
        } = self.inspector.batch(buf);
        // The gateway's answers are placed before the allowed frames go
        // to the broker: the broker's answers to PUBLISHes after a refused
        // one cannot overtake its answer then.
        let before = self.sent;
        self.sent += answered;
        let mut out = Vec::new();
        for (after, reply) in replies {
            self.order.take(
                Out::Gateway {
                    packet: reply,
                    after: before + after,
                },
                &mut out,
            );
        }
        actions.extend(out.into_iter().map(Action::ToDevice));
        actions.extend(self.inspector.cert_requests.drain(..).map(Action::Cert));
        // Refusals are audited before the batch reaches the broker: a
        // failed broker write cannot skip them.
        actions.extend(refused.into_iter().map(|(r, d)| Action::Refused(r, d)));
        if let Some(Stop::Refused(reason, detail)) = &stop {
            actions.push(Action::Refused(*reason, detail.clone()));
        }
        if !forward.is_empty() {
            actions.push(Action::Relayed {
                direction: Direction::In,
                messages: publishes,
                bytes: forward.len() as u64,
            });
            actions.push(Action::ToBroker(forward));
        }
        match stop {
            None => {}
            Some(Stop::Refused(..)) => self.close(None, &mut actions),
            Some(Stop::Frame(e)) => self.frame_error(e, &mut actions),
        }
        actions
    }

    /// The device's stream ended: cleanly (`None`) or with an error.
    pub fn handle_device_end(&mut self, error: Option<String>) -> Vec<Action> {
        let mut actions = Vec::new();
        let e = match error {
            None => FrameError::Closed,
            Some(e) => FrameError::Broken(e),
        };
        self.frame_error(e, &mut actions);
        actions
    }

    fn frame_error(&mut self, e: FrameError, actions: &mut Vec<Action>) {
        let max = self.inspector.max;
        let (reply, refusal, why) = match e {
            FrameError::Closed => (None, None, None),
            FrameError::Broken(e) => (
                None,
                None,
                Some(format!("the device's connection failed: {e}")),
            ),
            FrameError::TooLarge(n) => (
                Some(v5::DisconnectReasonCode::PacketTooLarge),
                Some(format!("packet of {n} bytes; the limit is {max}")),
                None,
            ),
            FrameError::Malformed(e) => (
                Some(v5::DisconnectReasonCode::MalformedPacket),
                Some(format!("malformed packet: {e}")),
                None,
            ),
        };
        if let Some(code) = reply {
            self.say_disconnect(code, actions);
        }
        if let Some(detail) = refusal {
            actions.push(Action::Refused(Reason::ProtocolError, detail));
        }
        self.close(why, actions);
    }

    /// The whole frames at the front of `buf`, read from the broker.
    pub fn handle_broker(&mut self, buf: &mut BytesMut) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.closed {
            return actions;
        }
        let reader = Reader {
            principal: &self.inspector.principal,
            policy: &self.inspector.policy,
        };
        let ToDevice {
            frames,
            publishes,
            answers,
            withheld,
        } = self
            .from_broker
            .take(buf, &mut self.inspector.pings, &reader);
        for w in &withheld {
            // Acknowledged to the broker as delivered, so that it does not
            // deliver it again (QoS 2: the broker's PUBREL reaches the
            // device, which answers PUBCOMP for an id it does not know).
            let ack = match w.qos {
                1 => Some(0x40),
                2 => Some(0x50),
                _ => None,
            };
            if let Some(kind) = ack {
                let [hi, lo] = w.pkid.to_be_bytes();
                actions.push(Action::ToBroker(Bytes::copy_from_slice(&[kind, 2, hi, lo])));
            }
            if !self.withheld_said {
                self.withheld_said = true;
                actions.push(Action::Refused(
                    Reason::PolicyDenied,
                    format!(
                        "delivery of {} withheld: the policy in force no longer lets this \
                         identity read it (a subscription made under an earlier policy or \
                         group membership); later ones in this session are withheld without \
                         a line",
                        inspect::shown(&w.topic)
                    ),
                ));
            }
        }
        if frames.is_empty() {
            return actions;
        }
        actions.push(Action::Relayed {
            direction: Direction::Out,
            messages: publishes,
            bytes: frames.len() as u64,
        });
        let mut out = Vec::new();
        self.order.take(Out::Broker { frames, answers }, &mut out);
        actions.extend(out.into_iter().map(Action::ToDevice));
        actions
    }

    /// The broker closed the session (a takeover, or the broker stopped).
    pub fn handle_broker_end(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        self.close(Some("the broker ended the session".into()), &mut actions);
        actions
    }

    /// A new CRL came into force; `revoked` says whether it lists this
    /// session's certificate.
    pub fn handle_revocation(&mut self, revoked: bool) -> Vec<Action> {
        let mut actions = Vec::new();
        if revoked && !self.closed {
            self.say_disconnect(v5::DisconnectReasonCode::AdministrativeAction, &mut actions);
            actions.push(Action::Refused(
                Reason::Revoked,
                "certificate revoked while connected; session closed".into(),
            ));
            self.close(None, &mut actions);
        }
        actions
    }

    /// The CA answered the session's [`CertRequest`]: the device gets it
    /// on [`CERT_ANSWER`], after what it is already owed.
    pub fn handle_cert_reply(&mut self, reply: CertReply) -> Vec<Action> {
        let mut actions = Vec::new();
        self.inspector.cert_in_flight = false;
        if self.closed {
            return actions;
        }
        let mut out = Vec::new();
        self.order.take(
            Out::Gateway {
                packet: self.inspector.cert_answer(&reply),
                after: self.sent,
            },
            &mut out,
        );
        actions.extend(out.into_iter().map(Action::ToDevice));
        actions
    }

    /// The gateway is stopping.
    pub fn handle_shutdown(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        if !self.closed {
            self.say_disconnect(v5::DisconnectReasonCode::ServerShuttingDown, &mut actions);
            self.close(Some("the gateway is shutting down".into()), &mut actions);
        }
        actions
    }

    /// The time is `now`: a device silent for 1.5 times its keepalive is
    /// closed, as MQTT says.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(deadline) = self.poll_timeout()
            && now >= deadline
        {
            self.say_disconnect(v5::DisconnectReasonCode::KeepAliveTimeout, &mut actions);
            let keepalive = self.silence.unwrap_or_default() * 2 / 3;
            self.close(
                Some(format!(
                    "nothing from the device for 1.5 times its keepalive of {} s",
                    keepalive.as_secs()
                )),
                &mut actions,
            );
        }
        actions
    }

    /// An MQTT 5 DISCONNECT with `code`, after what is already owed.
    fn say_disconnect(&mut self, code: v5::DisconnectReasonCode, actions: &mut Vec<Action>) {
        if self.version == Version::V5 {
            let mut out = Vec::new();
            self.order.take(
                Out::Gateway {
                    packet: v5_disconnect(code),
                    after: self.sent,
                },
                &mut out,
            );
            actions.extend(out.into_iter().map(Action::ToDevice));
        }
    }

    /// Ends the session: whatever is still held for the device goes out
    /// first, in order.
    fn close(&mut self, why: Option<String>, actions: &mut Vec<Action>) {
        if self.closed {
            return;
        }
        self.closed = true;
        let mut out = Vec::new();
        self.order.flush(&mut out);
        actions.extend(out.into_iter().map(Action::ToDevice));
        actions.push(Action::Close(why));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn puback(pkid: u16) -> Bytes {
        encode_v5(v5::Packet::PubAck(v5::PubAck {
            pkid,
            reason: v5::PubAckReason::Success,
            properties: None,
        }))
    }

    fn refused_puback(pkid: u16) -> Bytes {
        encode_v5(v5::Packet::PubAck(v5::PubAck {
            pkid,
            reason: v5::PubAckReason::NotAuthorized,
            properties: None,
        }))
    }

    fn broker(frames: &[Bytes]) -> Out {
        let mut buf = BytesMut::from(&frames.concat()[..]);
        let relay = FromBroker {
            version: Version::V5,
            upgrade: false,
        };
        let reader = Reader {
            principal: &device("any"),
            policy: &InForce::default(),
        };
        let ToDevice {
            frames, answers, ..
        } = relay.take(&mut buf, &mut VecDeque::new(), &reader);
        Out::Broker { frames, answers }
    }

    fn inspector(version: Version, me: &Principal) -> Inspector {
        Inspector::new(version, *me, 1024, Quirks::EMBEDDED)
    }

    /// What `order` lets out for `messages`, as one byte string.
    fn through(order: &mut DeviceOrder, messages: Vec<Out>) -> Vec<u8> {
        let mut out = Vec::new();
        for m in messages {
            order.take(m, &mut out);
        }
        out.concat()
    }

    #[test]
    fn the_gateways_answer_waits_for_the_brokers_answers_to_earlier_publishes() {
        let mut order = DeviceOrder::default();
        // The device sent 1 and 2 through, then 3 was refused (after 2),
        // then 4 went through.
        let held = through(
            &mut order,
            vec![
                broker(&[puback(1)]),
                Out::Gateway {
                    packet: refused_puback(3),
                    after: 2,
                },
            ],
        );
        assert_eq!(held, puback(1), "3's answer waits for 2's");
        let rest = through(&mut order, vec![broker(&[puback(2), puback(4)])]);
        assert_eq!(rest, [puback(2), refused_puback(3), puback(4)].concat());
    }

    #[test]
    fn without_earlier_publishes_the_gateways_answer_goes_at_once_and_in_turn() {
        let mut order = DeviceOrder::default();
        let publish = encode_v5(v5::Packet::Publish(v5::Publish::new(
            "devices/d/commands",
            QoS::AtMostOnce,
            "x",
            None,
        )));
        let out = through(
            &mut order,
            vec![
                broker(std::slice::from_ref(&publish)),
                Out::Gateway {
                    packet: refused_puback(1),
                    after: 0,
                },
            ],
        );
        assert_eq!(out, [publish, refused_puback(1)].concat());
        // A packet after a held one keeps its place behind it, even if it
        // waits for nothing itself.
        let mut order = DeviceOrder::default();
        let disconnect = v5_disconnect(v5::DisconnectReasonCode::ServerShuttingDown);
        let out = through(
            &mut order,
            vec![
                Out::Gateway {
                    packet: refused_puback(2),
                    after: 1,
                },
                Out::Gateway {
                    packet: disconnect.clone(),
                    after: 0,
                },
            ],
        );
        assert!(out.is_empty());
        // The session ends before the broker answers: both still go, in order.
        let mut out = Vec::new();
        order.flush(&mut out);
        assert_eq!(out.concat(), [refused_puback(2), disconnect].concat());
    }

    #[test]
    fn a_flood_of_refused_publishes_is_held_only_so_far() {
        let mut order = DeviceOrder::default();
        let mut out = Vec::new();
        for pkid in 0..3000u16 {
            order.take(
                Out::Gateway {
                    packet: refused_puback(pkid),
                    after: 1,
                },
                &mut out,
            );
        }
        assert_eq!(order.held.len(), MAX_HELD);
        assert_eq!(out.len(), 3000 - MAX_HELD);
        // Still in order among themselves.
        assert_eq!(out[0], refused_puback(0));
        order.take(broker(&[puback(1)]), &mut out);
        assert!(order.held.is_empty());
        assert_eq!(out.len(), 3001);
        assert_eq!(out.last(), Some(&refused_puback(2999)));
    }

    #[test]
    fn large_held_packets_are_bounded_by_their_bytes() {
        let mut order = DeviceOrder::default();
        let mut out = Vec::new();
        for _ in 0..10 {
            let packet = Bytes::from(vec![0u8; 20 * 1024]);
            order.take(Out::Gateway { packet, after: 1 }, &mut out);
        }
        assert!(order.held_bytes <= MAX_HELD_BYTES, "{}", order.held_bytes);
        assert_eq!(order.held_bytes, order.held.len() * 20 * 1024);
        assert_eq!(out.len() + order.held.len(), 10);
    }

    // The session as a state machine, on virtual time: what it asks the
    // shell to do, and in which order.

    fn v5_session(me: &Principal, keep_alive: u16, now: Instant) -> Session {
        Session::new(Version::V5, *me, 1024, Quirks::EMBEDDED, keep_alive, now)
    }

    fn to_device(actions: &[Action]) -> Vec<u8> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::ToDevice(b) => Some(b.to_vec()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn position(actions: &[Action], pred: impl Fn(&Action) -> bool) -> usize {
        actions
            .iter()
            .position(pred)
            .unwrap_or_else(|| panic!("not in {actions:?}"))
    }

    /// A QoS 1 PUBLISH with a 300-byte payload (a two-byte remaining length).
    fn v4_delivery(topic: &str, pkid: u16) -> Bytes {
        let mut p = v4::Publish::new(topic, mqttbytes::QoS::AtLeastOnce, vec![7u8; 300]);
        p.pkid = pkid;
        encode_v4(v4::Packet::Publish(p))
    }

    /// A subscription granted under an earlier policy does not go on
    /// delivering: a reload that takes pump-1 out of pumps withholds the
    /// broadcast, acknowledges it to the broker, and audits it once.
    #[test]
    fn deliveries_the_policy_no_longer_grants_are_withheld() {
        let rule = "[[rule]]\nname = \"b\"\napplies_to = [\"group:pumps\"]\n\
                    subscribe = [\"groups/pumps/commands\"]\n";
        let with = |members: &str| {
            twofold_trust::policy::file::parse(&format!("{rule}[groups]\npumps = [{members}]\n"))
                .unwrap()
        };
        let (reload, policy) = InForce::reloadable(with("\"device:pump-1\""));
        let me = device("pump-1");
        let t0 = Instant::now();
        let mut session =
            Session::new(Version::V311, me, 1024, Quirks::EMBEDDED, 0, t0).with_policy(policy);
        let delivered = |session: &mut Session, pkid| {
            let mut buf = BytesMut::from(&v4_delivery("groups/pumps/commands", pkid)[..]);
            session.handle_broker(&mut buf)
        };
        let actions = delivered(&mut session, 7);
        assert_eq!(
            to_device(&actions),
            v4_delivery("groups/pumps/commands", 7).to_vec()
        );

        reload.send_replace(std::sync::Arc::new(with("\"device:pump-2\"")));
        for pkid in [8u16, 9] {
            let actions = delivered(&mut session, pkid);
            assert!(to_device(&actions).is_empty(), "{actions:?}");
            let [hi, lo] = pkid.to_be_bytes();
            assert!(
                actions
                    .iter()
                    .any(|a| matches!(a, Action::ToBroker(b) if b[..] == [0x40, 2, hi, lo])),
                "no PUBACK to the broker: {actions:?}"
            );
            let refusals = actions
                .iter()
                .filter(|a| matches!(a, Action::Refused(Reason::PolicyDenied, d) if d.contains("groups/pumps/commands")))
                .count();
            assert_eq!(
                refusals,
                usize::from(pkid == 8),
                "audited once: {actions:?}"
            );
        }
        // Its own topics still arrive.
        let mut buf = BytesMut::from(&v4_delivery("devices/pump-1/commands", 10)[..]);
        assert!(!to_device(&session.handle_broker(&mut buf)).is_empty());
    }

    #[test]
    fn a_publish_head_is_read_whatever_its_length_and_not_past_its_end() {
        let long = v4_delivery("devices/pump-1/commands", 513);
        assert!(long.len() > 300, "a two-byte remaining length");
        assert_eq!(
            from_broker::publish_head(&long),
            Some(("devices/pump-1/commands".to_owned(), 1, 513))
        );
        for cut in 0..30 {
            assert_eq!(from_broker::publish_head(&long[..cut]), None, "{cut}");
        }
        let qos0 = encode_v4(v4::Packet::Publish(v4::Publish::new(
            "a/b",
            mqttbytes::QoS::AtMostOnce,
            vec![],
        )));
        assert_eq!(
            from_broker::publish_head(&qos0),
            Some(("a/b".to_owned(), 0, 0))
        );
    }

    #[test]
    fn a_refusals_answer_waits_for_the_brokers_answer_to_an_earlier_publish() {
        let me = device("sensor-1");
        let t0 = Instant::now();
        let mut session = v5_session(&me, 0, t0);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&v5_publish("devices/sensor-1/telemetry", 1));
        buf.extend_from_slice(&v5_publish("devices/sensor-2/telemetry", 2));
        let actions = session.handle_device(&mut buf, t0);
        assert!(
            to_device(&actions).is_empty(),
            "the refusal's PUBACK overtook the broker's PUBACK for 1: {actions:?}"
        );
        let mut from_broker = BytesMut::from(&puback(1)[..]);
        let actions = session.handle_broker(&mut from_broker);
        assert_eq!(
            to_device(&actions),
            [puback(1), refused_puback(2)].concat(),
            "PUBACKs in PUBLISH order"
        );
    }

    #[test]
    fn refusals_are_audited_before_the_batch_reaches_the_broker() {
        let me = device("sensor-1");
        let t0 = Instant::now();
        let mut session = v5_session(&me, 0, t0);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&v5_publish("devices/sensor-2/telemetry", 1));
        buf.extend_from_slice(&v5_publish("devices/sensor-1/telemetry", 2));
        let actions = session.handle_device(&mut buf, t0);
        let refused = position(&actions, |a| matches!(a, Action::Refused(..)));
        let forwarded = position(&actions, |a| matches!(a, Action::ToBroker(_)));
        assert!(refused < forwarded, "{actions:?}");
        // The refusal's answer was placed before the frames went out too.
        let answered = position(&actions, |a| matches!(a, Action::ToDevice(_)));
        assert!(answered < forwarded, "{actions:?}");
    }

    #[test]
    fn a_silent_device_is_closed_after_one_and_a_half_keepalives() {
        let me = device("sensor-1");
        let t0 = Instant::now();
        let mut session = v5_session(&me, 10, t0);
        assert_eq!(session.poll_timeout(), Some(t0 + Duration::from_secs(15)));
        assert!(
            session
                .handle_timeout(t0 + Duration::from_secs(14))
                .is_empty()
        );
        // A PINGREQ at 10 s moves the deadline.
        let mut ping = BytesMut::from(&[0xC0u8, 0x00][..]);
        let t10 = t0 + Duration::from_secs(10);
        let actions = session.handle_device(&mut ping, t10);
        assert!(matches!(actions.last(), Some(Action::ToBroker(_))));
        assert!(
            session
                .handle_timeout(t0 + Duration::from_secs(16))
                .is_empty()
        );
        assert_eq!(session.poll_timeout(), Some(t10 + Duration::from_secs(15)));
        let actions = session.handle_timeout(t10 + Duration::from_secs(15));
        assert_eq!(
            to_device(&actions),
            v5_disconnect(v5::DisconnectReasonCode::KeepAliveTimeout).to_vec()
        );
        assert!(
            matches!(actions.last(), Some(Action::Close(Some(why))) if why.contains("keepalive of 10 s")),
            "{actions:?}"
        );
        assert!(session.is_closed());
        assert_eq!(session.poll_timeout(), None);
        // Keepalive 0: no deadline at all.
        assert_eq!(v5_session(&me, 0, t0).poll_timeout(), None);
    }

    #[test]
    fn one_unsuback_comes_once_the_broker_has_done_the_unsubscribe() {
        let me = device("sensor-1");
        let t0 = Instant::now();
        let mut session = v5_session(&me, 0, t0);
        let mut unsub = v5::Unsubscribe::new("devices/sensor-1/a", None);
        unsub.filters.push("devices/sensor-1/b".into());
        unsub.pkid = 9;
        let unsub = encode_v5(v5::Packet::Unsubscribe(unsub));
        let mut buf = BytesMut::from(&unsub[..]);
        let actions = session.handle_device(&mut buf, t0);
        assert_eq!(
            actions.last(),
            Some(&Action::ToBroker([&unsub[..], PINGREQ].concat().into()))
        );
        // rumqttd answers one UNSUBACK per subscribed filter, then our PINGREQ.
        let theirs = encode_v5(v5::Packet::UnsubAck(v5::UnsubAck {
            pkid: 9,
            reasons: vec![v5::UnsubAckReason::Success],
            properties: None,
        }));
        let mut from_broker = BytesMut::new();
        from_broker.extend_from_slice(&theirs);
        from_broker.extend_from_slice(&theirs);
        let actions = session.handle_broker(&mut from_broker);
        assert!(to_device(&actions).is_empty(), "not before the PINGRESP");
        let mut pong = BytesMut::from(&[0xD0u8, 0x00][..]);
        let actions = session.handle_broker(&mut pong);
        let ours = encode_v5(v5::Packet::UnsubAck(v5::UnsubAck {
            pkid: 9,
            reasons: vec![v5::UnsubAckReason::Success; 2],
            properties: None,
        }));
        assert_eq!(to_device(&actions), ours.to_vec());
        // The device's own PINGREQ still gets its PINGRESP.
        let mut ping = BytesMut::from(&[0xC0u8, 0x00][..]);
        session.handle_device(&mut ping, t0);
        let mut pong = BytesMut::from(&[0xD0u8, 0x00][..]);
        assert_eq!(to_device(&session.handle_broker(&mut pong)), [0xD0, 0x00]);
    }

    #[test]
    fn a_revoked_session_gets_what_it_is_owed_then_administrative_action() {
        let me = device("sensor-1");
        let t0 = Instant::now();
        let mut session = v5_session(&me, 0, t0);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&v5_publish("devices/sensor-1/telemetry", 1));
        buf.extend_from_slice(&v5_publish("devices/sensor-2/telemetry", 2));
        session.handle_device(&mut buf, t0);
        assert!(session.handle_revocation(false).is_empty());
        let actions = session.handle_revocation(true);
        // The held refusal goes out before the DISCONNECT, and the
        // session ends.
        assert_eq!(
            to_device(&actions),
            [
                refused_puback(2),
                v5_disconnect(v5::DisconnectReasonCode::AdministrativeAction)
            ]
            .concat()
        );
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Refused(Reason::Revoked, _)))
        );
        assert!(matches!(actions.last(), Some(Action::Close(None))));
        let mut late = BytesMut::from(&v5_publish("devices/sensor-1/telemetry", 3)[..]);
        assert!(
            session.handle_device(&mut late, t0).is_empty(),
            "closed is closed"
        );
    }

    #[test]
    fn shared_groups_at_the_broker_are_the_services_own() {
        let svc = |n: &str| Principal::Service(twofold_protocol::ServiceName::parse(n).unwrap());
        let f = "$share/workers/devices/+/telemetry";
        let ingest = inspect::broker_filter(&svc("ingest"), f);
        assert!(ingest.starts_with("$share/ingest~workers~"), "{ingest}");
        assert!(ingest.ends_with("/devices/+/telemetry"), "{ingest}");
        assert_eq!(
            InForce::default().may_subscribe(&svc("ingest"), &ingest),
            Ok(())
        );
        assert_ne!(ingest, inspect::broker_filter(&svc("audit"), f));
        assert_ne!(
            ingest,
            inspect::broker_filter(&svc("ingest"), "$share/workers/devices/+/state")
        );
        assert_eq!(
            inspect::broker_filter(&svc("ingest"), "devices/+/telemetry"),
            "devices/+/telemetry"
        );
    }

    #[test]
    fn a_v5_disconnect_is_well_formed() {
        for code in [
            v5::DisconnectReasonCode::NotAuthorized,
            v5::DisconnectReasonCode::QuotaExceeded,
            v5::DisconnectReasonCode::ServerShuttingDown,
        ] {
            let bytes = v5_disconnect(code);
            let mut buf = BytesMut::from(&bytes[..]);
            match v5::Packet::read(&mut buf, None) {
                Ok(v5::Packet::Disconnect(d)) => assert_eq!(d.reason_code, code),
                other => panic!("{other:?}"),
            }
            assert!(buf.is_empty(), "a stray byte after the DISCONNECT");
        }
    }

    #[test]
    fn reads_the_protocol_level() {
        let mut c = v4::Connect::new("a");
        let frame = encode_v4(v4::Packet::Connect(c.clone()));
        assert_eq!(protocol_level(&frame), Some(4));
        c.protocol = mqttbytes::Protocol::V5;
        let v5c = v5::Connect {
            keep_alive: 10,
            client_id: "a".into(),
            clean_start: true,
            properties: None,
        };
        assert_eq!(
            protocol_level(&encode_v5(v5::Packet::Connect(v5c, None, None))),
            Some(5)
        );
        assert_eq!(protocol_level(b"\x10\x0c\x00\x06MQIsdp\x03"), None);
        assert_eq!(protocol_level(b"\x10"), None);
        assert_eq!(protocol_level(&[0x10, 0xff, 0xff, 0xff, 0xff]), None);
    }

    fn device(id: &str) -> Principal {
        Principal::Device(twofold_protocol::DeviceId::parse(id).unwrap())
    }

    fn v4_publish(topic: &str, qos: mqttbytes::QoS) -> Bytes {
        let mut p = v4::Publish::new(topic, qos, "x");
        p.pkid = u16::from(qos != mqttbytes::QoS::AtMostOnce);
        encode_v4(v4::Packet::Publish(p))
    }

    fn v5_publish(topic: &str, pkid: u16) -> Bytes {
        let mut p = v5::Publish::new(topic, QoS::AtLeastOnce, "x", None);
        p.pkid = pkid;
        encode_v5(v5::Packet::Publish(p))
    }

    /// Frames read together go out together, in order, up to a refusal;
    /// the frames behind a refusal that keeps the session wait in the
    /// buffer for the next batch, and none is lost.
    #[test]
    fn a_batch_answers_refusals_that_keep_the_session_and_forwards_the_rest() {
        let me = device("sensor-1");
        let (a, denied, b, c) = (
            v5_publish("devices/sensor-1/telemetry", 1),
            v5_publish("devices/sensor-2/telemetry", 2),
            v5_publish("devices/sensor-1/state", 3),
            v5_publish("devices/sensor-1/telemetry", 4),
        );
        let mut buf = BytesMut::new();
        for f in [&a, &denied, &b, &c] {
            buf.extend_from_slice(f);
        }
        // Half of a fifth frame: it waits for the rest.
        buf.extend_from_slice(&c[..c.len() / 2]);
        let one = inspector(Version::V5, &me).batch(&mut buf);
        assert_eq!(&one.forward[..], &[&a[..], &b[..], &c[..]].concat()[..]);
        assert_eq!(one.publishes, 3);
        assert!(one.stop.is_none());
        match &one.refused[..] {
            [(reason, _)] => assert_eq!(*reason, Reason::PolicyDenied),
            other => panic!("one refusal expected, got {}", other.len()),
        }
        // MQTT 5 answers a denied QoS 1 PUBLISH after the one before it.
        assert_eq!(one.replies, [(1, refused_puback(2))]);
        assert_eq!(&buf[..], &c[..c.len() / 2]);

        // Nothing refused: forwarded where it was read, no copy.
        buf.clear();
        buf.extend_from_slice(&a);
        buf.extend_from_slice(&b);
        let read_at = buf.as_ptr();
        let two = inspector(Version::V5, &me).batch(&mut buf);
        assert_eq!(two.forward.as_ptr(), read_at);
        assert_eq!(two.forward.len(), a.len() + b.len());
        assert!(buf.is_empty());

        // Refusals up to the session's budget are answered; the one that
        // exhausts it closes the session, with MQTT 5's QuotaExceeded.
        let mut flood = BytesMut::new();
        for pkid in 1..=5000u16 {
            flood.extend_from_slice(&v5_publish("devices/sensor-2/telemetry", pkid));
        }
        flood.extend_from_slice(&c);
        let three = inspector(Version::V5, &me).batch(&mut flood);
        assert_eq!(three.refused.len() as u32, MAX_REFUSALS - 1);
        assert!(three.forward.is_empty());
        match &three.stop {
            Some(Stop::Refused(Reason::PolicyDenied, detail)) => {
                assert!(detail.contains("32 refusals in this session"), "{detail}")
            }
            _ => panic!("the refusal budget must close the session"),
        }
        assert_eq!(
            three.replies.last().map(|(_, r)| r.clone()),
            Some(v5_disconnect(v5::DisconnectReasonCode::QuotaExceeded))
        );
        // Budgets are per session, and refusals in separate batches add up.
        let mut session = inspector(Version::V5, &me);
        for pkid in 1..MAX_REFUSALS as u16 {
            let mut one = BytesMut::from(&v5_publish("devices/sensor-2/telemetry", pkid)[..]);
            assert!(session.batch(&mut one).stop.is_none());
        }
        let mut last = BytesMut::from(&v5_publish("devices/sensor-2/telemetry", 99)[..]);
        assert!(matches!(
            session.batch(&mut last).stop,
            Some(Stop::Refused(..))
        ));
    }

    #[test]
    fn a_batch_ends_at_a_refusal_that_closes_the_session() {
        let me = device("sensor-1");
        let good = v4_publish("devices/sensor-1/telemetry", mqttbytes::QoS::AtLeastOnce);
        let denied = v4_publish("devices/sensor-2/telemetry", mqttbytes::QoS::AtLeastOnce);
        let mut buf = BytesMut::new();
        for f in [&good, &denied, &good] {
            buf.extend_from_slice(f);
        }
        let out = inspector(Version::V311, &me).batch(&mut buf);
        assert_eq!(&out.forward[..], &good[..], "nothing after the refusal");
        assert!(out.refused.is_empty());
        match out.stop {
            // MQTT 3.1.1 has no negative PUBACK.
            Some(Stop::Refused(reason, _)) => assert_eq!(reason, Reason::PolicyDenied),
            _ => panic!("the batch must end at the denied PUBLISH"),
        }
    }

    #[test]
    fn a_batch_forwards_the_frames_before_a_bad_header() {
        let me = device("sensor-1");
        let good = v4_publish("devices/sensor-1/telemetry", mqttbytes::QoS::AtLeastOnce);
        let mut buf = BytesMut::from(&good[..]);
        // A PUBLISH claiming more than the limit allows.
        buf.extend_from_slice(&[0x30, 0xff, 0xff, 0x03]);
        let out = inspector(Version::V311, &me).batch(&mut buf);
        assert_eq!(&out.forward[..], &good[..]);
        assert!(matches!(
            out.stop,
            Some(Stop::Frame(FrameError::TooLarge(_)))
        ));
        let mut malformed = BytesMut::from(&good[..]);
        // A remaining length that never ends.
        malformed.extend_from_slice(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]);
        let out = inspector(Version::V311, &me).batch(&mut malformed);
        assert_eq!(&out.forward[..], &good[..]);
        assert!(matches!(
            out.stop,
            Some(Stop::Frame(FrameError::Malformed(_)))
        ));
    }

    #[test]
    fn screening_forwards_what_the_policy_allows_and_stops_at_a_closing_refusal() {
        let me = device("sensor-1");
        let mut input = encode_v4(v4::Packet::Connect(v4::Connect::new("sensor-1"))).to_vec();
        input.extend_from_slice(&v4_publish(
            "devices/sensor-1/telemetry",
            mqttbytes::QoS::AtLeastOnce,
        ));
        input.extend_from_slice(&v4_publish(
            "devices/sensor-2/telemetry",
            mqttbytes::QoS::AtLeastOnce,
        ));
        input.extend_from_slice(&v4_publish(
            "devices/sensor-1/telemetry",
            mqttbytes::QoS::AtMostOnce,
        ));
        let out = screen(&me, &input, 1024);
        assert_eq!(out.version, Some(Version::V311));
        assert_eq!(out.forwarded.len(), 1);
        assert_eq!(out.refusals, vec![Reason::PolicyDenied]);
        assert!(out.closed);
    }

    #[test]
    fn screening_refuses_connects_the_session_would_refuse() {
        let me = device("sensor-1");
        let other = encode_v4(v4::Packet::Connect(v4::Connect::new("sensor-2")));
        assert_eq!(
            screen(&me, &other, 1024).refusals,
            vec![Reason::ClientIdMismatch]
        );
        let publish_first = v4_publish("devices/sensor-1/telemetry", mqttbytes::QoS::AtMostOnce);
        assert_eq!(
            screen(&me, &publish_first, 1024).refusals,
            vec![Reason::ProtocolError]
        );
        let connect = encode_v4(v4::Packet::Connect(v4::Connect::new("sensor-1")));
        let too_large = screen(&me, &connect, connect.len() - 3);
        assert_eq!(too_large.refusals, vec![Reason::ProtocolError]);
        // Half a CONNECT: nothing decided yet.
        let half = screen(&me, &connect[..connect.len() / 2], 1024);
        assert!(half.refusals.is_empty() && !half.closed && half.version.is_none());
    }

    fn cert_publish(topic: &str, qos: QoS, pkid: u16, payload: &[u8]) -> Bytes {
        let mut p = v5::Publish::new(topic, qos, payload.to_vec(), None);
        p.pkid = pkid;
        encode_v5(v5::Packet::Publish(p))
    }

    fn renew_request(id: &str) -> Vec<u8> {
        let mut buf = [0u8; 128];
        let request = RenewRequest {
            request_id: id,
            csr: None,
        };
        message::encode(&request, &mut buf).unwrap().to_vec()
    }

    /// The CERT_ANSWER PUBLISHes among `bytes`, decoded.
    fn answers(bytes: &[u8]) -> Vec<CertReply> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Ok(Some(frame)) = next_frame(&mut buf, usize::MAX) {
            let frame = frame.freeze();
            let header = v5::check(frame.iter(), None).unwrap();
            if frame[0] >> 4 != 3 {
                continue;
            }
            let p = v5::Publish::read(header, frame).unwrap();
            assert_eq!(p.topic, CERT_ANSWER);
            out.push(match message::decode::<CertAnswer>(&p.payload).unwrap() {
                CertAnswer::Issued { request_id, certs } => CertReply::Issued {
                    request_id: request_id.into(),
                    certs: certs.to_vec(),
                },
                CertAnswer::Refused {
                    request_id,
                    code,
                    retry_after,
                    reason,
                } => CertReply::Refused {
                    request_id: request_id.into(),
                    code,
                    retry_after,
                    reason: reason.into(),
                },
                CertAnswer::Committed { serial } => CertReply::Committed {
                    serial: serial.to_vec(),
                },
            });
        }
        out
    }

    #[test]
    fn a_renew_request_goes_to_the_ca_and_never_to_the_broker() {
        let me = device("sensor-1");
        let t0 = Instant::now();
        let mut session = v5_session(&me, 0, t0);
        let mut buf = BytesMut::from(
            &cert_publish(CERT_RENEW, QoS::AtLeastOnce, 7, &renew_request("r1"))[..],
        );
        let actions = session.handle_device(&mut buf, t0);
        assert!(
            !actions.iter().any(|a| matches!(a, Action::ToBroker(_))),
            "{actions:?}"
        );
        let ack = encode_v5(v5::Packet::PubAck(v5::PubAck {
            pkid: 7,
            reason: v5::PubAckReason::Success,
            properties: None,
        }));
        assert_eq!(to_device(&actions), ack.to_vec());
        assert_eq!(
            actions.last(),
            Some(&Action::Cert(CertRequest::Renew {
                request_id: "r1".into(),
                csr: None
            }))
        );
        // A second request before the answer: busy, and no second call.
        let mut buf =
            BytesMut::from(&cert_publish(CERT_RENEW, QoS::AtMostOnce, 0, &renew_request("r2"))[..]);
        let actions = session.handle_device(&mut buf, t0);
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Cert(_))),
            "{actions:?}"
        );
        match &answers(&to_device(&actions))[..] {
            [
                CertReply::Refused {
                    request_id,
                    code: RenewRefusal::Busy,
                    ..
                },
            ] => {
                assert_eq!(request_id, "r2")
            }
            other => panic!("{other:?}"),
        }
        // The CA's answer reaches the device; then the next request may go.
        let issued = CertReply::Issued {
            request_id: "r1".into(),
            certs: vec![0x30, 0x00],
        };
        let actions = session.handle_cert_reply(issued.clone());
        assert_eq!(answers(&to_device(&actions)), [issued]);
        let mut buf = BytesMut::from(&cert_publish(CERT_COMMIT, QoS::AtMostOnce, 0, b"")[..]);
        let actions = session.handle_device(&mut buf, t0);
        assert_eq!(actions, [Action::Cert(CertRequest::Commit)]);
    }

    #[test]
    fn the_ca_answer_waits_for_the_brokers_answers_to_earlier_publishes() {
        let me = device("sensor-1");
        let t0 = Instant::now();
        let mut session = v5_session(&me, 0, t0);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&v5_publish("devices/sensor-1/telemetry", 1));
        buf.extend_from_slice(&cert_publish(
            CERT_RENEW,
            QoS::AtMostOnce,
            0,
            &renew_request("r1"),
        ));
        session.handle_device(&mut buf, t0);
        let refused = CertReply::Refused {
            request_id: "r1".into(),
            code: RenewRefusal::NotDue,
            retry_after: 0,
            reason: "not due".into(),
        };
        let actions = session.handle_cert_reply(refused.clone());
        assert!(
            to_device(&actions).is_empty(),
            "overtook PUBACK 1: {actions:?}"
        );
        let mut from_broker = BytesMut::from(&puback(1)[..]);
        let out = to_device(&session.handle_broker(&mut from_broker));
        assert!(out.starts_with(&puback(1)), "PUBACK 1 first");
        assert_eq!(answers(&out), [refused]);
    }

    #[test]
    fn malformed_and_foreign_cert_topics_are_answered_or_refused() {
        let me = device("sensor-1");
        let t0 = Instant::now();
        let mut session = v5_session(&me, 0, t0);
        // Not a renew request: a specific refusal, the session goes on.
        let mut buf =
            BytesMut::from(&cert_publish(CERT_RENEW, QoS::AtMostOnce, 0, b"\xff\xff")[..]);
        let actions = session.handle_device(&mut buf, t0);
        match &answers(&to_device(&actions))[..] {
            [
                CertReply::Refused {
                    code: RenewRefusal::BadRequest,
                    reason,
                    ..
                },
            ] => {
                assert!(reason.contains("not a renew request"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert!(!session.is_closed());
        // Publishing on the gateway's own answer topic is refused.
        let mut buf = BytesMut::from(&cert_publish(CERT_ANSWER, QoS::AtLeastOnce, 3, b"x")[..]);
        let actions = session.handle_device(&mut buf, t0);
        assert!(
            actions.iter().any(|a| matches!(a, Action::Refused(Reason::PolicyDenied, d) if d.contains("reserved for the gateway"))),
            "{actions:?}"
        );
        assert!(
            !actions
                .iter()
                .any(|a| matches!(a, Action::ToBroker(_) | Action::Cert(_)))
        );
        // QoS 2 is not offered for renewal.
        let mut buf = BytesMut::from(
            &cert_publish(CERT_RENEW, QoS::ExactlyOnce, 4, &renew_request("r1"))[..],
        );
        let actions = session.handle_device(&mut buf, t0);
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Refused(_, d) if d.contains("QoS 2"))),
            "{actions:?}"
        );
        // MQTT 3.1.1 has no negative PUBACK: the session closes, audited.
        let mut v4_session = Session::new(Version::V311, me, 1024, Quirks::EMBEDDED, 0, t0);
        let mut p = v4::Publish::new(CERT_STATUS, mqttbytes::QoS::AtMostOnce, "x");
        p.pkid = 0;
        let mut buf = BytesMut::from(&encode_v4(v4::Packet::Publish(p))[..]);
        let actions = v4_session.handle_device(&mut buf, t0);
        assert!(
            matches!(actions.last(), Some(Action::Close(_))),
            "{actions:?}"
        );
    }

    #[test]
    fn an_expired_certificate_in_its_grace_period_may_only_renew() {
        let me = device("sensor-1");
        let t0 = Instant::now();
        let life = CertLife {
            serial: vec![7],
            not_after: 1_000_000,
            due: 999_000,
            unix: 1_000_600,
            at: t0,
        };
        for version in [Version::V311, Version::V5] {
            let mut session = Session::new(version, me, 1024, Quirks::EMBEDDED, 0, t0)
                .with_certificate(life.clone());
            let why = session.renew_only().unwrap().to_owned();
            assert!(
                why.contains("10m ago") && why.contains("may only renew"),
                "{why}"
            );
            // Telemetry: neither forwarded nor acknowledged, audited once.
            let publish = match version {
                Version::V311 => {
                    v4_publish("devices/sensor-1/telemetry", mqttbytes::QoS::AtLeastOnce)
                }
                Version::V5 => v5_publish("devices/sensor-1/telemetry", 1),
            };
            let mut buf = BytesMut::from(&[&publish[..], &publish[..]].concat()[..]);
            let actions = session.handle_device(&mut buf, t0);
            assert!(to_device(&actions).is_empty(), "{actions:?}");
            let refused: Vec<_> = actions
                .iter()
                .filter_map(|a| match a {
                    Action::Refused(r, d) => Some((*r, d.clone())),
                    Action::ToBroker(_) | Action::Close(_) => panic!("{actions:?}"),
                    _ => None,
                })
                .collect();
            assert_eq!(refused.len(), 1, "{refused:?}");
            assert_eq!(refused[0].0, Reason::RenewOnly);
            assert!(refused[0].1.contains("held back"), "{}", refused[0].1);
            // The commands: a SUBACK that refuses, and the session goes on.
            let subscribe = match version {
                Version::V311 => encode_v4(v4::Packet::Subscribe(v4::Subscribe::new(
                    "devices/sensor-1/commands",
                    mqttbytes::QoS::AtLeastOnce,
                ))),
                Version::V5 => encode_v5(v5::Packet::Subscribe(v5::Subscribe::new(
                    v5::Filter::new("devices/sensor-1/commands", QoS::AtLeastOnce),
                    None,
                ))),
            };
            let mut buf = BytesMut::from(&subscribe[..]);
            let actions = session.handle_device(&mut buf, t0);
            assert!(
                actions
                    .iter()
                    .any(|a| matches!(a, Action::Refused(Reason::RenewOnly, d) if d.contains("SUBSCRIBE"))),
                "{actions:?}"
            );
            let suback = to_device(&actions);
            assert_eq!(suback[0] >> 4, 9, "{suback:?}");
            assert!(
                suback.contains(&0x80) || suback.contains(&0x87),
                "{suback:?}"
            );
            assert!(!session.is_closed());
            // Renewing is what it may do.
            let renew = cert_publish(CERT_RENEW, QoS::AtMostOnce, 0, &renew_request("g1"));
            let renew = if version == Version::V311 {
                let mut p =
                    v4::Publish::new(CERT_RENEW, mqttbytes::QoS::AtMostOnce, renew_request("g1"));
                p.pkid = 0;
                encode_v4(v4::Packet::Publish(p))
            } else {
                renew
            };
            let mut buf = BytesMut::from(&renew[..]);
            let actions = session.handle_device(&mut buf, t0);
            assert!(
                matches!(
                    actions.last(),
                    Some(Action::Cert(CertRequest::Renew { .. }))
                ),
                "{actions:?}"
            );
        }
        // A certificate that has not expired: an ordinary session.
        let fresh = CertLife {
            unix: 999_000,
            ..life
        };
        let session = v5_session(&me, 0, t0).with_certificate(fresh);
        assert!(session.renew_only().is_none());
    }
}
