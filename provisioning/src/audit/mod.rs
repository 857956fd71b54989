//! The fleet audit: what is wrong before devices fall off.
//!
//! AWS IoT Device Defender's audit is the model: a fixed set of checks,
//! each with a severity, the identities it affects and what to do. The
//! inputs are the registry (every certificate issued), the gateways' audit
//! logs (who connected from where, [`log`]) and the gateways' `/metrics`
//! ([`gateway`]). [`audit`] is a pure function of them and the clock; the
//! `provisioning audit` command reads the inputs and prints the report.

pub mod gateway;
pub mod log;
pub mod policy;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use time::OffsetDateTime;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::registry::{CertRecord, Kind};

pub use gateway::GatewayReading;
pub use log::{LogSummary, Sighting};

/// How bad a finding is. Ordered: `Critical` is the greatest.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 5] = [
        Severity::Info,
        Severity::Low,
        Severity::Medium,
        Severity::High,
        Severity::Critical,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What was checked. Each check has one severity, a title and what to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Check {
    CaExpired,
    CaExpiring,
    SharedKey,
    RevokedAdmitted,
    RevokedStillConnected,
    CertExpiredStillSeen,
    CertExpiring,
    WeakKey,
    ClonedCertificate,
    StaleCrl,
    AuditLogFailing,
    PolicyBroad,
    RenewalOverdue,
    AuditLogNotKept,
    SimultaneousUse,
    GatewayUnreadable,
    AuditLogDamaged,
    CertOld,
}

impl Check {
    /// Every check, for gauges that list zero counts too.
    pub const ALL: [Check; 18] = [
        Check::CaExpired,
        Check::CaExpiring,
        Check::SharedKey,
        Check::RevokedAdmitted,
        Check::RevokedStillConnected,
        Check::CertExpiredStillSeen,
        Check::CertExpiring,
        Check::WeakKey,
        Check::ClonedCertificate,
        Check::StaleCrl,
        Check::AuditLogFailing,
        Check::PolicyBroad,
        Check::RenewalOverdue,
        Check::AuditLogNotKept,
        Check::SimultaneousUse,
        Check::GatewayUnreadable,
        Check::AuditLogDamaged,
        Check::CertOld,
    ];

