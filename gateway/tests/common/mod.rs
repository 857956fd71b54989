//! A PKI, a running gateway and real MQTT/TLS clients, all on loopback.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use twofold_protocol::{DeviceId, Principal, ServiceName, TrustDomain};
use twofold_provisioning::output::{self, files};
use twofold_provisioning::registry::RevocationReason;
use twofold_provisioning::{
    EnrollOptions, EnrollRequest, KeySource, Pki, RevokeTarget, atomic::Durability,
};

pub const TD: &str = "iot.example";

/// A PKI with a gateway certificate, in a temporary directory.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
}

impl Fleet {
    pub fn new() -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(
            &dir.path().join("pki"),
            TrustDomain::parse(TD).unwrap(),
            None,
        )
        .unwrap();
        let mut fleet = Fleet { dir, pki };
        let gw = fleet
            .pki
            .issue_gateway(&["localhost".into()], &["127.0.0.1".parse().unwrap()], 30)
            .unwrap();
        output::write_gateway(
            &fleet.path("gw"),
            &gw,
            &fleet.pki.device_ca_pem().unwrap(),
            &fleet.pki.crl_pem().unwrap(),
        )
        .unwrap();
        // OpenSSL clients (mosquitto) only anchor on a self-signed root, so
        // their CA file holds the server CA and the root.
        let both = format!(
            "{}{}",
            fleet.pki.server_ca_pem().unwrap(),
            std::fs::read_to_string(fleet.path("pki/root-ca.pem")).unwrap()
        );
        std::fs::write(fleet.path("openssl-ca.pem"), both).unwrap();
        fleet
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Enrolls a device; its bundle goes to `<id>/`.
    pub fn device(&mut self, id: &str) -> Identity {
        self.enroll(Principal::Device(DeviceId::parse(id).unwrap()), id)
    }

    /// Enrolls a service; its bundle goes to `svc-<name>/`.
    pub fn service(&mut self, name: &str) -> Identity {
        self.enroll(
            Principal::Service(ServiceName::parse(name).unwrap()),
            &format!("svc-{name}"),
        )
    }

    fn enroll(&mut self, principal: Principal, dir: &str) -> Identity {
        let e = self
            .pki
            .enroll(
                vec![EnrollRequest {
                    principal,
                    key: KeySource::Generate,
                }],
                EnrollOptions {
                    days: 30,
                    replace: false,
                },
                &mut |_| {},
            )
            .unwrap()
            .pop()
            .unwrap();
        let out = self.path(dir);
        output::write_device(
            &out,
            &e,
            &self.pki.server_ca_pem().unwrap(),
            Durability::Sync,
        )
        .unwrap();
        Identity {
            cert: out.join(files::DEVICE_CHAIN),
            key: out.join(files::DEVICE_KEY),
        }
    }

    /// Revokes a device and publishes the new CRL where the gateway reads it.
    pub fn revoke(&mut self, id: &str) {
        let target = RevokeTarget::Principal(Principal::Device(DeviceId::parse(id).unwrap()));
        self.pki
            .revoke(target, RevocationReason::KeyCompromise)
            .unwrap();
        self.publish_crl();
    }

    pub fn publish_crl(&self) {
        twofold_provisioning::atomic::write(
            &self.path("gw/crl.pem"),
            self.pki.crl_pem().unwrap().as_bytes(),
            0o644,
            Durability::Sync,
        )
        .unwrap();
    }

    /// Mints a client certificate with the device CA's key but a profile of
    /// the test's choosing (for the refusal cases provisioning never issues).
    pub fn mint(&self, name: &str, edit: impl FnOnce(&mut CertificateParams)) -> Identity {
        let ca_key =
            KeyPair::from_pem(&std::fs::read_to_string(self.path("pki/device-ca.key")).unwrap())
                .unwrap();
        let issuer = Issuer::from_ca_cert_pem(&self.pki.device_ca_pem().unwrap(), ca_key).unwrap();
        mint_with(
            &self.path(name),
            Some(&issuer),
            &self.pki.device_ca_pem().unwrap(),
            name,
            edit,
        )
    }
}

/// A client certificate chain and key on disk.
#[derive(Clone, Debug)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The client profile provisioning issues, for `id`.
pub fn client_params(id: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, id);
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{TD}/device/{id}").try_into().unwrap(),
    )];
    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(1);
    p
}

