//! `agent doctor`: walks from the config file to an MQTT CONNACK and
//! prints one line per check, each with a verdict and, when something is
//! wrong, what to do about it.
//!
//! The network checks go as far as they can even when a local check has
//! failed (an expired certificate is still offered to the gateway), so the
//! person at the board also sees the gateway's own reason.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, Packet};
use rumqttc::{ConnectReturnCode, Disconnect};
use rustls::pki_types::ServerName;
use rustls::{AlertDescription, CertificateError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::{Config, CrlFetch, IdentityPaths, KeyStore};
use crate::crl_fetch::{self, Served};
use crate::gateway_cert::GatewayRefusal;
use crate::identity::{self, Expiry};

/// How long DNS, TCP, the TLS handshake and the CONNACK may each take.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// A CONNACK is a few bytes; anything bigger than this is not one.
const MAX_REPLY: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
    /// Not run because an earlier check failed.
    Skip,
}

/// One checked step.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    /// What to do; empty when nothing needs doing.
    pub fix: String,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tag = match self.verdict {
            Verdict::Ok => "[ OK ]",
            Verdict::Warn => "[WARN]",
            Verdict::Fail => "[FAIL]",
            Verdict::Skip => "[SKIP]",
        };
        write!(f, "{tag} {:<10} {}", self.name, self.detail)?;
        if !self.fix.is_empty() {
            write!(f, " -- fix: {}", self.fix)?;
        }
        Ok(())
    }
}

/// The checks so far, printed as they are made.
pub struct Report<W: Write> {
    out: W,
    pub checks: Vec<Check>,
}

impl<W: Write> Report<W> {
    pub fn new(out: W) -> Self {
        Report {
            out,
            checks: Vec::new(),
        }
    }

    fn add(&mut self, name: &'static str, verdict: Verdict, detail: String, fix: &str) {
        let check = Check {
            name,
            verdict,
            detail,
            fix: fix.to_owned(),
        };
        let _ = writeln!(self.out, "{check}");
        let _ = self.out.flush();
        self.checks.push(check);
    }

    fn ok(&mut self, name: &'static str, detail: String) {
        self.add(name, Verdict::Ok, detail, "");
    }

    fn fail(&mut self, name: &'static str, detail: String, fix: &str) {
        self.add(name, Verdict::Fail, detail, fix);
    }

    fn skip(&mut self, name: &'static str) {
        self.add(
            name,
            Verdict::Skip,
            "not checked".into(),
            "fix the failures above first",
        );
    }

    pub fn failed(&self) -> bool {
        self.checks.iter().any(|c| c.verdict == Verdict::Fail)
    }
}

