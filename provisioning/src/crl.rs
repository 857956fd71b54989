//! The device CA's certificate revocation list, derived from the registry.

use rcgen::{
    CertificateRevocationList, CertificateRevocationListParams, Issuer, KeyIdMethod,
    RevokedCertParams, SigningKey,
};
use time::{Duration, OffsetDateTime};

use crate::error::Result;
use crate::registry::StoreTx;

/// How long a CRL is valid. Run `provisioning crl` (e.g. daily from cron)
/// to publish a fresh one well before then.
pub const VALIDITY: Duration = Duration::days(30);

/// Signs a new CRL listing every revoked, unexpired device and service
/// certificate, with the next CRL number. Call inside the transaction that
/// changed the revocations, so numbers and contents stay in step.
///
/// `published` is the CRL currently on disk, if any: the new number is
/// above both the registry's and the published one, so a CRL written by a
/// command that was killed before its commit is never followed by another
/// CRL with the same number.
pub(crate) fn sign(
    tx: &impl StoreTx,
    issuer: &Issuer<'_, impl SigningKey>,
    now: OffsetDateTime,
    published: Option<&[u8]>,
) -> Result<CertificateRevocationList> {
    let floor = published
        .and_then(published_number)
        .map_or(0, |n| n.saturating_add(1));
    let number = tx.next_crl_number(floor)?;
    let revoked_certs = tx
        .revoked_unexpired(now)?
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

/// The CRL number of a published PEM CRL, if it has one.
fn published_number(pem_bytes: &[u8]) -> Option<u64> {
    let block = pem::parse(pem_bytes).ok()?;
    let (_, crl) = x509_parser::parse_x509_crl(block.contents()).ok()?;
    crl.crl_number()?.to_string().parse().ok()
}