/// Writes `dir/device.pem` (leaf + `chain_pem`) and `dir/device.key`; self-signed without an issuer.
pub fn mint_with(
    dir: &Path,
    issuer: Option<&Issuer<'_, KeyPair>>,
    chain_pem: &str,
    id: &str,
    edit: impl FnOnce(&mut CertificateParams),
) -> Identity {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = client_params(id);
    edit(&mut params);
    let cert = match issuer {
        Some(issuer) => params.signed_by(&key, issuer).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    std::fs::create_dir_all(dir).unwrap();
    let chain = if issuer.is_some() {
        format!("{}{chain_pem}", cert.pem())
    } else {
        cert.pem()
    };
    std::fs::write(dir.join("device.pem"), chain).unwrap();
    std::fs::write(dir.join("device.key"), key.serialize_pem()).unwrap();
    Identity {
        cert: dir.join("device.pem"),
        key: dir.join("device.key"),
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running gateway; killed when dropped.
pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
    pub audit: PathBuf,
    pub stderr: PathBuf,
}

impl Gateway {
    /// Starts the gateway on a free port with the fleet's files and extra
    /// TOML (e.g. `[limits]` settings).
    pub fn start(fleet: &Fleet, extra_toml: &str) -> Gateway {
        let port = free_port();
        let audit = fleet.path(&format!("audit-{port}.jsonl"));
        let stderr = fleet.path(&format!("gateway-{port}.log"));
        let config = fleet.path(&format!("gateway-{port}.toml"));
        let gw = fleet.path("gw");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\ntrust_domain = \"{TD}\"\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\ncrl = {:?}\naudit_log = {:?}\n{extra_toml}\n",
                gw.join("gateway.pem"), gw.join("gateway.key"), gw.join("client-ca.pem"), gw.join("crl.pem"), audit
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut gateway = Gateway {
            child,
            addr,
            audit,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        // Wait for this gateway's own "listening" line: another test's
        // gateway could hold the same port for a moment.
        while !gateway.log().contains(&format!("listen=127.0.0.1:{port}"))
            || TcpStream::connect(addr).is_err()
        {
            if let Some(status) = gateway.child.try_wait().unwrap() {
                panic!("gateway exited with {status}:\n{}", gateway.log());
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not listen:\n{}",
                gateway.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        gateway
    }

    pub fn port(&self) -> String {
        self.addr.port().to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Audit events so far.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let Ok(file) = std::fs::File::open(&self.audit) else {
            return Vec::new();
        };
        BufReader::new(file)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect()
    }

    /// Waits (at most 15 s) for a refusal with `reason`, and returns it.
    pub fn refusal(&self, reason: &str) -> serde_json::Value {
        self.wait_for(|e| e["event"] == "refused" && e["reason"] == reason)
            .unwrap_or_else(|| panic!("no refusal {reason:?}; audit:\n{:#?}", self.events()))
    }

    pub fn wait_for(&self, pred: impl Fn(&serde_json::Value) -> bool) -> Option<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(e) = self.events().into_iter().find(|e| pred(e)) {
                return Some(e);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The embedded broker's 3.1.1 loopback address, from the gateway's log.
    pub fn embedded_broker_port(&self) -> u16 {
        let log = self.log();
        let at = log
            .find("v4=127.0.0.1:")
            .expect("embedded broker address in the log")
            + "v4=127.0.0.1:".len();
        log[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command with a time limit (it is killed after `secs`).
pub fn run_bounded(mut cmd: Command, secs: u64) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// mosquitto_pub against the gateway with `who`'s certificate (or none).
pub fn mosquitto_pub(fleet: &Fleet, gw: &Gateway, who: Option<&Identity>, args: &[&str]) -> Output {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(["-h", "localhost", "-p", &gw.port(), "--cafile"])
        .arg(fleet.path("openssl-ca.pem"));
    if let Some(who) = who {
        cmd.arg("--cert").arg(&who.cert).arg("--key").arg(&who.key);
    }
    cmd.args(args);
    run_bounded(cmd, 10)
}

/// Starts mosquitto_sub in the background; read its output with `finish`.
pub fn mosquitto_sub(fleet: &Fleet, gw: &Gateway, who: &Identity, args: &[&str]) -> Child {
    let mut cmd = Command::new("mosquitto_sub");
    cmd.args(["-h", "localhost", "-p", &gw.port(), "--cafile"])
        .arg(fleet.path("openssl-ca.pem"))
        .arg("--cert")
        .arg(&who.cert)
        .arg("--key")
        .arg(&who.key)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn()
        .expect("mosquitto_sub (Debian package mosquitto-clients)")
}

/// Waits for a child up to `secs` seconds (then kills it) and collects its
/// output. Stdout and stderr are drained while waiting: a child blocked on a
/// full pipe would otherwise look like a stalled peer.
pub fn finish(mut child: Child, secs: u64) -> Output {
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut out);
            }
            out
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let status = child.wait().unwrap();
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Waits until the gateway's audit log shows `n` connected sessions for `client_id`.
pub fn wait_connected(gw: &Gateway, client_id: &str) {
    gw.wait_for(|e| e["event"] == "connected" && e["client_id"] == client_id)
        .unwrap_or_else(|| {
            panic!(
                "{client_id} never connected; audit:\n{:#?}\nlog:\n{}",
                gw.events(),
                gw.log()
            )
        });
}

/// A plain HTTP/1.0 GET on loopback; returns (status line, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}
