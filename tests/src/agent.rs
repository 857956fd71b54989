//! The Linux agent binary with a generated config.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use twofold_protocol::message::{self, Telemetry};

use crate::fleet::{Fleet, Identity};
use crate::process::{Proc, built, run_bounded, spawn, wait_until};

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
    cmd: Command,
    fleet: &Fleet,
    name: &str,
    who: &Identity,
    port: u16,
    extra: &str,
) -> Proc {
    let config = agent_config(fleet, name, who, port, extra);
    run_agent(cmd, fleet, name, &config)
}

/// Starts `cmd run --config CONFIG` (`cmd` being the agent binary or a
/// way to run it) and waits until its local socket is up; `name` is the
/// one [`agent_config`] wrote the config under.
pub fn run_agent(mut cmd: Command, fleet: &Fleet, name: &str, config: &std::path::Path) -> Proc {
    cmd.arg("run")
        .arg("--config")
        .arg(config)
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

/// Runs `agent doctor --config CONFIG`; returns whether every check
/// passed, and the report.
pub fn agent_doctor(config: &std::path::Path) -> (bool, String) {
    let mut cmd = Command::new(built("agent"));
    cmd.arg("doctor").arg("--config").arg(config);
    let out = run_bounded(cmd, 60);
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("agent doctor ({}):\n{report}", config.display());
    (out.status.success(), report)
}

/// Asserts that `report` (from [`agent_doctor`]) has a `check` line with
/// `verdict` (`"[ OK ]"`, `"[WARN]"` or `"[FAIL]"`) that holds every one
/// of `words`.
pub fn assert_doctor_line(report: &str, check: &str, verdict: &str, words: &[&str]) {
    let line = report
        .lines()
        .find(|l| {
            l.get(7..)
                .is_some_and(|rest| rest.starts_with(&format!("{check} ")))
        })
        .unwrap_or_else(|| panic!("no {check} line in:\n{report}"));
    assert!(
        line.starts_with(verdict),
        "{check}: expected {verdict}:\n{report}"
    );
    for w in words {
        assert!(
            line.contains(w),
            "{check}: expected {w:?} in {line:?}\n{report}"
        );
    }
}

/// Where every telemetry sample of one agent went.
#[derive(Debug)]
pub struct TelemetryAccount {
    /// Sequence numbers the agent handed out (0 to `generated - 1`).
    pub generated: u64,
    /// Distinct sequence numbers that arrived.
    pub arrived: usize,
    /// Samples still in the agent's queue on disk.
    pub queued: usize,
    /// Arrivals beyond the first of a sequence number.
    pub duplicates: usize,
    /// Sequence numbers neither arrived nor queued.
    pub lost: Vec<u64>,
}

/// The fleet's telemetry, added up over agents `names` (each its own
/// device id) against what a subscriber received.
#[derive(Debug, Default)]
pub struct FleetAccount {
    pub generated: u64,
    pub arrived: usize,
    pub queued: usize,
    pub duplicates: usize,
    /// `NAME#SEQ` of every sample neither arrived nor queued.
    pub lost: Vec<String>,
}

impl FleetAccount {
    /// Reads each agent's queue: call it once they are stopped.
    pub fn of(fleet: &Fleet, names: &[String], messages: &[(String, Vec<u8>)]) -> FleetAccount {
        let mut total = FleetAccount::default();
        for name in names {
            let t = account_telemetry(fleet, name, name, messages);
            total.generated += t.generated;
            total.arrived += t.arrived;
            total.queued += t.queued;
            total.duplicates += t.duplicates;
            total
                .lost
                .extend(t.lost.iter().map(|s| format!("{name}#{s}")));
        }
        total
    }
}

impl std::fmt::Display for FleetAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} samples generated, {} arrived, {} still queued, {} duplicates, {} lost",
            self.generated,
            self.arrived,
            self.queued,
            self.duplicates,
            self.lost.len()
        )
    }
}

/// Accounts for every telemetry sample agent `name` (device `device`) ever
/// generated, against `messages` (topic, payload) a subscriber received:
/// each must have arrived or still be in the agent's queue. Read the queue
/// only once the agent is stopped.
pub fn account_telemetry(
    fleet: &Fleet,
    name: &str,
    device: &str,
    messages: &[(String, Vec<u8>)],
) -> TelemetryAccount {
    let queue =
        twofold_agent::queue::Queue::open(&fleet.path(&format!("queue-{name}.sqlite")), 100_000)
            .unwrap();
    let generated = queue.counter("telemetry").unwrap();
    let seq = |p: &[u8]| message::decode::<Telemetry>(p).ok().map(|t| t.seq);
    let topic = format!("devices/{device}/telemetry");
    let mut arrived = BTreeMap::new();
    for (t, p) in messages {
        if *t == topic {
            *arrived
                .entry(seq(p).expect("telemetry decodes"))
                .or_insert(0usize) += 1;
        }
    }
    let queued: Vec<u64> = queue
        .after(0, 100_000)
        .unwrap()
        .iter()
        .filter_map(|m| seq(&m.payload))
        .collect();
    TelemetryAccount {
        generated,
        arrived: arrived.len(),
        queued: queued.len(),
        duplicates: arrived.values().map(|n| n - 1).sum(),
        lost: (0..generated)
            .filter(|s| !arrived.contains_key(s) && !queued.contains(s))
            .collect(),
    }
}
