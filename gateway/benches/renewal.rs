//! 1,000 devices renewing at once through one gateway and the CA
//! service: are all renewed, how long until the last one, and how much
//! CPU the CA service spends per renewal.
//!
//!     cargo build --release -p twofold-provisioning --bin provisioning
//!     cargo bench -p twofold-gateway --bench renewal -- [--devices 1000]
//!
//! Every device first holds an MQTT session (connected before the clock
//! starts); then all publish a renew request (same key: no CSR) at once
//! and wait for the answer on `$twofold/v1/cert/answer`. The CA service
//! signs, records and answers each one; its registry is SQLite with
//! synchronous commits, one transaction per renewal.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{self, Packet};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{Barrier, Semaphore};
use twofold_protocol::message::{self, CertAnswer, RenewRequest};
use twofold_protocol::topic::{CERT_ANSWER, CERT_RENEW};
use twofold_protocol::{DeviceId, Principal, ServiceName, TrustDomain};
use twofold_provisioning::{EnrollOptions, EnrollRequest, KeySource, Pki, keys, output};

mod common;
use common::{connect, read_packet, write_packet};

fn main() {
    rlimit::increase_nofile_limit(10_000).expect("raise the open-files limit");
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let devices: usize = arg("--devices").map_or(1000, |n| n.parse().expect("--devices N"));
    let provisioning = arg("--provisioning").map(PathBuf::from).unwrap_or_else(|| {
        // target/release/deps/renewal-… → target/release/provisioning
        let exe = std::env::current_exe().unwrap();
        exe.parent().unwrap().parent().unwrap().join("provisioning")
    });
    assert!(
        provisioning.is_file(),
        "{} is not built: cargo build --release -p twofold-provisioning --bin provisioning",
        provisioning.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    println!("enrolling {devices} devices...");
    let configs = enroll(d, devices);

    let ca_port = free_port();
    let mut ca = Command::new(&provisioning);
    ca.arg("--pki")
        .arg(d.join("pki"))
        .args(["serve", "--listen", &format!("127.0.0.1:{ca_port}")])
        .arg("--cert")
        .arg(d.join("ca/service.pem"))
        .arg("--key")
        .arg(d.join("ca/service.key"))
        .args(["--ra", "gw", "--allow-early", "--rate-limit", "10"])
        .env("RUST_LOG", "warn");
    let mut ca = Running::spawn(ca, &d.join("ca.log"));
    wait_port(ca_port);

    let port = free_port();
    let config = d.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ntrust_domain = \"bench.example\"\n\
             cert = {:?}\nkey = {:?}\nclient_ca = {:?}\ncrl = {:?}\naudit_log = {:?}\n\
             [ca_service]\naddress = \"localhost:{ca_port}\"\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            d.join("gw/gateway.pem"),
            d.join("gw/gateway.key"),
            d.join("gw/client-ca.pem"),
            d.join("gw/crl.pem"),
            d.join("audit.jsonl"),
            d.join("pki/server-ca.pem"),
            d.join("svc-gw/device.pem"),
            d.join("svc-gw/device.key"),
        ),
    )
    .unwrap();
    let mut gateway = Command::new(env!("CARGO_BIN_EXE_gateway"));
    gateway.arg("--config").arg(&config).env("RUST_LOG", "warn");
    let mut gateway = Running::spawn(gateway, &d.join("gateway.log"));
    wait_port(port);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = runtime.block_on(renew_all(port, configs, &ca, &gateway));
    let ca_cpu = result.ca_cpu;
    println!(
        "\nrenewal of {devices} devices at once, through one gateway and the CA service:\n\
         issued {} of {devices}; refused {:?}; no answer {}\n\
         seconds to the median answer {:.2}, to the last {:.2}\n\
         CA service CPU {:.2} s: {:.2} ms per renewal\n\
         gateway CPU during the renewals {:.2} s",
        result.issued,
        result.refused,
        result.lost,
        result.median,
        result.last,
        ca_cpu,
        ca_cpu * 1000.0 / result.issued.max(1) as f64,
        result.gateway_cpu,
    );
    ca.stop();
    gateway.stop();
}

struct Outcome {
    issued: usize,
    refused: Vec<String>,
    lost: usize,
    median: f64,
    last: f64,
    ca_cpu: f64,
    gateway_cpu: f64,
}

