//! TLS termination: rustls with the aws-lc-rs provider, TLS 1.3 and 1.2
//! only, client certificates required and checked against the client CAs
//! and their CRLs.
//!
//! Each connection gets its own `ServerConfig` around a verifier that
//! remembers the certificate the client presented, so a refused handshake
//! can still be audited with the certificate's subject, serial and
//! fingerprint. Everything expensive (keys, roots, CRLs, the ticket keys
//! and session cache) is shared.
//!
//! Sessions resume from stateless tickets (TLS 1.3, and TLS 1.2 clients
//! that ask for them): the gateway keeps nothing per device for them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ProducesTickets, ResolvesServerCert, ServerSessionMemoryCache, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::reason::Reason;
use crate::revocation::RevocationList;

/// Why TLS material was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{path}: {detail}")]
    File { path: PathBuf, detail: String },
    #[error("{0}")]
    Crl(#[from] crate::revocation::CrlError),
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

fn file_error(path: &Path, detail: impl std::fmt::Display) -> TlsSetupError {
    TlsSetupError::File {
        path: path.to_owned(),
        detail: detail.to_string(),
    }
}

/// Reads every certificate in a PEM file; refuses a file with none.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no CERTIFICATE found"));
    }
    Ok(certs)
}

/// Reads a private key from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| file_error(path, format!("no usable private key: {e}")))
}

/// The files that make up the gateway's TLS identity and trust.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub crl: PathBuf,
    /// How long after its expiry a certificate is still admitted, to a
    /// session that may only renew (`expired_grace_secs`; off: `None`).
    pub expired_grace: Option<std::time::Duration>,
}

/// What a device whose certificate has run out is told to do.
pub const COME_BACK: &str = "re-enroll the device (provisioning enroll ID --replace, or EST \
     simpleenroll with a token from provisioning est-token ID)";

/// Shared TLS state; cheap to clone, rebuilt when a file changes.
#[derive(Clone)]
pub struct TlsContext {
    provider: Arc<CryptoProvider>,
    resolver: Arc<FixedCert>,
    verifier: Arc<dyn ClientCertVerifier>,
    sessions: Arc<ServerSessionMemoryCache>,
    tickets: Arc<dyn ProducesTickets>,
    max_fragment_size: Option<usize>,
    pub expired_grace: Option<std::time::Duration>,
    pub client_cas: Vec<CertificateDer<'static>>,
    pub revocations: Arc<RevocationList>,
}

