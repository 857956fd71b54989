//! The registry: every certificate the PKI ever issued, and its status.
//!
//! It is the source of truth; the CRL is derived from it. Storage sits
//! behind [`Store`]: [`SqliteStore`], a file in the PKI directory, by
//! default, and [`PgStore`] for several provisioning nodes or CA services
//! sharing one registry. All changes go through one exclusive [`StoreTx`],
//! so two commands running at once never both see "not enrolled" and never
//! reuse a serial.

mod postgres;
mod sqlite;

use std::fmt;
use std::str::FromStr;

pub use postgres::{PgStore, PgTx};
pub use sqlite::{SqliteStore, SqliteTx};
use time::OffsetDateTime;

use crate::serial::Serial;

/// The current time at the registry's precision (whole seconds), so a
/// record read back equals the record written.
pub fn now() -> OffsetDateTime {
    let t = OffsetDateTime::now_utc();
    t.replace_nanosecond(0).unwrap_or(t)
}

/// What a certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    RootCa,
    DeviceCa,
    ServerCa,
    Gateway,
    Device,
    Service,
}

impl Kind {
    /// The stored and displayed name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::RootCa => "root-ca",
            Kind::DeviceCa => "device-ca",
            Kind::ServerCa => "server-ca",
            Kind::Gateway => "gateway",
            Kind::Device => "device",
            Kind::Service => "service",
        }
    }

    /// Device and service certificates: one active per name, revocable
    /// through the device CA's CRL.
    pub fn is_client(&self) -> bool {
        matches!(self, Kind::Device | Kind::Service)
    }
}

impl FromStr for Kind {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        [
            Kind::RootCa,
            Kind::DeviceCa,
            Kind::ServerCa,
            Kind::Gateway,
            Kind::Device,
            Kind::Service,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown certificate kind {s:?}")))
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a certificate was revoked (RFC 5280 §5.3.1 reason codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RevocationReason {
    Unspecified,
    KeyCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
    PrivilegeWithdrawn,
}

impl RevocationReason {
    /// The stored and displayed name.
    pub fn as_str(&self) -> &'static str {
        match self {
            RevocationReason::Unspecified => "unspecified",
            RevocationReason::KeyCompromise => "key-compromise",
            RevocationReason::AffiliationChanged => "affiliation-changed",
            RevocationReason::Superseded => "superseded",
            RevocationReason::CessationOfOperation => "cessation-of-operation",
            RevocationReason::PrivilegeWithdrawn => "privilege-withdrawn",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        <Self as clap::ValueEnum>::from_str(s, false)
            .map_err(|_| StoreError::Corrupt(format!("unknown revocation reason {s:?}")))
    }
}

impl From<RevocationReason> for rcgen::RevocationReason {
    fn from(r: RevocationReason) -> Self {
        match r {
            RevocationReason::Unspecified => rcgen::RevocationReason::Unspecified,
            RevocationReason::KeyCompromise => rcgen::RevocationReason::KeyCompromise,
            RevocationReason::AffiliationChanged => rcgen::RevocationReason::AffiliationChanged,
            RevocationReason::Superseded => rcgen::RevocationReason::Superseded,
            RevocationReason::CessationOfOperation => rcgen::RevocationReason::CessationOfOperation,
            RevocationReason::PrivilegeWithdrawn => rcgen::RevocationReason::PrivilegeWithdrawn,
        }
    }
}

/// A revocation: when and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Revocation {
    pub at: OffsetDateTime,
    pub reason: RevocationReason,
}

/// One issued certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertRecord {
    pub serial: Serial,
    pub kind: Kind,
    /// Device id, service name, gateway DNS name or CA name.
    pub name: String,
    /// The SAN URI identity, for devices and services.
    pub identity: Option<String>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// SHA-256 of the DER certificate, lowercase hex.
    pub fingerprint: String,
    pub issued_at: OffsetDateTime,
    pub revocation: Option<Revocation>,
    /// The certificate itself, DER.
    pub der: Vec<u8>,
    /// While a renewed certificate awaits the device's commit: the
    /// certificate it replaces, still valid until then.
    pub replaces: Option<Serial>,
}

/// The status shown to operators; `Expired` is derived from the clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Active,
    Revoked,
    Expired,
}

impl CertRecord {
    /// Status at `now`. A revoked certificate stays revoked after expiry.
    pub fn status(&self, now: OffsetDateTime) -> Status {
        if self.revocation.is_some() {
            Status::Revoked
        } else if self.not_after <= now {
            Status::Expired
        } else {
            Status::Active
        }
    }
}

