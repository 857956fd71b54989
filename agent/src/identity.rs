//! The device's own identity: its certificate, key and the server CA,
//! checked before anything connects, and the rustls client config built
//! from them.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use twofold_protocol::{DeviceId, Identity, Principal};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::config::IdentityPaths;

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
        key: PathBuf,
        cert: PathBuf,
        detail: String,
    },
    #[error("{path}: the certificate has no device identity: {detail}")]
    NoDeviceIdentity { path: PathBuf, detail: String },
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
    pub pem: Vec<u8>,
}

#[derive(Clone)]
struct TlsParts {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
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

/// Loads the server CA's CRLs from `path` and checks that each is signed
/// by a CA in `server_ca`: a CRL from anyone else would make every
/// connection fail with an unknown revocation status, so it is refused
/// here, at start, with its reason.
pub fn load_server_crl(
    path: &Path,
    server_ca: &[CertificateDer<'_>],
) -> Result<Vec<CertificateRevocationListDer<'static>>, IdentityError> {
    let pem = std::fs::read(path).map_err(|e| file_error(path, e))?;
    server_crl_from_pem(&pem, path, server_ca)
}

/// [`load_server_crl`] for PEM already read, e.g. fetched from `path` (a
/// URL), which the errors name.
pub fn server_crl_from_pem(
    pem: &[u8],
    path: &Path,
    server_ca: &[CertificateDer<'_>],
) -> Result<Vec<CertificateRevocationListDer<'static>>, IdentityError> {
    let crls: Vec<CertificateRevocationListDer<'static>> =
        CertificateRevocationListDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|e| file_error(path, e))?;
    if crls.is_empty() {
        return Err(file_error(path, "no X509 CRL found"));
    }
    let mut issuers: Vec<Vec<u8>> = Vec::new();
    for der in &crls {
        let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der)
            .map_err(|e| file_error(path, format!("a CRL does not parse: {e}")))?;
        // rustls checks against the first CRL of the issuer it finds, so a
        // file with an old CRL in front of the current one would bring the
        // old one back in force; one per CA, then.
        let issuer = crl.issuer().as_raw().to_vec();
        if issuers.contains(&issuer) {
            return Err(file_error(
                path,
                format!(
                    "holds more than one CRL of \"{}\"; a server CRL file holds one per CA, the newest",
                    crl.issuer()
                ),
            ));
        }
        issuers.push(issuer);
        let signed = server_ca.iter().any(|ca| {
            X509Certificate::from_der(ca).is_ok_and(|(_, ca)| {
                ca.subject() == crl.issuer() && crl.verify_signature(ca.public_key()).is_ok()
            })
        });
        if !signed {
            return Err(file_error(
                path,
                format!(
                    "the CRL of \"{}\" is not signed by the server CA; use the server-crl.pem \
                     provisioning wrote (not the gateway's crl.pem)",
                    crl.issuer()
                ),
            ));
        }
    }
    // rustls refuses some CRLs x509-parser reads (version 1, delta and
    // indirect CRLs): find out here, and name this file, not the CA's.
    let mut roots = rustls::RootCertStore::empty();
    for ca in server_ca {
        let _ = roots.add(ca.clone());
    }
    rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
    )
    .with_crls(crls.clone())
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

/// The device identity in a certificate: its single SAN URI, which must
/// name a device (not a service).
pub fn device_of(der: &[u8], path: &Path) -> Result<(DeviceId, String), IdentityError> {
    let no = |detail: String| IdentityError::NoDeviceIdentity {
        path: path.to_owned(),
        detail,
    };
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| no(e.to_string()))?;
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(no(e.to_string())),
    };
    let [uri] = uris[..] else {
        return Err(no(format!("{} SAN URIs, expected exactly one", uris.len())));
    };
    let identity = Identity::parse(uri).map_err(|e| no(format!("{uri}: {e}")))?;
    match identity.principal {
        Principal::Device(id) => Ok((id, uri.to_owned())),
        Principal::Service(_) => Err(no(format!("{uri} is a service, not a device"))),
    }
}

