//! `gateway.toml`: parsed, then checked before anything listens. Every
//! error names the key and the problem.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use twofold_protocol::TrustDomain;

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub listen: Option<String>,
    pub trust_domain: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub crl: Option<PathBuf>,
    /// Where audit events go; stdout when absent.
    pub audit_log: Option<PathBuf>,
    /// Where `/metrics` and `/healthz` are served; off when absent.
    pub metrics: Option<String>,
    /// The topic policy file (TOML); the built-in policy when absent.
    pub policy: Option<PathBuf>,
    /// Group memberships for the policy, as `provisioning groups export`
    /// writes them.
    pub groups: Option<PathBuf>,
    /// `embedded` (default), `mqtt://host:port` or `mqtts://host:port`,
    /// or a list of such URLs: the nodes of one clustered broker, tried in
    /// order for each session.
    pub broker: Option<BrokerUrls>,
    pub broker_username: Option<String>,
    pub broker_password: Option<String>,
    /// For `mqtts://`: the CA that signed the broker's certificate.
    pub broker_ca: Option<PathBuf>,
    /// For `mqtts://` brokers that require a client certificate.
    pub broker_cert: Option<PathBuf>,
    pub broker_key: Option<PathBuf>,
    /// The highest MQTT the external broker speaks: `"5"` (default: each
    /// session in its device's own version) or `"3.1.1"` (NATS: MQTT 5
    /// sessions are carried as 3.1.1).
    pub broker_protocol: Option<String>,
    /// The highest QoS the external broker takes (default 2; NATS: 1).
    pub broker_max_qos: Option<u8>,
    #[serde(default)]
    pub limits: LimitsFile,
    /// The CA service devices renew through; renewal is off without it.
    pub ca_service: Option<CaServiceFile>,
    /// Admit a certificate this many seconds after it expired, to a
    /// session that may only renew (off when absent). The CA service
    /// needs its own `--expired-grace` to renew it.
    pub expired_grace_secs: Option<u64>,
}

/// One broker URL, or the nodes of a cluster.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum BrokerUrls {
    One(String),
    Nodes(Vec<String>),
}

impl From<&str> for BrokerUrls {
    fn from(url: &str) -> Self {
        BrokerUrls::One(url.to_owned())
    }
}

/// `[ca_service]`: where `provisioning serve` runs and how the gateway
/// proves its service identity to it.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaServiceFile {
    /// `host:port`; the host must be a name (or address) in the CA
    /// service's certificate.
    pub address: Option<String>,
    /// The CA that signed the CA service's certificate (the PKI's
    /// server-ca.pem).
    pub ca: Option<PathBuf>,
    /// The gateway's service certificate and key (`provisioning enroll
    /// --service NAME`), named with `--ra NAME` by the CA service.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Renew the gateway's own server certificate there, at two thirds of
    /// its life (default true).
    pub renew_server_cert: Option<bool>,
    /// Pull the device CA's CRL from there this often (default 60 s; 0:
    /// never), the safety net for a CRL push that did not arrive.
    pub crl_poll_secs: Option<u64>,
}

/// The CA service, checked.
#[derive(Clone, Debug)]
pub struct CaService {
    pub address: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub renew_server_cert: bool,
    pub crl_poll: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub handshake_timeout_secs: Option<u64>,
    pub max_concurrent_handshakes: Option<usize>,
    /// How long a handshake may be pending before, with the pool full, it
    /// is cut to make room for a newcomer.
    pub handshake_grace_secs: Option<u64>,
    /// The gateway refuses to start if it cannot have this many open files.
    pub min_open_files: Option<u64>,
    pub max_packet_size: Option<usize>,
    /// The MCU profile: the largest TLS record the gateway sends.
    pub max_tls_record: Option<usize>,
    pub embedded_segment_size: Option<usize>,
    pub embedded_segment_count: Option<usize>,
    pub embedded_fan_in_segment_size: Option<usize>,
    pub embedded_fan_in_segment_count: Option<usize>,
}

/// Where sessions are relayed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerChoice {
    Embedded,
    External {
        /// Each node as `host:port`, in the order they are tried.
        nodes: Vec<String>,
        username: Option<String>,
        password: Option<String>,
        tls: Option<ExternalTls>,
        /// The broker speaks MQTT 3.1.1 only.
        v311_only: bool,
        max_qos: u8,
    },
}

