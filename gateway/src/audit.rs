//! The audit log: one JSON object per line for every refusal, and for
//! every session that starts or ends.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::identity::CertInfo;
use crate::metrics::Metrics;
use crate::reason::Reason;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A handshake or CONNECT was refused, or a live session closed by policy.
    Refused,
    /// A session was bound to its identity and relayed to the broker.
    Connected,
    /// A session ended.
    Disconnected,
    /// A second connection with the same identity took a live session
    /// over: one certificate in use from two places at once is what a
    /// cloned device looks like.
    TakenOver,
}

/// One audit record.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Event {
    pub ts: String,
    pub event: EventKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub peer: String,
    /// The connection a takeover displaced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_peer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertInfo>,
}

impl Event {
    /// A new event at the current time.
    pub fn new(event: EventKind, peer: SocketAddr) -> Event {
        let now = OffsetDateTime::now_utc();
        Event {
            ts: now.format(&Rfc3339).unwrap_or_default(),
            event,
            reason: None,
            detail: None,
            peer: peer.to_string(),
            previous_peer: None,
            identity: None,
            client_id: None,
            certificate: None,
        }
    }

    /// A refusal with its reason and a human explanation.
    pub fn refused(peer: SocketAddr, reason: Reason, detail: impl Into<String>) -> Event {
        let mut e = Event::new(EventKind::Refused, peer);
        e.reason = Some(reason);
        e.detail = Some(clip(detail.into(), MAX_DETAIL));
        e
    }

    /// `peer`'s session took over the live one of `previous`.
    pub fn taken_over(peer: &crate::session::Peer, client_id: &str, previous: SocketAddr) -> Event {
        let mut e = Event::new(EventKind::TakenOver, peer.addr)
            .with_identity(peer.identity.clone())
            .with_client_id(client_id)
            .with_certificate(Some(peer.cert.clone()))
            .with_detail(format!(
                "a second connection with this identity took over the session of {previous}; \
                 if the device did not just reconnect, its certificate is in use from two \
                 places (a cloned device)"
            ));
        e.previous_peer = Some(previous.to_string());
        e
    }

    /// A human explanation, for events other than refusals.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Event {
        self.detail = Some(clip(detail.into(), MAX_DETAIL));
        self
    }

    pub fn with_certificate(mut self, cert: Option<CertInfo>) -> Event {
        self.certificate = cert;
        self
    }

    pub fn with_identity(mut self, identity: impl Into<String>) -> Event {
        self.identity = Some(identity.into());
        self
    }

    /// The client id the peer sent, cut if it is long: it is the peer's
    /// to choose, and an audit line must stay small.
    pub fn with_client_id(mut self, client_id: impl Into<String>) -> Event {
        self.client_id = Some(clip(client_id.into(), MAX_CLIENT_ID));
        self
    }
}

/// The most bytes of a client id an audit line repeats (a valid one is
/// at most 97: a service name, `-` and a 32-character instance).
const MAX_CLIENT_ID: usize = 128;
/// The most bytes of an explanation (a refused SUBSCRIBE names each of
/// its filters, each already cut to 128 characters).
const MAX_DETAIL: usize = 2048;

/// `s` cut to at most `max` bytes on a character boundary, saying so.
fn clip(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let total = s.len();
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    s.push_str(&format!("… ({total} bytes, truncated)"));
    s
}

/// Which connection holds each broker session now, so that a takeover
/// (and the session it displaced) can be named.
#[derive(Default)]
pub struct Presence {
    holders: Mutex<HashMap<String, (u64, SocketAddr)>>,
    next: AtomicU64,
}

impl Presence {
    /// `addr` now holds the session `id`: returns its token, and the
    /// address of the connection that held it until now, if any.
    pub fn arrive(&self, id: &str, addr: SocketAddr) -> (u64, Option<SocketAddr>) {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let previous = self
            .holders
            .lock()
            .ok()
            .and_then(|mut h| h.insert(id.to_owned(), (token, addr)))
            .map(|(_, addr)| addr);
        (token, previous)
    }

    /// Some connection holds the session `id` now.
    pub fn is_held(&self, id: &str) -> bool {
        self.holders.lock().is_ok_and(|h| h.contains_key(id))
    }

    /// The connection with `token` has ended. Returns the address of the
    /// connection holding the session now, if another took it over.
    pub fn leave(&self, id: &str, token: u64) -> Option<SocketAddr> {
        let mut holders = self.holders.lock().ok()?;
        match holders.get(id) {
            Some((holder, _)) if *holder == token => {
                holders.remove(id);
                None
            }
            Some((_, addr)) => Some(*addr),
            None => None,
        }
    }
}

