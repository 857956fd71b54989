//! Scale-out: connects and QoS 1 messages per server CPU-second with one,
//! two and three gateways over a three-node NATS cluster behind haproxy
//! (the gateways' and NATS nodes' CPU together), and the same load on the
//! embedded default (one gateway, rumqttd in process) and on one gateway
//! relaying to mosquitto. Prints a table.
//!
//!     cargo build --release -p twofold-provisioning --bin provisioning
//!     cargo bench -p twofold-gateway --bench cluster -- [--devices N] [--burst K] \
//!         [--setups embedded,mosquitto,nats-1,nats-2,nats-3,nats-2-node1,nats-3-node1] \
//!         [--rest S]
//!
//! `--setups` picks the setups and their order; a setup named twice runs
//! twice (e.g. `nats-1,nats-3,nats-1,nats-2,nats-1`); `--rest S` sleeps
//! S seconds between setups. Each row is compared with the `nats-1` runs
//! nearest to it, before and after, and a last table gives each setup's
//! median ratio.
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
    connect_secs: f64,
    /// The servers' CPU per second of wall time while every device is
    /// connected and none sends: what the brokers' own timers cost
    /// (JetStream's Raft heartbeats, one group per stream and consumer),
    /// which any phase pays for as long as it lasts.
    idle_cpu_per_sec: f64,
    messages: usize,
    message_cpu: f64,
    message_gateway_cpu: f64,
    message_secs: f64,
    haproxy_cpu: f64,
}

/// How long the idle servers are measured.
const IDLE_WINDOW: Duration = Duration::from_secs(5);

/// Every setup, in the order run without `--setups`.
const SETUPS: [&str; 7] = [
    "embedded",
    "mosquitto",
    "nats-1",
    "nats-2",
    "nats-3",
    "nats-2-node1",
    "nats-3-node1",
];

impl Figures {
    fn connects_per_cpu(&self) -> f64 {
        self.connects as f64 / self.connect_cpu
    }

    fn messages_per_cpu(&self) -> f64 {
        self.messages as f64 / self.message_cpu
    }
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
    let started = Instant::now();
    let fleet_of = Devices::start(fleet, "bench", devices, port, None);
    assert!(
        wait_until(300, || bound(gateways) >= devices),
        "{setup}: only {} of {devices} connected",
        bound(gateways)
    );
    let connect_secs = started.elapsed().as_secs_f64();
    let connect_cpu = cpu() - before;
    let connect_gateway_cpu = gateway_cpu() - gateway_before;
    let bound_sessions = bound(gateways);
    // Settle, then measure the idle servers, then the burst.
    std::thread::sleep(Duration::from_secs(1));
    let idle_before = cpu();
    std::thread::sleep(IDLE_WINDOW);
    let idle_cpu_per_sec = (cpu() - idle_before) / IDLE_WINDOW.as_secs_f64();
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
        connect_secs,
        idle_cpu_per_sec,
        messages,
        message_cpu,
        message_gateway_cpu,
        message_secs,
        haproxy_cpu,
    }
}

/// The embedded default: one gateway, rumqttd in its process; the
/// backend's subscriber through the gateway, as a service.
fn embedded(devices: usize, burst: usize) -> Figures {
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
    load_one_gateway(&fleet, "embedded", &gw, &pids, &sub, devices, burst)
}

/// [`load`] on a single gateway, no load balancer; `pids` are the server
/// processes whose CPU counts.
fn load_one_gateway(
    fleet: &Fleet,
    broker: &str,
    gw: &Gateway,
    pids: &[u32],
    sub: &Sub,
    devices: usize,
    burst: usize,
) -> Figures {
    let servers = Servers {
        port: gw.addr.port(),
        gateways: &[gw],
        pids,
        haproxy: None,
        sub,
    };
    load(
        fleet,
        format!("{broker}, 1 gateway"),
        servers,
        devices,
        burst,
    )
}

/// The same gateway relaying to mosquitto (one process, sessions in
/// memory): the external-broker path without a cluster.
fn relaying_to_mosquitto(devices: usize, burst: usize) -> Figures {
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
    load_one_gateway(&fleet, "mosquitto", &gw, &pids, &sub, devices, burst)
}

fn nats_setup_name(gateways: usize, spread: bool) -> String {
    format!(
        "NATS x3, {gateways} gateway{}{}",
        if gateways > 1 { "s" } else { "" },
        if spread { "" } else { ", all on node 1" }
    )
}

