//! Gateways in front of NATS (JetStream and its MQTT listener): durable
//! sessions on one machine.

use twofold_tests::*;

/// sensor-1 publishes "x" at QoS 1 on its telemetry topic through `gw`.
fn publish_x(fleet: &Fleet, gw: &Gateway, dev: &Identity) -> std::process::Output {
    mosquitto_pub(
        fleet,
        gw,
        Some(dev),
        &[
            "-i",
            "sensor-1",
            "-q",
            "1",
            "-t",
            "devices/sensor-1/telemetry",
            "-m",
            "x",
        ],
    )
}

/// A backend service's persistent session holds a QoS 1 message while the
/// service is away; the gateway is then killed (-9) and NATS restarted
/// (-9 too). The message still arrives when the service comes back.
#[test]
fn a_queued_qos1_message_survives_gateway_kill_and_nats_restart() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let ops = fleet.service("ops");
    let mut nats = Nats::single(&fleet);
    let port = free_port();
    let mut gw = Gateway::start_on(&fleet, port, &nats.gateway_config(0));
    // The service's persistent session, subscribed, then gone.
    let sub_args = ["-i", "ops", "-c", "-q", "1", "-t", "devices/+/telemetry"];
    let mut away = Sub::start_tls(&fleet, port, &ops, "ops-1", &sub_args);
    away.proc.kill();

    let out = mosquitto_pub(
        &fleet,
        &gw,
        Some(&dev),
        &[
            "-i",
            "sensor-1",
            "-q",
            "1",
            "-t",
            "devices/sensor-1/telemetry",
            "-m",
            "kept",
        ],
    );
    assert!(out.status.success(), "{}\n{}", text(&out), gw.log());

    gw.kill();
    nats.kill(0);
    nats.restart(&fleet, 0);
    let gw = Gateway::start_on(&fleet, port, &nats.gateway_config(0));
    let back = Sub::start_tls(&fleet, port, &ops, "ops-2", &sub_args);
    let arrived = wait_until(20, || {
        back.messages()
            .iter()
            .any(|(t, p)| t == "devices/sensor-1/telemetry" && p == b"kept")
    });
    assert!(
        arrived,
        "the queued message was lost: {:?}\n{}\n{}",
        back.messages(),
        gw.log(),
        nats.logs()
    );
}

/// NATS speaks MQTT 3.1.1 and QoS 0 and 1 only. MQTT 5 devices still
/// work through the gateway, and what 3.1.1 cannot carry is refused with
/// MQTT 5's reason, each refusal in the audit log.
#[test]
fn mqtt5_devices_work_through_a_3_1_1_broker() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let ops = fleet.service("ops");
    let nats = Nats::single(&fleet);
    let config = format!(
        "{}\nbroker_protocol = \"3.1.1\"\nbroker_max_qos = 1",
        nats.gateway_config(0)
    );
    let gw = Gateway::start(&fleet, &config);
    let port = gw.addr.port();
    // QoS 2 asked, QoS 1 granted: the SUBACK says so.
    let sub = Sub::start_tls(
        &fleet,
        port,
        &ops,
        "ops-v5",
        &[
            "-V",
            "mqttv5",
            "-i",
            "ops",
            "-q",
            "2",
            "-t",
            "devices/+/telemetry",
        ],
    );
    let debug = std::fs::read_to_string(&sub.out).unwrap();
    assert!(debug.contains("Subscribed (mid: 1): 1"), "{debug}");

    let publish = |extra: &[&str], payload: &str| {
        let mut args = vec!["-d", "-i", "sensor-1", "-t", "devices/sensor-1/telemetry"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-m", payload]);
        mosquitto_pub(&fleet, &gw, Some(&dev), &args)
    };
    let out = publish(&["-V", "mqttv5", "-q", "1"], "over-5");
    assert!(out.status.success(), "{}\n{}", text(&out), gw.log());
    let out = publish(&["-V", "mqttv311", "-q", "1"], "over-311");
    assert!(out.status.success(), "{}\n{}", text(&out), gw.log());

    // A user property cannot be carried: PUBACK 0x83, and the session goes on.
    let out = publish(
        &[
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-D",
            "publish",
            "user-property",
            "k",
            "v",
        ],
        "with-property",
    );
    assert!(text(&out).contains("RC:131"), "{}", text(&out));
    let e = gw.refusal("unsupported");
    assert!(
        e["detail"]
            .as_str()
            .unwrap()
            .contains("with user properties"),
        "{e}"
    );
    // QoS 2 is above what the broker takes. The CONNACK said Maximum QoS
    // 1, so mosquitto_pub over MQTT 5 does not even send it (a client that
    // does gets DISCONNECT 0x9B: the session's unit tests).
    let out = publish(&["-V", "mqttv5", "-q", "2"], "at-qos-2");
    assert!(text(&out).contains("QoS not supported"), "{}", text(&out));
    // Over 3.1.1 nothing can say so before: the gateway closes, and audits why.
    let out = publish(&["-V", "mqttv311", "-q", "2"], "at-qos-2-311");
    assert!(!out.status.success(), "{}", text(&out));
    let qos2 = gw
        .wait_for(|e| {
            e["reason"] == "unsupported" && e["detail"].as_str().unwrap().contains("at QoS 2")
        })
        .expect("the QoS 2 PUBLISH audited");
    assert!(
        qos2["detail"]
            .as_str()
            .unwrap()
            .contains("takes QoS 1 at most"),
        "{qos2}"
    );
    // A subscription identifier: SUBACK 0xA1.
    let refused = finish(
        mosquitto_sub(
            &fleet,
            &gw,
            &ops,
            &[
                "-V",
                "mqttv5",
                "-i",
                "ops-2",
                "-t",
                "devices/+/replies",
                "-d",
                "-D",
                "subscribe",
                "subscription-identifier",
                "3",
                "-W",
                "3",
            ],
        ),
        10,
    );
    assert!(text(&refused).contains("161"), "{}", text(&refused));
    assert!(
        gw.wait_for(|e| e["reason"] == "unsupported"
            && e["detail"]
                .as_str()
                .unwrap()
                .contains("subscription identifier"))
            .is_some()
    );

    sub.settle(10);
    let got: Vec<Vec<u8>> = sub.messages().into_iter().map(|(_, p)| p).collect();
    assert_eq!(
        got,
        vec![b"over-5".to_vec(), b"over-311".to_vec()],
        "{}",
        gw.log()
    );
}

