//! The gateway with real clients: mosquitto_pub/sub (OpenSSL) and
//! openssl s_client. Each accepted case is shown to work, and each refused
//! case asserts its reason in the audit log.

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use twofold_tests::*;

fn pub_args<'a>(client_id: &'a str, topic: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    [
        &["-i", client_id, "-t", topic, "-m", "reading", "-q", "1"][..],
        extra,
    ]
    .concat()
}

#[test]
fn devices_publish_over_3_1_1_and_5_and_a_service_receives() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let ops = fleet.service("ops");
    let gw = Gateway::start(&fleet, "");
    let sub = mosquitto_sub(
        &fleet,
        &gw,
        &ops,
        &["-i", "ops-1", "-t", "devices/+/telemetry", "-C", "2", "-v"],
    );
    wait_connected(&gw, "ops-1");
    for version in ["mqttv311", "mqttv5"] {
        let out = mosquitto_pub(
            &fleet,
            &gw,
            Some(&dev),
            &pub_args("sensor-1", "devices/sensor-1/telemetry", &["-V", version]),
        );
        assert!(out.status.success(), "{version}: {}", text(&out));
    }
    let out = finish(sub, 15);
    let received = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        received
            .matches("devices/sensor-1/telemetry reading")
            .count(),
        2,
        "{}",
        text(&out)
    );
    let connected = gw
        .events()
        .into_iter()
        .filter(|e| e["event"] == "connected" && e["client_id"] == "sensor-1")
        .count();
    assert_eq!(connected, 2);
}

