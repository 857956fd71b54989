//! Renewal: the issuance core behind every front door that renews a
//! device's certificate (the CA service for the gateway, EST).
//!
//! A renewed certificate is recorded beside the one it replaces, which
//! stays valid: the device writes the new one next to the old, reconnects
//! with it and commits, or rolls back if that handshake fails. On commit,
//! or once the grace period has passed, the predecessor is revoked as
//! superseded and lands on the next CRL ([`Pki::settle_renewals`]).
//!
//! The subject and identity of a new certificate come from the registry
//! and the authenticated requester, never from a CSR: a CSR only supplies
//! a public key, and one that names another identity is refused.

use std::fmt;

use time::{Duration, OffsetDateTime};
use twofold_protocol::{Identity, Principal};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::crl::Scope;
use crate::csr::{self, CsrError};
use crate::enrollment::{chain_pem, issue_recorded, rfc3339, write_crl};
use crate::error::{Error, Result};
use crate::pki::{CaIssuer, Pki};
use crate::profile;
use crate::registry::{CertRecord, Filter, Kind, Revocation, RevocationReason, Store, StoreTx};
use crate::serial::Serial;

/// The shortest lifetime the core issues. Shorter certificates exist for
/// tests of renewal itself; the CA service sets its own floor.
pub const MIN_LIFETIME: Duration = Duration::seconds(60);

/// Request ids: 1 to 64 characters of `A-Z a-z 0-9 - _ .`, chosen by the
/// device and unique per identity.
pub const MAX_REQUEST_ID: usize = 64;

/// The key the new certificate certifies.
pub enum NewKey {
    /// The key of the certificate presented: proof of possession is the
    /// live TLS handshake that presented it (a microcontroller needs no
    /// CSR encoder).
    Same,
    /// A new key, proved by the PKCS#10 CSR's self-signature (PEM or DER).
    Rekey(Vec<u8>),
}

/// One renewal, asked for by (or on behalf of) an authenticated identity.
pub struct RenewRequest {
    /// Who is renewing: from the TLS session, never from the request.
    pub principal: Principal,
    /// The serial of the certificate that authenticated the session.
    pub presented: Serial,
    pub request_id: String,
    pub key: NewKey,
}

/// Policy of one front door.
#[derive(Clone, Copy, Debug)]
pub struct RenewOptions {
    /// Lifetime of the new certificate (before backdating).
    pub lifetime: Duration,
    /// Refuse requests before the renewal is due (2/3 of the lifetime less
    /// jitter, [`twofold_trust::renewal::due_at`]).
    pub enforce_due: bool,
    /// How long after it expired a certificate may still renew (zero: not
    /// at all). For devices that were offline past their expiry; the
    /// gateway admits them to a session that may only renew.
    pub expired_grace: Duration,
}

/// A certificate issued by a renewal.
#[derive(Debug)]
pub struct Renewed {
    pub record: CertRecord,
    /// Leaf then device CA, PEM.
    pub chain_pem: String,
    /// True when this request id had already been answered: the same
    /// certificate is returned, nothing new was issued.
    pub repeated: bool,
}

/// Why a renewal was refused: each says what the device or operator can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The request id is empty, too long or has other characters.
    BadRequestId,
    /// The presented certificate is not in the registry, or belongs to
    /// someone else than the requester.
    UnknownCertificate,
    /// The presented certificate was revoked (not by a renewal).
    Revoked { reason: RevocationReason },
    /// The presented certificate was superseded, or a newer committed one
    /// exists: only the newest certificate of a device may renew.
    NotLatest,
    /// The presented certificate has expired, longer ago than the grace
    /// period allows (zero: none).
    Expired {
        not_after: OffsetDateTime,
        grace: Duration,
    },
    /// The CSR is unusable.
    InvalidCsr(CsrError),
    /// The CSR names another identity than the requester's.
    CsrForAnother { in_csr: String, requester: String },
    /// Renewal is not due yet.
    NotDue { due: OffsetDateTime },
}

