//! Prometheus metrics and the `/metrics` and `/healthz` endpoints.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::reason::Reason;
use crate::revocation::RevocationList;

/// Which way a message or byte went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Device → gateway.
    In,
    /// Gateway → device.
    Out,
}

impl Direction {
    fn label(self) -> &'static str {
        if self == Direction::In { "in" } else { "out" }
    }
}

/// Every metric the gateway exports, in the Prometheus text format.
pub struct Metrics {
    registry: Registry,
    sessions: IntGauge,
    handshakes: IntCounterVec,
    refusals: IntCounterVec,
    messages: IntCounterVec,
    bytes: IntCounterVec,
    /// `messages` and `bytes` for each [`Direction`], looked up once:
    /// they are counted for every relayed packet.
    relayed: [(IntCounter, IntCounter); 2],
    crl_number: IntGauge,
    crl_age: IntGauge,
    crl_revoked: IntGauge,
    earliest_expiry: IntGauge,
    broker_up: IntGauge,
    audit_to_file: IntGauge,
    audit_write_errors: IntCounter,
    /// not_after (Unix seconds) → how many connected sessions expire then.
    expiries: Mutex<BTreeMap<i64, usize>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("twofold_gateway")
}

impl Metrics {
    /// A registry with every metric, every label value at zero.
    pub fn new() -> Metrics {
        // Names, help texts and labels are constants checked by the tests:
        // these cannot fail at run time.
        let counter = |name: &str, help: &str, label: &str| {
            IntCounterVec::new(opts(name, help), &[label]).expect("static metric options")
        };
        let gauge = |name: &str, help: &str| {
            IntGauge::with_opts(opts(name, help)).expect("static metric options")
        };
        let messages = counter(
            "messages_total",
            "PUBLISH packets relayed, by direction",
            "direction",
        );
        let bytes = counter(
            "bytes_total",
            "MQTT bytes relayed, by direction",
            "direction",
        );
        let relayed = [Direction::In, Direction::Out].map(|d| {
            (
                messages.with_label_values(&[d.label()]),
                bytes.with_label_values(&[d.label()]),
            )
        });
        let m = Metrics {
            registry: Registry::new(),
            sessions: gauge("sessions", "MQTT sessions relayed to the broker now"),
            handshakes: counter("handshakes_total", "TLS handshakes by outcome", "outcome"),
            refusals: counter(
                "refusals_total",
                "Refused handshakes, CONNECTs and packets by reason",
                "reason",
            ),
            messages,
            bytes,
            relayed,
            crl_number: gauge("crl_number", "CRL number in force (0 if none)"),
            crl_age: gauge(
                "crl_age_seconds",
                "Seconds since the CRL in force was issued",
            ),
            crl_revoked: gauge(
                "crl_revoked_certificates",
                "Certificates listed on the CRL in force",
            ),
            earliest_expiry: gauge(
                "earliest_client_cert_expiry_seconds",
                "Unix time of the earliest expiry among connected clients' certificates (0 if none)",
            ),
            broker_up: gauge(
                "broker_up",
                "1 if the broker could take sessions when /metrics was read, else 0",
            ),
            audit_to_file: gauge(
                "audit_log_file",
                "1 if audit events go to the audit_log file, 0 if to standard output",
            ),
            audit_write_errors: IntCounter::with_opts(opts(
                "audit_write_errors_total",
                "Audit events that could not be written (disk full, file gone read-only)",
            ))
            .expect("static metric options"),
            expiries: Mutex::new(BTreeMap::new()),
        };
        for c in [&m.handshakes, &m.refusals, &m.messages, &m.bytes] {
            let _ = m.registry.register(Box::new(c.clone()));
        }
        for g in [
            &m.sessions,
            &m.crl_number,
            &m.crl_age,
            &m.crl_revoked,
            &m.earliest_expiry,
            &m.broker_up,
            &m.audit_to_file,
        ] {
            let _ = m.registry.register(Box::new(g.clone()));
        }
        let _ = m.registry.register(Box::new(m.audit_write_errors.clone()));
        // Every label value exists from the start, at zero.
        for reason in Reason::ALL {
            m.refusals.with_label_values(&[reason.as_str()]);
        }
        for outcome in ["ok", "refused"] {
            m.handshakes.with_label_values(&[outcome]);
        }
        m
    }