#[test]
fn a_client_id_other_than_the_certificate_identity_is_refused() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    fleet.device("sensor-2");
    let gw = Gateway::start(&fleet, "");
    let out = mosquitto_pub(
        &fleet,
        &gw,
        Some(&dev),
        &pub_args("sensor-2", "devices/sensor-2/telemetry", &[]),
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("not authorised"), "{}", text(&out));
    let e = gw.refusal("client_id_mismatch");
    assert_eq!(e["client_id"], "sensor-2");
    assert_eq!(e["identity"], "spiffe://iot.example/device/sensor-1");
    assert!(
        e["serial"].as_str().is_some_and(|s| !s.is_empty()) && e["fingerprint"].as_str().is_some()
    );
    // MQTT 5 says why: client identifier not valid.
    let out = mosquitto_pub(
        &fleet,
        &gw,
        Some(&dev),
        &pub_args("sensor-2", "devices/sensor-2/telemetry", &["-V", "mqttv5"]),
    );
    assert!(
        text(&out).to_lowercase().contains("identifier not valid"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_device_cannot_publish_or_subscribe_outside_its_topics() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(&fleet, "");
    // 3.1.1 has no negative PUBACK: the session is closed.
    let out = mosquitto_pub(
        &fleet,
        &gw,
        Some(&dev),
        &pub_args("sensor-1", "devices/sensor-2/telemetry", &[]),
    );
    assert!(!out.status.success(), "{}", text(&out));
    let e = gw.refusal("policy_denied");
    assert!(
        e["detail"]
            .as_str()
            .unwrap()
            .contains("devices/sensor-2/telemetry"),
        "{e}"
    );
    // MQTT 5 answers with a PUBACK "not authorized".
    let out = mosquitto_pub(
        &fleet,
        &gw,
        Some(&dev),
        &pub_args("sensor-1", "devices/sensor-2/telemetry", &["-V", "mqttv5"]),
    );
    assert!(text(&out).contains("Not authorized"), "{}", text(&out));

    for filter in ["#", "devices/+/telemetry", "$SYS/#", "devices/sensor-2/#"] {
        let sub = mosquitto_sub(
            &fleet,
            &gw,
            &dev,
            &["-i", "sensor-1", "-t", filter, "-W", "5"],
        );
        let out = finish(sub, 10);
        assert!(!out.status.success(), "{filter}: {}", text(&out));
        gw.wait_for(|e| {
            e["reason"] == "policy_denied"
                && e["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains(&format!("{filter:?}")))
        })
        .unwrap_or_else(|| panic!("no policy_denied for {filter}; audit: {:#?}", gw.events()));
    }
    // MQTT 5: the SUBSCRIBE is answered with SUBACK "not authorized" and
    // the session stays open.
    let before = gw
        .events()
        .iter()
        .filter(|e| e["reason"] == "policy_denied")
        .count();
    let sub = mosquitto_sub(
        &fleet,
        &gw,
        &dev,
        &["-V", "mqttv5", "-i", "sensor-1", "-t", "#", "-W", "5"],
    );
    let out = finish(sub, 10);
    assert!(
        text(&out).to_lowercase().contains("denied"),
        "{}",
        text(&out)
    );
    gw.wait_for(|_| {
        gw.events()
            .iter()
            .filter(|e| e["reason"] == "policy_denied")
            .count()
            > before
    })
    .expect("a v5 SUBSCRIBE refusal is audited");
}

#[test]
fn certificates_the_gateway_must_not_accept_are_refused_with_their_reason() {
    let fleet = Fleet::new();
    let gw = Gateway::start(&fleet, "");
    let now = time::OffsetDateTime::now_utc();
    let cases: Vec<(&str, Identity)> = vec![
        (
            "expired",
            fleet.mint("expired", |p| {
                p.not_before = now - time::Duration::days(10);
                p.not_after = now - time::Duration::days(1);
            }),
        ),
        (
            "not_yet_valid",
            fleet.mint("future", |p| {
                p.not_before = now + time::Duration::days(1);
                p.not_after = now + time::Duration::days(10);
            }),
        ),
        (
            "bad_key_usage",
            fleet.mint("server-eku", |p| {
                p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
            }),
        ),
        (
            "bad_key_usage",
            fleet.mint("ca-leaf", |p| {
                p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            }),
        ),
        (
            "bad_identity",
            fleet.mint("no-uri", |p| p.subject_alt_names.clear()),
        ),
        (
            "bad_identity",
            fleet.mint("other-td", |p| {
                p.subject_alt_names = vec![rcgen::SanType::URI(
                    "spiffe://evil.example/device/other-td".try_into().unwrap(),
                )];
            }),
        ),
    ];
    for (reason, who) in &cases {
        let before = gw
            .events()
            .iter()
            .filter(|e| e["reason"] == *reason)
            .count();
        let out = mosquitto_pub(
            &fleet,
            &gw,
            Some(who),
            &pub_args("x", "devices/x/telemetry", &[]),
        );
        assert!(!out.status.success(), "{reason}: {}", text(&out));
        gw.wait_for(|_| {
            gw.events()
                .iter()
                .filter(|e| e["reason"] == *reason)
                .count()
                > before
        })
        .unwrap_or_else(|| panic!("no {reason}; audit: {:#?}", gw.events()));
    }
    let e = gw.refusal("expired");
    assert!(
        e["subject"].as_str().unwrap().contains("expired"),
        "the refused certificate is named: {e}"
    );
}

#[test]
fn a_certificate_from_another_ca_or_self_signed_is_an_unknown_issuer() {
    let fleet = Fleet::new();
    let gw = Gateway::start(&fleet, "");
    // A self-signed certificate copying a real device's subject and identity.
    let forged = mint_with(&fleet.path("forged"), None, "", "sensor-1", |_| {});
    let out = mosquitto_pub(
        &fleet,
        &gw,
        Some(&forged),
        &pub_args("sensor-1", "devices/sensor-1/telemetry", &[]),
    );
    assert!(!out.status.success());
    gw.refusal("unknown_issuer");
    // A whole other PKI.
    let mut rogue = Fleet::new();
    let rogue_dev = rogue.device("sensor-1");
    let out = mosquitto_pub(
        &fleet,
        &gw,
        Some(&rogue_dev),
        &pub_args("sensor-1", "devices/sensor-1/telemetry", &[]),
    );
    assert!(!out.status.success());
    assert_eq!(
        gw.events()
            .iter()
            .filter(|e| e["reason"] == "unknown_issuer")
            .count(),
        2
    );
}

#[test]
fn no_client_certificate_is_refused() {
    let fleet = Fleet::new();
    let gw = Gateway::start(&fleet, "");
    let out = mosquitto_pub(
        &fleet,
        &gw,
        None,
        &pub_args("sensor-1", "devices/sensor-1/telemetry", &[]),
    );
    assert!(!out.status.success());
    gw.refusal("no_certificate");
    let mut s_client = Command::new("openssl");
    s_client
        .args(["s_client", "-connect", &gw.addr.to_string(), "-CAfile"])
        .arg(fleet.path("openssl-ca.pem"));
    // In TLS 1.3 the refusal arrives after the client's Finished, which
    // s_client may not stay to print; the audit log is the proof.
    run_bounded(s_client, 10);
    gw.wait_for(|_| {
        gw.events()
            .iter()
            .filter(|e| e["reason"] == "no_certificate")
            .count()
            == 2
    })
    .unwrap_or_else(|| {
        panic!(
            "openssl without a certificate was not refused: {:#?}",
            gw.events()
        )
    });
}

#[test]
fn tls_1_1_is_refused() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(&fleet, "");
    let mut s_client = Command::new("openssl");
    // SECLEVEL=0 lets this OpenSSL offer TLS 1.1 at all.
    s_client
        .args([
            "s_client",
            "-tls1_1",
            "-cipher",
            "DEFAULT@SECLEVEL=0",
            "-connect",
            &gw.addr.to_string(),
            "-cert",
        ])
        .arg(&dev.cert)
        .arg("-key")
        .arg(&dev.key);
    let out = run_bounded(s_client, 10);
    // No cipher was agreed: the handshake failed.
    assert!(text(&out).contains("Cipher is (NONE)"), "{}", text(&out));
    assert!(
        text(&out).contains("alert handshake failure")
            || text(&out).contains("alert protocol version"),
        "{}",
        text(&out)
    );
    gw.refusal("protocol_error");
    assert!(gw.events().iter().all(|e| e["event"] != "connected"));
}

#[test]
fn revoked_certificates_are_refused_and_live_sessions_closed() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let other = fleet.device("sensor-2");
    let gw = Gateway::start(&fleet, "");
    // Live: a subscribed session is closed once the CRL lists its certificate.
    let sub = mosquitto_sub(
        &fleet,
        &gw,
        &dev,
        &["-i", "sensor-1", "-t", "devices/sensor-1/commands"],
    );
    let bystander = mosquitto_sub(
        &fleet,
        &gw,
        &other,
        &["-i", "sensor-2", "-t", "devices/sensor-2/commands"],
    );
    wait_connected(&gw, "sensor-1");
    wait_connected(&gw, "sensor-2");
    fleet.revoke("sensor-1");
    let e = gw.refusal("revoked");
    assert_eq!(e["client_id"], "sensor-1");
    let out = finish(sub, 10);
    assert!(
        !out.status.success() || text(&out).contains("lost"),
        "{}",
        text(&out)
    );
    // At connect: refused in the handshake.
    let out = mosquitto_pub(
        &fleet,
        &gw,
        Some(&dev),
        &pub_args("sensor-1", "devices/sensor-1/telemetry", &[]),
    );
    assert!(!out.status.success());
    gw.wait_for(|_| {
        gw.events()
            .iter()
            .filter(|e| e["reason"] == "revoked")
            .count()
            >= 2
    })
    .expect("refused at connect too");
    // The other device's session was not touched.
    assert_alive_then_kill(bystander, "a healthy session was dropped");
}

