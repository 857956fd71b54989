//! Unauthenticated peers that stall cannot keep a real device out: a
//! thousand sockets that sent a ClientHello, or read the gateway's whole
//! flight, and then went silent, from the device's own address and from
//! others, while a device connects and gets its CONNACK; and a thousand
//! idle sockets do not exhaust the gateway's open files, which it raises
//! at start (and refuses to start with too few).

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use twofold_provisioning::output::files;
use twofold_tests::*;

/// The stalled peers' handshake timeout: far longer than the device is
/// given, so that no stalled handshake has timed out when it connects.
const STALLED_TIMEOUT_SECS: u64 = 60;
/// How long the device is given to publish.
const DEVICE_BOUND_SECS: u64 = 30;

/// The test opens over a thousand sockets.
fn raise_own_open_files_limit() {
    rlimit::increase_nofile_limit(u64::MAX).unwrap();
}

/// A TLS client that trusts the fleet's server CA and has no certificate
/// (it never gets as far as sending one).
fn client_config(fleet: &Fleet) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let server_ca = fleet.pki.server_ca_pem().unwrap();
    for ca in CertificateDer::pem_slice_iter(server_ca.as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(config)
}

/// How far a stalled peer goes before it falls silent.
#[derive(Clone, Copy, Debug)]
enum StopAfter {
    /// Its ClientHello.
    ClientHello,
    /// Reading and checking the gateway's whole flight (ServerHello to
    /// Finished); its certificate and Finished are never sent.
    ServerFlight,
}

/// A peer that stalled; its socket stays open as long as it lives.
struct Stalled {
    _tcp: TcpStream,
    _tls: rustls::ClientConnection,
    flight: Flight,
}

/// What became of a peer meant to read the gateway's flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flight {
    /// Not meant to ([`StopAfter::ClientHello`]).
    NotAsked,
    Read,
    /// The gateway closed it first: on a loaded machine an earlier one
    /// can outlive the grace and be cut.
    Closed,
    /// Not before the setup's deadline: the gateway kept it waiting (as
    /// the gateway before stalled handshakes gave way did, once its 256
    /// slots were held).
    NotReceived,
}

/// Connects from `source` (any 127.0.0.x on Linux) to `gateway`.
fn connect_from(source: IpAddr, gateway: SocketAddr) -> TcpStream {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let tcp = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source, 0)).unwrap();
        socket.connect(gateway).await.unwrap()
    });
    let tcp = tcp.into_std().unwrap();
    tcp.set_nonblocking(false).unwrap();
    tcp
}

fn stall(
    config: &Arc<rustls::ClientConfig>,
    source: IpAddr,
    gateway: SocketAddr,
    stop: StopAfter,
    deadline: Instant,
) -> Stalled {
    let mut tcp = connect_from(source, gateway);
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = rustls::ClientConnection::new(config.clone(), name).unwrap();
    while tls.wants_write() {
        tls.write_tls(&mut tcp).unwrap();
    }
    tcp.flush().unwrap();
    let mut flight = Flight::NotAsked;
    if let StopAfter::ServerFlight = stop {
        // Once the gateway's Finished is read, the client's own flight
        // waits in its buffer: never written.
        flight = Flight::Read;
        while tls.is_handshaking() {
            let left = deadline.saturating_duration_since(Instant::now());
            tcp.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            match tls.read_tls(&mut tcp) {
                Ok(0) => {
                    flight = Flight::Closed;
                    break;
                }
                Ok(_) => {
                    tls.process_new_packets().unwrap();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    flight = Flight::NotReceived;
                    break;
                }
                Err(e) => panic!("{stop:?} from {source}: {e}"),
            }
        }
    }
    Stalled {
        _tcp: tcp,
        _tls: tls,
        flight,
    }
}

