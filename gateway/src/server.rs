//! The accept loop: one task per connection, handshakes bounded in time
//! and in number (stalled ones give way to newcomers, see [`admission`]),
//! live reload of the TLS files, graceful shutdown.

mod admission;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::server::Acceptor;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;
use twofold_protocol::{Identity, TrustDomain};

use crate::audit::{Audit, Event};
use crate::broker::BrokerTarget;
use crate::identity::{self, CertInfo};
use crate::reason::Reason;
use crate::revocation::RevocationList;
use crate::session::{self, Limits, Peer};
use crate::tls::{PresentedCert, TlsContext, TlsFiles};

/// Everything the accept loop needs.
pub struct Gateway {
    pub trust_domain: TrustDomain,
    pub files: TlsFiles,
    pub max_fragment_size: Option<usize>,
    pub broker: BrokerTarget,
    pub audit: Audit,
    pub handshake_timeout: Duration,
    /// Pending handshakes (ClientHello received, not finished) beyond
    /// which stalled ones are cut to make room.
    pub max_handshakes: usize,
    /// How long a handshake may be pending before it can be cut.
    pub handshake_grace: Duration,
    pub limits: Limits,
    /// Where `/metrics` and `/healthz` are served, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// The CA service devices renew through, if one is configured.
    pub ca: Option<Arc<crate::renewal::CaClient>>,
    /// How often the CRL is pulled from the CA service, if at all.
    pub crl_poll: Option<Duration>,
    /// The topic policy in force.
    pub policy: crate::policy::InForce,
}

/// The TLS files in force (certificate, key, client CAs and CRLs), which
/// a reload replaces as one: a handshake verifies and authenticates
/// against one version, and sessions hear of each new one.
type Live = watch::Sender<Arc<TlsContext>>;

impl Gateway {
    /// Serves on `listener` until `shutdown` turns true, then tells every
    /// session to close and waits up to `grace` for them.
    pub async fn serve(
        self,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
        grace: Duration,
    ) -> anyhow::Result<()> {
        let tls = TlsContext::load(&self.files, self.max_fragment_size, None)?;
        let live: Arc<Live> = Arc::new(watch::Sender::new(Arc::new(tls)));
        let gateway = Arc::new(self);
        let reload = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(watch_files(gateway.clone(), live.clone(), reload.clone()));
        let feed = crate::crl_feed::Feed {
            crl: gateway.files.crl.clone(),
            live: live.subscribe(),
            reload,
        };
        if let BrokerTarget::External(external) = &gateway.broker {
            tokio::spawn(crate::crl_feed::listen(feed.clone(), external.clone()));
        }
        if let (Some(ca), Some(every)) = (&gateway.ca, gateway.crl_poll) {
            tokio::spawn(crate::crl_feed::poll(feed, ca.clone(), every));
        }
        if let Some(addr) = gateway.metrics {
            let metrics = gateway.audit.metrics().clone();
            let crl = live.subscribe();
            let broker = gateway.broker.clone();
            // Bind now so that a bad address fails start-up, not later.
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("metrics: cannot bind {addr}: {e}"))?;
            tokio::spawn(async move {
                if let Err(e) = crate::metrics::serve(listener, metrics, crl, broker).await {
                    tracing::error!(error = %e, "metrics endpoint stopped");
                }
            });
        }
        let handshakes = Arc::new(Handshakes::new(
            gateway.max_handshakes,
            gateway.handshake_grace,
        ));
        let sessions = tokio_util_free::Tracker::default();
        tracing::info!(listen = %listener.local_addr()?, "gateway listening");
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (tcp, addr) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of file descriptors and the like: back off, keep serving.
                            tracing::error!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = tcp.set_nodelay(true);
                    let gateway = gateway.clone();
                    let live = live.clone();
                    let handshakes = handshakes.clone();
                    let shutdown = shutdown.clone();
                    sessions.spawn(async move { connection(gateway, live, handshakes, tcp, addr, shutdown).await });
                }
                _ = shutdown.changed() => break,
            }
        }
        tracing::info!(sessions = sessions.len(), "shutting down: closing sessions");
        sessions.wait(grace).await;
        Ok(())
    }
}