#[test]
fn a_corrupt_crl_is_refused_and_the_old_one_stays() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(&fleet, "");
    let sub = mosquitto_sub(
        &fleet,
        &gw,
        &dev,
        &["-i", "sensor-1", "-t", "devices/sensor-1/commands"],
    );
    wait_connected(&gw, "sensor-1");
    std::fs::write(
        fleet.path("gw/crl.pem"),
        "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !gw.log().contains("REFUSED new TLS files") {
        assert!(
            std::time::Instant::now() < deadline,
            "no refusal logged:\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut sub = sub;
    assert!(
        sub.try_wait().unwrap().is_none(),
        "a corrupt CRL dropped a healthy session"
    );
    let out = mosquitto_pub(
        &fleet,
        &gw,
        Some(&dev),
        &pub_args("sensor-1", "devices/sensor-1/state", &[]),
    );
    assert!(out.status.success(), "{}", text(&out));
    let _ = sub.kill();
    let _ = sub.wait();
}

#[test]
fn silent_connections_time_out_and_do_not_block_a_real_device() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(
        &fleet,
        "[limits]\nhandshake_timeout_secs = 2\nmax_concurrent_handshakes = 8\n",
    );
    let silent: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(gw.addr).unwrap())
        .collect();
    let out = mosquitto_pub(
        &fleet,
        &gw,
        Some(&dev),
        &pub_args("sensor-1", "devices/sensor-1/telemetry", &[]),
    );
    assert!(
        out.status.success(),
        "a real device was blocked by silent sockets: {}",
        text(&out)
    );
    let e = gw.refusal("handshake_timeout");
    assert!(
        e["detail"].as_str().unwrap().contains("no TLS handshake"),
        "{e}"
    );
    drop(silent);
}

