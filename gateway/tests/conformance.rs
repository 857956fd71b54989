//! What outside clients found (issue 17), tried with a raw MQTT client over
//! mutual TLS: the gateway must answer as MQTT says where the embedded
//! broker would not, refuse what it cannot carry with a reason code, keep
//! identities apart at the broker, and keep the audit log small and telling.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self, v4};
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5;
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use twofold_tests::*;

#[derive(Debug)]
struct Always(Arc<CertifiedKey>);

impl ResolvesClientCert for Always {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// A TLS client presenting `cert` with `key` (not necessarily its key).
fn tls_config(
    fleet: &Fleet,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let server_ca = fleet.pki.server_ca_pem().unwrap();
    for ca in CertificateDer::pem_slice_iter(server_ca.as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let chain: Vec<_> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = provider
        .key_provider
        .load_private_key(PrivateKeyDer::from_pem_file(key).unwrap())
        .unwrap();
    // `CertifiedKey::new` does not check that the key is the
    // certificate's: a peer holding a copied certificate can do the same.
    let certified = Arc::new(CertifiedKey::new(chain, key));
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(Always(certified)));
    Arc::new(config)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum V {
    V4,
    V5,
}

/// A raw MQTT client over mutual TLS.
struct Raw {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    buf: BytesMut,
    version: V,
}

/// What the gateway sent. One at a time, so its size does not matter.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Got {
    V4(v4::Packet),
    V5(v5::Packet),
    /// The connection ended (cleanly or not).
    Closed,
}

impl Raw {
    fn open(fleet: &Fleet, gw: &Gateway, who: &Identity, version: V) -> Raw {
        Raw::open_with(fleet, gw, &who.cert, &who.key, version)
    }

    fn open_with(
        fleet: &Fleet,
        gw: &Gateway,
        cert: &std::path::Path,
        key: &std::path::Path,
        version: V,
    ) -> Raw {
        let config = tls_config(fleet, cert, key);
        let name = ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(config, name).unwrap();
        let tcp = TcpStream::connect(gw.addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw {
            tls: rustls::StreamOwned::new(conn, tcp),
            buf: BytesMut::new(),
            version,
        }
    }

    /// Opens a session: CONNECT, and the CONNACK it got.
    fn connect(
        fleet: &Fleet,
        gw: &Gateway,
        who: &Identity,
        version: V,
        client_id: &str,
        clean: bool,
        keep_alive: u16,
    ) -> (Raw, Got) {
        let mut raw = Raw::open(fleet, gw, who, version);
        let connect = match version {
            V::V4 => {
                let mut c = v4::Connect::new(client_id);
                c.clean_session = clean;
                c.keep_alive = keep_alive;
                v4_bytes(v4::Packet::Connect(c))
            }
            V::V5 => {
                let mut c = v5::Connect {
                    keep_alive,
                    client_id: client_id.into(),
                    clean_start: clean,
                    properties: None,
                };
                if !clean {
                    // A session that outlives the connection.
                    c.properties = Some(v5::ConnectProperties {
                        session_expiry_interval: Some(3600),
                        ..v5::ConnectProperties::new()
                    });
                }
                v5_bytes(v5::Packet::Connect(c, None, None))
            }
        };
        raw.send(&connect);
        let ack = raw.next();
        (raw, ack)
    }

    fn send(&mut self, bytes: &[u8]) {
        let _ = self.tls.write_all(bytes).and_then(|_| self.tls.flush());
    }

    /// The next packet, or `Closed`; panics after 10 s of silence.
    fn next(&mut self) -> Got {
        loop {
            let mut frame = self.buf.clone();
            let parsed = match self.version {
                V::V4 => match v4::Packet::read(&mut frame, usize::MAX) {
                    Ok(p) => Some(Got::V4(p)),
                    Err(mqttbytes::Error::InsufficientBytes(_)) => None,
                    Err(e) => panic!("undecodable packet from the gateway: {e}"),
                },
                V::V5 => match v5::Packet::read(&mut frame, None) {
                    Ok(p) => Some(Got::V5(p)),
                    Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => None,
                    Err(e) => panic!("undecodable packet from the gateway: {e}"),
                },
            };
            if let Some(p) = parsed {
                self.buf = frame;
                return p;
            }
            let mut chunk = [0u8; 4096];
            match self.tls.read(&mut chunk) {
                Ok(0) => return Got::Closed,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("nothing from the gateway within 10 s")
                }
                Err(_) => return Got::Closed,
            }
        }
    }

    /// The next packet within `secs`, or `None` after that much silence.
    fn poll(&mut self, secs: u64) -> Option<Got> {
        let sock = &self.tls.sock;
        sock.set_read_timeout(Some(Duration::from_secs(secs)))
            .unwrap();
        let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.next())).ok();
        self.tls
            .sock
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        got
    }

    /// A PINGREQ and its PINGRESP: everything the gateway sent before it
    /// comes back first.
    fn drain(&mut self) -> Vec<Got> {
        self.send(&[0xC0, 0x00]);
        let mut got = Vec::new();
        loop {
            match self.next() {
                Got::V4(v4::Packet::PingResp) | Got::V5(v5::Packet::PingResp(_)) => return got,
                Got::Closed => panic!("closed before PINGRESP, after {got:?}"),
                other => got.push(other),
            }
        }
    }
}

fn v4_bytes(p: v4::Packet) -> Bytes {
    let mut out = BytesMut::new();
    p.write(&mut out, usize::MAX).unwrap();
    out.freeze()
}

fn v5_bytes(p: v5::Packet) -> Bytes {
    let mut out = BytesMut::new();
    p.write(&mut out, None).unwrap();
    out.freeze()
}

fn v5_publish(topic: &str, qos: QoS5, pkid: u16, props: Option<v5::PublishProperties>) -> Bytes {
    let mut p = v5::Publish::new(topic, qos, "x", props);
    p.pkid = pkid;
    v5_bytes(v5::Packet::Publish(p))
}