    pub fn refused(&self, reason: Reason) {
        self.refusals.with_label_values(&[reason.as_str()]).inc();
    }

    /// A TLS handshake ended, well or not.
    pub fn handshake(&self, ok: bool) {
        self.handshakes
            .with_label_values(&[if ok { "ok" } else { "refused" }])
            .inc();
    }

    pub fn relayed(&self, direction: Direction, messages: u64, bytes: u64) {
        let (m, b) = &self.relayed[direction as usize];
        if messages > 0 {
            m.inc_by(messages);
        }
        b.inc_by(bytes);
    }

    /// A session started; `not_after` is its certificate's expiry.
    pub fn session_started(&self, not_after: i64) {
        self.sessions.inc();
        if let Ok(mut e) = self.expiries.lock() {
            *e.entry(not_after).or_default() += 1;
        }
    }

    pub fn session_ended(&self, not_after: i64) {
        self.sessions.dec();
        if let Ok(mut e) = self.expiries.lock()
            && let Some(n) = e.get_mut(&not_after)
        {
            *n -= 1;
            if *n == 0 {
                e.remove(&not_after);
            }
        }
    }

    /// Audit events go to a file (`true`) or to standard output.
    pub fn audit_to_file(&self, file: bool) {
        self.audit_to_file.set(i64::from(file));
    }

    /// An audit event could not be written.
    pub fn audit_write_failed(&self) {
        self.audit_write_errors.inc();
    }

    /// Whether the broker could take sessions, checked at scrape time.
    pub fn broker_reachable(&self, up: bool) {
        self.broker_up.set(i64::from(up));
    }

    /// The text exposition, with the values computed at scrape time.
    pub fn render(&self, crl: &RevocationList) -> String {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.crl_number.set(
            crl.number
                .map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX)),
        );
        self.crl_age
            .set(crl.this_update.map_or(0, |t| now.saturating_sub(t)));
        self.crl_revoked
            .set(i64::try_from(crl.len()).unwrap_or(i64::MAX));
        let earliest = self
            .expiries
            .lock()
            .ok()
            .and_then(|e| e.keys().next().copied())
            .unwrap_or(0);
        self.earliest_expiry.set(earliest);
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

/// Serves `/metrics` and `/healthz` on `addr`. `/healthz` answers 200 while
/// the broker can take sessions ([`BrokerTarget::reachable`]), 503
/// otherwise.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: std::sync::Arc<Metrics>,
    tls: tokio::sync::watch::Receiver<std::sync::Arc<crate::tls::TlsContext>>,
    broker: crate::broker::BrokerTarget,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let addr = listener.local_addr()?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get({
                let broker = broker.clone();
                move || async move {
                    metrics.broker_reachable(broker.reachable().await);
                    let body = metrics.render(&tls.borrow().revocations);
                    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body)
                }
            }),
        )
        .route(
            "/healthz",
            get(move || async move {
                if broker.reachable().await {
                    (StatusCode::OK, "ok\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "broker unreachable\n")
                }
            }),
        );
    tracing::info!(%addr, "metrics listening");
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_reason_and_tracks_the_earliest_expiry() {
        let m = Metrics::new();
        m.refused(Reason::Revoked);
        m.handshake(false);
        m.session_started(2_000);
        m.session_started(1_000);
        m.session_ended(1_000);
        m.relayed(Direction::In, 3, 120);
        let text = m.render(&RevocationList::default());
        for reason in Reason::ALL {
            assert!(
                text.contains(&format!("reason=\"{}\"", reason.as_str())),
                "{reason}"
            );
        }
        assert!(
            text.contains("twofold_gateway_refusals_total{reason=\"revoked\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("twofold_gateway_handshakes_total{outcome=\"refused\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("twofold_gateway_earliest_client_cert_expiry_seconds 2000"),
            "{text}"
        );
        assert!(text.contains("twofold_gateway_sessions 1"), "{text}");
        assert!(
            text.contains("twofold_gateway_messages_total{direction=\"in\"} 3"),
            "{text}"
        );
    }
}
