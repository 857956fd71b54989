//! Which CRLs may replace the ones in force.
//!
//! The gateway takes CRLs of the device CAs, the Linux agent CRLs of the
//! server CA; both follow these rules, CA by CA:
//! - every CRL parses (nothing after it) and is signed by a trusted CA
//!   with its issuer's name; the CRL of a CA whose trust was withdrawn
//!   since (it had a CRL in force, and is no longer trusted) is left out,
//!   not refused;
//! - one CRL per CA: rustls checks a certificate against the first CRL of
//!   its issuer it finds, so an old CRL in front of the newest would bring
//!   the old one back in force;
//! - a CRL number never goes back, and a CRL without a number may not
//!   replace one that had one: a replayed old CRL of one CA must not hide
//!   behind a newer one of another;
//! - the CRL of a CA still trusted may not vanish: rustls could no longer
//!   tell whether that CA's certificates are revoked.
//!
//! [`parse`] checks a file's CRLs on their own, [`CrlHistory::accept`]
//! against what was in force before. Both are pure: the caller reads the
//! file and keeps the history.

use std::collections::{BTreeMap, BTreeSet};

use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::Serial;

/// One CRL, parsed and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crl {
    /// The issuer's name, DER.
    pub issuer: Vec<u8>,
    /// The issuer's name as text, for messages.
    pub issuer_name: String,
    /// Its CRL number, if it has one (and it fits 64 bits).
    pub number: Option<u64>,
    /// Its `thisUpdate`, Unix seconds.
    pub this_update: i64,
    /// The serials it revokes.
    pub revoked: Vec<Serial>,
    /// The CRL itself.
    pub der: Vec<u8>,
}

/// Why CRLs were refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CrlRefusal {
    /// No CRL at all.
    #[error("no CRL found (expected PEM blocks labelled X509 CRL)")]
    Empty,
    /// A CRL does not parse.
    #[error("a CRL does not parse: {0}")]
    Malformed(String),
    /// Not signed by any trusted CA with its issuer's name.
    #[error("the CRL of \"{issuer}\" is not signed by a trusted CA")]
    UnknownIssuer {
        /// The CRL's issuer.
        issuer: String,
    },
    /// Two CRLs of one CA.
    #[error(
        "holds more than one CRL of \"{issuer}\" (or of two CAs of that name); rustls checks a certificate against the first one only, so the file must hold one CRL per CA, the newest"
    )]
    TwoOfOneIssuer {
        /// The CA.
        issuer: String,
    },
    /// Only CRLs of CAs no longer trusted.
    #[error("holds no CRL of a trusted CA, only of CAs no longer trusted")]
    OnlyWithdrawn,
    /// A lower CRL number than the CA has had.
    #[error(
        "the CRL of \"{issuer}\" has number {new}, lower than the one in force ({current}); refusing to go back"
    )]
    NumberWentBack {
        /// The CA.
        issuer: String,
        /// The refused CRL's number.
        new: u64,
        /// The highest number the CA has had.
        current: u64,
    },
    /// No CRL number where the CA had one.
    #[error(
        "the CRL of \"{issuer}\" has no CRL number, and the one in force has {current}; refusing what may be an old CRL"
    )]
    NumberLost {
        /// The CA.
        issuer: String,
        /// The highest number the CA has had.
        current: u64,
    },
    /// The CRL of a CA still trusted is gone.
    #[error(
        "holds no CRL of \"{issuer}\" any more, which is still trusted: rustls could not tell whether its certificates are revoked; keep its newest CRL in the file, or stop trusting the CA"
    )]
    Dropped {
        /// The CA.
        issuer: String,
    },
}

/// Parses CRLs (DER) and checks each on its own: it parses, it is signed
/// by one of `cas` with its issuer's name, and no CA has two. A CRL of an
/// issuer for which `withdrawn` says yes, signed by none of `cas`, is left
/// out.
pub fn parse<D: AsRef<[u8]>>(
    ders: &[D],
    cas: &[D],
    withdrawn: impl Fn(&[u8]) -> bool,
) -> Result<Vec<Crl>, CrlRefusal> {
    if ders.is_empty() {
        return Err(CrlRefusal::Empty);
    }
    let cas: Vec<X509Certificate<'_>> = cas
        .iter()
        .filter_map(|c| X509Certificate::from_der(c.as_ref()).ok().map(|(_, c)| c))
        .collect();
    let mut crls: Vec<Crl> = Vec::new();
    for der in ders {
        let der = der.as_ref();
        let (rest, crl) = CertificateRevocationList::from_der(der)
            .map_err(|e| CrlRefusal::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CrlRefusal::Malformed(format!(
                "{} bytes after the CRL",
                rest.len()
            )));
        }
        let issuer = crl.issuer().as_raw().to_vec();
        let issuer_name = crl.issuer().to_string();
        let signed = cas.iter().any(|ca| {
            ca.subject() == crl.issuer() && crl.verify_signature(ca.public_key()).is_ok()
        });
        if !signed && withdrawn(&issuer) {
            continue;
        }
        if !signed {
            return Err(CrlRefusal::UnknownIssuer {
                issuer: issuer_name,
            });
        }
        if crls.iter().any(|c| c.issuer == issuer) {
            return Err(CrlRefusal::TwoOfOneIssuer {
                issuer: issuer_name,
            });
        }
        crls.push(Crl {
            issuer,
            issuer_name,
            number: crl
                .crl_number()
                .and_then(|n| n.to_string().parse::<u64>().ok()),
            this_update: crl.last_update().timestamp(),
            revoked: crl
                .iter_revoked_certificates()
                .map(|r| Serial::from_der_bytes(r.raw_serial()))
                .collect(),
            der: der.to_vec(),
        });
    }
    if crls.is_empty() {
        return Err(CrlRefusal::OnlyWithdrawn);
    }
    Ok(crls)
}