#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// aws-lc-rs's provider with the AES-128-GCM suites first. TLS 1.3's
/// AES-256 suite hashes with SHA-384, which x86 CPUs have no instructions
/// for: its transcript hash and key schedule were about 4 % of a connect's
/// CPU in the benchmark. Both are strong; AES-128 first is also Mozilla's
/// recommended order. The suites offered stay the same.
fn provider() -> CryptoProvider {
    use rustls::CipherSuite as S;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites.sort_by_key(|suite| {
        !matches!(
            suite.suite(),
            S::TLS13_AES_128_GCM_SHA256
                | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    provider
}

/// How many TLS 1.2 sessions are cached for clients that resume by
/// session id rather than ticket. TLS 1.3 (and TLS 1.2 with tickets)
/// resumes from stateless tickets, which cost the gateway no memory.
const SESSION_CACHE: usize = 4 * 1024;

impl TlsContext {
    /// Loads and checks every file. `max_fragment_size` caps the TLS
    /// records the gateway sends, header included (the MCU profile).
    pub fn load(
        files: &TlsFiles,
        max_fragment_size: Option<usize>,
        previous: Option<&TlsContext>,
    ) -> Result<TlsContext, TlsSetupError> {
        let provider = Arc::new(provider());
        let chain = load_certs(&files.cert)?;
        let key = load_key(&files.key)?;
        let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
            file_error(
                &files.key,
                format!("does not match {}: {e}", files.cert.display()),
            )
        })?;
        let client_cas = load_certs(&files.client_ca)?;
        let revocations = RevocationList::load(
            &files.crl,
            &client_cas,
            previous.map(|p| p.revocations.as_ref()),
        )?;
        // Resumed sessions skip certificate verification: they are checked
        // against the current CRL after the handshake, but a session of a
        // client CA that has just been removed would still get in. So the
        // tickets and the session cache outlive a reload only while the
        // client CAs stay the same.
        let kept = previous.filter(|p| p.client_cas == client_cas);
        let sessions = kept
            .map(|p| p.sessions.clone())
            .unwrap_or_else(|| ServerSessionMemoryCache::new(SESSION_CACHE));
        let tickets = match kept {
            Some(p) => p.tickets.clone(),
            // RFC 5077's construction (AES-256, HMAC-SHA256) under random
            // keys, rotated every 6 hours; a ticket lives 12 at most.
            None => rustls::crypto::aws_lc_rs::Ticketer::new()
                .map_err(|e| TlsSetupError::Rustls(e.to_string()))?,
        };
        let mut context = TlsContext {
            verifier: Arc::new(NoClients),
            provider,
            resolver: Arc::new(FixedCert(Arc::new(certified))),
            sessions,
            tickets,
            max_fragment_size,
            expired_grace: files.expired_grace,
            client_cas,
            revocations: Arc::new(revocations),
        };
        context.verifier = context.build_verifier(&files.client_ca)?;
        // Build one config now so that a bad combination fails at load time.
        context.config().map(|_| ())?;
        Ok(context)
    }

    fn build_verifier(&self, ca_path: &Path) -> Result<Arc<dyn ClientCertVerifier>, TlsSetupError> {
        let mut roots = RootCertStore::empty();
        for ca in &self.client_cas {
            roots
                .add(ca.clone())
                .map_err(|e| file_error(ca_path, format!("not a usable CA certificate: {e}")))?;
        }
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .with_crls(self.revocations.ders.iter().cloned())
            // The CRLs cover the leaves the client CAs issue; the CAs
            // themselves are covered by no CRL this gateway holds.
            .only_check_end_entity_revocation()
            .build()
            .map_err(|e| TlsSetupError::Rustls(e.to_string()))
    }

    /// A config for one connection, and the slot where the certificate
    /// the client presents will be recorded.
    pub fn config(&self) -> Result<(Arc<ServerConfig>, PresentedCert), TlsSetupError> {
        let presented = PresentedCert::default();
        let verifier = Arc::new(Capturing {
            inner: self.verifier.clone(),
            presented: presented.clone(),
            expired_grace: self.expired_grace,
        });
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsSetupError::Rustls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.resolver.clone());
        config.session_storage = self.sessions.clone();
        config.ticketer = self.tickets.clone();
        config.max_fragment_size = self.max_fragment_size.map(plaintext_limit);
        // The server's order of cipher suites (`provider()`'s: AES-GCM
        // first) decides, not the client's, as TLS scanners expect.
        config.ignore_client_order = true;
        Ok((Arc::new(config), presented))
    }
}

/// The most a record adds to its plaintext besides the 5-byte header:
/// TLS 1.2 AES-GCM's explicit nonce (8) and tag (16). TLS 1.3 adds the
/// inner content type (1) and the tag (16).
const RECORD_EXPANSION: usize = 24;

/// rustls's `max_fragment_size` for records of at most `record` bytes on
/// the wire, header included. rustls subtracts the header itself but not
/// the encryption's expansion, so a device's receive buffer sized to the
/// configured value would otherwise overflow by up to 24 bytes.
fn plaintext_limit(record: usize) -> usize {
    record - RECORD_EXPANSION
}

/// The end-entity certificate a client presented, if any.
#[derive(Clone, Default, Debug)]
pub struct PresentedCert(Arc<Mutex<Presented>>);

#[derive(Debug, Default)]
struct Presented {
    cert: Option<CertificateDer<'static>>,
    /// The certificate verified, but the handshake signature made with it
    /// did not: the peer does not hold the certificate's key.
    key_not_held: bool,
    /// It had expired: when, and how long ago, at the handshake.
    expired: Option<(UnixTime, u64)>,
    /// The grace period in force for it.
    grace: Option<std::time::Duration>,
}

