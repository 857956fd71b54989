//! EST (RFC 7030) on the CA service, for clients that are not ours:
//! `cacerts`, `simpleenroll` (a one-time enrollment token, or a factory
//! certificate from a configured bootstrap CA), `simplereenroll`
//! (the current client certificate) and `csrattrs`, under
//! `/.well-known/est/`.
//!
//! Bodies are base64 DER as the RFC says; PEM armour and line breaks are
//! tolerated, as real clients send them. Answers are certs-only PKCS#7,
//! encoded by RustCrypto's `cms`.

use base64::Engine as _;
use der::{Decode, Encode};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};
use twofold_protocol::{DeviceId, Principal};

use crate::csr;
use crate::enrollment::{EnrollOptions, EnrollRequest, Enrollment, KeySource};
use crate::error::{Error, Result};
use crate::pki::Pki;
use crate::registry::{Store, StoreTx};

/// The longest an enrollment token may be valid.
pub const MAX_TOKEN_VALIDITY: Duration = Duration::days(30);

/// Why an EST request was refused, with what to do.
#[derive(Debug, thiserror::Error)]
pub enum EstError {
    #[error("the body is not base64 DER (PEM armour and line breaks are accepted): {0}")]
    NotBase64(String),
    #[error(
        "no enrollment token was given: send the device id and token as HTTP Basic credentials"
    )]
    NoToken,
    #[error(
        "the enrollment token is unknown, used, expired or for another device; ask the operator \
         for a new one (`provisioning est-token <id>`)"
    )]
    BadToken,
    #[error("invalid CSR: {0}")]
    Csr(csr::CsrError),
    #[error(
        "the factory certificate names {0:?}, which is not a device id: its CN must be the id \
         the device is enrolled as"
    )]
    FactoryName(String),
    #[error(
        "{0} has had a certificate before: a factory certificate enrolls a device once, and never \
         again (a copy of it could otherwise take the device over); renew with simplereenroll, or \
         ask the operator for an enrollment token (`provisioning est-token {0}`)"
    )]
    AlreadyEnrolled(String),
    #[error(transparent)]
    Failed(#[from] Error),
}

impl From<crate::registry::StoreError> for EstError {
    fn from(e: crate::registry::StoreError) -> Self {
        EstError::Failed(e.into())
    }
}

fn token_key(token: &str) -> String {
    format!(
        "est-token:{}",
        hex::encode(Sha256::digest(token.as_bytes()))
    )
}

/// Reads an EST body: base64 of DER, perhaps PEM-armoured and broken
/// into lines.
pub fn decode_body(body: &[u8]) -> std::result::Result<Vec<u8>, EstError> {
    let text = std::str::from_utf8(body).map_err(|_| EstError::NotBase64("not text".into()))?;
    let b64: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("-----"))
        .flat_map(str::chars)
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| EstError::NotBase64(e.to_string()))
}

/// Base64 on one line, as EST answers are sent: without the line breaks
/// RFC 2045 allows, which some clients refuse (the est-ca crate's; a
/// decoder that takes them takes one line too, `openssl base64 -d -A`).
pub fn encode_body(der: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(der)
}

/// A certs-only PKCS#7 (CMS SignedData without signers) of `ders`.
pub fn certs_only(ders: &[&[u8]]) -> std::result::Result<Vec<u8>, der::Error> {
    let certs = ders
        .iter()
        .map(|d| x509_cert::Certificate::from_der(d))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    cms::content_info::ContentInfo::try_from(certs)?.to_der()
}

/// `csrattrs`: what the CA wants in a CSR: an ECDSA P-256 key, signed with
/// ECDSA and SHA-256 (RFC 7030 4.5.2's form).
pub fn csr_attributes() -> std::result::Result<Vec<u8>, der::Error> {
    use der::asn1::{ObjectIdentifier, SetOfVec};
    const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
    const P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
    const ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
    #[derive(der::Sequence)]
    struct Attribute {
        oid: ObjectIdentifier,
        values: SetOfVec<ObjectIdentifier>,
    }
    #[derive(der::Choice)]
    enum AttrOrOid {
        Oid(ObjectIdentifier),
        Attribute(Attribute),
    }
    let mut curves = SetOfVec::new();
    curves.insert(P256)?;
    vec![
        AttrOrOid::Oid(ECDSA_SHA256),
        AttrOrOid::Attribute(Attribute {
            oid: EC_PUBLIC_KEY,
            values: curves,
        }),
    ]
    .to_der()
}