fn v5_connack(got: Got) -> v5::ConnAck {
    match got {
        Got::V5(v5::Packet::ConnAck(ack)) => ack,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn v4_connack(got: Got) -> v4::ConnAck {
    match got {
        Got::V4(v4::Packet::ConnAck(ack)) => ack,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn publish_props() -> v5::PublishProperties {
    v5::PublishProperties {
        payload_format_indicator: None,
        message_expiry_interval: None,
        topic_alias: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
        subscription_identifiers: Vec::new(),
        content_type: None,
    }
}

#[test]
fn a_service_cannot_take_over_another_services_session() {
    let mut fleet = Fleet::new();
    let dash = fleet.service("dashboard");
    let dash_eu = fleet.service("dashboard-eu");
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(&fleet, "");

    for (intruder_id, victim, victim_id) in [
        ("dashboard-eu", &dash_eu, "dashboard-eu"),
        ("dashboard-eu-1", &dash_eu, "dashboard-eu-1"),
    ] {
        // The real one: a persistent session with a subscription.
        let (mut real, ack) = Raw::connect(&fleet, &gw, victim, V::V4, victim_id, false, 60);
        assert_eq!(v4_connack(ack).code, v4::ConnectReturnCode::Success);
        let sub = v4::Subscribe::new("devices/+/telemetry", mqttbytes::QoS::AtLeastOnce);
        real.send(&v4_bytes(v4::Packet::Subscribe(sub)));
        assert!(matches!(real.next(), Got::V4(v4::Packet::SubAck(_))));

        // `dashboard` with the client id of `dashboard-eu`'s session (as
        // its instance `eu` or `eu-1`): a session of its own.
        let (mut intruder, ack) = Raw::connect(&fleet, &gw, &dash, V::V4, intruder_id, false, 60);
        let ack = v4_connack(ack);
        assert_eq!(ack.code, v4::ConnectReturnCode::Success);
        assert!(
            !ack.session_present,
            "{intruder_id}: the intruder got {victim_id}'s session"
        );
        let (mut device, ack) = Raw::connect(&fleet, &gw, &dev, V::V4, "sensor-1", true, 60);
        assert_eq!(v4_connack(ack).code, v4::ConnectReturnCode::Success);
        let mut p = v4::Publish::new(
            "devices/sensor-1/telemetry",
            mqttbytes::QoS::AtLeastOnce,
            "t",
        );
        p.pkid = 1;
        device.send(&v4_bytes(v4::Packet::Publish(p)));
        assert!(matches!(device.next(), Got::V4(v4::Packet::PubAck(_))));
        // The real subscriber still has its session, and the telemetry.
        match real.next() {
            Got::V4(v4::Packet::Publish(p)) => assert_eq!(p.topic, "devices/sensor-1/telemetry"),
            other => panic!("{victim_id} lost its session to {intruder_id}: {other:?}"),
        }
        assert!(
            intruder.drain().is_empty(),
            "the intruder received something"
        );
    }
    assert!(
        !gw.events().iter().any(|e| e["event"] == "taken_over"),
        "{:#?}",
        gw.events()
    );
}

#[test]
fn a_session_takeover_is_audited_with_both_addresses() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(&fleet, "");
    let (mut first, ack) = Raw::connect(&fleet, &gw, &dev, V::V4, "sensor-1", true, 60);
    assert_eq!(v4_connack(ack).code, v4::ConnectReturnCode::Success);
    let first_addr = first.tls.sock.local_addr().unwrap().to_string();
    let (second, ack) = Raw::connect(&fleet, &gw, &dev, V::V4, "sensor-1", true, 60);
    assert_eq!(v4_connack(ack).code, v4::ConnectReturnCode::Success);
    let second_addr = second.tls.sock.local_addr().unwrap().to_string();
    assert!(
        matches!(first.next(), Got::Closed),
        "the first session stays"
    );
    let taken = gw
        .wait_for(|e| e["event"] == "taken_over")
        .unwrap_or_else(|| panic!("no takeover audited: {:#?}", gw.events()));
    assert_eq!(taken["peer"], second_addr);
    assert_eq!(taken["previous_peer"], first_addr);
    assert_eq!(taken["client_id"], "sensor-1");
    assert!(taken["detail"].as_str().unwrap().contains("cloned device"));
    let gone = gw
        .wait_for(|e| e["event"] == "disconnected" && e["peer"] == first_addr)
        .unwrap();
    assert!(
        gone["detail"].as_str().unwrap().contains(&format!(
            "taken over by another connection of this identity from {second_addr}"
        )),
        "{gone}"
    );
}

#[test]
fn a_tls_error_inside_a_session_is_audited() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(&fleet, "");
    let (mut raw, ack) = Raw::connect(&fleet, &gw, &dev, V::V4, "sensor-1", true, 60);
    assert_eq!(v4_connack(ack).code, v4::ConnectReturnCode::Success);
    let addr = raw.tls.sock.local_addr().unwrap().to_string();
    // An application-data record that does not decrypt.
    let mut record = vec![0x17, 0x03, 0x03, 0x00, 0x20];
    record.extend_from_slice(&[0xAB; 32]);
    raw.tls.sock.write_all(&record).unwrap();
    assert!(matches!(raw.next(), Got::Closed));
    let gone = gw
        .wait_for(|e| e["event"] == "disconnected" && e["peer"] == addr)
        .unwrap_or_else(|| panic!("{:#?}", gw.events()));
    let detail = gone["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("the device's connection failed"), "{gone}");
}

#[test]
fn keepalive_zero_is_accepted_and_kept_off() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(&fleet, "");
    let (mut v4c, ack) = Raw::connect(&fleet, &gw, &dev, V::V4, "sensor-1", true, 0);
    assert_eq!(v4_connack(ack).code, v4::ConnectReturnCode::Success);
    assert!(v4c.drain().is_empty());
    drop(v4c);
    let (mut v5c, ack) = Raw::connect(&fleet, &gw, &dev, V::V5, "sensor-1", true, 0);
    let ack = v5_connack(ack);
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    // The embedded broker in process takes keepalive 0 as it is: no
    // Server Keep Alive in its place.
    assert_eq!(ack.properties.unwrap().server_keep_alive, None);
    assert!(v5c.drain().is_empty());
    // With a keepalive of its own, a device is told nothing about it.
    let (_c, ack) = Raw::connect(&fleet, &gw, &dev, V::V5, "sensor-1", true, 30);
    assert_eq!(v5_connack(ack).properties.unwrap().server_keep_alive, None);
    // "connected" means the broker accepted: one per session, no refusal.
    let connected = gw
        .events()
        .iter()
        .filter(|e| e["event"] == "connected")
        .count();
    assert_eq!(connected, 3, "{:#?}", gw.events());
    assert!(!gw.events().iter().any(|e| e["event"] == "refused"));
}

#[test]
fn mqtt_5_connack_says_what_the_gateway_offers() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(&fleet, "[limits]\nmax_packet_size = 4096\n");
    let (_c, ack) = Raw::connect(&fleet, &gw, &dev, V::V5, "sensor-1", true, 30);
    let props = v5_connack(ack).properties.expect("CONNACK properties");
    assert_eq!(props.shared_subscription_available, Some(0));
    assert_eq!(props.wildcard_subscription_available, Some(1));
    assert_eq!(props.subscription_identifiers_available, Some(1));
    assert_eq!(props.max_packet_size, Some(4096));
    assert_eq!(props.topic_alias_max, None, "topic aliases are refused");
    assert_eq!(props.assigned_client_identifier, None);
}

#[test]
fn a_pubrel_resent_after_a_reconnect_gets_its_pubcomp() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(&fleet, "");
    for version in [V::V4, V::V5] {
        let (mut c, _) = Raw::connect(&fleet, &gw, &dev, version, "sensor-1", false, 60);
        let (publish, pubrel) = match version {
            V::V4 => {
                let mut p = v4::Publish::new(
                    "devices/sensor-1/telemetry",
                    mqttbytes::QoS::ExactlyOnce,
                    "x",
                );
                p.pkid = 7;
                (
                    v4_bytes(v4::Packet::Publish(p)),
                    v4_bytes(v4::Packet::PubRel(v4::PubRel::new(7))),
                )
            }
            V::V5 => (
                v5_publish("devices/sensor-1/telemetry", QoS5::ExactlyOnce, 7, None),
                v5_bytes(v5::Packet::PubRel(v5::PubRel::new(7, None))),
            ),
        };
        c.send(&publish);
        assert!(matches!(
            c.next(),
            Got::V4(v4::Packet::PubRec(_)) | Got::V5(v5::Packet::PubRec(_))
        ));
        // The PUBCOMP is lost: the connection drops after PUBREL.
        drop(c);
        let (mut c, ack) = Raw::connect(&fleet, &gw, &dev, version, "sensor-1", false, 60);
        match ack {
            Got::V4(v4::Packet::ConnAck(a)) => assert_eq!(a.code, v4::ConnectReturnCode::Success),
            Got::V5(v5::Packet::ConnAck(a)) => assert_eq!(a.code, v5::ConnectReturnCode::Success),
            other => panic!("{other:?}"),
        }
        // As the specification asks, the client sends PUBREL again.
        c.send(&pubrel);
        match c.next() {
            Got::V4(v4::Packet::PubComp(p)) => assert_eq!(p.pkid, 7),
            Got::V5(v5::Packet::PubComp(p)) => {
                assert_eq!(p.pkid, 7);
                assert_eq!(p.reason, v5::PubCompReason::PacketIdentifierNotFound);
            }
            other => panic!("{version:?}: expected PUBCOMP, got {other:?}"),
        }
        // And the session goes on.
        assert!(c.drain().is_empty());
        // A QoS 2 flow inside one connection still goes to the broker.
        c.send(&publish);
        assert!(matches!(
            c.next(),
            Got::V4(v4::Packet::PubRec(_)) | Got::V5(v5::Packet::PubRec(_))
        ));
        c.send(&pubrel);
        match c.next() {
            Got::V4(v4::Packet::PubComp(p)) => assert_eq!(p.pkid, 7),
            Got::V5(v5::Packet::PubComp(p)) => assert_eq!(p.reason, v5::PubCompReason::Success),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn every_unsubscribe_gets_exactly_one_unsuback() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(&fleet, "");
    // 3.1.1: a filter never subscribed.
    let (mut c, _) = Raw::connect(&fleet, &gw, &dev, V::V4, "sensor-1", true, 60);
    let mut unsub = v4::Unsubscribe::new("devices/sensor-1/commands");
    unsub.pkid = 5;
    c.send(&v4_bytes(v4::Packet::Unsubscribe(unsub)));
    match &c.drain()[..] {
        [Got::V4(v4::Packet::UnsubAck(a))] => assert_eq!(a.pkid, 5),
        other => panic!("one UNSUBACK expected, got {other:?}"),
    }
    drop(c);
    // 5: two filters subscribed, one never, in one UNSUBSCRIBE.
    let (mut c, _) = Raw::connect(&fleet, &gw, &dev, V::V5, "sensor-1", true, 60);
    let filters = ["devices/sensor-1/commands", "devices/sensor-1/config"];
    let mut sub = v5::Subscribe::new_many(
        filters
            .iter()
            .map(|f| v5::Filter::new(*f, QoS5::AtLeastOnce)),
        None,
    );
    sub.pkid = 1;
    c.send(&v5_bytes(v5::Packet::Subscribe(sub)));
    assert!(matches!(c.next(), Got::V5(v5::Packet::SubAck(_))));
    let mut unsub = v5::Unsubscribe::new(filters[0], None);
    unsub.filters.push(filters[1].into());
    unsub.filters.push("devices/sensor-1/never".into());
    unsub.pkid = 2;
    c.send(&v5_bytes(v5::Packet::Unsubscribe(unsub)));
    match &c.drain()[..] {
        [Got::V5(v5::Packet::UnsubAck(a))] => {
            assert_eq!(a.pkid, 2);
            assert_eq!(a.reasons.len(), 3, "one reason code per filter");
        }
        other => panic!("one UNSUBACK expected, got {other:?}"),
    }
}

#[test]
fn a_response_topic_is_checked_as_a_publish_by_the_device() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(&fleet, "");
    let (mut c, _) = Raw::connect(&fleet, &gw, &dev, V::V5, "sensor-1", true, 60);
    let steer = v5::PublishProperties {
        response_topic: Some("devices/sensor-2/commands".into()),
        ..publish_props()
    };
    c.send(&v5_publish(
        "devices/sensor-1/requests",
        QoS5::AtLeastOnce,
        1,
        Some(steer),
    ));
    match c.next() {
        Got::V5(v5::Packet::PubAck(a)) => assert_eq!(a.reason, v5::PubAckReason::NotAuthorized),
        other => panic!("{other:?}"),
    }
    let e = gw.refusal("policy_denied");
    assert!(
        e["detail"]
            .as_str()
            .unwrap()
            .contains("response topic \"devices/sensor-2/commands\""),
        "{e}"
    );
    let own = v5::PublishProperties {
        response_topic: Some("devices/sensor-1/replies".into()),
        ..publish_props()
    };
    c.send(&v5_publish(
        "devices/sensor-1/requests",
        QoS5::AtLeastOnce,
        2,
        Some(own),
    ));
    match c.next() {
        Got::V5(v5::Packet::PubAck(a)) => assert_eq!(a.reason, v5::PubAckReason::Success),
        other => panic!("{other:?}"),
    }
}

#[test]
fn no_local_is_refused_with_a_reason_code_by_the_embedded_broker() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(&fleet, "");
    let (mut c, _) = Raw::connect(&fleet, &gw, &dev, V::V5, "sensor-1", true, 60);
    let mut filter = v5::Filter::new("devices/sensor-1/#", QoS5::AtLeastOnce);
    filter.nolocal = true;
    let mut sub = v5::Subscribe::new(filter, None);
    sub.pkid = 3;
    c.send(&v5_bytes(v5::Packet::Subscribe(sub)));
    match c.next() {
        Got::V5(v5::Packet::SubAck(a)) => {
            assert_eq!(
                a.return_codes,
                [v5::SubscribeReasonCode::ImplementationSpecific]
            )
        }
        other => panic!("{other:?}"),
    }
    let e = gw.refusal("unsupported");
    assert!(e["detail"].as_str().unwrap().contains("no-local"), "{e}");
    // Without no-local, the same filter is granted.
    let mut sub = v5::Subscribe::new(
        v5::Filter::new("devices/sensor-1/#", QoS5::AtLeastOnce),
        None,
    );
    sub.pkid = 4;
    c.send(&v5_bytes(v5::Packet::Subscribe(sub)));
    match c.next() {
        Got::V5(v5::Packet::SubAck(a)) => {
            assert_eq!(
                a.return_codes,
                [v5::SubscribeReasonCode::Success(QoS5::AtLeastOnce)]
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn refusals_cannot_flood_the_audit_log() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(&fleet, "[limits]\nmax_packet_size = 65536\n");
    let (mut c, _) = Raw::connect(&fleet, &gw, &dev, V::V5, "sensor-1", true, 60);
    let topic = format!("devices/sensor-2/{}", "t".repeat(32 * 1024));
    let mut refused = 0;
    let mut closed_with = None;
    // One at a time, each answered before the next: a socket closed with
    // unread bytes in it is reset, and the reset would swallow the answer.
    for pkid in 1..=100u16 {
        c.send(&v5_publish(&topic, QoS5::AtLeastOnce, pkid, None));
        match c.next() {
            Got::V5(v5::Packet::PubAck(a)) if a.reason == v5::PubAckReason::NotAuthorized => {
                refused += 1
            }
            Got::V5(v5::Packet::Disconnect(d)) => {
                closed_with = Some(d.reason_code);
                break;
            }
            other => panic!("after {refused} refusals: {other:?}"),
        }
    }
    assert!(matches!(c.next(), Got::Closed));
    assert_eq!(refused, 31, "answers before the budget ran out");
    assert_eq!(closed_with, Some(v5::DisconnectReasonCode::QuotaExceeded));
    let last = gw
        .wait_for(|e| {
            e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("refusals in this session"))
        })
        .unwrap_or_else(|| panic!("{:#?}", gw.events()));
    assert_eq!(last["reason"], "policy_denied");
    let size = std::fs::metadata(&gw.audit).unwrap().len();
    assert!(size < 64 * 1024, "the audit log grew to {size} bytes");
    let events = gw.events();
    let refusals: Vec<_> = events.iter().filter(|e| e["event"] == "refused").collect();
    assert_eq!(refusals.len(), 32);
    assert!(
        refusals[0]["detail"]
            .as_str()
            .unwrap()
            .contains("bytes, truncated)")
    );
}

#[test]
fn a_copied_certificate_without_its_key_is_audited_as_such() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let other = fleet.device("sensor-2");
    let gw = Gateway::start(&fleet, "");
    let mut raw = Raw::open_with(&fleet, &gw, &dev.cert, &other.key, V::V4);
    raw.send(&v4_bytes(v4::Packet::Connect(v4::Connect::new("sensor-1"))));
    assert!(matches!(raw.next(), Got::Closed));
    let e = gw.refusal("key_not_held");
    assert!(
        e["detail"]
            .as_str()
            .unwrap()
            .contains("without its private key"),
        "{e}"
    );
    assert_eq!(
        e["subject"].as_str().map(|s| s.contains("sensor-1")),
        Some(true),
        "{e}"
    );
}

/// The payloads of the QoS 1 PUBLISHes `c` receives until `secs` of
/// silence, each acknowledged.
fn receive_v5(c: &mut Raw, secs: u64) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    while let Some(p) = c.poll(secs) {
        match p {
            Got::V5(v5::Packet::Publish(p)) => {
                c.send(&v5_bytes(v5::Packet::PubAck(v5::PubAck::new(p.pkid, None))));
                got.push(p.payload.to_vec());
            }
            Got::Closed => break,
            _ => {}
        }
    }
    got
}

