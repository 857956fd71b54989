//! Helpers for the agent's tests: a PKI on disk, the gateway binary,
//! mosquitto, and the agent binary, all on free loopback ports, all killed
//! when dropped.
#![allow(dead_code)]

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use twofold_protocol::{DeviceId, Principal, ServiceName, TrustDomain};
use twofold_provisioning::output::{self, files};
use twofold_provisioning::{EnrollOptions, EnrollRequest, KeySource, Pki, atomic::Durability};

pub const TD: &str = "iot.example";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A PKI with a gateway certificate for localhost.
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
        // OpenSSL clients anchor only on a self-signed root.
        let both = format!(
            "{}{}",
            fleet.pki.server_ca_pem().unwrap(),
            std::fs::read_to_string(fleet.path("pki/root-ca.pem")).unwrap()
        );
        std::fs::write(fleet.path("openssl-ca.pem"), both).unwrap();
        let clients = format!(
            "{}{}",
            fleet.pki.device_ca_pem().unwrap(),
            std::fs::read_to_string(fleet.path("pki/root-ca.pem")).unwrap()
        );
        std::fs::write(fleet.path("openssl-client-ca.pem"), clients).unwrap();
        fleet
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Enrolls a device or service; returns its bundle directory.
    pub fn enroll(&mut self, principal: Principal, dir: &str) -> PathBuf {
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
        out
    }

    pub fn device(&mut self, id: &str) -> PathBuf {
        self.enroll(Principal::Device(DeviceId::parse(id).unwrap()), id)
    }

    pub fn service(&mut self, name: &str) -> PathBuf {
        self.enroll(
            Principal::Service(ServiceName::parse(name).unwrap()),
            &format!("svc-{name}"),
        )
    }
}

/// A child process killed (-9) when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    Proc { child, log }
}

/// The workspace's target directory, from this test binary's path
/// (target/<profile>/deps/<test>).
fn built(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.is_file(),
        "{} is not built; `cargo test --workspace` builds it (or `cargo build -p twofold-gateway`)",
        path.display()
    );
    path
}

/// Starts the gateway on `port` with the fleet's files and extra TOML.
pub fn gateway(fleet: &Fleet, port: u16, extra: &str) -> Proc {
    let gw = fleet.path("gw");
    let config = fleet.path(&format!("gateway-{port}.toml"));
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ntrust_domain = \"{TD}\"\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\ncrl = {:?}\naudit_log = {:?}\n{extra}\n",
            gw.join(files::GATEWAY_CHAIN),
            gw.join(files::GATEWAY_KEY),
            gw.join(files::CLIENT_CA),
            gw.join(files::CRL),
            fleet.path(&format!("audit-{port}.jsonl")),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(built("gateway"));
    cmd.arg("--config").arg(&config).env("RUST_LOG", "info");
    let p = spawn(cmd, fleet.path(&format!("gateway-{port}.log")));
    wait_port(port, "the gateway");
    p
}

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Starts mosquitto on a free port with `conf` added; returns it and the port.
pub fn mosquitto(fleet: &Fleet, conf: &str) -> (Proc, u16) {
    let port = free_port();
    let path = fleet.path(&format!("mosquitto-{port}.conf"));
    std::fs::write(
        &path,
        format!(
            "listener {port} 127.0.0.1\npersistence false\nuser {}\nlog_dest stderr\n{conf}",
            current_user()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("mosquitto");
    cmd.arg("-c").arg(&path);
    let p = spawn(cmd, fleet.path(&format!("mosquitto-{port}.log")));
    wait_port(port, "mosquitto");
    (p, port)
}

/// Writes an agent config and starts `agent run` with it.
pub fn agent(fleet: &Fleet, name: &str, bundle: &Path, port: u16, extra: &str) -> Proc {
    let config = fleet.path(&format!("agent-{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[gateway]\nhost = \"localhost\"\nport = {port}\nkeep_alive_secs = 5\n\
             [identity]\nbundle = {bundle:?}\n\
             [queue]\npath = {:?}\n\
             [reconnect]\nmin_secs = 0.2\nmax_secs = 2.0\n\
             [api]\nsocket = {:?}\n{extra}\n",
            fleet.path(&format!("queue-{name}.sqlite")),
            fleet.path(&format!("agent-{name}.sock")),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agent"));
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info");
    let log = fleet.path(&format!("agent-{name}.log"));
    let mut p = spawn(cmd, log);
    // Let it come up (its socket appears) before tests talk to it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fleet.path(&format!("agent-{name}.sock")).exists() {
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("agent exited ({status}):\n{}", p.log());
        }
        assert!(
            Instant::now() < deadline,
            "agent did not start:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    p
}

/// Polls `cond` every 50 ms for up to `secs`.
pub fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// A background mosquitto_sub writing `topic payload-as-hex` lines to a file.
pub struct Sub {
    pub proc: Proc,
    pub out: PathBuf,
}

impl Sub {
    pub fn start(fleet: &Fleet, args: &[&str], name: &str) -> Sub {
        let out = fleet.path(&format!("sub-{name}.out"));
        let mut cmd = Command::new("mosquitto_sub");
        cmd.args(args).args(["-F", "%t %x"]);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(fleet.path(&format!("sub-{name}.log"))).unwrap())
            .spawn()
            .expect("mosquitto_sub (Debian package mosquitto-clients)");
        Sub {
            proc: Proc {
                child,
                log: fleet.path(&format!("sub-{name}.log")),
            },
            out,
        }
    }

    /// Every (topic, payload) so far.
    pub fn messages(&self) -> Vec<(String, Vec<u8>)> {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.out) {
            let _ = f.read_to_string(&mut text);
        }
        text.lines()
            .filter_map(|l| {
                let (t, hex) = l.split_once(' ').unwrap_or((l, ""));
                Some((t.to_owned(), hex::decode(hex).ok()?))
            })
            .collect()
    }
}

/// mosquitto_sub/pub arguments for a client of the gateway with `bundle`'s certificate.
pub fn tls_args(fleet: &Fleet, port: u16, bundle: &Path) -> Vec<String> {
    vec![
        "-h".into(),
        "localhost".into(),
        "-p".into(),
        port.to_string(),
        "--cafile".into(),
        fleet.path("openssl-ca.pem").display().to_string(),
        "--cert".into(),
        bundle.join(files::DEVICE_CHAIN).display().to_string(),
        "--key".into(),
        bundle.join(files::DEVICE_KEY).display().to_string(),
    ]
}

/// Runs a command to its end, at most `secs`.
pub fn run_bounded(mut cmd: Command, secs: u64) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}