/// Which records to read.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub kind: Option<Kind>,
    pub name: Option<String>,
    pub serial: Option<Serial>,
    /// Only records that are not revoked.
    pub unrevoked_only: bool,
}

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Backend(String),
    #[error(
        "the registry is locked by another provisioning command that has run for over a minute \
         (a large bulk-enroll?); retry when it has finished"
    )]
    Busy,
    #[error("the registry is corrupt: {0}; restore it from your backup")]
    Corrupt(String),
    #[error("serial {0} is already in the registry")]
    DuplicateSerial(Serial),
    #[error("{kind} {name} already has an active certificate")]
    DuplicateActive { kind: Kind, name: String },
    #[error(
        "the registry database is unreachable ({0}); nothing was recorded, retry when it is back"
    )]
    Unavailable(String),
    #[error(
        "the registry database went away while committing ({0}); the change may or may not have \
         been recorded: check with `provisioning list` before retrying"
    )]
    CommitUnknown(String),
}

/// A certificate registry.
pub trait Store {
    /// The exclusive write transaction of this backend.
    type Tx<'a>: StoreTx
    where
        Self: 'a;

    /// Starts an exclusive write transaction, waiting for other writers.
    fn begin(&mut self) -> Result<Self::Tx<'_>, StoreError>;

    /// Reads records, newest first.
    fn find(&self, filter: &Filter) -> Result<Vec<CertRecord>, StoreError>;

    /// Reads a setting written at init (e.g. the trust domain).
    fn setting(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// Every group membership, ordered by group, kind and name.
    fn memberships(&self) -> Result<Vec<Membership>, StoreError>;
}

/// Changes that become visible together on [`StoreTx::commit`], or not at all.
pub trait StoreTx {
    /// Reads records inside the transaction.
    fn find(&self, filter: &Filter) -> Result<Vec<CertRecord>, StoreError>;
    /// Records a new certificate. Fails on a duplicate serial, and on a
    /// second unrevoked device or service certificate for one name.
    fn insert(&self, record: &CertRecord) -> Result<(), StoreError>;
    /// Marks a certificate revoked.
    fn revoke(&self, serial: &Serial, revocation: Revocation) -> Result<(), StoreError>;
    /// All revoked certificates of `scope`'s kinds that have not expired.
    fn revoked_unexpired(
        &self,
        scope: crate::crl::Scope,
        now: OffsetDateTime,
    ) -> Result<Vec<CertRecord>, StoreError>;
    /// Advances `scope`'s CRL number to at least `at_least` and returns it:
    /// one more than the last, or `at_least` if that is larger.
    fn next_crl_number(&self, scope: crate::crl::Scope, at_least: u64) -> Result<u64, StoreError> {
        let key = scope.number_setting();
        let current = self
            .setting(key)?
            .map(|v| v.parse::<u64>())
            .transpose()
            .map_err(|_| StoreError::Corrupt(format!("{key} is not a number")))?
            .unwrap_or(0);
        let next = current.saturating_add(1).max(at_least);
        self.set_setting(key, &next.to_string())?;
        Ok(next)
    }
    /// Marks a renewed certificate committed: it no longer `replaces`
    /// anything (its predecessor is revoked in the same transaction).
    fn settle(&self, serial: &Serial) -> Result<(), StoreError>;
    /// The certificate a renewal request id of `kind`/`name` produced.
    fn renewal(
        &self,
        kind: Kind,
        name: &str,
        request_id: &str,
    ) -> Result<Option<Serial>, StoreError>;
    /// Remembers that `request_id` produced `serial`.
    fn record_renewal(
        &self,
        kind: Kind,
        name: &str,
        request_id: &str,
        serial: &Serial,
        at: OffsetDateTime,
    ) -> Result<(), StoreError>;
    /// Reads a setting inside the transaction.
    fn setting(&self, key: &str) -> Result<Option<String>, StoreError>;
    /// Writes a setting.
    fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError>;
    /// Adds (`member`) or removes a group membership; whether it changed.
    fn set_membership(&self, m: &Membership, member: bool) -> Result<bool, StoreError>;
    /// Makes every change visible at once.
    fn commit(self) -> Result<(), StoreError>;
}

/// A device or service in a group of the topic policy.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Membership {
    pub group: String,
    pub kind: Kind,
    pub name: String,
}

/// Groups (schema version 2): which devices and services are in which
/// group of the topic policy. Names only: a membership outlives the
/// certificates of its device, as the device's id does.
pub(crate) const MIGRATE_V2: &str = "
CREATE TABLE memberships (
    grp  TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (grp, kind, name)
);
";

