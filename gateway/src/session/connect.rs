//! The CONNECT decision: which protocol, which client id the certificate
//! allows, a will inside the policy; the CONNECT rewritten for the broker,
//! and the broker's CONNACK as the device gets it.

use super::*;

/// The parts of a CONNECT the gateway decides on, and the rewritten frame.
pub(super) struct Connect {
    pub(super) client_id: String,
    pub(super) will_topic: Option<String>,
    /// An MQTT 5 will's response topic.
    pub(super) will_response_topic: Option<String>,
    /// The keepalive the device asked for, in seconds (0: none).
    pub(super) keep_alive: u16,
    /// Keepalive 0 was sent to the broker as [`KEEPALIVE_OFF`].
    pub(super) keepalive_raised: bool,
    /// MQTT 5's clean start (3.1.1's clean session).
    pub(super) clean_start: bool,
    pub(super) forward: Bytes,
}

/// Why a CONNECT cannot go to the broker.
pub(super) enum ConnectError {
    Malformed(String),
    /// Well formed, but the broker cannot carry it (see `downgrade`).
    NotCarried(String),
}

/// Decodes a CONNECT and rewrites it for the broker.
pub(super) fn rewrite_connect(
    version: Version,
    frame: BytesMut,
    principal: &Principal,
    credential: Option<&Credential>,
    max: usize,
    quirks: Quirks,
) -> Result<Connect, ConnectError> {
    let mut frame = frame;
    let malformed = |e: String| ConnectError::Malformed(e);
    match version {
        Version::V311 => {
            let v4::Packet::Connect(mut c) =
                v4::Packet::read(&mut frame, max).map_err(|e| malformed(e.to_string()))?
            else {
                return Err(malformed("not a CONNECT".into()));
            };
            let client_id = c.client_id.clone();
            let will_topic = c.last_will.as_ref().map(|w| w.topic.clone());
            c.client_id = identity::broker_client_id(principal, &client_id);
            c.login = credential.map(|k| v4::Login::new(k.username.clone(), k.password.clone()));
            if quirks.max_qos < 2
                && let Some(will) = &mut c.last_will
                && will.qos == mqttbytes::QoS::ExactlyOnce
            {
                will.qos = mqttbytes::QoS::AtLeastOnce;
            }
            let keep_alive = c.keep_alive;
            let keepalive_raised = quirks.keepalive_at_broker(&mut c.keep_alive);
            Ok(Connect {
                client_id,
                will_topic,
                will_response_topic: None,
                keep_alive,
                keepalive_raised,
                clean_start: c.clean_session,
                forward: encode_v4(v4::Packet::Connect(c)),
            })
        }
        Version::V5 => {
            let v5::Packet::Connect(mut c, will, _) =
                v5::Packet::read(&mut frame, Some(max as u32))
                    .map_err(|e| malformed(e.to_string()))?
            else {
                return Err(malformed("not a CONNECT".into()));
            };
            let client_id = c.client_id.clone();
            let will_topic = match &will {
                Some(w) => Some(
                    String::from_utf8(w.topic.to_vec())
                        .map_err(|_| malformed("will topic is not UTF-8".into()))?,
                ),
                None => None,
            };
            let will_response_topic = will
                .as_ref()
                .and_then(|w| w.properties.as_ref())
                .and_then(|p| p.response_topic.clone());
            c.client_id = identity::broker_client_id(principal, &client_id);
            let keep_alive = c.keep_alive;
            let keepalive_raised = quirks.keepalive_at_broker(&mut c.keep_alive);
            let clean_start = c.clean_start;
            let forward = if quirks.v311_only {
                let down = downgrade::connect(c, will, credential, quirks.max_qos)
                    .map_err(ConnectError::NotCarried)?;
                encode_v4(v4::Packet::Connect(down))
            } else {
                let login =
                    credential.map(|k| v5::Login::new(k.username.clone(), k.password.clone()));
                encode_v5(v5::Packet::Connect(c, will, login))
            };
            Ok(Connect {
                client_id,
                will_topic,
                will_response_topic,
                keep_alive,
                keepalive_raised,
                clean_start,
                forward,
            })
        }
    }
}

/// A CONNECT the gateway refuses: why, and the CONNACK to answer with.
pub(super) struct ConnectRefusal {
    pub(super) reason: Reason,
    pub(super) detail: String,
    pub(super) reply: Option<Bytes>,
    pub(super) client_id: Option<String>,
}