/// The device (rumqttc, MQTT 3.1.1) connects and publishes at QoS 1: Ok
/// with how long it took to its CONNACK and to its PUBACK, or what went
/// wrong within the bound.
fn device_publishes(
    fleet: &Fleet,
    gw: &Gateway,
    dev: &Identity,
) -> Result<(Duration, Duration), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut options = rumqttc::MqttOptions::new("sensor-1", "localhost", gw.addr.port());
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(fleet.client_tls(dev)),
    ));
    let started = Instant::now();
    runtime.block_on(async {
        let (client, mut events) = rumqttc::AsyncClient::new(options, 10);
        // One attempt, given the whole bound (the default gives up after 5 s).
        let mut network = rumqttc::NetworkOptions::new();
        network.set_connection_timeout(DEVICE_BOUND_SECS);
        events.set_network_options(network);
        let bound = Duration::from_secs(DEVICE_BOUND_SECS);
        let outcome = tokio::time::timeout(bound, async {
            let mut connack = None;
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => {
                        if ack.code != rumqttc::ConnectReturnCode::Success {
                            return Err(format!("CONNACK {:?}", ack.code));
                        }
                        connack = Some(started.elapsed());
                        client
                            .publish(
                                "devices/sensor-1/telemetry",
                                rumqttc::QoS::AtLeastOnce,
                                false,
                                "reading",
                            )
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        let connack = connack.ok_or("PUBACK before CONNACK")?;
                        return Ok((connack, started.elapsed()));
                    }
                    Ok(_) => {}
                    Err(e) => return Err(format!("connection: {e}")),
                }
            }
        })
        .await
        .unwrap_or_else(|_| Err(format!("no CONNACK and PUBACK within {bound:?}")));
        let _ = client.try_disconnect();
        outcome
    })
}

#[test]
fn a_device_connects_while_a_thousand_peers_stall_mid_handshake() {
    raise_own_open_files_limit();
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = Gateway::start(
        &fleet,
        &format!(
            "[limits]\nhandshake_timeout_secs = {STALLED_TIMEOUT_SECS}\nhandshake_grace_secs = 1\n"
        ),
    );
    let alone = device_publishes(&fleet, &gw, &dev).expect("the device alone");

    // 1,000 stalled peers, half after their ClientHello and half after the
    // gateway's flight: 400 from the device's own address, 200 from each
    // of three others.
    let config = client_config(&fleet);
    let opened = Instant::now();
    let deadline = opened + Duration::from_secs(20);
    let mut stalled = Vec::new();
    for (last, count) in [(1u8, 400), (2, 200), (3, 200), (4, 200)] {
        let source = IpAddr::from([127, 0, 0, last]);
        for i in 0..count {
            let stop = if i % 2 == 0 {
                StopAfter::ClientHello
            } else {
                StopAfter::ServerFlight
            };
            stalled.push(stall(&config, source, gw.addr, stop, deadline));
        }
    }
    let setup = opened.elapsed();
    // Past the grace (1 s), so that they are stalled in the gateway's eyes.
    std::thread::sleep(Duration::from_millis(1500));

    let crowded = device_publishes(&fleet, &gw, &dev);
    let since_opened = opened.elapsed();
    let flights = |f: Flight| stalled.iter().filter(|s| s.flight == f).count();
    eprintln!(
        "device alone (CONNACK, PUBACK): {alone:.2?}; with {} stalled peers: {crowded:.2?} \
         (set up in {setup:.2?}; of the peers meant to read the gateway's flight, {} did, \
         {} were closed first and {} never got it)",
        stalled.len(),
        flights(Flight::Read),
        flights(Flight::Closed),
        flights(Flight::NotReceived),
    );
    if let Err(e) = crowded {
        panic!(
            "a real device was kept out by {} stalled handshakes: {e}\ngateway log:\n{}",
            stalled.len(),
            gw.log()
        );
    }
    // What makes this a proof: none of the stalled handshakes had timed
    // out yet, so none of them had given its room back on its own.
    assert!(
        since_opened < Duration::from_secs(STALLED_TIMEOUT_SECS),
        "the stalled peers were opened {since_opened:?} ago: their own timeout may have freed room"
    );
    let timed_out = gw
        .events()
        .into_iter()
        .filter(|e| {
            e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("no TLS handshake within"))
        })
        .count();
    assert_eq!(timed_out, 0, "no stalled handshake has timed out yet");

    // Every handshake cut is audited, with its reason and why.
    let cut = gw
        .wait_for(|e| {
            e["event"] == "refused"
                && e["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("handshake cut to make room"))
        })
        .unwrap_or_else(|| panic!("no handshake was cut; audit:\n{:#?}", gw.events()));
    assert_eq!(cut["reason"], "handshake_timeout", "{cut}");
    let detail = cut["detail"].as_str().unwrap();
    assert!(
        detail.contains("limits.max_concurrent_handshakes = 256"),
        "{detail}"
    );
    let mut by_source = std::collections::BTreeMap::<String, usize>::new();
    for e in gw.events() {
        if e["detail"]
            .as_str()
            .is_some_and(|d| d.contains("handshake cut to make room"))
        {
            let peer: SocketAddr = e["peer"].as_str().unwrap().parse().unwrap();
            *by_source.entry(peer.ip().to_string()).or_default() += 1;
        }
    }
    eprintln!("handshakes cut so far, by address: {by_source:?}");
    drop(stalled);
}