/// Reloads the TLS files when they change (polled every second, and at
/// once on SIGHUP or when the CRL feed wrote a new CRL). A broken new
/// file is refused and the old one stays.
async fn watch_files(gateway: Arc<Gateway>, live: Arc<Live>, reload: Arc<tokio::sync::Notify>) {
    // Length and modification time alone miss a same-length file put in
    // place with its old time; the stamp also compares inode, ctime and
    // contents (one rule, shared with the agent's CRL watcher).
    let stamp = |files: &TlsFiles| -> Vec<Option<twofold_trust::FileStamp>> {
        [&files.cert, &files.key, &files.client_ca, &files.crl]
            .iter()
            .map(|p| twofold_trust::FileStamp::of(p))
            .collect()
    };
    let mut last = stamp(&gateway.files);
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            _ = reload.notified() => true,
            Some(_) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
        };
        let now = stamp(&gateway.files);
        if !forced && now == last {
            continue;
        }
        last = now;
        let current = live.borrow().clone();
        match TlsContext::load(&gateway.files, gateway.max_fragment_size, Some(&current)) {
            Ok(next) => {
                let (number, revoked) = (next.revocations.number, next.revocations.len());
                // send_replace stores the value even when no session is listening yet.
                live.send_replace(Arc::new(next));
                tracing::info!(crl_number = ?number, revoked, "TLS files reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "REFUSED new TLS files; the previous ones stay in force")
            }
        }
    }
}

/// What a full handshake would refuse now, and rustls does not look at
/// again when a session resumes: a ticket lives up to 12 hours, so the
/// certificate may have expired since it was issued, or its CA may have
/// no CRL in force any more (rustls refuses a certificate whose
/// revocation status it cannot know). The revocation check itself is
/// done for every handshake.
fn recheck_resumed(
    leaf: &[u8],
    revocations: &RevocationList,
    expired_grace: Option<Duration>,
    now: i64,
) -> Option<(Reason, String)> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
        return Some((
            Reason::BadIdentity,
            "client certificate does not parse".into(),
        ));
    };
    let not_after = cert.validity().not_after;
    let grace = expired_grace.map_or(0, |g| i64::try_from(g.as_secs()).unwrap_or(i64::MAX));
    if not_after.timestamp() <= now && now - not_after.timestamp() > grace {
        let at = not_after
            .to_datetime()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| not_after.to_string());
        return Some((
            Reason::Expired,
            format!(
                "certificate expired at {at} (resumed session); {}",
                crate::tls::COME_BACK
            ),
        ));
    }
    if !revocations.covers(cert.issuer().as_raw()) {
        return Some((
            Reason::RevocationUnknown,
            format!(
                "no CRL of \"{}\" is in force, so the certificate's revocation status is unknown (resumed session)",
                cert.issuer()
            ),
        ));
    }
    None
}

/// The handshakes past their ClientHello: the tokio side of
/// [`admission::Pool`]. A cut handshake learns it through its channel.
struct Handshakes {
    pool: Mutex<admission::Pool<oneshot::Sender<Cutting>>>,
    capacity: usize,
    grace: Duration,
}

/// Why a handshake was cut, for its audit line.
struct Cutting {
    waited: Duration,
    pending: usize,
    from_source: usize,
}

/// A pending handshake's room, given back when dropped.
struct Room<'a> {
    handshakes: &'a Handshakes,
    source: IpAddr,
    ticket: admission::Ticket,
}

impl Handshakes {
    fn new(capacity: usize, grace: Duration) -> Handshakes {
        Handshakes {
            pool: Mutex::new(admission::Pool::new(capacity, grace)),
            capacity,
            grace,
        }
    }

    /// Admits a handshake from `source` at once, cutting stalled ones if
    /// the pool is full; the receiver fires if this one is cut in turn.
    fn admit(&self, source: IpAddr) -> Option<(Room<'_>, oneshot::Receiver<Cutting>)> {
        let (cut_me, cut) = oneshot::channel();
        let (ticket, cuts) = self.pool.lock().ok()?.admit(source, Instant::now(), cut_me);
        for c in cuts {
            let _ = c.handle.send(Cutting {
                waited: c.waited,
                pending: c.pending,
                from_source: c.from_source,
            });
        }
        let room = Room {
            handshakes: self,
            source,
            ticket,
        };
        Some((room, cut))
    }
}

impl Drop for Room<'_> {
    fn drop(&mut self) {
        if let Ok(mut pool) = self.handshakes.pool.lock() {
            pool.release(self.source, self.ticket);
        }
    }
}

/// Why a handshake stopped before it finished, other than a TLS error.
enum Stop {
    /// `handshake_timeout` passed.
    Timeout,
    /// It stalled while newcomers needed its room.
    Cut(Cutting),
}