impl Refusal {
    /// The stable code carried on the wire (MQTT answers, HTTP bodies).
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::BadRequestId => "bad-request-id",
            Refusal::UnknownCertificate => "unknown-certificate",
            Refusal::Revoked { .. } => "revoked",
            Refusal::NotLatest => "not-latest",
            Refusal::Expired { .. } => "expired",
            Refusal::InvalidCsr(_) | Refusal::CsrForAnother { .. } => "invalid-csr",
            Refusal::NotDue { .. } => "not-due",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::BadRequestId => write!(
                f,
                "the request id must be 1-{MAX_REQUEST_ID} characters of A-Z, a-z, 0-9, '-', '_' \
                 and '.'"
            ),
            Refusal::UnknownCertificate => f.write_str(
                "the presented certificate is not this identity's in the registry; re-enroll the \
                 device",
            ),
            Refusal::Revoked { reason } => write!(
                f,
                "the presented certificate is revoked ({}); a revoked device cannot renew, \
                 re-enroll it if it is trusted again",
                reason.as_str()
            ),
            Refusal::NotLatest => f.write_str(
                "the presented certificate is not the newest of this identity; connect with the \
                 newest one (a device that lost it must be re-enrolled)",
            ),
            Refusal::Expired { not_after, grace } => {
                write!(
                    f,
                    "the presented certificate expired at {}",
                    rfc3339(*not_after)
                )?;
                if grace.is_positive() {
                    let grace = std::time::Duration::try_from(*grace).unwrap_or_default();
                    write!(
                        f,
                        ", past the grace period of {}",
                        humantime::format_duration(grace)
                    )?;
                }
                f.write_str(
                    "; re-enroll the device (provisioning enroll ID --replace, or EST \
                     simpleenroll with a token from provisioning est-token ID)",
                )
            }
            Refusal::InvalidCsr(e) => write!(f, "invalid CSR: {e}"),
            Refusal::CsrForAnother { in_csr, requester } => write!(
                f,
                "invalid CSR: it names {in_csr:?} but the requester is {requester:?}; a \
                 certificate is only ever renewed for the identity that asks"
            ),
            Refusal::NotDue { due } => {
                write!(f, "renewal is not due until {}", rfc3339(*due))
            }
        }
    }
}

/// The outcome of a renewal: a certificate, a refusal, or a failure of
/// the CA itself (registry, key).
pub type Outcome = std::result::Result<Renewed, RenewError>;

/// A refusal (the requester's problem) or an error (the CA's).
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("{0}")]
    Refused(Refusal),
    #[error(transparent)]
    Failed(#[from] Error),
}

impl From<crate::registry::StoreError> for RenewError {
    fn from(e: crate::registry::StoreError) -> Self {
        RenewError::Failed(e.into())
    }
}

fn refuse<T>(r: Refusal) -> std::result::Result<T, RenewError> {
    Err(RenewError::Refused(r))
}

/// Checks a request id's form.
pub fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn kind_of(p: &Principal) -> Kind {
    match p {
        Principal::Device(_) => Kind::Device,
        Principal::Service(_) => Kind::Service,
    }
}

/// How far a certificate of `lifetime` is backdated: [`profile::BACKDATE`],
/// or a tenth of the lifetime for very short ones, so that a one-minute
/// test certificate is not due before it is issued.
fn backdate(lifetime: Duration) -> Duration {
    profile::BACKDATE.min(lifetime / 10)
}

/// The validity of a certificate of `lifetime` issued at `now` (whole
/// seconds), backdated ([`backdate`]) and cut at its issuer's expiry.
pub fn validity(
    now: OffsetDateTime,
    lifetime: Duration,
    issuer_not_after: OffsetDateTime,
) -> Result<profile::Validity> {
    if lifetime < MIN_LIFETIME {
        return Err(Error::InvalidLifetime {
            seconds: lifetime.whole_seconds(),
        });
    }
    let now = now.replace_nanosecond(0).unwrap_or(now);
    Ok(profile::Validity {
        not_before: now - backdate(lifetime),
        not_after: (now + lifetime).min(issuer_not_after),
    })
}

impl<S: Store> Pki<S> {
    /// The device CA, loaded once by a long-running service (loading asks
    /// for the passphrase of an encrypted key).
    pub fn device_issuer(&self) -> Result<CaIssuer> {
        self.issuer(profile::Intermediate::Device)
    }

    /// The server CA, which issues gateway certificates.
    pub fn server_issuer(&self) -> Result<CaIssuer> {
        self.issuer(profile::Intermediate::Server)
    }

