//! MQTT 5 sessions over a broker that speaks only MQTT 3.1.1 (NATS's MQTT
//! listener): each packet is rewritten down on its way to the broker and
//! up on its way back. What 3.1.1 cannot carry is refused with MQTT 5's
//! reason, never dropped unseen; the README lists both.
//!
//! Carried: topics, payloads, QoS (up to the broker's maximum), retain,
//! dup, packet ids, wills (a will delay is not: the broker publishes the
//! will at once), sessions and keepalive. Not carried, so refused: a
//! PUBLISH or will with user properties, a response topic, correlation
//! data, a content type or a message expiry; a SUBSCRIBE with no-local,
//! retain-as-published, a retain handling other than 0, or a
//! subscription identifier. Dropped as meant for the gateway alone:
//! CONNECT and SUBSCRIBE user properties, the payload format indicator.

use super::*;

/// What a 3.1.1 broker cannot carry of an MQTT 5 packet, for the audit
/// line and the device's reason.
pub(super) fn publish_not_carried(props: Option<&v5::PublishProperties>) -> Option<&'static str> {
    let p = props?;
    if !p.user_properties.is_empty() {
        Some("user properties")
    } else if p.response_topic.is_some() {
        Some("a response topic")
    } else if p.correlation_data.is_some() {
        Some("correlation data")
    } else if p.content_type.is_some() {
        Some("a content type")
    } else if p.message_expiry_interval.is_some() {
        Some("a message expiry")
    } else if !p.subscription_identifiers.is_empty() {
        Some("subscription identifiers")
    } else {
        None
    }
}

/// The same for a SUBSCRIBE: its options and its subscription identifier.
pub(super) fn subscribe_not_carried(s: &v5::Subscribe) -> Option<(&'static str, String)> {
    if s.properties.as_ref().is_some_and(|p| p.id.is_some()) {
        let filters: Vec<String> = s.filters.iter().map(|f| shown(&f.path)).collect();
        return Some(("a subscription identifier", filters.join(", ")));
    }
    s.filters.iter().find_map(|f| {
        let what = if f.nolocal {
            "no-local"
        } else if f.preserve_retain {
            "retain-as-published"
        } else if f.retain_forward_rule != v5::RetainForwardRule::OnEverySubscribe {
            "a retain handling other than 0"
        } else {
            return None;
        };
        Some((what, shown(&f.path)))
    })
}

fn qos_v4(qos: QoS, max_qos: u8) -> mqttbytes::QoS {
    match (qos, max_qos) {
        (QoS::AtMostOnce, _) | (_, 0) => mqttbytes::QoS::AtMostOnce,
        (QoS::AtLeastOnce, _) | (_, 1) => mqttbytes::QoS::AtLeastOnce,
        (QoS::ExactlyOnce, _) => mqttbytes::QoS::ExactlyOnce,
    }
}

