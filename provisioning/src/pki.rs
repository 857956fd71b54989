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
//!   token.toml         with CA keys in a PKCS#11 token instead of the
//!                      three .key files: the module, the token's label and
//!                      where its PIN is read from (never the PIN)
//! ```

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, Issuer, KeyPair, PublicKeyData, SigningKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use twofold_protocol::TrustDomain;
use twofold_token::{PinSource, Token, TokenKey, TokenSpec};
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
pub(crate) const TOKEN_FILE: &str = "token.toml";
/// Where the token's PIN is read from when `token.toml` does not say.
pub const TOKEN_PIN_ENV: &str = "TWOFOLD_TOKEN_PIN";

const TRUST_DOMAIN_SETTING: &str = "trust_domain";

/// An open PKI directory, with its registry in `S` (SQLite or PostgreSQL).
pub struct Pki<S: Store = Registry> {
    dir: PathBuf,
    pub(crate) store: S,
    trust_domain: TrustDomain,
    passphrase: Box<dyn PassphraseSource + Send>,
    /// With the CA keys in a token: which one, and its session once open.
    token: Option<(TokenSpec, std::sync::OnceLock<Token>)>,
}

/// Where a new PKI keeps its CA keys.
pub enum NewCaKeys {
    /// PEM files in the PKI directory, encrypted with the passphrase if
    /// one is given (the default).
    Files(Option<Passphrase>),
    /// Made inside this PKCS#11 token, never written anywhere.
    Token(TokenSpec),
}

/// A CA's signing key: a key read from its file, or one in a token.
pub enum CaKey {
    File(KeyPair),
    Token(TokenKey),
}

impl PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        match self {
            CaKey::File(key) => key.der_bytes(),
            CaKey::Token(key) => key.der_bytes(),
        }
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            CaKey::File(key) => key.algorithm(),
            CaKey::Token(key) => key.algorithm(),
        }
    }
}

impl SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        match self {
            CaKey::File(key) => key.sign(msg),
            CaKey::Token(key) => {
                let signed = key.sign(msg);
                if signed.is_err() {
                    tracing::error!(
                        error = key.last_error().unwrap_or_default(),
                        "the token did not sign"
                    );
                }
                signed
            }
        }
    }
}

/// The token's label of each CA's key. Several PKIs may share a token:
/// a CA's key is the one under its label that its certificate names.
fn token_label(kind: Kind) -> &'static str {
    match kind {
        Kind::RootCa => "twofold-root-ca",
        Kind::DeviceCa => "twofold-device-ca",
        _ => "twofold-server-ca",
    }
}

/// `token.toml`: which token holds the CA keys.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    module: PathBuf,
    token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pin_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pin_env: Option<String>,
}

impl TokenFile {
    fn of(spec: &TokenSpec) -> TokenFile {
        let (pin_file, pin_env) = match &spec.pin {
            PinSource::File(path) => (Some(path.clone()), None),
            PinSource::Env(name) => (None, Some(name.clone())),
        };
        TokenFile {
            module: spec.module.clone(),
            token: spec.token.clone(),
            pin_file,
            pin_env,
        }
    }

    fn read(path: &Path) -> Result<TokenSpec> {
        let failed = |detail: String| Error::TokenFile {
            file: path.to_owned(),
            detail,
        };
        let text = fs::read_to_string(path).map_err(Error::io(path))?;
        // toml's message, without the line it quotes.
        let file: TokenFile = toml::from_str(&text).map_err(|e| failed(e.message().to_owned()))?;
        if !file.module.is_absolute() {
            return Err(failed(format!(
                "module {} must be an absolute path",
                file.module.display()
            )));
        }
        let pin = match (file.pin_file, file.pin_env) {
            (Some(_), Some(_)) => return Err(failed("give pin_file or pin_env, not both".into())),
            (Some(path), None) => PinSource::File(path),
            (None, Some(name)) => PinSource::Env(name),
            (None, None) => PinSource::Env(TOKEN_PIN_ENV.into()),
        };
        Ok(TokenSpec {
            module: file.module,
            token: file.token,
            pin,
        })
    }
}

