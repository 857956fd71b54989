//! NATS servers with JetStream and the MQTT listener: the clustered broker
//! the gateways relay to at scale, and the durable one on one machine.

use std::path::PathBuf;
use std::process::Command;

use crate::fleet::Fleet;
use crate::process::{Proc, free_port, run_bounded, spawn, text, wait_until};

/// The user the gateways (and the tests' backend subscribers) log in as.
pub const NATS_USER: &str = "gw";
pub const NATS_PASSWORD: &str = "pw";

/// One node: its configuration stays on disk so it can be restarted on the
/// same ports and the same JetStream directory.
pub struct NatsNode {
    pub proc: Option<Proc>,
    pub conf: PathBuf,
    pub name: String,
    /// Where MQTT clients connect.
    pub mqtt_port: u16,
    restarts: usize,
}

impl NatsNode {
    /// Waits (at most 20 s) until it takes MQTT connections; panics with
    /// its log if it does not.
    fn wait_listening(&self) {
        let up = wait_until(20, || {
            std::net::TcpStream::connect(("127.0.0.1", self.mqtt_port)).is_ok()
        });
        let log = self.proc.as_ref().map(Proc::log).unwrap_or_default();
        assert!(
            up,
            "{} did not listen on {}:\n{log}",
            self.name, self.mqtt_port
        );
    }
}

/// A NATS cluster of one or more nodes on loopback, each with JetStream
/// file storage under the fleet's directory; killed (-9) when dropped.
pub struct Nats {
    pub nodes: Vec<NatsNode>,
    /// With TLS on the MQTT listeners: the CA file clients trust.
    tls_ca: Option<PathBuf>,
    /// With client certificates required: the gateways' (chain, key).
    client_identity: Option<(PathBuf, PathBuf)>,
}

/// TLS on the MQTT listeners.
#[derive(Clone, Copy, PartialEq)]
enum Tls {
    Off,
    /// The server's certificate only.
    Server,
    /// And a client certificate from the fleet's device CA required.
    Mutual,
}

impl Nats {
    /// One node, as a single machine runs it.
    pub fn single(fleet: &Fleet) -> Nats {
        Self::cluster(fleet, 1)
    }

    /// `n` nodes routed to each other; JetStream (and with it the MQTT
    /// sessions' state) is replicated across them.
    pub fn cluster(fleet: &Fleet, n: usize) -> Nats {
        Self::build(fleet, n, Tls::Off)
    }

    /// One node whose MQTT listener speaks TLS only, with the fleet's
    /// gateway certificate (it names localhost).
    pub fn single_tls(fleet: &Fleet) -> Nats {
        Self::build(fleet, 1, Tls::Server)
    }

    /// As [`Self::single_tls`], and every MQTT client must show a
    /// certificate from the fleet's device CA (a service's), as well as
    /// the password. The gateways show the service `upstream`'s, which the
    /// fleet must hold (`fleet.service("upstream")`).
    pub fn single_mutual_tls(fleet: &Fleet) -> Nats {
        Self::build(fleet, 1, Tls::Mutual)
    }