fn qos_v5(qos: mqttbytes::QoS) -> QoS {
    match qos {
        mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
        mqttbytes::QoS::AtLeastOnce => QoS::AtLeastOnce,
        mqttbytes::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

/// An MQTT 5 CONNECT as 3.1.1, or what of it cannot be carried.
///
/// 3.1.1 has one flag where MQTT 5 has two: clean session is set only
/// for a clean start whose session ends with the connection (expiry 0).
/// A session that is to outlive the connection resumes at the broker,
/// even after a clean start, rather than lose what is queued for it.
pub(super) fn connect(
    c: v5::Connect,
    will: Option<v5::LastWill>,
    login: Option<&Credential>,
    max_qos: u8,
) -> Result<v4::Connect, String> {
    let props = c.properties.as_ref();
    if let Some(method) = props.and_then(|p| p.authentication_method.as_ref()) {
        return Err(format!(
            "authentication method {}: enhanced authentication is not offered",
            shown(method)
        ));
    }
    let expiry = props.and_then(|p| p.session_expiry_interval).unwrap_or(0);
    let last_will = match will {
        None => None,
        Some(w) => {
            let p = w.properties.as_ref();
            let not_carried = if p.is_some_and(|p| !p.user_properties.is_empty()) {
                Some("user properties")
            } else if p.is_some_and(|p| p.response_topic.is_some()) {
                Some("a response topic")
            } else if p.is_some_and(|p| p.correlation_data.is_some()) {
                Some("correlation data")
            } else if p.is_some_and(|p| p.content_type.is_some()) {
                Some("a content type")
            } else if p.is_some_and(|p| p.message_expiry_interval.is_some()) {
                Some("a message expiry")
            } else {
                None
            };
            if let Some(what) = not_carried {
                return Err(format!(
                    "a will with {what}, which the broker (MQTT 3.1.1) cannot carry"
                ));
            }
            let topic =
                String::from_utf8(w.topic.to_vec()).map_err(|_| "will topic is not UTF-8")?;
            Some(v4::LastWill {
                topic,
                message: w.message,
                qos: qos_v4(w.qos, max_qos),
                retain: w.retain,
            })
        }
    };
    Ok(v4::Connect {
        protocol: mqttbytes::Protocol::V4,
        keep_alive: c.keep_alive,
        client_id: c.client_id,
        clean_session: c.clean_start && expiry == 0,
        last_will,
        login: login.map(|k| v4::Login::new(k.username.clone(), k.password.clone())),
    })
}

/// The broker's 3.1.1 CONNACK for an MQTT 5 device: what the gateway can
/// offer over it. `Err` carries the broker's refusal.
pub(super) fn connack(
    frame: BytesMut,
    clean_start: bool,
    max_qos: u8,
) -> Result<v5::ConnAck, String> {
    let mut frame = frame;
    match v4::Packet::read(&mut frame, usize::MAX) {
        Ok(v4::Packet::ConnAck(ack)) if ack.code == v4::ConnectReturnCode::Success => {
            Ok(v5::ConnAck {
                // A clean start is told so, even where the broker kept the
                // session on (see `connect`).
                session_present: ack.session_present && !clean_start,
                code: v5::ConnectReturnCode::Success,
                properties: Some(v5::ConnAckProperties {
                    max_qos: (max_qos < 2).then_some(max_qos),
                    ..no_connack_properties()
                }),
            })
        }
        Ok(v4::Packet::ConnAck(ack)) => Err(format!("{:?}", ack.code)),
        _ => Err("not a CONNACK".into()),
    }
}

/// A device's MQTT 5 frame, already checked, as the 3.1.1 broker must see
/// it; `None` for a frame the broker must not get at all. QoS 2 above the
/// broker's maximum is refused before this; a SUBSCRIBE's is lowered.
pub(super) fn frame_down(frame: &Bytes, max_qos: u8) -> Result<Option<Bytes>, String> {
    let mut buf = BytesMut::from(&frame[..]);
    let packet = v5::Packet::read(&mut buf, None).map_err(|e| e.to_string())?;
    let down = match packet {
        v5::Packet::Publish(p) => {
            let topic = String::from_utf8(p.topic.to_vec()).map_err(|_| "topic is not UTF-8")?;
            let mut publish = v4::Publish::from_bytes(topic, qos_v4(p.qos, max_qos), p.payload);
            publish.pkid = p.pkid;
            publish.dup = p.dup;
            publish.retain = p.retain;
            v4::Packet::Publish(publish)
        }
        v5::Packet::PubAck(a) => v4::Packet::PubAck(v4::PubAck { pkid: a.pkid }),
        v5::Packet::PubRec(a) => v4::Packet::PubRec(v4::PubRec { pkid: a.pkid }),
        v5::Packet::PubRel(a) => v4::Packet::PubRel(v4::PubRel { pkid: a.pkid }),
        v5::Packet::PubComp(a) => v4::Packet::PubComp(v4::PubComp { pkid: a.pkid }),
        v5::Packet::Subscribe(s) => v4::Packet::Subscribe(v4::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| v4::SubscribeFilter::new(f.path, qos_v4(f.qos, max_qos)))
                .collect(),
        }),
        v5::Packet::Unsubscribe(u) => v4::Packet::Unsubscribe(v4::Unsubscribe {
            pkid: u.pkid,
            topics: u.filters,
        }),
        v5::Packet::PingReq(_) => v4::Packet::PingReq,
        // With reason 0x04 the device asks for its will: a 3.1.1 broker
        // publishes it when the connection ends without a DISCONNECT.
        v5::Packet::Disconnect(d)
            if d.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage =>
        {
            return Ok(None);
        }
        v5::Packet::Disconnect(_) => v4::Packet::Disconnect,
        other => return Err(format!("{other:?} has no MQTT 3.1.1 form")),
    };
    Ok(Some(encode_v4(down)))
}

