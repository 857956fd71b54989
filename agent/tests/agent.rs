//! The agent binary against the real gateway and against mosquitto with
//! mutual TLS: telemetry arrives and decodes, commands run and answer,
//! nothing is lost when the gateway or the agent is killed.

use std::collections::BTreeMap;
use std::process::Command;

use twofold_protocol::message::{self, ReplyStatus, Telemetry};
use twofold_tests::*;

#[test]
fn telemetry_and_commands_through_the_gateway() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("pi-1");
    let ops = fleet.service("ops");
    let port = free_port();
    let gw = Gateway::start_on(&fleet, port, "");
    let sub = Sub::telemetry_and_replies(&fleet, port, &ops, "ops", "+");
    let agent = agent(
        &fleet,
        "pi-1",
        &dev,
        port,
        "[telemetry]\ninterval_secs = 1\n[commands.echo]\nprogram = \"/bin/cat\"\ntimeout_secs = 5\n",
    );

    // Telemetry arrives, decodes, and counts up from 0.
    let arrived = wait_until(30, || {
        sub.messages()
            .iter()
            .filter(|(t, _)| t == "devices/pi-1/telemetry")
            .count()
            >= 2
    });
    assert!(
        arrived,
        "no telemetry:\nagent:\n{}\ngateway:\n{}",
        agent.log(),
        gw.log()
    );
    let telemetry: Vec<(u64, usize, bool)> = sub
        .messages()
        .iter()
        .filter(|(t, _)| t == "devices/pi-1/telemetry")
        .map(|(_, p)| {
            let t: Telemetry = message::decode(p).expect("postcard telemetry");
            let has_mem = t.readings.iter().any(|r| r.name == "mem_total_bytes");
            (t.seq, t.readings.len(), has_mem)
        })
        .collect();
    assert_eq!(telemetry[0].0, 0);
    assert_eq!(telemetry[1].0, 1);
    assert!(
        telemetry.iter().all(|&(_, n, mem)| n >= 6 && mem),
        "{telemetry:?}"
    );

    // ping, an operator command fed its body on stdin, and a command the
    // device does not have (the name is never a path or a shell word).
    send_command(&fleet, port, &ops, "pi-1", 1, "ping", b"");
    send_command(&fleet, port, &ops, "pi-1", 2, "echo", b"$(reboot)");
    send_command(&fleet, port, &ops, "pi-1", 3, "/bin/sh", b"-c reboot");
    assert!(
        wait_until(30, || replies(&sub).len() == 3),
        "replies: {:?}\nagent:\n{}",
        replies(&sub),
        agent.log()
    );
    let r = replies(&sub);
    assert_eq!(r[&1], (ReplyStatus::Ok, None, b"pong".to_vec()));
    assert_eq!(r[&2], (ReplyStatus::Ok, Some(0), b"$(reboot)".to_vec()));
    assert_eq!(r[&3].0, ReplyStatus::UnknownCommand);

    // A local app publishes through the socket, inside the device's topics only.
    let publish = |topic: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_agent"));
        c.args(["publish", "--topic", topic, "--data", "open", "--socket"])
            .arg(fleet.path("agent-pi-1.sock"));
        run_bounded(c, 10)
    };
    let refused = publish("commands");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("the agent's own channel"));
    let refused = publish("../x/#");
    assert!(!refused.status.success());
}

#[test]
fn telemetry_reaches_a_mosquitto_broker_with_mutual_tls() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("pi-2");
    let watcher = fleet.service("watcher");
    let (_broker, port) = mosquitto_mtls(&fleet);
    let sub = Sub::start_tls(
        &fleet,
        port,
        &watcher,
        "watcher",
        &["-i", "watcher", "-t", "devices/#"],
    );
    let agent = agent(
        &fleet,
        "pi-2",
        &dev,
        port,
        "[telemetry]\ninterval_secs = 1\nformat = \"json\"\n",
    );
    assert!(
        wait_until(30, || sub
            .messages()
            .iter()
            .any(|(t, _)| t == "devices/pi-2/telemetry")),
        "agent:\n{}",
        agent.log()
    );
    let (_, payload) = sub
        .messages()
        .into_iter()
        .find(|(t, _)| t == "devices/pi-2/telemetry")
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(json["seq"], 0);
    assert!(json["readings"].as_array().unwrap().len() >= 6);
}

