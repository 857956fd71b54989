//! One device session after the TLS handshake: bind the MQTT CONNECT to the
//! certificate's identity, then relay packets both ways, checking every
//! PUBLISH, SUBSCRIBE and will against the policy.
//!
//! Packets are framed and decoded with rumqttc's codecs (3.1.1 and 5). The
//! device's frames are forwarded unchanged once checked; only the CONNECT
//! is rewritten (broker-side client id and credential). Broker → device
//! bytes are copied as they come, except the MQTT 5 CONNACK, from which
//! topic aliases are removed so that every PUBLISH names its topic.

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

use crate::audit::{Audit, Event, EventKind};
use crate::broker::{BrokerTarget, Credential, UpstreamTls};
use crate::identity::{self, CertInfo};
use crate::metrics::Direction;
use crate::policy;
use crate::reason::Reason;
use crate::revocation::RevocationList;

/// Who is connected, as established by the handshake.
#[derive(Clone, Debug)]
pub struct Peer {
    pub principal: Principal,
    /// The identity URI, for the audit log.
    pub identity: String,
    pub cert: CertInfo,
    pub addr: SocketAddr,
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

enum FrameError {
    Closed,
    /// The connection failed (a TLS error, a reset), not a clean close.
    Broken(String),
    TooLarge(usize),
    Malformed(String),
}

/// Reads the first packet, refusing at its first byte anything that is not
/// a CONNECT (instead of waiting for the rest of a frame that never comes).
async fn read_connect<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<BytesMut, FrameError> {
    while buf.is_empty() {
        match rd.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(FrameError::Closed),
            Ok(_) => {}
        }
    }
    if buf[0] != 0x10 {
        return Err(FrameError::Malformed(
            "the first packet is not CONNECT".into(),
        ));
    }
    read_frame(rd, buf, max).await
}

/// Reads one complete MQTT packet into a frame, reading more as needed.
async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<BytesMut, FrameError> {
    loop {
        if let Some(frame) = next_frame(buf, max)? {
            return Ok(frame);
        }
        match rd.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(FrameError::Closed),
            Ok(_) => {}
        }
    }
}

/// Splits one whole MQTT packet off the front of `buf`, if one is there.
fn next_frame(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, FrameError> {
    match mqttbytes::check(buf.iter(), max) {
        Ok(header) => Ok(Some(buf.split_to(header.frame_length()))),
        Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(mqttbytes::Error::PayloadSizeLimitExceeded(n)) => Err(FrameError::TooLarge(n)),
        Err(e) => Err(FrameError::Malformed(e.to_string())),
    }
}

/// The protocol level of a CONNECT frame: the byte after the length-prefixed
/// protocol name. Read by hand because the codec to decode the rest with
/// depends on it.
fn protocol_level(frame: &[u8]) -> Option<u8> {
    let header_len = 1 + frame.iter().skip(1).position(|b| b & 0x80 == 0)? + 1;
    let name = frame.get(header_len..header_len + 6)?;
    (name == b"\x00\x04MQTT")
        .then(|| frame.get(header_len + 6).copied())
        .flatten()
}

fn encode_v4(packet: v4::Packet) -> Bytes {
    let mut out = BytesMut::new();
    let _ = packet.write(&mut out, usize::MAX);
    out.freeze()
}

fn encode_v5(packet: v5::Packet) -> Bytes {
    let mut out = BytesMut::new();
    let _ = packet.write(&mut out, None);
    out.freeze()
}

fn v4_connack(code: v4::ConnectReturnCode) -> Bytes {
    encode_v4(v4::Packet::ConnAck(v4::ConnAck {
        session_present: false,
        code,
    }))
}

fn v5_connack(code: v5::ConnectReturnCode) -> Bytes {
    encode_v5(v5::Packet::ConnAck(v5::ConnAck {
        session_present: false,
        code,
        properties: None,
    }))
}

/// An MQTT 5 DISCONNECT with a reason code and an empty property list.
/// Written by hand: rumqttc 0.25 encodes this packet as remaining length 1
/// followed by two bytes (the reason and a property length), so a client
/// reads a stray byte after it; and its reader (like some others) cannot
/// read the shorter legal form, remaining length 1, at all.
fn v5_disconnect(reason_code: v5::DisconnectReasonCode) -> Bytes {
    Bytes::from(vec![0xE0, 0x02, reason_code as u8, 0x00])
}

/// The parts of a CONNECT the gateway decides on, and the rewritten frame.
struct Connect {
    client_id: String,
    will_topic: Option<String>,
    /// An MQTT 5 will's response topic.
    will_response_topic: Option<String>,
    /// The keepalive the device asked for, in seconds (0: none).
    keep_alive: u16,
    /// Keepalive 0 was sent to the broker as [`KEEPALIVE_OFF`].
    keepalive_raised: bool,
    forward: Bytes,
}

/// Decodes a CONNECT and rewrites it for the broker.
fn rewrite_connect(
    version: Version,
    frame: BytesMut,
    principal: &Principal,
    credential: Option<&Credential>,
    max: usize,
    quirks: Quirks,
) -> Result<Connect, String> {
    let mut frame = frame;
    match version {
        Version::V311 => {
            let v4::Packet::Connect(mut c) =
                v4::Packet::read(&mut frame, max).map_err(|e| e.to_string())?
            else {
                return Err("not a CONNECT".into());
            };
            let client_id = c.client_id.clone();
            let will_topic = c.last_will.as_ref().map(|w| w.topic.clone());
            c.client_id = identity::broker_client_id(principal, &client_id);
            c.login = credential.map(|k| v4::Login::new(k.username.clone(), k.password.clone()));
            let keep_alive = c.keep_alive;
            let keepalive_raised = quirks.no_keepalive_off && keep_alive == 0;
            if keepalive_raised {
                c.keep_alive = KEEPALIVE_OFF;
            }
            Ok(Connect {
                client_id,
                will_topic,
                will_response_topic: None,
                keep_alive,
                keepalive_raised,
                forward: encode_v4(v4::Packet::Connect(c)),
            })
        }
        Version::V5 => {
            let v5::Packet::Connect(mut c, will, _) =
                v5::Packet::read(&mut frame, Some(max as u32)).map_err(|e| e.to_string())?
            else {
                return Err("not a CONNECT".into());
            };
            let client_id = c.client_id.clone();
            let will_topic = match &will {
                Some(w) => Some(
                    String::from_utf8(w.topic.to_vec())
                        .map_err(|_| "will topic is not UTF-8".to_owned())?,
                ),
                None => None,
            };
            let will_response_topic = will
                .as_ref()
                .and_then(|w| w.properties.as_ref())
                .and_then(|p| p.response_topic.clone());
            c.client_id = identity::broker_client_id(principal, &client_id);
            let login = credential.map(|k| v5::Login::new(k.username.clone(), k.password.clone()));
            let keep_alive = c.keep_alive;
            let keepalive_raised = quirks.no_keepalive_off && keep_alive == 0;
            if keepalive_raised {
                c.keep_alive = KEEPALIVE_OFF;
            }
            Ok(Connect {
                client_id,
                will_topic,
                will_response_topic,
                keep_alive,
                keepalive_raised,
                forward: encode_v5(v5::Packet::Connect(c, will, login)),
            })
        }
    }
}

/// A CONNECT the gateway refuses: why, and the CONNACK to answer with.
struct ConnectRefusal {
    reason: Reason,
    detail: String,
    reply: Option<Bytes>,
    client_id: Option<String>,
}

/// Decides on a device's first frame: it must be a CONNECT of MQTT 3.1.1
/// or 5, well formed, with the client id the certificate's identity allows
/// and a will inside the policy. Returns the version and the CONNECT to
/// forward.
fn admit(
    frame: BytesMut,
    principal: &Principal,
    credential: Option<&Credential>,
    max: usize,
    quirks: Quirks,
) -> Result<(Version, Connect), ConnectRefusal> {
    let refusal = |reason, detail, reply, client_id| ConnectRefusal {
        reason,
        detail,
        reply,
        client_id,
    };
    let version = match protocol_level(&frame) {
        Some(4) => Version::V311,
        Some(5) => Version::V5,
        other => {
            let detail = format!("MQTT protocol level {other:?}; only 4 (3.1.1) and 5 are spoken");
            let reply = v4_connack(v4::ConnectReturnCode::RefusedProtocolVersion);
            return Err(refusal(Reason::ProtocolError, detail, Some(reply), None));
        }
    };
    let connect =
        rewrite_connect(version, frame, principal, credential, max, quirks).map_err(|e| {
            let detail = format!("malformed CONNECT: {e}");
            refusal(Reason::ProtocolError, detail, None, None)
        })?;
    let client_id = connect.client_id.clone();
    if !identity::client_id_matches(principal, &client_id) {
        let reply = match version {
            Version::V311 => v4_connack(v4::ConnectReturnCode::NotAuthorized),
            Version::V5 => v5_connack(v5::ConnectReturnCode::ClientIdentifierNotValid),
        };
        let expected = match principal {
            Principal::Device(id) => format!("{:?}", id.as_str()),
            Principal::Service(name) => {
                format!("{:?} or \"{}-<instance>\"", name.as_str(), name.as_str())
            }
        };
        let detail = format!(
            "client id {}; the certificate requires {expected}",
            shown(&client_id)
        );
        return Err(refusal(
            Reason::ClientIdMismatch,
            detail,
            Some(reply),
            Some(client_id),
        ));
    }
    let will = [
        ("will topic", &connect.will_topic),
        ("will response topic", &connect.will_response_topic),
    ];
    if let Some((what, topic, d)) = will.iter().find_map(|(what, topic)| {
        let topic = topic.as_deref()?;
        policy::may_publish(principal, topic)
            .err()
            .map(|d| (what, topic, d))
    }) {
        let reply = match version {
            Version::V311 => v4_connack(v4::ConnectReturnCode::NotAuthorized),
            Version::V5 => v5_connack(v5::ConnectReturnCode::NotAuthorized),
        };
        let detail = format!("{what} {}: {}", shown(topic), d.as_str());
        return Err(refusal(
            Reason::PolicyDenied,
            detail,
            Some(reply),
            Some(client_id),
        ));
    }
    Ok((version, connect))
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
    let version = match admit(frame, principal, None, max, quirks) {
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
            Action::Relayed { .. } => {}
        }
    }
    out
}

