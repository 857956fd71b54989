//! Twofold's gateway and mosquitto side by side: same certificates, same
//! load, same machine, one run. Prints a table with ratios.
//!
//!     scripts/bench            # full: this and `provisioning bulk-enroll`
//!     scripts/bench --quick    # smoke
//!     cargo bench -p twofold-gateway --bench vs_mosquitto -- [--quick]
//!         [--provisioning target/release/provisioning]
//!
//! Both servers require client certificates (mosquitto with
//! `require_certificate true`, TCP_NODELAY on). The load generator runs in
//! this process on the same cores, so compare the ratios, not the absolute
//! numbers.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::{self, QoS};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use twofold_protocol::{DeviceId, Principal, ServiceName, TrustDomain};
use twofold_provisioning::{EnrollOptions, EnrollRequest, KeySource, Pki, output};

mod common;
use common::{Stream, connect, read_packet, write_packet};

struct Sizes {
    connects: usize,
    idle: usize,
    publishers: usize,
    messages: usize,
    storm: usize,
    enroll: usize,
}

fn main() {
    // 5,000 sessions: a socket each here, and two or three in the gateway,
    // which inherits the limit.
    let fds = rlimit::increase_nofile_limit(20_000).expect("raise the open-files limit");
    if fds < 16_000 {
        eprintln!("warning: open files are limited to {fds}; the full run needs about 16,000");
    }
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let provisioning = args
        .iter()
        .position(|a| a == "--provisioning")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let sizes = if quick {
        Sizes {
            connects: 300,
            idle: 500,
            publishers: 20,
            messages: 100,
            storm: 300,
            enroll: 1000,
        }
    } else {
        Sizes {
            connects: 2000,
            idle: 5000,
            publishers: 100,
            messages: 2000,
            storm: 2000,
            enroll: 10_000,
        }
    };
    let dir = tempfile::tempdir().expect("temp dir");
    // First, while the disk is quiet: the servers' runs leave it busy.
    let enroll = provisioning.map(|bin| bulk_enroll(&bin, dir.path(), sizes.enroll));
    println!(
        "preparing a PKI with {} device identities...",
        sizes.idle.max(sizes.connects)
    );
    let fleet = Fleet::new(dir.path(), sizes.idle.max(sizes.connects));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let mut results = Vec::new();
    for kind in [Kind::Twofold, Kind::TwofoldExternal, Kind::Mosquitto] {
        let mut server = Server::start(kind, &fleet.dir, free_port());
        println!(
            "\n== {} (pid {}) on {}",
            kind.name(),
            server.pid(),
            server.addr
        );
        let r = runtime.block_on(measure(&fleet, &mut server, &sizes));
        println!("{r:#?}");
        results.push(r);
    }
    // Latency at the QoS 1 rate mosquitto sustained above (by wall clock).
    let rate = results[2].qos1.per_second.max(100.0);
    let seconds = if quick { 2.0 } else { 5.0 };
    let mut latencies = Vec::new();
    for kind in [Kind::Twofold, Kind::TwofoldExternal, Kind::Mosquitto] {
        let server = Server::start(kind, &fleet.dir, free_port());
        println!("\n== latency: {} at {rate:.0} messages/s", kind.name());
        latencies.push(runtime.block_on(latency(&fleet, &server, rate, seconds)));
    }
    print_table(&results, &latencies, &sizes, enroll);
}

