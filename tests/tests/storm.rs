//! A reconnect storm: 2,000 devices connected through the gateway are
//! dropped at once by a gateway restart (kill -9), and all come back.
//!
//! The devices run the Linux agent's own link (`twofold_agent::link::Link`:
//! rumqttc over rustls, the agent's default backoff of 1 s doubling to
//! 300 s with up to 100 % jitter), 2,000 of them in this process so that
//! the fleet fits on one machine. The test prints how the backoff spread
//! the reconnects: when each came back, counted from the restart.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::{Notify, mpsc, watch};
use twofold_agent::config::IdentityPaths;
use twofold_agent::identity;
use twofold_agent::link::Link;
use twofold_agent::queue::Queue;
use twofold_agent::renew::Renewal;
use twofold_protocol::TrustDomain;
use twofold_tests::*;

const DEVICES: usize = 2000;

/// Client ids of the sessions the gateway bound after the first `skip`
/// audit events, with the time of each first connect.
fn connected(gw: &Gateway, skip: usize) -> (usize, Vec<(String, OffsetDateTime)>) {
    let events = gw.events();
    let mut seen = BTreeSet::new();
    let mut firsts = Vec::new();
    for e in events.iter().skip(skip) {
        if e["event"] != "connected" {
            continue;
        }
        let id = e["client_id"].as_str().unwrap_or_default().to_owned();
        if seen.insert(id.clone()) {
            let ts = OffsetDateTime::parse(e["ts"].as_str().unwrap(), &Rfc3339).unwrap();
            firsts.push((id, ts));
        }
    }
    (events.len(), firsts)
}

/// Waits (at most `secs`) until `DEVICES` distinct sessions were bound
/// after audit event `skip`.
fn wait_all_connected(gw: &Gateway, skip: usize, secs: u64) -> Vec<(String, OffsetDateTime)> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (_, firsts) = connected(gw, skip);
        if firsts.len() >= DEVICES || Instant::now() > deadline {
            return firsts;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn two_thousand_agents_dropped_by_a_restart_all_come_back_spread_out() {
    // Each device is a socket and a queue here, and two sockets in the
    // gateway (which inherits the limit) besides its broker's.
    let fds = rlimit::increase_nofile_limit(5 * DEVICES as u64 + 1024).unwrap();
    assert!(
        fds >= 5 * DEVICES as u64,
        "open files are limited to {fds}; the storm needs about {}",
        5 * DEVICES
    );
    let fleet = Fleet::new();
    let mut bulk = Command::new(built("provisioning"));
    bulk.arg("--pki")
        .arg(fleet.path("pki"))
        .args([
            "bulk-enroll",
            "--prefix",
            "storm",
            "--count",
            &DEVICES.to_string(),
        ])
        .arg("--out")
        .arg(fleet.path("storm"));
    let done = run_bounded(bulk, 120);
    assert!(done.status.success(), "{}", text(&done));
    let port = free_port();
    let mut gw = Gateway::start_on(&fleet, port, "");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (stop, shutdown) = watch::channel(false);
    let mut command_inboxes = Vec::new();
    let mut links = Vec::new();
    for n in 1..=DEVICES {
        let dir = fleet.path(&format!("storm/storm-{n:04}"));
        let paths = IdentityPaths {
            cert: dir.join("device.pem"),
            key: dir.join("device.key"),
            server_ca: dir.join("server-ca.pem"),
            server_crl: Some(dir.join("server-crl.pem")),
            server_crl_required: true,
        };
        let identity = identity::load(&paths).unwrap();
        let renewal = Renewal::new(&paths, identity.id, TrustDomain::parse(TD).unwrap());
        let (commands, inbox) = mpsc::channel(1);
        command_inboxes.push(inbox);
        let link = Link {
            // No new server CRL comes during the storm.
            tls: watch::channel(identity.tls.clone()).1,
            identity,
            host: "localhost".into(),
            port,
            keep_alive: Duration::from_secs(60),
            queue: Queue::open(&dir.join("queue.sqlite"), 100).unwrap(),
            wake: Arc::new(Notify::new()),
            // The agent's defaults ([reconnect] in agent.example.toml).
            reconnect_min: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(300),
            commands,
            renewal: Arc::new(renewal),
        };
        links.push(runtime.spawn(link.run(shutdown.clone())));
    }
    let first = wait_all_connected(&gw, 0, 300);
    assert_eq!(first.len(), DEVICES, "not every device connected at first");

    // The storm: every session dropped at once, the gateway back at once.
    gw.kill();
    let (skip, _) = connected(&gw, 0);
    let gw = Gateway::start_on(&fleet, port, "");
    let restarted = OffsetDateTime::now_utc();
    let back = wait_all_connected(&gw, skip, 600);
    let missing = DEVICES - back.len();

    let mut after: Vec<f64> = back
        .iter()
        .map(|(_, t)| (*t - restarted).as_seconds_f64().max(0.0))
        .collect();
    after.sort_by(f64::total_cmp);
    assert!(!after.is_empty(), "no device came back:\n{}", gw.log());
    let at = |q: f64| after[((after.len() - 1) as f64 * q) as usize];
    let mut per_second = vec![0usize; after.last().map_or(0, |l| *l as usize + 1)];
    for t in &after {
        per_second[*t as usize] += 1;
    }
    let refusals: Vec<String> = gw
        .events()
        .iter()
        .skip(skip)
        .filter(|e| e["event"] == "refused")
        .map(|e| e["reason"].as_str().unwrap_or_default().to_owned())
        .collect();
    println!(
        "reconnect storm: {} of {DEVICES} back; after the restart: first {:.2} s, median {:.2} s, \
         90th percentile {:.2} s, last {:.2} s; sessions bound per second: {per_second:?}; \
         refusals during the storm: {}",
        back.len(),
        at(0.0),
        at(0.5),
        at(0.9),
        at(1.0),
        refusals.len()
    );
    stop.send(true).unwrap();
    runtime.block_on(async {
        let all = async {
            for l in links {
                let _ = l.await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), all).await;
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    drop(command_inboxes);
    assert_eq!(
        missing,
        0,
        "{missing} devices did not come back:\n{}",
        gw.log()
    );
}
