//! Certificate revocation lists: parsed, checked, and swapped atomically.
//!
//! rustls checks the CRLs on every full handshake. The gateway also keeps
//! the set of revoked serials so it can check resumed sessions (whose
//! certificate rustls does not verify again) and close live sessions the
//! moment their certificate appears on a new CRL.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use twofold_trust::Serial;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

/// Why a CRL file was refused.
#[derive(Debug, thiserror::Error)]
pub enum CrlError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no CRL found (expected PEM blocks labelled X509 CRL)")]
    Empty { path: String },
    #[error("{path}: CRL does not parse: {detail}")]
    Malformed { path: String, detail: String },
    #[error("{path}: CRL issued by {issuer} is not signed by any client CA")]
    UnknownIssuer { path: String, issuer: String },
    #[error(
        "{path}: the CRL of \"{issuer}\" has number {new}, lower than the one in force ({current}); refusing to go back"
    )]
    NumberWentBack {
        path: String,
        issuer: String,
        new: u64,
        current: u64,
    },
    #[error(
        "{path}: the CRL of \"{issuer}\" has no CRL number, and the one in force has {current}; refusing what may be an old CRL"
    )]
    NumberLost {
        path: String,
        issuer: String,
        current: u64,
    },
    #[error(
        "{path}: holds more than one CRL of \"{issuer}\" (or of two CAs of that name); rustls checks a certificate against the first one only, so the file must hold one CRL per CA, the newest"
    )]
    TwoOfOneIssuer { path: String, issuer: String },
    #[error(
        "{path}: holds no CRL of \"{issuer}\" any more, which is still a client CA: its devices could not connect (rustls cannot tell whether their certificates are revoked); keep its newest CRL in the file, or remove the CA from the client CAs"
    )]
    Dropped { path: String, issuer: String },
    #[error(
        "{path}: holds no CRL of a client CA, only of CAs no longer trusted; the client CAs' CRLs are needed"
    )]
    OnlyWithdrawn { path: String },
}

/// The CRLs in force.
#[derive(Clone, Debug, Default)]
pub struct RevocationList {
    /// For rustls' verifier.
    pub ders: Vec<CertificateRevocationListDer<'static>>,
    /// Revoked certificates: issuer's name (DER), and serial.
    revoked: HashSet<(Vec<u8>, Serial)>,
    /// Each CRL's issuer (its name, DER) → its name and CRL number.
    issuers: HashMap<Vec<u8>, (String, Option<u64>)>,
    /// The highest CRL number each CA has had since the gateway started,
    /// including CAs whose CRL has left the file since: a CRL number never
    /// goes back, even across several reloads.
    floors: HashMap<Vec<u8>, u64>,
    /// Every CA whose CRL has been in force since the gateway started: a
    /// CRL of one that is no longer a client CA is left out, not refused.
    known: HashSet<Vec<u8>>,
    /// The highest CRL number, when the CRLs carry one.
    pub number: Option<u64>,
    /// The newest `thisUpdate`, Unix seconds.
    pub this_update: Option<i64>,
}

