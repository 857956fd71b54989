//! Faults: the gateway killed (-9) under load from 100 Linux agents.
//!
//! The gateway relays to a mosquitto that outlives it and the backend's
//! subscriber stays connected there: what is killed is the gateway alone.
//! (With the embedded broker, a kill -9 takes the broker's in-memory
//! messages with it; the README says so.)

use std::time::Duration;

use twofold_tests::*;

const AGENTS: usize = 100;

#[test]
fn a_gateway_killed_under_100_agents_loses_no_qos1_telemetry() {
    let mut fleet = Fleet::new();
    let relay = Relay::start(&fleet, "devices/+/telemetry", "faults");
    let sub = &relay.sub;
    let port = free_port();
    let mut gw = Gateway::start_on(&fleet, port, &relay.config);
    let names: Vec<String> = (1..=AGENTS).map(|i| format!("unit-{i:03}")).collect();
    let mut agents: Vec<Proc> = names
        .iter()
        .map(|name| {
            let id = fleet.device(name);
            agent(&fleet, name, &id, port, "[telemetry]\ninterval_secs = 1\n")
        })
        .collect();
    let all_publishing = wait_until(120, || sub.latest_telemetry().len() == AGENTS);
    assert!(
        all_publishing,
        "only {} of {AGENTS} agents delivered telemetry",
        sub.latest_telemetry().len()
    );

    // kill -9 with QoS 1 messages in flight; the agents queue on disk
    // while it is down.
    gw.kill();
    std::thread::sleep(Duration::from_secs(3));
    let at_restart = sub.latest_telemetry();
    let _gw = Gateway::start_on(&fleet, port, &relay.config);
    // Every agent delivers samples taken after the restart.
    let caught_up = wait_until(120, || {
        let now = sub.latest_telemetry();
        at_restart
            .iter()
            .all(|(d, seq)| now.get(d).is_some_and(|n| *n >= seq + 5))
    });
    for a in &mut agents {
        a.kill();
    }
    assert!(caught_up, "not every agent delivered after the restart");
    sub.settle(30);

    let total = FleetAccount::of(&fleet, &names, &sub.messages());
    println!("kill -9 under {AGENTS} agents: {total}");
    assert!(total.lost.is_empty(), "lost: {:?}", total.lost);
    // At least seq 0 to 5 from each, without loss.
    assert!(
        total.arrived >= 6 * AGENTS,
        "only {} arrived",
        total.arrived
    );
}