/// What the broker behind the gateway gets wrong, so the gateway answers
/// for it. rumqttd 0.20 (the embedded broker) closes a link whose
/// keepalive is 0 without a CONNACK, and one that sends a PUBREL for a
/// packet id it does not know (the PUBREL a client must resend after a
/// reconnect); it also ignores MQTT 5's no-local. An external broker
/// (mosquitto, NATS) is trusted to speak MQTT itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quirks {
    /// Keepalive 0 ("off") is sent to the broker as [`KEEPALIVE_OFF`].
    pub no_keepalive_off: bool,
    /// A PUBREL for a packet id not PUBLISHed in this connection is
    /// answered by the gateway, never passed on.
    pub unknown_pubrel_closes: bool,
    /// SUBSCRIBE with MQTT 5's no-local is refused (0x83): the broker
    /// would send a client its own messages.
    pub no_local_ignored: bool,
}

impl Quirks {
    /// rumqttd 0.20, in process.
    pub const EMBEDDED: Quirks = Quirks {
        no_keepalive_off: true,
        unknown_pubrel_closes: true,
        no_local_ignored: true,
    };
    /// A broker that speaks MQTT as the specification says.
    pub const NONE: Quirks = Quirks {
        no_keepalive_off: false,
        unknown_pubrel_closes: false,
        no_local_ignored: false,
    };
}

/// The keepalive a device that turned keepalive off (0) gets at the
/// embedded broker, which refuses 0: the largest MQTT can say, 65,535 s
/// (18 h 12 min). A device silent for 1.5 times that is closed; an MQTT 5
/// device is told this value in its CONNACK (Server Keep Alive).
pub const KEEPALIVE_OFF: u16 = u16::MAX;

/// The most refusals one session may earn before it is closed: a device
/// that keeps sending what the policy refuses is misbehaving, and each
/// refusal costs an audit line.
pub const MAX_REFUSALS: u32 = 32;

/// The most PINGREQs and UNSUBSCRIBEs awaiting the broker's answer.
const MAX_PINGS: usize = 1024;

/// Who is owed the broker's next PINGRESP. After each UNSUBSCRIBE the
/// gateway sends a PINGREQ of its own: the broker answers in order, so its
/// PINGRESP says the UNSUBSCRIBE is done, and the gateway sends the one
/// UNSUBACK the device is owed (the broker's own are dropped: rumqttd
/// sends one per subscribed filter, and none for a filter never
/// subscribed).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ping {
    Device,
    Unsubscribe { pkid: u16, filters: usize },
}

const PINGREQ: &[u8] = &[0xC0, 0x00];

/// Where a [`Batch`] ended before the bytes read so far ran out.
enum Stop {
    /// A refusal that closes the session (its reply, if any, is among the
    /// batch's replies).
    Refused(Reason, String),
    Frame(FrameError),
}

