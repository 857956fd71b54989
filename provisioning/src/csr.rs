//! Certificate signing requests made on a device, so its key never leaves it.
//!
//! A CSR is accepted only when its self-signature verifies, its key is
//! ECDSA P-256, and its subject CN is a valid device id (matching the one
//! the operator expects, if given). If it requests SAN entries, they must
//! be exactly the device's identity URI, or a DNS name equal to the CN,
//! which generic clients (EST's among them) add on their own and which is
//! ignored, never granted. Every other requested extension is ignored:
//! the CA alone decides names, key usage, EKU and validity.

use std::fmt;

use twofold_protocol::{DeviceId, Identity, NameError, TrustDomain};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::error::X509Error;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;

/// A CSR that passed every check: sign it for `device_id`.
#[derive(Debug)]
pub struct CsrRequest {
    pub device_id: DeviceId,
    pub public_key: rcgen::SubjectPublicKeyInfo,
}

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CsrError {
    /// Not PEM or DER of a PKCS#10 request.
    NotACsr(String),
    /// The self-signature does not verify: the request was altered or the
    /// signer does not hold the key.
    BadSignature,
    /// A key type Twofold does not issue for.
    UnsupportedKey(String),
    /// A supported key, but signed with a hash this CA does not accept.
    UnsupportedSignature(String),
    /// No subject CN to take the device id from.
    NoCommonName,
    /// The CN is not a valid device id.
    InvalidId { value: String, reason: NameError },
    /// The CN differs from the id the operator expected.
    IdMismatch { in_csr: String, expected: String },
    /// A requested SAN is not the device's identity URI.
    SanMismatch { found: String, expected: String },
}

impl fmt::Display for CsrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CsrError::NotACsr(detail) => write!(f, "not a PKCS#10 certificate request ({detail})"),
            CsrError::BadSignature => f.write_str(
                "signature does not verify: the request was altered or was not signed by its own key",
            ),
            CsrError::UnsupportedKey(kind) => {
                write!(f, "key is {kind}; Twofold issues certificates for ECDSA P-256 keys only")
            }
            CsrError::UnsupportedSignature(alg) => write!(
                f,
                "request is signed with {alg}; re-create it with ECDSA and SHA-256 \
                 (openssl req -sha256)"
            ),
            CsrError::NoCommonName => {
                f.write_str("subject has no CN; make the request with CN=<device id>")
            }
            CsrError::InvalidId { value, reason } => write!(
                f,
                "subject CN {value:?} is not a valid device id: it {reason}. Device ids are 1-64 \
                 characters of a-z, 0-9 and '-', not starting with '-'"
            ),
            CsrError::IdMismatch { in_csr, expected } => {
                write!(f, "request is for device {in_csr:?} but --id says {expected:?}")
            }
            CsrError::SanMismatch { found, expected } => write!(
                f,
                "requests subject alternative name {found}, but the only one this CA grants is {expected}"
            ),
        }
    }
}

impl std::error::Error for CsrError {}

/// Reads a CSR from PEM or DER bytes and checks it.
pub fn parse(
    bytes: &[u8],
    trust_domain: &TrustDomain,
    expected: Option<&DeviceId>,
) -> Result<CsrRequest, CsrError> {
    let der = to_der(bytes)?;
    let csr = verified(&der)?;
    let info = &csr.certification_request_info;

    let cn = info
        .subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or(CsrError::NoCommonName)?;
    let device_id = DeviceId::parse(cn).map_err(|reason| CsrError::InvalidId {
        value: cn.to_owned(),
        reason,
    })?;
    if let Some(expected) = expected
        && expected != &device_id
    {
        return Err(CsrError::IdMismatch {
            in_csr: cn.to_owned(),
            expected: expected.to_string(),
        });
    }

    let identity = Identity::device(*trust_domain, device_id).to_string();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for name in &san.general_names {
                match name {
                    GeneralName::URI(uri) if *uri == identity => {}
                    GeneralName::DNSName(dns) if *dns == cn => {}
                    other => {
                        return Err(CsrError::SanMismatch {
                            found: describe(other),
                            expected: format!("URI:{identity}"),
                        });
                    }
                }
            }
        }
    }

    let public_key = rcgen::SubjectPublicKeyInfo::from_der(info.subject_pki.raw)
        .map_err(|e| CsrError::UnsupportedKey(e.to_string()))?;
    Ok(CsrRequest {
        device_id,
        public_key,
    })
}

/// A CSR whose self-signature verifies, for an ECDSA P-256 key.
fn verified(der: &[u8]) -> Result<X509CertificationRequest<'_>, CsrError> {
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::NotACsr(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::NotACsr(format!(
            "{} bytes after the request",
            rest.len()
        )));
    }
    match csr.verify_signature() {
        Ok(()) => {}
        Err(X509Error::SignatureUnsupportedAlgorithm) => {
            let kind = key_kind(&csr);
            return Err(if kind == "ECDSA P-256" {
                let oid = &csr.signature_algorithm.algorithm;
                let name = x509_parser::objects::oid2sn(oid, x509_parser::objects::oid_registry())
                    .map(str::to_owned)
                    .unwrap_or_else(|_| oid.to_id_string());
                CsrError::UnsupportedSignature(name)
            } else {
                CsrError::UnsupportedKey(kind)
            });
        }
        Err(_) => return Err(CsrError::BadSignature),
    }
    let kind = key_kind(&csr);
    if kind != "ECDSA P-256" {
        return Err(CsrError::UnsupportedKey(kind));
    }

    Ok(csr)
}