async fn renew_all(
    port: u16,
    devices: Vec<(String, Arc<rustls::ClientConfig>)>,
    ca: &Running,
    gateway: &Running,
) -> Outcome {
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let n = devices.len();
    // Everyone connects first; the clock starts when all are in.
    let gate = Arc::new(Semaphore::new(64));
    let ready = Arc::new(Barrier::new(n + 1));
    type Answered = Result<(Duration, Result<(), String>), String>;
    let mut tasks: Vec<tokio::task::JoinHandle<Answered>> = Vec::new();
    for (id, config) in devices {
        let (gate, ready) = (gate.clone(), ready.clone());
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire().await;
            let session = connect(addr, config, &id).await;
            drop(permit);
            ready.wait().await;
            let (mut s, mut buf) = session.map_err(|e| format!("connect: {e}"))?;
            let started = Instant::now();
            let mut request = [0u8; 64];
            let payload = message::encode(
                &RenewRequest {
                    request_id: "bench-1",
                    csr: None,
                },
                &mut request,
            )
            .map_err(|e| e.to_string())?;
            let publish = v4::Publish::from_bytes(
                CERT_RENEW,
                QoS::AtMostOnce,
                Bytes::copy_from_slice(payload),
            );
            write_packet(&mut s, Packet::Publish(publish))
                .await
                .map_err(|e| e.to_string())?;
            loop {
                let packet =
                    tokio::time::timeout(Duration::from_secs(120), read_packet(&mut s, &mut buf))
                        .await
                        .map_err(|_| "no answer in 120 s".to_owned())?
                        .map_err(|e| e.to_string())?;
                if let Packet::Publish(p) = packet
                    && p.topic == CERT_ANSWER
                {
                    let answer = match message::decode::<CertAnswer>(&p.payload) {
                        Ok(CertAnswer::Issued { .. }) => Ok(()),
                        Ok(CertAnswer::Refused { code, reason, .. }) => {
                            Err(format!("{code:?}: {reason}"))
                        }
                        Ok(other) => Err(format!("{other:?}")),
                        Err(e) => Err(e.to_string()),
                    };
                    return Ok((started.elapsed(), answer));
                }
            }
        }));
    }
    ready.wait().await;
    let cpu0 = ca.cpu_seconds();
    let gateway0 = gateway.cpu_seconds();
    let mut times = Vec::new();
    let mut refused = Vec::new();
    let mut lost = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok((took, Ok(()))) => times.push(took.as_secs_f64()),
            Ok((_, Err(why))) => refused.push(why),
            Err(e) => {
                lost += 1;
                if lost <= 3 {
                    println!("device failed: {e}");
                }
            }
        }
    }
    let ca_cpu = ca.cpu_seconds() - cpu0;
    let gateway_cpu = gateway.cpu_seconds() - gateway0;
    times.sort_by(f64::total_cmp);
    refused.truncate(5);
    Outcome {
        issued: times.len(),
        refused,
        lost,
        median: times.get(times.len() / 2).copied().unwrap_or(0.0),
        last: times.last().copied().unwrap_or(0.0),
        ca_cpu,
        gateway_cpu,
    }
}

/// A PKI in `d` with `n` devices, the gateway's certificate and its
/// service identity `gw`, and the CA service's certificate; the
/// devices' client configs.
fn enroll(d: &Path, n: usize) -> Vec<(String, Arc<rustls::ClientConfig>)> {
    let mut pki = Pki::init(
        &d.join("pki"),
        TrustDomain::parse("bench.example").unwrap(),
        None,
    )
    .unwrap();
    let localhost = ["localhost".to_owned()];
    let loopback = ["127.0.0.1".parse().unwrap()];
    let gw = pki.issue_gateway(&localhost, &loopback, 30, None).unwrap();
    output::write_gateway(
        &d.join("gw"),
        &gw,
        &pki.device_ca_pem().unwrap(),
        &pki.crl_pem().unwrap(),
    )
    .unwrap();
    let service = pki.issue_gateway(&localhost, &loopback, 30, None).unwrap();
    std::fs::create_dir_all(d.join("ca")).unwrap();
    std::fs::write(d.join("ca/service.pem"), &service.chain_pem).unwrap();
    std::fs::write(
        d.join("ca/service.key"),
        keys::to_pem(&service.key, None).unwrap(),
    )
    .unwrap();
    let mut requests: Vec<EnrollRequest> = (0..n)
        .map(|i| EnrollRequest {
            principal: Principal::Device(DeviceId::parse(&format!("dev-{i}")).unwrap()),
            key: KeySource::Generate,
        })
        .collect();
    requests.push(EnrollRequest {
        principal: Principal::Service(ServiceName::parse("gw").unwrap()),
        key: KeySource::Generate,
    });
    let options = EnrollOptions {
        days: 30,
        replace: false,
        lifetime: None,
    };
    let mut issued = pki.enroll(requests, options, &mut |_| {}).unwrap();
    let gw_service = issued.pop().unwrap();
    std::fs::create_dir_all(d.join("svc-gw")).unwrap();
    std::fs::write(d.join("svc-gw/device.pem"), &gw_service.chain_pem).unwrap();
    std::fs::write(
        d.join("svc-gw/device.key"),
        keys::to_pem(gw_service.key.as_ref().unwrap(), None).unwrap(),
    )
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(pki.server_ca_pem().unwrap().as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let roots = Arc::new(roots);
    issued
        .iter()
        .map(|e| {
            let chain = CertificateDer::pem_slice_iter(e.chain_pem.as_bytes())
                .map(|c| c.unwrap())
                .collect();
            let key_pem = keys::to_pem(e.key.as_ref().unwrap(), None).unwrap();
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain, key)
            .unwrap();
            (e.record.name.clone(), Arc::new(config))
        })
        .collect()
}

/// A child process, killed when stopped.
struct Running {
    child: Child,
}

impl Running {
    fn spawn(mut cmd: Command, log: &Path) -> Running {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        Running { child }
    }

    /// User + system CPU seconds so far.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
