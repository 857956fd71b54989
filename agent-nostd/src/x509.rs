//! The parts of an X.509 certificate the server verifier needs, read in
//! place from DER with the `der` crate's reader (no allocation, nothing
//! copied).
//!
//! Only what [`crate::verify`] checks is extracted: the signed bytes and
//! signature, the issuer and subject names (raw, compared byte for byte),
//! the validity period, the P-256 public key, basicConstraints,
//! extendedKeyUsage and the subjectAltName entries. A certificate that uses
//! another key or signature algorithm, or carries a critical extension not
//! listed here, is refused rather than half understood.

use der::asn1::{AnyRef, BitStringRef, GeneralizedTime, ObjectIdentifier, OctetStringRef, UtcTime};
use der::{Decode, Reader, SliceReader, Tag, TagNumber, Tagged};

const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const PRIME256V1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const BASIC_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.19");
const KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.15");
const EXT_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.37");
const SUBJECT_ALT_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.17");
const SERVER_AUTH: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.1");

/// Why a certificate could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum X509Error {
    /// Not well-formed DER, or not the X.509 structure.
    Malformed,
    /// Signed with something other than ECDSA with SHA-256.
    UnsupportedSignature,
    /// A key other than P-256.
    UnsupportedKey,
    /// A critical extension this verifier does not understand.
    UnknownCriticalExtension,
}

impl From<der::Error> for X509Error {
    fn from(_: der::Error) -> Self {
        X509Error::Malformed
    }
}

/// A parsed certificate, borrowing from its DER.
#[derive(Debug, Clone, Copy)]
pub struct Cert<'a> {
    /// The whole TBSCertificate TLV: the bytes the issuer signed.
    pub tbs: &'a [u8],
    /// The ECDSA signature, DER.
    pub signature: &'a [u8],
    /// The issuer Name TLV.
    pub issuer: &'a [u8],
    /// The subject Name TLV.
    pub subject: &'a [u8],
    /// Unix seconds.
    pub not_before: u64,
    /// Unix seconds.
    pub not_after: u64,
    /// The SEC1 encoded P-256 point.
    pub public_key: &'a [u8],
    /// basicConstraints cA; `None` when the extension is absent.
    pub is_ca: Option<bool>,
    /// extendedKeyUsage lists id-kp-serverAuth.
    pub server_auth: bool,
    /// The subjectAltName GeneralNames (the SEQUENCE's contents), if any.
    pub san: Option<&'a [u8]>,
}

/// One name in a subjectAltName.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AltName<'a> {
    Dns(&'a [u8]),
    Ip(&'a [u8]),
    /// URI, email, directory name … (not used for servers).
    Other,
}

fn any<'a>(r: &mut SliceReader<'a>) -> Result<AnyRef<'a>, X509Error> {
    Ok(AnyRef::decode(r)?)
}

fn sequence<'a>(r: &mut SliceReader<'a>) -> Result<SliceReader<'a>, X509Error> {
    let value = any(r)?;
    if value.tag() != Tag::Sequence {
        return Err(X509Error::Malformed);
    }
    Ok(SliceReader::new(value.value())?)
}

fn context(number: u32, constructed: bool) -> Tag {
    Tag::ContextSpecific {
        constructed,
        number: TagNumber(number),
    }
}

fn time(r: &mut SliceReader<'_>) -> Result<u64, X509Error> {
    let t = any(r)?;
    let d = match t.tag() {
        Tag::UtcTime => t.decode_as::<UtcTime>()?.to_unix_duration(),
        Tag::GeneralizedTime => t.decode_as::<GeneralizedTime>()?.to_unix_duration(),
        _ => return Err(X509Error::Malformed),
    };
    Ok(d.as_secs())
}