/// The key of a CSR that only asks to be certified (a gateway's, whose
/// names come from its current certificate): signed by its key, P-256.
pub fn public_key(bytes: &[u8]) -> Result<rcgen::SubjectPublicKeyInfo, CsrError> {
    let der = to_der(bytes)?;
    let csr = verified(&der)?;
    rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|e| CsrError::UnsupportedKey(e.to_string()))
}

/// A SAN entry as openssl prints it.
fn describe(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(uri) => format!("URI:{uri}"),
        GeneralName::DNSName(dns) => format!("DNS:{dns}"),
        GeneralName::RFC822Name(email) => format!("email:{email}"),
        GeneralName::IPAddress(bytes) => match bytes.len() {
            4 => format!(
                "IP:{}",
                std::net::Ipv4Addr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
            ),
            _ => format!("IP:{}", hex::encode(bytes)),
        },
        other => format!("{other}"),
    }
}

fn to_der(bytes: &[u8]) -> Result<Vec<u8>, CsrError> {
    if bytes.first() == Some(&0x30) {
        return Ok(bytes.to_vec());
    }
    let (_, pem) = x509_parser::pem::parse_x509_pem(bytes)
        .map_err(|_| CsrError::NotACsr("neither PEM nor DER".into()))?;
    if !matches!(
        pem.label.as_str(),
        "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST"
    ) {
        return Err(CsrError::NotACsr(format!("PEM label is {:?}", pem.label)));
    }
    Ok(pem.contents)
}

fn key_kind(csr: &X509CertificationRequest<'_>) -> String {
    let alg = &csr.certification_request_info.subject_pki.algorithm;
    if alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = alg.parameters.as_ref().and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_EC_P256 => "ECDSA P-256".into(),
            Some(c) if c == OID_NIST_EC_P384 => "ECDSA P-384".into(),
            Some(c) if c == OID_NIST_EC_P521 => "ECDSA P-521".into(),
            Some(c) => format!("EC on curve {c}"),
            None => "EC without a named curve".into(),
        }
    } else if alg.algorithm == OID_PKCS1_RSAENCRYPTION {
        "RSA".into()
    } else if alg.algorithm == OID_SIG_ED25519 {
        "Ed25519".into()
    } else {
        format!("an unknown key type ({})", alg.algorithm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    fn td() -> TrustDomain {
        TrustDomain::parse("iot.example").unwrap()
    }

    fn csr_for(cn: &str, key: &KeyPair, sans: Vec<SanType>) -> Vec<u8> {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.subject_alt_names = sans;
        p.serialize_request(key).unwrap().der().to_vec()
    }

    fn p256() -> KeyPair {
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
    }

    #[test]
    fn accepts_a_p256_request_with_or_without_its_identity_san() {
        let key = p256();
        let req = parse(&csr_for("sensor-1", &key, vec![]), &td(), None).unwrap();
        assert_eq!(req.device_id.as_str(), "sensor-1");
        let uri = SanType::URI("spiffe://iot.example/device/sensor-1".try_into().unwrap());
        let der = csr_for("sensor-1", &key, vec![uri]);
        let expected = DeviceId::parse("sensor-1").unwrap();
        assert!(parse(&der, &td(), Some(&expected)).is_ok());
    }

    #[test]
    fn refuses_each_bad_request_with_its_reason() {
        let key = p256();
        let wrong = DeviceId::parse("other").unwrap();
        assert!(matches!(
            parse(&csr_for("sensor-1", &key, vec![]), &td(), Some(&wrong)),
            Err(CsrError::IdMismatch { .. })
        ));
        assert!(matches!(
            parse(&csr_for("a/b", &key, vec![]), &td(), None),
            Err(CsrError::InvalidId {
                reason: NameError::InvalidChar { ch: '/', .. },
                ..
            })
        ));
        let other_td = SanType::URI("spiffe://evil.example/device/sensor-1".try_into().unwrap());
        assert!(matches!(
            parse(&csr_for("sensor-1", &key, vec![other_td]), &td(), None),
            Err(CsrError::SanMismatch { .. })
        ));
        let dns = SanType::DnsName("gw.example".try_into().unwrap());
        assert!(matches!(
            parse(&csr_for("sensor-1", &key, vec![dns]), &td(), None),
            Err(CsrError::SanMismatch { .. })
        ));
        // The CN again as a DNS name, as generic clients add it: ignored.
        let own = SanType::DnsName("sensor-1".try_into().unwrap());
        let request = parse(&csr_for("sensor-1", &key, vec![own]), &td(), None).unwrap();
        assert_eq!(request.device_id.as_str(), "sensor-1");
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert_eq!(
            parse(&csr_for("sensor-1", &p384, vec![]), &td(), None).unwrap_err(),
            CsrError::UnsupportedKey("ECDSA P-384".into())
        );
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert_eq!(
            parse(&csr_for("sensor-1", &ed, vec![]), &td(), None).unwrap_err(),
            CsrError::UnsupportedKey("Ed25519".into())
        );
    }

    #[test]
    fn a_tampered_request_fails_its_signature() {
        let mut der = csr_for("sensor-1", &p256(), vec![]);
        // Change one letter of the CN inside the signed part.
        let at = der.windows(8).position(|w| w == b"sensor-1").unwrap();
        der[at] = b't';
        assert_eq!(
            parse(&der, &td(), None).unwrap_err(),
            CsrError::BadSignature
        );
    }

    #[test]
    fn garbage_is_not_a_csr() {
        assert!(matches!(
            parse(b"hello", &td(), None),
            Err(CsrError::NotACsr(_))
        ));
        assert!(matches!(
            parse(&[0x30, 0x03, 1], &td(), None),
            Err(CsrError::NotACsr(_))
        ));
        let cert_pem = b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            parse(cert_pem, &td(), None),
            Err(CsrError::NotACsr(_))
        ));
    }
}
