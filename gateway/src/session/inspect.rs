//! Per-frame verdicts on what a device sends after CONNECT: the policy on
//! every PUBLISH, SUBSCRIBE, will and response topic, the refusal budget,
//! and the packets the gateway answers for the embedded broker.

use super::*;
use sha2::Digest as _;

/// The most refusals one session may earn before it is closed: a device
/// that keeps sending what the policy refuses is misbehaving, and each
/// refusal costs an audit line.
pub const MAX_REFUSALS: u32 = 32;

/// The most PINGREQs and UNSUBSCRIBEs awaiting the broker's answer.
pub(super) const MAX_PINGS: usize = 1024;

/// Who is owed the broker's next PINGRESP. After each UNSUBSCRIBE the
/// gateway sends a PINGREQ of its own: the broker answers in order, so its
/// PINGRESP says the UNSUBSCRIBE is done, and the gateway sends the one
/// UNSUBACK the device is owed (the broker's own are dropped: rumqttd
/// sends one per subscribed filter, and none for a filter never
/// subscribed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Ping {
    Device,
    Unsubscribe { pkid: u16, filters: usize },
}

pub(super) const PINGREQ: &[u8] = &[0xC0, 0x00];

/// Where a [`Batch`] ended before the bytes read so far ran out.
pub(super) enum Stop {
    /// A refusal that closes the session (its reply, if any, is among the
    /// batch's replies).
    Refused(Reason, String),
    Frame(FrameError),
}

/// Whole frames from one read of the device's stream.
pub(super) struct Batch {
    /// The allowed frames, in order, back to back.
    pub(super) forward: Bytes,
    /// How many of them are PUBLISH.
    pub(super) publishes: u64,
    /// How many of them are PUBLISH at QoS 1 or 2, which the broker answers.
    pub(super) answered: u64,
    /// The gateway's own packets for the device, in order, each with how
    /// many of the batch's QoS 1 and 2 PUBLISHes went to the broker before
    /// it (its answer goes to the device after theirs).
    pub(super) replies: Vec<(u64, Bytes)>,
    /// Refusals that keep the session (MQTT 5's reason codes), in order,
    /// for the audit log.
    pub(super) refused: Vec<(Reason, String)>,
    /// What ended the batch, if anything did: a refusal that closes the
    /// session, or a frame that cannot be read.
    pub(super) stop: Option<Stop>,
}