#[test]
fn a_services_instances_share_a_subscription_and_groups_stay_the_services_own() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let ingest = fleet.service("ingest");
    let audit = fleet.service("audit");
    let gw = Gateway::start(&fleet, "");
    let shared = "$share/workers/devices/+/telemetry";
    let subscribe = |c: &mut Raw| {
        let mut sub = v5::Subscribe::new(v5::Filter::new(shared, QoS5::AtLeastOnce), None);
        sub.pkid = 1;
        c.send(&v5_bytes(v5::Packet::Subscribe(sub)));
        match c.next() {
            Got::V5(v5::Packet::SubAck(a)) => a.return_codes,
            other => panic!("{other:?}"),
        }
    };
    let granted = vec![v5::SubscribeReasonCode::Success(QoS5::AtLeastOnce)];
    let mut instances = Vec::new();
    for id in ["ingest-1", "ingest-2"] {
        let (mut c, ack) = Raw::connect(&fleet, &gw, &ingest, V::V5, id, true, 60);
        let props = v5_connack(ack).properties.unwrap();
        assert_eq!(
            props.shared_subscription_available,
            Some(1),
            "a service may share"
        );
        assert_eq!(subscribe(&mut c), granted);
        instances.push(c);
    }
    // Another service with a group of the same name: a group of its own.
    let (mut other, _) = Raw::connect(&fleet, &gw, &audit, V::V5, "audit", true, 60);
    assert_eq!(subscribe(&mut other), granted);
    // A device may not share.
    let (mut d, ack) = Raw::connect(&fleet, &gw, &dev, V::V5, "sensor-1", true, 60);
    assert_eq!(
        v5_connack(ack)
            .properties
            .unwrap()
            .shared_subscription_available,
        Some(0)
    );
    let mut sub = v5::Subscribe::new(
        v5::Filter::new("$share/g/devices/sensor-1/commands", QoS5::AtLeastOnce),
        None,
    );
    sub.pkid = 2;
    d.send(&v5_bytes(v5::Packet::Subscribe(sub)));
    match d.next() {
        Got::V5(v5::Packet::SubAck(a)) => {
            assert_eq!(a.return_codes, [v5::SubscribeReasonCode::NotAuthorized])
        }
        other => panic!("{other:?}"),
    }
    assert!(
        gw.refusal("policy_denied")["detail"]
            .as_str()
            .unwrap()
            .contains("shared subscriptions are for services only")
    );
    for i in 0..20u16 {
        let payload = format!("m{i}");
        let mut p = v5::Publish::new(
            "devices/sensor-1/telemetry",
            QoS5::AtLeastOnce,
            payload,
            None,
        );
        p.pkid = i + 1;
        d.send(&v5_bytes(v5::Packet::Publish(p)));
        match d.next() {
            Got::V5(v5::Packet::PubAck(a)) => assert_eq!(a.reason, v5::PubAckReason::Success),
            other => panic!("{other:?}"),
        }
    }
    let want: std::collections::BTreeSet<Vec<u8>> =
        (0..20).map(|i| format!("m{i}").into_bytes()).collect();
    let mut shared_got = Vec::new();
    let mut per_instance = Vec::new();
    for c in &mut instances {
        let got = receive_v5(c, 3);
        per_instance.push(got.len());
        shared_got.extend(got);
    }
    let distinct: std::collections::BTreeSet<Vec<u8>> = shared_got.iter().cloned().collect();
    assert_eq!(
        shared_got.len(),
        20,
        "each message to one instance: {per_instance:?}"
    );
    assert_eq!(distinct, want);
    assert!(
        per_instance.iter().all(|&n| n > 0),
        "both instances share the load: {per_instance:?}"
    );
    let others: std::collections::BTreeSet<Vec<u8>> =
        receive_v5(&mut other, 3).into_iter().collect();
    assert_eq!(others, want, "the other service's group got every message");
}

