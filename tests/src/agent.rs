//! The Linux agent binary with a generated config.

use std::path::PathBuf;
use std::process::Command;

use crate::fleet::{Fleet, Identity};
use crate::process::{Proc, built, spawn, wait_until};

/// Writes `agent-<name>.toml` for the bundle in `who.dir`, talking to
/// `localhost:port`, with `extra` TOML appended; returns its path.
pub fn agent_config(fleet: &Fleet, name: &str, who: &Identity, port: u16, extra: &str) -> PathBuf {
    let config = fleet.path(&format!("agent-{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[gateway]\nhost = \"localhost\"\nport = {port}\nkeep_alive_secs = 5\n\
             [identity]\nbundle = {:?}\n\
             [queue]\npath = {:?}\n\
             [reconnect]\nmin_secs = 0.2\nmax_secs = 2.0\n\
             [api]\nsocket = {:?}\n{extra}\n",
            who.dir,
            fleet.path(&format!("queue-{name}.sqlite")),
            fleet.path(&format!("agent-{name}.sock")),
        ),
    )
    .unwrap();
    config
}

/// Starts `agent run` with [`agent_config`], and waits until its local
/// socket is up.
pub fn agent(fleet: &Fleet, name: &str, who: &Identity, port: u16, extra: &str) -> Proc {
    agent_with(Command::new(built("agent")), fleet, name, who, port, extra)
}

/// [`agent`] with another way to run the binary, e.g. `qemu-aarch64 -L
/// SYSROOT target/aarch64-unknown-linux-gnu/release/agent`.
pub fn agent_with(
    mut cmd: Command,
    fleet: &Fleet,
    name: &str,
    who: &Identity,
    port: u16,
    extra: &str,
) -> Proc {
    let config = agent_config(fleet, name, who, port, extra);
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info");
    let mut p = spawn(cmd, fleet.path(&format!("agent-{name}.log")));
    let socket = fleet.path(&format!("agent-{name}.sock"));
    let up = wait_until(60, || {
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("agent exited ({status}):\n{}", p.log());
        }
        socket.exists()
    });
    assert!(up, "agent did not start:\n{}", p.log());
    p
}
