//! Pushing the device CA's CRL to every gateway at once: a retained QoS 1
//! PUBLISH on the broker the gateways relay to ([`TOPIC`]). Each gateway
//! listens there, checks the CRL (signed by its client CA, newer than its
//! own) and closes the revoked sessions; the broker keeps the message, so
//! a gateway that starts later gets it too (NATS: in a JetStream stream).
//! `mqtts://` pushes over TLS, trusting only the CA given for the broker,
//! with a client certificate when the broker asks for one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Outgoing, Packet, QoS};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub use twofold_protocol::topic::CRL as TOPIC;

/// How long one broker node has to take the CRL.
const PUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and as whom to push. (Its `Debug` leaves the password out.)
#[derive(Clone)]
pub struct Target {
    /// `mqtt://host:port` or `mqtts://host:port`, the nodes of one
    /// broker: tried in order until one acknowledges.
    pub urls: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// For `mqtts://`: the CA certificates the broker's certificate must
    /// chain to (DER).
    pub ca: Vec<CertificateDer<'static>>,
    /// For `mqtts://` brokers that require a client certificate: its
    /// chain and key.
    pub identity: Option<Arc<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("urls", &self.urls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[hidden]"))
            .field("ca", &self.ca.len())
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

impl Target {
    /// The TLS client side of a push: only `ca` is trusted, and the
    /// broker's certificate must name the URL's host.
    fn tls(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        if self.ca.is_empty() {
            return Err("mqtts:// needs the broker's CA: give --push-ca FILE".into());
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in &self.ca {
            roots
                .add(cert.clone())
                .map_err(|e| format!("--push-ca: not a usable CA certificate: {e}"))?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let config = match self.identity.as_deref() {
            Some((chain, key)) => config
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(|e| format!("--push-cert/--push-key: {e}"))?,
            None => config.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }
}

/// Publishes `pem` retained on [`TOPIC`]; returns the node that
/// acknowledged it, or why none did.
pub fn crl(target: &Target, pem: &[u8]) -> Result<String, String> {
    let mut failed = Vec::new();
    for url in &target.urls {
        match push_to(url, target, pem) {
            Ok(()) => return Ok(url.clone()),
            Err(e) => failed.push(format!("{url}: {e}")),
        }
    }
    Err(failed.join("; "))
}

fn push_to(url: &str, target: &Target, pem: &[u8]) -> Result<(), String> {
    let (secure, rest) = match url.split_once("://") {
        Some(("mqtt", rest)) => (false, rest),
        Some(("mqtts", rest)) => (true, rest),
        _ => return Err("not an mqtt://HOST:PORT or mqtts://HOST:PORT URL".into()),
    };
    let (host, port) = rest
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .ok_or("not an mqtt://HOST:PORT or mqtts://HOST:PORT URL")?;
    if !secure && target.identity.is_some() {
        return Err("a client certificate (--push-cert) needs mqtts://".into());
    }
    let id = format!("twofold-provisioning-{}", std::process::id());
    let mut options = MqttOptions::new(id, host.trim_matches(['[', ']']), port);
    if secure {
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(target.tls()?),
        ));
    }
    options.set_keep_alive(Duration::from_secs(10));
    options.set_max_packet_size(64 * 1024, pem.len() + 1024);
    if let Some(user) = &target.username {
        options.set_credentials(user.clone(), target.password.clone().unwrap_or_default());
    }
    let (client, mut connection) = Client::new(options, 4);
    client
        .publish(TOPIC, QoS::AtLeastOnce, true, pem.to_vec())
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + PUSH_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match connection.recv_timeout(left) {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => break,
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack))))
                if ack.code != rumqttc::ConnectReturnCode::Success =>
            {
                return Err(format!("the broker refused the connection: {:?}", ack.code));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(refusal(&e, target.identity.is_some())),
            Err(_) => return Err(format!("no acknowledgement within {PUSH_TIMEOUT:?}")),
        }
    }
    let _ = client.disconnect();
    // Let the DISCONNECT go out.
    let deadline = Instant::now() + Duration::from_secs(1);
    while let Ok(Ok(event)) =
        connection.recv_timeout(deadline.saturating_duration_since(Instant::now()))
    {
        if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
            break;
        }
    }
    Ok(())
}

/// What went wrong, with what to do when the broker ended the TLS
/// handshake over the client certificate.
fn refusal(e: &rumqttc::ConnectionError, showed_one: bool) -> String {
    use rustls::AlertDescription as A;
    match twofold_trust::tls::alert_received(e) {
        Some(
            alert @ (A::BadCertificate
            | A::CertificateRequired
            | A::UnknownCA
            | A::CertificateUnknown
            | A::AccessDenied
            | A::HandshakeFailure),
        ) => {
            if showed_one {
                format!(
                    "the broker refused the client certificate ({alert:?}): --push-cert must come \
                     from a CA the broker trusts for clients, and be valid now"
                )
            } else {
                format!(
                    "the broker wants a client certificate ({alert:?}): give --push-cert and \
                     --push-key"
                )
            }
        }
        _ => e.to_string(),
    }
}