/// The TLS handshake and the identity in the client certificate; every
/// refusal is audited here. `None` when the connection is refused or gone.
async fn handshake(
    gateway: &Gateway,
    live: &Live,
    handshakes: &Handshakes,
    tcp: TcpStream,
    addr: SocketAddr,
) -> Option<(Box<TlsStream<TcpStream>>, Peer)> {
    let deadline = tokio::time::Instant::now() + gateway.handshake_timeout;
    // Waiting for a ClientHello costs a socket and a small buffer, so it
    // takes no room: silent sockets are only bounded by the deadline.
    let hello =
        tokio::time::timeout_at(deadline, LazyConfigAcceptor::new(Acceptor::default(), tcp)).await;
    let mut presented = PresentedCert::default();
    // The TLS files in force when the handshake starts, for both its
    // verification and the decision after it (one version of each).
    let mut tls = live.borrow().clone();
    let accepted = match hello {
        Err(_) => Err(Stop::Timeout),
        Ok(Err(e)) => Ok(Err(e)),
        Ok(Ok(start)) => {
            // From here the gateway holds a TLS state and signs for the
            // peer: that takes room, and a newcomer never waits for it.
            // Nothing here fails for a peer's doing; when it does fail,
            // the connection is still audited.
            let gateway_error = |detail: String| {
                tracing::error!(peer = %addr, %detail, "cannot go on with a handshake");
                gateway
                    .audit
                    .record(&Event::refused(addr, Reason::GatewayError, detail));
            };
            let Some((_room, mut cut)) = handshakes.admit(addr.ip()) else {
                gateway_error("the handshake pool's lock is poisoned".into());
                return None;
            };
            // The TLS files in force now, not when the socket was opened:
            // a client CA removed during the wait must not verify it.
            tls = live.borrow().clone();
            let (config, slot) = match tls.config() {
                Ok(built) => built,
                Err(e) => {
                    gateway_error(format!("cannot build the TLS configuration: {e}"));
                    return None;
                }
            };
            presented = slot;
            tokio::select! {
                done = tokio::time::timeout_at(deadline, start.into_stream(config)) => {
                    done.map_err(|_| Stop::Timeout)
                }
                Ok(cutting) = &mut cut => Err(Stop::Cut(cutting)),
            }
        }
    };
    let presented_info = || presented.get().and_then(|c| CertInfo::from_der(&c));
    let metrics = gateway.audit.metrics();
    metrics.handshake(matches!(accepted, Ok(Ok(_))));
    let stream = match accepted {
        Err(stop) => {
            let detail = match stop {
                Stop::Timeout => {
                    format!("no TLS handshake within {:?}", gateway.handshake_timeout)
                }
                Stop::Cut(c) => format!(
                    "handshake cut to make room: {} handshakes were pending \
                     (limits.max_concurrent_handshakes = {}), {} of them from {}, \
                     and this one had not finished in {:.1?} (grace {:?})",
                    c.pending,
                    handshakes.capacity,
                    c.from_source,
                    addr.ip(),
                    c.waited,
                    handshakes.grace,
                ),
            };
            gateway.audit.record(
                &Event::refused(addr, Reason::HandshakeTimeout, detail)
                    .with_certificate(presented_info()),
            );
            return None;
        }
        Ok(Err(e)) => {
            let tls_error = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>());
            match tls_error {
                Some(tls_error) => {
                    let (reason, detail) = presented.classify(tls_error);
                    gateway.audit.record(
                        &Event::refused(addr, reason, detail).with_certificate(presented_info()),
                    );
                }
                // The peer went away mid-handshake: nothing to refuse.
                None => tracing::debug!(peer = %addr, error = %e, "handshake aborted"),
            }
            return None;
        }
        Ok(Ok(stream)) => {
            // The session's config (and so the slot) lives as long as the
            // session; the copy is only needed for refusals.
            presented.clear();
            stream
        }
    };
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned());
    let Some(leaf) = leaf else {
        gateway.audit.record(&Event::refused(
            addr,
            Reason::NoCertificate,
            "no client certificate",
        ));
        return None;
    };
    let resumed = stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let decided = authenticate(
        &leaf,
        resumed,
        &tls.revocations,
        tls.expired_grace,
        &gateway.trust_domain,
        now,
    );
    let (principal, cert) = match decided {
        Ok(admitted) => admitted,
        Err(refused) => {
            let Refused {
                reason,
                detail,
                cert,
            } = *refused;
            gateway
                .audit
                .record(&Event::refused(addr, reason, detail).with_certificate(cert));
            return None;
        }
    };
    let identity = Identity {
        trust_domain: gateway.trust_domain,
        principal,
    }
    .to_string();
    let peer = Peer {
        principal,
        identity,
        cert,
        addr,
    };
    // Boxed, so the futures that hand it on do not each reserve room for
    // its 1.2 KB.
    Some((Box::new(stream), peer))
}