/// Device `sensor-1`'s CONNECT with a will on its state topic, MQTT 5 or
/// 3.1.1; with a delay, its session outlives the connection.
fn connect_with_will(
    fleet: &Fleet,
    gw: &Gateway,
    who: &Identity,
    version: V,
    payload: &str,
    delay: Option<u32>,
) -> Raw {
    let id = "sensor-1";
    let topic = format!("devices/{id}/state");
    let mut raw = Raw::open(fleet, gw, who, version);
    let connect = match version {
        V::V4 => {
            let mut c = v4::Connect::new(id);
            c.last_will = Some(v4::LastWill::new(
                topic,
                payload,
                mqttbytes::QoS::AtLeastOnce,
                false,
            ));
            v4_bytes(v4::Packet::Connect(c))
        }
        V::V5 => {
            let c = v5::Connect {
                keep_alive: 60,
                client_id: id.into(),
                clean_start: delay.is_none(),
                properties: delay.map(|_| v5::ConnectProperties {
                    session_expiry_interval: Some(3600),
                    ..v5::ConnectProperties::new()
                }),
            };
            let will = v5::LastWill {
                topic: topic.into(),
                message: payload.to_owned().into(),
                qos: QoS5::AtLeastOnce,
                retain: false,
                properties: Some(v5::LastWillProperties {
                    delay_interval: delay,
                    payload_format_indicator: None,
                    message_expiry_interval: None,
                    content_type: None,
                    response_topic: None,
                    correlation_data: None,
                    user_properties: Vec::new(),
                }),
            };
            v5_bytes(v5::Packet::Connect(c, Some(will), None))
        }
    };
    raw.send(&connect);
    match raw.next() {
        Got::V4(v4::Packet::ConnAck(a)) => assert_eq!(a.code, v4::ConnectReturnCode::Success),
        Got::V5(v5::Packet::ConnAck(a)) => assert_eq!(a.code, v5::ConnectReturnCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    raw
}

#[test]
fn a_will_is_published_when_a_session_ends_without_disconnect() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let ops = fleet.service("ops");
    let gw = Gateway::start(&fleet, "");
    let (mut watcher, _) = Raw::connect(&fleet, &gw, &ops, V::V5, "ops", true, 60);
    let mut sub = v5::Subscribe::new(v5::Filter::new("devices/+/state", QoS5::AtLeastOnce), None);
    sub.pkid = 1;
    watcher.send(&v5_bytes(v5::Packet::Subscribe(sub)));
    assert!(matches!(watcher.next(), Got::V5(v5::Packet::SubAck(_))));
    // Encoded by hand: rumqttc 0.25 writes a v5 DISCONNECT's reason code
    // without its length.
    let disconnect = |code: v5::DisconnectReasonCode| [0xE0, 0x02, code as u8, 0x00];

    // The connection drops: MQTT 5 and 3.1.1 wills are published.
    drop(connect_with_will(
        &fleet,
        &gw,
        &dev,
        V::V5,
        "dropped-5",
        None,
    ));
    drop(connect_with_will(
        &fleet,
        &gw,
        &dev,
        V::V4,
        "dropped-4",
        None,
    ));
    // A normal DISCONNECT discards the will; 0x04 asks for it.
    let mut c = connect_with_will(&fleet, &gw, &dev, V::V5, "discarded", None);
    c.send(&disconnect(v5::DisconnectReasonCode::NormalDisconnection));
    assert!(matches!(c.next(), Got::Closed));
    let mut c = connect_with_will(&fleet, &gw, &dev, V::V5, "asked-for", None);
    c.send(&disconnect(
        v5::DisconnectReasonCode::DisconnectWithWillMessage,
    ));
    assert!(matches!(c.next(), Got::Closed));
    // A session taken over by the same identity: the old one's will.
    let old = connect_with_will(&fleet, &gw, &dev, V::V4, "taken-over", None);
    let mut new = connect_with_will(&fleet, &gw, &dev, V::V4, "unused", None);
    new.send(&v4_bytes(v4::Packet::Disconnect));
    drop(old);
    // A delayed will whose session comes back in time is never published;
    // one whose session does not come back is, after its delay.
    drop(connect_with_will(
        &fleet,
        &gw,
        &dev,
        V::V5,
        "came-back",
        Some(3),
    ));
    let mut back = connect_with_will(&fleet, &gw, &dev, V::V5, "late", Some(1));
    std::thread::sleep(Duration::from_secs(4));
    back.send(&disconnect(v5::DisconnectReasonCode::NormalDisconnection));
    drop(back);
    drop(connect_with_will(
        &fleet,
        &gw,
        &dev,
        V::V5,
        "delayed",
        Some(1),
    ));

    let got: Vec<String> = receive_v5(&mut watcher, 4)
        .into_iter()
        .map(|p| String::from_utf8(p).unwrap())
        .collect();
    assert_eq!(
        got,
        [
            "dropped-5",
            "dropped-4",
            "asked-for",
            "taken-over",
            "delayed"
        ],
        "audit: {:#?}",
        gw.events()
    );
}

#[test]
fn application_data_inside_a_fragmented_client_hello_is_audited() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(&fleet, "");
    // A real ClientHello, split over two handshake records with an
    // application-data record between them.
    let config = tls_config(&fleet, &dev.cert, &dev.key);
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    let body = &hello[5..5 + u16::from_be_bytes([hello[3], hello[4]]) as usize];
    let (first, second) = body.split_at(body.len() / 2);
    let record = |typ: u8, payload: &[u8]| {
        let mut r = vec![typ, 0x03, 0x03];
        r.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        r.extend_from_slice(payload);
        r
    };
    let mut tcp = TcpStream::connect(gw.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let addr = tcp.local_addr().unwrap().to_string();
    let bytes = [
        record(0x16, first),
        record(0x17, &[0]),
        record(0x16, second),
    ]
    .concat();
    let _ = tcp.write_all(&bytes);
    // The gateway answers with an alert, or just closes.
    let mut sink = [0u8; 1024];
    while matches!(tcp.read(&mut sink), Ok(n) if n > 0) {}
    let refused = gw
        .wait_for(|e| e["event"] == "refused" && e["peer"] == addr)
        .unwrap_or_else(|| panic!("no audit line: {:#?}", gw.events()));
    assert_eq!(refused["reason"], "protocol_error", "{refused}");
}

#[test]
fn qos_2_retained_and_queued_messages_reach_their_subscribers() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let ops = fleet.service("ops");
    let gw = Gateway::start(&fleet, "");
    let (mut device, _) = Raw::connect(&fleet, &gw, &dev, V::V5, "sensor-1", true, 60);
    // A retained state, before anyone subscribes.
    let mut state = v5::Publish::new("devices/sensor-1/state", QoS5::AtLeastOnce, "online", None);
    state.pkid = 1;
    state.retain = true;
    device.send(&v5_bytes(v5::Packet::Publish(state)));
    assert!(matches!(device.next(), Got::V5(v5::Packet::PubAck(_))));

    // A persistent service session subscribes at QoS 2 and gets it.
    let (mut svc, ack) = Raw::connect(&fleet, &gw, &ops, V::V5, "ops", false, 60);
    assert!(!v5_connack(ack).session_present);
    let mut sub = v5::Subscribe::new_many(
        [
            v5::Filter::new("devices/+/state", QoS5::ExactlyOnce),
            v5::Filter::new("devices/+/telemetry", QoS5::ExactlyOnce),
        ],
        None,
    );
    sub.pkid = 1;
    svc.send(&v5_bytes(v5::Packet::Subscribe(sub)));
    assert!(matches!(svc.next(), Got::V5(v5::Packet::SubAck(_))));
    match svc.next() {
        Got::V5(v5::Packet::Publish(p)) => {
            assert_eq!(
                (&p.topic[..], &p.payload[..]),
                (&b"devices/sensor-1/state"[..], &b"online"[..])
            );
            assert!(p.retain, "a retained message is sent with its flag");
            ack_qos2(&mut svc, p.pkid, p.qos);
        }
        other => panic!("expected the retained state, got {other:?}"),
    }

    // QoS 2 both ways: PUBLISH, PUBREC, PUBREL, PUBCOMP.
    device.send(&v5_publish(
        "devices/sensor-1/telemetry",
        QoS5::ExactlyOnce,
        2,
        None,
    ));
    assert!(matches!(device.next(), Got::V5(v5::Packet::PubRec(r)) if r.pkid == 2));
    device.send(&v5_bytes(v5::Packet::PubRel(v5::PubRel::new(2, None))));
    assert!(matches!(device.next(), Got::V5(v5::Packet::PubComp(c)) if c.pkid == 2));
    match svc.next() {
        Got::V5(v5::Packet::Publish(p)) => {
            assert_eq!(p.qos, QoS5::ExactlyOnce);
            ack_qos2(&mut svc, p.pkid, p.qos);
        }
        other => panic!("expected the QoS 2 message, got {other:?}"),
    }

    // The service goes away; what is published meanwhile waits for it.
    svc.send(&[0xE0, 0x02, 0x00, 0x00]);
    assert!(matches!(svc.next(), Got::Closed));
    device.send(&v5_publish(
        "devices/sensor-1/telemetry",
        QoS5::AtLeastOnce,
        3,
        None,
    ));
    assert!(matches!(device.next(), Got::V5(v5::Packet::PubAck(_))));
    let (mut svc, ack) = Raw::connect(&fleet, &gw, &ops, V::V5, "ops", false, 60);
    assert!(v5_connack(ack).session_present);
    match svc.next() {
        Got::V5(v5::Packet::Publish(p)) => {
            assert_eq!(&p.topic[..], b"devices/sensor-1/telemetry");
            ack_qos2(&mut svc, p.pkid, p.qos);
        }
        other => panic!("expected the queued message, got {other:?}"),
    }
}

