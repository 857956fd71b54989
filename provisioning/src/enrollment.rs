//! Issuing and revoking: what the operator's commands do to the PKI.
//!
//! Each operation runs in one exclusive registry transaction: check, sign,
//! record, regenerate the CRL if a revocation happened, commit. Until the
//! commit nothing is visible, so an interrupted command changes nothing.
//! Output files are written only after the commit, so every certificate
//! that exists outside the PKI is in the registry and can be revoked.

use std::net::IpAddr;
use std::path::Path;

use rcgen::{KeyPair, PublicKeyData};
use time::OffsetDateTime;
use twofold_protocol::{DeviceId, Identity, Principal};

use crate::atomic::{self, Durability};
use crate::crl::{self, Scope};
use crate::csr::CsrRequest;
use crate::error::{Error, Result};
use crate::pki::{CaIssuer, Pki, record_for};
use crate::profile::{self, Intermediate, Validity};
use crate::registry::{
    CertRecord, Filter, Kind, Revocation, RevocationReason, Store, StoreError, StoreTx,
};
use crate::serial::Serial;

/// How many times a colliding random serial is drawn again (never expected).
const SERIAL_ATTEMPTS: usize = 3;

/// Where the subject key comes from.
pub enum KeySource {
    /// Generate a key here and hand it out in the bundle.
    Generate,
    /// The key stays on the device; this is its public key from a CSR.
    Csr(rcgen::SubjectPublicKeyInfo),
}

/// One certificate to issue to a device or service.
pub struct EnrollRequest {
    pub principal: Principal,
    pub key: KeySource,
}

/// Options shared by a batch of enrollments.
#[derive(Clone, Copy, Debug)]
pub struct EnrollOptions {
    pub days: u32,
    /// Revoke (as superseded) an existing active certificate instead of refusing.
    pub replace: bool,
    /// A lifetime shorter than a day, instead of `days`: for tests and
    /// demonstrations of renewal (at least [`crate::renewal::MIN_LIFETIME`]).
    pub lifetime: Option<time::Duration>,
}

/// An issued device or service certificate.
pub struct Enrollment {
    pub record: CertRecord,
    /// The generated private key, when the key was not from a CSR.
    pub key: Option<KeyPair>,
    /// Leaf then device CA, PEM.
    pub chain_pem: String,
    /// The device CA certificate, DER.
    pub device_ca_der: Vec<u8>,
    /// Certificates this enrollment superseded.
    pub superseded: Vec<Serial>,
}

/// An issued gateway server certificate.
pub struct GatewayCert {
    pub record: CertRecord,
    pub key: KeyPair,
    /// Leaf then server CA, PEM.
    pub chain_pem: String,
}

/// What to revoke.
pub enum RevokeTarget {
    /// The active certificate of a device or service.
    Principal(Principal),
    /// One certificate by serial.
    Serial(Serial),
}

fn kind_of(p: &Principal) -> Kind {
    match p {
        Principal::Device(_) => Kind::Device,
        Principal::Service(_) => Kind::Service,
    }
}

fn label(p: &Principal) -> String {
    format!("{} {}", p.kind(), p.name())
}