/// Whole frames from one read of the device's stream.
struct Batch {
    /// The allowed frames, in order, back to back.
    forward: Bytes,
    /// How many of them are PUBLISH.
    publishes: u64,
    /// How many of them are PUBLISH at QoS 1 or 2, which the broker answers.
    answered: u64,
    /// The gateway's own packets for the device, in order, each with how
    /// many of the batch's QoS 1 and 2 PUBLISHes went to the broker before
    /// it (its answer goes to the device after theirs).
    replies: Vec<(u64, Bytes)>,
    /// Refusals that keep the session (MQTT 5's reason codes), in order,
    /// for the audit log.
    refused: Vec<(Reason, String)>,
    /// What ended the batch, if anything did: a refusal that closes the
    /// session, or a frame that cannot be read.
    stop: Option<Stop>,
}

/// What to do with one packet from the device.
enum Verdict {
    Forward,
    /// Forward it, followed by bytes of the gateway's own.
    ForwardThen(&'static [u8]),
    /// Keep it from the broker and answer it: not a refusal.
    Answer(Bytes),
    Refuse(Refusal),
}

/// A refused packet: audit it, optionally answer the device, optionally close.
struct Refusal {
    reason: Reason,
    detail: String,
    reply: Option<Bytes>,
    close: bool,
}

fn deny(reason: Reason, detail: String, reply: Option<Bytes>, close: bool) -> Verdict {
    Verdict::Refuse(Refusal {
        reason,
        detail,
        reply,
        close,
    })
}

/// The most characters of a peer's topic, filter or client id that an
/// audit line repeats: a 32 KB topic must not make a 32 KB line.
const SHOWN: usize = 128;

/// A peer's string for an audit line: quoted, and cut after [`SHOWN`]
/// characters with its full length said.
pub fn shown(s: &str) -> String {
    match s.char_indices().nth(SHOWN) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes, truncated)", &s[..cut], s.len()),
    }
}

/// The policy and protocol checks on a device's packets after CONNECT,
/// and what they must remember between packets. Pure: bytes in, verdicts
/// out; [`run`] performs them and [`screen`] records them.
pub struct Inspector {
    version: Version,
    principal: Principal,
    max: usize,
    quirks: Quirks,
    /// QoS 2 PUBLISHes passed to the broker in this connection and not
    /// yet released (PUBREL).
    awaiting_release: HashSet<u16>,
    /// Who is owed the broker's next PINGRESPs, in order.
    pings: VecDeque<Ping>,
    refusals: u32,
}

impl Inspector {
    pub fn new(version: Version, principal: Principal, max: usize, quirks: Quirks) -> Inspector {
        Inspector {
            version,
            principal,
            max,
            quirks,
            awaiting_release: HashSet::new(),
            pings: VecDeque::new(),
            refusals: 0,
        }
    }

