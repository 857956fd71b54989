//! Twofold at scale on one machine: NATS nodes with JetStream, gateways
//! relaying to them (each its own node first), and haproxy in front.

use std::process::Command;

use crate::fleet::Fleet;
use crate::gateway::Gateway;
use crate::nats::Nats;
use crate::process::{Proc, free_port, spawn, wait_port};

/// The cluster; every process is killed (-9) when dropped.
pub struct Cluster {
    pub nats: Nats,
    /// `None` while killed.
    pub gateways: Vec<Option<Gateway>>,
    /// Each gateway's port and its `/metrics` and `/healthz` address.
    pub gateway_ports: Vec<(u16, u16)>,
    pub haproxy: Proc,
    /// Where devices connect: haproxy.
    pub port: u16,
    extra: String,
    /// Each gateway names its own node first (else all name the first).
    spread: bool,
}

impl Cluster {
    /// `nodes` NATS nodes and `gateways` gateways behind haproxy; `extra`
    /// is added to every gateway's configuration.
    pub fn start(fleet: &Fleet, nodes: usize, gateways: usize, extra: &str) -> Cluster {
        Self::start_with(fleet, nodes, gateways, extra, true)
    }

    /// [`Self::start`]; with `spread` false every gateway names the nodes
    /// in the same order, so all sessions live on the first node.
    pub fn start_with(
        fleet: &Fleet,
        nodes: usize,
        gateways: usize,
        extra: &str,
        spread: bool,
    ) -> Cluster {
        let nats = Nats::cluster(fleet, nodes);
        let gateway_ports: Vec<(u16, u16)> =
            (0..gateways).map(|_| (free_port(), free_port())).collect();
        let port = free_port();
        let haproxy = haproxy(fleet, port, &gateway_ports);
        let mut cluster = Cluster {
            nats,
            gateways: Vec::new(),
            gateway_ports,
            haproxy,
            port,
            extra: extra.to_owned(),
            spread,
        };
        for i in 0..gateways {
            let gw = cluster.start_gateway(fleet, i);
            cluster.gateways.push(Some(gw));
        }
        cluster
    }

    /// The configuration of gateway `i`: every node, its own (`i` modulo
    /// the nodes) first unless the cluster is not spread.
    pub fn gateway_config(&self, i: usize) -> String {
        let n = self.nats.nodes.len();
        let first = if self.spread { i } else { 0 };
        let urls: Vec<String> = (0..n)
            .map(|k| {
                format!(
                    "\"mqtt://127.0.0.1:{}\"",
                    self.nats.nodes[(first + k) % n].mqtt_port
                )
            })
            .collect();
        format!(
            "broker = [{}]\nbroker_username = \"{}\"\nbroker_password = \"{}\"\n\
             broker_protocol = \"3.1.1\"\nbroker_max_qos = 1\nmetrics = \"127.0.0.1:{}\"\n{}",
            urls.join(", "),
            crate::nats::NATS_USER,
            crate::nats::NATS_PASSWORD,
            self.gateway_ports[i].1,
            self.extra
        )
    }

    /// Starts gateway `i` with a CRL file of its own (a copy of the
    /// fleet's at first start, kept across restarts): a new CRL reaches
    /// each gateway by itself, never through a file another one wrote.
    fn start_gateway(&self, fleet: &Fleet, i: usize) -> Gateway {
        let config = self.gateway_config(i);
        let crl = self.crl(fleet, i);
        if !crl.exists() {
            std::fs::copy(fleet.path("gw/crl.pem"), &crl).unwrap();
        }
        Gateway::start_with_crl(fleet, self.gateway_ports[i].0, &crl, &config)
    }

    /// Gateway `i`'s CRL file.
    pub fn crl(&self, fleet: &Fleet, i: usize) -> std::path::PathBuf {
        fleet.path(&format!("gw-{}-crl.pem", i + 1))
    }

