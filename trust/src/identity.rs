//! Reading the identity a certificate names: its SAN URI.
//!
//! The rule: a certificate names an identity only if its subjectAltName
//! holds exactly one URI, and that URI is a valid
//! `spiffe://<trust-domain>/{device,service}/<name>` (parsed by
//! [`Identity::parse`], the one format in `protocol`). Any other URI beside
//! it, SPIFFE or not, makes the certificate ambiguous and it is refused:
//! provisioning never issues one, so such a certificate was made by someone
//! else, and a peer that picks "the SPIFFE one" may pick differently from
//! one that picks "the first one". DNS names, IP addresses and e-mail
//! addresses in the SAN are not identities and are ignored.
//!
//! Where the reader knows its trust domain (the gateway), [`principal_in`]
//! also refuses an identity from another one.

use twofold_protocol::{Identity, Principal, TrustDomain};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why a certificate carries no usable identity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityUriError {
    /// The certificate, or its subjectAltName extension, does not parse.
    #[error("certificate does not parse")]
    Unparsable,
    /// No URI in the subjectAltName.
    #[error("certificate has no spiffe:// identity URI")]
    Missing,
    /// More than one URI: which one names the peer would be a guess.
    #[error("certificate has {count} SAN URIs; exactly one, the spiffe:// identity, is allowed")]
    Ambiguous {
        /// How many URIs the certificate holds.
        count: usize,
    },
    /// The one URI is not a valid identity URI.
    #[error("identity URI {uri:?} is invalid: {reason}")]
    Invalid {
        /// The URI as the certificate holds it.
        uri: String,
        /// Why `protocol` refused it.
        reason: twofold_protocol::IdentityError,
    },
    /// A valid identity, but of another trust domain.
    #[error("identity is in trust domain {found}, not this one's {expected}")]
    OtherTrustDomain {
        /// The certificate's trust domain.
        found: String,
        /// The reader's.
        expected: String,
    },
}

/// The identity named by the DER certificate `der`, under the rule in the
/// module doc.
pub fn identity_of(der: &[u8]) -> Result<Identity, IdentityUriError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| IdentityUriError::Unparsable)?;
    let uris: Vec<&str> = cert
        .subject_alternative_name()
        .map_err(|_| IdentityUriError::Unparsable)?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let uri = match uris.as_slice() {
        [] => return Err(IdentityUriError::Missing),
        [one] => *one,
        many => return Err(IdentityUriError::Ambiguous { count: many.len() }),
    };
    Identity::parse(uri).map_err(|reason| IdentityUriError::Invalid {
        uri: uri.to_owned(),
        reason,
    })
}

/// The principal named by `der`, which must be in `trust_domain`.
pub fn principal_in(der: &[u8], trust_domain: &TrustDomain) -> Result<Principal, IdentityUriError> {
    let identity = identity_of(der)?;
    if identity.trust_domain != *trust_domain {
        return Err(IdentityUriError::OtherTrustDomain {
            found: identity.trust_domain.to_string(),
            expected: trust_domain.to_string(),
        });
    }
    Ok(identity.principal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};
    use twofold_protocol::IdentityError;

    /// A self-signed certificate with these SAN entries.
    fn cert(sans: Vec<SanType>) -> Vec<u8> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(u: &str) -> SanType {
        SanType::URI(u.try_into().unwrap())
    }

    fn td(s: &str) -> TrustDomain {
        TrustDomain::parse(s).unwrap()
    }

    #[test]
    fn one_spiffe_uri_names_the_peer() {
        let der = cert(vec![
            uri("spiffe://example.org/device/sensor-1"),
            SanType::DnsName("sensor-1.example.org".try_into().unwrap()),
        ]);
        let identity = identity_of(&der).unwrap();
        assert_eq!(identity.to_string(), "spiffe://example.org/device/sensor-1");
        assert!(matches!(
            principal_in(&der, &td("example.org")).unwrap(),
            Principal::Device(id) if id.as_str() == "sensor-1"
        ));
    }

    #[test]
    fn an_extra_uri_of_any_kind_is_refused() {
        for extra in [
            "https://example.org/sensor-1",
            "spiffe://example.org/device/other",
        ] {
            let der = cert(vec![
                uri("spiffe://example.org/device/sensor-1"),
                uri(extra),
            ]);
            assert_eq!(
                identity_of(&der),
                Err(IdentityUriError::Ambiguous { count: 2 }),
                "{extra}"
            );
        }
        // Order does not matter either.
        let der = cert(vec![
            uri("urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66"),
            uri("spiffe://example.org/device/sensor-1"),
        ]);
        assert_eq!(
            identity_of(&der),
            Err(IdentityUriError::Ambiguous { count: 2 })
        );
    }

    #[test]
    fn missing_or_invalid_uris_are_refused_with_their_reason() {
        let none = cert(vec![SanType::DnsName("sensor-1".try_into().unwrap())]);
        assert_eq!(identity_of(&none), Err(IdentityUriError::Missing));
        assert_eq!(identity_of(&cert(vec![])), Err(IdentityUriError::Missing));
        assert_eq!(
            identity_of(b"not a certificate"),
            Err(IdentityUriError::Unparsable)
        );
        let http = cert(vec![uri("https://example.org/device/sensor-1")]);
        assert!(matches!(
            identity_of(&http),
            Err(IdentityUriError::Invalid {
                reason: IdentityError::NotSpiffe,
                ..
            })
        ));
        let wildcard = cert(vec![uri("spiffe://example.org/device/+")]);
        assert!(matches!(
            identity_of(&wildcard),
            Err(IdentityUriError::Invalid {
                reason: IdentityError::DeviceId(_),
                ..
            })
        ));
    }

    #[test]
    fn another_trust_domain_is_refused() {
        let der = cert(vec![uri("spiffe://other.org/device/sensor-1")]);
        assert_eq!(
            principal_in(&der, &td("example.org")),
            Err(IdentityUriError::OtherTrustDomain {
                found: "other.org".into(),
                expected: "example.org".into(),
            })
        );
    }
}
