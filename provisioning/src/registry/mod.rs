//! The registry: every certificate the PKI ever issued, and its status.
//!
//! It is the source of truth; the CRL is derived from it. Storage sits
//! behind [`Store`] so that a networked backend (PostgreSQL, for several
//! provisioning nodes) can be added next to [`SqliteStore`]. All changes go
//! through one exclusive [`StoreTx`], so two commands running at once never
//! both see "not enrolled" and never reuse a serial.

mod sqlite;

use std::fmt;
use std::str::FromStr;

pub use sqlite::SqliteStore;
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
    fn next_crl_number(&self, scope: crate::crl::Scope, at_least: u64) -> Result<u64, StoreError>;
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
    /// Writes a setting.
    fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError>;
    /// Makes every change visible at once.
    fn commit(self) -> Result<(), StoreError>;
}