/// A gateway names every node of the cluster: a session opens at the
/// first that answers, so a node that is down costs a failed connect,
/// not the session.
#[test]
fn a_session_opens_at_the_next_node_when_one_is_down() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let nats = Nats::single(&fleet);
    let down = free_port();
    let config = format!(
        "broker = [\"mqtt://127.0.0.1:{down}\", \"mqtt://127.0.0.1:{}\"]\n\
         broker_username = \"{NATS_USER}\"\nbroker_password = \"{NATS_PASSWORD}\"",
        nats.nodes[0].mqtt_port
    );
    let gw = Gateway::start(&fleet, &config);
    let out = publish_x(&fleet, &gw, &dev);
    assert!(out.status.success(), "{}\n{}", text(&out), gw.log());
    // With no node up, the device hears "server unavailable" and the log
    // names each node and why.
    drop(nats);
    let out = publish_x(&fleet, &gw, &dev);
    assert!(!out.status.success());
    let e = gw.refusal("broker_unavailable");
    let detail = e["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("127.0.0.1:{down}")), "{detail}");
}

/// The safety net: a gateway with no push to hear pulls the CRL from the
/// CA service (every second here), takes the new one into its own CRL
/// file and closes the revoked session; nobody copied a file.
#[test]
fn a_gateway_pulls_a_new_crl_from_the_ca_service() {
    use twofold_provisioning::RevokeTarget;
    use twofold_provisioning::registry::RevocationReason;
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    fleet.service("gw");
    let ca = CaService::start(&mut fleet, &["--ra", "gw"]);
    let config = format!("{}crl_poll_secs = 1\n", ca.gateway_toml(&fleet, "gw"));
    let gw = Gateway::start(&fleet, &config);
    let sub = mosquitto_sub(
        &fleet,
        &gw,
        &dev,
        &["-i", "sensor-1", "-t", "devices/sensor-1/commands"],
    );
    wait_connected(&gw, "sensor-1");
    let before = std::fs::read_to_string(fleet.path("gw/crl.pem")).unwrap();
    // Revoked in the PKI only: gw/crl.pem is not touched.
    let target = RevokeTarget::Principal(twofold_protocol::Principal::Device(
        twofold_protocol::DeviceId::parse("sensor-1").unwrap(),
    ));
    fleet
        .pki
        .revoke(target, RevocationReason::KeyCompromise)
        .unwrap();
    let closed = gw.wait_for(|e| {
        e["reason"] == "revoked"
            && e["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("while connected")
    });
    assert!(closed.is_some(), "{}", gw.log());
    let out = finish(sub, 10);
    assert!(out.status.code().is_some(), "the session was left open");
    let after = std::fs::read_to_string(fleet.path("gw/crl.pem")).unwrap();
    assert_ne!(
        before, after,
        "the pulled CRL was not kept in the gateway's file"
    );
    assert_eq!(after, fleet.pki.crl_pem().unwrap());
    assert!(gw.log().contains("from=\"ca-service\""), "{}", gw.log());
}

/// `provisioning push-crl` pushes the current CRL again, e.g. after a
/// revocation made without --push: the gateway in front of NATS takes it.
#[test]
fn push_crl_reaches_a_gateway_through_nats() {
    let fleet = Fleet::new();
    push_crl_reaches_a_gateway(fleet, Nats::single, &[], &[]);
}

/// The same over TLS (mqtts://) to the broker: the push trusts only the
/// CA it is given, and says what is wrong when that is not the broker's.
#[test]
fn push_crl_over_mqtts_trusts_only_the_given_ca() {
    let fleet = Fleet::new();
    let ca = fleet.path("openssl-ca.pem").display().to_string();
    // Another PKI's CAs: a broker certificate from this one does not chain.
    let stranger = Fleet::new();
    let other_ca = stranger.path("openssl-ca.pem").display().to_string();
    let refusals = [
        (vec![], "give --push-ca"),
        (vec!["--push-ca", other_ca.as_str()], "UnknownIssuer"),
    ];
    let refusals: Vec<(&[&str], &str)> = refusals
        .iter()
        .map(|(args, why)| (args.as_slice(), *why))
        .collect();
    push_crl_reaches_a_gateway(fleet, Nats::single_tls, &["--push-ca", &ca], &refusals);
}

/// The same to a broker that wants a client certificate from every MQTT
/// client (the gateway shows its `upstream` service's): the push shows
/// the `pusher` service's. Without one, or with another PKI's, the broker
/// turns the push away and the push says so.
#[test]
fn push_crl_over_mutual_tls_shows_a_client_certificate() {
    let mut fleet = Fleet::new();
    fleet.service("upstream");
    fleet.service("pusher");
    let ca = fleet.path("openssl-ca.pem").display().to_string();
    let pusher = fleet.path("svc-pusher");
    let (cert, key) = (
        pusher.join("device.pem").display().to_string(),
        pusher.join("device.key").display().to_string(),
    );
    let mut stranger = Fleet::new();
    stranger.service("pusher");
    let other = stranger.path("svc-pusher");
    let (other_cert, other_key) = (
        other.join("device.pem").display().to_string(),
        other.join("device.key").display().to_string(),
    );
    let refusals = [
        (
            vec!["--push-ca", ca.as_str()],
            "the broker wants a client certificate (",
        ),
        (
            vec![
                "--push-ca",
                ca.as_str(),
                "--push-cert",
                other_cert.as_str(),
                "--push-key",
                other_key.as_str(),
            ],
            "the broker refused the client certificate (",
        ),
        (
            vec!["--push-ca", ca.as_str(), "--push-cert", cert.as_str()],
            "--push-key",
        ),
        (
            vec![
                "--push",
                "mqtt://127.0.0.1:1",
                "--push-ca",
                ca.as_str(),
                "--push-cert",
                cert.as_str(),
                "--push-key",
                key.as_str(),
            ],
            "--push-cert needs mqtts:// URLs; mqtt://127.0.0.1:1 is not one",
        ),
    ];
    let refusals: Vec<(&[&str], &str)> = refusals
        .iter()
        .map(|(args, why)| (args.as_slice(), *why))
        .collect();
    push_crl_reaches_a_gateway(
        fleet,
        Nats::single_mutual_tls,
        &["--push-ca", &ca, "--push-cert", &cert, "--push-key", &key],
        &refusals,
    );
}

/// A device revoked without --push, then `push-crl` (with `push_args`)
/// to the gateway's broker; each of `refused` (other push arguments and
/// the reason) is tried first and must fail saying why.
fn push_crl_reaches_a_gateway(
    mut fleet: Fleet,
    nats: fn(&Fleet) -> Nats,
    push_args: &[&str],
    refused: &[(&[&str], &str)],
) {
    let dev = fleet.device("sensor-1");
    let nats = nats(&fleet);
    let gw = Gateway::start(&fleet, &nats.gateway_config(0));
    let publish = || publish_x(&fleet, &gw, &dev);
    assert!(publish().status.success(), "{}", gw.log());
    let password = fleet.path("nats-password");
    std::fs::write(&password, format!("{NATS_PASSWORD}\n")).unwrap();
    let provisioning = |args: &[&str]| {
        let mut cmd = fleet.provisioning();
        cmd.args(args);
        run_bounded(cmd, 30)
    };
    let out = provisioning(&["revoke", "sensor-1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("(or --push it)"), "{}", text(&out));
    let url = nats.url(0);
    let push_crl = |extra: &[&str]| {
        let mut args = vec![
            "push-crl",
            "--push",
            &url,
            "--push-username",
            NATS_USER,
            "--push-password-file",
            password.to_str().unwrap(),
        ];
        args.extend(extra);
        provisioning(&args)
    };
    for (args, why) in refused {
        let out = push_crl(args);
        assert!(!out.status.success(), "pushed with {args:?}");
        assert!(text(&out).contains(why), "{args:?}: {}", text(&out));
    }
    assert!(
        publish().status.success(),
        "a refused push reached the gateway"
    );
    let out = push_crl(push_args);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        wait_until(10, || !publish().status.success()),
        "the revoked device still gets in:\n{}",
        gw.log()
    );
    gw.refusal("revoked");
    // A wrong password is said so, and nothing is pushed.
    std::fs::write(&password, "wrong").unwrap();
    let out = push_crl(push_args);
    assert!(!out.status.success());
    assert!(text(&out).contains("was not pushed"), "{}", text(&out));
}