/// What to do with one packet from the device.
pub(super) enum Verdict {
    Forward,
    /// Forward it, followed by bytes of the gateway's own.
    ForwardThen(&'static [u8]),
    /// Forward this instead (the packet as the broker must see it),
    /// followed by bytes of the gateway's own, if any.
    Rewritten(Bytes, Option<&'static [u8]>),
    /// Keep it from the broker and answer it: not a refusal.
    Answer(Bytes),
    /// Keep it from the broker; nothing to answer (yet).
    Kept,
    /// Keep it from the broker, unanswered, and say so in the audit log:
    /// a renew-only session's PUBLISH, which the device keeps and sends
    /// again on its next session. Not counted as a refusal.
    Held(String),
    Refuse(Refusal),
}

/// A refused packet: audit it, optionally answer the device, optionally close.
pub(super) struct Refusal {
    pub(super) reason: Reason,
    pub(super) detail: String,
    pub(super) reply: Option<Bytes>,
    pub(super) close: bool,
}

pub(super) fn deny(reason: Reason, detail: String, reply: Option<Bytes>, close: bool) -> Verdict {
    Verdict::Refuse(Refusal {
        reason,
        detail,
        reply,
        close,
    })
}

/// The most characters of a peer's topic, filter or client id that an
/// audit line repeats: a 32 KB topic must not make a 32 KB line.
pub(super) const SHOWN: usize = 128;

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
    pub(super) version: Version,
    pub(super) principal: Principal,
    pub(super) max: usize,
    pub(super) quirks: Quirks,
    /// QoS 2 PUBLISHes passed to the broker in this connection and not
    /// yet released (PUBREL).
    pub(super) awaiting_release: HashSet<u16>,
    /// Who is owed the broker's next PINGRESPs, in order.
    pub(super) pings: VecDeque<Ping>,
    pub(super) refusals: u32,
    /// The certificate's life, for [`CERT_STATUS`], and the time of the
    /// batch being inspected.
    pub(super) certificate: Option<CertLife>,
    pub(super) now: Option<Instant>,
    /// Renewal requests and commits for the shell to take to the CA.
    pub(super) cert_requests: Vec<CertRequest>,
    /// Whether one is with the CA: one at a time per session.
    pub(super) cert_in_flight: bool,
    /// Why this session may only renew: its certificate expired within
    /// the grace period. `None` for every other session.
    pub(super) renew_only: Option<String>,
    /// PUBLISHes held back in a renew-only session.
    pub(super) held: u64,
    /// The topic policy in force.
    pub(super) policy: InForce,
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
            certificate: None,
            now: None,
            cert_requests: Vec::new(),
            cert_in_flight: false,
            renew_only: None,
            policy: InForce::default(),
            held: 0,
        }
    }

    /// Checks every whole frame at the front of `buf` and takes them off
    /// it. The allowed frames are forwarded as they were read: in one
    /// piece, with no copy, unless refused frames or the gateway's own
    /// bytes sit between them. A refusal that closes the session ends the
    /// batch. Linear in what was read, however many frames are refused.
    pub(super) fn batch(&mut self, buf: &mut BytesMut) -> Batch {
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
                Verdict::Rewritten(packet, then) => {
                    runs.push(Piece::Owned(packet));
                    if let Some(extra) = then {
                        runs.push(Piece::Ours(extra));
                    }
                }
                Verdict::Answer(reply) => out.replies.push((out.answered, reply)),
                Verdict::Kept => {}
                Verdict::Held(detail) => out.refused.push((Reason::RenewOnly, detail)),
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
                        Piece::Owned(bytes) => joined.extend_from_slice(bytes),
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

    /// Checks one packet from the device, and writes what passes as a
    /// 3.1.1-only broker must get it.
    pub(super) fn inspect(&mut self, frame: &Bytes) -> Verdict {
        let verdict = self.inspect_as_sent(frame);
        if self.version != Version::V5 || !self.quirks.v311_only {
            return verdict;
        }
        let max_qos = self.quirks.max_qos;
        let (packet, then) = match verdict {
            Verdict::Forward => (frame.clone(), None),
            Verdict::ForwardThen(then) => (frame.clone(), Some(then)),
            Verdict::Rewritten(packet, then) => (packet, then),
            other => return other,
        };
        match downgrade::frame_down(&packet, max_qos) {
            Ok(Some(down)) => Verdict::Rewritten(down, then),
            Ok(None) => Verdict::Kept,
            Err(e) => self.malformed("packet", e),
        }
    }

    fn inspect_as_sent(&mut self, frame: &Bytes) -> Verdict {
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
    pub(super) fn expect_pong(&mut self, owner: Ping, verdict: Verdict) -> Verdict {
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

    pub(super) fn malformed(&self, what: &str, e: impl std::fmt::Display) -> Verdict {
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

    pub(super) fn inspect_publish(&mut self, frame: Bytes) -> Verdict {
        let (max, principal) = (self.max, self.principal);
        match self.version {
            Version::V311 => {
                let p = match mqttbytes::check(frame.iter(), max)
                    .and_then(|header| v4::Publish::read(header, frame))
                {
                    Ok(p) => p,
                    Err(e) => return self.malformed("PUBLISH", e),
                };
                if p.topic.starts_with(CERT_PREFIX) {
                    return self.cert_publish(&p.topic, &p.payload, p.qos as u8, p.pkid);
                }
                if self.renew_only.is_some() {
                    return self.hold(&p.topic, p.qos as u8);
                }
                if let Some(refused) = self.above_max_qos(&p.topic, p.qos as u8) {
                    return refused;
                }
                match self.policy.may_publish(&principal, &p.topic) {
                    Ok(()) => self.passed(p.qos as u8, p.pkid),
                    // MQTT 3.1.1 has no negative PUBACK: the only answer is to close.
                    Err(d) => self.refuse_publish(
                        format!("PUBLISH to {}: {}", shown(&p.topic), d.as_str()),
                        p.qos as u8,
                        p.pkid,
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
                if topic.starts_with(CERT_PREFIX) {
                    return self.cert_publish(topic, &p.payload, p.qos as u8, p.pkid);
                }
                if self.renew_only.is_some() {
                    return self.hold(topic, p.qos as u8);
                }
                if let Some(refused) = self.above_max_qos(topic, p.qos as u8) {
                    return refused;
                }
                // A response topic is where a service will publish its
                // answer: the device may name only a topic it could
                // publish to itself, never another device's commands.
                let response = p
                    .properties
                    .as_ref()
                    .and_then(|props| props.response_topic.as_deref());
                let denied = match self.policy.may_publish(&principal, topic) {
                    Err(d) => Some(format!("PUBLISH to {}: {}", shown(topic), d.as_str())),
                    Ok(()) => response.and_then(|r| {
                        self.policy.may_publish(&principal, r).err().map(|d| {
                            format!(
                                "PUBLISH to {} with response topic {}: {}",
                                shown(topic),
                                shown(r),
                                d.as_str()
                            )
                        })
                    }),
                };
                if let Some(detail) = denied {
                    return self.refuse_publish(detail, p.qos as u8, p.pkid);
                }
                if self.quirks.v311_only
                    && let Some(what) = downgrade::publish_not_carried(p.properties.as_ref())
                {
                    let detail = format!(
                        "PUBLISH to {} with {what}, which the broker (MQTT 3.1.1) cannot carry",
                        shown(topic)
                    );
                    return self.refuse_publish_as(
                        Reason::Unsupported,
                        detail,
                        p.qos as u8,
                        p.pkid,
                    );
                }
                self.passed(p.qos as u8, p.pkid)
            }
        }
    }

    /// A PUBLISH above the QoS the broker takes: MQTT 5 is told 0x9B (QoS
    /// not supported, as its CONNACK said), 3.1.1 is closed. Either way the
    /// device keeps the message and the audit log says why.
    fn above_max_qos(&self, topic: &str, qos: u8) -> Option<Verdict> {
        let max = self.quirks.max_qos;
        if qos <= max {
            return None;
        }
        let reply = (self.version == Version::V5)
            .then(|| v5_disconnect(v5::DisconnectReasonCode::QoSNotSupported));
        Some(deny(
            Reason::Unsupported,
            format!(
                "PUBLISH to {} at QoS {qos}: the broker behind this gateway takes QoS {max} at \
                 most",
                shown(topic)
            ),
            reply,
            true,
        ))
    }

    /// A PUBLISH the policy allows: a QoS 2 one awaits its PUBREL.
    pub(super) fn passed(&mut self, qos: u8, pkid: u16) -> Verdict {
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
    pub(super) fn inspect_pubrel(&mut self, frame: Bytes) -> Verdict {
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

    pub(super) fn inspect_subscribe(&mut self, frame: Bytes) -> Verdict {
        let (version, max) = (self.version, self.max);
        let decoded = match version {
            Version::V311 => mqttbytes::check(frame.iter(), max)
                .and_then(|header| v4::Subscribe::read(header, frame))
                .map(Subscription::V4)
                .map_err(|e| e.to_string()),
            Version::V5 => v5::check(frame.iter(), Some(max as u32))
                .and_then(|header| v5::Subscribe::read(header, frame))
                .map(Subscription::V5)
                .map_err(|e| e.to_string()),
        };
        let mut decoded = match decoded {
            Ok(d) => d,
            Err(e) => return self.malformed("SUBSCRIBE", e),
        };
        let (pkid, filters): (u16, Vec<(String, bool)>) = match &decoded {
            Subscription::V4(s) => (
                s.pkid,
                s.filters.iter().map(|f| (f.path.clone(), false)).collect(),
            ),
            Subscription::V5(s) => (
                s.pkid,
                s.filters
                    .iter()
                    .map(|f| (f.path.clone(), f.nolocal))
                    .collect(),
            ),
        };
        // The certificate status is the gateway's to answer, alone;
        // anything else under `$` meets the policy below.
        if let [(only, _)] = &filters[..]
            && only == CERT_STATUS
            && let Some(answer) = self.cert_status(pkid)
        {
            return Verdict::Answer(answer);
        }
        // Answers come whether or not the device subscribed; a device (or
        // client library) that wants the subscription gets it.
        if let [(only, _)] = &filters[..]
            && only == CERT_ANSWER
        {
            return Verdict::Answer(self.suback_qos0(pkid));
        }
        if let Some(why) = &self.renew_only {
            let shown: Vec<String> = filters.iter().map(|(f, _)| shown(f)).collect();
            let detail = format!("SUBSCRIBE {}: {why}", shown.join(", "));
            return deny(
                Reason::RenewOnly,
                detail,
                Some(self.suback_refused(pkid, filters.len())),
                false,
            );
        }
        let denied: Vec<String> = filters
            .iter()
            .filter_map(|(f, _)| {
                self.policy
                    .may_subscribe(&self.principal, f)
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
        } else if let Subscription::V5(sub) = &decoded
            && self.quirks.v311_only
            && let Some((what, named)) = downgrade::subscribe_not_carried(sub)
        {
            let code = if sub.properties.as_ref().is_some_and(|p| p.id.is_some()) {
                v5::SubscribeReasonCode::SubscriptionIdNotSupported
            } else {
                v5::SubscribeReasonCode::ImplementationSpecific
            };
            (
                Reason::Unsupported,
                format!(
                    "SUBSCRIBE {named} with {what}, which the broker (MQTT 3.1.1) cannot carry"
                ),
                code,
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
        } else if filters.iter().any(|(f, _)| policy::shared(f).is_some()) {
            // Shared groups at the broker are the service's own.
            let principal = self.principal;
            let packet = match &mut decoded {
                Subscription::V4(s) => {
                    for f in &mut s.filters {
                        f.path = broker_filter(&principal, &f.path);
                    }
                    encode_v4(v4::Packet::Subscribe(s.clone()))
                }
                Subscription::V5(s) => {
                    for f in &mut s.filters {
                        f.path = broker_filter(&principal, &f.path);
                    }
                    encode_v5(v5::Packet::Subscribe(s.clone()))
                }
            };
            return Verdict::Rewritten(packet, None);
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

    /// A PUBLISH under [`CERT_PREFIX`]: the gateway's own, never the
    /// broker's. A renew request or a commit goes to the CA through the
    /// shell (one at a time); the answer comes on [`CERT_ANSWER`]. Other
    /// topics there are refused like any topic outside the policy.
    fn cert_publish(&mut self, topic: &str, payload: &[u8], qos: u8, pkid: u16) -> Verdict {
        let request = match topic {
            CERT_RENEW => match message::decode::<RenewRequest>(payload) {
                Ok(r) => Ok(CertRequest::Renew {
                    request_id: r.request_id.to_owned(),
                    csr: r.csr.map(<[u8]>::to_vec),
                }),
                Err(e) => Err((String::new(), format!("not a renew request: {e}"))),
            },
            CERT_COMMIT if payload.is_empty() => Ok(CertRequest::Commit),
            CERT_COMMIT => Err((String::new(), "a commit carries no payload".into())),
            _ => {
                let detail = format!(
                    "PUBLISH to {}: reserved for the gateway (renew on {CERT_RENEW}, commit on \
                     {CERT_COMMIT})",
                    shown(topic)
                );
                return self.refuse_publish(detail, qos, pkid);
            }
        };
        if qos == 2 {
            let detail = format!("PUBLISH to {topic} at QoS 2; use QoS 0 or 1");
            return self.refuse_publish(detail, qos, pkid);
        }
        let answer = match request {
            Err((request_id, reason)) => Some(CertReply::Refused {
                request_id,
                code: RenewRefusal::BadRequest,
                retry_after: 0,
                reason,
            }),
            Ok(request) if self.cert_in_flight => Some(CertReply::Refused {
                request_id: request.request_id().to_owned(),
                code: RenewRefusal::Busy,
                retry_after: 5,
                reason: "the previous renew or commit of this session is not answered yet".into(),
            }),
            Ok(request) => {
                self.cert_in_flight = true;
                self.cert_requests.push(request);
                None
            }
        };
        let mut out = BytesMut::new();
        if qos == 1 {
            out.extend_from_slice(&match self.version {
                Version::V311 => encode_v4(v4::Packet::PubAck(v4::PubAck { pkid })),
                Version::V5 => encode_v5(v5::Packet::PubAck(v5::PubAck {
                    pkid,
                    reason: v5::PubAckReason::Success,
                    properties: None,
                })),
            });
        }
        if let Some(answer) = answer {
            out.extend_from_slice(&self.cert_answer(&answer));
        }
        if out.is_empty() {
            Verdict::Kept
        } else {
            Verdict::Answer(out.freeze())
        }
    }

    /// A PUBLISH this session may not make: MQTT 5 answers QoS 1 and 2
    /// with "not authorized" and goes on; QoS 0 gets DISCONNECT "not
    /// authorized", and MQTT 3.1.1 (no negative PUBACK) is closed.
    fn refuse_publish(&self, detail: String, qos: u8, pkid: u16) -> Verdict {
        self.refuse_publish_as(Reason::PolicyDenied, detail, qos, pkid)
    }

    /// [`Self::refuse_publish`] for `reason`: MQTT 5's code is "not
    /// authorized" for the policy, "implementation specific" (0x83) for
    /// what the broker cannot carry.
    fn refuse_publish_as(&self, reason: Reason, detail: String, qos: u8, pkid: u16) -> Verdict {
        let policy = reason == Reason::PolicyDenied;
        match (self.version, qos) {
            (Version::V5, 1) => {
                let ack = v5::PubAck {
                    pkid,
                    reason: if policy {
                        v5::PubAckReason::NotAuthorized
                    } else {
                        v5::PubAckReason::ImplementationSpecificError
                    },
                    properties: None,
                };
                deny(
                    reason,
                    detail,
                    Some(encode_v5(v5::Packet::PubAck(ack))),
                    false,
                )
            }
            (Version::V5, 2) => {
                let rec = v5::PubRec {
                    pkid,
                    reason: if policy {
                        v5::PubRecReason::NotAuthorized
                    } else {
                        v5::PubRecReason::ImplementationSpecificError
                    },
                    properties: None,
                };
                deny(
                    reason,
                    detail,
                    Some(encode_v5(v5::Packet::PubRec(rec))),
                    false,
                )
            }
            (Version::V5, _) => {
                let code = if policy {
                    v5::DisconnectReasonCode::NotAuthorized
                } else {
                    v5::DisconnectReasonCode::ImplementationSpecificError
                };
                deny(reason, detail, Some(v5_disconnect(code)), true)
            }
            (Version::V311, _) => deny(reason, detail, None, true),
        }
    }

    /// The PUBLISH (QoS 0) on [`CERT_ANSWER`] that carries `reply`.
    pub(super) fn cert_answer(&self, reply: &CertReply) -> Bytes {
        let answer = match reply {
            CertReply::Issued { request_id, certs } => CertAnswer::Issued { request_id, certs },
            CertReply::Refused {
                request_id,
                code,
                retry_after,
                reason,
            } => CertAnswer::Refused {
                request_id,
                code: *code,
                retry_after: *retry_after,
                reason,
            },
            CertReply::Committed { serial } => CertAnswer::Committed { serial },
        };
        // Postcard writes at most the fields' lengths plus a few varints.
        let mut buf = vec![0u8; reply.len() + 64];
        let payload = match message::encode(&answer, &mut buf) {
            Ok(bytes) => Bytes::copy_from_slice(bytes),
            Err(_) => Bytes::new(),
        };
        self.publish_qos0(CERT_ANSWER, payload)
    }

    /// A QoS 0 PUBLISH of the gateway's own to the device.
    fn publish_qos0(&self, topic: &str, payload: Bytes) -> Bytes {
        match self.version {
            Version::V311 => encode_v4(v4::Packet::Publish(v4::Publish::from_bytes(
                topic,
                mqttbytes::QoS::AtMostOnce,
                payload,
            ))),
            Version::V5 => encode_v5(v5::Packet::Publish(v5::Publish::new(
                topic,
                QoS::AtMostOnce,
                payload,
                None,
            ))),
        }
    }

    /// The SUBACK of a SUBSCRIBE to [`CERT_STATUS`] alone (QoS 0), and the
    /// status: the gateway answers it, the broker never sees it. None
    /// without a certificate or a clock, which a session always has.
    fn cert_status(&self, pkid: u16) -> Option<Bytes> {
        let life = self.certificate.as_ref()?;
        let now = life.unix_at(self.now?);
        let status = CertStatus {
            serial: &life.serial,
            expires_in: u64::try_from(life.not_after - now).unwrap_or(0),
            renew_in: u64::try_from(life.due - now).unwrap_or(0),
            now: u64::try_from(now).unwrap_or(0),
        };
        let mut buf = [0u8; 64];
        let payload = Bytes::copy_from_slice(message::encode(&status, &mut buf).ok()?);
        let mut out = BytesMut::new();
        out.extend_from_slice(&self.suback_qos0(pkid));
        out.extend_from_slice(&self.publish_qos0(CERT_STATUS, payload));
        Some(out.freeze())
    }

    /// A PUBLISH of a renew-only session: held back (neither forwarded
    /// nor acknowledged, so the device keeps it for its next session).
    /// The first is audited with the reason; the rest are counted.
    fn hold(&mut self, topic: &str, qos: u8) -> Verdict {
        self.held += 1;
        match &self.renew_only {
            Some(why) if self.held == 1 => Verdict::Held(format!(
                "PUBLISH to {} (QoS {qos}) held back, not acknowledged: {why}; later ones \
                 are held without a line each",
                shown(topic)
            )),
            _ => Verdict::Kept,
        }
    }

    /// A SUBACK refusing `n` filters.
    fn suback_refused(&self, pkid: u16, n: usize) -> Bytes {
        match self.version {
            Version::V311 => encode_v4(v4::Packet::SubAck(v4::SubAck {
                pkid,
                return_codes: vec![v4::SubscribeReasonCode::Failure; n],
            })),
            Version::V5 => encode_v5(v5::Packet::SubAck(v5::SubAck {
                pkid,
                return_codes: vec![v5::SubscribeReasonCode::NotAuthorized; n],
                properties: None,
            })),
        }
    }

    /// A SUBACK granting one filter at QoS 0.
    fn suback_qos0(&self, pkid: u16) -> Bytes {
        match self.version {
            Version::V311 => encode_v4(v4::Packet::SubAck(v4::SubAck::new(
                pkid,
                vec![v4::SubscribeReasonCode::Success(mqttbytes::QoS::AtMostOnce)],
            ))),
            Version::V5 => encode_v5(v5::Packet::SubAck(v5::SubAck {
                pkid,
                return_codes: vec![v5::SubscribeReasonCode::Success(QoS::AtMostOnce)],
                properties: None,
            })),
        }
    }

    /// An UNSUBSCRIBE goes to the broker with a PINGREQ of the gateway's
    /// behind it: see [`Ping`].
    pub(super) fn inspect_unsubscribe(&mut self, frame: Bytes) -> Verdict {
        let principal = self.principal;
        // The filters as the broker must see them, if any is shared.
        let rewrite = |paths: &mut [String]| {
            let shared = paths.iter().any(|f| policy::shared(f).is_some());
            for f in paths.iter_mut().filter(|_| shared) {
                *f = broker_filter(&principal, f);
            }
            shared
        };
        let decoded = match self.version {
            Version::V311 => mqttbytes::check(frame.iter(), self.max)
                .and_then(|header| v4::Unsubscribe::read(header, frame))
                .map(|mut u| {
                    let rewritten = rewrite(&mut u.topics)
                        .then(|| encode_v4(v4::Packet::Unsubscribe(u.clone())));
                    (u.pkid, u.topics.len(), rewritten)
                })
                .map_err(|e| e.to_string()),
            Version::V5 => v5::check(frame.iter(), Some(self.max as u32))
                .and_then(|header| v5::Unsubscribe::read(header, frame))
                .map(|mut u| {
                    let rewritten = rewrite(&mut u.filters)
                        .then(|| encode_v5(v5::Packet::Unsubscribe(u.clone())));
                    (u.pkid, u.filters.len(), rewritten)
                })
                .map_err(|e| e.to_string()),
        };
        match decoded {
            Ok((pkid, filters, rewritten)) => {
                let verdict = match rewritten {
                    Some(packet) => Verdict::Rewritten(packet, Some(PINGREQ)),
                    None => Verdict::ForwardThen(PINGREQ),
                };
                self.expect_pong(Ping::Unsubscribe { pkid, filters }, verdict)
            }
            Err(e) => self.malformed("UNSUBSCRIBE", e),
        }
    }
}

/// A SUBSCRIBE as decoded, to be checked and perhaps rewritten.
pub(super) enum Subscription {
    V4(v4::Subscribe),
    V5(v5::Subscribe),
}

/// A filter as the broker must see it. rumqttd keys a shared group by its
/// name alone, across filters and clients: two services that both called
/// their group `workers` would share one, and a message for one service's
/// filter could be handed to the other's instance. So a shared group at
/// the broker is named after the service, its group and its filter:
/// `$share/<service>~<group>~<8 hex digits of SHA-256(filter)>/<filter>`
/// (`~` cannot be in a service name). Other filters pass unchanged.
pub(super) fn broker_filter(principal: &Principal, filter: &str) -> String {
    match (principal, policy::shared(filter)) {
        (Principal::Service(name), Some(Ok((group, inner)))) => {
            let digest = sha2::Sha256::digest(inner.as_bytes());
            format!(
                "$share/{}~{group}~{}/{inner}",
                name.as_str(),
                hex::encode(&digest[..4])
            )
        }
        _ => filter.to_owned(),
    }
}

/// A part of what a batch forwards.
pub(super) enum Piece {
    /// Frames as the device sent them.
    Run(std::ops::Range<usize>),
    /// Bytes of the gateway's own.
    Ours(&'static [u8]),
    /// A device's packet as the gateway rewrote it.
    Owned(Bytes),
}