/// Three NATS nodes and `gateways` gateways behind haproxy, each naming
/// its own node first when `spread`, else node 1.
fn nats(gateways: usize, spread: bool, devices: usize, burst: usize) -> Figures {
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
    load(
        &fleet,
        nats_setup_name(gateways, spread),
        Servers {
            port: cluster.port,
            gateways: &running,
            pids: &pids,
            haproxy: Some(cluster.haproxy.child.id()),
            sub: &sub,
        },
        devices,
        burst,
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let devices = arg("--devices", 300);
    let burst = arg("--burst", 20);
    let args: Vec<String> = std::env::args().collect();
    let setups: Vec<String> = match args.iter().position(|a| a == "--setups") {
        Some(i) => args
            .get(i + 1)
            .map(|v| v.split(',').map(str::to_owned).collect())
            .unwrap_or_default(),
        None => SETUPS.map(str::to_owned).to_vec(),
    };
    if let Some(unknown) = setups.iter().find(|s| !SETUPS.contains(&s.as_str())) {
        eprintln!(
            "unknown setup {unknown:?}: the setups are {}",
            SETUPS.join(",")
        );
        std::process::exit(2);
    }
    // Seconds to let the machine rest before each setup after the first.
    let rest = Duration::from_secs(arg("--rest", 0) as u64);
    let mut rows = Vec::new();
    for (i, setup) in setups.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(rest);
        }
        rows.push(match setup.as_str() {
            "embedded" => embedded(devices, burst),
            "mosquitto" => relaying_to_mosquitto(devices, burst),
            "nats-1" => nats(1, true, devices, burst),
            "nats-2" => nats(2, true, devices, burst),
            "nats-3" => nats(3, true, devices, burst),
            "nats-2-node1" => nats(2, false, devices, burst),
            _ => nats(3, false, devices, burst),
        });
    }

    println!(
        "\n{devices} devices connect through haproxy (TLS 1.3, mutual), then each publishes {burst} \
         QoS 1 messages at once; CPU = the gateways' and NATS nodes' user + system time; \
         idle = the servers' CPU per second with every device connected and none sending\n"
    );
    println!(
        "| setup | connects | sessions bound | seconds | server CPU-s | of which gateways | connects per CPU-s | vs 1 gateway | idle CPU-s/s | QoS 1 messages | server CPU-s | of which gateways | messages per CPU-s | vs 1 gateway | messages/s | haproxy CPU-s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    // The baseline of each row: the runs with one gateway on NATS
    // nearest to it, the one before and the one after (averaged), not all
    // of them: the same setup's figures drift between runs minutes apart
    // on this shared machine, and a neighbour shares most of the drift.
    let one = nats_setup_name(1, true);
    let baseline = |i: usize, f: fn(&Figures) -> f64| {
        let before = rows[..i].iter().rposition(|r| r.setup == one);
        let after = rows[i + 1..]
            .iter()
            .position(|r| r.setup == one)
            .map(|k| i + 1 + k);
        let near: Vec<f64> = [before, after]
            .into_iter()
            .flatten()
            .map(|j| f(&rows[j]))
            .collect();
        near.iter().sum::<f64>() / near.len() as f64
    };
    let mut ratios: Vec<(String, f64, f64)> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let (c, m) = (r.connects_per_cpu(), r.messages_per_cpu());
        let c1 = baseline(i, Figures::connects_per_cpu);
        let m1 = baseline(i, Figures::messages_per_cpu);
        ratios.push((r.setup.clone(), c / c1, m / m1));
        println!(
            "| {} | {} | {} | {:.1} | {:.2} | {:.2} | {:.0} | {:.2}× | {:.2} | {} | {:.2} | {:.2} | {:.0} | {:.2}× | {:.0} | {:.2} |",
            r.setup,
            r.connects,
            r.bound,
            r.connect_secs,
            r.connect_cpu,
            r.connect_gateway_cpu,
            c,
            c / c1,
            r.idle_cpu_per_sec,
            r.messages,
            r.message_cpu,
            r.message_gateway_cpu,
            m,
            m / m1,
            r.messages as f64 / r.message_secs,
            r.haproxy_cpu
        );
    }
    // Each setup's median ratio over its runs.
    println!(
        "\n| setup | runs | connects per CPU-s vs 1 gateway, median (each run) | messages per CPU-s vs 1 gateway, median (each run) |"
    );
    println!("|---|---|---|---|");
    let mut seen: Vec<&str> = Vec::new();
    for (setup, _, _) in &ratios {
        if seen.contains(&setup.as_str()) {
            continue;
        }
        seen.push(setup);
        let of = |k: fn(&(String, f64, f64)) -> f64| {
            let mut v: Vec<f64> = ratios
                .iter()
                .filter(|r| &r.0 == setup)
                .map(k)
                .filter(|x| x.is_finite())
                .collect();
            let each = v
                .iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(", ");
            v.sort_by(f64::total_cmp);
            let median = match v.len() {
                0 => f64::NAN,
                n if n % 2 == 1 => v[n / 2],
                n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
            };
            format!("{median:.2}× ({each})")
        };
        println!(
            "| {setup} | {} | {} | {} |",
            ratios.iter().filter(|r| &r.0 == setup).count(),
            of(|r| r.1),
            of(|r| r.2)
        );
    }
}
