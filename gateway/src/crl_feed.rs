//! New CRLs from elsewhere than the file, so that a revocation reaches
//! every gateway of a cluster without anyone copying files:
//!
//! - pushed on the broker: `provisioning revoke … --push` publishes the
//!   CRL as a retained QoS 1 message on [`TOPIC`]. NATS keeps retained
//!   messages in a replicated JetStream stream, so a gateway that starts
//!   (or reconnects) late gets the newest at once;
//! - pulled from the CA service (`GET /v1/crl` with an ETag) every
//!   `crl_poll_secs`, the safety net for a lost push.
//!
//! Either way the CRL is checked as a file reload checks it (signed by a
//! client CA, numbers never going back, CA by CA) and, if it is newer
//! than the one in force, written into the gateway's `crl` file and
//! reloaded at once. One path for every CRL, and a restart begins from
//! the newest the gateway has seen.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{Notify, watch};

use crate::broker::{Credential, External};
use crate::revocation::RevocationList;
use crate::tls::TlsContext;

/// Where CRLs are pushed: retained, QoS 1.
pub use twofold_protocol::topic::CRL as TOPIC;

/// The largest CRL taken from the broker or the CA service: about 25,000
/// revoked certificates.
pub const MAX_CRL: usize = 1024 * 1024;

/// What became of an offered CRL.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    /// Newer: written to the `crl` file and reloaded.
    Installed(Option<u64>),
    /// The CRLs in force already.
    Same,
    Refused(String),
}

/// Takes CRLs offered by the broker or the CA service.
#[derive(Clone)]
pub struct Feed {
    /// The gateway's `crl` file.
    pub crl: PathBuf,
    pub live: watch::Receiver<Arc<TlsContext>>,
    /// Tells the file watcher to reload now.
    pub reload: Arc<Notify>,
}

impl Feed {
    /// Checks `pem` against the CRLs in force and installs it if newer.
    pub fn offer(&self, pem: &[u8]) -> Offer {
        let current = self.live.borrow().clone();
        let staged = twofold_trust::files::beside(&self.crl, ".feed");
        if let Err(e) = twofold_trust::files::replace(&staged, pem, 0o644) {
            return Offer::Refused(format!("cannot stage it at {}: {e}", staged.display()));
        }
        let judged = judge(&staged, &current.client_cas, &current.revocations);
        let _ = twofold_trust::files::remove(&staged);
        let number = match judged {
            Offer::Installed(number) => number,
            other => return other,
        };
        if let Err(e) = twofold_trust::files::replace(&self.crl, pem, 0o644) {
            return Offer::Refused(format!("cannot write {}: {e}", self.crl.display()));
        }
        self.reload.notify_one();
        Offer::Installed(number)
    }

    fn take(&self, pem: &[u8], from: &str) {
        match self.offer(pem) {
            Offer::Installed(number) => {
                tracing::info!(from, crl_number = ?number, "new CRL taken");
            }
            Offer::Same => tracing::debug!(from, "CRL already in force"),
            Offer::Refused(why) => {
                tracing::error!(from, error = %why, "REFUSED a CRL; the one in force stays");
            }
        }
    }
}