/// Acknowledges a message a subscriber got, as its QoS asks.
fn ack_qos2(c: &mut Raw, pkid: u16, qos: QoS5) {
    match qos {
        QoS5::AtMostOnce => {}
        QoS5::AtLeastOnce => c.send(&v5_bytes(v5::Packet::PubAck(v5::PubAck::new(pkid, None)))),
        QoS5::ExactlyOnce => {
            c.send(&v5_bytes(v5::Packet::PubRec(v5::PubRec::new(pkid, None))));
            match c.next() {
                Got::V5(v5::Packet::PubRel(r)) => assert_eq!(r.pkid, pkid),
                other => panic!("expected PUBREL, got {other:?}"),
            }
            c.send(&v5_bytes(v5::Packet::PubComp(v5::PubComp::new(pkid, None))));
        }
    }
}

#[test]
fn a_record_with_no_content_type_inside_is_audited() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(&fleet, "");
    // A session whose traffic keys the test can take over, to send a
    // TLS 1.3 record rustls would never write: its inner plaintext is all
    // zeros, so it has no content type (RFC 8446, 5.4).
    let mut config = (*tls_config(&fleet, &dev.cert, &dev.key)).clone();
    config.enable_secret_extraction = true;
    let conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let tcp = TcpStream::connect(gw.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut raw = Raw {
        tls: rustls::StreamOwned::new(conn, tcp),
        buf: BytesMut::new(),
        version: V::V4,
    };
    raw.send(&v4_bytes(v4::Packet::Connect(v4::Connect::new("sensor-1"))));
    assert_eq!(v4_connack(raw.next()).code, v4::ConnectReturnCode::Success);
    let addr = raw.tls.sock.local_addr().unwrap().to_string();
    let rustls::StreamOwned { conn, mut sock } = raw.tls;
    let Some(rustls::SupportedCipherSuite::Tls13(suite)) = conn.negotiated_cipher_suite() else {
        panic!("not TLS 1.3");
    };
    let (seq, secrets) = conn.dangerous_extract_secrets().unwrap().tx;
    let (key, iv) = match secrets {
        rustls::ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | rustls::ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | rustls::ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key, iv),
        _ => panic!("an unexpected cipher suite"),
    };
    let mut encrypter = suite.aead_alg.encrypter(key, iv);
    let record = encrypter
        .encrypt(
            rustls::crypto::cipher::OutboundPlainMessage {
                typ: rustls::ContentType::Unknown(0),
                version: rustls::ProtocolVersion::TLSv1_2,
                payload: rustls::crypto::cipher::OutboundChunks::Single(&[0; 8]),
            },
            seq,
        )
        .unwrap();
    sock.write_all(&record.encode()).unwrap();
    let mut sink = [0u8; 1024];
    while matches!(sock.read(&mut sink), Ok(n) if n > 0) {}
    let gone = gw
        .wait_for(|e| e["event"] == "disconnected" && e["peer"] == addr)
        .unwrap_or_else(|| panic!("no audit line: {:#?}", gw.events()));
    let detail = gone["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("the device's connection failed")
            && detail.contains("IllegalTlsInnerPlaintext"),
        "{gone}"
    );
}

