//! Certificate revocation lists, derived from the registry: one per
//! issuing CA, each with its own CRL number sequence.
//!
//! - the device CA's CRL (`crl.pem`) lists revoked device and service
//!   certificates; the gateway reads it;
//! - the server CA's CRL (`server-crl.pem`) lists revoked gateway
//!   certificates; Linux agents read it from their bundle, and a gateway
//!   certificate issued with `--crl-url` points to where it is published.

use rcgen::{
    CertificateRevocationList, CertificateRevocationListParams, Issuer, KeyIdMethod,
    RevokedCertParams, SigningKey,
};
use time::{Duration, OffsetDateTime};

use crate::error::Result;
use crate::pki::{CRL, SERVER_CRL};
use crate::profile::Intermediate;
use crate::registry::{Kind, StoreTx};

/// Which CA's CRL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The device CA's: device and service certificates.
    Device,
    /// The server CA's: gateway certificates.
    Server,
}

impl Scope {
    /// The CRL that revokes a certificate of `kind`; none for the CAs
    /// themselves, which only a new PKI replaces.
    pub fn of(kind: Kind) -> Option<Scope> {
        match kind {
            Kind::Device | Kind::Service => Some(Scope::Device),
            Kind::Gateway => Some(Scope::Server),
            Kind::RootCa | Kind::DeviceCa | Kind::ServerCa => None,
        }
    }

    /// The certificate kinds this CRL lists.
    pub fn kinds(self) -> &'static [Kind] {
        match self {
            Scope::Device => &[Kind::Device, Kind::Service],
            Scope::Server => &[Kind::Gateway],
        }
    }

    /// The file in the PKI directory.
    pub fn file(self) -> &'static str {
        match self {
            Scope::Device => CRL,
            Scope::Server => SERVER_CRL,
        }
    }

    /// The registry setting holding the last CRL number.
    pub(crate) fn number_setting(self) -> &'static str {
        match self {
            Scope::Device => "crl_number",
            Scope::Server => "server_crl_number",
        }
    }

    /// The registry setting holding the last CRL number with a digest of
    /// the serials that CRL listed (`"<number> <digest>"`), so a node can
    /// tell a CRL file of its own with the registry's number but other
    /// contents (written by a command whose COMMIT then failed).
    pub(crate) fn listed_setting(self) -> &'static str {
        match self {
            Scope::Device => "crl_listed",
            Scope::Server => "server_crl_listed",
        }
    }

    pub(crate) fn issuer(self) -> Intermediate {
        match self {
            Scope::Device => Intermediate::Device,
            Scope::Server => Intermediate::Server,
        }
    }
}

/// How long a CRL is valid. Run `provisioning crl` (e.g. daily from cron)
/// to publish a fresh one well before then.
pub const VALIDITY: Duration = Duration::days(30);

/// Signs a new CRL listing every revoked, unexpired certificate of
/// `scope`, with that scope's next CRL number. Call inside the transaction that
/// changed the revocations, so numbers and contents stay in step.
///
/// `published` is the CRL currently on disk, if any: the new number is
/// above both the registry's and the published one, so a CRL written by a
/// command that was killed before its commit is never followed by another
/// CRL with the same number.
pub(crate) fn sign(
    scope: Scope,
    tx: &impl StoreTx,
    issuer: &Issuer<'_, impl SigningKey>,
    now: OffsetDateTime,
    published: Option<&[u8]>,
) -> Result<CertificateRevocationList> {
    let floor = published
        .and_then(published_number)
        .map_or(0, |n| n.saturating_add(1));
    let number = tx.next_crl_number(scope, floor)?;
    let crl = sign_numbered(scope, tx, issuer, now, number)?;
    if let Some(digest) = listed_digest(crl.der()) {
        tx.set_setting(scope.listed_setting(), &format!("{number} {digest}"))?;
    }
    Ok(crl)
}

/// Signs `scope`'s CRL with `number` as given, the registry's counter left
/// as it is: a node catching up with a number another node took.
pub(crate) fn sign_numbered(
    scope: Scope,
    tx: &impl StoreTx,
    issuer: &Issuer<'_, impl SigningKey>,
    now: OffsetDateTime,
    number: u64,
) -> Result<CertificateRevocationList> {
    let revoked_certs = tx
        .revoked_unexpired(scope, now)?
        .into_iter()
        .filter_map(|r| {
            let revocation = r.revocation?;
            Some(RevokedCertParams {
                serial_number: (&r.serial).into(),
                revocation_time: revocation.at,
                reason_code: Some(revocation.reason.into()),
                invalidity_date: None,
            })
        })
        .collect();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + VALIDITY,
        crl_number: rcgen::SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(issuer)?)
}

/// A digest of the serials a DER CRL lists, in any order: SHA-256 over
/// the sorted serials' bytes, hex. `None` if it does not parse.
pub(crate) fn listed_digest(der: &[u8]) -> Option<String> {
    use sha2::Digest as _;
    let (_, crl) = x509_parser::parse_x509_crl(der).ok()?;
    let mut serials: Vec<&[u8]> = crl
        .iter_revoked_certificates()
        .map(|r| r.raw_serial())
        .collect();
    serials.sort_unstable();
    let mut hash = sha2::Sha256::new();
    for serial in serials {
        // Length-prefixed, so no two lists hash alike by concatenation.
        hash.update((serial.len() as u32).to_be_bytes());
        hash.update(serial);
    }
    Some(hex::encode(hash.finalize()))
}

/// The serials a published PEM CRL lists. `None` if it does not parse.
pub(crate) fn published_serials(pem_bytes: &[u8]) -> Option<Vec<crate::serial::Serial>> {
    let block = pem::parse(pem_bytes).ok()?;
    let (_, crl) = x509_parser::parse_x509_crl(block.contents()).ok()?;
    Some(
        crl.iter_revoked_certificates()
            .map(|r| crate::serial::Serial::from_bytes(r.raw_serial()))
            .collect(),
    )
}

/// The number and [`listed_digest`] of a published PEM CRL.
pub(crate) fn published_listing(pem_bytes: &[u8]) -> Option<(u64, String)> {
    let block = pem::parse(pem_bytes).ok()?;
    Some((
        published_number(pem_bytes)?,
        listed_digest(block.contents())?,
    ))
}

/// The CRL number of a published PEM CRL, if it has one.
pub(crate) fn published_number(pem_bytes: &[u8]) -> Option<u64> {
    let block = pem::parse(pem_bytes).ok()?;
    let (_, crl) = x509_parser::parse_x509_crl(block.contents()).ok()?;
    crl.crl_number()?.to_string().parse().ok()
}