/// Renewal (schema version 1): a renewed certificate is recorded beside
/// its predecessor, marked `replaces`, until the device commits it or the
/// grace period ends; only then is the predecessor revoked. The one-active
/// rule therefore counts committed certificates only. `renewals` remembers
/// which certificate each request id produced, so that a device asking
/// again after a dropped connection gets the same one.
pub(crate) const MIGRATE_V1: &str = "
ALTER TABLE certificates ADD COLUMN replaces TEXT;
DROP INDEX one_active_client_cert;
CREATE UNIQUE INDEX one_active_client_cert
    ON certificates (kind, name)
    WHERE revoked_at IS NULL AND replaces IS NULL AND kind IN ('device', 'service');
CREATE UNIQUE INDEX one_pending_client_cert
    ON certificates (kind, name)
    WHERE revoked_at IS NULL AND replaces IS NOT NULL;
CREATE TABLE renewals (
    kind       TEXT NOT NULL,
    name       TEXT NOT NULL,
    request_id TEXT NOT NULL,
    serial     TEXT NOT NULL REFERENCES certificates (serial),
    at         BIGINT NOT NULL,
    PRIMARY KEY (kind, name, request_id)
);
";

pub(crate) const COLUMNS: &str = "serial, kind, name, identity, not_before, not_after, fingerprint, \
                       issued_at, revoked_at, revocation_reason, der, replaces";

/// `Ok` if an update changed exactly one row; else the record was not in
/// the state `not` describes.
pub(crate) fn exactly_one(changed: u64, serial: &Serial, not: &str) -> Result<(), StoreError> {
    if changed == 1 {
        Ok(())
    } else {
        Err(StoreError::Backend(format!(
            "certificate {serial} is {not}"
        )))
    }
}

pub(crate) fn unix(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

pub(crate) fn from_unix(secs: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|_| StoreError::Corrupt(format!("timestamp {secs} out of range")))
}

/// A row as stored, before its text fields are checked.
pub(crate) struct RawRow {
    serial: String,
    kind: String,
    name: String,
    identity: Option<String>,
    not_before: i64,
    not_after: i64,
    fingerprint: String,
    issued_at: i64,
    revoked_at: Option<i64>,
    reason: Option<String>,
    der: Vec<u8>,
    replaces: Option<String>,
}

pub(crate) fn parse_serial(text: &str) -> Result<Serial, StoreError> {
    text.parse::<Serial>()
        .map_err(|_| StoreError::Corrupt(format!("bad serial {text:?}")))
}

impl RawRow {
    pub(crate) fn into_record(self) -> Result<CertRecord, StoreError> {
        let serial = parse_serial(&self.serial)?;
        let revocation = match (self.revoked_at, self.reason) {
            (Some(at), Some(reason)) => Some(Revocation {
                at: from_unix(at)?,
                reason: RevocationReason::parse(&reason)?,
            }),
            (None, None) => None,
            _ => {
                return Err(StoreError::Corrupt(format!(
                    "half-recorded revocation of {serial}"
                )));
            }
        };
        Ok(CertRecord {
            serial,
            kind: self.kind.parse()?,
            name: self.name,
            identity: self.identity,
            not_before: from_unix(self.not_before)?,
            not_after: from_unix(self.not_after)?,
            fingerprint: self.fingerprint,
            issued_at: from_unix(self.issued_at)?,
            revocation,
            der: self.der,
            replaces: self.replaces.as_deref().map(parse_serial).transpose()?,
        })
    }
}

/// Where the registry is: `sqlite` (the file in the PKI directory, the
/// default) or a `postgres://` URL. Debug shows it as Display does,
/// without a password.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum RegistryUrl {
    #[default]
    Sqlite,
    Postgres(String),
}

impl FromStr for RegistryUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "sqlite" {
            Ok(RegistryUrl::Sqlite)
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(RegistryUrl::Postgres(s.to_owned()))
        } else {
            Err(format!(
                "{s:?} is not a registry: give `sqlite` (the file in the PKI directory) or a \
                 postgres:// URL"
            ))
        }
    }
}

impl fmt::Debug for RegistryUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RegistryUrl({self})")
    }
}

impl fmt::Display for RegistryUrl {
    /// The URL without its password, for messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryUrl::Sqlite => f.write_str("sqlite"),
            RegistryUrl::Postgres(url) => {
                // Parameters may hold a password too (`?password=`).
                let (url, query) = match url.split_once('?') {
                    Some((url, _)) => (url, "?…"),
                    None => (url.as_str(), ""),
                };
                match (url.find("://"), url.rfind('@')) {
                    (Some(scheme), Some(at)) if at > scheme => {
                        let user = &url[scheme + 3..at];
                        let user = user.split(':').next().unwrap_or_default();
                        write!(f, "{}{user}@{}{query}", &url[..scheme + 3], &url[at + 1..])
                    }
                    _ => write!(f, "{url}{query}"),
                }
            }
        }
    }
}