    /// Renews a gateway's server certificate `presented` (DER) for the key
    /// of `csr`: the same names (DNS and IP), a new key, `lifetime`. The
    /// names come from the certificate the registry recorded, never from
    /// the CSR. The old certificate is left to expire (it is short-lived):
    /// revoking it now would strand a gateway that failed to install the
    /// new one.
    pub fn renew_gateway(
        &mut self,
        ca: &CaIssuer,
        presented: &[u8],
        csr: &[u8],
        lifetime: Duration,
        now: OffsetDateTime,
    ) -> Outcome {
        let Ok((_, cert)) = X509Certificate::from_der(presented) else {
            return refuse(Refusal::UnknownCertificate);
        };
        let serial = Serial::from_bytes(cert.raw_serial());
        let tx = self.store.begin()?;
        let Some(record) = tx
            .find(&Filter {
                kind: Some(Kind::Gateway),
                serial: Some(serial),
                ..Filter::default()
            })?
            .pop()
            .filter(|r| r.der == presented)
        else {
            return refuse(Refusal::UnknownCertificate);
        };
        if let Some(revocation) = record.revocation {
            return refuse(Refusal::Revoked {
                reason: revocation.reason,
            });
        }
        if record.not_after <= now {
            return refuse(Refusal::Expired {
                not_after: record.not_after,
                grace: Duration::ZERO,
            });
        }
        let public =
            csr::public_key(csr).map_err(|e| RenewError::Refused(Refusal::InvalidCsr(e)))?;
        let (mut dns, mut ips) = (Vec::new(), Vec::new());
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                    GeneralName::IPAddress([a, b, c, d]) => {
                        ips.push(std::net::IpAddr::from([*a, *b, *c, *d]))
                    }
                    GeneralName::IPAddress(v6) if v6.len() == 16 => {
                        let mut octets = [0u8; 16];
                        octets.copy_from_slice(v6);
                        ips.push(std::net::IpAddr::from(octets));
                    }
                    _ => {}
                }
            }
        }
        let now = now.replace_nanosecond(0).unwrap_or(now);
        let validity = validity(now, lifetime, ca.not_after)?;
        let issued = issue_recorded(
            &tx,
            ca,
            Kind::Gateway,
            &record.name,
            None,
            now,
            None,
            |serial| profile::gateway(&dns, &ips, None, serial, validity, &public),
            &public,
        )?;
        tx.commit()?;
        Ok(Renewed {
            chain_pem: chain_pem(&issued.der, &ca.cert_pem),
            record: issued,
            repeated: false,
        })
    }

    /// Renews `request.principal`'s certificate, or refuses with a reason.
    pub fn renew(
        &mut self,
        ca: &CaIssuer,
        request: RenewRequest,
        options: RenewOptions,
        now: OffsetDateTime,
    ) -> Outcome {
        if !valid_request_id(&request.request_id) {
            return refuse(Refusal::BadRequestId);
        }
        let kind = kind_of(&request.principal);
        let name = request.principal.name().to_owned();
        let identity = Identity {
            trust_domain: *self.trust_domain(),
            principal: request.principal,
        };
        let crl_path = self.dir().join(Scope::Device.file());
        let tx = self.store.begin()?;
        let mine = tx.find(&Filter {
            kind: Some(kind),
            name: Some(name.clone()),
            ..Filter::default()
        })?;
        let Some(presented) = mine.iter().find(|r| r.serial == request.presented) else {
            return refuse(Refusal::UnknownCertificate);
        };
        // The same request id again (a dropped connection): the same
        // certificate, whatever happened since, unless it was revoked.
        if let Some(serial) = tx.renewal(kind, &name, &request.request_id)? {
            if let Some(record) = mine.iter().find(|r| r.serial == serial)
                && record.revocation.is_none()
            {
                return Ok(Renewed {
                    chain_pem: chain_pem(&record.der, &ca.cert_pem),
                    record: record.clone(),
                    repeated: true,
                });
            }
            return refuse(Refusal::NotLatest);
        }
        if let Some(revocation) = presented.revocation {
            return refuse(match revocation.reason {
                RevocationReason::Superseded => Refusal::NotLatest,
                reason => Refusal::Revoked { reason },
            });
        }
        if presented.not_after <= now && now - presented.not_after > options.expired_grace {
            return refuse(Refusal::Expired {
                not_after: presented.not_after,
                grace: options.expired_grace,
            });
        }
        // Unrevoked certificates of this identity: at most the committed
        // one and one awaiting commit.
        let committed = mine
            .iter()
            .find(|r| r.revocation.is_none() && r.replaces.is_none());
        let pending = mine
            .iter()
            .find(|r| r.revocation.is_none() && r.replaces.is_some());
        let mut revoked_any = false;
        let predecessor = if presented.replaces.is_some() {
            // The device is connected with a renewed certificate it has not
            // committed: using it is the commit.
            revoke_superseded(&tx, presented.replaces.as_ref(), now)?;
            tx.settle(&presented.serial)?;
            revoked_any = true;
            presented
        } else if committed.map(|c| &c.serial) == Some(&presented.serial) {
            // A renewal the device never committed (it rolled back, or
            // asks with a new request id): that one is discarded.
            if let Some(p) = pending {
                revoke_superseded(&tx, Some(&p.serial), now)?;
                revoked_any = true;
            }
            presented
        } else {
            return refuse(Refusal::NotLatest);
        };
        if options.enforce_due {
            let due = twofold_trust::renewal::due_at(
                predecessor.not_before.unix_timestamp(),
                predecessor.not_after.unix_timestamp(),
                &name,
            );
            if now.unix_timestamp() < due {
                return refuse(Refusal::NotDue {
                    due: OffsetDateTime::from_unix_timestamp(due).unwrap_or(now),
                });
            }
        }
        let public = match &request.key {
            NewKey::Same => spki_of(&predecessor.der)?,
            NewKey::Rekey(csr) => rekey_public(csr, &identity).map_err(RenewError::Refused)?,
        };
        let now = now.replace_nanosecond(0).unwrap_or(now);
        let validity = validity(now, options.lifetime, ca.not_after)?;
        let replaces = predecessor.serial.clone();
        let record = issue_recorded(
            &tx,
            ca,
            kind,
            &name,
            Some(identity.to_string()),
            now,
            Some(replaces),
            |serial| profile::client(&identity, serial, validity, &public),
            &public,
        )?;
        tx.record_renewal(kind, &name, &request.request_id, &record.serial, now)?;
        if revoked_any {
            write_crl(&crl_path, Scope::Device, &tx, ca, now)?;
        }
        tx.commit()?;
        Ok(Renewed {
            chain_pem: chain_pem(&record.der, &ca.cert_pem),
            record,
            repeated: false,
        })
    }

    /// The device reconnected with its renewed certificate `serial` and
    /// says it has it: the predecessor is revoked as superseded. Returns
    /// whether anything changed (a second commit changes nothing).
    pub fn commit_renewal(
        &mut self,
        ca: &CaIssuer,
        principal: &Principal,
        serial: &Serial,
        now: OffsetDateTime,
    ) -> std::result::Result<bool, RenewError> {
        let crl_path = self.dir().join(Scope::Device.file());
        let tx = self.store.begin()?;
        let mine = tx.find(&Filter {
            kind: Some(kind_of(principal)),
            name: Some(principal.name().to_owned()),
            serial: Some(serial.clone()),
            ..Filter::default()
        })?;
        let Some(record) = mine.first() else {
            return refuse(Refusal::UnknownCertificate);
        };
        if let Some(revocation) = record.revocation {
            return refuse(match revocation.reason {
                RevocationReason::Superseded => Refusal::NotLatest,
                reason => Refusal::Revoked { reason },
            });
        }
        if record.replaces.is_none() {
            return Ok(false);
        }
        revoke_superseded(&tx, record.replaces.as_ref(), now)?;
        tx.settle(serial)?;
        write_crl(&crl_path, Scope::Device, &tx, ca, now)?;
        tx.commit()?;
        Ok(true)
    }

    /// Commits every renewal issued more than `grace` ago that its device
    /// never committed: after the grace period the old certificate is
    /// superseded either way. Returns how many were settled.
    pub fn settle_renewals(
        &mut self,
        ca: &CaIssuer,
        grace: Duration,
        now: OffsetDateTime,
    ) -> Result<usize> {
        let crl_path = self.dir().join(Scope::Device.file());
        let tx = self.store.begin()?;
        let due: Vec<CertRecord> = tx
            .find(&Filter {
                unrevoked_only: true,
                ..Filter::default()
            })?
            .into_iter()
            .filter(|r| r.replaces.is_some() && r.issued_at + grace <= now)
            .collect();
        for record in &due {
            revoke_superseded(&tx, record.replaces.as_ref(), now)?;
            tx.settle(&record.serial)?;
        }
        if !due.is_empty() {
            write_crl(&crl_path, Scope::Device, &tx, ca, now)?;
            tx.commit()?;
        }
        Ok(due.len())
    }
}