/// Publishes `app/seq` messages `range` through the agent's socket.
fn publish_range(fleet: &Fleet, name: &str, range: std::ops::Range<u32>) {
    for i in range {
        let mut c = Command::new(env!("CARGO_BIN_EXE_agent"));
        c.args([
            "publish",
            "--topic",
            "app/seq",
            "--data",
            &format!("seq-{i}"),
            "--socket",
        ])
        .arg(fleet.path(&format!("agent-{name}.sock")));
        let out = run_bounded(c, 10);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn nothing_is_lost_when_the_gateway_or_the_agent_is_killed() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("pi-3");
    // The gateway relays to a mosquitto that outlives it, and the
    // subscriber stays connected there: what this test kills is the
    // gateway and the agent, not the broker.
    let relay = Relay::start(&fleet, "devices/pi-3/#", "outage");
    let sub = &relay.sub;
    let port = free_port();
    let mut gw = Gateway::start_on(&fleet, port, &relay.config);
    let mut agent_proc = agent(
        &fleet,
        "pi-3",
        &dev,
        port,
        "[telemetry]\ninterval_secs = 1\n",
    );

    const N: u32 = 300;
    publish_range(&fleet, "pi-3", 0..100);
    gw.kill(); // kill -9 while messages are in flight
    publish_range(&fleet, "pi-3", 100..200);
    let gw_again = Gateway::start_on(&fleet, port, &relay.config);
    // Stop the gateway again, queue more, then kill -9 the agent with
    // messages waiting on disk, and bring both back.
    drop(gw_again);
    publish_range(&fleet, "pi-3", 200..N);
    agent_proc.kill();
    let _gw = Gateway::start_on(&fleet, port, &relay.config);
    let agent_proc = agent(
        &fleet,
        "pi-3",
        &dev,
        port,
        "[telemetry]\ninterval_secs = 1\n",
    );

    let received = || -> BTreeMap<String, usize> {
        let mut seen = BTreeMap::new();
        for (t, p) in sub.messages() {
            if !t.ends_with("/app/seq") {
                continue;
            }
            *seen
                .entry(String::from_utf8_lossy(&p).into_owned())
                .or_insert(0) += 1;
        }
        seen
    };
    let all = wait_until(60, || {
        (0..N).all(|i| received().contains_key(&format!("seq-{i}")))
    });
    let seen = received();
    let missing: Vec<u32> = (0..N)
        .filter(|i| !seen.contains_key(&format!("seq-{i}")))
        .collect();
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    println!(
        "outage test: {N} sent, {} distinct received, {duplicates} duplicates, {} missing",
        seen.len(),
        missing.len()
    );
    assert!(
        all && missing.is_empty(),
        "missing {missing:?}\nagent:\n{}",
        agent_proc.log()
    );

    // Telemetry (QoS 1, one sample a second) went through the same kills:
    // every sequence number the agent ever handed out has either arrived or
    // is still in its queue on disk.
    let mut agent_proc = agent_proc;
    agent_proc.kill();
    sub.settle(30);
    let t = account_telemetry(&fleet, "pi-3", "pi-3", &sub.messages());
    println!("outage test, telemetry: {t:?}");
    assert!(t.generated >= 3, "only {} telemetry samples", t.generated);
    assert!(t.lost.is_empty(), "telemetry lost: {:?}", t.lost);
}

/// Short-lived certificates as the normal case: a device whose
/// certificate lives one minute runs through four renewals (rekey, each
/// committed) with QoS 1 telemetry flowing, and nothing is lost.
#[test]
fn a_one_minute_certificate_is_renewed_four_times_and_nothing_is_lost() {
    use twofold_protocol::{DeviceId, Principal};
    let mut fleet = Fleet::new();
    let dev = fleet.device("pi-r");
    fleet.service("gw");
    // The device starts on a one-minute certificate (same key).
    let now = time::OffsetDateTime::now_utc();
    fleet.one_minute_certificate(&dev.cert, "pi-r", now);
    let principal = Principal::Device(DeviceId::parse("pi-r").unwrap());

    let ca = CaService::start(
        &mut fleet,
        &["--ra", "gw", "--lifetime", "60s", "--rate-limit", "100"],
    );
    let relay = Relay::start(&fleet, "devices/pi-r/#", "renewal");
    let port = free_port();
    let _gw = Gateway::start_on(
        &fleet,
        port,
        &format!("{}\n{}", relay.config, ca.gateway_toml(&fleet, "gw")),
    );
    let mut agent_proc = agent(
        &fleet,
        "pi-r",
        &dev,
        port,
        "[telemetry]\ninterval_secs = 1\n",
    );
    let committed = |p: &Proc| p.log().matches("renewed certificate committed").count();
    // Each certificate is due about 40 s after it was issued.
    let renewed = wait_until(300, || committed(&agent_proc) >= 4);
    let history = fleet.pki.history(&principal).unwrap();
    println!(
        "renewal test: {} commits in the agent's log, {} certificates in the registry",
        committed(&agent_proc),
        history.len()
    );
    assert!(renewed, "fewer than four renewals:\n{}", agent_proc.log());
    // Every renewal was a rekey: no two certificates share a key (but the
    // enrolled one and the test's one-minute one, newest first).
    let keys = public_keys(&history[..history.len() - 1]);
    assert_eq!(keys.len(), history.len() - 1, "a renewal kept its key");
    // The predecessors were superseded as each new one was committed.
    let superseded = history
        .iter()
        .filter(|r| {
            r.revocation.is_some_and(|v| {
                v.reason == twofold_provisioning::registry::RevocationReason::Superseded
            })
        })
        .count();
    assert!(
        superseded >= 5,
        "{superseded} superseded of {}",
        history.len()
    );

    agent_proc.kill();
    relay.sub.settle(30);
    let t = account_telemetry(&fleet, "pi-r", "pi-r", &relay.sub.messages());
    println!("renewal test, telemetry: {t:?}");
    assert!(t.generated >= 100, "only {} telemetry samples", t.generated);
    assert!(t.lost.is_empty(), "telemetry lost: {:?}", t.lost);
}

/// A certificate for `name` that expired `ago`.
fn expired_certificate(fleet: &mut Fleet, who: &Identity, name: &str, ago: time::Duration) {
    let at = time::OffsetDateTime::now_utc() - ago - time::Duration::seconds(60);
    fleet.one_minute_certificate(&who.cert, name, at);
}

#[test]
fn an_expired_certificate_renews_within_the_grace_period_and_only_renews() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("pi-g");
    let late = fleet.device("pi-late");
    let ops = fleet.service("ops");
    fleet.service("gw");
    // pi-g expired ten minutes ago, pi-late three hours ago; the grace
    // period is an hour at the gateway and at the CA service.
    expired_certificate(&mut fleet, &dev, "pi-g", time::Duration::minutes(10));
    expired_certificate(&mut fleet, &late, "pi-late", time::Duration::hours(3));
    let ca = CaService::start(
        &mut fleet,
        &["--ra", "gw", "--lifetime", "1h", "--expired-grace", "1h"],
    );
    let relay = Relay::start(&fleet, "devices/pi-g/#", "grace");
    let port = free_port();
    let gw = Gateway::start_on(
        &fleet,
        port,
        &format!(
            "expired_grace_secs = 3600\n{}\n{}",
            relay.config,
            ca.gateway_toml(&fleet, "gw")
        ),
    );

    // A client with the expired certificate gets a session that may only
    // renew: its PUBLISH is held back, its SUBSCRIBE refused, both audited.
    let out = mosquitto_pub(
        &fleet,
        &gw,
        Some(&dev),
        &[
            "-i",
            "pi-g",
            "-t",
            "devices/pi-g/telemetry",
            "-m",
            "held",
            "-q",
            "0",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let held = gw
        .wait_for(|e| {
            e["reason"] == "renew_only"
                && e["detail"].as_str().is_some_and(|d| d.contains("PUBLISH"))
        })
        .expect("no renew_only line for the PUBLISH");
    let detail = held["detail"].as_str().unwrap();
    assert!(
        detail.contains("held back") && detail.contains("may only renew"),
        "{detail}"
    );
    let sub = mosquitto_sub(
        &fleet,
        &gw,
        &dev,
        &[
            "-i",
            "pi-g",
            "-t",
            "devices/pi-g/commands",
            "-C",
            "1",
            "-W",
            "5",
        ],
    );
    let out = finish(sub, 15);
    assert!(
        text(&out).contains("All subscription requests were denied"),
        "{}",
        text(&out)
    );
    let refused = gw
        .wait_for(|e| {
            e["reason"] == "renew_only"
                && e["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("SUBSCRIBE"))
        })
        .expect("no renew_only line for the SUBSCRIBE");
    assert!(
        refused["detail"]
            .as_str()
            .unwrap()
            .contains("devices/pi-g/commands")
    );
    let connected = gw
        .wait_for(|e| {
            e["event"] == "connected"
                && e["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("renew-only"))
        })
        .expect("no renew-only connected line");
    assert_eq!(connected["identity"], "spiffe://iot.example/device/pi-g");

    // The agent renews in that session, reconnects with its new
    // certificate, and everything it held arrives.
    let mut agent_proc = agent(
        &fleet,
        "pi-g",
        &dev,
        port,
        "[telemetry]\ninterval_secs = 1\n",
    );
    let renewed = wait_until(90, || {
        agent_proc.log().contains("renewed certificate committed")
    });
    assert!(renewed, "{}\ngateway:\n{}", agent_proc.log(), gw.log());
    assert!(wait_until(30, || {
        relay
            .sub
            .messages()
            .iter()
            .any(|(t, _)| t == "devices/pi-g/telemetry")
    }));
    agent_proc.kill();
    relay.sub.settle(10);
    let t = account_telemetry(&fleet, "pi-g", "pi-g", &relay.sub.messages());
    println!("grace test, telemetry: {t:?}");
    assert!(t.lost.is_empty(), "telemetry lost: {:?}", t.lost);
    assert!(
        !relay.sub.messages().iter().any(|(_, p)| p == b"held"),
        "a renew-only PUBLISH reached the broker"
    );

    // Past the grace period: refused in the handshake, with the way back.
    let out = mosquitto_pub(
        &fleet,
        &gw,
        Some(&late),
        &[
            "-i",
            "pi-late",
            "-t",
            "devices/pi-late/telemetry",
            "-m",
            "x",
        ],
    );
    assert!(!out.status.success());
    let refusal = gw
        .wait_for(|e| {
            e["reason"] == "expired" && e["detail"].as_str().is_some_and(|d| d.contains("grace"))
        })
        .expect("no expired refusal");
    let detail = refusal["detail"].as_str().unwrap();
    assert!(
        detail.contains("past this gateway's grace period of 1h"),
        "{detail}"
    );
    assert!(
        detail.contains("provisioning enroll ID --replace"),
        "{detail}"
    );
    let _ = ops;
}

/// A revoked device says so once, plainly, and does not retry on the
/// network-failure backoff (0.2 s to 2 s here): one refusal in several
/// seconds, not a dozen. Enrolled again, it takes the new certificate
/// without a restart.
#[test]
fn a_revoked_device_says_so_once_waits_and_takes_a_new_certificate() {
    use twofold_protocol::{DeviceId, Principal};
    let mut fleet = Fleet::new();
    let dev = fleet.device("pi-1");
    let port = free_port();
    let gw = Gateway::start_on(&fleet, port, "");
    fleet.revoke("pi-1");
    let agent = agent(&fleet, "pi-1", &dev, port, "");
    // The first attempts may resume a TLS session, which the gateway can
    // refuse only by closing; the agent's full handshake then gets the
    // reason as a TLS alert.
    assert!(
        wait_until(30, || agent.log().contains("it is revoked")),
        "agent:\n{}\naudit:\n{:#?}",
        agent.log(),
        gw.events()
    );
    let refusals = || {
        gw.events()
            .iter()
            .filter(|e| e["event"] == "refused" && e["reason"] == "revoked")
            .count()
    };
    let before = refusals();
    // The network backoff would have retried several times by now.
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(refusals(), before, "agent:\n{}", agent.log());
    let log = agent.log();
    assert_eq!(
        log.matches("it is revoked").count(),
        1,
        "said once, plainly:\n{log}"
    );
    assert!(log.contains("enroll the device again"), "{log}");

    // Enrolled again: the key first, then the certificate whose change
    // the agent watches. It connects (a second time: the first was before
    // the gateway took the CRL) without a restart.
    let fresh = fleet.enroll(
        Principal::Device(DeviceId::parse("pi-1").unwrap()),
        "pi-1-new",
    );
    std::fs::copy(&fresh.key, &dev.key).unwrap();
    std::fs::copy(&fresh.cert, &dev.cert).unwrap();
    assert!(
        wait_until(30, || {
            agent
                .log()
                .matches("connected to the gateway device")
                .count()
                >= 2
        }),
        "agent:\n{}\naudit:\n{:#?}",
        agent.log(),
        gw.events()
    );
    assert!(
        agent.log().contains("the certificate file changed"),
        "{}",
        agent.log()
    );
}

/// A renewed pair the gateway refuses (here one it cannot trust: a
/// self-signed certificate for the same device, as a renewal gone wrong
/// could leave it) is rolled back on the gateway's TLS alert, and the
/// agent connects with the pair in force. Only the gateway's own refusal
/// does that; a reset or a timeout does not (link.rs unit test).
#[test]
fn a_renewed_certificate_the_gateway_refuses_is_rolled_back() {
    let mut fleet = Fleet::new();
    let dev = fleet.device("pi-b");
    let port = free_port();
    let gw = Gateway::start_on(&fleet, port, "");
    let bad = mint_with(&fleet.path("pi-b-bad"), None, "", "pi-b", |_| {});
    let (key_next, cert_next) = (
        dev.dir.join("device.key.next"),
        dev.dir.join("device.pem.next"),
    );
    std::fs::copy(&bad.key, &key_next).unwrap();
    std::fs::copy(&bad.cert, &cert_next).unwrap();
    let agent = agent(&fleet, "pi-b", &dev, port, "");
    assert!(
        wait_until(30, || agent
            .log()
            .contains("connected to the gateway device")),
        "agent:\n{}\naudit:\n{:#?}",
        agent.log(),
        gw.events()
    );
    let log = agent.log();
    assert!(log.contains("rolling back to the one in force"), "{log}");
    assert!(!cert_next.exists() && !key_next.exists());
    assert!(gw.refusal("unknown_issuer").to_string().contains("pi-b"));
}