#[test]
fn the_embedded_broker_has_no_listener_of_its_own() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(&fleet, "");
    // A session through the gateway works ...
    let out = mosquitto_pub(
        &fleet,
        &gw,
        Some(&dev),
        &[
            "-i",
            "sensor-1",
            "-t",
            "devices/sensor-1/telemetry",
            "-m",
            "x",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    // ... and the device port is the only one the process listens on:
    // the broker is reached in process, never over a socket.
    let device_port: u16 = gw.port().parse().unwrap();
    assert_eq!(gw.listening_ports(), vec![device_port]);
}

#[test]
fn oversized_and_malformed_mqtt_are_protocol_errors() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(&fleet, "[limits]\nmax_packet_size = 1024\n");
    let big = "x".repeat(4000);
    let out = mosquitto_pub(
        &fleet,
        &gw,
        Some(&dev),
        &pub_args(
            "sensor-1",
            "devices/sensor-1/telemetry",
            &[
                "--will-topic",
                "devices/sensor-1/state",
                "--will-payload",
                &big,
            ],
        ),
    );
    assert!(!out.status.success());
    let e = gw.refusal("protocol_error");
    assert!(
        e["detail"].as_str().unwrap().contains("the limit is 1024"),
        "{e}"
    );

    // Garbage after a good handshake.
    let mut s_client = Command::new("openssl");
    s_client
        .args([
            "s_client",
            "-quiet",
            "-connect",
            &gw.addr.to_string(),
            "-CAfile",
        ])
        .arg(fleet.path("openssl-ca.pem"))
        .arg("-cert")
        .arg(&dev.cert)
        .arg("-key")
        .arg(&dev.key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = s_client.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .unwrap();
    gw.wait_for(|e| {
        e["reason"] == "protocol_error"
            && e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("not CONNECT"))
    })
    .unwrap_or_else(|| panic!("no protocol_error for garbage; audit {:#?}", gw.events()));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn metrics_pass_promtool_and_count_what_happened() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let metrics_port = free_port();
    let gw = Gateway::start(&fleet, &format!("metrics = \"127.0.0.1:{metrics_port}\""));
    let metrics_addr: std::net::SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let out = mosquitto_pub(
        &fleet,
        &gw,
        Some(&dev),
        &pub_args("sensor-1", "devices/sensor-1/telemetry", &[]),
    );
    assert!(out.status.success(), "{}", text(&out));
    mosquitto_pub(
        &fleet,
        &gw,
        Some(&dev),
        &pub_args("intruder", "devices/intruder/telemetry", &[]),
    );
    gw.refusal("client_id_mismatch");

    let (status, body) = http_get(metrics_addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool: {}\n{body}",
        text(&checked)
    );
    for line in [
        "twofold_gateway_refusals_total{reason=\"client_id_mismatch\"} 1",
        "twofold_gateway_refusals_total{reason=\"revoked\"} 0",
        "twofold_gateway_handshakes_total{outcome=\"ok\"} 2",
        "twofold_gateway_messages_total{direction=\"in\"} 1",
        "twofold_gateway_crl_number 1",
        "twofold_gateway_broker_up 1",
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing {line:?} in\n{body}"
        );
    }
    let (status, body) = http_get(metrics_addr, "/healthz");
    assert!(status.contains("200") && body == "ok\n", "{status} {body}");
}

/// The other side: a broker that cannot be reached shows as 0 on
/// /metrics (what the BrokerDown alert watches) and 503 on /healthz.
#[test]
fn a_broker_that_cannot_be_reached_shows_on_metrics_and_healthz() {
    let fleet = Fleet::new();
    let metrics_port = free_port();
    let closed = free_port();
    let gw = Gateway::start(
        &fleet,
        &format!("metrics = \"127.0.0.1:{metrics_port}\"\nbroker = \"mqtt://127.0.0.1:{closed}\""),
    );
    let metrics_addr: std::net::SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let (_, body) = http_get(metrics_addr, "/metrics");
    assert!(
        body.lines().any(|l| l == "twofold_gateway_broker_up 0"),
        "{body}"
    );
    let (status, body) = http_get(metrics_addr, "/healthz");
    assert!(
        status.contains("503") && body == "broker unreachable\n",
        "{status} {body}"
    );
    drop(gw);
}