/// Revokes `serial` as superseded unless it already is revoked.
fn revoke_superseded(
    tx: &impl StoreTx,
    serial: Option<&Serial>,
    now: OffsetDateTime,
) -> Result<()> {
    let Some(serial) = serial else {
        return Ok(());
    };
    let record = tx.find(&Filter {
        serial: Some(serial.clone()),
        ..Filter::default()
    })?;
    if record.first().is_some_and(|r| r.revocation.is_none()) {
        tx.revoke(
            serial,
            Revocation {
                at: now,
                reason: RevocationReason::Superseded,
            },
        )?;
    }
    Ok(())
}

/// The public key of a certificate in the registry.
fn spki_of(der: &[u8]) -> Result<rcgen::SubjectPublicKeyInfo> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| {
        Error::Store(crate::registry::StoreError::Corrupt(format!(
            "a recorded certificate does not parse: {e}"
        )))
    })?;
    Ok(rcgen::SubjectPublicKeyInfo::from_der(
        cert.public_key().raw,
    )?)
}

/// The public key of a rekey CSR, which must be well formed, signed by
/// its key, and name nobody but the requesting device. Services renew
/// with their key (their CSRs would carry a service URI this parser does
/// not take).
fn rekey_public(
    csr: &[u8],
    identity: &Identity,
) -> std::result::Result<rcgen::SubjectPublicKeyInfo, Refusal> {
    let Principal::Device(id) = &identity.principal else {
        return Err(Refusal::InvalidCsr(CsrError::NotACsr(
            "a service renews with its own key; send a renew request without a CSR".into(),
        )));
    };
    match csr::parse(csr, &identity.trust_domain, Some(id)) {
        Ok(c) => Ok(c.public_key),
        Err(CsrError::IdMismatch { in_csr, expected }) => Err(Refusal::CsrForAnother {
            in_csr,
            requester: expected,
        }),
        Err(e) => Err(Refusal::InvalidCsr(e)),
    }
}