/// Decides on a device's first frame: it must be a CONNECT of MQTT 3.1.1
/// or 5, well formed, with the client id the certificate's identity allows
/// and a will inside the policy. Returns the version and the CONNECT to
/// forward.
pub(super) fn admit(
    frame: BytesMut,
    principal: &Principal,
    policy: &crate::policy::InForce,
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
    let connect = rewrite_connect(version, frame, principal, credential, max, quirks).map_err(
        |e| match e {
            ConnectError::Malformed(e) => {
                let detail = format!("malformed CONNECT: {e}");
                refusal(Reason::ProtocolError, detail, None, None)
            }
            ConnectError::NotCarried(e) => {
                let detail = format!("CONNECT with {e}");
                let reply = v5_connack(v5::ConnectReturnCode::ImplementationSpecificError);
                refusal(Reason::Unsupported, detail, Some(reply), None)
            }
        },
    )?;
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
        policy
            .may_publish(principal, topic)
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

/// What the broker behind the gateway gets wrong, so the gateway answers
/// for it. rumqttd 0.20 (the embedded broker) closes a link that sends a
/// PUBREL for a packet id it does not know (the PUBREL a client must
/// resend after a reconnect), and ignores MQTT 5's no-local. Its network
/// links also refuse keepalive 0; its local links, which the gateway uses,
/// leave keepalive to the gateway. An external broker (mosquitto, NATS) is
/// trusted to speak MQTT itself.
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
    /// The broker speaks MQTT 3.1.1 only: MQTT 5 sessions are carried as
    /// 3.1.1 (see `downgrade`).
    pub v311_only: bool,
    /// The highest QoS the broker takes: a PUBLISH above it is refused,
    /// a SUBSCRIBE above it is granted this.
    pub max_qos: u8,
}

impl Quirks {
    /// The keepalive to send the broker in place of `keep_alive`, set in
    /// place; true when it had to be raised.
    fn keepalive_at_broker(&self, keep_alive: &mut u16) -> bool {
        let raise = self.no_keepalive_off && *keep_alive == 0;
        if raise {
            *keep_alive = KEEPALIVE_OFF;
        }
        raise
    }

    /// rumqttd 0.20, in process.
    pub const EMBEDDED: Quirks = Quirks {
        no_keepalive_off: false,
        unknown_pubrel_closes: true,
        no_local_ignored: true,
        v311_only: false,
        max_qos: 2,
    };
    /// A broker that speaks MQTT as the specification says.
    pub const NONE: Quirks = Quirks {
        no_keepalive_off: false,
        unknown_pubrel_closes: false,
        no_local_ignored: false,
        v311_only: false,
        max_qos: 2,
    };
}

/// The keepalive a device that turned keepalive off (0) gets at a broker
/// that refuses 0 ([`Quirks::no_keepalive_off`]): the largest MQTT can
/// say, 65,535 s (18 h 12 min). A device silent for 1.5 times that is
/// closed; an MQTT 5 device is told this value in its CONNACK (Server
/// Keep Alive).
pub const KEEPALIVE_OFF: u16 = u16::MAX;

/// The broker's CONNACK, as the device gets it, or why the session is
/// refused and what the device is told. MQTT 5's CONNACK says what the
/// gateway offers: no topic aliases (every PUBLISH names its topic),
/// shared subscriptions to services only, wildcards and subscription
/// identifiers, the gateway's own packet size limit, and the keepalive a
/// device that asked for none must keep.
pub(super) fn answer_connack(
    version: Version,
    frame: BytesMut,
    connect: &Connect,
    principal: &Principal,
    max: usize,
    quirks: Quirks,
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
        Version::V5 => {
            let mut ack = if quirks.v311_only {
                // The broker's refusal concerns the gateway's credential or
                // the broker itself, never the device.
                downgrade::connack(frame, connect.clean_start, quirks.max_qos).map_err(|code| {
                    (
                        format!("the broker refused the session ({code})"),
                        v5_connack(v5::ConnectReturnCode::ServerUnavailable),
                    )
                })?
            } else {
                match v5::Packet::read(&mut frame, None) {
                    Ok(v5::Packet::ConnAck(ack)) if ack.code == v5::ConnectReturnCode::Success => {
                        ack
                    }
                    Ok(v5::Packet::ConnAck(ack)) => return Err(refused(format!("{:?}", ack.code))),
                    _ => return Err(refused("not a CONNACK".into())),
                }
            };
            let props = ack.properties.get_or_insert_with(no_connack_properties);
            props.topic_alias_max = None;
            props.assigned_client_identifier = None;
            // Services may share a subscription across instances.
            props.shared_subscription_available =
                Some(u8::from(matches!(principal, Principal::Service(_))));
            props.wildcard_subscription_available = Some(1);
            props.subscription_identifiers_available = Some(u8::from(!quirks.v311_only));
            if quirks.max_qos < 2 {
                props.max_qos = Some(quirks.max_qos);
            }
            props.max_packet_size = Some(u32::try_from(max).unwrap_or(u32::MAX));
            if connect.keepalive_raised {
                props.server_keep_alive = Some(KEEPALIVE_OFF);
            }
            Ok(encode_v5(v5::Packet::ConnAck(ack)))
        }
    }
}