    /// The name in reports and metric labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            Check::CaExpired => "ca-expired",
            Check::CaExpiring => "ca-expiring",
            Check::SharedKey => "shared-key",
            Check::RevokedAdmitted => "revoked-admitted",
            Check::RevokedStillConnected => "revoked-still-connected",
            Check::CertExpiredStillSeen => "cert-expired-still-seen",
            Check::CertExpiring => "cert-expiring",
            Check::WeakKey => "weak-key",
            Check::ClonedCertificate => "cloned-certificate",
            Check::StaleCrl => "stale-crl",
            Check::AuditLogFailing => "audit-log-failing",
            Check::PolicyBroad => "policy-broad",
            Check::AuditLogNotKept => "audit-log-not-kept",
            Check::RenewalOverdue => "renewal-overdue",
            Check::SimultaneousUse => "simultaneous-use",
            Check::GatewayUnreadable => "gateway-unreadable",
            Check::AuditLogDamaged => "audit-log-damaged",
            Check::CertOld => "cert-old",
        }
    }

    pub fn severity(&self) -> Severity {
        match self {
            Check::CaExpired
            | Check::SharedKey
            | Check::RevokedAdmitted
            | Check::RevokedStillConnected => Severity::Critical,
            Check::CaExpiring
            | Check::CertExpiredStillSeen
            | Check::CertExpiring
            | Check::WeakKey
            | Check::ClonedCertificate
            | Check::StaleCrl
            | Check::AuditLogFailing
            | Check::PolicyBroad => Severity::High,
            Check::RenewalOverdue
            | Check::SimultaneousUse
            | Check::GatewayUnreadable
            | Check::AuditLogNotKept => Severity::Medium,
            Check::AuditLogDamaged | Check::CertOld => Severity::Low,
        }
    }

    /// One line: what was found.
    pub fn title(&self) -> &'static str {
        match self {
            Check::CaExpired => "a CA certificate has expired",
            Check::CaExpiring => "a CA certificate expires soon",
            Check::SharedKey => "one public key is in the certificates of several identities",
            Check::RevokedAdmitted => "a revoked certificate was admitted after its revocation",
            Check::RevokedStillConnected => {
                "a revoked certificate's session has no disconnect on record"
            }
            Check::CertExpiredStillSeen => "an expired certificate's device is still connecting",
            Check::CertExpiring => "a device or service certificate expires soon, not renewed",
            Check::WeakKey => "a certificate has a key other than ECDSA P-256",
            Check::ClonedCertificate => {
                "one certificate in use from the same two addresses at once, again and again"
            }
            Check::StaleCrl => "a gateway enforces an older CRL than the registry's newest",
            Check::AuditLogFailing => "a gateway could not write audit events",
            Check::PolicyBroad => {
                "a policy rule grants more than the identity's own subtree to many"
            }
            Check::AuditLogNotKept => "a gateway writes audit events to standard output only",
            Check::RenewalOverdue => "a certificate is past its renewal time, not renewed",
            Check::SimultaneousUse => "one certificate in use from two addresses at once",
            Check::GatewayUnreadable => "a gateway's /metrics could not be read",
            Check::AuditLogDamaged => "audit log lines that could not be read",
            Check::CertOld => "a certificate older than the maximum age is still in use",
        }
    }

    /// What the operator should do.
    pub fn action(&self) -> &'static str {
        match self {
            Check::CaExpired => {
                "nothing this CA signed verifies any more: create a new PKI (provisioning init) and \
                 re-enroll what depended on it"
            }
            Check::CaExpiring => {
                "plan the CA's replacement now: certificates it signs never outlive it, so renewals \
                 shrink until it expires"
            }
            Check::SharedKey => {
                "a key was copied or generated badly: revoke every certificate listed \
                 (provisioning revoke --reason key-compromise) and re-enroll each device with a \
                 fresh key"
            }
            Check::RevokedAdmitted => {
                "the gateway did not have the CRL: check its crl file or [ca_service] pull \
                 (twofold_gateway_crl_number on its /metrics), then push the CRL \
                 (provisioning push-crl)"
            }
            Check::RevokedStillConnected => {
                "push the CRL to the gateways (provisioning push-crl) so they close the session; \
                 if that gateway restarted since, the session is already gone"
            }
            Check::CertExpiredStillSeen => {
                "the device cannot renew by itself: let it back in to renew \
                 (expired_grace_secs on the gateway and the CA service) or enroll it again"
            }
            Check::CertExpiring => {
                "the device has not renewed: check that it reaches the gateway and that the \
                 gateway has a [ca_service]; or enroll it again before it expires"
            }
            Check::WeakKey => {
                "Twofold issues P-256 keys only: find where this certificate came from, revoke it \
                 and enroll the device again"
            }
            Check::ClonedCertificate => {
                "the certificate is very likely on two devices: revoke it \
                 (provisioning revoke --reason key-compromise), re-enroll the real device, and \
                 find the other one by its address"
            }
            Check::StaleCrl => {
                "that gateway still admits devices revoked since: push the CRL \
                 (provisioning push-crl) and check its crl file or [ca_service] pull"
            }
            Check::AuditLogFailing => {
                "its audit log is in effect off: check the disk under its audit_log (full? \
                 read-only?) and the gateway's log for \"cannot write the audit log\""
            }
            Check::PolicyBroad => {
                "narrow the pattern to {device}, a named device or a group's members \
                 ({member:GROUP}); `provisioning policy explain` shows what it grants"
            }
            Check::AuditLogNotKept => {
                "set audit_log in its gateway.toml, so that refusals, clones and revoked \
                 sessions are kept in a file this audit can read"
            }
            Check::RenewalOverdue => {
                "renewal is due at two thirds of the lifetime: check the device is online, and \
                 the gateway's and CA service's logs for refused renewals"
            }
            Check::SimultaneousUse => {
                "once may be a device reconnecting from a new address before the old connection \
                 timed out; if it repeats, treat it as a cloned certificate"
            }
            Check::GatewayUnreadable => {
                "check the gateway runs and its metrics address; its CRL could not be compared"
            }
            Check::AuditLogDamaged => {
                "the checks that read audit logs skipped these lines: check the disk and that \
                 only the gateway writes the file"
            }
            Check::CertOld => {
                "the certificate outlived the age you allow: enroll the device again \
                 (or raise --max-age)"
            }
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One affected identity (or CA, gateway, log file) and what was seen.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Affected {
    pub name: String,
    pub detail: String,
}

/// One check that found something, with everything it found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Finding {
    pub check: Check,
    pub severity: Severity,
    pub title: &'static str,
    pub action: &'static str,
    pub affected: Vec<Affected>,
}

/// Thresholds; [`Options::new`] has the defaults.
#[derive(Clone, Debug)]
pub struct Options {
    pub now: OffsetDateTime,
    /// CA certificates expiring within this are reported.
    pub ca_warning: Duration,
    /// Device and service certificates expiring within this are reported.
    pub expiry_warning: Duration,
    /// Certificates issued longer ago than this are reported.
    pub max_age: Duration,
    /// An expired certificate is reported if its identity was seen in the
    /// audit logs within this.
    pub seen_within: Duration,
    /// How long after a revocation an admission is not yet a finding: the
    /// CRL's way to the gateways (a push takes a second, a pull up to its
    /// interval) and the clocks' difference.
    pub crl_grace: Duration,
    /// Times an identity is seen from the same two addresses at once
    /// before it is reported as cloned rather than as simultaneous use.
    pub clone_threshold: usize,
}