    /// Checks every whole frame at the front of `buf` and takes them off
    /// it. The allowed frames are forwarded as they were read: in one
    /// piece, with no copy, unless refused frames or the gateway's own
    /// bytes sit between them. A refusal that closes the session ends the
    /// batch. Linear in what was read, however many frames are refused.
    fn batch(&mut self, buf: &mut BytesMut) -> Batch {
        let max = self.max;
        // First, how far the whole frames go, from their headers alone.
        let mut whole = 0;
        let mut bad = None;
        loop {
            match mqttbytes::check(buf[whole..].iter(), max) {
                Ok(header) => whole += header.frame_length(),
                Err(mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(mqttbytes::Error::PayloadSizeLimitExceeded(n)) => {
                    bad = Some(FrameError::TooLarge(n));
                    break;
                }
                Err(e) => {
                    bad = Some(FrameError::Malformed(e.to_string()));
                    break;
                }
            }
        }
        let frames = buf.split_to(whole).freeze();
        let mut out = Batch {
            forward: Bytes::new(),
            publishes: 0,
            answered: 0,
            replies: Vec::new(),
            refused: Vec::new(),
            stop: None,
        };
        // The allowed runs of frames, as ranges of `frames`, and the
        // gateway's own bytes between them.
        let mut runs: Vec<Piece> = Vec::new();
        let mut at = 0;
        while at < frames.len() {
            // Each of these headers was read above.
            let end = match mqttbytes::check(frames[at..].iter(), max) {
                Ok(header) => at + header.frame_length(),
                Err(e) => {
                    bad = Some(FrameError::Malformed(e.to_string()));
                    break;
                }
            };
            let frame = frames.slice(at..end);
            let mut verdict = self.inspect(&frame);
            if let Verdict::Refuse(refusal) = &mut verdict
                && !refusal.close
            {
                self.refusals += 1;
                if self.refusals >= MAX_REFUSALS {
                    refusal.close = true;
                    refusal.detail = format!(
                        "{}; {} refusals in this session, the most allowed: session closed",
                        refusal.detail, self.refusals
                    );
                    if self.version == Version::V5 {
                        refusal.reply =
                            Some(v5_disconnect(v5::DisconnectReasonCode::QuotaExceeded));
                    }
                }
            }
            match verdict {
                Verdict::Forward | Verdict::ForwardThen(_) => {
                    let publish = frame[0] >> 4 == 3;
                    out.publishes += u64::from(publish);
                    out.answered += u64::from(publish && frame[0] & 0b0110 != 0);
                    match runs.last_mut() {
                        Some(Piece::Run(run)) if run.end == at => run.end = end,
                        _ => runs.push(Piece::Run(at..end)),
                    }
                    if let Verdict::ForwardThen(extra) = verdict {
                        runs.push(Piece::Ours(extra));
                    }
                }
                Verdict::Answer(reply) => out.replies.push((out.answered, reply)),
                Verdict::Refuse(refusal) => {
                    if let Some(reply) = refusal.reply {
                        out.replies.push((out.answered, reply));
                    }
                    if refusal.close {
                        bad = None;
                        out.stop = Some(Stop::Refused(refusal.reason, refusal.detail));
                        break;
                    }
                    out.refused.push((refusal.reason, refusal.detail));
                }
            }
            at = end;
        }
        out.forward = match &runs[..] {
            [] => Bytes::new(),
            [Piece::Run(run)] => frames.slice(run.clone()),
            _ => {
                let mut joined = BytesMut::new();
                for piece in &runs {
                    match piece {
                        Piece::Run(run) => joined.extend_from_slice(&frames[run.clone()]),
                        Piece::Ours(bytes) => joined.extend_from_slice(bytes),
                    }
                }
                joined.freeze()
            }
        };
        if out.stop.is_none() {
            out.stop = bad.map(Stop::Frame);
        }
        out
    }

    /// Checks one packet from the device.
    fn inspect(&mut self, frame: &Bytes) -> Verdict {
        let version = self.version;
        let packet_type = frame.first().map(|b| b >> 4).unwrap_or(0);
        match packet_type {
            // CONNECT again, or AUTH (enhanced authentication is not offered).
            1 | 15 => {
                let reply = (version == Version::V5)
                    .then(|| v5_disconnect(v5::DisconnectReasonCode::ProtocolError));
                deny(
                    Reason::ProtocolError,
                    "unexpected CONNECT or AUTH in a session".into(),
                    reply,
                    true,
                )
            }
            3 => self.inspect_publish(frame.clone()),
            6 => self.inspect_pubrel(frame.clone()),
            8 => self.inspect_subscribe(frame.clone()),
            10 => self.inspect_unsubscribe(frame.clone()),
            12 => self.expect_pong(Ping::Device, Verdict::Forward),
            _ => Verdict::Forward,
        }
    }

    /// Queues who is owed the broker's next PINGRESP.
    fn expect_pong(&mut self, owner: Ping, verdict: Verdict) -> Verdict {
        if self.pings.len() >= MAX_PINGS {
            let reply = (self.version == Version::V5)
                .then(|| v5_disconnect(v5::DisconnectReasonCode::ReceiveMaximumExceeded));
            return deny(
                Reason::ProtocolError,
                format!("{MAX_PINGS} PINGREQs or UNSUBSCRIBEs await the broker's answer"),
                reply,
                true,
            );
        }
        self.pings.push_back(owner);
        verdict
    }

    fn malformed(&self, what: &str, e: impl std::fmt::Display) -> Verdict {
        let reply = (self.version == Version::V5)
            .then(|| v5_disconnect(v5::DisconnectReasonCode::MalformedPacket));
        deny(
            Reason::ProtocolError,
            format!("malformed {what}: {e}"),
            reply,
            true,
        )
    }

    // The readers below parse the frame in place (a `Bytes` clone shares
    // it); `inspect` has checked the packet type.

    fn inspect_publish(&mut self, frame: Bytes) -> Verdict {
        let (max, principal) = (self.max, self.principal);
        match self.version {
            Version::V311 => {
                let p = match mqttbytes::check(frame.iter(), max)
                    .and_then(|header| v4::Publish::read(header, frame))
                {
                    Ok(p) => p,
                    Err(e) => return self.malformed("PUBLISH", e),
                };
                match policy::may_publish(&principal, &p.topic) {
                    Ok(()) => self.passed(p.qos as u8, p.pkid),
                    // MQTT 3.1.1 has no negative PUBACK: the only answer is to close.
                    Err(d) => deny(
                        Reason::PolicyDenied,
                        format!("PUBLISH to {}: {}", shown(&p.topic), d.as_str()),
                        None,
                        true,
                    ),
                }
            }
            Version::V5 => {
                let p = match v5::check(frame.iter(), Some(max as u32))
                    .and_then(|header| v5::Publish::read(header, frame))
                {
                    Ok(p) => p,
                    Err(e) => return self.malformed("PUBLISH", e),
                };
                if p.properties
                    .as_ref()
                    .is_some_and(|props| props.topic_alias.is_some())
                {
                    let reply = Some(v5_disconnect(v5::DisconnectReasonCode::TopicAliasInvalid));
                    return deny(
                        Reason::ProtocolError,
                        "topic aliases are not accepted".into(),
                        reply,
                        true,
                    );
                }
                let Ok(topic) = std::str::from_utf8(&p.topic) else {
                    return self.malformed("PUBLISH", "topic is not UTF-8");
                };
                // A response topic is where a service will publish its
                // answer: the device may name only a topic it could
                // publish to itself, never another device's commands.
                let response = p
                    .properties
                    .as_ref()
                    .and_then(|props| props.response_topic.as_deref());
                let denied = match policy::may_publish(&principal, topic) {
                    Err(d) => Some(format!("PUBLISH to {}: {}", shown(topic), d.as_str())),
                    Ok(()) => response.and_then(|r| {
                        policy::may_publish(&principal, r).err().map(|d| {
                            format!(
                                "PUBLISH to {} with response topic {}: {}",
                                shown(topic),
                                shown(r),
                                d.as_str()
                            )
                        })
                    }),
                };
                let Some(detail) = denied else {
                    return self.passed(p.qos as u8, p.pkid);
                };
                match p.qos {
                    QoS::AtMostOnce => deny(
                        Reason::PolicyDenied,
                        detail,
                        Some(v5_disconnect(v5::DisconnectReasonCode::NotAuthorized)),
                        true,
                    ),
                    QoS::AtLeastOnce => {
                        let ack = v5::PubAck {
                            pkid: p.pkid,
                            reason: v5::PubAckReason::NotAuthorized,
                            properties: None,
                        };
                        deny(
                            Reason::PolicyDenied,
                            detail,
                            Some(encode_v5(v5::Packet::PubAck(ack))),
                            false,
                        )
                    }
                    QoS::ExactlyOnce => {
                        let rec = v5::PubRec {
                            pkid: p.pkid,
                            reason: v5::PubRecReason::NotAuthorized,
                            properties: None,
                        };
                        deny(
                            Reason::PolicyDenied,
                            detail,
                            Some(encode_v5(v5::Packet::PubRec(rec))),
                            false,
                        )
                    }
                }
            }
        }
    }

    /// A PUBLISH the policy allows: a QoS 2 one awaits its PUBREL.
    fn passed(&mut self, qos: u8, pkid: u16) -> Verdict {
        if qos == 2 {
            self.awaiting_release.insert(pkid);
        }
        Verdict::Forward
    }

    /// A PUBREL releases a QoS 2 PUBLISH. One for a packet id not
    /// PUBLISHed in this connection is the resend the specification asks
    /// for after a reconnect (the PUBCOMP was lost); rumqttd closes the
    /// link on it, so the gateway answers it: PUBCOMP, in MQTT 5 with
    /// 0x92 (packet identifier not found), as rumqttd kept nothing of it.
    fn inspect_pubrel(&mut self, frame: Bytes) -> Verdict {
        if !self.quirks.unknown_pubrel_closes {
            return Verdict::Forward;
        }
        let pkid = match self.version {
            Version::V311 => mqttbytes::check(frame.iter(), self.max)
                .and_then(|header| v4::PubRel::read(header, frame))
                .map(|p| p.pkid)
                .map_err(|e| e.to_string()),
            Version::V5 => v5::check(frame.iter(), Some(self.max as u32))
                .and_then(|header| v5::PubRel::read(header, frame))
                .map(|p| p.pkid)
                .map_err(|e| e.to_string()),
        };
        let pkid = match pkid {
            Ok(pkid) => pkid,
            Err(e) => return self.malformed("PUBREL", e),
        };
        if self.awaiting_release.remove(&pkid) {
            return Verdict::Forward;
        }
        Verdict::Answer(match self.version {
            Version::V311 => encode_v4(v4::Packet::PubComp(v4::PubComp { pkid })),
            Version::V5 => encode_v5(v5::Packet::PubComp(v5::PubComp {
                pkid,
                reason: v5::PubCompReason::PacketIdentifierNotFound,
                properties: None,
            })),
        })
    }

    fn inspect_subscribe(&mut self, frame: Bytes) -> Verdict {
        let (version, max) = (self.version, self.max);
        let (pkid, filters): (u16, Vec<(String, bool)>) = match version {
            Version::V311 => match mqttbytes::check(frame.iter(), max)
                .and_then(|header| v4::Subscribe::read(header, frame))
            {
                Ok(s) => (
                    s.pkid,
                    s.filters.into_iter().map(|f| (f.path, false)).collect(),
                ),
                Err(e) => return self.malformed("SUBSCRIBE", e),
            },
            Version::V5 => match v5::check(frame.iter(), Some(max as u32))
                .and_then(|header| v5::Subscribe::read(header, frame))
            {
                Ok(s) => (
                    s.pkid,
                    s.filters.into_iter().map(|f| (f.path, f.nolocal)).collect(),
                ),
                Err(e) => return self.malformed("SUBSCRIBE", e),
            },
        };
        let denied: Vec<String> = filters
            .iter()
            .filter_map(|(f, _)| {
                policy::may_subscribe(&self.principal, f)
                    .err()
                    .map(|d| format!("{}: {}", shown(f), d.as_str()))
            })
            .collect();
        let (reason, detail, code) = if !denied.is_empty() {
            (
                Reason::PolicyDenied,
                format!("SUBSCRIBE {}", denied.join(", ")),
                v5::SubscribeReasonCode::NotAuthorized,
            )
        } else if self.quirks.no_local_ignored && filters.iter().any(|(_, no_local)| *no_local) {
            let named: Vec<String> = filters
                .iter()
                .filter(|(_, no_local)| *no_local)
                .map(|(f, _)| shown(f))
                .collect();
            (
                Reason::Unsupported,
                format!(
                    "SUBSCRIBE {} with no-local, which the embedded broker does not honour",
                    named.join(", ")
                ),
                v5::SubscribeReasonCode::ImplementationSpecific,
            )
        } else {
            return Verdict::Forward;
        };
        match version {
            Version::V311 => deny(reason, detail, None, true),
            // A SUBSCRIBE with any refused filter is refused as a whole.
            Version::V5 => {
                let ack = v5::SubAck {
                    pkid,
                    return_codes: vec![code; filters.len()],
                    properties: None,
                };
                deny(
                    reason,
                    detail,
                    Some(encode_v5(v5::Packet::SubAck(ack))),
                    false,
                )
            }
        }
    }

    /// An UNSUBSCRIBE goes to the broker with a PINGREQ of the gateway's
    /// behind it: see [`Ping`].
    fn inspect_unsubscribe(&mut self, frame: Bytes) -> Verdict {
        let filters = match self.version {
            Version::V311 => mqttbytes::check(frame.iter(), self.max)
                .and_then(|header| v4::Unsubscribe::read(header, frame))
                .map(|u| (u.pkid, u.topics.len()))
                .map_err(|e| e.to_string()),
            Version::V5 => v5::check(frame.iter(), Some(self.max as u32))
                .and_then(|header| v5::Unsubscribe::read(header, frame))
                .map(|u| (u.pkid, u.filters.len()))
                .map_err(|e| e.to_string()),
        };
        match filters {
            Ok((pkid, filters)) => self.expect_pong(
                Ping::Unsubscribe { pkid, filters },
                Verdict::ForwardThen(PINGREQ),
            ),
            Err(e) => self.malformed("UNSUBSCRIBE", e),
        }
    }
}

/// A part of what a batch forwards.
enum Piece {
    /// Frames as the device sent them.
    Run(std::ops::Range<usize>),
    /// Bytes of the gateway's own.
    Ours(&'static [u8]),
}

/// What the broker sent, made ready for the device: whole frames only,
/// with the broker's UNSUBACKs dropped and the gateway's own taking the
/// place of the PINGRESP that answers its PINGREQ (see [`Ping`]).
struct FromBroker {
    version: Version,
}

/// Frames for the device, with how many are PUBLISH and how many answer
/// the device's PUBLISHes.
struct ToDevice {
    frames: Bytes,
    publishes: u64,
    answers: u64,
}

impl FromBroker {
    /// Takes the whole frames at the front of `buf`. Bytes the codec cannot
    /// frame are passed on as they are: they come from the broker, which
    /// the gateway trusts.
    fn take(&self, buf: &mut BytesMut, pings: &mut VecDeque<Ping>) -> ToDevice {
        let mut at = 0;
        let mut publishes = 0;
        let mut answers = 0;
        // Cut points: a frame to drop, or to replace.
        let mut edits: Vec<(std::ops::Range<usize>, Option<Bytes>)> = Vec::new();
        while at < buf.len() {
            match mqttbytes::check(buf[at..].iter(), usize::MAX) {
                Ok(header) => {
                    let end = at + header.frame_length();
                    match buf[at] >> 4 {
                        3 => publishes += 1,
                        4 | 5 => answers += 1,
                        11 => edits.push((at..end, None)),
                        13 => {
                            if let Some(Ping::Unsubscribe { pkid, filters }) = pings.pop_front() {
                                edits.push((at..end, Some(self.unsuback(pkid, filters))));
                            }
                        }
                        _ => {}
                    }
                    at = end;
                }
                Err(mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(_) => {
                    at = buf.len();
                    break;
                }
            }
        }
        let taken = buf.split_to(at).freeze();
        let frames = if edits.is_empty() {
            taken
        } else {
            let mut joined = BytesMut::with_capacity(taken.len());
            let mut from = 0;
            for (cut, with) in edits {
                joined.extend_from_slice(&taken[from..cut.start]);
                if let Some(with) = with {
                    joined.extend_from_slice(&with);
                }
                from = cut.end;
            }
            joined.extend_from_slice(&taken[from..]);
            joined.freeze()
        };
        ToDevice {
            frames,
            publishes,
            answers,
        }
    }

    /// One UNSUBACK for one UNSUBSCRIBE. The broker cannot tell which
    /// filters it held, so MQTT 5 gets Success for each (the
    /// specification's answer once the subscription is gone).
    fn unsuback(&self, pkid: u16, filters: usize) -> Bytes {
        match self.version {
            Version::V311 => encode_v4(v4::Packet::UnsubAck(v4::UnsubAck { pkid })),
            Version::V5 => encode_v5(v5::Packet::UnsubAck(v5::UnsubAck {
                pkid,
                reasons: vec![v5::UnsubAckReason::Success; filters],
                properties: None,
            })),
        }
    }
}

/// Is this (a frame's first byte) the broker's answer to a device's
/// PUBLISH: PUBACK (QoS 1) or PUBREC (QoS 2)?
fn is_answer(first: u8) -> bool {
    matches!(first >> 4, 4 | 5)
}

/// What goes to the device's writer.
enum Out {
    /// Whole frames from the broker, `answers` of them PUBACK or PUBREC.
    Broker { frames: Bytes, answers: u64 },
    /// A packet of the gateway's own, to go out once the broker has
    /// answered the first `after` QoS 1 and 2 PUBLISHes the device sent
    /// through.
    Gateway { packet: Bytes, after: u64 },
}

/// The most packets of the gateway's own held back for their turn, and
/// the most bytes (a refused SUBSCRIBE's SUBACK grows with its filters).
const MAX_HELD: usize = 1024;
const MAX_HELD_BYTES: usize = 64 * 1024;

/// Keeps what goes to the device in order. The broker answers the
/// PUBLISHes it was sent in order; the gateway's own answer to a refused
/// PUBLISH waits until the broker has answered every PUBLISH the device
/// sent before it, since MQTT 5 wants PUBACKs (and PUBRECs) in the order
/// of the PUBLISHes. The gateway's other packets (a refused SUBSCRIBE's
/// SUBACK, a DISCONNECT) keep their place after those answers too.
#[derive(Default)]
struct DeviceOrder {
    /// The broker's PUBACKs and PUBRECs passed on so far.
    answered: u64,
    /// The gateway's packets waiting for their turn, in order.
    held: std::collections::VecDeque<(u64, Bytes)>,
    /// Their bytes.
    held_bytes: usize,
}

impl DeviceOrder {
    /// Takes one message; appends what may go out now to `out`, in order.
    fn take(&mut self, message: Out, out: &mut Vec<Bytes>) {
        match message {
            Out::Broker { frames, answers } if self.held.is_empty() => {
                self.answered += answers;
                out.push(frames);
            }
            Out::Broker { frames, .. } => {
                // Frame by frame: a held packet goes out right after the
                // answer it waits for.
                let (mut at, mut start) = (0, 0);
                while at < frames.len() {
                    let Ok(header) = mqttbytes::check(frames[at..].iter(), usize::MAX) else {
                        break;
                    };
                    let answer = is_answer(frames[at]);
                    at += header.frame_length();
                    if answer {
                        self.answered += 1;
                        if self.ready() {
                            out.push(frames.slice(start..at.min(frames.len())));
                            start = at.min(frames.len());
                            self.release(out);
                        }
                    }
                }
                if start < frames.len() {
                    out.push(frames.slice(start..));
                }
            }
            Out::Gateway { packet, after } => {
                self.held_bytes += packet.len();
                self.held.push_back((after, packet));
                self.release(out);
                // A device that floods refused PUBLISHes while the broker
                // has yet to answer an earlier one: the order gives way
                // before memory does.
                while self.held.len() > MAX_HELD || self.held_bytes > MAX_HELD_BYTES {
                    self.pop(out);
                }
            }
        }
    }

