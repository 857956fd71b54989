//! `mcu-host`: the microcontroller agent's library over TCP against the
//! real gateway (MCU profile), enrolled from a bundle made by
//! `provisioning enroll --format nostd`.

use std::path::Path;
use std::process::Command;

use twofold_protocol::message::{self, ReplyStatus, Telemetry};
use twofold_tests::*;

fn mcu_host(fleet: &Fleet, name: &str, bundle: &Path, args: &[&str]) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcu-host"));
    cmd.arg("--bundle")
        .arg(bundle)
        .args(["--tls-rx", "2048"])
        .args(args);
    spawn(cmd, fleet.path(&format!("mcu-host-{name}.log")))
}

/// The sequence numbers of `device`'s telemetry that `sub` received,
/// each decoded and checked for its uptime reading and time stamp.
fn telemetry_seqs(sub: &Sub, device: &str) -> Vec<u64> {
    let topic = format!("devices/{device}/telemetry");
    sub.messages()
        .iter()
        .filter(|(t, _)| *t == topic)
        .map(|(_, p)| {
            let t: Telemetry = message::decode(p).expect("postcard telemetry");
            assert_eq!(t.readings[0].name, "uptime_ms");
            assert!(t.time_ms.is_some());
            t.seq
        })
        .collect()
}

#[test]
fn host_runner_sends_telemetry_and_answers_a_command() {
    let mut fleet = Fleet::new();
    let ops = fleet.service("ops");
    let port = free_port();
    let gw = Gateway::start_on(&fleet, port, MCU_LIMITS);
    let bundle = enroll_nostd(&fleet, "mcu-1", port);
    let sub = Sub::telemetry_and_replies(&fleet, port, &ops, "ops", "mcu-1");
    let mut dev = mcu_host(
        &fleet,
        "1",
        &bundle,
        &[
            "--telemetry",
            "3",
            "--commands",
            "2",
            "--interval-ms",
            "200",
            "--attempts",
            "3",
        ],
    );
    assert!(
        wait_until(30, || dev.log().contains("subscribed to commands")),
        "device did not subscribe:\n{}\ngateway:\n{}",
        dev.log(),
        gw.log()
    );
    send_command(&fleet, port, &ops, "mcu-1", 7, "ping", b"");
    send_command(&fleet, port, &ops, "mcu-1", 8, "reboot", b"");
    let status = exit_status(&mut dev, 60);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", dev.log());

    // Telemetry: at least three, decoded, counting up from 0 without gaps.
    assert!(wait_until(10, || replies(&sub).len() == 2));
    let seqs = telemetry_seqs(&sub, "mcu-1");
    assert!(seqs.len() >= 3, "{seqs:?}\n{}", dev.log());
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());

    let replies = replies(&sub);
    assert_eq!(replies[&7], (ReplyStatus::Ok, None, b"pong".to_vec()));
    assert_eq!(replies[&8].0, ReplyStatus::UnknownCommand);
    assert!(dev.log().contains("disconnected"), "{}", dev.log());
    // The gateway saw a clean session for the device's own identity.
    assert!(
        gw.wait_for(|e| e["event"] == "connected" && e["client_id"] == "mcu-1")
            .is_some()
    );
}

#[test]
fn host_runner_reports_a_revoked_certificate() {
    let mut fleet = Fleet::new();
    let port = free_port();
    let bundle = enroll_nostd(&fleet, "mcu-2", port);
    fleet.revoke("mcu-2");
    let gw = Gateway::start_on(&fleet, port, MCU_LIMITS);

    let mut dev = mcu_host(&fleet, "2", &bundle, &["--attempts", "1"]);
    assert_mcu_refused_by_gateway(&mut dev, 60);
    let refusal = gw.refusal("revoked");
    assert!(refusal.to_string().contains("mcu-2"), "{refusal}");
}

#[test]
fn host_runner_sends_qos0_telemetry() {
    let mut fleet = Fleet::new();
    let ops = fleet.service("ops");
    let port = free_port();
    let gw = Gateway::start_on(&fleet, port, MCU_LIMITS);
    let bundle = enroll_nostd(&fleet, "mcu-3", port);
    let sub = Sub::telemetry_and_replies(&fleet, port, &ops, "ops", "mcu-3");
    let args = ["--qos0", "--telemetry", "3", "--interval-ms", "200"];
    let mut dev = mcu_host(&fleet, "3", &bundle, &args);
    let status = exit_status(&mut dev, 60);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", dev.log());
    // Sent once each, never acknowledged; on loopback all three arrive.
    assert!(wait_until(10, || telemetry_seqs(&sub, "mcu-3").len() == 3));
    assert_eq!(telemetry_seqs(&sub, "mcu-3"), [0, 1, 2]);
    assert!(!dev.log().contains("acknowledged"), "{}", dev.log());
    let connected = gw.wait_for(|e| e["event"] == "connected" && e["client_id"] == "mcu-3");
    assert!(connected.is_some(), "{}", gw.log());
}