const DAY: u64 = 86_400;

impl Options {
    pub fn new(now: OffsetDateTime) -> Options {
        Options {
            now,
            ca_warning: Duration::from_secs(30 * DAY),
            expiry_warning: Duration::from_secs(7 * DAY),
            max_age: Duration::from_secs(365 * DAY),
            seen_within: Duration::from_secs(7 * DAY),
            clone_threshold: 3,
            crl_grace: Duration::from_secs(120),
        }
    }
}

/// What the audit reads.
pub struct Inputs<'a> {
    /// Every certificate in the registry.
    pub records: &'a [CertRecord],
    /// The registry's newest device CRL number.
    pub crl_number: u64,
    /// The gateways' audit logs, read by [`log::read`].
    pub log: &'a LogSummary,
    /// The gateways' `/metrics`, read by [`gateway::read`].
    pub gateways: &'a [GatewayReading],
    /// The gateways' topic policy, if one was given.
    pub policy: Option<&'a twofold_trust::policy::Policy>,
}

/// The audit's result: findings by severity, greatest first.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub at: String,
    pub certificates: usize,
    pub log_events: u64,
    pub gateways: usize,
    pub findings: Vec<Finding>,
}

impl Report {
    /// The greatest severity found, if anything was.
    pub fn worst(&self) -> Option<Severity> {
        self.findings.iter().map(|f| f.severity).max()
    }

    /// Affected items per check, every check listed.
    pub fn counts(&self) -> BTreeMap<Check, usize> {
        let mut counts: BTreeMap<Check, usize> = Check::ALL.iter().map(|c| (*c, 0)).collect();
        for f in &self.findings {
            *counts.entry(f.check).or_default() += f.affected.len();
        }
        counts
    }
}