/// What CRLs have been in force: the highest number each CA has had (kept
/// when its CRL leaves), the CAs whose CRL is in force now, and every CA
/// whose CRL ever was.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CrlHistory {
    floors: BTreeMap<Vec<u8>, (String, u64)>,
    in_force: BTreeMap<Vec<u8>, String>,
    ever: BTreeSet<Vec<u8>>,
}

impl CrlHistory {
    /// The history of CRLs taken with no history before them (at start).
    pub fn of(crls: &[Crl]) -> CrlHistory {
        CrlHistory::default().with(crls)
    }

    /// Whether a CRL of this CA (its name, DER) has ever been in force:
    /// one that is no longer trusted had its trust withdrawn.
    pub fn has_seen(&self, issuer: &[u8]) -> bool {
        self.ever.contains(issuer)
    }

    /// Checks `crls` against this history (see the module doc); returns
    /// the history with them in force. `trusted` says whether a CA (its
    /// name, DER) is still trusted.
    pub fn accept(
        &self,
        crls: &[Crl],
        trusted: impl Fn(&[u8]) -> bool,
    ) -> Result<CrlHistory, CrlRefusal> {
        for (issuer, name) in &self.in_force {
            if trusted(issuer) && !crls.iter().any(|c| &c.issuer == issuer) {
                return Err(CrlRefusal::Dropped {
                    issuer: name.clone(),
                });
            }
        }
        for crl in crls {
            let Some((_, floor)) = self.floors.get(&crl.issuer) else {
                continue;
            };
            match crl.number {
                Some(new) if new >= *floor => {}
                Some(new) => {
                    return Err(CrlRefusal::NumberWentBack {
                        issuer: crl.issuer_name.clone(),
                        new,
                        current: *floor,
                    });
                }
                None => {
                    return Err(CrlRefusal::NumberLost {
                        issuer: crl.issuer_name.clone(),
                        current: *floor,
                    });
                }
            }
        }
        Ok(self.with(crls))
    }

    /// The history with `crls` in force, unchecked: for CRLs that
    /// [`CrlHistory::accept`] has let in already (or that are in force
    /// elsewhere, such as a file the caller reads beside its own history).
    pub fn with(&self, crls: &[Crl]) -> CrlHistory {
        let mut next = self.clone();
        next.in_force = crls
            .iter()
            .map(|c| (c.issuer.clone(), c.issuer_name.clone()))
            .collect();
        for crl in crls {
            next.ever.insert(crl.issuer.clone());
            if let Some(n) = crl.number {
                let floor = next
                    .floors
                    .entry(crl.issuer.clone())
                    .or_insert((crl.issuer_name.clone(), n));
                floor.1 = floor.1.max(n);
            }
        }
        next
    }

    /// The highest CRL number in force or had, for logs and metrics.
    pub fn highest(&self) -> Option<u64> {
        self.floors.values().map(|(_, n)| *n).max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa, Issuer,
        KeyIdMethod, KeyPair, RevokedCertParams, SerialNumber,
    };

    struct Ca {
        der: Vec<u8>,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        Ca {
            der,
            issuer: Issuer::new(params, key),
        }
    }