/// The registry of a PKI, whichever backend holds it.
pub enum Registry {
    Sqlite(SqliteStore),
    /// Boxed: its connection state is four times SQLite's handle.
    Postgres(Box<PgStore>),
}

/// A write transaction on a [`Registry`].
pub enum RegistryTx<'a> {
    Sqlite(SqliteTx<'a>),
    Postgres(PgTx<'a>),
}

/// Calls the same method on whichever backend `$self` holds.
macro_rules! each {
    ($enum:ident, $self:expr, $s:ident => $call:expr) => {
        match $self {
            $enum::Sqlite($s) => $call,
            $enum::Postgres($s) => $call,
        }
    };
}

impl Store for Registry {
    type Tx<'a> = RegistryTx<'a>;

    fn begin(&mut self) -> Result<RegistryTx<'_>, StoreError> {
        Ok(match self {
            Registry::Sqlite(s) => RegistryTx::Sqlite(s.begin()?),
            Registry::Postgres(s) => RegistryTx::Postgres(s.begin()?),
        })
    }

    fn find(&self, filter: &Filter) -> Result<Vec<CertRecord>, StoreError> {
        each!(Registry, self, s => s.find(filter))
    }

    fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        each!(Registry, self, s => s.setting(key))
    }

    fn memberships(&self) -> Result<Vec<Membership>, StoreError> {
        each!(Registry, self, s => s.memberships())
    }
}

impl StoreTx for RegistryTx<'_> {
    fn find(&self, filter: &Filter) -> Result<Vec<CertRecord>, StoreError> {
        each!(RegistryTx, self, t => t.find(filter))
    }
    fn insert(&self, record: &CertRecord) -> Result<(), StoreError> {
        each!(RegistryTx, self, t => t.insert(record))
    }
    fn revoke(&self, serial: &Serial, revocation: Revocation) -> Result<(), StoreError> {
        each!(RegistryTx, self, t => t.revoke(serial, revocation))
    }
    fn revoked_unexpired(
        &self,
        scope: crate::crl::Scope,
        now: OffsetDateTime,
    ) -> Result<Vec<CertRecord>, StoreError> {
        each!(RegistryTx, self, t => t.revoked_unexpired(scope, now))
    }
    fn settle(&self, serial: &Serial) -> Result<(), StoreError> {
        each!(RegistryTx, self, t => t.settle(serial))
    }
    fn renewal(
        &self,
        kind: Kind,
        name: &str,
        request_id: &str,
    ) -> Result<Option<Serial>, StoreError> {
        each!(RegistryTx, self, t => t.renewal(kind, name, request_id))
    }
    fn record_renewal(
        &self,
        kind: Kind,
        name: &str,
        request_id: &str,
        serial: &Serial,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        each!(RegistryTx, self, t => t.record_renewal(kind, name, request_id, serial, at))
    }
    fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        each!(RegistryTx, self, t => t.setting(key))
    }
    fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        each!(RegistryTx, self, t => t.set_setting(key, value))
    }
    fn set_membership(&self, m: &Membership, member: bool) -> Result<bool, StoreError> {
        each!(RegistryTx, self, t => t.set_membership(m, member))
    }
    fn commit(self) -> Result<(), StoreError> {
        each!(RegistryTx, self, t => t.commit())
    }
}

#[cfg(test)]
mod tests {
    use super::RegistryUrl;

    #[test]
    fn a_registry_url_is_shown_without_its_password() {
        let url: RegistryUrl = "postgres://ca:s3cret@db.example:5432/pki".parse().unwrap();
        assert_eq!(url.to_string(), "postgres://ca@db.example:5432/pki");
        let url: RegistryUrl = "postgresql://ca@db/pki".parse().unwrap();
        assert_eq!(url.to_string(), "postgresql://ca@db/pki");
        let url: RegistryUrl = "postgres://ca@db/pki?password=s3cret&sslmode=require"
            .parse()
            .unwrap();
        assert_eq!(url.to_string(), "postgres://ca@db/pki?…");
    }

    #[test]
    fn a_registry_is_sqlite_or_a_postgres_url() {
        assert_eq!("sqlite".parse::<RegistryUrl>(), Ok(RegistryUrl::Sqlite));
        for bad in ["", "mysql://db/x", "registry.db", "postgres:/x"] {
            let err = bad.parse::<RegistryUrl>().unwrap_err();
            assert!(err.contains("is not a registry"), "{bad}: {err}");
        }
    }
}