/// A refusal after the TLS handshake, with what the certificate showed.
#[derive(Debug)]
struct Refused {
    reason: Reason,
    detail: String,
    cert: Option<CertInfo>,
}

/// Who the client certificate `leaf` names, once rustls has verified the
/// handshake: the decision after it, without I/O. A resumed session skips
/// certificate verification in rustls, and a full handshake was checked
/// against the CRLs in force when it began; so the CRL in force `now` is
/// checked again, and a resumed session's expiry and CA too.
fn authenticate(
    leaf: &[u8],
    resumed: bool,
    revocations: &RevocationList,
    expired_grace: Option<Duration>,
    trust_domain: &TrustDomain,
    now: i64,
) -> Result<(twofold_protocol::Principal, CertInfo), Box<Refused>> {
    let refused = |reason, detail: &str, cert| {
        Box::new(Refused {
            reason,
            detail: detail.to_owned(),
            cert,
        })
    };
    let Some(cert) = CertInfo::from_der(leaf) else {
        return Err(refused(
            Reason::BadIdentity,
            "client certificate does not parse",
            None,
        ));
    };
    if revocations.is_revoked(&cert.issuer, &cert.serial) {
        let detail = if resumed {
            "certificate is on the CRL (resumed session)"
        } else {
            "certificate is on the CRL that came into force during the handshake"
        };
        return Err(refused(Reason::Revoked, detail, Some(cert)));
    }
    if resumed
        && let Some((reason, detail)) = recheck_resumed(leaf, revocations, expired_grace, now)
    {
        return Err(Box::new(Refused {
            reason,
            detail,
            cert: Some(cert),
        }));
    }
    match identity::principal(leaf, trust_domain) {
        Ok(principal) => Ok((principal, cert)),
        Err(e) => Err(Box::new(Refused {
            reason: Reason::BadIdentity,
            detail: e.to_string(),
            cert: Some(cert),
        })),
    }
}

async fn connection(
    gateway: Arc<Gateway>,
    live: Arc<Live>,
    handshakes: Arc<Handshakes>,
    tcp: TcpStream,
    addr: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    // Two steps, each boxed: a task's future is as large as its largest
    // state, and inline, the handshake's (3 KB) and the session's (2.8 KB)
    // states did not share their bytes: every idle session carried a 5.7 KB
    // task. Boxed, the handshake's state is freed when it ends.
    let handshake = Box::pin(handshake(&gateway, &live, &handshakes, tcp, addr));
    let Some((stream, peer)) = handshake.await else {
        return;
    };
    Box::pin(session::run(
        stream,
        peer,
        session::Backends {
            broker: gateway.broker.clone(),
            policy: gateway.policy.clone(),
            ca: gateway.ca.clone(),
        },
        gateway.limits.clone(),
        gateway.audit.clone(),
        live.subscribe(),
        shutdown,
    ))
    .await;
}

/// A count of running connection tasks, to wait for at shutdown. (Written
/// here instead of pulling in tokio-util for one counter.)
mod tokio_util_free {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[derive(Default, Clone)]
    pub struct Tracker(Arc<(AtomicUsize, tokio::sync::Notify)>);

