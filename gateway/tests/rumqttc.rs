//! The gateway with rumqttc over rustls, the client stack the Linux agent
//! uses: MQTT 3.1.1 and 5 devices publish telemetry a service receives,
//! and receive the commands the service sends them.

use std::time::Duration;

use twofold_tests::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Polls until a PUBLISH arrives; returns its topic and payload.
async fn next_publish_v4(events: &mut rumqttc::EventLoop) -> (String, Vec<u8>) {
    loop {
        match events.poll().await.expect("connection stays up") {
            rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                return (p.topic, p.payload.to_vec());
            }
            _ => continue,
        }
    }
}

#[test]
fn a_rumqttc_device_sends_telemetry_and_receives_commands_over_3_1_1() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let ops = fleet.service("ops");
    let gw = Gateway::start(&fleet, "");
    let telemetry = mosquitto_sub(
        &fleet,
        &gw,
        &ops,
        &["-i", "ops", "-t", "devices/+/telemetry", "-C", "1", "-v"],
    );
    wait_connected(&gw, "ops");

    runtime().block_on(async {
        let mut options = rumqttc::MqttOptions::new("sensor-1", "localhost", gw.addr.port());
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(fleet.client_tls(&dev)),
        ));
        let (client, mut events) = rumqttc::AsyncClient::new(options, 10);
        client
            .subscribe("devices/sensor-1/commands", rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        // Wait for the SUBACK so the command below cannot race the subscription.
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(ack)) =
                    events.poll().await.expect("connection stays up")
                {
                    assert_eq!(
                        ack.return_codes,
                        [rumqttc::SubscribeReasonCode::Success(
                            rumqttc::QoS::AtLeastOnce
                        )]
                    );
                    return;
                }
            }
        })
        .await
        .expect("SUBACK within 10 s");
        client
            .publish(
                "devices/sensor-1/telemetry",
                rumqttc::QoS::AtLeastOnce,
                false,
                "temp=21.5",
            )
            .await
            .unwrap();
        let out = mosquitto_pub(
            &fleet,
            &gw,
            Some(&ops),
            &[
                "-i",
                "ops-commands",
                "-t",
                "devices/sensor-1/commands",
                "-m",
                "ping",
                "-q",
                "1",
            ],
        );
        assert!(out.status.success(), "{}", text(&out));
        let (topic, payload) =
            tokio::time::timeout(Duration::from_secs(10), next_publish_v4(&mut events))
                .await
                .expect("command within 10 s");
        assert_eq!(topic, "devices/sensor-1/commands");
        assert_eq!(payload, b"ping");
        client.disconnect().await.unwrap();
    });
    let received = finish(telemetry, 10);
    assert!(
        String::from_utf8_lossy(&received.stdout).contains("devices/sensor-1/telemetry temp=21.5"),
        "{}",
        text(&received)
    );
}

#[test]
fn a_rumqttc_device_over_5_gets_reason_codes_for_what_policy_refuses() {
    use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(&fleet, "");
    runtime().block_on(async {
        let mut options = MqttOptions::new("sensor-1", "localhost", gw.addr.port());
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(fleet.client_tls(&dev)),
        ));
        let (client, mut events) = AsyncClient::new(options, 10);
        client
            .subscribe(
                "devices/sensor-1/commands",
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            )
            .await
            .unwrap();
        client
            .subscribe(
                "devices/+/telemetry",
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            )
            .await
            .unwrap();
        let acks = tokio::time::timeout(Duration::from_secs(10), async {
            let mut acks = Vec::new();
            while acks.len() < 2 {
                if let Event::Incoming(Packet::SubAck(ack)) =
                    events.poll().await.expect("connection stays up")
                {
                    acks.push(ack.return_codes);
                }
            }
            acks
        })
        .await
        .expect("two SUBACKs within 10 s");
        assert!(
            matches!(acks[0][..], [SubscribeReasonCode::Success(_)]),
            "{acks:?}"
        );
        assert_eq!(acks[1], [SubscribeReasonCode::NotAuthorized]);
    });
    let refusal = gw.refusal("policy_denied");
    assert!(
        refusal["detail"]
            .as_str()
            .unwrap()
            .contains("devices/+/telemetry"),
        "{refusal}"
    );
}

/// Several packets in one TLS write, with a refusal among them that keeps
/// the MQTT 5 session: the frames before it and after it all reach the
/// broker, in order, and the device gets one answer per PUBLISH, in the
/// order of the PUBLISHes.
#[test]
fn packets_behind_a_refused_publish_in_the_same_write_are_not_lost() {
    use bytes::BytesMut;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Connect, Packet, PubAckReason, Publish};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let ops = fleet.service("ops");
    let gw = Gateway::start(&fleet, "");
    let port = gw.addr.port();
    let sub = Sub::telemetry_and_replies(&fleet, port, &ops, "ops", "+");
    let acks = runtime().block_on(async {
        let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(fleet.client_tls(&dev))
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .expect("handshake");
        let mut out = BytesMut::new();
        let connect = Connect {
            keep_alive: 30,
            client_id: "sensor-1".into(),
            clean_start: true,
            properties: None,
        };
        Packet::Connect(connect, None, None)
            .write(&mut out, None)
            .unwrap();
        // The batch: allowed, denied (another device's topic), allowed,
        // allowed; and half of one more, sent on its own afterwards.
        for (pkid, topic) in [
            (1, "devices/sensor-1/telemetry"),
            (2, "devices/sensor-2/telemetry"),
            (3, "devices/sensor-1/telemetry"),
            (4, "devices/sensor-1/telemetry"),
            (5, "devices/sensor-1/telemetry"),
        ] {
            let mut p = Publish::new(topic, QoS::AtLeastOnce, format!("m{pkid}"), None);
            p.pkid = pkid;
            Packet::Publish(p).write(&mut out, None).unwrap();
        }
        let tail = out.split_off(out.len() - 10);
        tls.write_all(&out).await.unwrap();
        tls.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        tls.write_all(&tail).await.unwrap();
        tls.flush().await.unwrap();

        let mut buf = BytesMut::new();
        let mut acks = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), async {
            while acks.len() < 5 {
                match Packet::read(&mut buf, None) {
                    Ok(Packet::PubAck(ack)) => acks.push((ack.pkid, ack.reason)),
                    Ok(_) => {}
                    Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {
                        assert!(tls.read_buf(&mut buf).await.unwrap() > 0, "closed");
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        })
        .await
        .expect("five PUBACKs within 10 s");
        acks
    });
    // In the order of the PUBLISHes, as MQTT 5 wants: the gateway's own
    // answer to the denied one waits for the broker's answer to the first.
    assert_eq!(
        acks,
        [
            (1, PubAckReason::Success),
            (2, PubAckReason::NotAuthorized),
            (3, PubAckReason::Success),
            (4, PubAckReason::Success),
            (5, PubAckReason::Success),
        ]
    );
    sub.settle(10);
    let payloads: Vec<Vec<u8>> = sub.messages().into_iter().map(|(_, p)| p).collect();
    assert_eq!(
        payloads,
        [
            b"m1".to_vec(),
            b"m3".to_vec(),
            b"m4".to_vec(),
            b"m5".to_vec()
        ],
        "in order, the denied one left out"
    );
    let refusals: Vec<_> = gw
        .events()
        .into_iter()
        .filter(|e| e["event"] == "refused")
        .collect();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(refusals[0]["reason"], "policy_denied");
    assert!(
        refusals[0]["detail"]
            .as_str()
            .unwrap()
            .contains("devices/sensor-2/telemetry"),
        "{}",
        refusals[0]
    );
}
