//! The device's own identity: its certificate, key and the server CA,
//! checked before anything connects, and the rustls client config built
//! from them.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use twofold_protocol::{DeviceId, Principal};
use twofold_trust::FileStamp;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::IdentityPaths;
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
        key: PathBuf,
        cert: PathBuf,
        detail: String,
    },
    #[error("{path}: the certificate has no device identity: {reason}")]
    NoDeviceIdentity { path: PathBuf, reason: NotADevice },
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
    /// Each server CA's CRL number.
    pub numbers: CrlNumbers,
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
    let serial = twofold_trust::Serial::from_der_bytes(leaf.raw_serial()).to_string();
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
        let numbers = CrlNumbers::of(&crls);
        taken = Some(ServerCrl {
            number: numbers.highest(),
            numbers,
            pem,
        });
        verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
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
        .with_client_auth_cert(parts.chain.clone(), parts.key.clone_key())
        .map_err(|e| IdentityError::KeyMismatch {
            key: paths.key.clone(),
            cert: paths.cert.clone(),
            detail: e.to_string(),
        })?;
    Ok((tls, taken))
}

/// Each CA's CRL number in a server CRL file: the CA's name (DER) → its
/// name as text and the number, if the CRL has one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CrlNumbers(BTreeMap<Vec<u8>, (String, Option<u64>)>);

impl CrlNumbers {
    /// Of CRLs that [`load_server_crl`] has parsed already.
    pub fn of(crls: &[CertificateRevocationListDer<'_>]) -> CrlNumbers {
        CrlNumbers(
            crls.iter()
                .filter_map(|der| {
                    let (_, crl) =
                        x509_parser::revocation_list::CertificateRevocationList::from_der(der)
                            .ok()?;
                    let number = crl
                        .crl_number()
                        .and_then(|n| n.to_string().parse::<u64>().ok());
                    Some((
                        crl.issuer().as_raw().to_vec(),
                        (crl.issuer().to_string(), number),
                    ))
                })
                .collect(),
        )
    }

    /// The highest number, for logs and reports.
    pub fn highest(&self) -> Option<u64> {
        self.0.values().filter_map(|(_, n)| *n).max()
    }

    /// Why these CRLs are older than `floor` (the numbers in force, CA by
    /// CA): a lower number, none where there was one, or no CRL at all of
    /// a CA that had one (rustls could then not check that CA's gateways).
    /// CA by CA, so an old CRL of one server CA cannot hide behind a newer
    /// one of another.
    pub fn older_than(&self, floor: &Floor) -> Option<String> {
        for (issuer, (name, old)) in floor {
            match self.0.get(issuer) {
                None => {
                    return Some(format!(
                        "it holds no CRL of \"{name}\", and the one in force has number {old}"
                    ));
                }
                Some((_, Some(new))) if new >= old => {}
                Some((_, Some(new))) => {
                    return Some(format!(
                        "CRL number {new} of \"{name}\" is older than the one in force ({old})"
                    ));
                }
                Some((_, None)) => {
                    return Some(format!(
                        "the CRL of \"{name}\" has no CRL number, and the one in force has {old}"
                    ));
                }
            }
        }
        None
    }

    /// Raises `floor` to these numbers, CA by CA.
    pub fn raise(&self, floor: &mut Floor) {
        for (issuer, (name, number)) in &self.0 {
            if let Some(n) = number {
                let old = floor.entry(issuer.clone()).or_insert((name.clone(), *n));
                old.1 = old.1.max(*n);
            }
        }
    }
}

/// The CRL numbers in force, by CA: its name as DER → as text, and the
/// number.
pub type Floor = BTreeMap<Vec<u8>, (String, u64)>;

/// How often the server CRL file is looked at for a new version.
pub const SERVER_CRL_POLL: Duration = Duration::from_secs(2);

impl DeviceIdentity {
    /// This identity with `pem` (read from the server CRL file, `path`) as
    /// its server CRL, built from the certificate, key and server CA it
    /// started with. The CRL must be signed by the server CA and not be
    /// older than `floor` (a replayed CRL would hide revocations made
    /// since): a lower CRL number, or none where there was one, is refused,
    /// CA by CA.
    pub fn with_server_crl(
        &self,
        path: &Path,
        pem: Vec<u8>,
        floor: &Floor,
    ) -> Result<DeviceIdentity, IdentityError> {
        let mut parts = self.parts.clone();
        parts.paths.server_crl = Some(path.to_owned());
        let (tls, taken) = tls_config(&parts, Some(pem))?;
        if let Some(why) = taken.as_ref().and_then(|c| c.numbers.older_than(floor)) {
            return Err(file_error(path, why));
        }
        Ok(DeviceIdentity {
            server_crl: taken,
            tls: Arc::new(tls),
            parts,
            ..self.clone()
        })
    }
}

/// The server CRL numbers the agent has taken so far, CA by CA, shared by
/// the file's watcher and the fetcher, so neither lets an older CRL in.
#[derive(Clone, Debug, Default)]
pub struct CrlFloor(Arc<Mutex<Floor>>);

impl CrlFloor {
    pub fn new(numbers: Option<&CrlNumbers>) -> CrlFloor {
        let floor = CrlFloor::default();
        if let Some(numbers) = numbers {
            floor.raise(numbers);
        }
        floor
    }