impl<S: Store> Pki<S> {
    /// Issues one certificate per request, all or none.
    ///
    /// `progress` is called after each certificate is signed.
    pub fn enroll(
        &mut self,
        requests: Vec<EnrollRequest>,
        options: EnrollOptions,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<Enrollment>> {
        let ca = self.issuer(Intermediate::Device)?;
        let td = *self.trust_domain();
        let now = crate::registry::now();
        let validity = match options.lifetime {
            None => Validity::leaf(now, options.days, ca.not_after)?,
            Some(lifetime) => crate::renewal::validity(now, lifetime, ca.not_after)?,
        };
        let crl_path = self.dir().join(Scope::Device.file());
        let tx = self.store.begin()?;
        let mut out = Vec::with_capacity(requests.len());
        let mut revoked_any = false;
        for (i, request) in requests.into_iter().enumerate() {
            let kind = kind_of(&request.principal);
            let name = request.principal.name().to_owned();
            let existing = tx.find(&Filter {
                kind: Some(kind),
                name: Some(name.clone()),
                unrevoked_only: true,
                ..Filter::default()
            })?;
            let mut superseded = Vec::new();
            for old in existing {
                if !options.replace && old.not_after > now {
                    return Err(Error::AlreadyEnrolled {
                        identity: label(&request.principal),
                        serial: old.serial.to_string(),
                        not_after: rfc3339(old.not_after),
                    });
                }
                // An expired certificate, or an explicit --replace: the old
                // one is superseded so that exactly one stays active.
                tx.revoke(
                    &old.serial,
                    Revocation {
                        at: now,
                        reason: RevocationReason::Superseded,
                    },
                )?;
                revoked_any |= old.not_after > now;
                superseded.push(old.serial);
            }
            let identity = Identity {
                trust_domain: td,
                principal: request.principal,
            };
            let (key, public) = match request.key {
                KeySource::Generate => {
                    let key = crate::keys::generate()?;
                    let public =
                        rcgen::SubjectPublicKeyInfo::from_der(&key.subject_public_key_info())?;
                    (Some(key), public)
                }
                KeySource::Csr(public) => (None, public),
            };
            let record = issue_recorded(
                &tx,
                &ca,
                kind,
                &name,
                Some(identity.to_string()),
                now,
                None,
                |serial| profile::client(&identity, serial, validity, &public),
                &public,
            )?;
            let chain_pem = chain_pem(&record.der, &ca.cert_pem);
            out.push(Enrollment {
                record,
                key,
                chain_pem,
                device_ca_der: ca.cert_der.clone(),
                superseded,
            });
            progress(i + 1);
        }
        if revoked_any {
            write_crl(&crl_path, Scope::Device, &tx, &ca, now)?;
        }
        tx.commit()?;
        Ok(out)
    }

    /// Issues a certificate for a checked CSR.
    pub fn sign_csr(&mut self, csr: CsrRequest, options: EnrollOptions) -> Result<Enrollment> {
        let request = EnrollRequest {
            principal: Principal::Device(csr.device_id),
            key: KeySource::Csr(csr.public_key),
        };
        let mut issued = self.enroll(vec![request], options, &mut |_| {})?;
        issued
            .pop()
            .ok_or_else(|| StoreError::Backend("no certificate was issued".into()).into())
    }

    /// Issues a gateway server certificate for DNS names and IP addresses.
    /// With `crl_url` the certificate names where the server CA's CRL
    /// (`server-crl.pem`, in DER) is published, so that TLS clients other
    /// than our agents can check it too.
    pub fn issue_gateway(
        &mut self,
        dns_names: &[String],
        ips: &[IpAddr],
        days: u32,
        crl_url: Option<&str>,
    ) -> Result<GatewayCert> {
        for name in dns_names {
            profile::check_dns_name(name)?;
        }
        if let Some(url) = crl_url {
            profile::check_crl_url(url)?;
        }
        let ca = self.issuer(Intermediate::Server)?;
        let now = crate::registry::now();
        let validity = Validity::leaf(now, days, ca.not_after)?;
        let key = crate::keys::generate()?;
        let name = dns_names
            .first()
            .cloned()
            .or_else(|| ips.first().map(IpAddr::to_string))
            .unwrap_or_default();
        let tx = self.store.begin()?;
        let record = issue_recorded(
            &tx,
            &ca,
            Kind::Gateway,
            &name,
            None,
            now,
            None,
            |serial| profile::gateway(dns_names, ips, crl_url, serial, validity, &key),
            &key,
        )?;
        tx.commit()?;
        let chain_pem = chain_pem(&record.der, &ca.cert_pem);
        Ok(GatewayCert {
            record,
            key,
            chain_pem,
        })
    }

    /// Revokes a certificate and regenerates its CA's CRL: `crl.pem` for a
    /// device or service, `server-crl.pem` for a gateway. Returns the
    /// revoked record.
    pub fn revoke(&mut self, target: RevokeTarget, reason: RevocationReason) -> Result<CertRecord> {
        // The CA key is loaded (and its passphrase asked) before the
        // registry is locked; the kind of a serial never changes.
        let scope = match &target {
            RevokeTarget::Principal(_) => Scope::Device,
            RevokeTarget::Serial(s) => self
                .store
                .find(&Filter {
                    serial: Some(s.clone()),
                    ..Filter::default()
                })?
                .first()
                .and_then(|r| Scope::of(r.kind))
                .unwrap_or(Scope::Device),
        };
        let ca = self.issuer(scope.issuer())?;
        let now = crate::registry::now();
        let crl_path = self.dir().join(scope.file());
        let tx = self.store.begin()?;
        let mut record = match &target {
            RevokeTarget::Principal(p) => {
                let filter = Filter {
                    kind: Some(kind_of(p)),
                    name: Some(p.name().to_owned()),
                    ..Filter::default()
                };
                let all = tx.find(&filter)?;
                if all.is_empty() {
                    return Err(Error::UnknownIdentity { identity: label(p) });
                }
                // A renewed certificate awaiting commit goes with the one
                // it replaces: the device is revoked, not one of its keys.
                let mut live = all.into_iter().filter(|r| r.revocation.is_none());
                let newest = live
                    .next()
                    .ok_or_else(|| Error::NothingToRevoke { identity: label(p) })?;
                for other in live {
                    tx.revoke(&other.serial, Revocation { at: now, reason })?;
                }
                newest
            }
            RevokeTarget::Serial(s) => {
                let r = tx
                    .find(&Filter {
                        serial: Some(s.clone()),
                        ..Filter::default()
                    })?
                    .pop()
                    .ok_or_else(|| Error::UnknownSerial {
                        serial: s.to_string(),
                    })?;
                if let Some(rev) = r.revocation {
                    return Err(Error::AlreadyRevoked {
                        serial: s.to_string(),
                        revoked_at: rfc3339(rev.at),
                    });
                }
                if Scope::of(r.kind) != Some(scope) {
                    return Err(Error::NotRevocable {
                        serial: s.to_string(),
                        kind: r.kind.as_str(),
                    });
                }
                r
            }
        };
        let revocation = Revocation { at: now, reason };
        tx.revoke(&record.serial, revocation)?;
        write_crl(&crl_path, scope, &tx, &ca, now)?;
        tx.commit()?;
        record.revocation = Some(revocation);
        Ok(record)
    }

    /// Brings the device CRL in this PKI directory in line with the
    /// registry, which other nodes may share (PostgreSQL). Returns the
    /// number it signed, if it signed.
    ///
    /// - The registry's CRL number moved past the file's: another node
    ///   revoked since. It signs at the registry's number, not a new one,
    ///   so two services catching up with each other settle instead of
    ///   taking turns forever.
    /// - The file's number is the registry's or above, and the registry did
    ///   not record this file's list under it: the file may have been
    ///   written here by a command whose COMMIT was lost, while another
    ///   node's revocation took the number (or will take it). Under the
    ///   writer lock it compares what the file lists with the registry: a
    ///   revoked, unexpired serial missing, or a serial the registry has
    ///   not revoked, and it signs a fresh CRL with a new number, so that
    ///   gateways holding either CRL of that number take it. A list that
    ///   differs only by certificates expired since (a node catching up
    ///   later, or with another clock) is left, and the state remembered
    ///   in `settled` so that it is not examined again every second.
    ///
    /// The CA service runs it every second, so that gateways pulling
    /// `GET /v1/crl` from it learn of every node's revocations.
    pub fn catch_up_crl(
        &mut self,
        ca: &CaIssuer,
        settled: &mut Option<String>,
    ) -> Result<Option<u64>> {
        let scope = Scope::Device;
        let path = self.dir().join(scope.file());
        let (disk_number, disk_listed) = std::fs::read(&path)
            .ok()
            .as_deref()
            .and_then(crl::published_listing)
            .map_or((0, None), |(n, d)| (n, Some(d)));
        let in_registry = self
            .store
            .setting(scope.number_setting())?
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        if in_registry <= disk_number {
            let Some(disk_listed) = disk_listed else {
                return Ok(None);
            };
            let recorded = self.store.setting(scope.listed_setting())?;
            // The registry recorded this very list under this number.
            let expected = format!("{disk_number} {disk_listed}");
            if recorded.as_deref() == Some(expected.as_str()) {
                return Ok(None);
            }
            // Otherwise look once per state of file and registry: a file
            // written here whose COMMIT was lost (its number at or above
            // the registry's), a registry from before `crl_listed`, or a
            // list that differs only by certificates expired since.
            let state = format!("{expected} {in_registry} {recorded:?}");
            if settled.as_deref() == Some(state.as_str()) {
                return Ok(None);
            }
            let tx = self.store.begin()?;
            let now = crate::registry::now();
            // Read again under the writer lock, as `write_crl` does.
            let published = std::fs::read(&path).ok();
            if !lists_other_than_registry(published.as_deref(), scope, &tx, now)? {
                *settled = Some(state);
                return Ok(None);
            }
            let crl = write_crl(&path, scope, &tx, ca, now)?;
            tx.commit()?;
            return Ok(crl::published_number(crl.pem()?.as_bytes()));
        }
        let tx = self.store.begin()?;
        // Read again under the writer lock: a revocation may have landed
        // in between, and the number and the revoked set must match; and
        // a command here may have written a newer file meanwhile.
        let number = tx
            .setting(scope.number_setting())?
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(in_registry);
        let published = std::fs::read(&path)
            .ok()
            .and_then(|pem| crl::published_number(&pem))
            .unwrap_or(0);
        if published >= number {
            return Ok(None);
        }
        let crl = crl::sign_numbered(scope, &tx, &ca.issuer, crate::registry::now(), number)?;
        atomic::write(
            &path,
            crl.pem()?.as_bytes(),
            atomic::PUBLIC,
            Durability::Sync,
        )?;
        // Nothing changed in the registry; ending the transaction frees
        // the lock.
        drop(tx);
        Ok(Some(number))
    }

    /// For a command about to hand out this node's device CRL (`push-crl`):
    /// unless the file is the very CRL the registry recorded under its
    /// number, runs [`Self::catch_up_crl`], which signs it again if
    /// another node revoked since or the file lists something else than
    /// the registry (a lost COMMIT here). Pushed as it was, such a file
    /// would be ignored by gateways as old, or worse, take the number of
    /// another node's revocation. The CA key is loaded only then.
    pub fn catch_up_crl_if_needed(&mut self) -> Result<Option<u64>> {
        let scope = Scope::Device;
        let listing = std::fs::read(self.dir().join(scope.file()))
            .ok()
            .as_deref()
            .and_then(crl::published_listing);
        let in_registry = self
            .store
            .setting(scope.number_setting())?
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        let recorded = self.store.setting(scope.listed_setting())?;
        if let Some((number, digest)) = &listing
            && *number == in_registry
            && recorded.as_deref() == Some(format!("{number} {digest}").as_str())
        {
            return Ok(None);
        }
        let ca = self.issuer(scope.issuer())?;
        self.catch_up_crl(&ca, &mut None)
    }

    /// Signs a fresh CRL of `scope`'s CA (new number, new validity
    /// window), writes it to the PKI and returns it.
    pub fn refresh_crl(&mut self, scope: Scope) -> Result<rcgen::CertificateRevocationList> {
        let ca = self.issuer(scope.issuer())?;
        let now = crate::registry::now();
        let crl_path = self.dir().join(scope.file());
        let tx = self.store.begin()?;
        let crl = write_crl(&crl_path, scope, &tx, &ca, now)?;
        tx.commit()?;
        Ok(crl)
    }

    /// Records of one device, newest first.
    pub fn history(&self, principal: &Principal) -> Result<Vec<CertRecord>> {
        let filter = Filter {
            kind: Some(kind_of(principal)),
            name: Some(principal.name().to_owned()),
            ..Filter::default()
        };
        let records = self.store.find(&filter)?;
        if records.is_empty() {
            return Err(Error::UnknownIdentity {
                identity: label(principal),
            });
        }
        Ok(records)
    }
}

/// Whether the published CRL `pem` lists other certificates than the
/// registry has revoked: a revoked, unexpired one missing, or one the
/// registry holds as not revoked (or not at all). Serials of revoked
/// certificates that expired since are no difference.
fn lists_other_than_registry(
    pem: Option<&[u8]>,
    scope: Scope,
    tx: &impl StoreTx,
    now: OffsetDateTime,
) -> Result<bool> {
    let Some(listed) = pem.and_then(crl::published_serials) else {
        return Ok(true);
    };
    let revoked: Vec<Serial> = tx
        .revoked_unexpired(scope, now)?
        .into_iter()
        .map(|r| r.serial)
        .collect();
    if revoked.iter().any(|s| !listed.contains(s)) {
        return Ok(true);
    }
    for serial in listed.iter().filter(|s| !revoked.contains(s)) {
        let record = tx
            .find(&Filter {
                serial: Some(serial.clone()),
                ..Filter::default()
            })?
            .pop();
        if record.is_none_or(|r| r.revocation.is_none()) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Signs the CRL inside `tx` and writes it to the PKI directory before
/// the commit: if the commit then failed, the CRL would list one
/// revocation too many, never one too few.
pub(crate) fn write_crl(
    path: &Path,
    scope: Scope,
    tx: &impl StoreTx,
    ca: &CaIssuer,
    now: OffsetDateTime,
) -> Result<rcgen::CertificateRevocationList> {
    let published = std::fs::read(path).ok();
    let crl = crl::sign(scope, tx, &ca.issuer, now, published.as_deref())?;
    atomic::write(
        path,
        crl.pem()?.as_bytes(),
        atomic::PUBLIC,
        Durability::Sync,
    )?;
    Ok(crl)
}

/// Signs a certificate with a fresh serial and records it, drawing a new
/// serial if the registry already has one (a 2^-126 event, handled anyway).
#[allow(clippy::too_many_arguments)]
pub(crate) fn issue_recorded(
    tx: &impl StoreTx,
    ca: &CaIssuer,
    kind: Kind,
    name: &str,
    identity: Option<String>,
    now: OffsetDateTime,
    replaces: Option<Serial>,
    params_for: impl Fn(&Serial) -> Result<rcgen::CertificateParams>,
    public_key: &impl PublicKeyData,
) -> Result<CertRecord> {
    let mut last = None;
    for _ in 0..SERIAL_ATTEMPTS {
        let serial = Serial::random();
        let params = params_for(&serial)?;
        let cert = params.signed_by(public_key, &ca.issuer)?;
        let mut record = record_for(&cert, serial, kind, name, identity.clone(), &params, now);
        record.replaces = replaces.clone();
        match tx.insert(&record) {
            Ok(()) => return Ok(record),
            Err(e @ StoreError::DuplicateSerial(_)) => last = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last.map(Error::from).unwrap_or(Error::EmptyBatch))
}

pub(crate) fn chain_pem(leaf_der: &[u8], ca_pem: &str) -> String {
    let leaf = pem_encode("CERTIFICATE", leaf_der);
    format!("{leaf}{}", ca_pem.trim_start())
}

/// PEM-encodes DER with the given label.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(label, der), config)
}

/// A timestamp as RFC 3339, for messages and listings.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// The largest batch: one transaction holds the registry's write lock for
/// the whole batch, and other commands wait for it (60 s at most).
pub const MAX_BATCH: u64 = 100_000;

/// Ids `PREFIX-0001` … for a batch, zero-padded to the width of the last.
pub fn batch_ids(prefix: &str, start: u64, count: u64) -> Result<Vec<DeviceId>> {
    if count == 0 {
        return Err(Error::EmptyBatch);
    }
    if count > MAX_BATCH {
        return Err(Error::BatchTooLarge {
            count,
            max: MAX_BATCH,
        });
    }
    let last = start.checked_add(count - 1).ok_or(Error::BatchTooLarge {
        count,
        max: MAX_BATCH,
    })?;
    let width = last.to_string().len();
    (start..=last)
        .map(|n| {
            let id = format!("{prefix}-{n:0width$}");
            DeviceId::parse(&id).map_err(|reason| Error::InvalidName {
                what: "device id",
                value: id,
                reason,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_ids_are_padded_and_validated() {
        let ids = batch_ids("pump", 9, 3).unwrap();
        let ids: Vec<&str> = ids.iter().map(|i| i.as_str()).collect();
        assert_eq!(ids, ["pump-09", "pump-10", "pump-11"]);
        assert!(matches!(
            batch_ids("Pump", 1, 1),
            Err(Error::InvalidName { .. })
        ));
        assert!(matches!(
            batch_ids(&"p".repeat(62), 1, 10),
            Err(Error::InvalidName { .. })
        ));
        assert!(matches!(batch_ids("p", 1, 0), Err(Error::EmptyBatch)));
        assert!(matches!(
            batch_ids("p", 1, MAX_BATCH + 1),
            Err(Error::BatchTooLarge { .. })
        ));
        assert!(matches!(
            batch_ids("p", u64::MAX, 2),
            Err(Error::BatchTooLarge { .. })
        ));
    }
}