/// A CA certificate with its signing key, ready to issue.
pub struct CaIssuer {
    pub issuer: Issuer<'static, CaKey>,
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
        Pki::init_keys(dir, trust_domain, NewCaKeys::Files(passphrase), registry)
    }

    /// [`Pki::init_with`], with the CA keys where `keys` says: in files,
    /// or made inside a PKCS#11 token and never written anywhere.
    pub fn init_keys(
        dir: &Path,
        trust_domain: TrustDomain,
        keys: NewCaKeys,
        registry: &RegistryUrl,
    ) -> Result<Pki> {
        let (passphrase, token) = match keys {
            NewCaKeys::Files(passphrase) => (passphrase, None),
            NewCaKeys::Token(spec) => (None, Some(Token::open(&spec)?)),
        };
        let minter = match &token {
            Some(token) => Minter::Token(token, Default::default()),
            None => Minter::Files(passphrase.as_ref()),
        };
        let made = Pki::init_in(dir, &trust_domain, &minter, registry);
        match (&made, &minter) {
            // A PKI that may have been recorded keeps its keys.
            (Err(Error::Store(StoreError::CommitUnknown(_))), _) | (Ok(()), _) => {}
            // Placed: the PKI is there, and its keys are in use.
            (Err(_), Minter::Token(..)) if dir.join(TOKEN_FILE).exists() => {}
            (Err(_), Minter::Token(token, keys)) => {
                for (label, id) in keys.borrow().iter() {
                    if let Err(e) = token.destroy(label, id) {
                        tracing::warn!(error = %e, label, "cannot destroy a key of the failed init");
                    }
                }
            }
            (Err(_), Minter::Files(_)) => {}
        }
        made?;
        let source: Box<dyn PassphraseSource + Send> = match passphrase {
            Some(p) => Box::new(p),
            None => Box::new(keys::NoPassphrase),
        };
        Pki::open_with(dir, source, registry)
    }

    /// [`Pki::init_keys`] up to its keys being in place.
    fn init_in(
        dir: &Path,
        trust_domain: &TrustDomain,
        minter: &Minter<'_>,
        registry: &RegistryUrl,
    ) -> Result<()> {
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
                build(staging.path(), trust_domain, minter, &tx)?;
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
                build(staging.path(), trust_domain, minter, &tx)?;
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
        Ok(())
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
        let in_token = dir.join(TOKEN_FILE).is_file();
        for file in [
            DEVICE_CA_CERT,
            DEVICE_CA_KEY,
            SERVER_CA_CERT,
            SERVER_CA_KEY,
            ROOT_CERT,
        ] {
            if in_token && file.ends_with(".key") {
                continue;
            }
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
        let token_file = dir.join(TOKEN_FILE);
        let token = if token_file.is_file() {
            Some((TokenFile::read(&token_file)?, std::sync::OnceLock::new()))
        } else {
            None
        };
        Ok(Pki {
            dir: dir.to_owned(),
            store,
            trust_domain,
            passphrase,
            token,
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

    /// The token holding the CA keys, if they are in one, logged in on
    /// first use.
    pub fn token(&self) -> Result<Option<&Token>> {
        let Some((spec, session)) = &self.token else {
            return Ok(None);
        };
        if let Some(token) = session.get() {
            return Ok(Some(token));
        }
        let token = Token::open(spec)?;
        Ok(Some(session.get_or_init(|| token)))
    }

    /// Loads an intermediate CA with its key, decrypting it if needed, or
    /// finding it in the token.
    pub(crate) fn issuer(&self, which: Intermediate) -> Result<CaIssuer> {
        let (cert_file, key_file, kind) = match which {
            Intermediate::Device => (DEVICE_CA_CERT, DEVICE_CA_KEY, Kind::DeviceCa),
            Intermediate::Server => (SERVER_CA_CERT, SERVER_CA_KEY, Kind::ServerCa),
        };
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
        let key = match self.token()? {
            Some(token) => {
                let point = cert.public_key().subject_public_key.data.to_vec();
                let key = token.key_for(token_label(kind), &point)?;
                // A failure to sign says why here, rather than as rcgen's
                // wordless error in the middle of an issue.
                key.sign_sha256(b"twofold: can this token sign?")?;
                CaKey::Token(key)
            }
            None => {
                let key_path = self.dir.join(key_file);
                let key_pem = fs::read_to_string(&key_path).map_err(Error::io(&key_path))?;
                CaKey::File(keys::from_pem(
                    &key_path,
                    &key_pem,
                    self.passphrase.as_ref(),
                )?)
            }
        };
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
/// Makes the CA keys of a new PKI where they are to live.
enum Minter<'a> {
    Files(Option<&'a Passphrase>),
    /// The token, and the keys made in it so far (label, id): a failed
    /// init destroys them.
    Token(&'a Token, std::cell::RefCell<Vec<(&'static str, Vec<u8>)>>),
}

impl Minter<'_> {
    fn make(&self, kind: Kind) -> Result<CaKey> {
        Ok(match self {
            Minter::Files(_) => CaKey::File(keys::generate()?),
            Minter::Token(token, made) => {
                let label = token_label(kind);
                let id = twofold_token::new_key_id();
                let info = token.generate_p256(label, &id)?;
                made.borrow_mut().push((label, id));
                CaKey::Token(token.key(info))
            }
        })
    }
}

fn build(dir: &Path, td: &TrustDomain, minter: &Minter<'_>, tx: &impl StoreTx) -> Result<()> {
    let now = crate::registry::now();
    tx.set_setting(TRUST_DOMAIN_SETTING, td.as_str())?;
    tx.set_setting("created_at", &now.unix_timestamp().to_string())?;

    let write_ca = |kind: Kind,
                    params: &CertificateParams,
                    cert: &rcgen::Certificate,
                    key: &CaKey,
                    serial: Serial| {
        let (cert_file, key_file) = match kind {
            Kind::RootCa => (ROOT_CERT, ROOT_KEY),
            Kind::DeviceCa => (DEVICE_CA_CERT, DEVICE_CA_KEY),
            _ => (SERVER_CA_CERT, SERVER_CA_KEY),
        };
        // A key in a token is there already; only the token file says which.
        if let (CaKey::File(key), Minter::Files(passphrase)) = (key, minter) {
            atomic::write(
                &dir.join(key_file),
                keys::to_pem(key, *passphrase)?.as_bytes(),
                atomic::SECRET,
                Durability::Sync,
            )?;
        }
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

    if let Minter::Token(token, _) = minter {
        let text = toml::to_string(&TokenFile::of(token.spec())).map_err(|e| Error::TokenFile {
            file: dir.join(TOKEN_FILE),
            detail: e.to_string(),
        })?;
        atomic::write(
            &dir.join(TOKEN_FILE),
            format!(
                "# The CA keys of this PKI are in this PKCS#11 token; no file holds them.\n\
                 # The PIN is read from pin_file, or the environment variable pin_env\n\
                 # ({TOKEN_PIN_ENV} when neither is given).\n{text}"
            )
            .as_bytes(),
            atomic::PUBLIC,
            Durability::Sync,
        )?;
    }
    let root_key = minter.make(Kind::RootCa)?;
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
        let key = minter.make(kind)?;
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