impl<S: Store> Pki<S> {
    /// A one-time token with which device `id` may enroll over EST until
    /// `now + valid`. Only its hash is kept.
    pub fn create_enrollment_token(
        &mut self,
        id: &DeviceId,
        valid: Duration,
        now: OffsetDateTime,
    ) -> Result<String> {
        if valid <= Duration::ZERO || valid > MAX_TOKEN_VALIDITY {
            return Err(Error::InvalidDays {
                days: u32::try_from(valid.whole_days()).unwrap_or(u32::MAX),
                max: 30,
            });
        }
        let mut raw = [0u8; 24];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut raw);
        let token = hex::encode(raw);
        let tx = self.store.begin()?;
        let expires = (now + valid).unix_timestamp();
        tx.set_setting(&token_key(&token), &format!("{} {expires}", id.as_str()))?;
        tx.commit()?;
        Ok(token)
    }

    /// `simpleenroll`: issues device `id`'s first certificate for the key of
    /// `csr` (which must name `id`), if `token` is its unused, unexpired
    /// token; the token is used up.
    pub fn enroll_with_token(
        &mut self,
        id: &DeviceId,
        token: &str,
        csr_der: &[u8],
        days: u32,
        now: OffsetDateTime,
    ) -> std::result::Result<Enrollment, EstError> {
        let key = token_key(token);
        let valid = self.store.setting(&key)?.is_some_and(|v| {
            let mut parts = v.split(' ');
            let (who, until) = (
                parts.next(),
                parts.next().and_then(|u| u.parse::<i64>().ok()),
            );
            who == Some(id.as_str()) && until.is_some_and(|u| now.unix_timestamp() < u)
        });
        if !valid {
            return Err(EstError::BadToken);
        }
        let issued = self.first_certificate(id, csr_der, days)?;
        let tx = self.store.begin()?;
        tx.set_setting(&key, "used")?;
        tx.commit()?;
        Ok(issued)
    }

    /// `simpleenroll` with a factory certificate (a bootstrap CA's, which
    /// the TLS layer verified): issues the first certificate of the
    /// device its CN names, for the key of `csr` (which must name it too).
    /// Once per device, ever: a device with any certificate in the
    /// registry, revoked or not, is refused.
    pub fn enroll_with_factory(
        &mut self,
        factory_cn: &str,
        csr_der: &[u8],
        days: u32,
    ) -> std::result::Result<Enrollment, EstError> {
        let id = DeviceId::parse(factory_cn)
            .map_err(|_| EstError::FactoryName(factory_cn.to_owned()))?;
        let ever = self.store.find(&crate::registry::Filter {
            kind: Some(crate::registry::Kind::Device),
            name: Some(id.as_str().to_owned()),
            ..Default::default()
        })?;
        if !ever.is_empty() {
            return Err(EstError::AlreadyEnrolled(id.as_str().to_owned()));
        }
        self.first_certificate(&id, csr_der, days)
    }

    /// Issues `id`'s first certificate for the key of `csr`.
    fn first_certificate(
        &mut self,
        id: &DeviceId,
        csr_der: &[u8],
        days: u32,
    ) -> std::result::Result<Enrollment, EstError> {
        let request = csr::parse(csr_der, self.trust_domain(), Some(id)).map_err(EstError::Csr)?;
        let options = EnrollOptions {
            days,
            replace: false,
            lifetime: None,
        };
        let mut issued = self.enroll(
            vec![EnrollRequest {
                principal: Principal::Device(request.device_id),
                key: KeySource::Csr(request.public_key),
            }],
            options,
            &mut |_| {},
        )?;
        issued.pop().ok_or(EstError::Failed(Error::EmptyBatch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_read_with_armour_and_line_breaks() {
        let der = b"\x30\x03\x02\x01\x05";
        let plain = base64::engine::general_purpose::STANDARD.encode(der);
        assert_eq!(decode_body(plain.as_bytes()).unwrap(), der);
        let broken = format!("{}\r\n{}\n", &plain[..3], &plain[3..]);
        assert_eq!(decode_body(broken.as_bytes()).unwrap(), der);
        let armoured = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{plain}\n-----END CERTIFICATE REQUEST-----\n"
        );
        assert_eq!(decode_body(armoured.as_bytes()).unwrap(), der);
        assert!(matches!(decode_body(b"%%%"), Err(EstError::NotBase64(_))));
        assert!(matches!(decode_body(b"\xff"), Err(EstError::NotBase64(_))));
    }

    #[test]
    fn csr_attributes_ask_for_p256_and_ecdsa_with_sha256() {
        let der = csr_attributes().unwrap();
        // SEQUENCE { OID ecdsa-with-SHA256, SEQUENCE { OID ecPublicKey, SET { OID P-256 } } }
        assert_eq!(der[0], 0x30);
        let text = hex::encode(&der);
        assert!(text.contains("2a8648ce3d040302"), "{text}");
        assert!(text.contains("2a8648ce3d0201"), "{text}");
        assert!(text.contains("2a8648ce3d030107"), "{text}");
    }
}
