//! What can go wrong, with the next step for the operator in each message.

use std::path::PathBuf;

use twofold_protocol::NameError;

use crate::csr::CsrError;
use crate::registry::StoreError;

/// Every failure of a provisioning operation. Nothing is changed on disk
/// when one of these is returned, unless the variant says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no PKI at {dir}: create one with `provisioning init --trust-domain <domain> --pki {dir}`, \
         or point --pki (or TWOFOLD_PKI) at an existing one"
    )]
    NoPki { dir: PathBuf },

    #[error(
        "a PKI already exists at {dir}; refusing to overwrite it (every certificate it issued would \
         stop being trusted). Choose another --pki directory"
    )]
    PkiExists { dir: PathBuf },

    #[error(
        "no registry.db in {dir}, though its CA files are there: if this PKI keeps its registry \
         in PostgreSQL, give --registry (or TWOFOLD_REGISTRY) its postgres:// URL"
    )]
    RegistryElsewhere { dir: PathBuf },

    #[error(
        "the registry {registry} holds no PKI: create one with `provisioning init --registry \
         {registry}`, or check the URL's database name"
    )]
    NoPkiInRegistry { registry: String },

    #[error(
        "the registry {registry} already holds a PKI; refusing to start another in it. Give `init` \
         an empty database"
    )]
    RegistryHasPki { registry: String },

    #[error("{dir} is not empty and holds no PKI; give `init` a new or empty directory")]
    DirNotEmpty { dir: PathBuf },

    #[error("the PKI at {dir} is incomplete: {file} is missing; restore it from your backup")]
    PkiIncomplete { dir: PathBuf, file: &'static str },

    #[error(
        "invalid {what} {value:?}: it {reason}. Use 1-64 characters of a-z, 0-9 and '-', \
         not starting with '-'"
    )]
    InvalidName {
        what: &'static str,
        value: String,
        reason: NameError,
    },

    #[error(
        "invalid trust domain {value:?}: it {reason}. Use lowercase letters, digits, '.', '-' and '_', \
         e.g. iot.example.com"
    )]
    InvalidTrustDomain { value: String, reason: NameError },

    #[error("invalid gateway name {value:?}: {reason}")]
    InvalidHostName { value: String, reason: &'static str },

    #[error("invalid --crl-url {value:?}: {reason}")]
    InvalidCrlUrl { value: String, reason: String },

    #[error(
        "{identity} already has an active certificate (serial {serial}, valid until {not_after}); \
         pass --replace to issue a new one and revoke the old one"
    )]
    AlreadyEnrolled {
        identity: String,
        serial: String,
        not_after: String,
    },

    #[error(
        "no certificate was ever issued to {identity}; see enrolled identities with `provisioning list`"
    )]
    UnknownIdentity { identity: String },

    #[error(
        "{identity} has no active certificate to revoke (its certificates are all revoked already)"
    )]
    NothingToRevoke { identity: String },

    #[error(
        "no certificate with serial {serial} in the registry; see serials with `provisioning list`"
    )]
    UnknownSerial { serial: String },

    #[error("certificate {serial} was already revoked at {revoked_at}")]
    AlreadyRevoked { serial: String, revoked_at: String },

    #[error(
        "certificate {serial} is a {kind} certificate; only device, service and gateway \
         certificates are revoked through a CRL (a CA is replaced with a new PKI)"
    )]
    NotRevocable { serial: String, kind: &'static str },

    #[error(
        "invalid serial {value:?}: {reason}; expected hexadecimal digits, optionally separated by ':'"
    )]
    InvalidSerial {
        value: String,
        reason: twofold_trust::SerialError,
    },

    #[error(
        "{file} is encrypted and no passphrase was given: set TWOFOLD_CA_PASSPHRASE or run on a terminal \
         to be prompted"
    )]
    PassphraseRequired { file: PathBuf },

    #[error(
        "wrong passphrase for {file} (or the file is damaged); check TWOFOLD_CA_PASSPHRASE or what you \
         typed. Nothing was changed"
    )]
    WrongPassphrase { file: PathBuf },

    #[error("the passphrase is empty; choose a non-empty passphrase")]
    EmptyPassphrase,

    #[error("{file} is not a usable private key ({detail}); restore it from your backup")]
    CorruptKey { file: PathBuf, detail: String },

    #[error("{file} is not a usable certificate ({detail}); restore it from your backup")]
    CorruptCertificate { file: PathBuf, detail: String },

    #[error("CSR {file}: {reason}")]
    Csr { file: PathBuf, reason: CsrError },

    #[error("--days must be between 1 and {max}, got {days}")]
    InvalidDays { days: u32, max: u32 },

    #[error("--count must be at least 1")]
    EmptyBatch,

    #[error(
        "--count {count} is too large (or runs past the largest number); enroll at most {max} per \
         command, in several commands with --start"
    )]
    BatchTooLarge { count: u64, max: u64 },

    #[error(
        "the issuing CA expires {not_after}, within a day; no certificate can be issued from it. \
         Create a new PKI and re-enroll, well before a CA expires"
    )]
    CaExpiring { not_after: time::OffsetDateTime },

    #[error(
        "a certificate lifetime of {seconds} s is too short; certificates live at least 60 s \
         (shorter lifetimes than a day are for tests and demonstrations of renewal)"
    )]
    InvalidLifetime { seconds: i64 },

    #[error("cannot build the microcontroller bundle: {0}")]
    Bundle(String),

    /// Not a `source`: the message says it already, and a source would
    /// print it twice in a chain (`error: registry: X: X`).
    #[error("registry: {0}")]
    Store(StoreError),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("certificate generation failed: {0}")]
    Certificate(#[from] rcgen::Error),

    /// Not a `source`: the text says it all, and once.
    #[error("{0}; fix: {fix}", fix = .0.fix())]
    Token(twofold_token::TokenError),

    #[error("{file}: {detail}")]
    TokenFile { file: PathBuf, detail: String },
}

impl From<twofold_token::TokenError> for Error {
    fn from(e: twofold_token::TokenError) -> Self {
        Error::Token(e)
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Store(e)
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

/// Short for `Result<T, Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