#[test]
fn a_resumed_tls_session_is_still_checked_against_the_current_crl() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(&fleet, "");
    let sess = fleet.path("session.pem");
    let first = s_client_session(&fleet, &gw, &dev, &["-sess_out", sess.to_str().unwrap()]);
    assert!(text(&first).contains("New, TLSv1.3"), "{}", text(&first));
    fleet.revoke("sensor-1");
    std::thread::sleep(Duration::from_millis(1500)); // the gateway polls the CRL every second
    let second = s_client_session(&fleet, &gw, &dev, &["-sess_in", sess.to_str().unwrap()]);
    assert!(
        text(&second).contains("Reused, TLSv1.3"),
        "the session was not resumed: {}",
        text(&second)
    );
    let e = gw.refusal("revoked");
    assert!(e["detail"].as_str().unwrap().contains("resumed"), "{e}");
}

/// A ticket outlives the certificate it was issued for: resuming with a
/// certificate that has expired since is refused as `expired`.
#[test]
fn a_resumed_tls_session_is_refused_once_its_certificate_has_expired() {
    let fleet = Fleet::new();
    let gw = Gateway::start(&fleet, "");
    let expiry = time::OffsetDateTime::now_utc() + time::Duration::seconds(8);
    let dev = fleet.mint("short-lived", |p| p.not_after = expiry);
    let sess = fleet.path("session.pem");
    let first = s_client_session(&fleet, &gw, &dev, &["-sess_out", sess.to_str().unwrap()]);
    assert!(
        text(&first).contains("New, TLSv1.3"),
        "the first handshake, while the certificate was valid: {}",
        text(&first)
    );
    while time::OffsetDateTime::now_utc() < expiry + time::Duration::seconds(1) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let second = s_client_session(&fleet, &gw, &dev, &["-sess_in", sess.to_str().unwrap()]);
    assert!(
        text(&second).contains("Reused, TLSv1.3"),
        "the session was not resumed: {}",
        text(&second)
    );
    let e = gw.refusal("expired");
    let detail = e["detail"].as_str().unwrap();
    assert!(
        detail.contains("expired at") && detail.contains("resumed"),
        "{e}"
    );
    assert!(
        e["subject"].as_str().unwrap().contains("short-lived"),
        "{e}"
    );
}

/// Resumed sessions skip certificate verification, so a new client CA
/// bundle ends them: a ticket from before is not taken, and the device
/// makes a full handshake, checked against the CAs now in force. (A new
/// CRL keeps them: the test above.)
#[test]
fn a_new_client_ca_bundle_ends_resumption() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(&fleet, "");
    // TLS 1.3 tickets, TLS 1.2 tickets, and TLS 1.2 session ids (the
    // gateway's session cache).
    let kinds: [(&str, &[&str]); 3] = [
        ("TLSv1.3", &[]),
        ("TLSv1.2", &["-tls1_2"]),
        ("TLSv1.2", &["-tls1_2", "-no_ticket"]),
    ];
    let session = |i: usize, dir: &str| {
        let file = fleet.path(&format!("session-{i}.pem"));
        [dir.to_owned(), file.to_str().unwrap().to_owned()]
    };
    let run = |i: usize, args: &[String]| {
        let mut all: Vec<&str> = kinds[i].1.to_vec();
        all.extend(args.iter().map(String::as_str));
        text(&s_client_session(&fleet, &gw, &dev, &all))
    };
    for (i, (version, _)) in kinds.iter().enumerate() {
        let first = run(i, &session(i, "-sess_out"));
        assert!(first.contains(&format!("New, {version}")), "{first}");
        let again = run(
            i,
            &[session(i, "-sess_in"), session(i, "-sess_out")].concat(),
        );
        assert!(
            again.contains(&format!("Reused, {version}")),
            "{i}: {again}"
        );
    }

    let other = Fleet::new();
    let reloads = || gw.log().matches("TLS files reloaded").count();
    let before = reloads();
    let bundle = format!(
        "{}{}",
        fleet.pki.device_ca_pem().unwrap(),
        other.pki.device_ca_pem().unwrap()
    );
    std::fs::write(fleet.path("gw/client-ca.pem.tmp"), bundle).unwrap();
    std::fs::rename(
        fleet.path("gw/client-ca.pem.tmp"),
        fleet.path("gw/client-ca.pem"),
    )
    .unwrap();
    assert!(wait_until(15, || reloads() > before), "{}", gw.log());

    for (i, (version, _)) in kinds.iter().enumerate() {
        let after = run(i, &session(i, "-sess_in"));
        assert!(
            after.contains(&format!("New, {version}")),
            "{i}: a session from before the new client CAs was resumed: {after}"
        );
        assert!(after.contains("Verify return code: 0"), "{after}");
    }
    assert!(
        gw.events().iter().all(|e| e["event"] != "refused"),
        "{:?}",
        gw.events()
    );
}

