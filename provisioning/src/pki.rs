//! The PKI directory: CA certificates and keys, the CRL and the registry.
//!
//! ```text
//! pki/                 0700
//!   root-ca.pem        root CA certificate (keep root-ca.key offline after init)
//!   root-ca.key        0600, optionally encrypted
//!   device-ca.pem      issues device and service certificates, signs the CRL
//!   device-ca.key      0600, optionally encrypted
//!   server-ca.pem      issues gateway certificates; the only anchor devices trust
//!   server-ca.key      0600, optionally encrypted
//!   crl.pem            the device CA's CRL (devices and services), for the gateway
//!   server-crl.pem     the server CA's CRL (gateway certificates), for devices
//!   registry.db        every issued certificate (SQLite)
//! ```

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, Issuer, KeyPair, PublicKeyData};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use twofold_protocol::TrustDomain;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::atomic::{self, Durability};
use crate::error::{Error, Result};
use crate::keys::{self, Passphrase, PassphraseSource};
use crate::profile::{self, Intermediate};
use crate::registry::{
    CertRecord, Filter, Kind, PgStore, Registry, RegistryUrl, SqliteStore, Store, StoreError,
    StoreTx,
};
use crate::serial::Serial;

pub(crate) const ROOT_CERT: &str = "root-ca.pem";
pub(crate) const ROOT_KEY: &str = "root-ca.key";
pub(crate) const DEVICE_CA_CERT: &str = "device-ca.pem";
pub(crate) const DEVICE_CA_KEY: &str = "device-ca.key";
pub(crate) const SERVER_CA_CERT: &str = "server-ca.pem";
pub(crate) const SERVER_CA_KEY: &str = "server-ca.key";
pub(crate) const CRL: &str = "crl.pem";
pub(crate) const SERVER_CRL: &str = "server-crl.pem";
pub(crate) const REGISTRY: &str = "registry.db";

const TRUST_DOMAIN_SETTING: &str = "trust_domain";

/// An open PKI directory, with its registry in `S` (SQLite or PostgreSQL).
pub struct Pki<S: Store = Registry> {
    dir: PathBuf,
    pub(crate) store: S,
    trust_domain: TrustDomain,
    passphrase: Box<dyn PassphraseSource + Send>,
}

/// A CA certificate with its signing key, ready to issue.
pub struct CaIssuer {
    pub issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    pub not_after: OffsetDateTime,
}

/// A freshly signed certificate and the registry record describing it.
pub(crate) fn record_for(
    cert: &rcgen::Certificate,
    serial: Serial,
    kind: Kind,
    name: &str,
    identity: Option<String>,
    params: &CertificateParams,
    now: OffsetDateTime,
) -> CertRecord {
    CertRecord {
        serial,
        kind,
        name: name.to_owned(),
        identity,
        not_before: params.not_before,
        not_after: params.not_after,
        fingerprint: fingerprint(cert.der()),
        issued_at: now,
        revocation: None,
        der: cert.der().to_vec(),
        replaces: None,
    }
}

/// SHA-256 of a DER certificate, lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

impl Pki<Registry> {
    /// Creates a new PKI at `dir` with its registry in SQLite beside it;
    /// see [`Pki::init_with`].
    pub fn init(
        dir: &Path,
        trust_domain: TrustDomain,
        passphrase: Option<Passphrase>,
    ) -> Result<Pki> {
        Pki::init_with(dir, trust_domain, passphrase, &RegistryUrl::Sqlite)
    }