    impl Tracker {
        pub fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
            let inner = self.0.clone();
            inner.0.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                task.await;
                if inner.0.fetch_sub(1, Ordering::SeqCst) == 1 {
                    inner.1.notify_waiters();
                }
            });
        }

        pub fn len(&self) -> usize {
            self.0.0.load(Ordering::SeqCst)
        }

        pub async fn wait(&self, grace: Duration) {
            let _ = tokio::time::timeout(grace, async {
                while self.len() > 0 {
                    let notified = self.0.1.notified();
                    if self.len() == 0 {
                        break;
                    }
                    notified.await;
                }
            })
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::revocation::test_pki::{Ca, ca, crl, load};

    fn leaf(issuer: &Ca, not_after: time::OffsetDateTime) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.not_before = not_after - time::Duration::days(30);
        params.not_after = not_after;
        let key = rcgen::KeyPair::generate().unwrap();
        params
            .signed_by(&key, &issuer.issuer)
            .unwrap()
            .der()
            .to_vec()
    }

    /// A device certificate with `serial` and, if given, an identity URI.
    fn device_leaf(issuer: &Ca, serial: u64, uri: Option<&str>) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        if let Some(uri) = uri {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI(uri.try_into().unwrap()));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params
            .signed_by(&key, &issuer.issuer)
            .unwrap()
            .der()
            .to_vec()
    }

    #[test]
    fn authenticate_names_the_principal_or_the_reason() {
        let a = ca("CA A");
        let crls = load(&crl(&a, 1, &[7]), &[&a]).unwrap();
        let td = TrustDomain::parse("iot.example").unwrap();
        let t = time::OffsetDateTime::now_utc().unix_timestamp();
        let uri = "spiffe://iot.example/device/sensor-1";

        let (principal, cert) =
            authenticate(&device_leaf(&a, 8, Some(uri)), false, &crls, None, &td, t).unwrap();
        assert_eq!((principal.kind(), principal.name()), ("device", "sensor-1"));
        assert_eq!(cert.serial, "08");

        let revoked = authenticate(&device_leaf(&a, 7, Some(uri)), false, &crls, None, &td, t);
        let Refused {
            reason,
            detail,
            cert,
        } = *revoked.unwrap_err();
        assert_eq!(reason, Reason::Revoked);
        assert!(
            detail.contains("came into force during the handshake"),
            "{detail}"
        );
        assert_eq!(
            cert.unwrap().serial,
            "07",
            "the audit line names the certificate"
        );
        let resumed = authenticate(&device_leaf(&a, 7, Some(uri)), true, &crls, None, &td, t);
        assert!(resumed.unwrap_err().detail.contains("resumed session"));

        let other_domain = "spiffe://other.example/device/sensor-1";
        for leaf in [
            device_leaf(&a, 9, None),
            device_leaf(&a, 9, Some(other_domain)),
        ] {
            let refused = authenticate(&leaf, false, &crls, None, &td, t).unwrap_err();
            assert_eq!(refused.reason, Reason::BadIdentity);
            assert!(refused.cert.is_some());
        }
        let junk = authenticate(b"junk", false, &crls, None, &td, t).unwrap_err();
        assert_eq!(junk.reason, Reason::BadIdentity);
        assert!(junk.cert.is_none());
    }

    #[test]
    fn a_resumed_session_is_refused_what_a_full_handshake_would_refuse() {
        let (a, b) = (ca("CA A"), ca("CA B"));
        let crls = load(&crl(&a, 1, &[]), &[&a, &b]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let (t, day) = (now.unix_timestamp(), time::Duration::days(1));

        // Valid, and its CA's CRL is in force: no refusal.
        assert_eq!(recheck_resumed(&leaf(&a, now + day), &crls, None, t), None);
        // Expired since the ticket was issued.
        let (reason, detail) = recheck_resumed(&leaf(&a, now - day), &crls, None, t).unwrap();
        assert_eq!(reason, Reason::Expired);
        assert!(
            detail.contains("expired at") && detail.contains("resumed"),
            "{detail}"
        );
        assert!(detail.contains("re-enroll the device"), "{detail}");
        // Within a two-day grace period it resumes (into a session that may
        // only renew); past a one-hour one it does not.
        let expired = leaf(&a, now - day);
        let two_days = Some(Duration::from_secs(2 * 86_400));
        assert_eq!(recheck_resumed(&expired, &crls, two_days, t), None);
        let hour = Some(Duration::from_secs(3600));
        let (reason, _) = recheck_resumed(&expired, &crls, hour, t).unwrap();
        assert_eq!(reason, Reason::Expired);
        // Its CA has no CRL in force (a full handshake fails the same way).
        let (reason, detail) = recheck_resumed(&leaf(&b, now + day), &crls, None, t).unwrap();
        assert_eq!(reason, Reason::RevocationUnknown);
        assert!(detail.contains("no CRL of \"CN=CA B\""), "{detail}");
        // Not a certificate at all.
        let (reason, _) = recheck_resumed(b"junk", &crls, None, t).unwrap();
        assert_eq!(reason, Reason::BadIdentity);
    }
}
