//! Gateways in front of NATS (JetStream and its MQTT listener): durable
//! sessions on one machine.

use twofold_tests::*;

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