/// What to do with the CRLs at `staged`, given the client CAs and the CRLs
/// in force: install them (newer), nothing (the same, or not newer), or
/// refuse them (unsigned, a number going back, …: [`RevocationList::load`]).
fn judge(
    staged: &std::path::Path,
    client_cas: &[rustls_pki_types::CertificateDer<'static>],
    current: &RevocationList,
) -> Offer {
    let next = match RevocationList::load(staged, client_cas, Some(current)) {
        Ok(next) => next,
        Err(e) => return Offer::Refused(e.to_string()),
    };
    if next.ders == current.ders {
        return Offer::Same;
    }
    // Newer only: an older CRL that is still valid (the same numbers CA by
    // CA, say a pull that arrives after the push) changes nothing.
    if next.number.is_some() && next.number <= current.number {
        return Offer::Same;
    }
    Offer::Installed(next.number)
}

/// Listens for pushed CRLs on the external broker, reconnecting on its own
/// (unlike a device's session, this connection is the gateway's), to each
/// node in turn.
pub async fn listen(feed: Feed, broker: External) {
    let mut backoff = Duration::from_millis(500);
    let mut turn = 0usize;
    loop {
        let node = &broker.nodes[turn % broker.nodes.len()];
        turn += 1;
        let mut options =
            MqttOptions::new(client_id(), node.addr.ip().to_string(), node.addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_session(true);
        options.set_max_packet_size(MAX_CRL + 1024, 64 * 1024);
        if let Some(Credential { username, password }) = &broker.credential {
            options.set_credentials(username.clone(), password.clone());
        }
        if let Some(tls) = &broker.tls {
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.config.clone()),
            ));
        }
        let (client, mut events) = AsyncClient::new(options, 4);
        // Sent once the connection is up; again on each new connection.
        let _ = client.subscribe(TOPIC, QoS::AtLeastOnce).await;
        loop {
            match events.poll().await {
                // A broker can refuse the subscription while its storage
                // is not ready (NATS while JetStream elects a leader):
                // then nothing would ever arrive, so start over.
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        tracing::warn!(broker = %node.addr, topic = TOPIC, "the broker refused the CRL subscription; retrying");
                        break;
                    }
                    tracing::info!(broker = %node.addr, topic = TOPIC, "listening for CRLs");
                    backoff = Duration::from_millis(500);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let feed = feed.clone();
                    let _ =
                        tokio::task::spawn_blocking(move || feed.take(&p.payload, "broker")).await;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(broker = %node.addr, error = %e, "CRL feed lost; reconnecting");
                    break;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Pulls the CRL from the CA service every `every`, asking with the ETag
/// of the last answer so that an unchanged CRL costs a 304.
pub async fn poll(feed: Feed, ca: Arc<crate::renewal::CaClient>, every: Duration) {
    let mut etag: Option<String> = None;
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match ca.crl(etag.as_deref()).await {
            Ok(None) => {}
            Ok(Some((tag, pem))) => {
                etag = tag;
                let feed = feed.clone();
                let _ = tokio::task::spawn_blocking(move || feed.take(&pem, "ca-service")).await;
            }
            Err(e) => tracing::warn!(error = %e, "cannot pull the CRL from the CA service"),
        }
    }
}

/// A client id no other gateway has: the broker would otherwise hand the
/// connection from one to the other.
fn client_id() -> String {
    use rand_core::RngCore;
    let mut bytes = [0u8; 8];
    rand_core::OsRng.fill_bytes(&mut bytes);
    format!("twofold-gateway-crl-{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::revocation::test_pki::{ca, crl};

    #[test]
    fn a_newer_crl_is_taken_the_same_or_an_older_one_is_not_a_forged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let staged = dir.path().join("crl.pem");
        let (device_ca, other) = (ca("Device CA"), ca("Not our CA"));
        let cas = [device_ca.der.clone()];
        let offer = |pem: &str, current: &RevocationList| {
            std::fs::write(&staged, pem).unwrap();
            judge(&staged, &cas, current)
        };
        std::fs::write(&staged, crl(&device_ca, 5, &[])).unwrap();
        let current = RevocationList::load(&staged, &cas, None).unwrap();

        assert_eq!(
            offer(&crl(&device_ca, 6, &[7]), &current),
            Offer::Installed(Some(6))
        );
        assert_eq!(offer(&crl(&device_ca, 5, &[]), &current), Offer::Same);
        let older = offer(&crl(&device_ca, 4, &[]), &current);
        assert!(
            matches!(&older, Offer::Refused(why) if why.contains("number 4")),
            "{older:?}"
        );
        let forged = offer(&crl(&other, 9, &[7]), &current);
        assert!(matches!(forged, Offer::Refused(_)), "{forged:?}");
        let garbage = offer("not a CRL", &current);
        assert!(matches!(garbage, Offer::Refused(_)), "{garbage:?}");
    }
}