/// `openssl s_client` as `dev`, with `extra` arguments (e.g. -sess_out);
/// it stays a moment so the session ticket arrives, then hangs up.
fn s_client_session(
    fleet: &Fleet,
    gw: &Gateway,
    dev: &Identity,
    extra: &[&str],
) -> std::process::Output {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &gw.addr.to_string(), "-CAfile"])
        .arg(fleet.path("openssl-ca.pem"))
        .arg("-cert")
        .arg(&dev.cert)
        .arg("-key")
        .arg(&dev.key)
        .args(extra)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stdin = child.stdin.take();
    std::thread::sleep(Duration::from_millis(700));
    drop(stdin);
    finish(child, 10)
}

#[test]
fn sigterm_closes_sessions_and_exits() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let mut gw = Gateway::start(&fleet, "");
    let sub = mosquitto_sub(
        &fleet,
        &gw,
        &dev,
        &[
            "-V",
            "mqttv5",
            "-i",
            "sensor-1",
            "-t",
            "devices/sensor-1/commands",
        ],
    );
    wait_connected(&gw, "sensor-1");
    let kill = Command::new("kill")
        .args(["-TERM", &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = gw.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "gateway did not exit after SIGTERM:\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}\n{}", gw.log());
    // The subscriber ended by itself (an exit code, not our kill signal):
    // the gateway closed its session.
    let out = finish(sub, 10);
    assert!(
        out.status.code().is_some(),
        "the session was left open: {}",
        text(&out)
    );
    assert!(
        gw.events()
            .iter()
            .any(|e| e["event"] == "disconnected" && e["client_id"] == "sensor-1")
    );
}

/// A device publishes through the gateway; `sub` (already subscribed to
/// `devices/#` on the external broker) must see it, and policy still applies.
fn relay_through(fleet: &Fleet, gw: &Gateway, dev: &Identity, sub: std::process::Child) {
    std::thread::sleep(Duration::from_millis(500));
    let out = mosquitto_pub(
        fleet,
        gw,
        Some(dev),
        &pub_args("sensor-1", "devices/sensor-1/telemetry", &[]),
    );
    assert!(out.status.success(), "{}\n{}", text(&out), gw.log());
    let received = finish(sub, 10);
    assert!(
        String::from_utf8_lossy(&received.stdout).contains("devices/sensor-1/telemetry reading"),
        "{}",
        text(&received)
    );
    let out = mosquitto_pub(
        fleet,
        gw,
        Some(dev),
        &pub_args("sensor-1", "devices/other/telemetry", &[]),
    );
    assert!(!out.status.success());
    gw.refusal("policy_denied");
}