    pub fn get(&self) -> Floor {
        // A poisoned lock still holds the numbers: never fail open.
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The highest number in force, for logs.
    pub fn highest(&self) -> Option<u64> {
        self.get().values().map(|(_, n)| *n).max()
    }

    pub fn raise(&self, numbers: &CrlNumbers) {
        numbers.raise(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
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
                    floor.raise(&taken.numbers);
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

    /// A CRL of a new CA named `name`, numbered `number`.
    fn crl(name: &str, number: u64) -> CertificateRevocationListDer<'static> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = rcgen::Issuer::new(params, rcgen::KeyPair::generate().unwrap());
        let now = time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap();
        rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(7),
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: Vec::new(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&issuer)
        .unwrap()
        .der()
        .clone()
    }

    #[test]
    fn crl_numbers_are_compared_ca_by_ca() {
        let in_force = CrlNumbers::of(&[crl("Server CA 1", 3), crl("Server CA 2", 7)]);
        assert_eq!(in_force.highest(), Some(7));
        let mut floor = Floor::new();
        in_force.raise(&mut floor);
        assert_eq!(in_force.older_than(&floor), None, "the same is not older");
        let newer = CrlNumbers::of(&[crl("Server CA 1", 4), crl("Server CA 2", 7)]);
        assert_eq!(newer.older_than(&floor), None);
        // CA 1's old CRL next to a newer one of CA 2: the highest number
        // went up, CA 1's went back.
        let replayed = CrlNumbers::of(&[crl("Server CA 1", 2), crl("Server CA 2", 9)]);
        let why = replayed.older_than(&floor).unwrap();
        assert!(
            why.contains("CRL number 2 of \"CN=Server CA 1\" is older than the one in force (3)"),
            "{why}"
        );
        // A CA the floor does not know yet: nothing to compare.
        let other = CrlNumbers::of(&[
            crl("Server CA 1", 3),
            crl("Server CA 2", 7),
            crl("Server CA 3", 1),
        ]);
        assert_eq!(other.older_than(&floor), None);
        // Raising keeps the highest of each.
        replayed.raise(&mut floor);
        assert_eq!(floor.values().map(|(_, n)| *n).collect::<Vec<_>>(), [3, 9]);
        // A file without CA 2's CRL: its gateways could not be checked.
        let dropped = CrlNumbers::of(&[crl("Server CA 1", 5)]);
        let why = dropped.older_than(&floor).unwrap();
        assert!(why.contains("no CRL of \"CN=Server CA 2\""), "{why}");
    }

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
