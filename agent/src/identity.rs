//! The device's own identity: its certificate, key and the server CA,
//! checked before anything connects, and the rustls client config built
//! from them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use twofold_protocol::{DeviceId, Principal};
use twofold_trust::FileStamp;
use twofold_trust::crl::{Crl, CrlHistory, CrlRefusal};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::{IdentityPaths, KeyStore};
use crate::gateway_cert::GatewayVerifier;

/// Why the device's identity cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {detail}")]
    File { path: PathBuf, detail: String },
    #[error(
        "{path} is readable by others (mode {mode:o}); fix: chmod 600 {path} (and chown it to the agent's user)"
    )]
    KeyExposed { path: PathBuf, mode: u32 },
    #[error("{key} does not match the certificate in {cert}: {detail}")]
    KeyMismatch {
        /// The key file, or the key in its token, in words.
        key: String,
        cert: PathBuf,
        detail: String,
    },
    /// Not a `source`: the text says it all, and once.
    #[error("{0}; fix: {fix}", fix = .0.fix())]
    Token(twofold_token::TokenError),
    #[error("{path}: the certificate has no device identity: {reason}")]
    NoDeviceIdentity { path: PathBuf, reason: NotADevice },
}

impl From<twofold_token::TokenError> for IdentityError {
    fn from(e: twofold_token::TokenError) -> Self {
        IdentityError::Token(e)
    }
}

/// Why a certificate names no device.
#[derive(Debug, thiserror::Error)]
pub enum NotADevice {
    /// No identity at all, by the rule the gateway applies too.
    #[error(transparent)]
    Uri(#[from] twofold_trust::IdentityUriError),
    /// A backend service's identity.
    #[error("{uri} is a service, not a device")]
    Service { uri: String },
}

fn file_error(path: &Path, detail: impl std::fmt::Display) -> IdentityError {
    IdentityError::File {
        path: path.to_owned(),
        detail: detail.to_string(),
    }
}

/// Everything the agent knows about itself.
#[derive(Clone, Debug)]
pub struct DeviceIdentity {
    pub id: DeviceId,
    pub uri: String,
    /// In the normal form of [`twofold_trust::Serial`], as the gateway and
    /// `provisioning list` show it.
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    /// The server CRL in force, if there is one.
    pub server_crl: Option<ServerCrl>,
    pub tls: Arc<rustls::ClientConfig>,
    /// What `tls` was made of: a new server CRL goes in with these, not
    /// with whatever the certificate, key and server CA files hold by then.
    parts: TlsParts,
}

/// A server CRL file as it was taken.
#[derive(Clone, Debug)]
pub struct ServerCrl {
    /// Its CRL number (the highest, with several server CAs).
    pub number: Option<u64>,
    /// Its CRLs, one per server CA.
    pub crls: Vec<Crl>,
    pub pem: Vec<u8>,
}

#[derive(Clone)]
struct TlsParts {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<dyn rustls::sign::SigningKey>,
    server_ca: Vec<CertificateDer<'static>>,
    paths: IdentityPaths,
}

impl std::fmt::Debug for TlsParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsParts")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

/// Reads every `label` item (e.g. CERTIFICATE) of a PEM file; refuses a
/// file with none.
fn load_pem<T: PemObject>(path: &Path, label: &str) -> Result<Vec<T>, IdentityError> {
    let items: Vec<T> = T::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(path, e))?;
    if items.is_empty() {
        return Err(file_error(path, format!("no {label} found")));
    }
    Ok(items)
}

/// Reads every certificate in a PEM file; refuses a file with none.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    load_pem(path, "CERTIFICATE")
}