/// Where audit events go. Cloning shares the sink.
#[derive(Clone)]
pub struct Audit {
    sink: Arc<Mutex<Box<dyn Write + Send>>>,
    metrics: Arc<Metrics>,
    presence: Arc<Presence>,
}

impl Audit {
    /// Appends to `path`.
    pub fn to_file(path: &Path) -> std::io::Result<Audit> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let audit = Audit::to_writer(Box::new(file));
        audit.metrics.audit_to_file(true);
        Ok(audit)
    }

    /// Writes to any sink (stdout, a buffer in tests).
    pub fn to_writer(sink: Box<dyn Write + Send>) -> Audit {
        Audit {
            sink: Arc::new(Mutex::new(sink)),
            metrics: Arc::new(Metrics::new()),
            presence: Arc::new(Presence::default()),
        }
    }

    /// Records an event: one line, flushed, and a tracing event.
    pub fn record(&self, event: &Event) {
        if let Some(reason) = event.reason
            && event.event == EventKind::Refused
        {
            self.metrics.refused(reason);
            tracing::warn!(reason = reason.as_str(), peer = %event.peer, identity = ?event.identity, detail = ?event.detail, "refused");
        } else {
            tracing::info!(event = ?event.event, peer = %event.peer, identity = ?event.identity, "session");
        }
        let Ok(mut line) = serde_json::to_vec(event) else {
            return;
        };
        line.push(b'\n');
        if let Ok(mut sink) = self.sink.lock() {
            // An audit line that cannot be written is reported, never fatal.
            if let Err(e) = sink.write_all(&line).and_then(|_| sink.flush()) {
                self.metrics.audit_write_failed();
                tracing::error!(error = %e, "cannot write the audit log");
            }
        }
    }

    /// Who holds each session, for takeovers.
    pub fn presence(&self) -> &Arc<Presence> {
        &self.presence
    }

    /// The metrics this log's refusals are counted in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that has stopped taking writes (a full disk).
    struct Full;

    impl Write for Full {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("no space left on device"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn audit_events_that_cannot_be_written_are_counted() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let audit = Audit::to_writer(Box::new(Full));
        audit.record(&Event::new(EventKind::Connected, addr));
        audit.record(&Event::refused(addr, Reason::Revoked, "x"));
        let text = audit
            .metrics()
            .render(&crate::revocation::RevocationList::default());
        assert!(
            text.contains("twofold_gateway_audit_write_errors_total 2"),
            "{text}"
        );
        assert!(text.contains("twofold_gateway_audit_log_file 0"), "{text}");

        let dir = tempfile::tempdir().unwrap();
        let kept = Audit::to_file(&dir.path().join("audit.jsonl")).unwrap();
        kept.record(&Event::new(EventKind::Connected, addr));
        let text = kept
            .metrics()
            .render(&crate::revocation::RevocationList::default());
        assert!(
            text.contains("twofold_gateway_audit_write_errors_total 0"),
            "{text}"
        );
        assert!(text.contains("twofold_gateway_audit_log_file 1"), "{text}");
    }

    #[test]
    fn long_peer_strings_are_cut_and_say_so() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let e = Event::refused(addr, Reason::PolicyDenied, "x".repeat(40_000))
            .with_client_id("é".repeat(40_000));
        let line = serde_json::to_string(&e).unwrap();
        assert!(line.len() < 4096, "{} bytes", line.len());
        assert!(e.detail.unwrap().ends_with("… (40000 bytes, truncated)"));
        assert!(e.client_id.unwrap().ends_with("… (80000 bytes, truncated)"));
        let short = Event::refused(addr, Reason::PolicyDenied, "short");
        assert_eq!(short.detail.as_deref(), Some("short"));
    }

    #[test]
    fn presence_names_the_connection_a_takeover_displaced() {
        let p = Presence::default();
        let (a, b): (SocketAddr, SocketAddr) =
            ("10.0.0.1:1".parse().unwrap(), "10.0.0.2:2".parse().unwrap());
        let (first, previous) = p.arrive("device:sensor-1", a);
        assert_eq!(previous, None);
        let (second, previous) = p.arrive("device:sensor-1", b);
        assert_eq!(previous, Some(a));
        // The displaced session learns who holds it now; the holder leaves cleanly.
        assert_eq!(p.leave("device:sensor-1", first), Some(b));
        assert_eq!(p.leave("device:sensor-1", second), None);
        let (_, previous) = p.arrive("device:sensor-1", a);
        assert_eq!(previous, None);
    }
}