/// Starts the gateway binary under `prlimit --nofile=SOFT:HARD`, as the
/// test helper does otherwise (same files, its audit log and stderr).
/// `Err(log)` if it exits before listening.
fn start_with_nofile(fleet: &Fleet, soft: u64, hard: u64, extra: &str) -> Result<Gateway, String> {
    let port = free_port();
    let gw = fleet.path("gw");
    let audit = fleet.path(&format!("audit-{port}.jsonl"));
    let config = fleet.path(&format!("gateway-{port}.toml"));
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ntrust_domain = \"{TD}\"\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\ncrl = {:?}\naudit_log = {:?}\n{extra}\n",
            gw.join(files::GATEWAY_CHAIN),
            gw.join(files::GATEWAY_KEY),
            gw.join(files::CLIENT_CA),
            gw.join(files::CRL),
            audit
        ),
    )
    .unwrap();
    let stderr = fleet.path(&format!("gateway-{port}.log"));
    let child = Command::new("prlimit")
        .arg(format!("--nofile={soft}:{hard}"))
        .arg(built("gateway"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("prlimit (util-linux)");
    let mut gateway = Gateway {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        audit,
        stderr,
    };
    let listening = wait_until(30, || {
        gateway.log().contains(&format!("listen=127.0.0.1:{port}"))
            || gateway.child.try_wait().unwrap().is_some()
    });
    if gateway.child.try_wait().unwrap().is_some() {
        return Err(gateway.log());
    }
    assert!(listening, "gateway did not listen:\n{}", gateway.log());
    Ok(gateway)
}

#[test]
fn the_gateway_raises_its_open_files_limit_and_serves_past_1024_sockets() {
    raise_own_open_files_limit();
    let (_, hard) = rlimit::Resource::NOFILE.get().unwrap();
    assert!(
        hard >= 4096,
        "this test needs a hard open-files limit of at least 4096 (it is {hard})"
    );
    let mut fleet = Fleet::new();
    let dev = fleet.device("sensor-1");
    let gw = start_with_nofile(
        &fleet,
        1024,
        hard,
        &format!("[limits]\nhandshake_timeout_secs = {STALLED_TIMEOUT_SECS}\n"),
    )
    .unwrap_or_else(|log| panic!("the gateway did not start:\n{log}"));
    assert!(
        gw.log().contains(&format!("open_files={hard}")),
        "no log line with the raised limit:\n{}",
        gw.log()
    );
    // 1,100 silent sockets: past a soft limit of 1,024 the gateway could
    // accept no more, and the device would wait for them to time out.
    let idle: Vec<TcpStream> = (0..1100)
        .map(|_| TcpStream::connect(gw.addr).unwrap())
        .collect();
    let took = device_publishes(&fleet, &gw, &dev);
    eprintln!(
        "device (CONNACK, PUBACK) after {} idle sockets: {took:.2?}",
        idle.len()
    );
    if let Err(e) = took {
        panic!(
            "the device was kept out by {} idle sockets: {e}\ngateway log:\n{}",
            idle.len(),
            gw.log()
        );
    }
    drop(idle);
}

#[test]
fn the_gateway_refuses_to_start_below_its_open_files_floor() {
    let fleet = Fleet::new();
    let log = match start_with_nofile(&fleet, 1024, 2048, "") {
        Ok(gw) => panic!(
            "the gateway started with a hard limit of 2048:\n{}",
            gw.log()
        ),
        Err(log) => log,
    };
    for needle in [
        "open files limit: 2048 (hard limit 2048) is below limits.min_open_files = 4096",
        "LimitNOFILE=",
        "ulimit -Hn",
    ] {
        assert!(log.contains(needle), "{needle:?} not in:\n{log}");
    }
}
