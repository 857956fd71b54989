//! Scale-out: connects and QoS 1 messages per server CPU-second with one,
//! two and three gateways over a three-node NATS cluster behind haproxy
//! (the gateways' and NATS nodes' CPU together), and the same load on the
//! embedded default (one gateway, rumqttd in process) and on one gateway
//! relaying to mosquitto. Prints a table.
//!
//!     cargo build --release -p twofold-provisioning --bin provisioning
//!     cargo bench -p twofold-gateway --bench cluster -- [--devices N] [--burst K]
//!
//! The devices are the Linux agent's own link (rumqttc over rustls, its
//! disk queue), all in this process on the same two cores as the servers:
//! compare the per-CPU figures and their ratios, not the rates.

use std::time::{Duration, Instant};

use twofold_tests::{Cluster, Devices, Fleet, Gateway, Sub, cpu_seconds, mosquitto, wait_until};

struct Figures {
    setup: String,
    connects: usize,
    /// Sessions bound while they connected: more than `connects` when
    /// some device connected again (a slow CONNACK, a takeover).
    bound: usize,
    connect_cpu: f64,
    /// Of which the gateways' (the rest is the broker's).
    connect_gateway_cpu: f64,
    messages: usize,
    message_cpu: f64,
    message_gateway_cpu: f64,
    message_secs: f64,
    haproxy_cpu: f64,
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Distinct sessions bound so far by `gateways`.
fn bound(gateways: &[&Gateway]) -> usize {
    gateways
        .iter()
        .map(|gw| {
            gw.events()
                .iter()
                .filter(|e| e["event"] == "connected")
                .count()
        })
        .sum()
}

/// One setup's servers, as the load sees them.
struct Servers<'a> {
    /// Where devices connect.
    port: u16,
    gateways: &'a [&'a Gateway],
    /// The processes whose CPU counts.
    pids: &'a [u32],
    haproxy: Option<u32>,
    /// Counts the messages.
    sub: &'a Sub,
}