impl RevocationList {
    /// Reads PEM CRLs from `path` and checks each one's signature against
    /// one of `client_cas`. With `current` (the CRLs in force), also
    /// refuses, CA by CA, a CRL number lower than the highest that CA has
    /// had, or none where there was one (a replayed old CRL of one CA must
    /// not hide behind a newer one of another), and a file that no longer
    /// holds the CRL of a CA still trusted. The CRL of a CA no longer among
    /// `client_cas` is left out, with a warning: trust in it was withdrawn.
    pub fn load(
        path: &Path,
        client_cas: &[CertificateDer<'static>],
        current: Option<&RevocationList>,
    ) -> Result<RevocationList, CrlError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| CrlError::Io {
            path: name.clone(),
            source,
        })?;
        let blocks = pem::parse_many(&bytes).map_err(|e| CrlError::Malformed {
            path: name.clone(),
            detail: e.to_string(),
        })?;
        let ders: Vec<Vec<u8>> = blocks
            .into_iter()
            .filter(|b| b.tag() == "X509 CRL")
            .map(|b| b.into_contents())
            .collect();
        if ders.is_empty() {
            return Err(CrlError::Empty { path: name });
        }
        let withdrawn = |issuer: &[u8]| {
            current.is_some_and(|c| c.known.contains(issuer)) && !is_client_ca(client_cas, issuer)
        };
        let mut list = Self::from_ders(&name, ders, client_cas, &withdrawn)?;
        list.known = list.issuers.keys().cloned().collect();
        let Some(current) = current else {
            list.floors = list.numbers();
            return Ok(list);
        };
        list.known.extend(current.known.iter().cloned());
        for (issuer, (issuer_name, _)) in &current.issuers {
            if !list.issuers.contains_key(issuer) && is_client_ca(client_cas, issuer) {
                return Err(CrlError::Dropped {
                    path: name,
                    issuer: issuer_name.clone(),
                });
            }
        }
        for (issuer, (issuer_name, new)) in &list.issuers {
            let Some(current) = current.floors.get(issuer) else {
                continue;
            };
            match new {
                Some(new) if new >= current => {}
                Some(new) => {
                    return Err(CrlError::NumberWentBack {
                        path: name,
                        issuer: issuer_name.clone(),
                        new: *new,
                        current: *current,
                    });
                }
                None => {
                    return Err(CrlError::NumberLost {
                        path: name,
                        issuer: issuer_name.clone(),
                        current: *current,
                    });
                }
            }
        }
        list.floors = current.floors.clone();
        for (issuer, number) in list.numbers() {
            let floor = list.floors.entry(issuer).or_insert(number);
            *floor = (*floor).max(number);
        }
        Ok(list)
    }

    /// Each CA's CRL number in this file.
    fn numbers(&self) -> HashMap<Vec<u8>, u64> {
        self.issuers
            .iter()
            .filter_map(|(issuer, (_, n))| Some((issuer.clone(), (*n)?)))
            .collect()
    }

    fn from_ders(
        name: &str,
        ders: Vec<Vec<u8>>,
        client_cas: &[CertificateDer<'static>],
        withdrawn: &dyn Fn(&[u8]) -> bool,
    ) -> Result<RevocationList, CrlError> {
        let cas: Vec<X509Certificate<'_>> = client_cas
            .iter()
            .filter_map(|c| X509Certificate::from_der(c).ok().map(|(_, c)| c))
            .collect();
        let mut list = RevocationList::default();
        let mut kept = Vec::new();
        for der in &ders {
            let malformed = |detail: String| CrlError::Malformed {
                path: name.to_owned(),
                detail,
            };
            let (rest, crl) =
                CertificateRevocationList::from_der(der).map_err(|e| malformed(e.to_string()))?;
            if !rest.is_empty() {
                return Err(malformed(format!("{} bytes after the CRL", rest.len())));
            }
            let signed = cas.iter().any(|ca| {
                ca.subject() == crl.issuer() && crl.verify_signature(ca.public_key()).is_ok()
            });
            if !signed && withdrawn(crl.issuer().as_raw()) {
                tracing::warn!(
                    crl = name,
                    issuer = %crl.issuer(),
                    "left out the CRL of a CA that is no longer a client CA"
                );
                continue;
            }
            if !signed {
                return Err(CrlError::UnknownIssuer {
                    path: name.to_owned(),
                    issuer: crl.issuer().to_string(),
                });
            }
            let number = crl
                .crl_number()
                .and_then(|n| n.to_string().parse::<u64>().ok());
            let entry = (crl.issuer().to_string(), number);
            if list
                .issuers
                .insert(crl.issuer().as_raw().to_vec(), entry)
                .is_some()
            {
                return Err(CrlError::TwoOfOneIssuer {
                    path: name.to_owned(),
                    issuer: crl.issuer().to_string(),
                });
            }
            for revoked in crl.iter_revoked_certificates() {
                let issuer = crl.issuer().as_raw().to_vec();
                list.revoked
                    .insert((issuer, Serial::from_der_bytes(revoked.raw_serial())));
            }
            if let Some(n) = number {
                list.number = Some(list.number.map_or(n, |m| m.max(n)));
            }
            let this_update = crl.last_update().timestamp();
            list.this_update = Some(list.this_update.map_or(this_update, |t| t.max(this_update)));
            kept.push(der.clone());
        }
        if kept.is_empty() {
            return Err(CrlError::OnlyWithdrawn {
                path: name.to_owned(),
            });
        }
        list.ders = kept
            .into_iter()
            .map(CertificateRevocationListDer::from)
            .collect();
        Ok(list)
    }

    /// Is there a CRL of the CA with this name (DER)? Without one, rustls
    /// refuses a full handshake of its certificates (their status is
    /// unknown); a resumed session must be refused too.
    pub fn covers(&self, issuer: &[u8]) -> bool {
        self.issuers.contains_key(issuer)
    }

    /// Is the certificate with this serial (hex, as [`CertInfo`] holds it,
    /// in any form [`Serial`] parses) from the CA with this name (DER)
    /// revoked? A serial that does not parse is no serial a CRL lists.
    ///
    /// [`CertInfo`]: crate::identity::CertInfo
    pub fn is_revoked(&self, issuer: &[u8], serial: &str) -> bool {
        serial
            .parse::<Serial>()
            .is_ok_and(|serial| self.revoked.contains(&(issuer.to_vec(), serial)))
    }

    /// How many certificates are revoked.
    pub fn len(&self) -> usize {
        self.revoked.len()
    }

    /// Whether no certificate is revoked.
    pub fn is_empty(&self) -> bool {
        self.revoked.is_empty()
    }
}