    fn ready(&self) -> bool {
        self.held
            .front()
            .is_some_and(|(after, _)| *after <= self.answered)
    }

    fn release(&mut self, out: &mut Vec<Bytes>) {
        while self.ready() {
            self.pop(out);
        }
    }

    fn pop(&mut self, out: &mut Vec<Bytes>) {
        if let Some((_, packet)) = self.held.pop_front() {
            self.held_bytes -= packet.len();
            out.push(packet);
        }
    }

    /// The session is ending: whatever is still held goes out, in order.
    fn flush(&mut self, out: &mut Vec<Bytes>) {
        while !self.held.is_empty() {
            self.pop(out);
        }
    }
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
            from_broker: FromBroker { version },
            order: DeviceOrder::default(),
            sent: 0,
            silence: (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
            heard: now,
            closed: false,
        }
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
        let ToDevice {
            frames,
            publishes,
            answers,
        } = self.from_broker.take(buf, &mut self.inspector.pings);
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

type UpstreamHalves = (
    Box<dyn AsyncRead + Send + Unpin>,
    Box<dyn AsyncWrite + Send + Unpin>,
);

/// Opens the connection to the broker, over TLS for `mqtts://`.
async fn connect_upstream(
    addr: SocketAddr,
    tls: Option<&UpstreamTls>,
) -> std::io::Result<UpstreamHalves> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    Ok(match tls {
        None => {
            let (rd, wr) = tcp.into_split();
            (Box::new(rd), Box::new(wr))
        }
        Some(tls) => {
            let stream = tls.connector.connect(tls.server_name.clone(), tcp).await?;
            let (rd, wr) = tokio::io::split(stream);
            (Box::new(rd), Box::new(wr))
        }
    })
}

/// The most bytes of queued messages joined into one write to a device.
const WRITE_BATCH: usize = 16 * 1024;
/// What one read brought.
enum Read {
    Data,
    End,
    Failed(std::io::Error),
}

/// The smallest and largest reads of a session, from the device or from
/// the broker. A read from the broker shares its allocation with the
/// frames split off it until the device has them, so at most the 16 queued
/// sends times this is held for a slow device.
const READ_CHUNK_MIN: usize = 512;
const READ_CHUNK_MAX: usize = 16 * 1024;

/// How much one side of a session reads at a time. Reads grow while they
/// fill the room they were given (a device sending a burst, a subscriber
/// receiving many devices' traffic), so a busy session takes in large
/// pieces and forwards them in one write each; once it is quiet again, it
/// goes back to a small buffer.
struct Reads {
    chunk: usize,
}

impl Reads {
    fn new() -> Reads {
        Reads {
            chunk: READ_CHUNK_MIN,
        }
    }

