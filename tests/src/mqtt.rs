//! mosquitto and its command-line clients.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use twofold_protocol::message::{self, Command as Cmd, Reply, ReplyStatus};

use crate::fleet::{Fleet, Identity};
use crate::gateway::Gateway;
use crate::process::{Proc, free_port, run_bounded, spawn, wait_port, wait_until};

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Starts mosquitto on a free loopback port with `conf` appended to its
/// configuration; returns it and the port.
pub fn mosquitto(fleet: &Fleet, conf: &str) -> (Proc, u16) {
    let port = free_port();
    let path = fleet.path(&format!("mosquitto-{port}.conf"));
    // Started as root, mosquitto drops to `user`; it must be able to read
    // the test's (0700) temporary directory, so it stays the current user.
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

/// mosquitto refusing anonymous clients, with one user `user`/`password`.
pub fn mosquitto_with_password(fleet: &Fleet, user: &str, password: &str) -> (Proc, u16) {
    let passwords = fleet.path(&format!("passwd-{user}"));
    std::fs::write(&passwords, "").unwrap();
    let made = Command::new("mosquitto_passwd")
        .arg("-b")
        .arg(&passwords)
        .args([user, password])
        .status()
        .expect("mosquitto_passwd (Debian package mosquitto)");
    assert!(made.success(), "mosquitto_passwd failed");
    mosquitto(
        fleet,
        &format!(
            "allow_anonymous false\npassword_file {}\n",
            passwords.display()
        ),
    )
}

/// mosquitto with mutual TLS: it presents the gateway's certificate (it
/// names localhost), requires a client certificate from the device CA and
/// takes the certificate's CN as the user name.
pub fn mosquitto_mtls(fleet: &Fleet) -> (Proc, u16) {
    mosquitto(
        fleet,
        &format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\n",
            fleet.path("openssl-client-ca.pem").display(),
            fleet.path("gw/gateway.pem").display(),
            fleet.path("gw/gateway.key").display(),
        ),
    )
}