    /// The CRL number gateway `i` has in force, from its `/metrics`.
    pub fn crl_number(&self, i: usize) -> Option<u64> {
        let addr = format!("127.0.0.1:{}", self.gateway_ports[i].1)
            .parse()
            .unwrap();
        let (_, body) = crate::gateway::http_get(addr, "/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix("twofold_gateway_crl_number "))
            .and_then(|n| n.trim().parse().ok())
    }

    /// kill -9 gateway `i`.
    pub fn kill_gateway(&mut self, i: usize) {
        if let Some(mut gw) = self.gateways[i].take() {
            gw.kill();
        }
    }

    /// Starts gateway `i` again on its ports.
    pub fn restart_gateway(&mut self, fleet: &Fleet, i: usize) {
        self.kill_gateway(i);
        self.gateways[i] = Some(self.start_gateway(fleet, i));
    }

    /// The gateways running now.
    pub fn running(&self) -> impl Iterator<Item = &Gateway> {
        self.gateways.iter().flatten()
    }
}

/// haproxy in TCP mode (TLS passes through to the gateways), balancing
/// on the fewest connections, each gateway checked on `/healthz` every
/// half second: one that is down or cannot reach its broker is taken out.
fn haproxy(fleet: &Fleet, port: u16, gateways: &[(u16, u16)]) -> Proc {
    let mut conf = format!(
        "global\n  maxconn 9000\n\
         defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 10m\n  timeout server 10m\n  \
         retries 3\n  option redispatch\n\
         frontend devices\n  bind 127.0.0.1:{port}\n  default_backend gateways\n\
         backend gateways\n  balance leastconn\n  option httpchk\n  \
         http-check send meth GET uri /healthz\n  default-server inter 500ms fall 2 rise 2\n"
    );
    for (i, (gw, metrics)) in gateways.iter().enumerate() {
        conf.push_str(&format!(
            "  server gw{} 127.0.0.1:{gw} check port {metrics}\n",
            i + 1
        ));
    }
    let path = fleet.path("haproxy.cfg");
    std::fs::write(&path, conf).unwrap();
    let mut cmd = Command::new("haproxy");
    // -db: in the foreground, logging to stderr.
    cmd.arg("-db").arg("-f").arg(&path);
    let p = spawn(cmd, fleet.path("haproxy.log"));
    wait_port(port, "haproxy");
    p
}

/// Devices simulated in this process: each runs the Linux agent's own link
/// (rumqttc over rustls, its disk queue, its default backoff) and, given
/// `every`, stores a QoS 1 telemetry sample that often, as the agent does. Their queues
/// sit where [`crate::account_telemetry`] reads them (`queue-NAME.sqlite`).
pub struct Devices {
    pub names: Vec<String>,
    /// Each device's telemetry topic, queue and link's wake-up.
    feeds: Vec<(
        String,
        twofold_agent::queue::Queue,
        std::sync::Arc<tokio::sync::Notify>,
    )>,
    runtime: tokio::runtime::Runtime,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _commands: Vec<tokio::sync::mpsc::Receiver<Vec<u8>>>,
}

impl Devices {
    /// Enrolls `n` devices `PREFIX-001`… (padded to the width of `n`) (`provisioning bulk-enroll`) and
    /// starts them against `localhost:port`.
    pub fn start(
        fleet: &Fleet,
        prefix: &str,
        n: usize,
        port: u16,
        every: Option<std::time::Duration>,
    ) -> Devices {
        use std::sync::Arc;
        use tokio::sync::{Notify, mpsc, watch};
        use twofold_agent::config::{Format, IdentityPaths};
        use twofold_agent::{identity, link::Link, queue::Queue, renew::Renewal, telemetry};
        use twofold_protocol::TrustDomain;

        let fds = rlimit::increase_nofile_limit(5 * n as u64 + 4096).unwrap();
        assert!(fds >= 5 * n as u64, "open files are limited to {fds}");
        let mut bulk = fleet.provisioning();
        bulk.args(["bulk-enroll", "--prefix", prefix, "--count", &n.to_string()])
            .arg("--out")
            .arg(fleet.path(prefix));
        let done = crate::process::run_bounded(bulk, 300);
        assert!(done.status.success(), "{}", crate::process::text(&done));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (stop, shutdown) = watch::channel(false);
        let (mut names, mut tasks, mut inboxes) = (Vec::new(), Vec::new(), Vec::new());
        let mut feeds = Vec::new();
        // bulk-enroll pads the numbers to the width of the last.
        let width = n.to_string().len();
        for k in 1..=n {
            let name = format!("{prefix}-{k:0width$}");
            let dir = fleet.path(&format!("{prefix}/{name}"));
            let paths = IdentityPaths {
                cert: dir.join("device.pem"),
                key: twofold_agent::config::KeyStore::File(dir.join("device.key")),
                server_ca: dir.join("server-ca.pem"),
                server_crl: Some(dir.join("server-crl.pem")),
                server_crl_required: true,
            };
            let identity = identity::load(&paths).unwrap();
            let renewal = Renewal::new(
                &paths,
                identity.id,
                TrustDomain::parse(crate::fleet::TD).unwrap(),
            );
            let queue = Queue::open(&fleet.path(&format!("queue-{name}.sqlite")), 100_000).unwrap();
            let wake = Arc::new(Notify::new());
            let (commands, inbox) = mpsc::channel(1);
            inboxes.push(inbox);
            let topic = format!("devices/{name}/telemetry");
            feeds.push((topic.clone(), queue.clone(), wake.clone()));
            let link = Link {
                tls: watch::channel(identity.tls.clone()).1,
                identity,
                host: "localhost".into(),
                port,
                keep_alive: std::time::Duration::from_secs(30),
                queue: queue.clone(),
                wake: wake.clone(),
                // The agent's defaults ([reconnect] in agent.example.toml).
                reconnect_min: std::time::Duration::from_secs(1),
                reconnect_max: std::time::Duration::from_secs(300),
                refused_wait: std::time::Duration::from_secs(3600),
                cert_path: paths.cert.clone(),
                commands,
                renewal: Arc::new(renewal),
            };
            let run = link.run(shutdown.clone());
            tasks.push(runtime.spawn(async move {
                run.await;
            }));
            names.push(name);
            let Some(every) = every else {
                continue;
            };
            let mut stopped = shutdown.clone();
            tasks.push(runtime.spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stopped.changed() => return,
                    }
                    let (queue, topic) = (queue.clone(), topic.clone());
                    let pushed = tokio::task::spawn_blocking(move || {
                        queue.push_with(&topic, Some("telemetry"), |seq| {
                            telemetry::encode(seq, None, &[], Format::Postcard)
                        })
                    })
                    .await;
                    if matches!(pushed, Ok(Ok(_))) {
                        wake.notify_one();
                    }
                }
            }));
        }
        Devices {
            names,
            feeds,
            runtime,
            stop,
            tasks,
            _commands: inboxes,
        }
    }

    /// Stores `k` telemetry samples in every device's queue at once and
    /// wakes its link: a burst of QoS 1 PUBLISHes.
    pub fn burst(&self, k: usize) {
        use twofold_agent::{config::Format, telemetry};
        for (topic, queue, wake) in &self.feeds {
            for _ in 0..k {
                queue
                    .push_with(topic, Some("telemetry"), |seq| {
                        telemetry::encode(seq, None, &[], Format::Postcard)
                    })
                    .unwrap();
            }
            wake.notify_one();
        }
    }

    /// Stops sampling and every link (at most 10 s).
    pub fn stop(self) {
        let _ = self.stop.send(true);
        let tasks = self.tasks;
        self.runtime.block_on(async {
            let all = async {
                for t in tasks {
                    let _ = t.await;
                }
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), all).await;
        });
        self.runtime
            .shutdown_timeout(std::time::Duration::from_secs(1));
    }
}
