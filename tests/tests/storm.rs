//! A reconnect storm: 2,000 devices connected through the gateway are
//! dropped at once by a gateway restart (kill -9), and all come back.
//!
//! The devices run the Linux agent's own link (`twofold_agent::link::Link`:
//! rumqttc over rustls, the agent's default backoff of 1 s doubling to
//! 300 s with up to 100 % jitter), 2,000 of them in this process so that
//! the fleet fits on one machine ([`Devices`]). The test prints how the backoff spread
//! the reconnects: when each came back, counted from the restart.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
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
    let fleet = Fleet::new();
    let port = free_port();
    let mut gw = Gateway::start_on(&fleet, port, "");
    // No telemetry: the storm is about sessions.
    let devices = Devices::start(&fleet, "storm", DEVICES, port, None);
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
    devices.stop();
    assert_eq!(
        missing,
        0,
        "{missing} devices did not come back:\n{}",
        gw.log()
    );
}