/// Checks that the private key in `key` belongs to the leaf of `chain`.
pub fn key_matches(
    key: &Path,
    cert: &Path,
    chain: &[CertificateDer<'static>],
) -> Result<(), IdentityError> {
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| file_error(key, format!("no usable private key: {e}")))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    // from_der checks that the key belongs to the certificate.
    rustls::sign::CertifiedKey::from_der(chain.to_vec(), der, &provider).map_err(|e| {
        IdentityError::KeyMismatch {
            key: key.to_owned(),
            cert: cert.to_owned(),
            detail: e.to_string(),
        }
    })?;
    Ok(())
}

/// Loads and checks the identity files and builds the TLS client config:
/// it trusts only the server CA, checks the gateway's name, and presents
/// the device's chain.
pub fn load(paths: &IdentityPaths) -> Result<DeviceIdentity, IdentityError> {
    check_key_mode(&paths.key)?;
    build(paths)
}

/// [`load`] without refusing a key others can read: for `agent doctor`,
/// which reports that separately and still goes on to the gateway.
pub fn build(paths: &IdentityPaths) -> Result<DeviceIdentity, IdentityError> {
    let chain = load_certs(&paths.cert)?;
    let key = PrivateKeyDer::from_pem_file(&paths.key)
        .map_err(|e| file_error(&paths.key, format!("no usable private key: {e}")))?;
    let (id, uri) = device_of(&chain[0], &paths.cert)?;
    let (_, leaf) = X509Certificate::from_der(&chain[0]).map_err(|e| file_error(&paths.cert, e))?;
    let serial = leaf.raw_serial_as_string().replace(':', "");
    let not_before = leaf.validity().not_before.timestamp();
    let not_after = leaf.validity().not_after.timestamp();

    let server_ca = load_certs(&paths.server_ca)?;
    key_matches(&paths.key, &paths.cert, &chain)?;
    let parts = TlsParts {
        chain,
        key: Arc::new(key),
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
/// there is one), and presents the device's chain.
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
        taken = Some(ServerCrl {
            number: crl_number(&crls),
            pem,
        });
        verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
    }
    let verifier = verifier
        .build()
        .map_err(|e| file_error(&paths.server_ca, e))?;
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| file_error(&paths.cert, e))?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(parts.chain.clone(), parts.key.clone_key())
        .map_err(|e| IdentityError::KeyMismatch {
            key: paths.key.clone(),
            cert: paths.cert.clone(),
            detail: e.to_string(),
        })?;
    Ok((tls, taken))
}