#[cfg(test)]
mod tests {
    use rcgen::PublicKeyData;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
    use twofold_protocol::{DeviceId, TrustDomain};
    use x509_parser::revocation_list::CertificateRevocationList;

    use super::*;
    use crate::{EnrollOptions, EnrollRequest, KeySource};

    const DAY: Duration = Duration::days(1);

    struct Ca {
        _dir: tempfile::TempDir,
        pki: Pki,
        ca: CaIssuer,
        expired_grace: Duration,
    }

    fn ca() -> Ca {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::parse("iot.example").unwrap();
        let pki = Pki::init(&dir.path().join("pki"), td, None).unwrap();
        let ca = pki.device_issuer().unwrap();
        Ca {
            _dir: dir,
            pki,
            ca,
            expired_grace: Duration::ZERO,
        }
    }

    fn device(name: &str) -> Principal {
        Principal::Device(DeviceId::parse(name).unwrap())
    }

    impl Ca {
        fn enroll(&mut self, name: &str) -> CertRecord {
            let request = EnrollRequest {
                principal: device(name),
                key: KeySource::Generate,
            };
            let options = EnrollOptions {
                days: 30,
                replace: false,
                lifetime: None,
            };
            let mut out = self
                .pki
                .enroll(vec![request], options, &mut |_| {})
                .unwrap();
            out.pop().unwrap().record
        }

        fn renew(&mut self, name: &str, presented: &Serial, id: &str, key: NewKey) -> Outcome {
            self.renew_at(name, presented, id, key, crate::registry::now() + 25 * DAY)
        }

        fn renew_at(
            &mut self,
            name: &str,
            presented: &Serial,
            id: &str,
            key: NewKey,
            now: OffsetDateTime,
        ) -> Outcome {
            let request = RenewRequest {
                principal: device(name),
                presented: presented.clone(),
                request_id: id.into(),
                key,
            };
            let options = RenewOptions {
                lifetime: 30 * DAY,
                enforce_due: true,
                expired_grace: self.expired_grace,
            };
            self.pki.renew(&self.ca, request, options, now)
        }

