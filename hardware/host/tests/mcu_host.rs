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

/// Every telemetry sequence number from 0 up arrived: nothing lost.
fn assert_contiguous(seqs: &[u64], at_least: usize) {
    assert!(seqs.len() >= at_least, "{seqs:?}");
    let mut sorted = seqs.to_vec();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, (0..sorted.len() as u64).collect::<Vec<_>>());
}

#[test]
fn host_runner_renews_a_one_minute_certificate_twice_with_its_key() {
    use twofold_protocol::{DeviceId, Principal};
    use twofold_provisioning::registry::RevocationReason;
    let RenewingMcu {
        sub,
        gw,
        ca: _ca,
        port: _,
        bundle,
        fleet,
    } = RenewingMcu::start("mcu-n");
    let slots = fleet.path("mcu-n.slots");
    let mut dev = mcu_host(
        &fleet,
        "n",
        &bundle,
        &[
            "--slots",
            slots.to_str().unwrap(),
            "--telemetry",
            "10",
            "--renewals",
            "2",
            "--interval-ms",
            "1000",
            "--attempts",
            "5",
        ],
    );
    // Each one-minute certificate is due about 35 s after it was issued.
    let status = exit_status(&mut dev, 240);
    println!("{}", dev.log());
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}\ngateway:\n{}",
        dev.log(),
        gw.log()
    );
    for generation in [1, 2] {
        assert!(
            dev.log()
                .contains(&format!("certificate {generation} committed")),
            "{}",
            dev.log()
        );
    }
    assert!(dev.log().contains("renewal due in"), "{}", dev.log());
    assert!(
        dev.log().contains("asking for certificate 2"),
        "{}",
        dev.log()
    );

    // Three certificates, one key: renewal keeps the key. The first two
    // were superseded as their successors were committed.
    let principal = Principal::Device(DeviceId::parse("mcu-n").unwrap());
    let history = fleet.pki.history(&principal).unwrap();
    assert_eq!(history.len(), 3, "{history:?}");
    let keys: std::collections::BTreeSet<Vec<u8>> = history
        .iter()
        .map(|r| {
            let (_, c) = x509_parser::parse_x509_certificate(&r.der).unwrap();
            c.public_key().raw.to_vec()
        })
        .collect();
    assert_eq!(keys.len(), 1, "a renewal changed the key");
    let superseded = history
        .iter()
        .filter(|r| {
            r.revocation
                .is_some_and(|v| v.reason == RevocationReason::Superseded)
        })
        .count();
    assert_eq!(superseded, 2, "{history:?}");

    assert!(wait_until(10, || telemetry_seqs(&sub, "mcu-n").len() >= 10));
    assert_contiguous(&telemetry_seqs(&sub, "mcu-n"), 10);

    // The slots survive a restart: the device comes back with generation 2.
    let mut again = mcu_host(
        &fleet,
        "n2",
        &bundle,
        &[
            "--slots",
            slots.to_str().unwrap(),
            "--telemetry",
            "1",
            "--attempts",
            "3",
        ],
    );
    let status = exit_status(&mut again, 60);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", again.log());
    assert!(
        again.log().contains("certificate generation 2 committed\n"),
        "{}",
        again.log()
    );
}

#[test]
fn a_staged_certificate_the_gateway_refuses_is_rolled_back() {
    use twofold_protocol::{Bundle, ChainRecord};
    let fleet = Fleet::new();
    let port = free_port();
    let gw = Gateway::start_on(&fleet, port, MCU_LIMITS);
    let bundle = enroll_nostd(&fleet, "mcu-s", port);
    // Staged: another device's certificate, for a key this device does
    // not hold. The gateway refuses the handshake's signature.
    let other = enroll_nostd(&fleet, "mcu-o", port);
    let other = std::fs::read(other).unwrap();
    let other = Bundle::decode(&other).unwrap();
    let record = ChainRecord {
        generation: 1,
        chain: heapless::Vec::from_slice(&[other.leaf()]).unwrap(),
    };
    let mut file = vec![0xffu8; 8192];
    record.encode(&mut file[..4096]).unwrap();
    let slots = fleet.path("mcu-s.slots");
    std::fs::write(&slots, &file).unwrap();

    let mut dev = mcu_host(
        &fleet,
        "s",
        &bundle,
        &[
            "--slots",
            slots.to_str().unwrap(),
            "--telemetry",
            "2",
            "--attempts",
            "3",
        ],
    );
    let status = exit_status(&mut dev, 60);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}\ngateway:\n{}",
        dev.log(),
        gw.log()
    );
    assert!(
        dev.log()
            .contains("gateway refused certificate 1; rolled back"),
        "{}",
        dev.log()
    );
    // The slot is erased: the next start presents the bundle's certificate.
    let file = std::fs::read(&slots).unwrap();
    assert!(file[..4096].iter().all(|&b| b == 0xff));
}
