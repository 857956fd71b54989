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
    /// `embedded` (default) or `mqtt://host:port`.
    pub broker: Option<String>,
    pub broker_username: Option<String>,
    pub broker_password: Option<String>,
    #[serde(default)]
    pub limits: LimitsFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub handshake_timeout_secs: Option<u64>,
    pub max_concurrent_handshakes: Option<usize>,
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
        addr: String,
        username: Option<String>,
        password: Option<String>,
    },
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
    pub broker: BrokerChoice,
    pub handshake_timeout: Duration,
    pub max_concurrent_handshakes: usize,
    pub max_packet_size: usize,
    pub max_tls_record: Option<usize>,
    pub embedded_segment_size: usize,
    pub embedded_segment_count: usize,
    pub embedded_fan_in_segment_size: usize,
    pub embedded_fan_in_segment_count: usize,
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
        let broker = match self.broker.as_deref() {
            None | Some("embedded") => {
                if self.broker_username.is_some() || self.broker_password.is_some() {
                    return Err(err(
                        "broker_username",
                        "only used with an external broker (broker = \"mqtt://host:port\")",
                    ));
                }
                BrokerChoice::Embedded
            }
            Some(url) => {
                let addr = url
                    .strip_prefix("mqtt://")
                    .filter(|a| {
                        a.rsplit_once(':').is_some_and(|(h, p)| {
                            !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0)
                        })
                    })
                    .ok_or_else(|| {
                        err(
                            "broker",
                            format!("{url:?} is neither \"embedded\" nor mqtt://HOST:PORT"),
                        )
                    })?;
                BrokerChoice::External {
                    addr: addr.to_owned(),
                    username: self.broker_username,
                    password: self.broker_password,
                }
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
        Ok(Config {
            listen,
            trust_domain,
            cert,
            key,
            client_ca,
            crl,
            audit_log: self.audit_log,
            metrics,
            broker,
            handshake_timeout: Duration::from_secs(handshake_timeout),
            max_concurrent_handshakes,
            max_packet_size,
            max_tls_record: l.max_tls_record,
            embedded_segment_size,
            embedded_segment_count,
            embedded_fan_in_segment_size,
            embedded_fan_in_segment_count,
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
    }
}