        fn record(&self, serial: &Serial) -> CertRecord {
            let filter = Filter {
                serial: Some(serial.clone()),
                ..Filter::default()
            };
            self.pki.store().find(&filter).unwrap().pop().unwrap()
        }

        fn crl_serials(&self) -> Vec<Serial> {
            let pem = self.pki.crl_pem().unwrap();
            let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
            let (_, crl) = CertificateRevocationList::from_der(&pem.contents).unwrap();
            crl.iter_revoked_certificates()
                .map(|r| r.raw_serial_as_string().replace(':', "").parse().unwrap())
                .collect()
        }
    }

    #[test]
    fn an_expired_certificate_renews_within_the_grace_period_only() {
        let mut ca = ca();
        ca.expired_grace = 7 * DAY;
        let old = ca.enroll("pump-1");
        // Expired six days ago: inside the grace period, renewed.
        let six = old.not_after + 6 * DAY;
        let renewed = ca
            .renew_at("pump-1", &old.serial, "g1", NewKey::Same, six)
            .unwrap();
        assert!(renewed.record.not_after > six);
        // Another device, expired eight days ago: past it, with the way back.
        let other = ca.enroll("pump-2");
        let eight = other.not_after + 8 * DAY;
        let late = refusal(ca.renew_at("pump-2", &other.serial, "g2", NewKey::Same, eight));
        assert_eq!(
            late,
            Refusal::Expired {
                not_after: other.not_after,
                grace: 7 * DAY,
            }
        );
        let text = late.to_string();
        assert!(text.contains("past the grace period of 7days"), "{text}");
        assert!(text.contains("provisioning enroll ID --replace"), "{text}");
    }