/// Starts the server on `port` and waits until it accepts connections.
fn spawn_server(kind: Kind, d: &Path, port: u16, broker_port: Option<u16>) -> Child {
    let child = match kind {
        Kind::Twofold | Kind::TwofoldExternal => {
            let mut gateway = Command::new(env!("CARGO_BIN_EXE_gateway"));
            if let Some(broker_port) = broker_port {
                gateway
                    .arg("--broker")
                    .arg(format!("mqtt://127.0.0.1:{broker_port}"));
            }
            gateway
                .args([
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                    "--trust-domain",
                    "bench.example",
                ])
                .arg("--cert")
                .arg(d.join("gw/gateway.pem"))
                .arg("--key")
                .arg(d.join("gw/gateway.key"))
                .arg("--client-ca")
                .arg(d.join("gw/client-ca.pem"))
                .arg("--crl")
                .arg(d.join("gw/crl.pem"))
                .arg("--audit-log")
                .arg(d.join("audit.jsonl"))
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("gateway")
        }
        Kind::Mosquitto => mosquitto(
            d,
            port,
            &format!(
                "cafile {}\ncertfile {}\nkeyfile {}\ncrlfile {}\nrequire_certificate true\nuse_identity_as_username true\n",
                d.join("mosquitto-ca.pem").display(),
                d.join("gw/gateway.pem").display(),
                d.join("gw/gateway.key").display(),
                d.join("gw/crl.pem").display(),
            ),
        ),
    };
    wait_listening(port, kind.name());
    child
}

/// mosquitto on loopback `port` with `conf` added to the settings both
/// mosquitto runs share.
fn mosquitto(d: &Path, port: u16, conf: &str) -> Child {
    let path = d.join(format!("mosquitto-{port}.conf"));
    std::fs::write(
        &path,
        format!(
            "listener {port} 127.0.0.1\nset_tcp_nodelay true\npersistence false\nmax_queued_messages 0\nlog_dest none\nuser {}\n{conf}",
            // Started as root, mosquitto would switch to its own
            // user, which cannot read the 0700 bundle directory.
            std::env::var("USER").unwrap_or_else(|_| "root".into())
        ),
    )
    .unwrap();
    Command::new("mosquitto")
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto")
}

/// The broker behind the gateway in the external-broker configuration:
/// plain MQTT on loopback, anonymous (only the gateway can reach it).
fn plain_mosquitto(d: &Path) -> (Child, u16) {
    let port = free_port();
    let child = mosquitto(d, port, "allow_anonymous true\n");
    wait_listening(port, "the external broker");
    (child, port)
}

fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Seconds `provisioning bulk-enroll` takes for `count` devices into a
/// fresh PKI.
fn bulk_enroll(bin: &Path, dir: &Path, count: usize) -> f64 {
    let pki = dir.join("enroll-pki");
    let run = |args: &[&str]| {
        let out = Command::new(bin)
            .arg("--pki")
            .arg(&pki)
            .args(args)
            .output()
            .expect("provisioning");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Its summary line (signing and recording, writing files).
        print!(
            "{}",
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or_default()
        );
        println!();
    };
    let _ = Command::new("sync").status();
    run(&["init", "--trust-domain", "bench.example"]);
    let out = dir.join("enroll-out");
    let start = Instant::now();
    run(&[
        "bulk-enroll",
        "--count",
        &count.to_string(),
        "--prefix",
        "dev",
        "--out",
        out.to_str().unwrap(),
    ]);
    let seconds = start.elapsed().as_secs_f64();
    println!("bulk-enroll: {count} devices in {seconds:.2}s");
    seconds
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The gateway on its embedded rumqttd (the default).
    Twofold,
    /// The gateway relaying to a mosquitto behind it (`--broker`), as at
    /// scale; CPU and memory are the two processes together.
    TwofoldExternal,
    Mosquitto,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Twofold => "twofold gateway (embedded rumqttd)",
            Kind::TwofoldExternal => "twofold gateway relaying to mosquitto (--broker)",
            Kind::Mosquitto => "mosquitto",
        }
    }
}

/// Certificates for everyone, on disk and as rustls client configs.
struct Fleet {
    dir: PathBuf,
    devices: Vec<(String, Arc<rustls::ClientConfig>)>,
    subscriber: (String, Arc<rustls::ClientConfig>),
}