/// Runs every check.
pub fn audit(inputs: &Inputs<'_>, options: &Options) -> Report {
    let mut found: BTreeMap<Check, Vec<Affected>> = BTreeMap::new();
    let mut add = |check: Check, name: &str, detail: String| {
        found.entry(check).or_default().push(Affected {
            name: name.to_owned(),
            detail,
        });
    };
    let now = options.now;
    let by_identity: HashMap<&str, &str> = inputs
        .records
        .iter()
        .filter_map(|r| Some((r.identity.as_deref()?, r.name.as_str())))
        .collect();

    // CAs: every unrevoked one.
    for r in inputs.records.iter().filter(|r| {
        matches!(r.kind, Kind::RootCa | Kind::DeviceCa | Kind::ServerCa) && r.revocation.is_none()
    }) {
        let what = format!("{} (serial {})", r.kind, r.serial);
        if r.not_after <= now {
            add(
                Check::CaExpired,
                &r.name,
                format!("{what} expired {}", day(r.not_after)),
            );
        } else if r.not_after <= later(now, options.ca_warning) {
            add(
                Check::CaExpiring,
                &r.name,
                format!("{what} expires {}", day(r.not_after)),
            );
        }
    }

    // Devices and services: the certificate each uses, the newest
    // committed one. A renewal awaiting the device's commit (`replaces`)
    // counts only if there is nothing else: a device stuck before its
    // commit still uses the old certificate, which may be expiring.
    let mut newest: HashMap<(Kind, &str), &CertRecord> = HashMap::new();
    for r in inputs.records.iter().filter(|r| r.kind.is_client()) {
        let slot = newest.entry((r.kind, r.name.as_str())).or_insert(r);
        let rank = |c: &CertRecord| (c.replaces.is_none(), c.issued_at, c.not_after);
        if rank(r) > rank(slot) {
            *slot = r;
        }
    }
    let mut newest: Vec<&CertRecord> = newest.into_values().collect();
    newest.sort_by(|a, b| a.name.cmp(&b.name));
    let seen_since = before(now, options.seen_within);
    for r in newest {
        let what = format!("{} {} (serial {})", r.kind, r.name, r.serial);
        if r.revocation.is_some() {
            continue;
        }
        if r.not_after <= now {
            let sighting = inputs
                .log
                .last_seen(r.identity.as_deref(), &r.serial.to_string());
            if let Some(s) = sighting.filter(|s| s.at >= seen_since) {
                add(
                    Check::CertExpiredStillSeen,
                    &r.name,
                    format!(
                        "{what} expired {}; last seen {} from {}",
                        day(r.not_after),
                        rfc3339(s.at),
                        s.peer
                    ),
                );
            }
            continue;
        }
        let due = twofold_trust::renewal::due_at(
            r.not_before.unix_timestamp(),
            r.not_after.unix_timestamp(),
            &r.name,
        );
        if r.not_after <= later(now, options.expiry_warning) {
            add(
                Check::CertExpiring,
                &r.name,
                format!("{what} expires {}", rfc3339(r.not_after)),
            );
        } else if now.unix_timestamp() >= due {
            let due = OffsetDateTime::from_unix_timestamp(due).unwrap_or(r.not_before);
            add(
                Check::RenewalOverdue,
                &r.name,
                format!(
                    "{what} was due for renewal {}, expires {}",
                    rfc3339(due),
                    rfc3339(r.not_after)
                ),
            );
        }
        if r.issued_at < before(now, options.max_age) {
            add(
                Check::CertOld,
                &r.name,
                format!("{what} issued {}", day(r.issued_at)),
            );
        }
    }

    // Keys: every certificate still valid.
    let mut holders: HashMap<Vec<u8>, Vec<&CertRecord>> = HashMap::new();
    for r in inputs.records.iter().filter(|r| r.not_after > now) {
        let Ok((_, cert)) = X509Certificate::from_der(&r.der) else {
            add(
                Check::WeakKey,
                &r.name,
                format!(
                    "{} serial {}: the stored certificate does not parse",
                    r.kind, r.serial
                ),
            );
            continue;
        };
        let spki = cert.public_key();
        if r.revocation.is_none()
            && let Some(key) = unexpected_key(spki)
        {
            add(
                Check::WeakKey,
                &r.name,
                format!("{} serial {}: {key}", r.kind, r.serial),
            );
        }
        holders
            .entry(spki.subject_public_key.data.to_vec())
            .or_default()
            .push(r);
    }
    let mut shared: Vec<Affected> = Vec::new();
    for group in holders.values() {
        let mut names: Vec<&str> = group.iter().map(|r| r.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        if names.len() < 2 {
            continue;
        }
        for r in group {
            let others: Vec<&str> = names.iter().copied().filter(|n| *n != r.name).collect();
            shared.push(Affected {
                name: r.name.clone(),
                detail: format!(
                    "{} serial {} has the same public key as {}",
                    r.kind,
                    r.serial,
                    others.join(", ")
                ),
            });
        }
    }
    for a in shared {
        add(Check::SharedKey, &a.name, a.detail);
    }

    // What the audit logs saw.
    let name_of = |identity: &str| -> String {
        by_identity
            .get(identity)
            .map_or_else(|| identity.to_owned(), |n| (*n).to_owned())
    };
    let revoked: HashMap<String, (&CertRecord, OffsetDateTime)> = inputs
        .records
        .iter()
        .filter_map(|r| Some((r.serial.to_string(), (r, r.revocation?.at))))
        .collect();
    for s in inputs.log.admissions.values() {
        if let Some((r, at)) = revoked.get(&s.serial)
            && s.at > later(*at, options.crl_grace)
        {
            add(
                Check::RevokedAdmitted,
                &r.name,
                format!(
                    "serial {} revoked {}, admitted {} from {} ({})",
                    s.serial,
                    rfc3339(*at),
                    rfc3339(s.at),
                    s.peer,
                    s.log
                ),
            );
        }
    }
    for s in &inputs.log.open_at_end {
        if let Some((r, at)) = revoked.get(&s.serial) {
            add(
                Check::RevokedStillConnected,
                &r.name,
                format!(
                    "serial {} revoked {}; connected {} from {} and no disconnect in {}",
                    s.serial,
                    rfc3339(*at),
                    rfc3339(s.at),
                    s.peer,
                    s.log
                ),
            );
        }
    }
    for (identity, overlaps) in &inputs.log.overlaps {
        let check = if overlaps.repeated >= options.clone_threshold {
            Check::ClonedCertificate
        } else {
            Check::SimultaneousUse
        };
        add(
            check,
            &name_of(identity),
            format!(
                "{} time(s) connected while connected from another address, the same two \
                 addresses {} time(s); addresses {}",
                overlaps.times,
                overlaps.repeated,
                overlaps.addresses.join(", ")
            ),
        );
    }
    for d in &inputs.log.damaged {
        add(Check::AuditLogDamaged, &d.log, d.to_string());
    }

    // The policy.
    if let Some(p) = inputs.policy {
        for a in policy::broad(p) {
            add(Check::PolicyBroad, &a.name, a.detail);
        }
    }

    // Gateways.
    for g in inputs.gateways {
        if let Some(n) = g.audit_write_errors.filter(|n| *n > 0) {
            add(
                Check::AuditLogFailing,
                &g.url,
                format!("{n} audit event(s) could not be written since it started"),
            );
        }
        if g.audit_to_file == Some(false) {
            add(
                Check::AuditLogNotKept,
                &g.url,
                "audit events go to standard output (no audit_log)".to_owned(),
            );
        }
        match &g.crl_number {
            Ok(n) if *n < inputs.crl_number => add(
                Check::StaleCrl,
                &g.url,
                format!(
                    "CRL number {n} in force; the registry's newest is {}",
                    inputs.crl_number
                ),
            ),
            Ok(_) => {}
            Err(e) => add(Check::GatewayUnreadable, &g.url, e.clone()),
        }
    }

    let mut findings: Vec<Finding> = found
        .into_iter()
        .map(|(check, mut affected)| {
            affected.sort();
            Finding {
                check,
                severity: check.severity(),
                title: check.title(),
                action: check.action(),
                affected,
            }
        })
        .collect();
    findings.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.check.cmp(&b.check)));
    Report {
        at: rfc3339(now),
        certificates: inputs.records.len(),
        log_events: inputs.log.events,
        gateways: inputs.gateways.len(),
        findings,
    }
}