    /// Reads once into `buf`.
    async fn more<R: AsyncRead + Unpin>(&mut self, rd: &mut R, buf: &mut BytesMut) -> Read {
        // Quiet again after a burst or a large frame: what is left (at
        // most the start of the next frame) moves to a small buffer.
        if self.chunk == READ_CHUNK_MIN
            && buf.capacity() > 2 * READ_CHUNK_MIN
            && buf.len() < READ_CHUNK_MIN
        {
            let mut small = BytesMut::with_capacity(READ_CHUNK_MIN);
            small.extend_from_slice(buf);
            *buf = small;
        }
        if buf.capacity() - buf.len() < READ_CHUNK_MIN {
            buf.reserve(self.chunk);
        }
        let room = buf.capacity() - buf.len();
        match rd.read_buf(buf).await {
            Ok(0) => Read::End,
            Err(e) => Read::Failed(e),
            Ok(n) => {
                self.chunk = if n == room {
                    (self.chunk * 2).min(READ_CHUNK_MAX)
                } else {
                    READ_CHUNK_MIN
                };
                Read::Data
            }
        }
    }

    /// Reads until `buf` starts with a whole frame, or with a header that
    /// cannot start one (which [`batch`] reports).
    async fn frame<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        buf: &mut BytesMut,
        max: usize,
    ) -> Result<(), FrameError> {
        loop {
            match mqttbytes::check(buf.iter(), max) {
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                _ => return Ok(()),
            }
            match self.more(rd, buf).await {
                Read::Data => {}
                Read::End => return Err(FrameError::Closed),
                Read::Failed(e) => return Err(FrameError::Broken(e.to_string())),
            }
        }
    }
}

/// Runs a session to its end. Every refusal is audited exactly once.
pub async fn run<S>(
    stream: S,
    peer: Peer,
    broker: BrokerTarget,
    limits: Limits,
    audit: Audit,
    mut revocations: watch::Receiver<Arc<RevocationList>>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let refuse = |reason: Reason, detail: String, client_id: Option<&str>| {
        let mut e = Event::refused(peer.addr, reason, detail)
            .with_certificate(Some(peer.cert.clone()))
            .with_identity(peer.identity.clone());
        if let Some(id) = client_id {
            e = e.with_client_id(id);
        }
        audit.record(&e);
    };
    let (mut rd, mut wr) = tokio::io::split(stream);
    let max = limits.max_packet_size;
    let mut buf = BytesMut::with_capacity(512);

    let frame =
        match tokio::time::timeout(limits.connect_timeout, read_connect(&mut rd, &mut buf, max))
            .await
        {
            Err(_) => {
                return refuse(
                    Reason::HandshakeTimeout,
                    format!("no CONNECT within {:?}", limits.connect_timeout),
                    None,
                );
            }
            Ok(Err(FrameError::Closed | FrameError::Broken(_))) => return,
            Ok(Err(FrameError::TooLarge(n))) => {
                return refuse(
                    Reason::ProtocolError,
                    format!("first packet is {n} bytes; the limit is {max}"),
                    None,
                );
            }
            Ok(Err(FrameError::Malformed(e))) => {
                return refuse(
                    Reason::ProtocolError,
                    format!("malformed packet: {e}"),
                    None,
                );
            }
            Ok(Ok(frame)) => frame,
        };

    let credential = broker.credential.as_ref();
    let quirks = if broker.embedded {
        Quirks::EMBEDDED
    } else {
        Quirks::NONE
    };
    let (version, connect) = match admit(frame, &peer.principal, credential, max, quirks) {
        Ok(admitted) => admitted,
        Err(refusal) => {
            if let Some(reply) = &refusal.reply {
                let _ = wr.write_all(reply).await;
                let _ = wr.shutdown().await;
            }
            return refuse(refusal.reason, refusal.detail, refusal.client_id.as_deref());
        }
    };
    let client_id = connect.client_id.clone();

    let addr = match version {
        Version::V311 => broker.v4,
        Version::V5 => broker.v5,
    };
    let unavailable = match version {
        Version::V311 => v4_connack(v4::ConnectReturnCode::ServiceUnavailable),
        Version::V5 => v5_connack(v5::ConnectReturnCode::ServerUnavailable),
    };
    let upstream =
        match tokio::time::timeout(BROKER_TIMEOUT, connect_upstream(addr, broker.tls.as_ref()))
            .await
        {
            Ok(Ok(s)) => s,
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".into(),
                };
                tracing::error!(broker = %addr, %error, "cannot reach the broker");
                let _ = wr.write_all(&unavailable).await;
                return refuse(
                    Reason::BrokerUnavailable,
                    format!("cannot reach the broker at {addr}: {error}"),
                    Some(&client_id),
                );
            }
        };
    let (mut up_rd, mut up_wr) = upstream;
    let mut up_buf = BytesMut::with_capacity(READ_CHUNK_MIN);
    // The session exists once the broker has accepted it: the device's
    // later packets wait in its socket until then.
    let connack = async {
        up_wr.write_all(&connect.forward).await.ok()?;
        read_frame(&mut up_rd, &mut up_buf, usize::MAX).await.ok()
    };
    let connack = match tokio::time::timeout(BROKER_TIMEOUT, connack).await {
        Ok(Some(frame)) => answer_connack(version, frame, &connect, max),
        _ => Err(("no CONNACK from the broker".to_owned(), unavailable)),
    };
    let connack = match connack {
        Ok(connack) => connack,
        Err((why, reply)) => {
            let _ = wr.write_all(&reply).await;
            let _ = wr.shutdown().await;
            return refuse(Reason::BrokerUnavailable, why, Some(&client_id));
        }
    };
    let metrics = audit.metrics().clone();
    metrics.session_started(peer.cert.not_after);
    let presence = audit.presence().clone();
    let broker_id = identity::broker_client_id(&peer.principal, &client_id);
    let (token, previous) = presence.arrive(&broker_id, peer.addr);
    audit.record(
        &Event::new(EventKind::Connected, peer.addr)
            .with_identity(peer.identity.clone())
            .with_client_id(client_id.clone())
            .with_certificate(Some(peer.cert.clone())),
    );
    if let Some(previous) = previous {
        audit.record(&Event::taken_over(&peer, &client_id, previous));
    }