#[test]
fn the_gateway_answers_a_subscription_to_the_certificate_status() {
    use twofold_protocol::message::{CertStatus, decode};
    use twofold_protocol::topic::CERT_STATUS;
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(&fleet, "");
    let wall = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    for version in [V::V4, V::V5] {
        let (mut c, _) = Raw::connect(&fleet, &gw, &dev, version, "sensor-1", true, 60);
        let before = wall();
        let payload = match version {
            V::V4 => {
                let mut sub = v4::Subscribe::new(CERT_STATUS, mqttbytes::QoS::AtLeastOnce);
                sub.pkid = 5;
                c.send(&v4_bytes(v4::Packet::Subscribe(sub)));
                match c.next() {
                    Got::V4(v4::Packet::SubAck(a)) => assert_eq!(
                        (a.pkid, a.return_codes),
                        (
                            5,
                            vec![v4::SubscribeReasonCode::Success(mqttbytes::QoS::AtMostOnce)]
                        )
                    ),
                    other => panic!("expected SUBACK, got {other:?}"),
                }
                match c.next() {
                    Got::V4(v4::Packet::Publish(p)) if p.topic == CERT_STATUS => p.payload,
                    other => panic!("expected the status, got {other:?}"),
                }
            }
            V::V5 => {
                let mut sub =
                    v5::Subscribe::new(v5::Filter::new(CERT_STATUS, QoS5::AtLeastOnce), None);
                sub.pkid = 5;
                c.send(&v5_bytes(v5::Packet::Subscribe(sub)));
                match c.next() {
                    Got::V5(v5::Packet::SubAck(a)) => assert_eq!(
                        a.return_codes,
                        [v5::SubscribeReasonCode::Success(QoS5::AtMostOnce)]
                    ),
                    other => panic!("expected SUBACK, got {other:?}"),
                }
                match c.next() {
                    Got::V5(v5::Packet::Publish(p)) if p.topic == CERT_STATUS => p.payload,
                    other => panic!("expected the status, got {other:?}"),
                }
            }
        };
        let status: CertStatus = decode(&payload).unwrap();
        let connected = gw
            .wait_for(|e| e["event"] == "connected")
            .expect("connected");
        assert_eq!(
            hex::encode(status.serial),
            connected["serial"]
                .as_str()
                .unwrap()
                .trim_start_matches('0')
        );
        assert!((before.saturating_sub(5)..=wall() + 5).contains(&status.now));
        // Fleet certificates live 30 days; renewal is due two thirds in,
        // less up to a twentieth.
        let life = 30 * 86_400;
        assert!(
            (life - 60..=life).contains(&status.expires_in),
            "{status:?}"
        );
        assert!(
            (life * 2 / 3 - life / 20 - 60..=life * 2 / 3).contains(&status.renew_in),
            "{status:?}"
        );
        assert!(c.drain().is_empty());
    }
    // Not beside another filter, and nothing else under $twofold.
    let (mut c, _) = Raw::connect(&fleet, &gw, &dev, V::V5, "sensor-1", true, 60);
    for filters in [
        vec![CERT_STATUS, "devices/sensor-1/commands"],
        vec!["$twofold/v1/cert/other"],
    ] {
        let mut sub = v5::Subscribe::new_many(
            filters
                .iter()
                .map(|f| v5::Filter::new(*f, QoS5::AtLeastOnce)),
            None,
        );
        sub.pkid = 6;
        c.send(&v5_bytes(v5::Packet::Subscribe(sub)));
        match c.next() {
            Got::V5(v5::Packet::SubAck(a)) => assert!(
                a.return_codes
                    .iter()
                    .all(|r| *r == v5::SubscribeReasonCode::NotAuthorized),
                "{filters:?}: {a:?}"
            ),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
    assert!(
        gw.refusal("policy_denied")["detail"]
            .as_str()
            .unwrap()
            .contains("$twofold")
    );
}

/// Publishes `payload` on `topic` (MQTT 5, QoS 1) and returns the answer
/// on the certificate answer topic, after the PUBACK.
fn ask_cert(c: &mut Raw, topic: &str, payload: &[u8], pkid: u16) -> Vec<u8> {
    let mut p = v5::Publish::new(topic, QoS5::AtLeastOnce, payload.to_vec(), None);
    p.pkid = pkid;
    c.send(&v5_bytes(v5::Packet::Publish(p)));
    match c.next() {
        Got::V5(v5::Packet::PubAck(a)) => {
            assert_eq!((a.pkid, a.reason), (pkid, v5::PubAckReason::Success))
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
    // Renewal signs a certificate and writes the registry: allow it time.
    c.tls
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    match c.next() {
        Got::V5(v5::Packet::Publish(p)) if p.topic == twofold_protocol::topic::CERT_ANSWER => {
            p.payload.to_vec()
        }
        other => panic!("expected the CA's answer, got {other:?}"),
    }
}

fn renew_payload(id: &str) -> Vec<u8> {
    let mut buf = [0u8; 128];
    let request = twofold_protocol::message::RenewRequest {
        request_id: id,
        csr: None,
    };
    twofold_protocol::message::encode(&request, &mut buf)
        .unwrap()
        .to_vec()
}

/// The whole loop through real processes: a device renews inside its
/// mTLS session, reconnects with the new certificate and commits; the CA
/// service (a separate process holding the CA key) supersedes the old
/// certificate; the old one may not renew again; a gateway that is not a
/// registration authority, and one without a CA service, say so.
#[test]
fn a_device_renews_through_the_gateway_and_commits_the_new_certificate() {
    use twofold_protocol::message::{CertAnswer, RenewRefusal, decode};
    use twofold_protocol::topic::{CERT_COMMIT, CERT_RENEW};
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    fleet.service("gw");
    fleet.service("other-gw");
    let ca = CaService::start(&mut fleet, &["--ra", "gw", "--allow-early"]);
    let gw = Gateway::start(&fleet, &ca.gateway_toml(&fleet, "gw"));

    let (mut c, _) = Raw::connect(&fleet, &gw, &dev, V::V5, "sensor-1", true, 60);
    let answer = ask_cert(&mut c, CERT_RENEW, &renew_payload("r1"), 1);
    let certs = match decode::<CertAnswer>(&answer).unwrap() {
        CertAnswer::Issued { request_id, certs } => {
            assert_eq!(request_id, "r1");
            certs.to_vec()
        }
        other => panic!("expected a certificate, got {other:?}"),
    };
    // The new leaf, then the device CA: DER back to back.
    let (rest, leaf) = x509_parser::parse_x509_certificate(&certs).unwrap();
    let (rest, issuer) = x509_parser::parse_x509_certificate(rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(leaf.issuer(), issuer.subject());
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        format!("{:?}", san.value.general_names),
        format!("[URI(\"spiffe://{TD}/device/sensor-1\")]")
    );
    let new_serial = leaf.raw_serial().to_vec();
    drop(c);

    // The device stores it beside the old one (same key) and reconnects.
    let renewed = fleet.path("sensor-1-renewed");
    std::fs::create_dir_all(&renewed).unwrap();
    let pem = |der: &[u8]| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()));
    let chain = format!("{}{}", pem(leaf.as_ref()), pem(issuer.as_ref()));
    std::fs::write(renewed.join("device.pem"), chain).unwrap();
    std::fs::copy(&dev.key, renewed.join("device.key")).unwrap();
    let new = Identity {
        cert: renewed.join("device.pem"),
        key: renewed.join("device.key"),
        dir: renewed,
    };
    let (mut c, _) = Raw::connect(&fleet, &gw, &new, V::V5, "sensor-1", true, 60);
    let answer = ask_cert(&mut c, CERT_COMMIT, b"", 2);
    match decode::<CertAnswer>(&answer).unwrap() {
        CertAnswer::Committed { serial } => assert_eq!(serial, &new_serial[..]),
        other => panic!("expected the commit, got {other:?}"),
    }
    drop(c);
    let principal = twofold_protocol::Principal::Device("sensor-1".parse().unwrap());
    let history = fleet.pki.history(&principal).unwrap();
    let old = history
        .iter()
        .find(|r| r.serial.as_bytes() != new_serial)
        .unwrap();
    assert_eq!(
        old.revocation.map(|r| r.reason),
        Some(twofold_provisioning::registry::RevocationReason::Superseded)
    );

    // The old certificate still passes this gateway's TLS (its CRL file is
    // not updated here), but the CA refuses it: only the newest renews.
    let (mut c, _) = Raw::connect(&fleet, &gw, &dev, V::V5, "sensor-1", true, 60);
    let answer = ask_cert(&mut c, CERT_RENEW, &renew_payload("r2"), 3);
    match decode::<CertAnswer>(&answer).unwrap() {
        CertAnswer::Refused { code, reason, .. } => {
            assert_eq!(code, RenewRefusal::NotLatest);
            assert!(reason.contains("not the newest"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop(c);

    // A gateway whose service identity is not a registration authority.
    let rogue = Gateway::start(&fleet, &ca.gateway_toml(&fleet, "other-gw"));
    let (mut c, _) = Raw::connect(&fleet, &rogue, &new, V::V5, "sensor-1", true, 60);
    let answer = ask_cert(&mut c, CERT_RENEW, &renew_payload("r3"), 4);
    match decode::<CertAnswer>(&answer).unwrap() {
        CertAnswer::Refused { code, reason, .. } => {
            assert_eq!(code, RenewRefusal::Unavailable);
            assert!(reason.contains("not a registration authority"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop(c);

    // A gateway without a CA service.
    let plain = Gateway::start(&fleet, "");
    let (mut c, _) = Raw::connect(&fleet, &plain, &new, V::V5, "sensor-1", true, 60);
    let answer = ask_cert(&mut c, CERT_RENEW, &renew_payload("r4"), 5);
    match decode::<CertAnswer>(&answer).unwrap() {
        CertAnswer::Refused { code, reason, .. } => {
            assert_eq!(code, RenewRefusal::Unavailable);
            assert!(reason.contains("no [ca_service]"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}
