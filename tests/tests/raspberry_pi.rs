//! The Raspberry Pi builds of the agent (aarch64 and armv7, cross-compiled
//! with Debian's linkers by `hardware/raspberry-pi/build`) run under
//! qemu-user against the real gateway: `doctor` passes every check and the
//! agent's telemetry arrives and decodes.
//!
//! Ignored in a plain `cargo test` because it needs those builds;
//! `scripts/test` makes them and runs it.

use std::path::PathBuf;
use std::process::Command;

use twofold_protocol::message::{self, Telemetry};
use twofold_tests::*;

/// (Rust target, qemu-user program, the cross toolchain's sysroot)
const BOARDS: [(&str, &str, &str); 2] = [
    (
        "aarch64-unknown-linux-gnu",
        "qemu-aarch64",
        "/usr/aarch64-linux-gnu",
    ),
    (
        "armv7-unknown-linux-gnueabihf",
        "qemu-arm",
        "/usr/arm-linux-gnueabihf",
    ),
];

/// `target/<triple>/release/agent`, next to this test's own target dir.
fn cross_agent(target: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target_dir = exe.ancestors().nth(3).unwrap();
    let bin = target_dir.join(target).join("release").join("agent");
    assert!(
        bin.is_file(),
        "{} is missing: run hardware/raspberry-pi/build first",
        bin.display()
    );
    bin
}

fn under_qemu(qemu: &str, sysroot: &str, bin: &PathBuf) -> Command {
    let mut cmd = Command::new(qemu);
    cmd.arg("-L").arg(sysroot).arg(bin);
    cmd
}

#[test]
#[ignore = "needs the cross-built agents: hardware/raspberry-pi/build (scripts/test runs it)"]
fn raspberry_pi_agents_pass_doctor_and_send_telemetry() {
    let mut fleet = Fleet::new();
    let ops = fleet.service("ops");
    let gw = Gateway::start(&fleet, "");
    let port = gw.addr.port();
    let sub = Sub::start_tls(
        &fleet,
        port,
        &ops,
        "ops",
        &["-i", "ops", "-q", "1", "-t", "devices/+/telemetry"],
    );

    for (target, qemu, sysroot) in BOARDS {
        let bin = cross_agent(target);
        let name = format!("pi-{}", target.split('-').next().unwrap());
        let device = fleet.device(&name);

        let config = agent_config(&fleet, &format!("{name}-doctor"), &device, port, "");
        let mut doctor = under_qemu(qemu, sysroot, &bin);
        doctor.arg("doctor").arg("--config").arg(&config);
        let out = run_bounded(doctor, 120);
        println!("{target} agent doctor:\n{}", text(&out));
        assert!(out.status.success(), "{target}: {}", text(&out));
        assert!(
            text(&out).contains(&format!("CONNACK accepted device {name}")),
            "{target}: {}",
            text(&out)
        );

        let agent = agent_with(
            under_qemu(qemu, sysroot, &bin),
            &fleet,
            &name,
            &device,
            port,
            "[telemetry]\ninterval_secs = 1\n",
        );
        let topic = format!("devices/{name}/telemetry");
        let arrived = wait_until(120, || {
            sub.messages().iter().any(|(t, p)| {
                *t == topic && message::decode::<Telemetry>(p).is_ok_and(|t| t.seq >= 1)
            })
        });
        assert!(arrived, "{target}: no telemetry\n{}", agent.log());
    }
}