impl Fleet {
    fn new(dir: &Path, devices: usize) -> Fleet {
        let mut pki = Pki::init(
            &dir.join("pki"),
            TrustDomain::parse("bench.example").unwrap(),
            None,
        )
        .expect("init");
        let gw = pki
            .issue_gateway(
                &["localhost".into()],
                &["127.0.0.1".parse().unwrap()],
                30,
                None,
            )
            .unwrap();
        output::write_gateway(
            &dir.join("gw"),
            &gw,
            &pki.device_ca_pem().unwrap(),
            &pki.crl_pem().unwrap(),
        )
        .unwrap();
        let server_ca = pki.server_ca_pem().unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(server_ca.as_bytes()) {
            roots.add(ca.unwrap()).unwrap();
        }
        let roots = Arc::new(roots);
        let mut requests: Vec<EnrollRequest> = (0..devices)
            .map(|i| EnrollRequest {
                principal: Principal::Device(DeviceId::parse(&format!("dev-{i}")).unwrap()),
                key: KeySource::Generate,
            })
            .collect();
        requests.push(EnrollRequest {
            principal: Principal::Service(ServiceName::parse("bench").unwrap()),
            key: KeySource::Generate,
        });
        let issued = pki
            .enroll(
                requests,
                EnrollOptions {
                    days: 30,
                    replace: false,
                    lifetime: None,
                },
                &mut |_| {},
            )
            .unwrap();
        let config = |e: &twofold_provisioning::Enrollment| {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(e.chain_pem.as_bytes())
                    .map(|c| c.unwrap())
                    .collect();
            let key_pem =
                twofold_provisioning::keys::to_pem(e.key.as_ref().unwrap(), None).unwrap();
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
            let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain, key)
            .unwrap();
            // Every connect is a full handshake.
            c.resumption = rustls::client::Resumption::disabled();
            Arc::new(c)
        };
        let mut devices: Vec<(String, Arc<rustls::ClientConfig>)> = issued
            .iter()
            .map(|e| (e.record.name.clone(), config(e)))
            .collect();
        let subscriber = devices.pop().unwrap();
        // mosquitto (OpenSSL) needs the root as anchor for client certificates.
        let root = std::fs::read_to_string(dir.join("pki/root-ca.pem")).unwrap();
        std::fs::write(
            dir.join("mosquitto-ca.pem"),
            format!("{}{root}", pki.device_ca_pem().unwrap()),
        )
        .unwrap();
        Fleet {
            dir: dir.to_owned(),
            devices,
            subscriber: ("bench".into(), subscriber.1),
        }
    }
}

struct Server {
    kind: Kind,
    child: Child,
    /// The external broker behind the gateway, and its port.
    upstream: Option<(Child, u16)>,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Server {
    fn start(kind: Kind, dir: &Path, port: u16) -> Server {
        let upstream = (kind == Kind::TwofoldExternal).then(|| plain_mosquitto(dir));
        let broker_port = upstream.as_ref().map(|(_, port)| *port);
        Server {
            kind,
            child: spawn_server(kind, dir, port, broker_port),
            upstream,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            dir: dir.to_owned(),
        }
    }

    /// kill -9 of the server (the gateway, not the broker behind it), and
    /// start it again on the same port.
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let broker_port = self.upstream.as_ref().map(|(_, port)| *port);
        self.child = spawn_server(self.kind, &self.dir, self.addr.port(), broker_port);
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The processes whose CPU and memory count: the server, and the
    /// broker behind the gateway when it has one.
    fn pids(&self) -> Vec<u32> {
        std::iter::once(self.child.id())
            .chain(self.upstream.as_ref().map(|(c, _)| c.id()))
            .collect()
    }

    /// User + system CPU seconds of the server processes so far.
    fn cpu_seconds(&self) -> f64 {
        let cpu = |pid: u32| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let after = &stat[stat.rfind(')').unwrap() + 2..];
            let fields: Vec<&str> = after.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
            let ticks: f64 =
                fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
            ticks / 100.0
        };
        self.pids().into_iter().map(cpu).sum()
    }

