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
pub(crate) fn sign(
    tx: &impl StoreTx,
    issuer: &Issuer<'_, impl SigningKey>,
    now: OffsetDateTime,
) -> Result<CertificateRevocationList> {
    let number = tx.next_crl_number()?;
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
        crl_number: rcgen::SerialNumber::from_slice(&number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(issuer)?)
}