#[test]
fn relays_to_an_external_mosquitto_broker() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let (_broker, port) = mosquitto_with_password(&fleet, "gateway", "s3cret");
    let gw = Gateway::start(
        &fleet,
        &format!(
            "broker = \"mqtt://127.0.0.1:{port}\"\nbroker_username = \"gateway\"\nbroker_password = \"s3cret\""
        ),
    );
    let sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args([
            "-u",
            "gateway",
            "-P",
            "s3cret",
            "-t",
            "devices/#",
            "-C",
            "1",
            "-v",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    relay_through(&fleet, &gw, &dev, sub);
}

#[test]
fn relays_to_an_external_broker_over_mutual_tls() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    // The gateway authenticates to the broker with a service certificate;
    // the broker presents the gateway's own server certificate (it names
    // localhost) and asks for a client certificate from the device CA.
    let relay = fleet.service("relay");
    let (_broker, port) = mosquitto_mtls(&fleet);
    let tls_keys = format!(
        "broker_ca = \"{}\"\nbroker_cert = \"{}\"\nbroker_key = \"{}\"",
        fleet.path("openssl-ca.pem").display(),
        relay.cert.display(),
        relay.key.display()
    );
    let gw = Gateway::start(
        &fleet,
        &format!("broker = \"mqtts://localhost:{port}\"\n{tls_keys}"),
    );
    let sub = Command::new("mosquitto_sub")
        .args(tls_args(&fleet, port, &relay))
        .args(["-i", "watcher", "-t", "devices/#", "-C", "1", "-v"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    relay_through(&fleet, &gw, &dev, sub);
    drop(gw);

    // A broker whose certificate the configured CA did not sign is not
    // trusted: the device is told the service is unavailable and the log
    // says why.
    let other = Fleet::new();
    let gw = Gateway::start(
        &fleet,
        &format!(
            "broker = \"mqtts://localhost:{port}\"\nbroker_ca = \"{}\"\nbroker_cert = \"{}\"\nbroker_key = \"{}\"",
            other.path("openssl-ca.pem").display(),
            relay.cert.display(),
            relay.key.display()
        ),
    );
    let out = mosquitto_pub(
        &fleet,
        &gw,
        Some(&dev),
        &pub_args("sensor-1", "devices/sensor-1/telemetry", &[]),
    );
    assert!(!out.status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !gw.log().contains("cannot reach the broker") {
        assert!(std::time::Instant::now() < deadline, "{}", gw.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        gw.log().contains("invalid peer certificate: UnknownIssuer"),
        "{}",
        gw.log()
    );
}

#[test]
fn qos1_messages_all_arrive_through_the_relay() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let ops = fleet.service("ops");
    let gw = Gateway::start(&fleet, "");
    // About 1 MB through one fan-in filter: more than rumqttd kept per
    // filter before fan-in segments were sized (the loss this guards against).
    const N: usize = 20_000;
    let sub = mosquitto_sub(
        &fleet,
        &gw,
        &ops,
        &[
            "-i",
            "ops",
            "-q",
            "1",
            "-t",
            "devices/+/telemetry",
            "-C",
            &N.to_string(),
        ],
    );
    wait_connected(&gw, "ops");
    // mosquitto_pub -l sends every stdin line as one QoS 1 message.
    let mut publisher = Command::new("mosquitto_pub");
    publisher
        .args(["-h", "localhost", "-p", &gw.port(), "--cafile"])
        .arg(fleet.path("openssl-ca.pem"))
        .arg("--cert")
        .arg(&dev.cert)
        .arg("--key")
        .arg(&dev.key)
        .args([
            "-i",
            "sensor-1",
            "-t",
            "devices/sensor-1/telemetry",
            "-q",
            "1",
            "-l",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut publisher = publisher.spawn().unwrap();
    let lines: String = (0..N).map(|i| format!("seq-{i}\n")).collect();
    publisher
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    let published = finish(publisher, 60);
    assert!(published.status.success(), "{}", text(&published));
    let out = finish(sub, 60);
    let received: std::collections::HashSet<&str> =
        std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    let missing: Vec<usize> = (0..N)
        .filter(|i| !received.contains(format!("seq-{i}").as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {N} QoS 1 messages lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

#[test]
fn a_new_server_certificate_is_used_without_dropping_sessions() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(&fleet, "");
    let sub = mosquitto_sub(
        &fleet,
        &gw,
        &dev,
        &["-i", "sensor-1", "-t", "devices/sensor-1/commands"],
    );
    wait_connected(&gw, "sensor-1");
    let served_pem = fleet.path("served.pem");
    let served_serial = || {
        let mut s_client = Command::new("openssl");
        s_client.args(["s_client", "-connect", &gw.addr.to_string(), "-showcerts"]);
        let out = run_bounded(s_client, 10);
        let pem = text(&out);
        let start = pem
            .find("-----BEGIN CERTIFICATE-----")
            .expect("a certificate");
        let end =
            pem.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----".len();
        std::fs::write(&served_pem, &pem[start..end]).unwrap();
        let mut x509 = Command::new("openssl");
        x509.args(["x509", "-noout", "-serial", "-in"])
            .arg(&served_pem);
        text(&run_bounded(x509, 10)).trim().to_lowercase()
    };
    let before = served_serial();
    // Rotate: a new certificate and key, each file replaced atomically.
    let new = fleet
        .pki
        .issue_gateway(
            &["localhost".into()],
            &["127.0.0.1".parse().unwrap()],
            30,
            None,
        )
        .unwrap();
    let rotated = fleet.path("rotated");
    twofold_provisioning::output::write_gateway(
        &rotated,
        &new,
        &fleet.pki.device_ca_pem().unwrap(),
        &fleet.pki.crl_pem().unwrap(),
    )
    .unwrap();
    for file in ["gateway.key", "gateway.pem"] {
        std::fs::rename(rotated.join(file), fleet.path("gw").join(file)).unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while served_serial() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate was never served:\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(served_serial(), format!("serial={}", new.record.serial));
    assert_alive_then_kill(sub, "rotation dropped a healthy session");
}

#[test]
fn the_mcu_profile_caps_the_tls_records_the_gateway_sends() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(&fleet, "[limits]\nmax_tls_record = 512");
    let mut s_client = Command::new("openssl");
    s_client
        .args(["s_client", "-trace", "-connect", &gw.addr.to_string()])
        .arg("-CAfile")
        .arg(fleet.path("openssl-ca.pem"))
        .arg("-cert")
        .arg(&dev.cert)
        .arg("-key")
        .arg(&dev.key);
    let out = run_bounded(s_client, 10);
    let trace = String::from_utf8_lossy(&out.stdout);
    // Every record the gateway sent, by the length in its header.
    let lengths: Vec<usize> = trace
        .split("Received Record")
        .skip(1)
        .filter_map(|rec| {
            let line = rec
                .lines()
                .find(|l| l.trim_start().starts_with("Length ="))?;
            line.split('=').nth(1)?.trim().parse().ok()
        })
        .collect();
    // The handshake (the certificate chain alone is larger than 512 bytes)
    // arrived, split into records of at most 512 bytes with their 5-byte
    // header: what a device with a 512-byte receive buffer can take.
    assert!(trace.contains("Verification: OK"), "{trace}");
    assert!(lengths.len() > 3, "{lengths:?}\n{trace}");
    assert!(
        lengths.iter().all(|&n| n + 5 <= 512),
        "records over 512 bytes: {lengths:?}"
    );
    assert!(lengths.iter().any(|&n| n + 5 > 480), "{lengths:?}");
}

#[test]
fn a_new_client_ca_bundle_is_used_without_dropping_sessions() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let ops = fleet.service("ops");
    // A second device CA (another PKI) the operator starts trusting.
    // Its devices trust this gateway's server CA.
    let mut second = Fleet::new();
    let newcomer = second.device("sensor-9");
    let gw = Gateway::start(&fleet, "");
    let publish_as_newcomer = || {
        mosquitto_pub(
            &fleet,
            &gw,
            Some(&newcomer),
            &pub_args("sensor-9", "devices/sensor-9/telemetry", &[]),
        )
    };
    assert!(!publish_as_newcomer().status.success());
    gw.refusal("unknown_issuer");
    let sub = mosquitto_sub(
        &fleet,
        &gw,
        &dev,
        &[
            "-i",
            "sensor-1",
            "-t",
            "devices/sensor-1/commands",
            "-C",
            "1",
        ],
    );
    wait_connected(&gw, "sensor-1");

    // Both CAs, and a CRL from each (every client CA needs one: a leaf
    // whose revocation status is unknown is refused). Each file replaced
    // atomically; the CRL first, so every intermediate state is valid.
    let replace = |name: &str, text: String| {
        twofold_provisioning::atomic::write(
            &fleet.path("gw").join(name),
            text.as_bytes(),
            0o644,
            twofold_provisioning::atomic::Durability::Sync,
        )
        .unwrap()
    };
    let reloads = || gw.log().matches("TLS files reloaded").count();
    let before = reloads();
    replace(
        "crl.pem",
        format!(
            "{}{}",
            fleet.pki.crl_pem().unwrap(),
            second.pki.crl_pem().unwrap()
        ),
    );
    replace(
        "client-ca.pem",
        format!(
            "{}{}",
            fleet.pki.device_ca_pem().unwrap(),
            second.pki.device_ca_pem().unwrap()
        ),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !publish_as_newcomer().status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "the new client CA was never trusted:\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(reloads() > before, "{}", gw.log());

    // A broken bundle is refused loudly and the one in force stays.
    replace(
        "client-ca.pem",
        "-----BEGIN CERTIFICATE-----\nbroken\n".into(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !gw.log().contains("REFUSED new TLS files") {
        assert!(std::time::Instant::now() < deadline, "{}", gw.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(publish_as_newcomer().status.success(), "{}", gw.log());

    // The session that was up before all this is still up.
    let out = mosquitto_pub(
        &fleet,
        &gw,
        Some(&ops),
        &[
            "-i",
            "ops",
            "-t",
            "devices/sensor-1/commands",
            "-m",
            "still-there",
            "-q",
            "1",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let received = finish(sub, 10);
    assert_eq!(
        String::from_utf8_lossy(&received.stdout).trim(),
        "still-there",
        "{}",
        text(&received)
    );
}