/// Runs the load against the servers: connects, then a burst of QoS 1
/// telemetry, each timed in the CPU of `pids`.
fn load(fleet: &Fleet, setup: String, servers: Servers, devices: usize, burst: usize) -> Figures {
    let Servers {
        port,
        gateways,
        pids,
        haproxy,
        sub,
    } = servers;
    let cpu = || pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    let gateway_cpu = || {
        gateways
            .iter()
            .map(|g| cpu_seconds(g.child.id()))
            .sum::<f64>()
    };
    let before = cpu();
    let gateway_before = gateway_cpu();
    let fleet_of = Devices::start(fleet, "bench", devices, port, None);
    assert!(
        wait_until(300, || bound(gateways) >= devices),
        "{setup}: only {} of {devices} connected",
        bound(gateways)
    );
    let connect_cpu = cpu() - before;
    let connect_gateway_cpu = gateway_cpu() - gateway_before;
    let bound_sessions = bound(gateways);
    // Settle, then the burst.
    std::thread::sleep(Duration::from_secs(1));
    let before = cpu();
    let gateway_before = gateway_cpu();
    let haproxy_before = haproxy.map_or(0.0, cpu_seconds);
    let started = Instant::now();
    fleet_of.burst(burst);
    let messages = devices * burst;
    assert!(
        wait_until(600, || sub.messages().len() >= messages),
        "{setup}: {} of {messages} messages arrived",
        sub.messages().len()
    );
    let message_secs = started.elapsed().as_secs_f64();
    let message_cpu = cpu() - before;
    let message_gateway_cpu = gateway_cpu() - gateway_before;
    let haproxy_cpu = haproxy.map_or(0.0, cpu_seconds) - haproxy_before;
    fleet_of.stop();
    Figures {
        setup,
        connects: devices,
        bound: bound_sessions,
        connect_cpu,
        connect_gateway_cpu,
        messages,
        message_cpu,
        message_gateway_cpu,
        message_secs,
        haproxy_cpu,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let devices = arg("--devices", 300);
    let burst = arg("--burst", 20);
    let mut rows = Vec::new();

    // The embedded default: one gateway, rumqttd in its process; the
    // backend's subscriber through the gateway, as a service.
    {
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
        let pids = [gw.child.id()];
        rows.push(load(
            &fleet,
            "embedded, 1 gateway".into(),
            Servers {
                port,
                gateways: &[&gw],
                pids: &pids,
                haproxy: None,
                sub: &sub,
            },
            devices,
            burst,
        ));
    }
    // The same gateway relaying to mosquitto (one process, sessions in
    // memory): the external-broker path without a cluster.
    {
        let fleet = Fleet::new();
        let (mosquitto, broker) = mosquitto(&fleet, "allow_anonymous true\n");
        let gw = Gateway::start(&fleet, &format!("broker = \"mqtt://127.0.0.1:{broker}\"\n"));
        let sub = Sub::start(
            &fleet,
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &broker.to_string(),
                "-i",
                "counter",
                "-q",
                "1",
                "-t",
                "devices/+/telemetry",
            ],
            "counter",
        );
        let pids = [gw.child.id(), mosquitto.child.id()];
        rows.push(load(
            &fleet,
            "mosquitto, 1 gateway".into(),
            Servers {
                port: gw.addr.port(),
                gateways: &[&gw],
                pids: &pids,
                haproxy: None,
                sub: &sub,
            },
            devices,
            burst,
        ));
    }
    for (gateways, spread) in [(1, true), (2, true), (3, true), (2, false), (3, false)] {
        let fleet = Fleet::new();
        let cluster = Cluster::start_with(&fleet, 3, gateways, "", spread);
        let mut args = cluster.nats.client_args(2);
        args.extend(["-i", "counter", "-q", "1", "-t", "devices/+/telemetry"].map(str::to_owned));
        let sub = Sub::start(
            &fleet,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            "counter",
        );
        let running: Vec<&Gateway> = cluster.running().collect();
        let pids: Vec<u32> = running
            .iter()
            .map(|gw| gw.child.id())
            .chain(
                cluster
                    .nats
                    .nodes
                    .iter()
                    .filter_map(|n| n.proc.as_ref().map(|p| p.child.id())),
            )
            .collect();
        rows.push(load(
            &fleet,
            format!(
                "NATS x3, {gateways} gateway{}{}",
                if gateways > 1 { "s" } else { "" },
                if spread { "" } else { ", all on node 1" }
            ),
            Servers {
                port: cluster.port,
                gateways: &running,
                pids: &pids,
                haproxy: Some(cluster.haproxy.child.id()),
                sub: &sub,
            },
            devices,
            burst,
        ));
    }

    println!(
        "\n{devices} devices connect through haproxy (TLS 1.3, mutual), then each publishes {burst} \
         QoS 1 messages at once; CPU = the gateways' and NATS nodes' user + system time\n"
    );
    println!(
        "| setup | connects | sessions bound | server CPU-s | of which gateways | connects per CPU-s | vs 1 gateway | QoS 1 messages | server CPU-s | of which gateways | messages per CPU-s | vs 1 gateway | messages/s | haproxy CPU-s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let one = rows
        .iter()
        .find(|r| r.setup.ends_with("1 gateway") && r.setup.starts_with("NATS"));
    let (c1, m1) = one.map_or((0.0, 0.0), |r| {
        (
            r.connects as f64 / r.connect_cpu,
            r.messages as f64 / r.message_cpu,
        )
    });
    for r in &rows {
        let c = r.connects as f64 / r.connect_cpu;
        let m = r.messages as f64 / r.message_cpu;
        println!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.0} | {:.2}× | {} | {:.2} | {:.2} | {:.0} | {:.2}× | {:.0} | {:.2} |",
            r.setup,
            r.connects,
            r.bound,
            r.connect_cpu,
            r.connect_gateway_cpu,
            c,
            c / c1,
            r.messages,
            r.message_cpu,
            r.message_gateway_cpu,
            m,
            m / m1,
            r.messages as f64 / r.message_secs,
            r.haproxy_cpu
        );
    }
}