/// mosquitto_sub/pub arguments for a TLS client of `localhost:port` with
/// `who`'s certificate.
pub fn tls_args(fleet: &Fleet, port: u16, who: &Identity) -> Vec<String> {
    vec![
        "-h".into(),
        "localhost".into(),
        "-p".into(),
        port.to_string(),
        "--cafile".into(),
        fleet.path("openssl-ca.pem").display().to_string(),
        "--cert".into(),
        who.cert.display().to_string(),
        "--key".into(),
        who.key.display().to_string(),
    ]
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

/// Starts mosquitto_sub on the gateway in the background; read its output
/// with [`crate::finish`].
pub fn mosquitto_sub(fleet: &Fleet, gw: &Gateway, who: &Identity, args: &[&str]) -> Child {
    Command::new("mosquitto_sub")
        .args(tls_args(fleet, gw.addr.port(), who))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (Debian package mosquitto-clients)")
}

/// A background mosquitto_sub writing `topic payload-as-hex` lines to a
/// file, for tests that read what arrived while it keeps running.
pub struct Sub {
    pub proc: Proc,
    pub out: PathBuf,
}

impl Sub {
    /// Starts it and waits (at most 20 s) for its SUBACK, so nothing
    /// published afterwards can be missed for want of a subscription.
    pub fn start(fleet: &Fleet, args: &[&str], name: &str) -> Sub {
        let out = fleet.path(&format!("sub-{name}.out"));
        let log = fleet.path(&format!("sub-{name}.log"));
        // Line-buffered, so the SUBACK line reaches the file at once
        // (mosquitto_sub flushes after messages but not after debug lines).
        let child = Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub"])
            .args(args)
            // -d prints the protocol exchange (the SUBACK) to stdout too;
            // those lines are not `topic hex` and `messages` skips them.
            .args(["-F", "%t %x", "-d"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("mosquitto_sub (Debian package mosquitto-clients)");
        let mut sub = Sub {
            proc: Proc { child, log },
            out,
        };
        let subscribed = wait_until(20, || {
            if let Ok(Some(status)) = sub.proc.child.try_wait() {
                panic!("mosquitto_sub exited ({status}):\n{}", sub.proc.log());
            }
            std::fs::read_to_string(&sub.out).is_ok_and(|t| t.contains("received SUBACK"))
        });
        assert!(
            subscribed,
            "mosquitto_sub got no SUBACK:\n{}",
            sub.proc.log()
        );
        sub
    }

    /// A subscriber of `localhost:port` with `who`'s certificate and
    /// further mosquitto_sub arguments (client id, topics, QoS).
    pub fn start_tls(fleet: &Fleet, port: u16, who: &Identity, name: &str, args: &[&str]) -> Sub {
        let mut all = tls_args(fleet, port, who);
        all.extend(args.iter().map(|a| a.to_string()));
        Self::start(
            fleet,
            &all.iter().map(String::as_str).collect::<Vec<_>>(),
            name,
        )
    }

    /// What an operator's backend watches: `who`'s QoS 1 subscription,
    /// client id `name`, to telemetry and replies of `device` (`+` for all).
    pub fn telemetry_and_replies(
        fleet: &Fleet,
        port: u16,
        who: &Identity,
        name: &str,
        device: &str,
    ) -> Sub {
        let telemetry = format!("devices/{device}/telemetry");
        let replies = format!("devices/{device}/replies");
        Self::start_tls(
            fleet,
            port,
            who,
            name,
            &["-i", name, "-q", "1", "-t", &telemetry, "-t", &replies],
        )
    }

    /// Every (topic, payload) so far.
    pub fn messages(&self) -> Vec<(String, Vec<u8>)> {
        read_hex_lines(&self.out)
    }

    /// The highest telemetry sequence number received from each device.
    pub fn latest_telemetry(&self) -> BTreeMap<String, u64> {
        let mut latest = BTreeMap::new();
        for (topic, payload) in self.messages() {
            let Some(device) = topic
                .strip_prefix("devices/")
                .and_then(|t| t.strip_suffix("/telemetry"))
            else {
                continue;
            };
            let seq = message::decode::<twofold_protocol::message::Telemetry>(&payload)
                .expect("telemetry decodes")
                .seq;
            let e = latest.entry(device.to_owned()).or_insert(seq);
            *e = (*e).max(seq);
        }
        latest
    }

    /// Waits (at most `secs`) until nothing has arrived for a second, so
    /// that what the broker acknowledged to publishers has also reached
    /// this subscriber's output.
    pub fn settle(&self, secs: u64) {
        let mut last = (self.messages().len(), std::time::Instant::now());
        wait_until(secs, || {
            let n = self.messages().len();
            if n != last.0 {
                last = (n, std::time::Instant::now());
            }
            last.1.elapsed() >= std::time::Duration::from_secs(1)
        });
    }
}

fn read_hex_lines(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    text.lines()
        .filter_map(|l| {
            let (t, hex) = l.split_once(' ').unwrap_or((l, ""));
            Some((t.to_owned(), hex::decode(hex).ok()?))
        })
        .collect()
}

/// Sends the postcard command `id` `name` `body` to `device` as the `ops`
/// service.
pub fn send_command(
    fleet: &Fleet,
    port: u16,
    ops: &Identity,
    device: &str,
    id: u32,
    name: &str,
    body: &[u8],
) {
    let cmd = Cmd { id, name, body };
    let mut buf = [0u8; 512];
    let bytes = message::encode(&cmd, &mut buf).unwrap();
    let file = fleet.path(&format!("command-{}.bin", cmd.id));
    std::fs::write(&file, bytes).unwrap();
    let mut pubc = Command::new("mosquitto_pub");
    pubc.args(tls_args(fleet, port, ops))
        .args(["-i", "ops-commands", "-q", "1", "-t"])
        .arg(format!("devices/{device}/commands"))
        .arg("-f")
        .arg(&file);
    let out = run_bounded(pubc, 10);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The replies `sub` has seen, by command id.
pub fn replies(sub: &Sub) -> BTreeMap<u32, (ReplyStatus, Option<i32>, Vec<u8>)> {
    sub.messages()
        .iter()
        .filter(|(t, _)| t.ends_with("/replies"))
        .filter_map(|(_, p)| {
            let r: Reply = message::decode(p).ok()?;
            Some((r.id, (r.status, r.exit_code, r.output.to_vec())))
        })
        .collect()
}

/// A broker behind the gateway that outlives it: mosquitto with the user
/// `gw`, and a backend's QoS 1 subscriber to `filter` connected to it
/// directly, so that killing the gateway leaves both standing.
pub struct Relay {
    pub broker: Proc,
    pub sub: Sub,
    /// The gateway's configuration lines that relay to this broker.
    pub config: String,
}

impl Relay {
    pub fn start(fleet: &Fleet, filter: &str, name: &str) -> Relay {
        let (broker, port) = mosquitto_with_password(fleet, "gw", "pw");
        let port_arg = port.to_string();
        let args = [
            "-h",
            "127.0.0.1",
            "-p",
            &port_arg,
            "-u",
            "gw",
            "-P",
            "pw",
            "-q",
            "1",
            "-t",
            filter,
        ];
        let sub = Sub::start(fleet, &args, name);
        let config = format!(
            "broker = \"mqtt://127.0.0.1:{port}\"\nbroker_username = \"gw\"\nbroker_password = \"pw\""
        );
        Relay {
            broker,
            sub,
            config,
        }
    }
}
