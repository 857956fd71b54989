//! Certificate revocation lists: parsed, checked, and swapped atomically.
//!
//! rustls checks the CRLs on every full handshake. The gateway also keeps
//! the set of revoked serials so it can check resumed sessions (whose
//! certificate rustls does not verify again) and close live sessions the
//! moment their certificate appears on a new CRL.

use std::collections::HashSet;
use std::path::Path;

use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use twofold_trust::Serial;
use twofold_trust::crl::{self, CrlHistory, CrlRefusal};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why a CRL file was refused.
#[derive(Debug, thiserror::Error)]
pub enum CrlError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not PEM: {detail}")]
    NotPem { path: String, detail: String },
    /// Refused by a rule of [`twofold_trust::crl`].
    #[error("{path}: {refusal}")]
    Refused { path: String, refusal: CrlRefusal },
}

/// The CRLs in force.
#[derive(Clone, Debug, Default)]
pub struct RevocationList {
    /// For rustls' verifier.
    pub ders: Vec<CertificateRevocationListDer<'static>>,
    /// Revoked certificates: issuer's name (DER), and serial.
    revoked: HashSet<(Vec<u8>, Serial)>,
    /// The CAs whose CRL is in force (names, DER).
    issuers: HashSet<Vec<u8>>,
    /// What has been in force since the gateway started: CRL numbers
    /// never go back, even across several reloads.
    history: CrlHistory,
    /// The highest CRL number, when the CRLs carry one.
    pub number: Option<u64>,
    /// The newest `thisUpdate`, Unix seconds.
    pub this_update: Option<i64>,
}

impl RevocationList {
    /// Reads PEM CRLs from `path` and takes them by the rules of
    /// [`twofold_trust::crl`], with `client_cas` as the trusted CAs and
    /// `current` (the CRLs in force, if any) as what came before. The CRL
    /// of a CA no longer among `client_cas` is left out, with a warning:
    /// trust in it was withdrawn.
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
        let blocks = pem::parse_many(&bytes).map_err(|e| CrlError::NotPem {
            path: name.clone(),
            detail: e.to_string(),
        })?;
        let ders: Vec<Vec<u8>> = blocks
            .into_iter()
            .filter(|b| b.tag() == "X509 CRL")
            .map(|b| b.into_contents())
            .collect();
        let refused = |refusal| CrlError::Refused {
            path: name.clone(),
            refusal,
        };
        let before = current.map(|c| c.history.clone()).unwrap_or_default();
        let cas: Vec<&[u8]> = client_cas.iter().map(|c| c.as_ref()).collect();
        let withdrawn =
            |issuer: &[u8]| before.has_seen(issuer) && !is_client_ca(client_cas, issuer);
        let crls = crl::parse(
            &ders.iter().map(Vec::as_slice).collect::<Vec<_>>(),
            &cas,
            withdrawn,
        )
        .map_err(refused)?;
        if crls.len() < ders.len() {
            tracing::warn!(
                crl = name,
                left_out = ders.len() - crls.len(),
                "left out the CRLs of CAs that are no longer client CAs"
            );
        }
        let history = match current {
            None => CrlHistory::of(&crls),
            Some(_) => before
                .accept(&crls, |issuer| is_client_ca(client_cas, issuer))
                .map_err(refused)?,
        };
        let mut list = RevocationList {
            history,
            ..RevocationList::default()
        };
        for crl in crls {
            for serial in crl.revoked {
                list.revoked.insert((crl.issuer.clone(), serial));
            }
            if let Some(n) = crl.number {
                list.number = Some(list.number.map_or(n, |m| m.max(n)));
            }
            list.this_update = Some(
                list.this_update
                    .map_or(crl.this_update, |t| t.max(crl.this_update)),
            );
            list.issuers.insert(crl.issuer);
            list.ders.push(CertificateRevocationListDer::from(crl.der));
        }
        Ok(list)
    }

    /// Is there a CRL of the CA with this name (DER)? Without one, rustls
    /// refuses a full handshake of its certificates (their status is
    /// unknown); a resumed session must be refused too.
    pub fn covers(&self, issuer: &[u8]) -> bool {
        self.issuers.contains(issuer)
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

    /// The rule that refused a file.
    fn why(err: &CrlError) -> &CrlRefusal {
        match err {
            CrlError::Refused { refusal, .. } => refusal,
            other => panic!("not refused by a rule: {other}"),
        }
    }

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
                why(&err),
                CrlRefusal::NumberWentBack {
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
            matches!(why(&err), CrlRefusal::NumberLost { current: 3, .. }),
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
        assert!(matches!(why(&err), CrlRefusal::Dropped { .. }), "{err}");
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
            why(&load(&same, &[&b]).unwrap_err()),
            CrlRefusal::UnknownIssuer { .. }
        ));
        // And on every reload after that one.
        let again = load_over(&same, &[&b], Some(&without_a)).unwrap();
        assert!(!again.covers(&name(&a)) && again.covers(&name(&b)));
        // Only withdrawn CAs' CRLs: refused (no revocation checks at all
        // otherwise), saying so.
        let err = load_over(&crl(&a, 5, &[]), &[&b], Some(&again)).unwrap_err();
        assert!(matches!(why(&err), CrlRefusal::OnlyWithdrawn), "{err}");
        // A CRL that fails its signature check while its CA is still
        // trusted is refused as such, not left out.
        let forged = crl(&ca("CA A"), 6, &[]) + &crl(&b, 7, &[]);
        let err = load_over(&forged, &[&a, &b], Some(&now)).unwrap_err();
        assert!(
            matches!(why(&err), CrlRefusal::UnknownIssuer { .. }),
            "{err}"
        );
        // Trusted again later, A may not come back with an older CRL:
        // its number 5 is remembered across the reload that left it out.
        let replayed = crl(&a, 2, &[]) + &crl(&b, 7, &[]);
        let err = load_over(&replayed, &[&a, &b], Some(&again)).unwrap_err();
        assert!(
            matches!(
                why(&err),
                CrlRefusal::NumberWentBack {
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
        assert!(
            matches!(why(&err), CrlRefusal::TwoOfOneIssuer { .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("more than one CRL of \"CN=CA A\""),
            "{err}"
        );
    }

    #[test]
    fn a_crl_signed_by_no_client_ca_is_refused() {
        let (a, b) = (ca("CA A"), ca("CA B"));
        let err = load(&crl(&b, 1, &[]), &[&a]).unwrap_err();
        assert!(
            matches!(why(&err), CrlRefusal::UnknownIssuer { .. }),
            "{err}"
        );
    }
}
