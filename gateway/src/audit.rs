//! The audit log: one JSON object per line for every refusal, and for
//! every session that starts or ends.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
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
            identity: None,
            client_id: None,
            certificate: None,
        }
    }

    /// A refusal with its reason and a human explanation.
    pub fn refused(peer: SocketAddr, reason: Reason, detail: impl Into<String>) -> Event {
        let mut e = Event::new(EventKind::Refused, peer);
        e.reason = Some(reason);
        e.detail = Some(detail.into());
        e
    }

    pub fn with_certificate(mut self, cert: Option<CertInfo>) -> Event {
        self.certificate = cert;
        self
    }

    pub fn with_identity(mut self, identity: impl Into<String>) -> Event {
        self.identity = Some(identity.into());
        self
    }

    pub fn with_client_id(mut self, client_id: impl Into<String>) -> Event {
        self.client_id = Some(client_id.into());
        self
    }
}

/// Where audit events go. Cloning shares the sink.
#[derive(Clone)]
pub struct Audit {
    sink: Arc<Mutex<Box<dyn Write + Send>>>,
    metrics: Arc<Metrics>,
}

impl Audit {
    /// Appends to `path`.
    pub fn to_file(path: &Path) -> std::io::Result<Audit> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Audit::to_writer(Box::new(file)))
    }

    /// Writes to any sink (stdout, a buffer in tests).
    pub fn to_writer(sink: Box<dyn Write + Send>) -> Audit {
        Audit {
            sink: Arc::new(Mutex::new(sink)),
            metrics: Arc::new(Metrics::new()),
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
                tracing::error!(error = %e, "cannot write the audit log");
            }
        }
    }

    /// The metrics this log's refusals are counted in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}