    fn build(fleet: &Fleet, n: usize, tls: Tls) -> Nats {
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            let name = format!("nats-{}", i + 1);
            let mqtt_port = free_port();
            let store = fleet.path(&format!("{name}-js"));
            let mut conf = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{}\n\
                 jetstream {{ store_dir: {store:?} }}\n\
                 authorization {{ users = [ {{user: {NATS_USER}, password: {NATS_PASSWORD}}} ] }}\n\
                 mqtt {{ listen: 127.0.0.1:{mqtt_port}, stream_replicas: {replicas}{tls} }}\n",
                free_port(),
                // Explicit: NATS otherwise sizes the MQTT streams by the
                // nodes it knows when the first client comes, which may be
                // fewer while the cluster forms (R2 of 3 loses quorum with
                // one node).
                replicas = n.min(3),
                tls = match tls {
                    Tls::Off => String::new(),
                    Tls::Server => format!(
                        ", tls {{ cert_file: {:?}, key_file: {:?} }}",
                        fleet.path("gw/gateway.pem"),
                        fleet.path("gw/gateway.key")
                    ),
                    Tls::Mutual => format!(
                        ", tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true }}",
                        fleet.path("gw/gateway.pem"),
                        fleet.path("gw/gateway.key"),
                        fleet.path("pki/device-ca.pem")
                    ),
                }
            );
            if n > 1 {
                let others: Vec<String> = routes
                    .iter()
                    .filter(|r| *r != route)
                    .map(|r| format!("nats-route://127.0.0.1:{r}"))
                    .collect();
                conf.push_str(&format!(
                    "cluster {{ name: twofold, listen: 127.0.0.1:{route}, routes: [{}] }}\n",
                    others.join(", ")
                ));
            }
            let path = fleet.path(&format!("{name}.conf"));
            std::fs::write(&path, conf).unwrap();
            nodes.push(NatsNode {
                proc: None,
                conf: path,
                name,
                mqtt_port,
                restarts: 0,
            });
        }
        let mut nats = Nats {
            nodes,
            tls_ca: (tls != Tls::Off).then(|| fleet.path("openssl-ca.pem")),
            client_identity: (tls == Tls::Mutual).then(|| {
                let dir = fleet.path("svc-upstream");
                (dir.join("device.pem"), dir.join("device.key"))
            }),
        };
        for i in 0..n {
            nats.spawn(fleet, i);
        }
        for node in &nats.nodes {
            node.wait_listening();
        }
        nats.wait_ready();
        nats
    }

    /// Waits (at most 60 s) until every node stores a QoS 1 message: the
    /// MQTT listener is up before JetStream's cluster has its leaders.
    pub fn wait_ready(&self) {
        for i in 0..self.nodes.len() {
            let mut last = String::new();
            let ready = wait_until(60, || {
                let mut cmd = Command::new("mosquitto_pub");
                cmd.args(self.client_args(i)).args([
                    "-i",
                    "twofold-ready",
                    "-q",
                    "1",
                    "-t",
                    "twofold/ready",
                    "-m",
                    "",
                ]);
                let out = run_bounded(cmd, 10);
                last = text(&out);
                out.status.success()
            });
            assert!(
                ready,
                "{} is not ready: {last}
{}",
                self.nodes[i].name,
                self.logs()
            );
        }
    }

    fn spawn(&mut self, fleet: &Fleet, i: usize) {
        let node = &mut self.nodes[i];
        let mut cmd = Command::new("nats-server");
        cmd.arg("-c").arg(&node.conf);
        let log = fleet.path(&format!("{}.{}.log", node.name, node.restarts));
        node.restarts += 1;
        node.proc = Some(spawn(cmd, log));
    }

    /// kill -9 node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].proc.take() {
            p.kill();
        }
    }

    /// Starts node `i` again on its ports and its JetStream directory, and
    /// waits until it takes MQTT clients.
    pub fn restart(&mut self, fleet: &Fleet, i: usize) {
        self.kill(i);
        self.spawn(fleet, i);
        self.nodes[i].wait_listening();
    }

    /// Where node `i` takes MQTT clients, as a URL.
    pub fn url(&self, i: usize) -> String {
        match self.tls_ca {
            Some(_) => format!("mqtts://localhost:{}", self.nodes[i].mqtt_port),
            None => format!("mqtt://127.0.0.1:{}", self.nodes[i].mqtt_port),
        }
    }

    /// The gateway's configuration lines that relay to node `i`.
    pub fn gateway_config(&self, i: usize) -> String {
        let mut config = format!(
            "broker = \"{}\"\nbroker_username = \"{NATS_USER}\"\nbroker_password = \"{NATS_PASSWORD}\"\n",
            self.url(i)
        );
        if let Some(ca) = &self.tls_ca {
            config.push_str(&format!("broker_ca = {ca:?}\n"));
        }
        if let Some((cert, key)) = &self.client_identity {
            config.push_str(&format!("broker_cert = {cert:?}\nbroker_key = {key:?}\n"));
        }
        config
    }

    /// mosquitto_sub's arguments to reach node `i` directly, as a backend
    /// (with client certificates required: as the service `upstream`).
    pub fn client_args(&self, i: usize) -> Vec<String> {
        let mut args: Vec<String> = [
            "-p",
            &self.nodes[i].mqtt_port.to_string(),
            "-u",
            NATS_USER,
            "-P",
            NATS_PASSWORD,
        ]
        .map(str::to_owned)
        .to_vec();
        match &self.tls_ca {
            Some(ca) => args.extend([
                "-h".into(),
                "localhost".into(),
                "--cafile".into(),
                ca.display().to_string(),
            ]),
            None => args.extend(["-h".into(), "127.0.0.1".into()]),
        }
        if let Some((cert, key)) = &self.client_identity {
            args.extend([
                "--cert".into(),
                cert.display().to_string(),
                "--key".into(),
                key.display().to_string(),
            ]);
        }
        args
    }

    /// Every node's log so far, for a failing assertion.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .filter_map(|n| n.proc.as_ref().map(|p| format!("{}:\n{}", n.name, p.log())))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