/// Loads the server CA's CRLs from `path` and checks them by the rules
/// of [`twofold_trust::crl`] with the server CA as the trusted CAs: a CRL
/// from anyone else would make every connection fail with an unknown
/// revocation status, so it is refused here, at start, with its reason.
pub fn load_server_crl(
    path: &Path,
    server_ca: &[CertificateDer<'_>],
) -> Result<Vec<Crl>, IdentityError> {
    let pem = std::fs::read(path).map_err(|e| file_error(path, e))?;
    server_crl_from_pem(&pem, path, server_ca)
}

/// [`load_server_crl`] for PEM already read, e.g. fetched from `path` (a
/// URL), which the errors name.
pub fn server_crl_from_pem(
    pem: &[u8],
    path: &Path,
    server_ca: &[CertificateDer<'_>],
) -> Result<Vec<Crl>, IdentityError> {
    let ders: Vec<CertificateRevocationListDer<'static>> =
        CertificateRevocationListDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|e| file_error(path, e))?;
    let cas: Vec<&[u8]> = server_ca.iter().map(|c| c.as_ref()).collect();
    let ders: Vec<&[u8]> = ders.iter().map(|d| d.as_ref()).collect();
    // The server CA is fixed for the agent's run: no CA's trust is ever
    // withdrawn under it.
    let crls = twofold_trust::crl::parse(&ders, &cas, |_| false).map_err(|e| match e {
        CrlRefusal::UnknownIssuer { issuer } => file_error(
            path,
            format!(
                "the CRL of \"{issuer}\" is not signed by the server CA; use the server-crl.pem \
                 provisioning wrote (not the gateway's crl.pem)"
            ),
        ),
        other => file_error(path, other),
    })?;
    // rustls refuses some CRLs x509-parser reads (version 1, delta and
    // indirect CRLs): find out here, and name this file, not the CA's.
    let mut roots = rustls::RootCertStore::empty();
    for ca in server_ca {
        let _ = roots.add(ca.clone().into_owned());
    }
    rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
    )
    .with_crls(crls.iter().map(|c| c.der.clone().into()))
    .build()
    .map_err(|e| file_error(path, format!("rustls cannot use this CRL: {e}")))?;
    Ok(crls)
}