    #[test]
    fn a_gateway_certificate_renews_for_a_new_key_with_its_names_only() {
        let mut ca = ca();
        let gw = ca
            .pki
            .issue_gateway(
                &["gw.example".into()],
                &["10.0.0.1".parse().unwrap()],
                30,
                None,
            )
            .unwrap();
        let server = ca.pki.server_issuer().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["evil.example".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "evil.example");
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let now = crate::registry::now();
        let renewed = ca
            .pki
            .renew_gateway(&server, &gw.record.der, csr.as_bytes(), 7 * DAY, now)
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&renewed.record.der).unwrap();
        // The names of the old certificate, not the CSR's; the CSR's key.
        let names = format!(
            "{:?}",
            cert.subject_alternative_name().unwrap().unwrap().value
        );
        assert!(
            names.contains("gw.example") && !names.contains("evil"),
            "{names}"
        );
        assert_eq!(
            cert.public_key().subject_public_key.data,
            key.public_key_raw()
        );
        assert!(renewed.record.not_after <= now + 7 * DAY);
        // Refused: a certificate the registry does not hold, a bad CSR,
        // a revoked certificate.
        let stranger = ca.enroll("pump-1");
        assert_eq!(
            refusal(
                ca.pki
                    .renew_gateway(&server, &stranger.der, csr.as_bytes(), DAY, now)
            ),
            Refusal::UnknownCertificate
        );
        assert!(matches!(
            refusal(
                ca.pki
                    .renew_gateway(&server, &gw.record.der, b"junk", DAY, now)
            ),
            Refusal::InvalidCsr(_)
        ));
        ca.pki
            .revoke(
                crate::RevokeTarget::Serial(gw.record.serial.clone()),
                RevocationReason::KeyCompromise,
            )
            .unwrap();
        assert!(matches!(
            refusal(
                ca.pki
                    .renew_gateway(&server, &gw.record.der, csr.as_bytes(), DAY, now)
            ),
            Refusal::Revoked { .. }
        ));
    }

    fn refusal(outcome: Outcome) -> Refusal {
        match outcome {
            Err(RenewError::Refused(r)) => r,
            Ok(r) => panic!("renewed {}", r.record.serial),
            Err(e) => panic!("failed: {e}"),
        }
    }

    fn spki(der: &[u8]) -> Vec<u8> {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        cert.public_key().raw.to_vec()
    }

    fn csr(cn: &str, key: &KeyPair) -> Vec<u8> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.serialize_request(key).unwrap().der().to_vec()
    }

    #[test]
    fn a_renewal_is_issued_beside_the_old_certificate_until_commit() {
        let mut ca = ca();
        let old = ca.enroll("pump-1");
        let new = ca.renew("pump-1", &old.serial, "r1", NewKey::Same).unwrap();
        assert!(!new.repeated);
        let rec = &new.record;
        assert_eq!(rec.replaces.as_ref(), Some(&old.serial));
        assert_eq!(rec.identity, old.identity);
        assert_eq!(spki(&rec.der), spki(&old.der), "renew keeps the key");
        assert!(rec.not_before < rec.issued_at, "backdated");
        assert_eq!(rec.not_after - rec.issued_at, 30 * DAY);
        assert!(new.chain_pem.matches("BEGIN CERTIFICATE").count() == 2);
        // Until the commit both are valid and the CRL does not list the old one.
        assert_eq!(ca.record(&old.serial).revocation, None);
        assert!(!ca.crl_serials().contains(&old.serial));

        let now = crate::registry::now() + 25 * DAY;
        let principal = device("pump-1");
        assert!(
            ca.pki
                .commit_renewal(&ca.ca, &principal, &rec.serial, now)
                .unwrap()
        );
        let superseded = ca.record(&old.serial).revocation.unwrap();
        assert_eq!(superseded.reason, RevocationReason::Superseded);
        assert!(ca.crl_serials().contains(&old.serial));
        assert_eq!(ca.record(&rec.serial).replaces, None);
        // A second commit changes nothing.
        assert!(
            !ca.pki
                .commit_renewal(&ca.ca, &principal, &rec.serial, now)
                .unwrap()
        );
    }

    #[test]
    fn the_same_request_id_returns_the_same_certificate() {
        let mut ca = ca();
        let old = ca.enroll("pump-1");
        let first = ca.renew("pump-1", &old.serial, "r1", NewKey::Same).unwrap();
        let again = ca.renew("pump-1", &old.serial, "r1", NewKey::Same).unwrap();
        assert!(again.repeated);
        assert_eq!(again.record.serial, first.record.serial);
        assert_eq!(again.chain_pem, first.chain_pem);
        // Also once the device has moved on to it.
        let next = ca
            .renew("pump-1", &first.record.serial, "r1", NewKey::Same)
            .unwrap();
        assert_eq!(next.record.serial, first.record.serial);
    }

    #[test]
    fn a_rekey_certifies_the_csr_key_for_the_requester_only() {
        let mut ca = ca();
        let old = ca.enroll("pump-1");
        let key = KeyPair::generate().unwrap();
        let new = ca
            .renew(
                "pump-1",
                &old.serial,
                "r1",
                NewKey::Rekey(csr("pump-1", &key)),
            )
            .unwrap();
        assert_eq!(spki(&new.record.der), key.subject_public_key_info());
        assert_eq!(
            new.record.identity.as_deref(),
            Some("spiffe://iot.example/device/pump-1")
        );

        ca.enroll("pump-2");
        // The next generation is due 20 days after this one was issued.
        let later = crate::registry::now() + 50 * DAY;
        let other = ca.renew_at(
            "pump-1",
            &new.record.serial,
            "r2",
            NewKey::Rekey(csr("pump-2", &key)),
            later,
        );
        let r = refusal(other);
        assert_eq!(
            r,
            Refusal::CsrForAnother {
                in_csr: "pump-2".into(),
                requester: "pump-1".into()
            }
        );
        assert_eq!(r.code(), "invalid-csr");
        let garbage = ca.renew_at(
            "pump-1",
            &new.record.serial,
            "r3",
            NewKey::Rekey(b"nope".to_vec()),
            later,
        );
        assert!(matches!(
            refusal(garbage),
            Refusal::InvalidCsr(CsrError::NotACsr(_))
        ));
    }

    #[test]
    fn refusals_name_their_reason() {
        let mut ca = ca();
        let old = ca.enroll("pump-1");
        let now = crate::registry::now();

        assert_eq!(
            refusal(ca.renew("pump-1", &old.serial, "bad id!", NewKey::Same)),
            Refusal::BadRequestId
        );
        // Not due at issue time; due at 2/3 less at most a twentieth.
        let early = refusal(ca.renew_at("pump-1", &old.serial, "r1", NewKey::Same, now));
        assert_eq!(early.code(), "not-due");
        // Someone else's serial, or one that does not exist.
        let other = ca.enroll("pump-2");
        assert_eq!(
            refusal(ca.renew("pump-1", &other.serial, "r1", NewKey::Same)),
            Refusal::UnknownCertificate
        );
        // Expired, and no grace period.
        let late = old.not_after + Duration::seconds(1);
        let expired = refusal(ca.renew_at("pump-1", &old.serial, "r1", NewKey::Same, late));
        assert_eq!(
            expired,
            Refusal::Expired {
                not_after: old.not_after,
                grace: Duration::ZERO,
            }
        );
        assert!(
            expired.to_string().contains("re-enroll the device"),
            "{expired}"
        );
        // Superseded: after a committed renewal the old certificate may not renew.
        let new = ca.renew("pump-1", &old.serial, "r1", NewKey::Same).unwrap();
        let principal = device("pump-1");
        ca.pki
            .commit_renewal(&ca.ca, &principal, &new.record.serial, now + 25 * DAY)
            .unwrap();
        assert_eq!(
            refusal(ca.renew("pump-1", &old.serial, "r2", NewKey::Same)),
            Refusal::NotLatest
        );
        // Revoked by the operator: no renewal, with the reason.
        ca.pki
            .revoke(
                crate::RevokeTarget::Principal(principal),
                RevocationReason::KeyCompromise,
            )
            .unwrap();
        let revoked = refusal(ca.renew("pump-1", &new.record.serial, "r3", NewKey::Same));
        assert_eq!(
            revoked,
            Refusal::Revoked {
                reason: RevocationReason::KeyCompromise
            }
        );
        assert!(revoked.to_string().contains("key-compromise"), "{revoked}");
    }

    #[test]
    fn an_uncommitted_renewal_is_discarded_by_the_next_one() {
        let mut ca = ca();
        let old = ca.enroll("pump-1");
        let lost = ca.renew("pump-1", &old.serial, "r1", NewKey::Same).unwrap();
        // The device rolled back and asks again with the old certificate.
        let second = ca.renew("pump-1", &old.serial, "r2", NewKey::Same).unwrap();
        assert_eq!(second.record.replaces.as_ref(), Some(&old.serial));
        let discarded = ca.record(&lost.record.serial).revocation.unwrap();
        assert_eq!(discarded.reason, RevocationReason::Superseded);
        assert_eq!(ca.record(&old.serial).revocation, None);
        // Connecting with the renewed certificate commits it.
        let later = crate::registry::now() + 50 * DAY;
        let third = ca
            .renew_at("pump-1", &second.record.serial, "r3", NewKey::Same, later)
            .unwrap();
        assert!(ca.record(&old.serial).revocation.is_some());
        assert_eq!(ca.record(&second.record.serial).replaces, None);
        assert_eq!(third.record.replaces.as_ref(), Some(&second.record.serial));
        // The operator revoking the device revokes both live certificates.
        ca.pki
            .revoke(
                crate::RevokeTarget::Principal(device("pump-1")),
                RevocationReason::CessationOfOperation,
            )
            .unwrap();
        for serial in [&second.record.serial, &third.record.serial] {
            assert!(ca.crl_serials().contains(serial));
        }
    }

    #[test]
    fn the_grace_period_settles_uncommitted_renewals() {
        let mut ca = ca();
        let old = ca.enroll("pump-1");
        let new = ca.renew("pump-1", &old.serial, "r1", NewKey::Same).unwrap();
        let issued = new.record.issued_at;
        let grace = Duration::hours(1);
        assert_eq!(ca.pki.settle_renewals(&ca.ca, grace, issued).unwrap(), 0);
        assert_eq!(ca.record(&old.serial).revocation, None);
        let later = issued + grace;
        assert_eq!(ca.pki.settle_renewals(&ca.ca, grace, later).unwrap(), 1);
        assert!(ca.crl_serials().contains(&old.serial));
        assert_eq!(ca.pki.settle_renewals(&ca.ca, grace, later).unwrap(), 0);
    }

    #[test]
    fn a_one_minute_certificate_is_due_after_it_is_issued() {
        let lifetime = MIN_LIFETIME;
        let now = 1_000_000;
        let not_before = now - backdate(lifetime).whole_seconds();
        let not_after = now + lifetime.whole_seconds();
        let due = twofold_trust::renewal::due_at(not_before, not_after, "pump-1");
        assert!(due > now && due < not_after, "{due}");
    }
}