/// Is a CA with this name (DER) among `client_cas`?
fn is_client_ca(client_cas: &[CertificateDer<'static>], name: &[u8]) -> bool {
    client_cas
        .iter()
        .any(|ca| X509Certificate::from_der(ca).is_ok_and(|(_, ca)| ca.subject().as_raw() == name))
}

/// CAs and CRLs made with rcgen, for the unit tests.
#[cfg(test)]
pub(crate) mod test_pki {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, IsCa, Issuer,
        KeyIdMethod, KeyPair, RevokedCertParams, SerialNumber,
    };

    pub struct Ca {
        pub der: CertificateDer<'static>,
        pub pem: String,
        pub key_pem: String,
        pub issuer: Issuer<'static, KeyPair>,
    }

    pub fn ca(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            der: cert.der().clone(),
            pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        }
    }

    pub fn crl(ca: &Ca, number: u64, revoked: &[u64]) -> String {
        let now = time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap();
        CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(7),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|&serial| RevokedCertParams {
                    serial_number: SerialNumber::from(serial),
                    revocation_time: now,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&ca.issuer)
        .unwrap()
        .pem()
        .unwrap()
    }

    /// A CRL without a CRL number, as `openssl ca -gencrl` makes one when
    /// it is given no crlnumber file (rcgen always writes a number).
    /// A CA's name, DER, as CRLs and certificates carry it.
    pub fn name(c: &Ca) -> Vec<u8> {
        let (_, cert) = X509Certificate::from_der(&c.der).unwrap();
        cert.subject().as_raw().to_vec()
    }

    pub fn unnumbered_crl(ca: &Ca) -> String {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let index = file("index.txt", "");
        let config = file(
            "ca.cnf",
            &format!(
                "[ca]\ndefault_ca = test\n[test]\ndatabase = {}\ndefault_md = sha256\ndefault_crl_days = 7\n",
                index.display()
            ),
        );
        let out = std::process::Command::new("openssl")
            .args(["ca", "-gencrl", "-batch", "-config"])
            .arg(&config)
            .arg("-cert")
            .arg(file("ca.pem", &ca.pem))
            .arg("-keyfile")
            .arg(file("ca.key", &ca.key_pem))
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn load(pem: &str, cas: &[&Ca]) -> Result<RevocationList, CrlError> {
        load_over(pem, cas, None)
    }

    pub fn load_over(
        pem: &str,
        cas: &[&Ca],
        current: Option<&RevocationList>,
    ) -> Result<RevocationList, CrlError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crl.pem");
        std::fs::write(&path, pem).unwrap();
        let cas: Vec<_> = cas.iter().map(|c| c.der.clone()).collect();
        RevocationList::load(&path, &cas, current)
    }
}

#[cfg(test)]
mod tests {
    use super::test_pki::*;
    use super::*;