    let mut session = Session::new(
        version,
        peer.principal,
        max,
        quirks,
        connect.keep_alive,
        Instant::now(),
    );
    // One writer owns the device side, so that a slow device holds up
    // only its own session; what it gets is in order already.
    let (to_device, outbox) = mpsc::channel::<Bytes>(16);
    let _ = to_device.send(connack).await;
    let writer = tokio::spawn(device_writer(wr, outbox));
    let mut device_reads = Reads::new();
    let mut broker_reads = Reads::new();
    let mut watching = true;
    // Bytes the broker sent after its CONNACK come first.
    let mut actions = session.handle_broker(&mut up_buf);
    // Why the session ended, when neither side simply closed it.
    let mut ended: Option<String>;
    'session: loop {
        for action in actions.drain(..) {
            match action {
                Action::ToDevice(bytes) => {
                    if to_device.send(bytes).await.is_err() {
                        ended = Some("the device's connection failed".into());
                        break 'session;
                    }
                }
                Action::ToBroker(frames) => {
                    if up_wr.write_all(&frames).await.is_err() {
                        ended = Some("the broker connection failed".into());
                        break 'session;
                    }
                }
                Action::Refused(reason, detail) => refuse(reason, detail, Some(&client_id)),
                Action::Relayed {
                    direction,
                    messages,
                    bytes,
                } => metrics.relayed(direction, messages, bytes),
                Action::Close(why) => {
                    ended = why;
                    break 'session;
                }
            }
        }
        let deadline = session.poll_timeout();
        let silence = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        actions = tokio::select! {
            read = device_reads.frame(&mut rd, &mut buf, max) => match read {
                Ok(()) => session.handle_device(&mut buf, Instant::now()),
                Err(FrameError::Broken(e)) => session.handle_device_end(Some(e)),
                Err(_) => session.handle_device_end(None),
            },
            read = broker_reads.more(&mut up_rd, &mut up_buf) => match read {
                Read::Data => session.handle_broker(&mut up_buf),
                Read::End | Read::Failed(_) => session.handle_broker_end(),
            },
            _ = shutdown.changed() => session.handle_shutdown(),
            changed = revocations.changed(), if watching => {
                if changed.is_err() {
                    watching = false;
                    Vec::new()
                } else {
                    let revoked = revocations
                        .borrow_and_update()
                        .is_revoked(&peer.cert.issuer, &peer.cert.serial);
                    session.handle_revocation(revoked)
                }
            }
            _ = silence => session.handle_timeout(Instant::now()),
        };
    }
    metrics.session_ended(peer.cert.not_after);
    drop(to_device);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    // A lingering close: what the device still sends is read and dropped
    // until it closes too (at most half a second), since closing a socket
    // with unread bytes resets it, and the reset can destroy the last
    // packet (a DISCONNECT with its reason) before the device reads it.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        let mut sink = [0u8; 1024];
        while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
    if let Some(holder) = presence.leave(&broker_id, token) {
        ended = Some(format!(
            "taken over by another connection of this identity from {holder}"
        ));
    }
    let mut event = Event::new(EventKind::Disconnected, peer.addr)
        .with_identity(peer.identity.clone())
        .with_client_id(client_id);
    if let Some(why) = ended {
        event = event.with_detail(why);
    }
    audit.record(&event);
}

