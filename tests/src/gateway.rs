//! The gateway binary on a loopback port, and its audit log.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use twofold_provisioning::output::files;

use crate::fleet::{Fleet, TD};
use crate::process::{built, free_port};

/// A running gateway; killed (-9) when dropped.
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
        Self::start_on(fleet, free_port(), extra_toml)
    }

    /// Starts the gateway on `port` (e.g. again after a kill); its audit
    /// log and stderr are per port and appended to across restarts.
    pub fn start_on(fleet: &Fleet, port: u16, extra_toml: &str) -> Gateway {
        Self::start_with_crl(fleet, port, &fleet.path("gw").join(files::CRL), extra_toml)
    }

    /// [`Self::start_on`] with a CRL file of its own, as each gateway of
    /// a cluster has.
    pub fn start_with_crl(
        fleet: &Fleet,
        port: u16,
        crl: &std::path::Path,
        extra_toml: &str,
    ) -> Gateway {
        let audit = fleet.path(&format!("audit-{port}.jsonl"));
        let config = fleet.path(&format!("gateway-{port}.toml"));
        let gw = fleet.path("gw");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\ntrust_domain = \"{TD}\"\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\ncrl = {:?}\naudit_log = {:?}\n{extra_toml}\n",
                gw.join(files::GATEWAY_CHAIN),
                gw.join(files::GATEWAY_KEY),
                gw.join(files::CLIENT_CA),
                crl,
                audit
            ),
        )
        .unwrap();
        // A restart gets a log of its own, so "listening" below is its own.
        let mut n = 0;
        let stderr = loop {
            let p = fleet.path(&format!("gateway-{port}.{n}.log"));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        let child = Command::new(built("gateway"))
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
                // Who holds the ports, if a bind failed.
                let ss = Command::new("ss").arg("-tanp").output();
                let holders: String = ss
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| gateway.log().contains("in use") && l.contains("127.0.0.1:"))
                    .filter(|l| {
                        gateway
                            .log()
                            .split(|c: char| !c.is_ascii_digit())
                            .filter(|n| n.len() >= 4)
                            .any(|n| l.contains(&format!(":{n} ")))
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                panic!(
                    "gateway exited with {status}:\n{}\n{holders}",
                    gateway.log()
                );
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

    /// This run's stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// kill -9, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Audit events so far. A line a kill -9 cut short is skipped, and so
    /// are its bytes: they need not be UTF-8.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let Ok(bytes) = std::fs::read(&self.audit) else {
            return Vec::new();
        };
        bytes
            .split(|b| *b == b'\n')
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect()
    }

    /// Waits (at most 15 s) for a refusal with `reason`, and returns it.
    pub fn refusal(&self, reason: &str) -> serde_json::Value {
        self.wait_for(|e| e["event"] == "refused" && e["reason"] == reason)
            .unwrap_or_else(|| panic!("no refusal {reason:?}; audit:\n{:#?}", self.events()))
    }

    /// Waits (at most 15 s) for an audit event matching `pred`.
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

    /// The TCP ports the gateway process listens on, from `/proc`: the
    /// listening sockets (IPv4 and IPv6) whose inodes its descriptors hold.
    pub fn listening_ports(&self) -> Vec<u16> {
        let pid = self.child.id();
        let inodes: std::collections::HashSet<String> =
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .filter_map(|target| {
                    let target = target.to_string_lossy().into_owned();
                    let inode = target.strip_prefix("socket:[")?.strip_suffix(']')?;
                    Some(inode.to_owned())
                })
                .collect();
        let mut ports = Vec::new();
        for table in ["tcp", "tcp6"] {
            let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap();
            for line in text.lines().skip(1) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                // local address, state (0A: LISTEN), inode
                if cols.len() > 9 && cols[3] == "0A" && inodes.contains(cols[9]) {
                    let port = cols[1].rsplit(':').next().unwrap();
                    ports.push(u16::from_str_radix(port, 16).unwrap());
                }
            }
        }
        ports.sort_unstable();
        ports
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until the gateway's audit log shows a session for `client_id`.
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