    /// Creates a new PKI at `dir`: root, device and server CAs (ECDSA
    /// P-256), an empty CRL and the registry, in `registry`. Refuses an
    /// existing PKI, a non-empty directory, or a PostgreSQL registry that
    /// holds a PKI already. Everything is built in a temporary directory
    /// beside `dir` and renamed into place, so an interrupted init leaves
    /// nothing behind; a PostgreSQL registry commits only once the
    /// directory is in place.
    pub fn init_with(
        dir: &Path,
        trust_domain: TrustDomain,
        passphrase: Option<Passphrase>,
        registry: &RegistryUrl,
    ) -> Result<Pki> {
        if dir.join(REGISTRY).exists() {
            return Err(Error::PkiExists {
                dir: dir.to_owned(),
            });
        }
        if fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some()) {
            return Err(Error::DirNotEmpty {
                dir: dir.to_owned(),
            });
        }
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(Error::io(&parent))?;
        let staging = tempfile::Builder::new()
            .prefix(".twofold-init-")
            .tempdir_in(&parent)
            .map_err(Error::io(&parent))?;
        match registry {
            RegistryUrl::Sqlite => {
                let mut store = SqliteStore::open(&staging.path().join(REGISTRY))?;
                let tx = store.begin()?;
                build(staging.path(), &trust_domain, passphrase.as_ref(), &tx)?;
                tx.commit()?;
                drop(store);
                place(staging, dir, &parent)?;
            }
            RegistryUrl::Postgres(url) => {
                let mut store = PgStore::open(url)?;
                let tx = store.begin()?;
                // Under the writer lock: a concurrent init waits here and
                // then finds this one's root CA.
                let roots = tx.find(&Filter {
                    kind: Some(Kind::RootCa),
                    ..Filter::default()
                })?;
                if !roots.is_empty() {
                    return Err(Error::RegistryHasPki {
                        registry: registry.to_string(),
                    });
                }
                build(staging.path(), &trust_domain, passphrase.as_ref(), &tx)?;
                place(staging, dir, &parent)?;
                match tx.commit() {
                    Ok(()) => {}
                    // It may have been recorded: the keys must stay.
                    Err(e @ StoreError::CommitUnknown(_)) => return Err(e.into()),
                    Err(e) => {
                        let _ = fs::remove_dir_all(dir);
                        return Err(e.into());
                    }
                }
            }
        }
        let source: Box<dyn PassphraseSource + Send> = match passphrase {
            Some(p) => Box::new(p),
            None => Box::new(keys::NoPassphrase),
        };
        Pki::open_with(dir, source, registry)
    }

    /// Opens an existing PKI whose registry is the SQLite file in `dir`.
    pub fn open(dir: &Path, passphrase: Box<dyn PassphraseSource + Send>) -> Result<Pki> {
        Pki::open_with(dir, passphrase, &RegistryUrl::Sqlite)
    }

    /// Opens an existing PKI with its registry in `registry`. `passphrase`
    /// is asked only if a CA key that an operation needs turns out to be
    /// encrypted.
    pub fn open_with(
        dir: &Path,
        passphrase: Box<dyn PassphraseSource + Send>,
        registry: &RegistryUrl,
    ) -> Result<Pki> {
        let has_sqlite = dir.join(REGISTRY).is_file();
        if *registry == RegistryUrl::Sqlite && !has_sqlite {
            return Err(if dir.join(ROOT_CERT).is_file() {
                Error::RegistryElsewhere {
                    dir: dir.to_owned(),
                }
            } else {
                Error::NoPki {
                    dir: dir.to_owned(),
                }
            });
        }
        if !dir.join(ROOT_CERT).is_file() && !has_sqlite {
            return Err(Error::NoPki {
                dir: dir.to_owned(),
            });
        }
        for file in [
            DEVICE_CA_CERT,
            DEVICE_CA_KEY,
            SERVER_CA_CERT,
            SERVER_CA_KEY,
            ROOT_CERT,
        ] {
            if !dir.join(file).is_file() {
                return Err(Error::PkiIncomplete {
                    dir: dir.to_owned(),
                    file,
                });
            }
        }
        let store = match registry {
            RegistryUrl::Sqlite => Registry::Sqlite(SqliteStore::open(&dir.join(REGISTRY))?),
            RegistryUrl::Postgres(url) => {
                let store = PgStore::open(url)?;
                if store.setting(TRUST_DOMAIN_SETTING)?.is_none() {
                    return Err(Error::NoPkiInRegistry {
                        registry: registry.to_string(),
                    });
                }
                Registry::Postgres(Box::new(store))
            }
        };
        Pki::with_store(dir, store, passphrase)
    }
}