/// Writes what the session sends the device, joining what is queued
/// into one write (and as few TLS records as its size allows), until the
/// session drops its end; then closes the TLS stream.
async fn device_writer<W: AsyncWrite + Unpin>(mut wr: W, mut outbox: mpsc::Receiver<Bytes>) {
    while let Some(first) = outbox.recv().await {
        let mut bytes = first;
        if bytes.len() < WRITE_BATCH
            && let Ok(next) = outbox.try_recv()
        {
            let mut joined = BytesMut::with_capacity(WRITE_BATCH);
            joined.extend_from_slice(&bytes);
            joined.extend_from_slice(&next);
            while joined.len() < WRITE_BATCH {
                let Ok(next) = outbox.try_recv() else { break };
                joined.extend_from_slice(&next);
            }
            bytes = joined.freeze();
        }
        if wr.write_all(&bytes).await.is_err() || wr.flush().await.is_err() {
            break;
        }
    }
    let _ = wr.shutdown().await;
}

/// How long the broker has to accept a connection and answer a CONNECT.
const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

/// The broker's CONNACK, as the device gets it, or why the session is
/// refused and what the device is told. MQTT 5's CONNACK says what the
/// gateway offers: no topic aliases (every PUBLISH names its topic), no
/// shared subscriptions, wildcards and subscription identifiers, the
/// gateway's own packet size limit, and the keepalive a device that asked
/// for none must keep.
fn answer_connack(
    version: Version,
    frame: BytesMut,
    connect: &Connect,
    max: usize,
) -> Result<Bytes, (String, Bytes)> {
    let mut frame = frame;
    let original = frame.clone().freeze();
    let refused = |code: String| {
        (
            format!("the broker refused the session ({code})"),
            original.clone(),
        )
    };
    match version {
        Version::V311 => match v4::Packet::read(&mut frame, usize::MAX) {
            Ok(v4::Packet::ConnAck(ack)) if ack.code == v4::ConnectReturnCode::Success => {
                Ok(original)
            }
            Ok(v4::Packet::ConnAck(ack)) => Err(refused(format!("{:?}", ack.code))),
            _ => Err(refused("not a CONNACK".into())),
        },
        Version::V5 => match v5::Packet::read(&mut frame, None) {
            Ok(v5::Packet::ConnAck(mut ack)) if ack.code == v5::ConnectReturnCode::Success => {
                let props = ack.properties.get_or_insert_with(|| v5::ConnAckProperties {
                    session_expiry_interval: None,
                    receive_max: None,
                    max_qos: None,
                    retain_available: None,
                    max_packet_size: None,
                    assigned_client_identifier: None,
                    topic_alias_max: None,
                    reason_string: None,
                    user_properties: Vec::new(),
                    wildcard_subscription_available: None,
                    subscription_identifiers_available: None,
                    shared_subscription_available: None,
                    server_keep_alive: None,
                    response_information: None,
                    server_reference: None,
                    authentication_method: None,
                    authentication_data: None,
                });
                props.topic_alias_max = None;
                props.assigned_client_identifier = None;
                props.shared_subscription_available = Some(0);
                props.wildcard_subscription_available = Some(1);
                props.subscription_identifiers_available = Some(1);
                props.max_packet_size = Some(u32::try_from(max).unwrap_or(u32::MAX));
                if connect.keepalive_raised {
                    props.server_keep_alive = Some(KEEPALIVE_OFF);
                }
                Ok(encode_v5(v5::Packet::ConnAck(ack)))
            }
            Ok(v5::Packet::ConnAck(ack)) => Err(refused(format!("{:?}", ack.code))),
            _ => Err(refused("not a CONNACK".into())),
        },
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
        };
        let ToDevice {
            frames, answers, ..
        } = relay.take(&mut buf, &mut VecDeque::new());
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
}