/// The highest CRL number among `crls` (which [`load_server_crl`] has
/// parsed already).
pub fn crl_number(crls: &[CertificateRevocationListDer<'_>]) -> Option<u64> {
    crls.iter()
        .filter_map(|der| {
            let (_, crl) =
                x509_parser::revocation_list::CertificateRevocationList::from_der(der).ok()?;
            crl.crl_number()?.to_string().parse::<u64>().ok()
        })
        .max()
}

/// How often the server CRL file is looked at for a new version.
pub const SERVER_CRL_POLL: Duration = Duration::from_secs(2);

impl DeviceIdentity {
    /// This identity with `pem` (read from the server CRL file, `path`) as
    /// its server CRL, built from the certificate, key and server CA it
    /// started with. The CRL must be signed by the server CA and not be
    /// older than `floor` (a replayed CRL would hide revocations made
    /// since): a lower CRL number, or none where there was one, is refused.
    pub fn with_server_crl(
        &self,
        path: &Path,
        pem: Vec<u8>,
        floor: Option<u64>,
    ) -> Result<DeviceIdentity, IdentityError> {
        let mut parts = self.parts.clone();
        parts.paths.server_crl = Some(path.to_owned());
        let (tls, taken) = tls_config(&parts, Some(pem))?;
        let number = taken.as_ref().and_then(|c| c.number);
        if let Some(old) = floor {
            match number {
                Some(new) if new >= old => {}
                Some(new) => {
                    return Err(file_error(
                        path,
                        format!("CRL number {new} is older than the one in force ({old})"),
                    ));
                }
                None => {
                    return Err(file_error(
                        path,
                        format!("the CRL has no CRL number, and the one in force has {old}"),
                    ));
                }
            }
        }
        Ok(DeviceIdentity {
            server_crl: taken,
            tls: Arc::new(tls),
            parts,
            ..self.clone()
        })
    }
}

/// The highest server CRL number the agent has taken so far, shared by the
/// file's watcher and the fetcher, so neither lets an older CRL in.
#[derive(Clone, Debug, Default)]
pub struct CrlFloor(Arc<AtomicU64>);

impl CrlFloor {
    pub fn new(number: Option<u64>) -> CrlFloor {
        let floor = CrlFloor::default();
        if let Some(n) = number {
            floor.raise(n);
        }
        floor
    }

    pub fn get(&self) -> Option<u64> {
        // Stored plus one: 0 is "none yet".
        self.0.load(Ordering::SeqCst).checked_sub(1)
    }

    pub fn raise(&self, number: u64) {
        self.0.fetch_max(number.saturating_add(1), Ordering::SeqCst);
    }
}

/// Watches the server CRL file while the agent runs. A new valid one
/// replaces the TLS config in `tls` (the link then reconnects, so the
/// gateway is checked against it at once); a broken or older one is
/// refused, loudly, and the one in force stays. The file is read again
/// whenever its inode, size or times change, and taken only if its
/// contents differ from the CRL in force. A bundle's server CRL that was
/// missing at start is taken when it appears.
pub async fn watch_server_crl(
    mut current: DeviceIdentity,
    floor: CrlFloor,
    tls: tokio::sync::watch::Sender<Arc<rustls::ClientConfig>>,
) {
    let Some(path) = current.parts.paths.server_crl.clone() else {
        return;
    };
    let stamp = || {
        std::fs::metadata(&path).ok().map(|m| {
            (
                m.ino(),
                m.len(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
            )
        })
    };
    // None at first: the file is compared once at start, in case it
    // changed while the agent was starting.
    let mut last = None;
    let mut tick = tokio::time::interval(SERVER_CRL_POLL);
    loop {
        tick.tick().await;
        let now = Some(stamp());
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
        match current.with_server_crl(&path, pem, floor.get()) {
            Ok(next) => {
                let number = next.server_crl.as_ref().and_then(|c| c.number);
                tracing::info!(
                    crl = %path.display(),
                    number = ?number,
                    "server CRL reloaded; reconnecting to check the gateway against it"
                );
                if let Some(n) = number {
                    floor.raise(n);
                }
                tls.send_replace(next.tls.clone());
                current = next;
            }
            Err(e) => tracing::error!(
                error = %e,
                number_in_force = ?floor.get(),
                "REFUSED the new server CRL; the previous one stays in force"
            ),
        }
    }
}

/// Where a certificate is in its life.
#[derive(Debug, PartialEq, Eq)]
pub enum Expiry {
    Fine,
    /// Two thirds of the lifetime have passed.
    RenewSoon {
        days_left: i64,
    },
    Expired,
    NotYetValid,
}

/// Judges a validity period at `now` (Unix seconds).
pub fn expiry(not_before: i64, not_after: i64, now: i64) -> Expiry {
    if now < not_before {
        Expiry::NotYetValid
    } else if now >= not_after {
        Expiry::Expired
    } else if (now - not_before) * 3 >= (not_after - not_before) * 2 {
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
    fn expiry_warns_at_two_thirds() {
        assert_eq!(expiry(0, 300, 100), Expiry::Fine);
        assert_eq!(
            expiry(0, 300 * 86_400, 200 * 86_400),
            Expiry::RenewSoon { days_left: 100 }
        );
        assert_eq!(expiry(0, 300, 300), Expiry::Expired);
        assert_eq!(expiry(10, 300, 5), Expiry::NotYetValid);
    }
}