/// Refuses a key file anyone but its owner can read or write.
pub fn check_key_mode(path: &Path) -> Result<(), IdentityError> {
    let meta = std::fs::metadata(path).map_err(|e| file_error(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::KeyExposed {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// The device identity in a certificate: its single SAN URI, read by the
/// rule of [`twofold_trust::identity`] (any other URI beside it is
/// refused, as the gateway refuses it), which must name a device.
pub fn device_of(der: &[u8], path: &Path) -> Result<(DeviceId, String), IdentityError> {
    let no = |reason: NotADevice| IdentityError::NoDeviceIdentity {
        path: path.to_owned(),
        reason,
    };
    let identity = twofold_trust::identity_of(der).map_err(|e| no(e.into()))?;
    let uri = identity.to_string();
    match identity.principal {
        Principal::Device(id) => Ok((id, uri)),
        Principal::Service(_) => Err(no(NotADevice::Service { uri })),
    }
}

/// The signing key for the leaf of `chain` (from `cert`), from a file or
/// a token, checked to be the certificate's key.
pub fn signing_key(
    key: &KeyStore,
    cert: &Path,
    chain: &[CertificateDer<'static>],
) -> Result<Arc<dyn rustls::sign::SigningKey>, IdentityError> {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let mismatch = |detail: String| IdentityError::KeyMismatch {
        key: key.to_string(),
        cert: cert.to_owned(),
        detail,
    };
    let signing: Arc<dyn rustls::sign::SigningKey> = match key {
        KeyStore::File(path) => {
            let der = PrivateKeyDer::from_pem_file(path)
                .map_err(|e| file_error(path, format!("no usable private key: {e}")))?;
            provider
                .key_provider
                .load_private_key(der)
                .map_err(|e| mismatch(e.to_string()))?
        }
        KeyStore::Token { spec, label } => {
            let point = twofold_token::public_point_of_cert(&chain[0])
                .ok_or_else(|| mismatch("the certificate's key is not P-256".into()))?;
            let token = twofold_token::Token::open(spec)?;
            Arc::new(crate::token_key::TlsTokenKey::new(
                token.key_for(label, &point)?,
            ))
        }
    };
    // keys_match checks that the key belongs to the certificate.
    rustls::sign::CertifiedKey::new(chain.to_vec(), signing.clone())
        .keys_match()
        .map_err(|e| mismatch(e.to_string()))?;
    Ok(signing)
}

/// Loads and checks the identity files and builds the TLS client config:
/// it trusts only the server CA, checks the gateway's name, and presents
/// the device's chain.
pub fn load(paths: &IdentityPaths) -> Result<DeviceIdentity, IdentityError> {
    if let KeyStore::File(path) = &paths.key {
        check_key_mode(path)?;
    }
    build(paths)
}

/// [`load`] without refusing a key others can read: for `agent doctor`,
/// which reports that separately and still goes on to the gateway.
pub fn build(paths: &IdentityPaths) -> Result<DeviceIdentity, IdentityError> {
    let chain = load_certs(&paths.cert)?;
    let (id, uri) = device_of(&chain[0], &paths.cert)?;
    let (_, leaf) = X509Certificate::from_der(&chain[0]).map_err(|e| file_error(&paths.cert, e))?;
    let serial = twofold_trust::Serial::from_der_bytes(leaf.raw_serial()).to_string();
    let not_before = leaf.validity().not_before.timestamp();
    let not_after = leaf.validity().not_after.timestamp();

    let server_ca = load_certs(&paths.server_ca)?;
    let key = signing_key(&paths.key, &paths.cert, &chain)?;
    let parts = TlsParts {
        chain,
        key,
        server_ca,
        paths: paths.clone(),
    };
    let server_crl = match &paths.server_crl {
        None => None,
        Some(path) => match std::fs::read(path) {
            Ok(pem) => Some(pem),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !paths.server_crl_required => {
                None
            }
            Err(e) => return Err(file_error(path, e)),
        },
    };
    let (tls, server_crl) = tls_config(&parts, server_crl)?;
    Ok(DeviceIdentity {
        id,
        uri,
        serial,
        not_before,
        not_after,
        server_crl,
        tls: Arc::new(tls),
        parts,
    })
}

/// The TLS client config: it trusts only the server CA, checks the
/// gateway's name (and its certificate against `server_crl`, PEM, when
/// there is one) and profile, and presents the device's chain.
fn tls_config(
    parts: &TlsParts,
    server_crl: Option<Vec<u8>>,
) -> Result<(rustls::ClientConfig, Option<ServerCrl>), IdentityError> {
    let paths = &parts.paths;
    let mut roots = rustls::RootCertStore::empty();
    for ca in &parts.server_ca {
        roots
            .add(ca.clone())
            .map_err(|e| file_error(&paths.server_ca, format!("not a usable CA: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    // The gateway's certificate is checked against the server CA's CRL
    // when the bundle has one; the server CA itself is anchored here and
    // only a new bundle replaces it, so only the leaf is checked.
    let mut verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    );
    let mut taken = None;
    if let (Some(path), Some(pem)) = (&paths.server_crl, server_crl) {
        let crls = server_crl_from_pem(&pem, path, &parts.server_ca)?;
        let ders: Vec<CertificateRevocationListDer<'static>> =
            crls.iter().map(|c| c.der.clone().into()).collect();
        taken = Some(ServerCrl {
            number: crls.iter().filter_map(|c| c.number).max(),
            crls,
            pem,
        });
        verifier = verifier.with_crls(ders).only_check_end_entity_revocation();
    }
    let verifier = verifier
        .build()
        .map_err(|e| file_error(&paths.server_ca, e))?;
    // webpki's checks, then the gateway profile (gateway_cert.rs).
    let verifier = GatewayVerifier::new(verifier, parts.server_ca.clone());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| file_error(&paths.cert, e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
            rustls::sign::CertifiedKey::new(parts.chain.clone(), parts.key.clone()),
        )));
    Ok((tls, taken))
}

/// How often the server CRL file is looked at for a new version.
pub const SERVER_CRL_POLL: Duration = Duration::from_secs(2);

impl DeviceIdentity {
    /// This identity with `pem` (read from the server CRL file, `path`) as
    /// its server CRL, built from the certificate, key and server CA it
    /// started with. The CRL must be signed by the server CA and taken by
    /// [`CrlHistory::accept`] over `floor` (a replayed CRL would hide
    /// revocations made since): a lower CRL number, none where there was
    /// one, or no CRL of a server CA that had one, is refused, CA by CA.
    pub fn with_server_crl(
        &self,
        path: &Path,
        pem: Vec<u8>,
        floor: &CrlHistory,
    ) -> Result<DeviceIdentity, IdentityError> {
        let mut parts = self.parts.clone();
        parts.paths.server_crl = Some(path.to_owned());
        let (tls, taken) = tls_config(&parts, Some(pem))?;
        if let Some(taken) = &taken {
            floor
                .accept(&taken.crls, |_| true)
                .map_err(|why| file_error(path, why))?;
        }
        Ok(DeviceIdentity {
            server_crl: taken,
            tls: Arc::new(tls),
            parts,
            ..self.clone()
        })
    }
}

/// The server CRLs the agent has taken so far, CA by CA, shared by the
/// file's watcher and the fetcher, so neither lets an older CRL in.
#[derive(Clone, Debug, Default)]
pub struct CrlFloor(Arc<Mutex<CrlHistory>>);

impl CrlFloor {
    pub fn new(crls: Option<&[Crl]>) -> CrlFloor {
        CrlFloor(Arc::new(Mutex::new(
            crls.map(CrlHistory::of).unwrap_or_default(),
        )))
    }

    pub fn get(&self) -> CrlHistory {
        // A poisoned lock still holds the numbers: never fail open.
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The highest number in force, for logs.
    pub fn highest(&self) -> Option<u64> {
        self.get().highest()
    }

    /// `crls` are in force now (checked by [`CrlHistory::accept`]).
    pub fn take(&self, crls: &[Crl]) {
        let mut history = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *history = history.with(crls);
    }
}

/// Watches the server CRL file while the agent runs. A new valid one
/// replaces the TLS config in `tls` (the link then reconnects, so the
/// gateway is checked against it at once); a broken or older one is
/// refused, loudly, and the one in force stays. The file is read again
/// whenever its [`FileStamp`] changes (a same-length replacement
/// included), and taken only if its contents differ from the CRL in
/// force. A bundle's server CRL that was
/// missing at start is taken when it appears.
pub async fn watch_server_crl(
    mut current: DeviceIdentity,
    floor: CrlFloor,
    tls: tokio::sync::watch::Sender<Arc<rustls::ClientConfig>>,
) {
    let Some(path) = current.parts.paths.server_crl.clone() else {
        return;
    };
    // None at first: the file is compared once at start, in case it
    // changed while the agent was starting.
    let mut last = None;
    let mut tick = tokio::time::interval(SERVER_CRL_POLL);
    loop {
        tick.tick().await;
        let now = Some(FileStamp::of(&path));
        if now == last {
            continue;
        }
        last = now;
        let pem = match std::fs::read(&path) {
            Ok(pem) => pem,
            // A bundle without one yet: taken when it appears.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && current.server_crl.is_none() => {
                continue;
            }
            Err(e) => {
                tracing::error!(crl = %path.display(), error = %e, "cannot read the server CRL; the one in force stays");
                continue;
            }
        };
        if current.server_crl.as_ref().is_some_and(|c| c.pem == pem) {
            continue;
        }
        match current.with_server_crl(&path, pem, &floor.get()) {
            Ok(next) => {
                let number = next.server_crl.as_ref().and_then(|c| c.number);
                tracing::info!(
                    crl = %path.display(),
                    number = ?number,
                    "server CRL reloaded; reconnecting to check the gateway against it"
                );
                if let Some(taken) = &next.server_crl {
                    floor.take(&taken.crls);
                }
                tls.send_replace(next.tls.clone());
                current = next;
            }
            Err(e) => tracing::error!(
                error = %e,
                number_in_force = ?floor.highest(),
                "REFUSED the new server CRL; the previous one stays in force"
            ),
        }
    }
}

/// Where a certificate is in its life.
#[derive(Debug, PartialEq, Eq)]
pub enum Expiry {
    Fine,
    /// Renewal is due ([`twofold_trust::renewal::due_at`]: two thirds of
    /// the lifetime, less the device's own jitter of up to a twentieth).
    RenewSoon {
        days_left: i64,
    },
    Expired,
    NotYetValid,
}

/// Judges the validity period of device `id`'s certificate at `now` (Unix
/// seconds).
pub fn expiry(not_before: i64, not_after: i64, now: i64, id: &str) -> Expiry {
    if now < not_before {
        Expiry::NotYetValid
    } else if now >= not_after {
        Expiry::Expired
    } else if now >= twofold_trust::renewal::due_at(not_before, not_after, id) {
        Expiry::RenewSoon {
            days_left: (not_after - now) / 86_400,
        }
    } else {
        Expiry::Fine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_warns_when_renewal_is_due() {
        const DAY: i64 = 86_400;
        let due = twofold_trust::renewal::due_at(0, 300 * DAY, "pi-1");
        assert!((185 * DAY..=200 * DAY).contains(&due), "{due}");
        assert_eq!(expiry(0, 300 * DAY, 100 * DAY, "pi-1"), Expiry::Fine);
        assert_eq!(expiry(0, 300 * DAY, due - 1, "pi-1"), Expiry::Fine);
        assert_eq!(
            expiry(0, 300 * DAY, 200 * DAY, "pi-1"),
            Expiry::RenewSoon { days_left: 100 }
        );
        assert_eq!(expiry(0, 300, 300, "pi-1"), Expiry::Expired);
        assert_eq!(expiry(10, 300, 5, "pi-1"), Expiry::NotYetValid);
    }
}