fn date(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

const RE_ENROLL: &str = "make a new key and CSR on the board (agent keygen --out DIR --id ID --trust-domain TD), have the operator run provisioning sign-csr on it, and install the new device.pem";
const SYNC_CLOCK: &str = "set the clock right (timedatectl set-ntp true; a board without a real-time clock needs the network time first)";

/// The key file belongs to the certificate.
fn file_key_check<W: Write>(
    paths: &IdentityPaths,
    chain: &[rustls::pki_types::CertificateDer<'static>],
    report: &mut Report<W>,
) -> bool {
    match identity::signing_key(&paths.key, &paths.cert, chain) {
        Ok(_) => {
            report.ok(
                "key",
                format!(
                    "{} belongs to the certificate in {}",
                    paths.key,
                    paths.cert.display()
                ),
            );
            true
        }
        Err(e) => {
            report.fail(
                "key",
                e.to_string(),
                "use the key that made the CSR for this certificate, or enroll again",
            );
            false
        }
    }
}

/// The token: its module loads, it is there, the PIN opens it (and a PIN
/// file is private); then the key: there, the certificate's, and kept
/// from export. One line each, with the token's own fix on failure.
fn token_checks<W: Write>(
    spec: &twofold_token::TokenSpec,
    label: &str,
    paths: &IdentityPaths,
    chain: &[rustls::pki_types::CertificateDer<'static>],
    report: &mut Report<W>,
) -> bool {
    if let twofold_token::PinSource::File(pin) = &spec.pin
        && let Err(identity::IdentityError::KeyExposed { path, mode }) =
            identity::check_key_mode(pin)
    {
        report.fail(
            "token",
            format!(
                "the PIN file {} is readable by others (mode {mode:o})",
                path.display()
            ),
            &format!(
                "chmod 600 {} (and chown it to the agent's user)",
                path.display()
            ),
        );
        report.skip("key");
        return false;
    }
    let token = match twofold_token::Token::open(spec) {
        Ok(token) => {
            report.ok(
                "token",
                format!(
                    "token \"{}\" in {}: logged in with the PIN from {}",
                    spec.token,
                    spec.module.display(),
                    spec.pin
                ),
            );
            token
        }
        Err(e) => {
            report.fail("token", e.to_string(), &e.fix());
            report.skip("key");
            return false;
        }
    };
    let Some(point) = twofold_token::public_point_of_cert(&chain[0]) else {
        report.fail(
            "key",
            format!("the key in {} is not P-256", paths.cert.display()),
            "enroll again with a key made in the token (agent keygen --config …)",
        );
        return false;
    };
    let key = match token.key_for(label, &point) {
        Ok(key) => key,
        Err(e) => {
            report.fail("key", e.to_string(), &e.fix());
            return false;
        }
    };
    if let Err(e) = identity::signing_key(&paths.key, &paths.cert, chain) {
        report.fail("key", e.to_string(), "check the token, then enroll again");
        return false;
    }
    match key.protection() {
        Ok(p) if p.sensitive && !p.extractable && p.value_refused => {
            report.ok(
                "key",
                format!(
                    "\"{label}\" (id {}) in token \"{}\" belongs to the certificate in {}; the token keeps it sensitive and unextractable",
                    hex::encode(&key.info().id),
                    spec.token,
                    paths.cert.display()
                ),
            );
            true
        }
        Ok(p) => {
            report.fail(
                "key",
                format!(
                    "\"{label}\" in token \"{}\" can leave it (sensitive: {}, extractable: {}, value readable: {})",
                    spec.token, p.sensitive, p.extractable, !p.value_refused
                ),
                "make a new key in the token with agent keygen --config … (its keys are sensitive and never extractable), enroll again, and revoke this certificate",
            );
            false
        }
        Err(e) => {
            report.fail("key", e.to_string(), &e.fix());
            false
        }
    }
}

/// Runs every check for the agent configured in `config_path`, with the
/// local clock at `now` (Unix seconds).
pub async fn diagnose<W: Write>(config_path: &Path, now: i64, report: &mut Report<W>) {
    let config = match Config::load(config_path) {
        Ok(c) => {
            report.ok("config", format!("{} is valid", config_path.display()));
            c
        }
        Err(e) => {
            report.fail(
                "config",
                format!("{e:#}"),
                "correct the file (agent.example.toml documents every key)",
            );
            return;
        }
    };
    let local_ok = local_checks(&config, now, report);
    network_checks(&config, now, local_ok, report).await;
}

/// The files, the key, the certificate and the server CA. True when the
/// identity can be offered to a gateway at all.
fn local_checks<W: Write>(config: &Config, now: i64, report: &mut Report<W>) -> bool {
    let paths = &config.identity;
    let mut missing = Vec::new();
    let key_file = match &paths.key {
        KeyStore::File(path) => Some(path),
        KeyStore::Token { .. } => None,
    };
    for path in [Some(&paths.cert), key_file, Some(&paths.server_ca)]
        .into_iter()
        .flatten()
    {
        if let Err(e) = std::fs::File::open(path) {
            missing.push(format!("{}: {e}", path.display()));
        }
    }
    if !missing.is_empty() {
        report.fail(
            "files",
            missing.join("; "),
            "put the bundle from `provisioning enroll` (or your signed device.pem with server-ca.pem) where [identity] points, readable by the agent's user",
        );
        for name in ["key", "identity", "validity", "chain", "server CA"] {
            report.skip(name);
        }
        return false;
    }
    match key_file.map(|path| identity::check_key_mode(path)) {
        None => report.ok(
            "files",
            format!(
                "{} and {} are present; the key is in a token",
                paths.cert.display(),
                paths.server_ca.display()
            ),
        ),
        Some(Ok(())) => report.ok(
            "files",
            format!(
                "{}, {} and {} are present; the key is private to its owner",
                paths.cert.display(),
                paths.key,
                paths.server_ca.display()
            ),
        ),
        Some(Err(identity::IdentityError::KeyExposed { path, mode })) => report.fail(
            "files",
            format!("{} is readable by others (mode {mode:o})", path.display()),
            &format!(
                "chmod 600 {} (and chown it to the agent's user)",
                path.display()
            ),
        ),
        Some(Err(e)) => report.fail(
            "files",
            e.to_string(),
            "make the key readable by the agent only",
        ),
    }

    let chain = match identity::load_certs(&paths.cert) {
        Ok(c) => c,
        Err(e) => {
            report.fail(
                "key",
                e.to_string(),
                "device.pem must hold the PEM certificate chain written by provisioning",
            );
            for name in ["identity", "validity", "chain", "server CA"] {
                report.skip(name);
            }
            return false;
        }
    };
    let key_ok = match &paths.key {
        KeyStore::Token { spec, label } => token_checks(spec, label, paths, &chain, report),
        KeyStore::File(_) => file_key_check(paths, &chain, report),
    };

    let identity_ok = match identity::device_of(&chain[0], &paths.cert) {
        Ok((id, uri)) => {
            report.ok("identity", format!("device {} ({uri})", id.as_str()));
            true
        }
        Err(e) => {
            report.fail(
                "identity",
                e.to_string(),
                "this is not a device certificate from a Twofold PKI; enroll the device",
            );
            false
        }
    };

    let leaf = X509Certificate::from_der(&chain[0]).ok().map(|(_, c)| c);
    match &leaf {
        Some(leaf) => {
            let id = identity::device_of(&chain[0], &paths.cert)
                .map(|(id, _)| id.as_str().to_owned())
                .unwrap_or_default();
            validity(leaf, &id, now, report);
            renewal(paths, now, report);
        }
        None => report.skip("validity"),
    }
    match &leaf {
        Some(leaf) => issuer_chain(leaf, &chain[1..], now, report),
        None => report.skip("chain"),
    }
    server_ca(&paths.server_ca, now, report);
    let crl_ok = server_crl(paths, now, report);
    if let Some(fetch) = &config.server_crl_fetch {
        crl_url(fetch, paths, report);
    }
    key_ok && identity_ok && crl_ok
}

/// identity.server_crl_url: what it serves now, as the running agent would
/// judge it. Never a failure: the file's CRL stays in force meanwhile.
fn crl_url<W: Write>(fetch: &CrlFetch, paths: &IdentityPaths, report: &mut Report<W>) {
    let number = |n: Option<u64>| n.map_or_else(|| "none".to_owned(), |n| n.to_string());
    match crl_fetch::fetch(&fetch.url, paths, &Default::default()) {
        Ok(Served {
            older: Some(why), ..
        }) => report.add(
            "CRL URL",
            Verdict::Warn,
            format!(
                "{} serves a CRL older than the file's ({why}); the agent keeps the file's",
                fetch.url,
            ),
            "publish the PKI's current server CRL there (provisioning crl --server --der)",
        ),
        Ok(served) => report.ok(
            "CRL URL",
            format!(
                "{} serves the server CA's CRL number {} (the file's: {}), fetched every {} s",
                fetch.url,
                number(served.number),
                number(served.in_force),
                fetch.every.as_secs()
            ),
        ),
        Err(e) => report.add(
            "CRL URL",
            Verdict::Warn,
            e,
            "check identity.server_crl_url and that the device can reach it; meanwhile the file's CRL stays in force",
        ),
    }
}

/// server-crl.pem, when there is one, must be the server CA's own CRL:
/// the agent refuses to start with any other.
fn server_crl<W: Write>(
    paths: &crate::config::IdentityPaths,
    now: i64,
    report: &mut Report<W>,
) -> bool {
    // A bundle's missing file is a warning; one that cannot be looked at
    // (permissions) is read below, and fails with the reason.
    let Some(path) = paths
        .server_crl
        .as_ref()
        .filter(|p| paths.server_crl_required || !matches!(p.try_exists(), Ok(false)))
    else {
        let place = paths.server_crl.as_ref().map_or_else(
            || "set identity.server_crl to it".to_owned(),
            |p| format!("copy it to {}; a running agent takes it", p.display()),
        );
        report.add(
            "server CRL",
            Verdict::Warn,
            "none: the gateway's certificate is not checked for revocation".into(),
            &format!(
                "give the device the PKI's server-crl.pem (provisioning writes it in new bundles): {place}"
            ),
        );
        return true;
    };
    // A server CA that does not load is reported above, with its fix.
    let Ok(cas) = identity::load_certs(&paths.server_ca) else {
        report.skip("server CRL");
        return true;
    };
    let crls = match identity::load_server_crl(path, &cas) {
        Ok(crls) => crls,
        Err(e) => {
            report.fail(
                "server CRL",
                e.to_string(),
                "use the server-crl.pem of the PKI whose server-ca.pem this device trusts",
            );
            return false;
        }
    };
    let mut details = Vec::new();
    let mut stale = false;
    for taken in &crls {
        if let Ok((_, crl)) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(&taken.der)
        {
            let next = crl.next_update().map(|t| t.timestamp());
            stale |= next.is_some_and(|t| t <= now);
            details.push(format!(
                "{} revoked gateway certificate(s), next update {}",
                crl.iter_revoked_certificates().count(),
                next.map_or_else(|| "none".to_owned(), date)
            ));
        }
    }
    if stale {
        report.add(
            "server CRL",
            Verdict::Warn,
            format!("out of date: {}", details.join("; ")),
            "get a fresh server-crl.pem from the operator (provisioning crl --server)",
        );
    } else {
        report.ok("server CRL", details.join("; "));
    }
    true
}

fn validity<W: Write>(leaf: &X509Certificate<'_>, id: &str, now: i64, report: &mut Report<W>) {
    let not_before = leaf.validity().not_before.timestamp();
    let not_after = leaf.validity().not_after.timestamp();
    let clock = format!("local clock {}", date(now));
    match identity::expiry(not_before, not_after, now, id) {
        Expiry::Fine => report.ok(
            "validity",
            format!(
                "valid until {} ({} days left; {clock})",
                date(not_after),
                (not_after - now) / 86_400
            ),
        ),
        Expiry::RenewSoon { days_left } => report.add(
            "validity",
            Verdict::Warn,
            format!(
                "renewal is due (two thirds of the lifetime): expires {} ({days_left} days left; {clock})",
                date(not_after)
            ),
            RE_ENROLL,
        ),
        Expiry::Expired => report.fail(
            "validity",
            format!("the certificate expired on {} ({clock})", date(not_after)),
            &format!(
                "if the clock is right: {RE_ENROLL}; if the clock is ahead: {SYNC_CLOCK}"
            ),
        ),
        Expiry::NotYetValid => report.fail(
            "validity",
            format!(
                "the certificate is valid only from {} but the {clock}: the clock is probably behind",
                date(not_before)
            ),
            SYNC_CLOCK,
        ),
    }
}

/// Where renewal through the gateway stands: when it is due (as the
/// gateway last said), the last attempt and the last answer.
fn renewal<W: Write>(paths: &IdentityPaths, now: i64, report: &mut Report<W>) {
    let state = crate::renew::Renewal::read_state(paths);
    let mut said = Vec::new();
    match state.due {
        Some(due) if due <= now => said.push(format!("due since {}", date(due))),
        Some(due) => said.push(format!("due {}", date(due))),
        None => said.push("not scheduled yet (the gateway has not sent a status)".into()),
    }
    if let Some(at) = state.last_attempt {
        said.push(format!("last attempt {}", date(at)));
    }
    if let Some(answer) = &state.last_answer {
        said.push(format!("last answer: {answer}"));
    }
    if state.request_id.is_some() {
        said.push("a request is out".into());
    }
    let refused = state.last_answer.as_deref().is_some_and(|a| {
        a.starts_with("refused (Revoked")
            || a.starts_with("refused (NotLatest")
            || a.starts_with("refused (Expired")
    });
    if refused {
        report.add("renewal", Verdict::Warn, said.join("; "), RE_ENROLL);
    } else {
        report.ok("renewal", said.join("; "));
    }
}

/// The device CA that follows the leaf in device.pem must have signed it.
fn issuer_chain<W: Write>(
    leaf: &X509Certificate<'_>,
    rest: &[rustls::pki_types::CertificateDer<'static>],
    now: i64,
    report: &mut Report<W>,
) {
    let Some(ca_der) = rest.first() else {
        report.add(
            "chain",
            Verdict::Warn,
            "device.pem holds only the device certificate, not its CA".into(),
            "fine if the gateway's client_ca holds the device CA; provisioning writes both",
        );
        return;
    };
    let ca = match X509Certificate::from_der(ca_der) {
        Ok((_, ca)) => ca,
        Err(e) => {
            report.fail(
                "chain",
                format!("the second certificate in device.pem does not parse: {e}"),
                "use the device.pem written by provisioning",
            );
            return;
        }
    };
    if let Err(e) = leaf.verify_signature(Some(ca.public_key())) {
        report.fail(
            "chain",
            format!(
                "\"{}\" in device.pem did not sign the device certificate ({e})",
                ca.subject()
            ),
            "device.pem mixes two enrollments; use the one provisioning wrote",
        );
        return;
    }
    let expired = ca.validity().not_after.timestamp() <= now;
    if expired {
        report.fail(
            "chain",
            format!(
                "the device CA \"{}\" expired on {}",
                ca.subject(),
                date(ca.validity().not_after.timestamp())
            ),
            "the operator must renew the device CA and enroll the fleet again",
        );
    } else {
        report.ok("chain", format!("signed by \"{}\"", ca.subject()));
    }
}

/// server-ca.pem must hold CA certificates that are valid now.
fn server_ca<W: Write>(path: &Path, now: i64, report: &mut Report<W>) {
    let certs = match identity::load_certs(path) {
        Ok(c) => c,
        Err(e) => {
            report.fail(
                "server CA",
                e.to_string(),
                "server-ca.pem must be the server CA of the operator's PKI (provisioning writes it in each bundle)",
            );
            return;
        }
    };
    let mut names = Vec::new();
    for der in &certs {
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            report.fail(
                "server CA",
                format!("{}: a certificate does not parse", path.display()),
                "use the server-ca.pem written by provisioning",
            );
            return;
        };
        let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        if !is_ca {
            report.fail(
                "server CA",
                format!(
                    "{}: \"{}\" is not a CA certificate",
                    path.display(),
                    cert.subject()
                ),
                "server-ca.pem must hold the CA that signs the gateway's certificate, not a leaf",
            );
            return;
        }
        if cert.validity().not_after.timestamp() <= now {
            report.fail(
                "server CA",
                format!(
                    "\"{}\" expired on {}",
                    cert.subject(),
                    date(cert.validity().not_after.timestamp())
                ),
                "get the current server-ca.pem from the operator (or set the clock right if it is ahead)",
            );
            return;
        }
        names.push(format!("\"{}\"", cert.subject()));
    }
    report.ok("server CA", format!("trusting only {}", names.join(", ")));
}

async fn network_checks<W: Write>(
    config: &Config,
    now: i64,
    identity_ok: bool,
    report: &mut Report<W>,
) {
    let target = format!("{}:{}", config.host, config.port);
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(
        STEP_TIMEOUT,
        tokio::net::lookup_host((config.host.as_str(), config.port)),
    )
    .await
    {
        Ok(Ok(a)) => a.collect(),
        Ok(Err(e)) => {
            report.fail(
                "dns",
                format!("{} does not resolve: {e}", config.host),
                "check [gateway] host, and the board's DNS (/etc/resolv.conf)",
            );
            Vec::new()
        }
        Err(_) => {
            report.fail(
                "dns",
                format!("no answer for {} within {STEP_TIMEOUT:?}", config.host),
                "check the board's DNS server and its network",
            );
            Vec::new()
        }
    };
    if addrs.is_empty() {
        for name in ["tcp", "tls", "mqtt"] {
            report.skip(name);
        }
        return;
    }
    report.ok(
        "dns",
        format!(
            "{} is {}",
            config.host,
            addrs
                .iter()
                .map(|a| a.ip().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );

    let mut tcp = None;
    let mut errors = Vec::new();
    for addr in &addrs {
        match tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                tcp = Some((s, *addr));
                break;
            }
            Ok(Err(e)) => errors.push(format!("{addr}: {e}")),
            Err(_) => errors.push(format!("{addr}: no answer within {STEP_TIMEOUT:?}")),
        }
    }
    let Some((tcp, addr)) = tcp else {
        report.fail(
            "tcp",
            format!("cannot reach {target}: {}", errors.join("; ")),
            "is the gateway running and listening on this port? (\"connection refused\": nothing listens there; \"no answer\": a firewall drops the packets)",
        );
        for name in ["tls", "mqtt"] {
            report.skip(name);
        }
        return;
    };
    report.ok("tcp", format!("connected to {addr}"));

    if !identity_ok {
        for name in ["tls", "mqtt"] {
            report.skip(name);
        }
        return;
    }
    let me = match identity::build(&config.identity) {
        Ok(me) => me,
        Err(e) => {
            report.fail("tls", e.to_string(), "fix the local checks above first");
            report.skip("mqtt");
            return;
        }
    };
    let Ok(server_name) = ServerName::try_from(config.host.clone()) else {
        report.fail(
            "tls",
            format!("{} is not a valid TLS server name", config.host),
            "set [gateway] host to a DNS name or IP address in the gateway's certificate",
        );
        report.skip("mqtt");
        return;
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&me.tls));
    let mut tls =
        match tokio::time::timeout(STEP_TIMEOUT, connector.connect(server_name, tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let (detail, fix) = tls_failure(&e, &config.host, now);
                report.fail("tls", detail, &fix);
                report.skip("mqtt");
                return;
            }
            Err(_) => {
                report.fail(
                    "tls",
                    format!("no TLS handshake with {addr} within {STEP_TIMEOUT:?}"),
                    "check that this port is the gateway's device port (8883), not another service",
                );
                report.skip("mqtt");
                return;
            }
        };
    let version = tls
        .get_ref()
        .1
        .protocol_version()
        .map(|v| format!("{v:?}"))
        .unwrap_or_default();

    // With TLS 1.3 the gateway judges our certificate after our side of
    // the handshake is done: its verdict arrives with the first read.
    let mut out = BytesMut::new();
    let mut connect = Connect::new(me.id.as_str());
    connect.keep_alive = 30;
    if let Err(e) = connect.write(&mut out) {
        report.fail("tls", format!("cannot encode CONNECT: {e}"), "");
        return;
    }
    let reply = tokio::time::timeout(STEP_TIMEOUT, async {
        tls.write_all(&out).await?;
        tls.flush().await?;
        read_connack(&mut tls).await
    })
    .await;
    let accepted = format!(
        "{version} with {}; the gateway accepted our certificate",
        config.host
    );
    match reply {
        Err(_) => {
            report.ok("tls", accepted.clone());
            report.fail(
                "mqtt",
                format!("no CONNACK within {STEP_TIMEOUT:?}"),
                "the gateway is overloaded or its broker is down; look at its log",
            );
        }
        Ok(Err(e)) if rustls_error(&e).is_some() => {
            let (detail, fix) = tls_failure(&e, &config.host, now);
            report.fail("tls", detail, &fix);
            report.skip("mqtt");
        }
        Ok(Err(e)) => {
            report.ok("tls", accepted.clone());
            report.fail(
                "mqtt",
                format!("the gateway closed the session without a CONNACK: {e}"),
                "the gateway's audit log says why (search it for this device's id)",
            );
        }
        Ok(Ok(ack)) => {
            report.ok("tls", accepted.clone());
            match ack.code {
                ConnectReturnCode::Success => {
                    report.ok(
                        "mqtt",
                        format!("CONNACK accepted device {}", me.id.as_str()),
                    );
                    let mut bye = BytesMut::new();
                    if Disconnect.write(&mut bye).is_ok() {
                        let _ = tls.write_all(&bye).await;
                    }
                    let _ = tls.shutdown().await;
                }
                code => {
                    let fix = match code {
                        ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadClientId => {
                            "the gateway refuses this identity; its audit log says why"
                        }
                        ConnectReturnCode::ServiceUnavailable => {
                            "the gateway cannot reach its broker; look at the gateway's log"
                        }
                        _ => "look at the gateway's log",
                    };
                    report.fail("mqtt", format!("CONNACK refused: {code:?}"), fix);
                }
            }
        }
    }
}

async fn read_connack<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<ConnAck> {
    let mut buf = BytesMut::with_capacity(64);
    loop {
        match Packet::read(&mut buf, MAX_REPLY) {
            Ok(Packet::ConnAck(ack)) => return Ok(ack),
            Ok(other) => {
                return Err(std::io::Error::other(format!(
                    "expected CONNACK, got {other:?}"
                )));
            }
            Err(rumqttc::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(std::io::Error::other(format!("bad CONNACK: {e}"))),
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref())
}

/// What a failed TLS exchange means and what to do, from the error rustls
/// gives: an alert the gateway sent, or our own check of its certificate.
pub fn tls_failure(e: &std::io::Error, host: &str, now: i64) -> (String, String) {
    let Some(err) = rustls_error(e) else {
        return (
            format!("the TLS handshake broke off: {e}"),
            "check that this port is the gateway's device port and nothing in between intercepts TLS".into(),
        );
    };
    let clock = date(now);
    match err {
        rustls::Error::AlertReceived(alert) => {
            let (what, fix) = match alert {
                AlertDescription::CertificateRevoked => (
                    "revoked",
                    format!("the operator revoked this certificate; {RE_ENROLL}"),
                ),
                AlertDescription::CertificateExpired => (
                    "expired or not yet valid",
                    format!("see the validity check above: {RE_ENROLL}, or {SYNC_CLOCK}"),
                ),
                AlertDescription::UnknownCA => (
                    "issued by a CA it does not trust (or whose revocation list it lacks)",
                    "this device was enrolled by another PKI, or the gateway's client_ca misses its device CA; enroll it with the PKI that runs this gateway".into(),
                ),
                AlertDescription::BadCertificate
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateUnknown => (
                    "unusable",
                    "enroll the device again with provisioning (the certificate's profile is wrong)".into(),
                ),
                AlertDescription::CertificateRequired => (
                    "missing",
                    "the agent sent no certificate; check [identity]".into(),
                ),
                AlertDescription::ProtocolVersion | AlertDescription::HandshakeFailure => (
                    "not negotiable",
                    "the gateway offers no TLS version or cipher suite we share; update the agent or the gateway".into(),
                ),
                _ => ("not accepted", "look at the gateway's audit log for this device".into()),
            };
            (
                format!("the gateway refused our certificate: {what} (TLS alert {alert:?})"),
                fix,
            )
        }
        rustls::Error::InvalidCertificate(cert) => gateway_certificate(cert, host, &clock),
        other => (
            format!("TLS failed: {other}"),
            "look at the gateway's log; check both ends support TLS 1.2 or 1.3".into(),
        ),
    }
}

/// Said when the gateway's certificate shows it is not our gateway.
const NOT_OURS: &str = "do not connect to it; check where [gateway] host leads (DNS, proxies, the network path) and tell the operator";
/// Said when the gateway's certificate is ours but not of the profile
/// provisioning issues.
const REISSUE: &str = "the operator must issue the gateway's certificate with provisioning gateway-cert (and revoke this one); provisioning never issues this, so if it came from the PKI, its server CA key has been misused";

/// What our refusal of the gateway's certificate (or of its handshake
/// signature) means, and what to do: rustls's reason, webpki's inside
/// `Other`, or the agent's own profile check ([`GatewayRefusal`]), matched
/// by type.
fn gateway_certificate(cert: &CertificateError, host: &str, clock: &str) -> (String, String) {
    let fix_ca = "server-ca.pem must be the server CA of the PKI that issued the gateway's certificate; get it from the operator's bundle";
    match cert {
        CertificateError::Revoked => (
            "the gateway's certificate is revoked (server-crl.pem lists it); this may not be our gateway".into(),
            "do not connect to it; ask the operator for the gateway's new certificate, or a server-crl.pem that does not list it if it was revoked by mistake".into(),
        ),
        CertificateError::UnknownIssuer => (
            "the gateway's certificate is not signed by server-ca.pem (UnknownIssuer); this may not be our gateway".into(),
            fix_ca.into(),
        ),
        CertificateError::BadSignature => (
            "the gateway's certificate names our server CA as its issuer, but the CA's signature on it does not verify (BadSignature): a forged certificate, not our gateway".into(),
            NOT_OURS.into(),
        ),
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => (
            format!("the gateway's certificate is not for \"{host}\""),
            "set [gateway] host to a name the gateway's certificate holds (ask the operator which)".into(),
        ),
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => (
            format!("the gateway's certificate has expired (local clock {clock})"),
            format!("the operator must renew the gateway's certificate; if the clock is ahead, {SYNC_CLOCK}"),
        ),
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => (
            format!(
                "the gateway's certificate is not valid yet at local clock {clock}: the clock is probably behind"
            ),
            SYNC_CLOCK.into(),
        ),
        CertificateError::UnknownRevocationStatus => (
            "server-crl.pem holds no CRL of the CA that issued the gateway's certificate, so the agent cannot tell whether it is revoked (UnknownRevocationStatus)".into(),
            "get the PKI's current server-crl.pem from the operator (provisioning crl --server): it holds a CRL of every server CA".into(),
        ),
        CertificateError::ExpiredRevocationList
        | CertificateError::ExpiredRevocationListContext { .. } => (
            format!("server-crl.pem is out of date at local clock {clock}: its next update has passed"),
            format!("get a fresh server-crl.pem from the operator (provisioning crl --server); if the clock is ahead, {SYNC_CLOCK}"),
        ),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => (
            "the gateway's certificate is not for TLS servers (its extendedKeyUsage lacks serverAuth), e.g. a device's certificate: not our gateway".into(),
            NOT_OURS.into(),
        ),
        CertificateError::BadEncoding => (
            "the gateway's certificate is not valid DER".into(),
            REISSUE.into(),
        ),
        CertificateError::UnhandledCriticalExtension => (
            "the gateway's certificate has a critical extension the agent does not know".into(),
            REISSUE.into(),
        ),
        CertificateError::UnsupportedSignatureAlgorithmContext { .. }
        | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => (
            "the gateway's certificate is signed with an algorithm the agent does not accept".into(),
            REISSUE.into(),
        ),
        CertificateError::Other(other) => {
            if let Some(refusal) = other.0.downcast_ref::<GatewayRefusal>() {
                profile_refusal(refusal)
            } else if let Some(error) = other.0.downcast_ref::<webpki::Error>() {
                webpki_refusal(error)
            } else {
                (
                    format!("the gateway's certificate was refused: {}", other.0),
                    fix_ca.into(),
                )
            }
        }
        other => (
            format!("the gateway's certificate was refused ({other:?})"),
            fix_ca.into(),
        ),
    }
}

/// The agent's own refusals: what provisioning never issues to a gateway.
fn profile_refusal(refusal: &GatewayRefusal) -> (String, String) {
    match refusal {
        GatewayRefusal::NoExtendedKeyUsage => (
            "the gateway's certificate has no extendedKeyUsage; provisioning always gives a gateway serverAuth, so this certificate is not one provisioning issued".into(),
            REISSUE.into(),
        ),
        GatewayRefusal::NotP256 { algorithm } => (
            format!("the gateway's certificate has an {algorithm} key; provisioning gives gateways ECDSA P-256 keys only, so this certificate is not one provisioning issued"),
            REISSUE.into(),
        ),
        GatewayRefusal::BelowServerCa { issuer } => (
            format!("the gateway's certificate is issued by \"{issuer}\", a CA below the server CA; the server CA issues gateway certificates itself (path length 0) and never a CA, so this chain is forged or the server CA's key was misused"),
            "do not connect to it; tell the operator that the server CA's key signed a CA certificate: the server CA must be replaced (provisioning init a new PKI, new bundles)".into(),
        ),
        GatewayRefusal::HandshakeSignature { .. } => (
            "the gateway sent a certificate of our PKI but signed the handshake with another key: whoever answered does not hold that certificate's key (a copied certificate, possibly a man in the middle)".into(),
            "do not trust this endpoint: check that [gateway] host leads to the real gateway (DNS, proxies); if it is the gateway, its gateway.key does not belong to its gateway.pem and the operator must install the matching pair".into(),
        ),
        GatewayRefusal::Unreadable { detail } => (
            format!("the gateway's certificate does not parse: {detail}"),
            REISSUE.into(),
        ),
    }
}

/// webpki's reasons that rustls passes on only inside `Other`.
fn webpki_refusal(error: &webpki::Error) -> (String, String) {
    let (detail, fix) = match error {
        webpki::Error::EndEntityUsedAsCa => (
            "the gateway's certificate is signed by a certificate that is not a CA (a leaf of our PKI used as an issuer): forged with a leaked key, not our gateway",
            "do not connect to it; tell the operator that the key of a gateway or device certificate signed another certificate: that certificate must be revoked",
        ),
        webpki::Error::CaUsedAsEndEntity => (
            "the gateway presented a CA certificate as its own: not a gateway certificate",
            REISSUE,
        ),
        webpki::Error::PathLenConstraintViolated | webpki::Error::MaximumPathDepthExceeded => (
            "the gateway's chain is longer than our PKI allows (path length): not issued by provisioning",
            NOT_OURS,
        ),
        webpki::Error::NameConstraintViolation => (
            "the gateway's certificate holds a name its CA may not issue (name constraints)",
            REISSUE,
        ),
        webpki::Error::UnsupportedCriticalExtension => (
            "the gateway's certificate has a critical extension the agent does not know",
            REISSUE,
        ),
        webpki::Error::EmptyEkuExtension
        | webpki::Error::ExtensionValueInvalid
        | webpki::Error::MalformedExtensions
        | webpki::Error::UnsupportedCertVersion
        | webpki::Error::InvalidSerialNumber => (
            "the gateway's certificate is malformed (an extension, its version or its serial number)",
            REISSUE,
        ),
        webpki::Error::SignatureAlgorithmMismatch => (
            "the gateway's certificate says two different things about its signature algorithm",
            REISSUE,
        ),
        webpki::Error::MaximumSignatureChecksExceeded
        | webpki::Error::MaximumPathBuildCallsExceeded
        | webpki::Error::MaximumNameConstraintComparisonsExceeded => (
            "the gateway sent a chain too costly to check (more certificates than a gateway ever sends)",
            NOT_OURS,
        ),
        other => {
            return (
                format!("the gateway's certificate was refused by webpki ({other})"),
                REISSUE.into(),
            );
        }
    };
    (format!("{detail} ({error})"), fix.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(e: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn gateway_alerts_become_reasons() {
        let cases = [
            (
                rustls::Error::AlertReceived(AlertDescription::CertificateRevoked),
                "revoked",
                "sign-csr",
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
                "not signed by server-ca.pem",
                "server CA",
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::NotValidYet),
                "clock is probably behind",
                "timedatectl",
            ),
        ];
        for (error, says, fix_says) in cases {
            let (detail, fix) = tls_failure(&io(error), "gw", 0);
            assert!(detail.contains(says), "{detail}");
            assert!(fix.contains(fix_says), "{fix}");
        }
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let (detail, _) = tls_failure(&reset, "gw", 0);
        assert!(detail.contains("broke off"), "{detail}");
    }

    /// Each refusal of the gateway's certificate has its own words and
    /// its own fix, never rustls's debug text, and only an unknown issuer
    /// points at server-ca.pem.
    #[test]
    fn each_refusal_of_the_gateway_has_its_own_reason() {
        let other = |e: Arc<dyn std::error::Error + Send + Sync>| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(e)))
        };
        let cases: Vec<(rustls::Error, &str, &str)> = vec![
            (
                CertificateError::BadSignature.into(),
                "a forged certificate",
                "do not connect",
            ),
            (
                CertificateError::UnknownRevocationStatus.into(),
                "holds no CRL of the CA that issued",
                "crl --server",
            ),
            (
                CertificateError::InvalidPurpose.into(),
                "not for TLS servers",
                "do not connect",
            ),
            (
                other(Arc::new(webpki::Error::EndEntityUsedAsCa)),
                "signed by a certificate that is not a CA",
                "must be revoked",
            ),
            (
                other(Arc::new(webpki::Error::CaUsedAsEndEntity)),
                "a CA certificate as its own",
                "gateway-cert",
            ),
            (
                GatewayRefusal::NoExtendedKeyUsage.into(),
                "no extendedKeyUsage",
                "gateway-cert",
            ),
            (
                GatewayRefusal::NotP256 {
                    algorithm: "RSA-2048".into(),
                }
                .into(),
                "an RSA-2048 key",
                "gateway-cert",
            ),
            (
                GatewayRefusal::BelowServerCa {
                    issuer: "CN=Sub".into(),
                }
                .into(),
                "a CA below the server CA",
                "server CA must be replaced",
            ),
            (
                GatewayRefusal::HandshakeSignature {
                    detail: String::new(),
                }
                .into(),
                "signed the handshake with another key",
                "do not trust this endpoint",
            ),
        ];
        for (error, says, fix_says) in cases {
            let (detail, fix) = tls_failure(&io(error), "gw", 0);
            assert!(detail.contains(says), "{detail}");
            assert!(fix.contains(fix_says), "{fix}");
            assert!(!detail.contains("OtherError"), "{detail}");
            assert!(!detail.contains("server-ca.pem"), "{detail}");
            assert!(!fix.contains("server-ca.pem"), "{fix}");
        }
    }

    #[test]
    fn a_line_has_a_verdict_and_a_fix() {
        let mut r = Report::new(Vec::new());
        r.fail("tcp", "refused".into(), "start it");
        r.ok("dns", "fine".into());
        assert!(r.failed());
        let text = String::from_utf8(r.out).unwrap();
        assert_eq!(
            text,
            "[FAIL] tcp        refused -- fix: start it\n[ OK ] dns        fine\n"
        );
    }
}