impl PresentedCert {
    /// The DER, if the client presented a certificate.
    pub fn get(&self) -> Option<CertificateDer<'static>> {
        self.0.lock().ok().and_then(|g| g.cert.clone())
    }

    /// Frees the copy.
    pub fn clear(&self) {
        if let Ok(mut slot) = self.0.lock() {
            slot.cert = None;
        }
    }

    /// Why a handshake that failed with `error` was refused, and what to
    /// tell the operator. rustls reports a bad CertificateVerify as
    /// `BadSignature`, as it does a forged chain; the verifier knows which.
    pub fn classify(&self, error: &rustls::Error) -> (Reason, String) {
        let key_not_held = self.0.lock().is_ok_and(|g| g.key_not_held);
        let (expired, grace) = self
            .0
            .lock()
            .map(|g| (g.expired, g.grace))
            .unwrap_or_default();
        match error {
            rustls::Error::InvalidCertificate(CertificateError::BadSignature) if key_not_held => (
                Reason::KeyNotHeld,
                "the client's certificate is valid, but its handshake signature \
                 (CertificateVerify) was not made with that certificate's key: the peer \
                 holds a copy of the certificate without its private key (a copied \
                 certificate); find where it came from, and revoke it if the key may \
                 have leaked too"
                    .into(),
            ),
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ) => match expired {
                Some((not_after, ago)) => (Reason::Expired, expired_detail(not_after, ago, grace)),
                None => (Reason::Expired, error.to_string()),
            },
            // The device refused us, e.g. our certificate is in its server
            // CRL: say so, not just "alert".
            rustls::Error::AlertReceived(alert) => (
                Reason::from_tls(error),
                format!("the client refused the gateway (TLS alert {alert:?})"),
            ),
            other => (Reason::from_tls(other), other.to_string()),
        }
    }

    fn proof_failed(&self) {
        if let Ok(mut slot) = self.0.lock() {
            slot.key_not_held = true;
        }
    }
}

/// Why an expired certificate was refused, and the way back.
fn expired_detail(not_after: UnixTime, ago: u64, grace: Option<std::time::Duration>) -> String {
    let at = i64::try_from(not_after.as_secs())
        .ok()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    let ago = humantime::format_duration(std::time::Duration::from_secs(ago));
    let grace = match grace {
        Some(g) => format!(
            "past this gateway's grace period of {}",
            humantime::format_duration(g)
        ),
        None => {
            "and this gateway admits no expired certificate (expired_grace_secs is not set)".into()
        }
    };
    format!("the client's certificate expired at {at}, {ago} ago, {grace}; {COME_BACK}")
}

/// Placeholder verifier used only while a context is being built.
#[derive(Debug)]
struct NoClients;

impl ClientCertVerifier for NoClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Err(rustls::Error::General("no client CA loaded".into()))
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("no client CA loaded".into()))
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("no client CA loaded".into()))
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Vec::new()
    }
}

/// Delegates every decision to webpki and records what was presented.
/// With a grace period, a certificate that expired within it is checked
/// as of its last valid second instead: everything else (chain,
/// signatures, CRL) must hold, and the session it opens may only renew.
#[derive(Debug)]
struct Capturing {
    inner: Arc<dyn ClientCertVerifier>,
    presented: PresentedCert,
    expired_grace: Option<std::time::Duration>,
}

impl ClientCertVerifier for Capturing {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Ok(mut slot) = self.presented.0.lock() {
            slot.cert = Some(end_entity.clone().into_owned());
            slot.grace = self.expired_grace;
        }
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now);
        let Err(rustls::Error::InvalidCertificate(CertificateError::ExpiredContext {
            time,
            not_after,
        })) = &verified
        else {
            return verified;
        };
        let ago = time.as_secs().saturating_sub(not_after.as_secs());
        if let Ok(mut slot) = self.presented.0.lock() {
            slot.expired = Some((*not_after, ago));
        }
        match self.expired_grace {
            Some(grace) if ago <= grace.as_secs() => {
                self.inner
                    .verify_client_cert(end_entity, intermediates, *not_after)
            }
            _ => verified,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let verified = self.inner.verify_tls12_signature(message, cert, dss);
        if verified.is_err() {
            self.presented.proof_failed();
        }
        verified
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let verified = self.inner.verify_tls13_signature(message, cert, dss);
        if verified.is_err() {
            self.presented.proof_failed();
        }
        verified
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_128_comes_first_and_no_suite_is_added_or_dropped() {
        let ours: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        let first = |v: &rustls::ProtocolVersion| {
            provider()
                .cipher_suites
                .iter()
                .find(|s| s.version().version == *v)
                .map(|s| s.suite())
        };
        assert_eq!(
            first(&rustls::ProtocolVersion::TLSv1_3),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        assert_eq!(
            first(&rustls::ProtocolVersion::TLSv1_2),
            Some(rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)
        );
        let mut theirs: Vec<_> = rustls::crypto::aws_lc_rs::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        let mut ours = ours;
        ours.sort_by_key(|s| u16::from(*s));
        theirs.sort_by_key(|s| u16::from(*s));
        assert_eq!(ours, theirs);
    }
}
