//! Where relayed sessions go: an embedded rumqttd on loopback (default), or
//! an external MQTT broker.
//!
//! The embedded broker listens only on 127.0.0.1 and accepts a CONNECT
//! only with a random credential made at start-up, which the gateway
//! writes into every CONNECT it forwards. A local process that connects to
//! the loopback port directly is refused: it does not know the credential.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand_core::RngCore;
use rustls_pki_types::ServerName;

use crate::config::ExternalTls;
use crate::tls::{TlsSetupError, load_certs, load_key};

/// The credential the gateway presents to the broker.
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

/// A broker the sessions are relayed to.
#[derive(Clone, Debug)]
pub struct BrokerTarget {
    /// Listener for MQTT 3.1.1 sessions.
    pub v4: SocketAddr,
    /// Listener for MQTT 5 sessions (the same as `v4` for most brokers).
    pub v5: SocketAddr,
    /// Written into every forwarded CONNECT, replacing the device's own.
    pub credential: Option<Credential>,
    /// TLS towards the broker, for `mqtts://`.
    pub tls: Option<UpstreamTls>,
    /// The embedded rumqttd, whose departures from MQTT the sessions
    /// make up for (`session::Quirks`).
    pub embedded: bool,
}

/// How the gateway speaks TLS to an external broker.
#[derive(Clone)]
pub struct UpstreamTls {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UpstreamTls({:?})", self.server_name)
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
    let server_name = ServerName::try_from(tls.server_name.clone()).map_err(|e| {
        TlsSetupError::Rustls(format!(
            "broker: {:?} is not a valid server name: {e}",
            tls.server_name
        ))
    })?;
    Ok(UpstreamTls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        server_name,
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
    #[error("cannot find a free loopback port for the embedded broker: {0}")]
    NoPort(std::io::Error),
    #[error("the embedded broker did not start listening on {0} within 10 s")]
    NotListening(SocketAddr),
}

fn free_loopback_port() -> Result<SocketAddr, BrokerError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(BrokerError::NoPort)?;
    listener.local_addr().map_err(BrokerError::NoPort)
}

fn random_token() -> String {
    let mut bytes = [0u8; 24];
    rand_core::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Starts rumqttd in this process on two free loopback ports (3.1.1 and 5)
/// and returns where to reach it. Its threads live as long as the process.
pub fn start_embedded(limits: &EmbeddedLimits) -> Result<BrokerTarget, BrokerError> {
    let credential = Credential {
        username: "twofold-gateway".into(),
        password: random_token(),
    };
    let v4 = free_loopback_port()?;
    let v5 = free_loopback_port()?;
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: limits.max_payload_size,
        max_inflight_count: 256,
        auth: Some(HashMap::from([(
            credential.username.clone(),
            credential.password.clone(),
        )])),
        external_auth: None,
        // Devices publish to their own topics, which nobody may have
        // subscribed to yet; without this rumqttd disconnects them.
        dynamic_filters: true,
    };
    let server = |name: &str, listen: SocketAddr| rumqttd::ServerSettings {
        name: name.into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: connections.clone(),
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: limits.max_connections,
            max_outgoing_packet_count: 256,
            max_segment_size: limits.segment_size.max(1024),
            max_segment_count: limits.segment_count.max(1),
            custom_segment: Some(fan_in_segments(limits)),
            ..Default::default()
        },
        v4: Some(HashMap::from([("v4".to_owned(), server("v4", v4))])),
        v5: Some(HashMap::from([("v5".to_owned(), server("v5", v5))])),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(BrokerError::NoPort)?;
    for addr in [v4, v5] {
        wait_listening(addr)?;
    }
    tracing::info!(%v4, %v5, "embedded broker listening on loopback");
    Ok(BrokerTarget {
        v4,
        v5,
        credential: Some(credential),
        tls: None,
        embedded: true,
    })
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

fn wait_listening(addr: SocketAddr) -> Result<(), BrokerError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    // Probe by binding, not connecting: a probe connection would make
    // rumqttd log a failed CONNECT.
    while TcpListener::bind(addr).is_ok() {
        if Instant::now() > deadline {
            return Err(BrokerError::NotListening(addr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