    /// Resident memory of each server process, in [`Server::pids`] order.
    fn rss_kib(&self) -> Vec<u64> {
        let rss = |pid: u32| -> u64 {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        };
        self.pids().into_iter().map(rss).collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for child in std::iter::once(&mut self.child).chain(self.upstream.as_mut().map(|(c, _)| c))
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[derive(Debug)]
struct Results {
    connects_per_cpu_second: f64,
    connects_per_wall_second: f64,
    idle_kib_per_connection: f64,
    qos1: Throughput,
    /// QoS 1 to a shared subscription of four.
    qos1_shared: Throughput,
    qos0: Throughput,
    storm: Storm,
}

/// End-to-end latency of QoS 1 at a fixed rate: publish to delivery.
#[derive(Debug)]
struct Latency {
    rate: f64,
    sent: u64,
    delivered: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

#[derive(Debug)]
struct Storm {
    /// Sessions dropped by the restart, and how many came back.
    dropped: usize,
    back: usize,
    /// Seconds from the kill to the median and the last reconnect.
    median: f64,
    last: f64,
}

#[derive(Debug)]
struct Throughput {
    sent: u64,
    delivered: u64,
    /// Delivered per server CPU-second: the load generator shares the
    /// machine, so the wall-clock rate is partly its own limit.
    per_cpu_second: f64,
    per_second: f64,
}

async fn measure(fleet: &Fleet, server: &mut Server, sizes: &Sizes) -> Results {
    let addr = server.addr;
    // 1. Full handshakes + CONNECT/CONNACK + DISCONNECT, 32 at a time.
    let cpu0 = server.cpu_seconds();
    let wall0 = Instant::now();
    let gate = Arc::new(Semaphore::new(32));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..sizes.connects {
        let (id, config) = fleet.devices[i % fleet.devices.len()].clone();
        let gate = gate.clone();
        let failed = failed.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await;
            match connect(addr, config, &id).await {
                Ok((mut s, _)) => {
                    let _ = write_packet(&mut s, Packet::Disconnect).await;
                    let _ = s.shutdown().await;
                }
                Err(_) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let wall = wall0.elapsed().as_secs_f64();
    let cpu = (server.cpu_seconds() - cpu0).max(0.01);
    let ok = (sizes.connects as u64 - failed.load(Ordering::Relaxed)) as f64;
    println!("connects: {ok} ok in {wall:.2}s wall, {cpu:.2}s server CPU");
    if ok < sizes.connects as f64 {
        println!(
            "WARNING: {} of {} connects failed",
            sizes.connects as f64 - ok,
            sizes.connects
        );
    }

    // 2. Idle sessions held open.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = server.rss_kib();
    let held = hold(fleet, addr, sizes.idle).await;
    if held.len() < sizes.idle {
        println!(
            "WARNING: only {} of {} idle sessions connected",
            held.len(),
            sizes.idle
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss1 = server.rss_kib();
    let grown: u64 = rss1
        .iter()
        .zip(&rss0)
        .map(|(b, a)| b.saturating_sub(*a))
        .sum();
    let idle_kib = grown as f64 / held.len().max(1) as f64;
    // Each process's share, e.g. the gateway's and the broker's behind it.
    let shares: Vec<String> = rss0
        .iter()
        .zip(&rss1)
        .map(|(a, b)| {
            format!(
                "{a} KiB -> {b} KiB ({:.1} KiB each)",
                b.saturating_sub(*a) as f64 / held.len().max(1) as f64
            )
        })
        .collect();
    println!("idle: {} sessions, RSS {}", held.len(), shares.join(" + "));
    drop(held);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let qos1 = throughput(fleet, server, sizes, QoS::AtLeastOnce, 1).await;
    let qos1_shared = throughput(fleet, server, sizes, QoS::AtLeastOnce, 4).await;
    let qos0 = throughput(fleet, server, sizes, QoS::AtMostOnce, 1).await;
    let storm = storm(fleet, server, sizes.storm).await;
    Results {
        connects_per_cpu_second: ok / cpu,
        connects_per_wall_second: ok / wall,
        idle_kib_per_connection: idle_kib,
        qos1,
        qos1_shared,
        qos0,
        storm,
    }
}

/// Opens `n` sessions (64 handshakes at a time) and returns those that
/// connected.
async fn hold(fleet: &Fleet, addr: SocketAddr, n: usize) -> Vec<(Stream, BytesMut)> {
    let gate = Arc::new(Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (id, config) = fleet.devices[i % fleet.devices.len()].clone();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await;
            connect(addr, config, &id).await.ok()
        }));
    }
    let mut held = Vec::new();
    for t in tasks {
        if let Ok(Some(s)) = t.await {
            held.push(s);
        }
    }
    held
}

/// The reconnect storm: `n` sessions, the server killed (-9) and started
/// again on the same port, every client retrying on the Linux agent's
/// backoff (1 s doubling to 300 s, each drawn from [d/2, d]) until it is back.
async fn storm(fleet: &Fleet, server: &mut Server, n: usize) -> Storm {
    let addr = server.addr;
    let held = hold(fleet, addr, n).await;
    let dropped = held.len();
    let killed = Instant::now();
    let mut tasks = Vec::new();
    for (i, (mut stream, _)) in held.into_iter().enumerate() {
        let (id, config) = fleet.devices[i % fleet.devices.len()].clone();
        tasks.push(tokio::spawn(async move {
            // Wait for the drop, as an agent's read would see it.
            let mut sink = [0u8; 256];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            let mut delays =
                twofold_agent::link::backoff(Duration::from_secs(1), Duration::from_secs(300));
            let deadline = killed + Duration::from_secs(300);
            while Instant::now() < deadline {
                tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(300))).await;
                let attempt = connect(addr, config.clone(), &id);
                if let Ok(Ok(session)) =
                    tokio::time::timeout(Duration::from_secs(15), attempt).await
                {
                    return Some((killed.elapsed().as_secs_f64(), session));
                }
            }
            None
        }));
    }
    server.restart();
    let mut back = Vec::new();
    let mut sessions = Vec::new();
    for t in tasks {
        if let Ok(Some((at, session))) = t.await {
            back.push(at);
            sessions.push(session);
        }
    }
    back.sort_by(f64::total_cmp);
    let at = |q: f64| {
        back.get(((back.len().max(1) - 1) as f64 * q) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let storm = Storm {
        dropped,
        back: back.len(),
        median: at(0.5),
        last: at(1.0),
    };
    println!("storm: {storm:?}");
    storm
}

/// Subscribes `subscribers` sessions of the bench service to the devices'
/// telemetry: one on `devices/+/telemetry`, or several sharing it (group
/// `bench`). Returns them once each has its SUBACK.
async fn subscribe(fleet: &Fleet, addr: SocketAddr, subscribers: usize) -> Vec<(Stream, BytesMut)> {
    let mut subs = Vec::new();
    for n in 0..subscribers {
        let (filter, client_id) = if subscribers == 1 {
            ("devices/+/telemetry".to_owned(), fleet.subscriber.0.clone())
        } else {
            (
                "$share/bench/devices/+/telemetry".to_owned(),
                format!("{}-{n}", fleet.subscriber.0),
            )
        };
        let (mut sub, mut buf) = connect(addr, fleet.subscriber.1.clone(), &client_id)
            .await
            .expect("subscriber connects");
        let subscribe = v4::Subscribe {
            pkid: 1,
            filters: vec![v4::SubscribeFilter::new(filter, QoS::AtLeastOnce)],
        };
        write_packet(&mut sub, Packet::Subscribe(subscribe))
            .await
            .unwrap();
        loop {
            if let Packet::SubAck(_) = read_packet(&mut sub, &mut buf).await.unwrap() {
                break;
            }
        }
        subs.push((sub, buf));
    }
    subs
}

/// Reads what a subscriber gets, acknowledging QoS 1, handing each payload
/// to `seen`, until `done` says so or nothing came for 5 s. Returns when
/// the last message came.
async fn receive(
    (mut sub, mut buf): (Stream, BytesMut),
    mut seen: impl FnMut(bytes::Bytes) -> bool + Send,
) -> Instant {
    let mut last = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), read_packet(&mut sub, &mut buf)).await {
            Ok(Ok(Packet::Publish(p))) => {
                if p.qos == QoS::AtLeastOnce {
                    let _ = write_packet(&mut sub, Packet::PubAck(v4::PubAck::new(p.pkid))).await;
                }
                last = Instant::now();
                if seen(p.payload) {
                    return last;
                }
            }
            Ok(Ok(_)) => {}
            // Nothing for 5 s, or the connection ended: what arrived is all that will.
            _ => return last,
        }
    }
}

/// `publishers` devices each publish `messages` to their telemetry topic;
/// `subscribers` sessions (one, or a shared subscription) count what
/// arrives, each message once.
async fn throughput(
    fleet: &Fleet,
    server: &Server,
    sizes: &Sizes,
    qos: QoS,
    subscribers: usize,
) -> Throughput {
    let addr = server.addr;
    let expected = (sizes.publishers * sizes.messages) as u64;
    let seen = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let mut counters = Vec::new();
    for sub in subscribe(fleet, addr, subscribers).await {
        let seen = seen.clone();
        counters.push(tokio::spawn(receive(sub, move |payload| {
            let mut seen = seen.lock().unwrap();
            seen.insert(payload);
            seen.len() as u64 >= expected
        })));
    }
    let start = Instant::now();
    let cpu0 = server.cpu_seconds();
    let mut tasks = Vec::new();
    for p in 0..sizes.publishers {
        let (id, config) = fleet.devices[p].clone();
        let messages = sizes.messages;
        tasks.push(tokio::spawn(async move {
            let Ok((stream, buf)) = connect(addr, config, &id).await else {
                return 0u64;
            };
            publish_all(stream, buf, &id, messages, qos).await
        }));
    }
    let mut sent = 0;
    for t in tasks {
        sent += t.await.unwrap_or(0);
    }
    let mut last = start;
    for counter in counters {
        last = last.max(counter.await.unwrap_or(start));
    }
    let delivered = seen.lock().unwrap().len() as u64;
    let cpu = (server.cpu_seconds() - cpu0).max(0.01);
    let seconds = last.duration_since(start).as_secs_f64().max(0.001);
    println!(
        "{qos:?} to {subscribers} subscriber(s): sent {sent}, delivered {delivered} in {seconds:.2}s"
    );
    Throughput {
        sent,
        delivered,
        per_second: delivered as f64 / seconds,
        per_cpu_second: delivered as f64 / cpu,
    }
}

/// Publishes with at most 16 QoS 1 messages awaiting PUBACK.
async fn publish_all(
    stream: Stream,
    mut buf: BytesMut,
    id: &str,
    messages: usize,
    qos: QoS,
) -> u64 {
    let topic = format!("devices/{id}/telemetry");
    let (mut rd, mut wr) = tokio::io::split(stream);
    let window = Arc::new(Semaphore::new(16));
    let acks = if qos == QoS::AtLeastOnce {
        let window = window.clone();
        Some(tokio::spawn(async move {
            let mut acked = 0u64;
            while (acked as usize) < messages {
                let packet = loop {
                    match Packet::read(&mut buf, 1 << 20) {
                        Ok(p) => break Some(p),
                        Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                        Err(_) => break None,
                    }
                    match rd.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => break None,
                        Ok(_) => {}
                    }
                };
                match packet {
                    Some(Packet::PubAck(_)) => {
                        acked += 1;
                        window.add_permits(1);
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            acked
        }))
    } else {
        None
    };
    let mut sent = 0u64;
    for seq in 0..messages {
        if qos == QoS::AtLeastOnce {
            match window.acquire().await {
                Ok(p) => p.forget(),
                Err(_) => break,
            }
        }
        let payload = format!("{id}:{seq:08}:{}", "x".repeat(40));
        let mut publish = v4::Publish::new(topic.clone(), qos, payload);
        publish.pkid = if qos == QoS::AtLeastOnce {
            (seq % 60000 + 1) as u16
        } else {
            0
        };
        let mut out = BytesMut::new();
        if publish.write(&mut out).is_err() || wr.write_all(&out).await.is_err() {
            break;
        }
        sent += 1;
    }
    let _ = wr.flush().await;
    if let Some(acks) = acks {
        // Published is what counts as sent; the PUBACKs are only awaited.
        let _ = tokio::time::timeout(Duration::from_secs(60), acks).await;
    } else {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sent
}

/// QoS 1 end to end at `rate` messages per second in all, from ten
/// devices paced by the clock, for `seconds`: each payload carries the
/// time it was sent, and the one subscriber notes when it arrived.
async fn latency(fleet: &Fleet, server: &Server, rate: f64, seconds: f64) -> Latency {
    const PUBLISHERS: usize = 10;
    let addr = server.addr;
    let epoch = Instant::now();
    let per_publisher = (rate * seconds / PUBLISHERS as f64) as u64;
    let expected = per_publisher * PUBLISHERS as u64;
    let sub = subscribe(fleet, addr, 1).await.pop().unwrap();
    let delays = Arc::new(std::sync::Mutex::new(Vec::new()));
    let counter = {
        let delays = delays.clone();
        tokio::spawn(receive(sub, move |payload| {
            let sent_ns = std::str::from_utf8(&payload)
                .ok()
                .and_then(|p| p.split(':').nth(2))
                .and_then(|ns| ns.parse::<u64>().ok());
            let mut delays = delays.lock().unwrap();
            if let Some(sent_ns) = sent_ns {
                let now_ns = epoch.elapsed().as_nanos() as u64;
                delays.push(now_ns.saturating_sub(sent_ns));
            }
            delays.len() as u64 >= expected
        }))
    };
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let (id, config) = fleet.devices[p].clone();
        let interval = Duration::from_secs_f64(PUBLISHERS as f64 / rate);
        tasks.push(tokio::spawn(async move {
            let Ok((stream, mut buf)) = connect(addr, config, &id).await else {
                return 0u64;
            };
            let topic = format!("devices/{id}/telemetry");
            let (mut rd, mut wr) = tokio::io::split(stream);
            // PUBACKs are read and dropped: the pace is the clock's.
            let acks = tokio::spawn(async move {
                let mut sink = [0u8; 4096];
                while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
                drop(buf.split());
            });
            let start = Instant::now();
            let mut sent = 0u64;
            let mut out = BytesMut::new();
            while sent < per_publisher {
                // Everything due by now, in one write.
                let due = ((start.elapsed().as_secs_f64() / interval.as_secs_f64()) as u64 + 1)
                    .min(per_publisher);
                while sent < due {
                    let sent_ns = epoch.elapsed().as_nanos() as u64;
                    let payload = format!("{id}:{sent:08}:{sent_ns}:{}", "x".repeat(24));
                    let mut publish = v4::Publish::new(topic.clone(), QoS::AtLeastOnce, payload);
                    publish.pkid = (sent % 60000 + 1) as u16;
                    if publish.write(&mut out).is_err() {
                        return sent;
                    }
                    sent += 1;
                }
                if wr.write_all(&out).await.is_err() {
                    return sent;
                }
                out.clear();
                tokio::time::sleep_until((start + interval.mul_f64(sent as f64)).into()).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            acks.abort();
            sent
        }));
    }
    let mut sent = 0;
    for t in tasks {
        sent += t.await.unwrap_or(0);
    }
    let _ = counter.await;
    let mut delays = std::mem::take(&mut *delays.lock().unwrap());
    delays.sort_unstable();
    let at = |q: f64| {
        delays
            .get(((delays.len().max(1) - 1) as f64 * q) as usize)
            .map_or(f64::NAN, |ns| *ns as f64 / 1e6)
    };
    let latency = Latency {
        rate,
        sent,
        delivered: delays.len() as u64,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: at(1.0),
    };
    println!("latency: {latency:?}");
    latency
}

/// One row: the three configurations and each gateway's ratio to mosquitto.
fn row(measure: &str, [t, x, m]: [f64; 3], shown: [String; 3]) {
    let ratio = |a: f64| {
        if m > 0.0 && a.is_finite() {
            format!("{:.2}x", a / m)
        } else {
            "-".into()
        }
    };
    println!(
        "| {measure} | {} | {} | {} | {} | {} |",
        shown[0],
        shown[1],
        shown[2],
        ratio(t),
        ratio(x)
    );
}

fn print_table(r: &[Results], l: &[Latency], sizes: &Sizes, enroll: Option<f64>) {
    let all = |f: &dyn Fn(&Results) -> f64| [f(&r[0]), f(&r[1]), f(&r[2])];
    let shown = |v: [f64; 3], digits: usize| v.map(|x| format!("{x:.digits$}"));
    println!(
        "\n| measure | twofold (embedded broker) | twofold → mosquitto | mosquitto | twofold / mosquitto | twofold → mosquitto / mosquitto |"
    );
    println!("|---|---|---|---|---|---|");
    let v = all(&|r| r.connects_per_cpu_second);
    row(
        &format!(
            "connects per server CPU-second ({} full mTLS handshakes + CONNECT)",
            sizes.connects
        ),
        v,
        shown(v, 0),
    );
    let v = all(&|r| r.connects_per_wall_second);
    row("connects per wall second (32 at a time)", v, shown(v, 0));
    let v = all(&|r| r.idle_kib_per_connection);
    row(
        &format!(
            "memory per idle connection, KiB ({} sessions; lower is better)",
            sizes.idle
        ),
        v,
        shown(v, 1),
    );
    for (name, pick) in [
        (
            "QoS 1",
            (|r: &Results| &r.qos1) as fn(&Results) -> &Throughput,
        ),
        ("QoS 1 to a shared subscription of 4", |r: &Results| {
            &r.qos1_shared
        }),
        ("QoS 0", |r: &Results| &r.qos0),
    ] {
        let v = all(&|r| pick(r).per_second);
        let text = [0, 1, 2].map(|i| {
            let t = pick(&r[i]);
            format!(
                "{:.0} (lost {})",
                t.per_second,
                t.sent.saturating_sub(t.delivered)
            )
        });
        row(
            &format!(
                "{name} delivered per second ({} publishers x {})",
                sizes.publishers, sizes.messages
            ),
            v,
            text,
        );
        let v = all(&|r| pick(r).per_cpu_second);
        row(
            &format!("{name} delivered per server CPU-second"),
            v,
            shown(v, 0),
        );
    }
    for (name, pick) in [
        ("p50", (|l: &Latency| l.p50_ms) as fn(&Latency) -> f64),
        ("p99", |l: &Latency| l.p99_ms),
        ("max", |l: &Latency| l.max_ms),
    ] {
        let v = [pick(&l[0]), pick(&l[1]), pick(&l[2])];
        let text = [0, 1, 2].map(|i| format!("{:.1} ({} of {})", v[i], l[i].delivered, l[i].sent));
        row(
            &format!(
                "QoS 1 end-to-end latency {name}, ms, at {:.0}/s (delivered of sent; lower is better)",
                l[0].rate
            ),
            v,
            text,
        );
    }
    let v = all(&|r| r.storm.last);
    let text = [0, 1, 2].map(|i| {
        let s = &r[i].storm;
        format!(
            "{:.1} ({:.1}), {} of {} back",
            s.last, s.median, s.back, s.dropped
        )
    });
    row(
        &format!(
            "reconnect storm: seconds from kill -9 to the last of {} sessions back (median; lower is better)",
            sizes.storm
        ),
        v,
        text,
    );
    if let Some(seconds) = enroll {
        println!(
            "| `provisioning bulk-enroll` of {} devices, seconds | {seconds:.2} | | - | | |",
            sizes.enroll
        );
    }
}