/// Renames the built PKI `staging` into `dir`. rename(2) replaces an empty
/// directory and fails on a non-empty one, so a concurrent init cannot
/// overwrite a PKI either.
fn place(staging: tempfile::TempDir, dir: &Path, parent: &Path) -> Result<()> {
    fs::set_permissions(staging.path(), fs::Permissions::from_mode(0o700))
        .map_err(Error::io(staging.path()))?;
    let staged = staging.keep();
    if let Err(e) = fs::rename(&staged, dir) {
        let _ = fs::remove_dir_all(&staged);
        return Err(
            if dir.join(REGISTRY).exists() || dir.join(ROOT_CERT).exists() {
                Error::PkiExists {
                    dir: dir.to_owned(),
                }
            } else {
                Error::Io {
                    path: dir.to_owned(),
                    source: e,
                }
            },
        );
    }
    atomic::sync_dir(parent)
}

impl<S: Store> Pki<S> {
    /// Opens the PKI at `dir` with its registry in `store`.
    pub fn with_store(
        dir: &Path,
        store: S,
        passphrase: Box<dyn PassphraseSource + Send>,
    ) -> Result<Pki<S>> {
        let td = store
            .setting(TRUST_DOMAIN_SETTING)?
            .ok_or_else(|| StoreError::Corrupt("no trust domain recorded".into()))?;
        let trust_domain = TrustDomain::parse(&td)
            .map_err(|e| StoreError::Corrupt(format!("recorded trust domain {td:?} {e}")))?;
        Ok(Pki {
            dir: dir.to_owned(),
            store,
            trust_domain,
            passphrase,
        })
    }

    /// The PKI directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The trust domain chosen at init.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The registry, for reading.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The registry, to change what [`Pki`] has no method for (group
    /// memberships).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Reads a public file of the PKI (a CA certificate or the CRL).
    pub fn read_public(&self, file: &str) -> Result<String> {
        let path = self.dir.join(file);
        fs::read_to_string(&path).map_err(Error::io(path))
    }

    /// The device CA certificate, PEM: what the gateway trusts for clients.
    pub fn device_ca_pem(&self) -> Result<String> {
        self.read_public(DEVICE_CA_CERT)
    }

    /// The server CA certificate, PEM: the only anchor devices trust.
    pub fn server_ca_pem(&self) -> Result<String> {
        self.read_public(SERVER_CA_CERT)
    }

    /// The device CA's current CRL, PEM: what the gateway checks clients against.
    pub fn crl_pem(&self) -> Result<String> {
        self.read_public(CRL)
    }

    /// The server CA's current CRL, PEM: what devices check the gateway
    /// against. `None` for a PKI made before there was one, until its
    /// first `provisioning crl --server` or gateway revocation.
    pub fn server_crl_pem(&self) -> Result<Option<String>> {
        match fs::read_to_string(self.dir.join(SERVER_CRL)) {
            Ok(pem) => Ok(Some(pem)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Io {
                path: self.dir.join(SERVER_CRL),
                source: e,
            }),
        }
    }

