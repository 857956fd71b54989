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
