//! Where sessions go: the embedded rumqttd, in process (default, see
//! [`crate::embedded`]), or an external MQTT broker over a socket.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use rustls_pki_types::ServerName;

use crate::config::ExternalTls;
pub use crate::embedded::Embedded;
use crate::tls::{TlsSetupError, load_certs, load_key};

/// The credential the gateway presents to an external broker.
#[derive(Clone)]
pub struct Credential {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}, <redacted>)", self.username)
    }
}

/// The broker the sessions go to.
#[derive(Clone, Debug)]
pub enum BrokerTarget {
    /// rumqttd's router in this process, whose departures from MQTT the
    /// sessions make up for (`session::Quirks`).
    Embedded(Embedded),
    External(External),
}

/// An external broker, reached over TCP (and TLS for `mqtts://`).
#[derive(Clone, Debug)]
pub struct External {
    /// Its nodes, tried in this order for each session: one for a single
    /// broker, several for a cluster (NATS), nearest first.
    pub nodes: Vec<Node>,
    /// Written into every forwarded CONNECT, replacing the device's own.
    pub credential: Option<Credential>,
    pub tls: Option<UpstreamTls>,
    /// It speaks MQTT 3.1.1 only (NATS): MQTT 5 sessions are carried as
    /// 3.1.1.
    pub v311_only: bool,
    /// The highest QoS it takes.
    pub max_qos: u8,
}

/// One node of an external broker.
#[derive(Clone, Debug)]
pub struct Node {
    pub addr: SocketAddr,
    /// The name its certificate must carry (`mqtts://`): the URL's host.
    pub server_name: ServerName<'static>,
}

impl External {
    /// What the sessions must make up for at this broker.
    pub fn quirks(&self) -> crate::session::Quirks {
        crate::session::Quirks {
            v311_only: self.v311_only,
            max_qos: self.max_qos,
            ..crate::session::Quirks::NONE
        }
    }
}

impl BrokerTarget {
    /// Whether the broker can take sessions now: the router thread runs,
    /// or a node of the external broker accepts a TCP connection within a
    /// second.
    pub async fn reachable(&self) -> bool {
        match self {
            BrokerTarget::Embedded(embedded) => embedded.is_running(),
            BrokerTarget::External(external) => {
                for node in &external.nodes {
                    let tried = tokio::time::timeout(
                        std::time::Duration::from_secs(1),
                        tokio::net::TcpStream::connect(node.addr),
                    )
                    .await;
                    if matches!(tried, Ok(Ok(_))) {
                        return true;
                    }
                }
                false
            }
        }
    }
}

/// How the gateway speaks TLS to an external broker.
#[derive(Clone)]
pub struct UpstreamTls {
    pub connector: tokio_rustls::TlsConnector,
    /// The same, for the CRL feed's client.
    pub config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpstreamTls")
    }
}

/// Builds the TLS client side for an external broker: trusts only the
/// configured CA, checks the broker's name, and presents a client
/// certificate when one is configured.
pub fn upstream_tls(tls: &ExternalTls) -> Result<UpstreamTls, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in load_certs(&tls.ca)? {
        roots.add(ca).map_err(|e| TlsSetupError::File {
            path: tls.ca.clone(),
            detail: format!("not a usable CA certificate: {e}"),
        })?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsSetupError::Rustls(e.to_string()))?
        .with_root_certificates(roots);
    let config = match &tls.identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| TlsSetupError::File {
                path: key.clone(),
                detail: format!("does not match {}: {e}", cert.display()),
            })?,
    };
    let config = Arc::new(config);
    Ok(UpstreamTls {
        connector: tokio_rustls::TlsConnector::from(config.clone()),
        config,
    })
}

/// Limits of the embedded broker.
#[derive(Clone, Debug)]
pub struct EmbeddedLimits {
    pub max_connections: usize,
    pub max_payload_size: usize,
    /// Per topic, rumqttd keeps an in-memory log of at most
    /// `segment_size × segment_count` bytes; this bounds memory per device.
    pub segment_size: usize,
    pub segment_count: usize,
    /// The same for the fan-in filters backend services subscribe to
    /// (`devices/+/telemetry` and the like), which carry every device's
    /// traffic: a subscriber that falls further behind than this loses
    /// messages, QoS 1 included (rumqttd has no back-pressure).
    pub fan_in_segment_size: usize,
    pub fan_in_segment_count: usize,
}

impl Default for EmbeddedLimits {
    fn default() -> Self {
        EmbeddedLimits {
            max_connections: 100_000,
            max_payload_size: 256 * 1024,
            segment_size: 256 * 1024,
            segment_count: 2,
            fan_in_segment_size: 4 * 1024 * 1024,
            fan_in_segment_count: 8,
        }
    }
}

/// Errors starting the embedded broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("the embedded broker did not start: {0}")]
    Embedded(String),
}

/// The embedded router's settings.
pub fn router_config(limits: &EmbeddedLimits) -> rumqttd::RouterConfig {
    rumqttd::RouterConfig {
        max_connections: limits.max_connections,
        max_outgoing_packet_count: 256,
        max_segment_size: limits.segment_size.max(1024),
        max_segment_count: limits.segment_count.max(1),
        custom_segment: Some(fan_in_segments(limits)),
        ..Default::default()
    }
}

/// Larger logs for the filters that gather every device's messages.
fn fan_in_segments(limits: &EmbeddedLimits) -> HashMap<String, rumqttd::SegmentConfig> {
    let segment = rumqttd::SegmentConfig {
        max_segment_size: limits.fan_in_segment_size.max(1024),
        max_segment_count: limits.fan_in_segment_count.max(1),
    };
    let channels = twofold_protocol::Channel::ALL.map(|c| c.as_str());
    channels
        .iter()
        .copied()
        .chain(["#"])
        .map(|tail| {
            (
                format!("{}/+/{tail}", twofold_protocol::topic::DEVICES),
                segment.clone(),
            )
        })
        .collect()
}