/// A broker's 3.1.1 frame as the MQTT 5 device must see it, when it
/// differs: a PUBLISH and a SUBACK gain their (empty) properties. The
/// acknowledgements are already MQTT 5 (success, no properties).
pub(super) fn frame_up(frame: &[u8]) -> Option<Bytes> {
    let mut buf = BytesMut::from(frame);
    match v4::Packet::read(&mut buf, usize::MAX).ok()? {
        v4::Packet::Publish(p) => {
            let mut publish = v5::Publish::new(p.topic, qos_v5(p.qos), p.payload, None);
            publish.pkid = p.pkid;
            publish.dup = p.dup;
            publish.retain = p.retain;
            Some(encode_v5(v5::Packet::Publish(publish)))
        }
        v4::Packet::SubAck(ack) => Some(encode_v5(v5::Packet::SubAck(v5::SubAck {
            pkid: ack.pkid,
            return_codes: ack
                .return_codes
                .into_iter()
                .map(|c| match c {
                    v4::SubscribeReasonCode::Success(q) => {
                        v5::SubscribeReasonCode::Success(qos_v5(q))
                    }
                    v4::SubscribeReasonCode::Failure => v5::SubscribeReasonCode::Unspecified,
                })
                .collect(),
            properties: None,
        }))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twofold_protocol::DeviceId;

    /// NATS 2.9's MQTT listener.
    const NATS: Quirks = Quirks {
        v311_only: true,
        max_qos: 1,
        ..Quirks::NONE
    };

    fn session() -> Session {
        let me = Principal::Device(DeviceId::parse("sensor-1").unwrap());
        Session::new(Version::V5, me, 1024, NATS, 0, Instant::now())
    }

    fn split(actions: &[Action]) -> (Vec<u8>, Vec<u8>, Vec<(Reason, String)>) {
        let (mut device, mut broker, mut refused) = (Vec::new(), Vec::new(), Vec::new());
        for a in actions {
            match a {
                Action::ToDevice(b) => device.extend_from_slice(b),
                Action::ToBroker(b) => broker.extend_from_slice(b),
                Action::Refused(reason, detail) => refused.push((*reason, detail.clone())),
                _ => {}
            }
        }
        (device, broker, refused)
    }

    fn publish(qos: QoS, props: Option<v5::PublishProperties>) -> Bytes {
        let mut p = v5::Publish::new("devices/sensor-1/telemetry", qos, "x", props);
        p.pkid = u16::from(qos != QoS::AtMostOnce);
        encode_v5(v5::Packet::Publish(p))
    }

    fn v4_packet(bytes: &[u8]) -> v4::Packet {
        v4::Packet::read(&mut BytesMut::from(bytes), usize::MAX).unwrap()
    }

    #[test]
    fn a_plain_publish_goes_to_the_broker_as_3_1_1() {
        let mut s = session();
        let (device, broker, refused) = split(&s.handle_device(
            &mut BytesMut::from(&publish(QoS::AtLeastOnce, None)[..]),
            Instant::now(),
        ));
        assert!(device.is_empty() && refused.is_empty());
        let v4::Packet::Publish(p) = v4_packet(&broker) else {
            panic!("not a PUBLISH: {broker:?}");
        };
        assert_eq!(
            (p.topic.as_str(), p.pkid, &p.payload[..]),
            ("devices/sensor-1/telemetry", 1, &b"x"[..])
        );
        assert_eq!(p.qos, mqttbytes::QoS::AtLeastOnce);
    }

    #[test]
    fn what_3_1_1_cannot_carry_is_refused_with_0x83() {
        let mut s = session();
        let props = v5::PublishProperties {
            response_topic: Some("devices/sensor-1/replies".into()),
            ..Default::default()
        };
        let frame = publish(QoS::AtLeastOnce, Some(props));
        let (device, broker, refused) =
            split(&s.handle_device(&mut BytesMut::from(&frame[..]), Instant::now()));
        assert!(broker.is_empty(), "forwarded: {broker:?}");
        let v5::Packet::PubAck(ack) =
            v5::Packet::read(&mut BytesMut::from(&device[..]), None).unwrap()
        else {
            panic!("not a PUBACK");
        };
        assert_eq!(ack.reason, v5::PubAckReason::ImplementationSpecificError);
        assert_eq!(refused[0].0, Reason::Unsupported);
        assert!(
            refused[0].1.contains("with a response topic"),
            "{}",
            refused[0].1
        );
        assert!(!s.is_closed());
    }

    #[test]
    fn qos_2_above_the_brokers_maximum_gets_disconnect_0x9b() {
        let mut s = session();
        let frame = publish(QoS::ExactlyOnce, None);
        let (device, broker, refused) =
            split(&s.handle_device(&mut BytesMut::from(&frame[..]), Instant::now()));
        assert!(broker.is_empty());
        assert_eq!(
            device,
            v5_disconnect(v5::DisconnectReasonCode::QoSNotSupported).to_vec()
        );
        assert!(
            refused[0].1.contains("takes QoS 1 at most"),
            "{}",
            refused[0].1
        );
        assert!(s.is_closed());
    }

    #[test]
    fn a_subscribe_is_lowered_to_qos_1_and_options_3_1_1_lacks_are_refused() {
        let filter = |nolocal| v5::Filter {
            path: "devices/sensor-1/commands".into(),
            qos: QoS::ExactlyOnce,
            nolocal,
            preserve_retain: false,
            retain_forward_rule: v5::RetainForwardRule::OnEverySubscribe,
        };
        let subscribe = |nolocal| {
            encode_v5(v5::Packet::Subscribe(v5::Subscribe {
                pkid: 7,
                filters: vec![filter(nolocal)],
                properties: None,
            }))
        };
        let mut s = session();
        let (_, broker, _) =
            split(&s.handle_device(&mut BytesMut::from(&subscribe(false)[..]), Instant::now()));
        let v4::Packet::Subscribe(sub) = v4_packet(&broker) else {
            panic!("not a SUBSCRIBE");
        };
        assert_eq!(sub.filters[0].qos, mqttbytes::QoS::AtLeastOnce);
        // The broker's 3.1.1 SUBACK reaches the device as MQTT 5.
        let suback = encode_v4(v4::Packet::SubAck(v4::SubAck::new(
            7,
            vec![v4::SubscribeReasonCode::Success(
                mqttbytes::QoS::AtLeastOnce,
            )],
        )));
        let (device, _, _) = split(&s.handle_broker(&mut BytesMut::from(&suback[..])));
        let v5::Packet::SubAck(ack) =
            v5::Packet::read(&mut BytesMut::from(&device[..]), None).unwrap()
        else {
            panic!("not a SUBACK");
        };
        assert_eq!(
            ack.return_codes,
            vec![v5::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
        );

        let (device, broker, refused) =
            split(&s.handle_device(&mut BytesMut::from(&subscribe(true)[..]), Instant::now()));
        assert!(broker.is_empty());
        let v5::Packet::SubAck(ack) =
            v5::Packet::read(&mut BytesMut::from(&device[..]), None).unwrap()
        else {
            panic!("not a SUBACK");
        };
        assert_eq!(
            ack.return_codes,
            vec![v5::SubscribeReasonCode::ImplementationSpecific]
        );
        assert!(refused[0].1.contains("with no-local"), "{}", refused[0].1);
    }

    #[test]
    fn the_brokers_publish_reaches_the_device_as_mqtt5() {
        let mut s = session();
        let mut p = v4::Publish::new(
            "devices/sensor-1/commands",
            mqttbytes::QoS::AtLeastOnce,
            "go",
        );
        p.pkid = 3;
        let (device, _, _) =
            split(&s.handle_broker(&mut BytesMut::from(&encode_v4(v4::Packet::Publish(p))[..])));
        let v5::Packet::Publish(p) =
            v5::Packet::read(&mut BytesMut::from(&device[..]), None).unwrap()
        else {
            panic!("not a PUBLISH");
        };
        assert_eq!(
            (&p.topic[..], p.pkid, &p.payload[..]),
            (&b"devices/sensor-1/commands"[..], 3, &b"go"[..])
        );
    }

    #[test]
    fn a_disconnect_asking_for_the_will_is_not_passed_on() {
        let mut s = session();
        let with_will = Bytes::from_static(&[0xE0, 0x01, 0x04]);
        let (_, broker, _) =
            split(&s.handle_device(&mut BytesMut::from(&with_will[..]), Instant::now()));
        assert!(
            broker.is_empty(),
            "a 3.1.1 DISCONNECT would cancel the will"
        );
        let normal = v5_disconnect(v5::DisconnectReasonCode::NormalDisconnection);
        let (_, broker, _) =
            split(&session().handle_device(&mut BytesMut::from(&normal[..]), Instant::now()));
        assert_eq!(broker, vec![0xE0, 0x00]);
    }

    #[test]
    fn clean_session_only_for_a_session_that_ends_with_the_connection() {
        let clean = |clean_start, expiry| {
            let c = v5::Connect {
                keep_alive: 30,
                client_id: "device:sensor-1".into(),
                clean_start,
                properties: Some(v5::ConnectProperties {
                    session_expiry_interval: expiry,
                    ..v5::ConnectProperties::new()
                }),
            };
            connect(c, None, None, 1).unwrap().clean_session
        };
        assert!(clean(true, None));
        assert!(!clean(false, None));
        assert!(!clean(false, Some(3600)));
        assert!(!clean(true, Some(3600)), "a session to keep is kept");
    }

    #[test]
    fn a_will_3_1_1_cannot_carry_is_refused_and_qos_2_is_lowered() {
        let c = v5::Connect {
            keep_alive: 30,
            client_id: "device:sensor-1".into(),
            clean_start: true,
            properties: None,
        };
        let will = |props| {
            v5::LastWill::new(
                "devices/sensor-1/state",
                "gone",
                QoS::ExactlyOnce,
                false,
                props,
            )
        };
        let down = connect(c.clone(), Some(will(None)), None, 1).unwrap();
        assert_eq!(down.last_will.unwrap().qos, mqttbytes::QoS::AtLeastOnce);
        let props = v5::LastWillProperties {
            delay_interval: None,
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: Some("text/plain".into()),
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        };
        let e = connect(c, Some(will(Some(props))), None, 1).unwrap_err();
        assert!(e.contains("a content type"), "{e}");
    }
}