/// What is wrong with a key that is not ECDSA P-256, if it is not.
fn unexpected_key(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Option<String> {
    let alg = &spki.algorithm;
    if alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = alg.parameters.as_ref().and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 => None,
            Some(c) => Some(format!("an EC key on curve {c}, not P-256")),
            None => Some("an EC key without a named curve".to_owned()),
        };
    }
    if alg.algorithm == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => rsa.key_size(),
            _ => 0,
        };
        return Some(format!("an RSA key of {bits} bits, not P-256"));
    }
    Some(format!("a key of algorithm {}, not P-256", alg.algorithm))
}

fn rfc3339(t: OffsetDateTime) -> String {
    crate::enrollment::rfc3339(t)
}

fn day(t: OffsetDateTime) -> String {
    t.date().to_string()
}

/// The report as Prometheus gauges (for node_exporter's textfile
/// collector): affected items per check and severity, every check listed
/// so that an alert resolves when its count drops to zero.
pub fn render_metrics(report: &Report) -> String {
    use prometheus::{Gauge, IntGaugeVec, Opts, Registry};
    let registry = Registry::new();
    // Names and labels are constants: these cannot fail at run time.
    let findings = IntGaugeVec::new(
        Opts::new(
            "twofold_audit_findings",
            "Identities (or CAs, gateways, logs) affected, by audit check and severity",
        ),
        &["check", "severity"],
    )
    .expect("static metric options");
    let at = Gauge::new(
        "twofold_audit_last_run_timestamp_seconds",
        "When the audit ran, Unix seconds",
    )
    .expect("static metric options");
    let _ = registry.register(Box::new(findings.clone()));
    let _ = registry.register(Box::new(at.clone()));
    for (check, n) in report.counts() {
        findings
            .with_label_values(&[check.as_str(), check.severity().as_str()])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    let now = OffsetDateTime::parse(&report.at, &time::format_description::well_known::Rfc3339)
        .map_or(0, |t| t.unix_timestamp());
    at.set(now as f64);
    prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap_or_default()
}

/// The report for people: each finding with its action and up to `shown`
/// of the items it affects, then a count by severity.
pub fn render_text(report: &Report, shown: usize) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "audit at {}: {} certificates, {} audit log events, {} gateway(s)",
        report.at, report.certificates, report.log_events, report.gateways
    );
    if report.findings.is_empty() {
        out.push_str("\nnothing found\n");
    }
    for f in &report.findings {
        let _ = writeln!(
            out,
            "\n{:<8}  {}  ({} affected)\n  {}\n  what to do: {}",
            f.severity.as_str().to_uppercase(),
            f.check,
            f.affected.len(),
            f.title,
            f.action
        );
        for a in f.affected.iter().take(shown) {
            let _ = writeln!(out, "  - {}: {}", a.name, a.detail);
        }
        if f.affected.len() > shown {
            let _ = writeln!(
                out,
                "  … and {} more (--json lists all)",
                f.affected.len() - shown
            );
        }
    }
    let counts: Vec<String> = Severity::ALL
        .iter()
        .rev()
        .map(|s| {
            let n: usize = report
                .findings
                .iter()
                .filter(|f| f.severity == *s)
                .map(|f| f.affected.len())
                .sum();
            format!("{n} {s}")
        })
        .collect();
    let _ = writeln!(out, "\nfound: {}", counts.join(", "));
    out
}