    /// Loads an intermediate CA with its key, decrypting it if needed.
    pub(crate) fn issuer(&self, which: Intermediate) -> Result<CaIssuer> {
        let (cert_file, key_file) = match which {
            Intermediate::Device => (DEVICE_CA_CERT, DEVICE_CA_KEY),
            Intermediate::Server => (SERVER_CA_CERT, SERVER_CA_KEY),
        };
        let key_path = self.dir.join(key_file);
        let key_pem = fs::read_to_string(&key_path).map_err(Error::io(&key_path))?;
        let key = keys::from_pem(&key_path, &key_pem, self.passphrase.as_ref())?;
        let cert_path = self.dir.join(cert_file);
        let cert_pem = fs::read_to_string(&cert_path).map_err(Error::io(&cert_path))?;
        let corrupt = |detail: String| Error::CorruptCertificate {
            file: cert_path.clone(),
            detail,
        };
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| corrupt(format!("not PEM: {e}")))?;
        let (_, cert) =
            X509Certificate::from_der(&pem.contents).map_err(|e| corrupt(e.to_string()))?;
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(corrupt(format!("it does not match the key in {key_file}")));
        }
        let not_after = cert.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&pem.contents.as_slice().into(), key)?;
        Ok(CaIssuer {
            issuer,
            cert_pem,
            cert_der: pem.contents.clone(),
            not_after,
        })
    }
}

/// Writes a complete PKI into the empty directory `dir`, and its records
/// into `tx`, which the caller commits.
fn build(
    dir: &Path,
    td: &TrustDomain,
    passphrase: Option<&Passphrase>,
    tx: &impl StoreTx,
) -> Result<()> {
    let now = crate::registry::now();
    tx.set_setting(TRUST_DOMAIN_SETTING, td.as_str())?;
    tx.set_setting("created_at", &now.unix_timestamp().to_string())?;

    let write_ca = |kind: Kind,
                    params: &CertificateParams,
                    cert: &rcgen::Certificate,
                    key: &KeyPair,
                    serial: Serial| {
        let (cert_file, key_file) = match kind {
            Kind::RootCa => (ROOT_CERT, ROOT_KEY),
            Kind::DeviceCa => (DEVICE_CA_CERT, DEVICE_CA_KEY),
            _ => (SERVER_CA_CERT, SERVER_CA_KEY),
        };
        atomic::write(
            &dir.join(key_file),
            keys::to_pem(key, passphrase)?.as_bytes(),
            atomic::SECRET,
            Durability::Sync,
        )?;
        atomic::write(
            &dir.join(cert_file),
            cert.pem().as_bytes(),
            atomic::PUBLIC,
            Durability::Sync,
        )?;
        let name = params
            .distinguished_name
            .get(&rcgen::DnType::CommonName)
            .map(|v| match v {
                rcgen::DnValue::Utf8String(s) => s.clone(),
                other => format!("{other:?}"),
            })
            .unwrap_or_default();
        tx.insert(&record_for(cert, serial, kind, &name, None, params, now))?;
        Ok::<_, Error>(())
    };

    let root_key = keys::generate()?;
    let root_serial = Serial::random();
    let root_params = profile::root_ca(td.as_str(), &root_serial, now);
    let root_cert = root_params.self_signed(&root_key)?;
    write_ca(
        Kind::RootCa,
        &root_params,
        &root_cert,
        &root_key,
        root_serial,
    )?;
    let root = Issuer::from_params(&root_params, &root_key);

    for (which, kind) in [
        (Intermediate::Device, Kind::DeviceCa),
        (Intermediate::Server, Kind::ServerCa),
    ] {
        let key = keys::generate()?;
        let serial = Serial::random();
        let params = profile::intermediate_ca(which, td.as_str(), &serial, now);
        let cert = params.signed_by(&key, &root)?;
        write_ca(kind, &params, &cert, &key, serial)?;
        // Each intermediate starts with an empty CRL of its own.
        let scope = match which {
            Intermediate::Device => crate::crl::Scope::Device,
            Intermediate::Server => crate::crl::Scope::Server,
        };
        let issuer = Issuer::new(params.clone(), key);
        let crl = crate::crl::sign(scope, tx, &issuer, now, None)?;
        atomic::write(
            &dir.join(scope.file()),
            crl.pem()?.as_bytes(),
            atomic::PUBLIC,
            Durability::Sync,
        )?;
    }
    Ok(())
}