    #[test]
    fn crl_numbers_may_not_go_back_ca_by_ca() {
        let (a, b) = (ca("CA A"), ca("CA B"));
        let now = load(&(crl(&a, 3, &[0x10]) + &crl(&b, 7, &[])), &[&a, &b]).unwrap();
        // Newer for both, or the same: taken.
        let newer = crl(&a, 4, &[0x10, 0x11]) + &crl(&b, 7, &[]);
        assert!(load_over(&newer, &[&a, &b], Some(&now)).is_ok());
        // A's old CRL (which did not list 0x10 yet) behind B's newer one:
        // the highest number in the file went up, but A's went back.
        let replayed = crl(&a, 2, &[]) + &crl(&b, 8, &[]);
        let err = load_over(&replayed, &[&a, &b], Some(&now)).unwrap_err();
        assert!(
            matches!(
                err,
                CrlError::NumberWentBack {
                    new: 2,
                    current: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("the CRL of \"CN=CA A\" has number 2"),
            "{err}"
        );
        // No number where A's had one.
        let unnumbered = unnumbered_crl(&a) + &crl(&b, 8, &[]);
        let err = load_over(&unnumbered, &[&a, &b], Some(&now)).unwrap_err();
        assert!(
            matches!(err, CrlError::NumberLost { current: 3, .. }),
            "{err}"
        );
        // Unnumbered from the start is taken (there is nothing to compare).
        assert!(load(&unnumbered, &[&a, &b]).is_ok());
    }

    #[test]
    fn covers_the_cas_whose_crl_is_in_the_file() {
        let (a, b) = (ca("CA A"), ca("CA B"));
        let list = load(&crl(&a, 1, &[]), &[&a, &b]).unwrap();
        assert!(list.covers(&name(&a)));
        assert!(!list.covers(&name(&b)));
    }

    #[test]
    fn a_file_that_drops_the_crl_of_a_trusted_ca_is_refused() {
        let (a, b) = (ca("CA A"), ca("CA B"));
        let now = load(&(crl(&a, 3, &[]) + &crl(&b, 7, &[])), &[&a, &b]).unwrap();
        let err = load_over(&crl(&b, 8, &[]), &[&a, &b], Some(&now)).unwrap_err();
        assert!(matches!(err, CrlError::Dropped { .. }), "{err}");
        assert!(
            err.to_string().contains("no CRL of \"CN=CA A\" any more"),
            "{err}"
        );
    }

    #[test]
    fn a_withdrawn_cas_crl_is_left_out_and_its_number_still_counts() {
        let (a, b) = (ca("CA A"), ca("CA B"));
        let now = load(&(crl(&a, 5, &[0x10]) + &crl(&b, 7, &[])), &[&a, &b]).unwrap();
        // CA A is no longer trusted; its CRL still in the file is left out.
        let same = crl(&a, 5, &[0x10]) + &crl(&b, 7, &[]);
        let without_a = load_over(&same, &[&b], Some(&now)).unwrap();
        assert!(!without_a.covers(&name(&a)) && without_a.covers(&name(&b)));
        assert_eq!(without_a.ders.len(), 1);
        // At start, with nothing in force, the same file is a mistake.
        assert!(matches!(
            load(&same, &[&b]).unwrap_err(),
            CrlError::UnknownIssuer { .. }
        ));
        // And on every reload after that one.
        let again = load_over(&same, &[&b], Some(&without_a)).unwrap();
        assert!(!again.covers(&name(&a)) && again.covers(&name(&b)));
        // Only withdrawn CAs' CRLs: refused (no revocation checks at all
        // otherwise), saying so.
        let err = load_over(&crl(&a, 5, &[]), &[&b], Some(&again)).unwrap_err();
        assert!(matches!(err, CrlError::OnlyWithdrawn { .. }), "{err}");
        // A CRL that fails its signature check while its CA is still
        // trusted is refused as such, not left out.
        let forged = crl(&ca("CA A"), 6, &[]) + &crl(&b, 7, &[]);
        let err = load_over(&forged, &[&a, &b], Some(&now)).unwrap_err();
        assert!(matches!(err, CrlError::UnknownIssuer { .. }), "{err}");
        // Trusted again later, A may not come back with an older CRL:
        // its number 5 is remembered across the reload that left it out.
        let replayed = crl(&a, 2, &[]) + &crl(&b, 7, &[]);
        let err = load_over(&replayed, &[&a, &b], Some(&again)).unwrap_err();
        assert!(
            matches!(
                err,
                CrlError::NumberWentBack {
                    new: 2,
                    current: 5,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn one_crl_per_ca_is_accepted_and_their_serials_joined() {
        let (a, b) = (ca("CA A"), ca("CA B"));
        let list = load(&(crl(&a, 3, &[0x10]) + &crl(&b, 7, &[0x20])), &[&a, &b]).unwrap();
        assert!(list.is_revoked(&name(&a), "10") && list.is_revoked(&name(&b), "20"));
        // A serial is revoked for its own CA only.
        assert!(!list.is_revoked(&name(&b), "10"));
        // Leading zero bytes do not make another serial.
        assert!(list.is_revoked(&name(&a), "0010") && list.is_revoked(&name(&a), "00:10"));
        assert!(!list.is_revoked(&name(&a), "1000") && !list.is_revoked(&name(&a), "not hex"));
        assert_eq!(list.number, Some(7));
        assert_eq!(list.ders.len(), 2);
    }

    #[test]
    fn two_crls_of_one_ca_are_refused() {
        let a = ca("CA A");
        // An old CRL in front of the newest: rustls would check against
        // the old one only, and a newly revoked device would get in.
        let err = load(&(crl(&a, 1, &[]) + &crl(&a, 2, &[0x10])), &[&a]).unwrap_err();
        assert!(matches!(err, CrlError::TwoOfOneIssuer { .. }), "{err}");
        assert!(
            err.to_string().contains("more than one CRL of \"CN=CA A\""),
            "{err}"
        );
    }

    #[test]
    fn a_crl_signed_by_no_client_ca_is_refused() {
        let (a, b) = (ca("CA A"), ca("CA B"));
        let err = load(&crl(&b, 1, &[]), &[&a]).unwrap_err();
        assert!(matches!(err, CrlError::UnknownIssuer { .. }), "{err}");
    }
}