    fn crl(ca: &Ca, number: u64, revoked: &[u64]) -> Vec<u8> {
        let now = time::OffsetDateTime::now_utc();
        CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(7),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: now,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&ca.issuer)
        .unwrap()
        .der()
        .to_vec()
    }

    fn parsed(crls: &[Vec<u8>], cas: &[&Ca]) -> Result<Vec<Crl>, CrlRefusal> {
        let cas: Vec<Vec<u8>> = cas.iter().map(|c| c.der.clone()).collect();
        parse(crls, &cas, |_| false)
    }

    #[test]
    fn a_crl_is_taken_only_signed_by_a_trusted_ca_and_once_per_ca() {
        let (a, b) = (ca("CA A"), ca("CA B"));
        let crls = parsed(&[crl(&a, 3, &[0x10, 0x0100]), crl(&b, 7, &[])], &[&a, &b]).unwrap();
        assert_eq!(crls[0].issuer_name, "CN=CA A");
        assert_eq!((crls[0].number, crls[1].number), (Some(3), Some(7)));
        assert_eq!(
            crls[0].revoked,
            ["10".parse::<Serial>().unwrap(), "0100".parse().unwrap()]
        );
        // B's CRL when only A is trusted; one of A made by another key.
        let refused = parsed(&[crl(&b, 1, &[])], &[&a]).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "the CRL of \"CN=CA B\" is not signed by a trusted CA"
        );
        let forged = parsed(&[crl(&ca("CA A"), 1, &[])], &[&a]).unwrap_err();
        assert!(
            matches!(forged, CrlRefusal::UnknownIssuer { .. }),
            "{forged}"
        );
        // An old CRL in front of the newest: rustls would use the old one.
        let two = parsed(&[crl(&a, 1, &[]), crl(&a, 2, &[0x10])], &[&a]).unwrap_err();
        assert!(matches!(two, CrlRefusal::TwoOfOneIssuer { .. }), "{two}");
        // Nothing, garbage, or a CRL with bytes after it.
        assert_eq!(parsed(&[], &[&a]).unwrap_err(), CrlRefusal::Empty);
        let garbage = parsed(&[b"not a CRL".to_vec()], &[&a]).unwrap_err();
        assert!(matches!(garbage, CrlRefusal::Malformed(_)), "{garbage}");
        let mut trailing = crl(&a, 1, &[]);
        trailing.push(0);
        let trailing = parsed(&[trailing], &[&a]).unwrap_err();
        assert_eq!(
            trailing,
            CrlRefusal::Malformed("1 bytes after the CRL".into())
        );
    }

    #[test]
    fn a_withdrawn_cas_crl_is_left_out_but_not_all_of_them() {
        let (a, b) = (ca("CA A"), ca("CA B"));
        let cas = [b.der.clone()];
        let withdrawn =
            |issuer: &[u8]| issuer == parsed(&[crl(&a, 1, &[])], &[&a]).unwrap()[0].issuer;
        let both = [crl(&a, 5, &[]), crl(&b, 7, &[])];
        let kept = parse(&both, &cas, withdrawn).unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].issuer_name, "CN=CA B");
        assert_eq!(
            parse(&[crl(&a, 5, &[])], &cas, withdrawn).unwrap_err(),
            CrlRefusal::OnlyWithdrawn
        );
    }

    #[test]
    fn crl_numbers_never_go_back_ca_by_ca() {
        let (a, b, c) = (ca("CA A"), ca("CA B"), ca("CA C"));
        let all = [&a, &b, &c];
        let take = |crls: &[Vec<u8>]| parsed(crls, &all).unwrap();
        let history = CrlHistory::of(&take(&[crl(&a, 3, &[]), crl(&b, 7, &[])]));
        assert_eq!(history.highest(), Some(7));
        let trusted = |_: &[u8]| true;
        // The same, or newer: taken.
        let same = take(&[crl(&a, 3, &[]), crl(&b, 7, &[])]);
        assert!(history.accept(&same, trusted).is_ok());
        let newer = take(&[crl(&a, 4, &[]), crl(&b, 7, &[])]);
        let history = history.accept(&newer, trusted).unwrap();
        // A's old CRL beside a newer one of B: the highest number went up,
        // A's went back.
        let replayed = take(&[crl(&a, 2, &[]), crl(&b, 9, &[])]);
        assert_eq!(
            history.accept(&replayed, trusted).unwrap_err(),
            CrlRefusal::NumberWentBack {
                issuer: "CN=CA A".into(),
                new: 2,
                current: 4
            }
        );
        // A CA with no CRL before: nothing to compare.
        let more = take(&[crl(&a, 4, &[]), crl(&b, 7, &[]), crl(&c, 1, &[])]);
        let history = history.accept(&more, trusted).unwrap();
        // A trusted CA's CRL may not vanish; one no longer trusted may.
        let without_c = take(&[crl(&a, 4, &[]), crl(&b, 7, &[])]);
        assert_eq!(
            history.accept(&without_c, trusted).unwrap_err(),
            CrlRefusal::Dropped {
                issuer: "CN=CA C".into()
            }
        );
        let c_name = more[2].issuer.clone();
        let history = history
            .accept(&without_c, |issuer| issuer != c_name.as_slice())
            .unwrap();
        assert!(history.has_seen(&c_name));
        // C's number is remembered while its CRL is out of the file.
        let c_replayed = take(&[crl(&a, 4, &[]), crl(&b, 7, &[]), crl(&c, 0, &[])]);
        assert!(matches!(
            history.accept(&c_replayed, trusted).unwrap_err(),
            CrlRefusal::NumberWentBack { current: 1, .. }
        ));
    }
}