/// Parses a DER certificate.
pub fn parse(der: &[u8]) -> Result<Cert<'_>, X509Error> {
    let mut outer = SliceReader::new(der)?;
    let mut cert = sequence(&mut outer)?;
    outer.finish()?;

    let tbs = cert.tlv_bytes()?;
    let mut alg = sequence(&mut cert)?;
    if ObjectIdentifier::decode(&mut alg)? != ECDSA_WITH_SHA256 {
        return Err(X509Error::UnsupportedSignature);
    }
    let signature = BitStringRef::decode(&mut cert)?
        .as_bytes()
        .ok_or(X509Error::Malformed)?;
    cert.finish()?;

    let mut t = sequence(&mut SliceReader::new(tbs)?)?;
    if Tag::peek(&t)? == context(0, true) {
        any(&mut t)?; // version
    }
    any(&mut t)?; // serialNumber
    any(&mut t)?; // signature (repeated above)
    let issuer = t.tlv_bytes()?;
    let mut validity = sequence(&mut t)?;
    let not_before = time(&mut validity)?;
    let not_after = time(&mut validity)?;
    validity.finish()?;
    let subject = t.tlv_bytes()?;

    let mut spki = sequence(&mut t)?;
    let mut key_alg = sequence(&mut spki)?;
    if ObjectIdentifier::decode(&mut key_alg)? != EC_PUBLIC_KEY
        || ObjectIdentifier::decode(&mut key_alg)? != PRIME256V1
    {
        return Err(X509Error::UnsupportedKey);
    }
    let public_key = BitStringRef::decode(&mut spki)?
        .as_bytes()
        .ok_or(X509Error::Malformed)?;

    let mut parsed = Cert {
        tbs,
        signature,
        issuer,
        subject,
        not_before,
        not_after,
        public_key,
        is_ca: None,
        server_auth: false,
        san: None,
    };
    while !t.is_finished() {
        let field = any(&mut t)?;
        if field.tag() == context(3, true) {
            let mut wrapper = SliceReader::new(field.value())?;
            let mut list = sequence(&mut wrapper)?;
            while !list.is_finished() {
                extension(&mut sequence(&mut list)?, &mut parsed)?;
            }
        }
        // issuerUniqueID and subjectUniqueID are ignored.
    }
    Ok(parsed)
}

fn extension<'a>(r: &mut SliceReader<'a>, cert: &mut Cert<'a>) -> Result<(), X509Error> {
    let id = ObjectIdentifier::decode(r)?;
    let critical = if Tag::peek(r)? == Tag::Boolean {
        bool::decode(r)?
    } else {
        false
    };
    let value = <&OctetStringRef>::decode(r)?.as_bytes();
    let mut v = SliceReader::new(value)?;
    match id {
        BASIC_CONSTRAINTS => {
            let mut bc = sequence(&mut v)?;
            let ca = !bc.is_finished() && Tag::peek(&bc)? == Tag::Boolean && bool::decode(&mut bc)?;
            cert.is_ca = Some(ca);
        }
        EXT_KEY_USAGE => {
            let mut purposes = sequence(&mut v)?;
            while !purposes.is_finished() {
                if ObjectIdentifier::decode(&mut purposes)? == SERVER_AUTH {
                    cert.server_auth = true;
                }
            }
        }
        SUBJECT_ALT_NAME => {
            let names = any(&mut v)?;
            if names.tag() != Tag::Sequence {
                return Err(X509Error::Malformed);
            }
            cert.san = Some(names.value());
        }
        // keyUsage is allowed (and usually critical); the purpose that
        // matters for a TLS server is in extendedKeyUsage.
        KEY_USAGE => {}
        _ if critical => return Err(X509Error::UnknownCriticalExtension),
        _ => {}
    }
    Ok(())
}

/// Whether any subjectAltName entry in `san` (from [`Cert::san`])
/// satisfies `pred`.
pub fn any_alt_name(
    san: &[u8],
    mut pred: impl FnMut(AltName<'_>) -> bool,
) -> Result<bool, X509Error> {
    let mut r = SliceReader::new(san)?;
    while !r.is_finished() {
        let name = any(&mut r)?;
        let name = match name.tag() {
            t if t == context(2, false) => AltName::Dns(name.value()),
            t if t == context(7, false) => AltName::Ip(name.value()),
            _ => AltName::Other,
        };
        if pred(name) {
            return Ok(true);
        }
    }
    Ok(false)
}