/// TLS towards an external broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalTls {
    pub ca: PathBuf,
    /// A client certificate chain and its key, if the broker asks for one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// A checked configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub trust_domain: TrustDomain,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub crl: PathBuf,
    pub audit_log: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    pub policy: Option<crate::policy::PolicyFiles>,
    pub broker: BrokerChoice,
    pub handshake_timeout: Duration,
    pub max_concurrent_handshakes: usize,
    pub handshake_grace: Duration,
    pub min_open_files: u64,
    pub max_packet_size: usize,
    pub max_tls_record: Option<usize>,
    pub embedded_segment_size: usize,
    pub embedded_segment_count: usize,
    pub embedded_fan_in_segment_size: usize,
    pub embedded_fan_in_segment_count: usize,
    pub ca_service: Option<CaService>,
    pub expired_grace: Option<Duration>,
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

fn err(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_owned(),
        problem: problem.into(),
    }
}

impl File {
    /// Reads and parses a TOML file.
    pub fn read(path: &Path) -> Result<File, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(&path.display().to_string(), e.to_string()))?;
        toml::from_str(&text).map_err(|e| {
            err(
                &path.display().to_string(),
                e.to_string().trim_end().to_owned(),
            )
        })
    }

    /// Checks every value; files must exist.
    pub fn check(self) -> Result<Config, ConfigError> {
        if let Some(g) = self.expired_grace_secs
            && !(1..=90 * 86_400).contains(&g)
        {
            return Err(err("expired_grace_secs", "must be 1 s to 90 days"));
        }
        let listen = self.listen.as_deref().unwrap_or("0.0.0.0:8883");
        let listen: SocketAddr = listen.parse().map_err(|_| {
            err(
                "listen",
                format!("{listen:?} is not an address like 0.0.0.0:8883"),
            )
        })?;
        let td = self.trust_domain.ok_or_else(|| {
            err(
                "trust_domain",
                "missing; the trust domain given to `provisioning init`",
            )
        })?;
        let trust_domain =
            TrustDomain::parse(&td).map_err(|e| err("trust_domain", format!("{td:?} {e}")))?;
        let file = |key: &str, value: Option<PathBuf>| -> Result<PathBuf, ConfigError> {
            let path = value.ok_or_else(|| {
                err(
                    key,
                    "missing; see `provisioning gateway-cert`, which writes this file",
                )
            })?;
            if !path.is_file() {
                return Err(err(
                    key,
                    format!("{} does not exist or is not a file", path.display()),
                ));
            }
            Ok(path)
        };
        let metrics = match self.metrics.as_deref() {
            None => None,
            Some(m) => Some(m.parse::<SocketAddr>().map_err(|_| {
                err(
                    "metrics",
                    format!("{m:?} is not an address like 127.0.0.1:9100"),
                )
            })?),
        };
        let cert = file("cert", self.cert)?;
        let key = file("key", self.key)?;
        let client_ca = file("client_ca", self.client_ca)?;
        let crl = file("crl", self.crl)?;
        let urls = match self.broker {
            None => Vec::new(),
            Some(BrokerUrls::One(url)) if url == "embedded" => Vec::new(),
            Some(BrokerUrls::One(url)) => vec![url],
            Some(BrokerUrls::Nodes(urls)) if urls.is_empty() => {
                return Err(err("broker", "an empty list; name at least one node"));
            }
            Some(BrokerUrls::Nodes(urls)) => urls,
        };
        let broker = match &urls[..] {
            [] => {
                for (key, set) in [
                    ("broker_username", self.broker_username.is_some()),
                    ("broker_password", self.broker_password.is_some()),
                    ("broker_ca", self.broker_ca.is_some()),
                    ("broker_cert", self.broker_cert.is_some()),
                    ("broker_key", self.broker_key.is_some()),
                    ("broker_protocol", self.broker_protocol.is_some()),
                    ("broker_max_qos", self.broker_max_qos.is_some()),
                ] {
                    if set {
                        return Err(err(
                            key,
                            "only used with an external broker (broker = \"mqtt://host:port\" or \"mqtts://host:port\")",
                        ));
                    }
                }
                BrokerChoice::Embedded
            }
            urls => {
                let bad_url = |url: &str| {
                    err(
                        "broker",
                        format!(
                            "{url:?} is neither \"embedded\" nor mqtt://HOST:PORT or mqtts://HOST:PORT"
                        ),
                    )
                };
                let mut nodes = Vec::new();
                let mut schemes = Vec::new();
                for url in urls {
                    let (secure, rest) = match url.split_once("://") {
                        Some(("mqtt", rest)) => (false, rest),
                        Some(("mqtts", rest)) => (true, rest),
                        _ => return Err(bad_url(url)),
                    };
                    rest.rsplit_once(':')
                        .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
                        .ok_or_else(|| bad_url(url))?;
                    nodes.push(rest.to_owned());
                    schemes.push(secure);
                }
                let secure = schemes[0];
                if schemes.iter().any(|s| *s != secure) {
                    return Err(err(
                        "broker",
                        "mixes mqtt:// and mqtts://; the nodes of one broker speak one",
                    ));
                }
                let tls = if secure {
                    if self.broker_ca.is_none() {
                        return Err(err(
                            "broker_ca",
                            "required with mqtts:// (the CA that signed the broker's certificate)",
                        ));
                    }
                    let ca = file("broker_ca", self.broker_ca)?;
                    let identity = match (self.broker_cert, self.broker_key) {
                        (Some(c), Some(k)) => {
                            Some((file("broker_cert", Some(c))?, file("broker_key", Some(k))?))
                        }
                        (None, None) => None,
                        (Some(_), None) => {
                            return Err(err("broker_key", "required with broker_cert"));
                        }
                        (None, Some(_)) => {
                            return Err(err("broker_cert", "required with broker_key"));
                        }
                    };
                    Some(ExternalTls { ca, identity })
                } else {
                    for (key, set) in [
                        ("broker_ca", self.broker_ca.is_some()),
                        ("broker_cert", self.broker_cert.is_some()),
                        ("broker_key", self.broker_key.is_some()),
                    ] {
                        if set {
                            return Err(err(key, "only used with mqtts://"));
                        }
                    }
                    None
                };
                let v311_only = match self.broker_protocol.as_deref() {
                    None | Some("5") => false,
                    Some("3.1.1") => true,
                    Some(other) => {
                        return Err(err(
                            "broker_protocol",
                            format!("{other:?} is neither \"5\" nor \"3.1.1\""),
                        ));
                    }
                };
                let max_qos = match self.broker_max_qos {
                    None => 2,
                    Some(q @ 0..=2) => q,
                    Some(q) => {
                        return Err(err(
                            "broker_max_qos",
                            format!("{q} is not a QoS (0, 1 or 2)"),
                        ));
                    }
                };
                BrokerChoice::External {
                    nodes,
                    username: self.broker_username,
                    password: self.broker_password,
                    tls,
                    v311_only,
                    max_qos,
                }
            }
        };
        let ca_service = match self.ca_service {
            None => None,
            Some(c) => {
                let address = c.address.ok_or_else(|| {
                    err(
                        "ca_service.address",
                        "missing; host:port of `provisioning serve`",
                    )
                })?;
                if !address
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
                {
                    return Err(err(
                        "ca_service.address",
                        format!("{address:?} is not host:port"),
                    ));
                }
                Some(CaService {
                    address,
                    ca: file("ca_service.ca", c.ca)?,
                    cert: file("ca_service.cert", c.cert)?,
                    key: file("ca_service.key", c.key)?,
                    renew_server_cert: c.renew_server_cert.unwrap_or(true),
                    crl_poll: match c.crl_poll_secs {
                        None => Some(Duration::from_secs(60)),
                        Some(0) => None,
                        Some(s) if s <= 86_400 => Some(Duration::from_secs(s)),
                        Some(s) => {
                            return Err(err(
                                "ca_service.crl_poll_secs",
                                format!("{s} is more than a day; 0 turns the pull off"),
                            ));
                        }
                    },
                })
            }
        };
        let l = self.limits;
        let handshake_timeout = l.handshake_timeout_secs.unwrap_or(10);
        if !(1..=300).contains(&handshake_timeout) {
            return Err(err("limits.handshake_timeout_secs", "must be 1 to 300"));
        }
        let max_concurrent_handshakes = l.max_concurrent_handshakes.unwrap_or(256);
        if max_concurrent_handshakes == 0 {
            return Err(err(
                "limits.max_concurrent_handshakes",
                "must be at least 1",
            ));
        }
        let handshake_grace = l.handshake_grace_secs.unwrap_or(3.min(handshake_timeout));
        if !(1..=handshake_timeout).contains(&handshake_grace) {
            return Err(err(
                "limits.handshake_grace_secs",
                format!("must be 1 to handshake_timeout_secs ({handshake_timeout})"),
            ));
        }
        let max_packet_size = l.max_packet_size.unwrap_or(256 * 1024);
        if !(128..=256 * 1024 * 1024).contains(&max_packet_size) {
            return Err(err(
                "limits.max_packet_size",
                "must be 128 bytes to 256 MiB",
            ));
        }
        if let Some(r) = l.max_tls_record
            && !(512..=16384).contains(&r)
        {
            return Err(err("limits.max_tls_record", "must be 512 to 16384 bytes"));
        }
        let embedded_segment_size = l.embedded_segment_size.unwrap_or(256 * 1024);
        if embedded_segment_size < 1024 {
            return Err(err(
                "limits.embedded_segment_size",
                "must be at least 1024 bytes",
            ));
        }
        let embedded_segment_count = l.embedded_segment_count.unwrap_or(2);
        if embedded_segment_count == 0 {
            return Err(err("limits.embedded_segment_count", "must be at least 1"));
        }
        let embedded_fan_in_segment_size =
            l.embedded_fan_in_segment_size.unwrap_or(4 * 1024 * 1024);
        if embedded_fan_in_segment_size < 1024 {
            return Err(err(
                "limits.embedded_fan_in_segment_size",
                "must be at least 1024 bytes",
            ));
        }
        let embedded_fan_in_segment_count = l.embedded_fan_in_segment_count.unwrap_or(8);
        if embedded_fan_in_segment_count == 0 {
            return Err(err(
                "limits.embedded_fan_in_segment_count",
                "must be at least 1",
            ));
        }
        let policy = match (self.policy, self.groups) {
            (Some(policy), groups) => Some(crate::policy::PolicyFiles { policy, groups }),
            (None, None) => None,
            (None, Some(_)) => {
                return Err(err(
                    "groups",
                    "is read only with a policy file: give policy = \"policy.toml\" too",
                ));
            }
        };
        Ok(Config {
            listen,
            trust_domain,
            cert,
            key,
            client_ca,
            crl,
            audit_log: self.audit_log,
            metrics,
            policy,
            broker,
            handshake_timeout: Duration::from_secs(handshake_timeout),
            max_concurrent_handshakes,
            handshake_grace: Duration::from_secs(handshake_grace),
            min_open_files: l.min_open_files.unwrap_or(4096),
            max_packet_size,
            max_tls_record: l.max_tls_record,
            embedded_segment_size,
            embedded_segment_count,
            embedded_fan_in_segment_size,
            embedded_fan_in_segment_count,
            ca_service,
            expired_grace: self.expired_grace_secs.map(Duration::from_secs),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<File, ConfigError> {
        toml::from_str(text).map_err(|e| err("file", e.to_string()))
    }

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../gateway.example.toml");
        let file: File = toml::from_str(text).unwrap();
        assert_eq!(file.trust_domain.as_deref(), Some("iot.example.com"));
        assert_eq!(file.limits.max_concurrent_handshakes, Some(256));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = parse("listen = \"x\"\ntrust_domian = \"a\"\n").unwrap_err();
        assert!(e.problem.contains("trust_domian"), "{e}");
        let e = File {
            listen: Some("nope".into()),
            ..File::default()
        }
        .check()
        .unwrap_err();
        assert_eq!(e.key, "listen");
        let e = File {
            trust_domain: Some("Bad/TD".into()),
            ..File::default()
        }
        .check()
        .unwrap_err();
        assert_eq!(e.key, "trust_domain");
        let e = File {
            trust_domain: Some("iot.example".into()),
            cert: Some("/nonexistent".into()),
            ..File::default()
        }
        .check()
        .unwrap_err();
        assert_eq!(e.key, "cert");
        assert!(e.problem.contains("/nonexistent does not exist"), "{e}");
        let e = File {
            expired_grace_secs: Some(0),
            ..File::default()
        }
        .check()
        .unwrap_err();
        assert_eq!(e.key, "expired_grace_secs");
    }

    #[test]
    fn external_broker_keys_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let f = |name: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, "x").unwrap();
            Some(p)
        };
        let base = || File {
            trust_domain: Some("iot.example".into()),
            cert: f("cert"),
            key: f("key"),
            client_ca: f("ca"),
            crl: f("crl"),
            ..File::default()
        };
        let check = |edit: &dyn Fn(&mut File)| {
            let mut file = base();
            edit(&mut file);
            file.check()
        };
        let e = check(&|c| c.broker = Some(BrokerUrls::from("http://x:1"))).unwrap_err();
        assert_eq!(e.key, "broker");
        let e = check(&|c| c.broker = Some(BrokerUrls::from("mqtt://:1883"))).unwrap_err();
        assert_eq!(e.key, "broker");
        let e = check(&|c| c.broker = Some(BrokerUrls::from("mqtts://b:8883"))).unwrap_err();
        assert_eq!(e.key, "broker_ca");
        assert!(e.problem.contains("required"), "{e}");
        let e = check(&|c| {
            c.broker = Some(BrokerUrls::from("mqtt://b:1883"));
            c.broker_ca = f("bca");
        })
        .unwrap_err();
        assert_eq!(e.key, "broker_ca");
        let e = check(&|c| c.broker_username = Some("u".into())).unwrap_err();
        assert_eq!(e.key, "broker_username");
        let e = check(&|c| c.broker_protocol = Some("3.1.1".into())).unwrap_err();
        assert_eq!(e.key, "broker_protocol");
        let e = check(&|c| {
            c.broker = Some(BrokerUrls::from("mqtt://b:1883"));
            c.broker_protocol = Some("3".into());
        })
        .unwrap_err();
        assert_eq!(e.key, "broker_protocol");
        assert!(e.problem.contains("neither \"5\" nor \"3.1.1\""), "{e}");
        let e = check(&|c| {
            c.broker = Some(BrokerUrls::from("mqtt://b:1883"));
            c.broker_max_qos = Some(3);
        })
        .unwrap_err();
        assert_eq!(e.key, "broker_max_qos");
        let ok = check(&|c| {
            c.broker = Some(BrokerUrls::from("mqtt://b:1883"));
            c.broker_protocol = Some("3.1.1".into());
            c.broker_max_qos = Some(1);
        })
        .unwrap();
        assert!(matches!(
            ok.broker,
            BrokerChoice::External {
                v311_only: true,
                max_qos: 1,
                ..
            }
        ));
        let e = check(&|c| {
            c.broker = Some(BrokerUrls::from("mqtts://b:8883"));
            c.broker_ca = f("bca");
            c.broker_cert = f("bcert");
        })
        .unwrap_err();
        assert_eq!(e.key, "broker_key");

        let ok = check(&|c| {
            c.broker = Some(BrokerUrls::from("mqtts://broker.internal:8883"));
            c.broker_ca = f("bca");
            c.broker_cert = f("bcert");
            c.broker_key = f("bkey");
        })
        .unwrap();
        let BrokerChoice::External { nodes, tls, .. } = ok.broker else {
            panic!("external expected");
        };
        assert_eq!(nodes, ["broker.internal:8883"]);
        assert!(tls.unwrap().identity.is_some());
        // The nodes of a cluster, in order; one scheme for all.
        let ok = check(&|c| {
            c.broker = Some(BrokerUrls::Nodes(vec![
                "mqtt://127.0.0.1:1883".into(),
                "mqtt://127.0.0.1:1884".into(),
            ]))
        })
        .unwrap();
        let BrokerChoice::External { nodes, .. } = ok.broker else {
            panic!("external expected");
        };
        assert_eq!(nodes, ["127.0.0.1:1883", "127.0.0.1:1884"]);
        let e = check(&|c| {
            c.broker = Some(BrokerUrls::Nodes(vec![
                "mqtt://127.0.0.1:1883".into(),
                "mqtts://127.0.0.1:1884".into(),
            ]))
        })
        .unwrap_err();
        assert!(e.problem.contains("mixes"), "{e}");
        let e = check(&|c| c.broker = Some(BrokerUrls::Nodes(Vec::new()))).unwrap_err();
        assert!(e.problem.contains("empty"), "{e}");
        let ok = check(&|c| c.broker = Some(BrokerUrls::from("mqtt://127.0.0.1:1883"))).unwrap();
        assert!(matches!(
            ok.broker,
            BrokerChoice::External { tls: None, .. }
        ));
    }
}