/// `now` less `d`, or the earliest time if that is before it.
fn before(now: OffsetDateTime, d: Duration) -> OffsetDateTime {
    time::Duration::try_from(d)
        .ok()
        .and_then(|d| now.checked_sub(d))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// `now` plus `d`, or the latest time if that is past it.
fn later(now: OffsetDateTime, d: Duration) -> OffsetDateTime {
    time::Duration::try_from(d)
        .ok()
        .and_then(|d| now.checked_add(d))
        .unwrap_or(time::PrimitiveDateTime::MAX.assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Serial;
    use crate::registry::{Revocation, RevocationReason};
    use rcgen::{CertificateParams, KeyPair};
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-12-01 12:00 UTC);
    const DAYS: time::Duration = time::Duration::DAY;

    fn p256() -> KeyPair {
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
    }

    /// A record for `name` valid from `from` for `life`, issued at `from`.
    fn cert(
        kind: Kind,
        name: &str,
        key: &KeyPair,
        from: OffsetDateTime,
        life: time::Duration,
    ) -> CertRecord {
        let mut params = CertificateParams::new(vec![format!("{name}.test")]).unwrap();
        params.not_before = from;
        params.not_after = from + life;
        let c = params.self_signed(key).unwrap();
        let serial = Serial::random();
        CertRecord {
            serial,
            kind,
            name: name.to_owned(),
            identity: kind
                .is_client()
                .then(|| format!("spiffe://td/{}/{name}", kind.as_str())),
            not_before: from,
            not_after: from + life,
            fingerprint: crate::pki::fingerprint(c.der()),
            issued_at: from,
            revocation: None,
            der: c.der().to_vec(),
            replaces: None,
        }
    }

    fn device(name: &str, from: OffsetDateTime, life: time::Duration) -> CertRecord {
        cert(Kind::Device, name, &p256(), from, life)
    }

    fn run(records: &[CertRecord], log: &LogSummary, gateways: &[GatewayReading]) -> Report {
        audit(
            &Inputs {
                records,
                crl_number: 5,
                log,
                gateways,
                policy: None,
            },
            &Options::new(NOW),
        )
    }

    /// The names each check found, for asserting both sides at once.
    fn found(report: &Report) -> BTreeMap<Check, Vec<String>> {
        report
            .findings
            .iter()
            .map(|f| (f.check, f.affected.iter().map(|a| a.name.clone()).collect()))
            .collect()
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_healthy_fleet_has_no_findings() {
        let records = vec![
            cert(Kind::RootCa, "root", &p256(), NOW - 10 * DAYS, 3650 * DAYS),
            cert(
                Kind::DeviceCa,
                "devices",
                &p256(),
                NOW - 10 * DAYS,
                1825 * DAYS,
            ),
            device("fresh", NOW - DAYS, 90 * DAYS),
            // Long expired, never seen again: decommissioned, not a finding.
            device("old", NOW - 400 * DAYS, 90 * DAYS),
        ];
        let report = run(&records, &LogSummary::default(), &[]);
        assert!(report.findings.is_empty(), "{:?}", found(&report));
        assert_eq!(report.worst(), None);
        assert!(render_text(&report, 5).contains("nothing found"));
    }

    #[test]
    fn cas_expiring_within_30_days_or_expired() {
        let records = vec![
            cert(Kind::RootCa, "root", &p256(), NOW - 10 * DAYS, 3650 * DAYS),
            cert(
                Kind::DeviceCa,
                "devices",
                &p256(),
                NOW - 300 * DAYS,
                320 * DAYS,
            ),
            cert(
                Kind::ServerCa,
                "servers",
                &p256(),
                NOW - 300 * DAYS,
                299 * DAYS,
            ),
        ];
        let report = run(&records, &LogSummary::default(), &[]);
        let f = found(&report);
        assert_eq!(f[&Check::CaExpiring], names(&["devices"]));
        assert_eq!(f[&Check::CaExpired], names(&["servers"]));
        assert_eq!(report.worst(), Some(Severity::Critical));
        // Ordered by severity, greatest first.
        assert_eq!(report.findings[0].check, Check::CaExpired);
    }

    #[test]
    fn device_certificates_expiring_overdue_or_old() {
        let mut renewed_old = device("renewed", NOW - 80 * DAYS, 90 * DAYS);
        renewed_old.revocation = Some(Revocation {
            at: NOW - DAYS,
            reason: RevocationReason::Superseded,
        });
        let records = vec![
            // 2/3 of 90 days is day 60: due, 20 days left.
            device("overdue", NOW - 70 * DAYS, 90 * DAYS),
            device("expiring", NOW - 85 * DAYS, 90 * DAYS),
            // Issued 400 days ago, valid two years: too old, not yet due.
            device("ancient", NOW - 400 * DAYS, 730 * DAYS),
            // Renewed: the old certificate does not count.
            renewed_old,
            device("renewed", NOW - DAYS, 90 * DAYS),
            // Not yet due.
            device("young", NOW - 50 * DAYS, 90 * DAYS),
        ];
        let f = found(&run(&records, &LogSummary::default(), &[]));
        assert_eq!(f[&Check::RenewalOverdue], names(&["overdue"]));
        assert_eq!(f[&Check::CertExpiring], names(&["expiring"]));
        assert_eq!(f[&Check::CertOld], names(&["ancient"]));
        assert_eq!(f.len(), 3, "{f:?}");
    }

    #[test]
    fn a_renewal_awaiting_its_commit_does_not_hide_the_expiring_certificate() {
        let old = device("stuck", NOW - 88 * DAYS, 90 * DAYS);
        let mut pending = device("stuck", NOW - DAYS, 90 * DAYS);
        pending.replaces = Some(old.serial.clone());
        let f = found(&run(&[old, pending], &LogSummary::default(), &[]));
        assert_eq!(f[&Check::CertExpiring], names(&["stuck"]), "{f:?}");
    }

    #[test]
    fn an_expired_certificate_is_reported_only_if_its_device_was_seen_lately() {
        let seen = device("seen", NOW - 100 * DAYS, 90 * DAYS);
        let refused = device("refused", NOW - 100 * DAYS, 90 * DAYS);
        let gone = device("gone", NOW - 100 * DAYS, 90 * DAYS);
        let mut log = LogSummary::default();
        let at = |d| Sighting {
            at: NOW - DAYS * d,
            peer: "10.0.0.1:1".into(),
        };
        log.by_identity
            .insert(seen.identity.clone().unwrap(), at(1));
        // Refused at the handshake: only the certificate's serial is logged.
        log.by_serial.insert(refused.serial.to_string(), at(2));
        log.by_identity
            .insert(gone.identity.clone().unwrap(), at(30));
        let f = found(&run(&[seen, refused, gone], &log, &[]));
        assert_eq!(f[&Check::CertExpiredStillSeen], names(&["refused", "seen"]));
        assert_eq!(f.len(), 1, "{f:?}");
    }

    #[test]
    fn keys_other_than_p256_and_keys_on_two_identities() {
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let shared = p256();
        let records = vec![
            cert(Kind::Device, "p384", &p384, NOW - DAYS, 90 * DAYS),
            cert(Kind::Device, "ed", &ed, NOW - DAYS, 90 * DAYS),
            cert(Kind::Device, "twin-a", &shared, NOW - DAYS, 90 * DAYS),
            cert(Kind::Device, "twin-b", &shared, NOW - DAYS, 90 * DAYS),
            // One device keeping its key across a renewal is not sharing.
            cert(Kind::Device, "same", &p256(), NOW - DAYS, 90 * DAYS),
        ];
        let mut records = records;
        let same_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        records.push(cert(
            Kind::Device,
            "kept",
            &same_key,
            NOW - 70 * DAYS,
            90 * DAYS,
        ));
        records.push(cert(Kind::Device, "kept", &same_key, NOW - DAYS, 90 * DAYS));
        let report = run(&records, &LogSummary::default(), &[]);
        let f = found(&report);
        assert_eq!(f[&Check::WeakKey], names(&["ed", "p384"]));
        assert_eq!(f[&Check::SharedKey], names(&["twin-a", "twin-b"]));
        assert_eq!(f.len(), 2, "{f:?}");
        let weak = &report
            .findings
            .iter()
            .find(|f| f.check == Check::WeakKey)
            .unwrap();
        assert!(
            weak.affected[1].detail.contains("curve 1.3.132.0.34"),
            "{weak:?}"
        );
        assert!(weak.affected[0].detail.contains("1.3.101.112"), "{weak:?}");
    }

    #[test]
    fn revoked_certificates_admitted_after_revocation_or_still_connected() {
        let mut late = device("late", NOW - 10 * DAYS, 90 * DAYS);
        let mut open = device("open", NOW - 10 * DAYS, 90 * DAYS);
        let mut closed = device("closed", NOW - 10 * DAYS, 90 * DAYS);
        for r in [&mut late, &mut open, &mut closed] {
            r.revocation = Some(Revocation {
                at: NOW - DAYS,
                reason: RevocationReason::KeyCompromise,
            });
        }
        let fine = device("fine", NOW - 10 * DAYS, 90 * DAYS);
        // Admitted a minute after its revocation: the CRL was on its way.
        let mut soon = device("soon", NOW - 10 * DAYS, 90 * DAYS);
        soon.revocation = Some(Revocation {
            at: NOW - time::Duration::MINUTE,
            reason: RevocationReason::KeyCompromise,
        });
        let admission = |r: &CertRecord, days_ago: i64| log::Admission {
            at: NOW - DAYS * days_ago as i32,
            serial: r.serial.to_string(),
            peer: "10.0.0.1:1".into(),
            log: "gw.jsonl".into(),
        };
        let mut log = LogSummary::default();
        for (r, ago) in [(&late, 0), (&open, 2), (&closed, 2), (&fine, 0)] {
            log.admissions
                .insert(r.serial.to_string(), admission(r, ago));
        }
        log.admissions
            .insert(soon.serial.to_string(), admission(&soon, 0));
        log.open_at_end = vec![admission(&open, 2), admission(&fine, 0)];
        let f = found(&run(&[late, open, closed, fine, soon], &log, &[]));
        assert_eq!(f[&Check::RevokedAdmitted], names(&["late"]));
        assert_eq!(f[&Check::RevokedStillConnected], names(&["open"]));
        assert_eq!(f.len(), 2, "{f:?}");
    }

    #[test]
    fn simultaneous_use_becomes_a_clone_at_the_threshold() {
        let a = device("a", NOW - DAYS, 90 * DAYS);
        let b = device("b", NOW - DAYS, 90 * DAYS);
        let mut log = LogSummary::default();
        let overlaps = |times| log::Overlaps {
            times,
            repeated: times,
            addresses: vec!["10.0.0.1".into(), "10.0.0.2".into()],
            ..Default::default()
        };
        log.overlaps
            .insert(a.identity.clone().unwrap(), overlaps(1));
        log.overlaps
            .insert(b.identity.clone().unwrap(), overlaps(3));
        let f = found(&run(&[a, b], &log, &[]));
        assert_eq!(f[&Check::SimultaneousUse], names(&["a"]));
        assert_eq!(f[&Check::ClonedCertificate], names(&["b"]));
    }

    #[test]
    fn gateways_behind_the_registry_or_unreadable() {
        let reading = |url: &str, n: Result<u64, String>| GatewayReading {
            url: url.into(),
            crl_number: n,
            audit_to_file: Some(true),
            audit_write_errors: Some(0),
        };
        let gateways = [
            reading("http://gw-1/metrics", Ok(5)),
            reading("http://gw-2/metrics", Ok(4)),
            reading("http://gw-3/metrics", Err("connection refused".into())),
        ];
        let report = run(&[], &LogSummary::default(), &gateways);
        let f = found(&report);
        assert!(!f.contains_key(&Check::AuditLogFailing), "{f:?}");
        assert!(!f.contains_key(&Check::AuditLogNotKept), "{f:?}");
        assert_eq!(f[&Check::StaleCrl], names(&["http://gw-2/metrics"]));
        assert_eq!(
            f[&Check::GatewayUnreadable],
            names(&["http://gw-3/metrics"])
        );
        let text = render_text(&report, 5);
        assert!(
            text.contains("CRL number 4 in force; the registry's newest is 5"),
            "{text}"
        );
        assert!(
            text.contains("found: 0 critical, 1 high, 1 medium, 0 low, 0 info"),
            "{text}"
        );
    }

    #[test]
    fn gateways_whose_audit_events_are_lost_or_not_kept() {
        let reading = |url: &str, file, errors| GatewayReading {
            url: url.into(),
            crl_number: Ok(5),
            audit_to_file: file,
            audit_write_errors: errors,
        };
        let gateways = [
            reading("http://full", Some(true), Some(12)),
            reading("http://stdout", Some(false), Some(0)),
            // An older gateway says neither: nothing to report.
            reading("http://old", None, None),
        ];
        let report = run(&[], &LogSummary::default(), &gateways);
        let f = found(&report);
        assert_eq!(f[&Check::AuditLogFailing], names(&["http://full"]));
        assert_eq!(f[&Check::AuditLogNotKept], names(&["http://stdout"]));
        assert_eq!(f.len(), 2, "{f:?}");
        let text = render_text(&report, 5);
        assert!(
            text.contains("12 audit event(s) could not be written"),
            "{text}"
        );
    }

    #[test]
    fn gauges_list_every_check_and_count_what_was_found() {
        let gateways = [GatewayReading {
            url: "http://gw".into(),
            crl_number: Ok(1),
            audit_to_file: None,
            audit_write_errors: None,
        }];
        let text = render_metrics(&run(&[], &LogSummary::default(), &gateways));
        assert!(
            text.contains(r#"twofold_audit_findings{check="stale-crl",severity="high"} 1"#),
            "{text}"
        );
        for check in Check::ALL {
            assert!(text.contains(&format!("check=\"{check}\"")), "{check}");
        }
    }
}
