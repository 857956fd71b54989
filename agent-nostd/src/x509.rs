//! The parts of an X.509 certificate the server verifier needs, read in
//! place from DER (no allocation, nothing copied), and the DER form of
//! ECDSA signatures.
//!
//! Only what [`crate::verify`] checks is extracted: the signed bytes and
//! signature, the issuer and subject names (raw, compared byte for byte),
//! the validity period, the P-256 public key, basicConstraints,
//! extendedKeyUsage and the subjectAltName entries. A certificate that uses
//! another key or signature algorithm, or carries a critical extension not
//! listed here, is refused rather than half understood.
//!
//! Why a hand-written reader and not the `der` crate: this module used
//! `der` 0.8 and the ECDSA signatures went through `ecdsa`'s `der` support;
//! together they cost about 11 KB of the firmware's 96 KB flash budget
//! (generic decoders, error and tag names for `Debug`, date arithmetic),
//! measured with `cargo bloat` on the QEMU firmware. What a certificate
//! needs here is a strict TLV walk (single-byte tags, minimal definite
//! lengths that fit the input), a few fixed OIDs compared as bytes, the two
//! ASN.1 time forms, and the two INTEGERs of a signature. Every truncation
//! and single-byte change of a real certificate is tested to be refused or
//! read without a panic (`tests/verifier.rs`).

use p256::ecdsa::Signature;

// OIDs as the contents of their DER encoding.
const ECDSA_WITH_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]; // 1.2.840.10045.4.3.2
const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]; // 1.2.840.10045.2.1
const PRIME256V1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]; // 1.2.840.10045.3.1.7
const BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13]; // 2.5.29.19
const KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x0f]; // 2.5.29.15
const EXT_KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x25]; // 2.5.29.37
const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11]; // 2.5.29.17
const SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01]; // 1.3.6.1.5.5.7.3.1

// Tags (class, constructed bit and number in one byte).
const BOOLEAN: u8 = 0x01;
const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const SEQUENCE: u8 = 0x30;
const EXPLICIT_0: u8 = 0xa0; // [0] version
const EXPLICIT_3: u8 = 0xa3; // [3] extensions
const SAN_DNS: u8 = 0x82; // [2] IMPLICIT IA5String
const SAN_IP: u8 = 0x87; // [7] IMPLICIT OCTET STRING

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

impl X509Error {
    pub fn as_str(self) -> &'static str {
        match self {
            X509Error::Malformed => "malformed",
            X509Error::UnsupportedSignature => "not ECDSA-SHA256",
            X509Error::UnsupportedKey => "not a P-256 key",
            X509Error::UnknownCriticalExtension => "unknown critical extension",
        }
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
    /// basicConstraints pathLenConstraint: how many CA certificates may
    /// follow this one below it (255 stands for anything larger).
    pub path_len: Option<u8>,
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

/// A cursor over DER TLVs.
struct Der<'a>(&'a [u8]);

/// One TLV: its tag, its contents, and all of it.
struct Tlv<'a> {
    tag: u8,
    value: &'a [u8],
    whole: &'a [u8],
}

impl<'a> Der<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn peek_tag(&self) -> Option<u8> {
        self.0.first().copied()
    }

    /// The next TLV. Tags must fit one byte (number < 31), lengths must
    /// be definite, minimal, at most two bytes, and within the input.
    fn tlv(&mut self) -> Result<Tlv<'a>, X509Error> {
        let input = self.0;
        let (&tag, rest) = input.split_first().ok_or(X509Error::Malformed)?;
        if tag & 0x1f == 0x1f {
            return Err(X509Error::Malformed);
        }
        let (&first, rest) = rest.split_first().ok_or(X509Error::Malformed)?;
        let (len, rest) = match first {
            0..=0x7f => (first as usize, rest),
            0x81 => match rest {
                [n, rest @ ..] if *n >= 0x80 => (*n as usize, rest),
                _ => return Err(X509Error::Malformed),
            },
            0x82 => match rest {
                [hi, lo, rest @ ..] if *hi != 0 => ((*hi as usize) << 8 | *lo as usize, rest),
                _ => return Err(X509Error::Malformed),
            },
            _ => return Err(X509Error::Malformed),
        };
        if len > rest.len() {
            return Err(X509Error::Malformed);
        }
        let header = input.len() - rest.len();
        let (value, after) = rest.split_at(len);
        self.0 = after;
        Ok(Tlv {
            tag,
            value,
            whole: &input[..header + len],
        })
    }

    /// The next TLV's contents, which must have `tag`.
    fn expect(&mut self, tag: u8) -> Result<&'a [u8], X509Error> {
        let tlv = self.tlv()?;
        if tlv.tag != tag {
            return Err(X509Error::Malformed);
        }
        Ok(tlv.value)
    }

    /// A SEQUENCE, as a cursor over its contents.
    fn sequence(&mut self) -> Result<Der<'a>, X509Error> {
        Ok(Der(self.expect(SEQUENCE)?))
    }

    /// A BIT STRING's bytes; it must have no unused bits.
    fn bit_string(&mut self) -> Result<&'a [u8], X509Error> {
        match self.expect(BIT_STRING)? {
            [0, bytes @ ..] => Ok(bytes),
            _ => Err(X509Error::Malformed),
        }
    }

    fn boolean(&mut self) -> Result<bool, X509Error> {
        match self.expect(BOOLEAN)? {
            [0x00] => Ok(false),
            [0xff] => Ok(true),
            _ => Err(X509Error::Malformed),
        }
    }

    fn finish(&self) -> Result<(), X509Error> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(X509Error::Malformed)
        }
    }

    /// UTCTime (`YYMMDDHHMMSSZ`, years 1950–2049 as RFC 5280 says) or
    /// GeneralizedTime (`YYYYMMDDHHMMSSZ`), as Unix seconds.
    fn time(&mut self) -> Result<u64, X509Error> {
        let tlv = self.tlv()?;
        let (year, rest) = match (tlv.tag, tlv.value) {
            (UTC_TIME, [y @ .., b'Z']) if y.len() == 12 => {
                let yy = digits(&y[..2])?;
                (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &y[2..])
            }
            (GENERALIZED_TIME, [y @ .., b'Z']) if y.len() == 14 => (digits(&y[..4])?, &y[4..]),
            _ => return Err(X509Error::Malformed),
        };
        let month = digits(&rest[0..2])?;
        let day = digits(&rest[2..4])?;
        let (hour, minute, second) = (
            digits(&rest[4..6])?,
            digits(&rest[6..8])?,
            digits(&rest[8..10])?,
        );
        if year < 1970 || !(1..=12).contains(&month) || hour > 23 || minute > 59 || second > 59 {
            return Err(X509Error::Malformed);
        }
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        let month_days = [
            31,
            if leap { 29 } else { 28 },
            31,
            30,
            31,
            30,
            31,
            31,
            30,
            31,
            30,
            31,
        ];
        if day < 1 || day > month_days[month as usize - 1] {
            return Err(X509Error::Malformed);
        }
        let days = days_from_civil(year, month, day);
        Ok(days * 86_400 + (hour * 3600 + minute * 60 + second) as u64)
    }
}

/// Decimal digits, nothing else.
fn digits(text: &[u8]) -> Result<u32, X509Error> {
    text.iter().try_fold(0u32, |n, &c| match c {
        b'0'..=b'9' => Ok(n * 10 + (c - b'0') as u32),
        _ => Err(X509Error::Malformed),
    })
}

/// Days from 1970-01-01 to a date on or after it (Howard Hinnant's
/// `days_from_civil`, restricted to years >= 1970).
fn days_from_civil(year: u32, month: u32, day: u32) -> u64 {
    let y = if month <= 2 { year - 1 } else { year } as u64;
    let era = y / 400;
    let yoe = y - era * 400;
    let m = month as u64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as u64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The first DER SEQUENCE of `der` (a whole certificate) and what
/// follows it: how a chain sent as concatenated DER is taken apart.
pub fn split_first(der: &[u8]) -> Result<(&[u8], &[u8]), X509Error> {
    let mut cursor = Der(der);
    let tlv = cursor.tlv()?;
    if tlv.tag != SEQUENCE {
        return Err(X509Error::Malformed);
    }
    Ok((tlv.whole, cursor.0))
}

/// Parses a DER certificate.
pub fn parse(der: &[u8]) -> Result<Cert<'_>, X509Error> {
    let mut outer = Der(der);
    let mut cert = outer.sequence()?;
    outer.finish()?;

    let tbs = cert.tlv()?;
    if tbs.tag != SEQUENCE {
        return Err(X509Error::Malformed);
    }
    let mut alg = cert.sequence()?;
    if alg.expect(OID)? != ECDSA_WITH_SHA256 {
        return Err(X509Error::UnsupportedSignature);
    }
    let signature = cert.bit_string()?;
    cert.finish()?;

    let mut t = Der(tbs.value);
    if t.peek_tag() == Some(EXPLICIT_0) {
        t.tlv()?; // version
    }
    t.expect(INTEGER)?; // serialNumber
    t.sequence()?; // signature (repeated above)
    let issuer = t.tlv()?;
    let mut validity = t.sequence()?;
    let not_before = validity.time()?;
    let not_after = validity.time()?;
    validity.finish()?;
    let subject = t.tlv()?;
    if issuer.tag != SEQUENCE || subject.tag != SEQUENCE {
        return Err(X509Error::Malformed);
    }

    let mut spki = t.sequence()?;
    let mut key_alg = spki.sequence()?;
    if key_alg.expect(OID)? != EC_PUBLIC_KEY || key_alg.expect(OID)? != PRIME256V1 {
        return Err(X509Error::UnsupportedKey);
    }
    let public_key = spki.bit_string()?;
    spki.finish()?;

    let mut parsed = Cert {
        tbs: tbs.whole,
        signature,
        issuer: issuer.whole,
        subject: subject.whole,
        not_before,
        not_after,
        public_key,
        is_ca: None,
        path_len: None,
        server_auth: false,
        san: None,
    };
    while !t.is_empty() {
        let field = t.tlv()?;
        if field.tag == EXPLICIT_3 {
            let mut wrapper = Der(field.value);
            let mut list = wrapper.sequence()?;
            wrapper.finish()?;
            while !list.is_empty() {
                extension(&mut list.sequence()?, &mut parsed)?;
            }
        }
        // issuerUniqueID and subjectUniqueID are ignored.
    }
    Ok(parsed)
}

fn extension<'a>(r: &mut Der<'a>, cert: &mut Cert<'a>) -> Result<(), X509Error> {
    let id = r.expect(OID)?;
    let critical = if r.peek_tag() == Some(BOOLEAN) {
        r.boolean()?
    } else {
        false
    };
    let mut v = Der(r.expect(OCTET_STRING)?);
    r.finish()?;
    match id {
        BASIC_CONSTRAINTS => {
            let mut bc = v.sequence()?;
            let ca = bc.peek_tag() == Some(BOOLEAN) && bc.boolean()?;
            cert.is_ca = Some(ca);
            if !bc.is_empty() {
                cert.path_len = Some(small_uint(bc.expect(INTEGER)?)?);
            }
            bc.finish()?;
        }
        EXT_KEY_USAGE => {
            let mut purposes = v.sequence()?;
            while !purposes.is_empty() {
                if purposes.expect(OID)? == SERVER_AUTH {
                    cert.server_auth = true;
                }
            }
        }
        SUBJECT_ALT_NAME => cert.san = Some(v.expect(SEQUENCE)?),
        // keyUsage is allowed (and usually critical); the purpose that
        // matters for a TLS server is in extendedKeyUsage.
        KEY_USAGE => return Ok(()),
        _ if critical => return Err(X509Error::UnknownCriticalExtension),
        _ => return Ok(()),
    }
    // Nothing may follow the value of an extension read here.
    v.finish()
}

/// A non-negative, minimally encoded INTEGER, saturated at 255.
fn small_uint(int: &[u8]) -> Result<u8, X509Error> {
    match int {
        [] => Err(X509Error::Malformed),
        [first, ..] if first & 0x80 != 0 => Err(X509Error::Malformed), // negative
        [0, second, ..] if second & 0x80 == 0 => Err(X509Error::Malformed), // not minimal
        [n] | [0, n] => Ok(*n),
        _ => Ok(u8::MAX),
    }
}

/// Whether any subjectAltName entry in `san` (from [`Cert::san`])
/// satisfies `pred`.
pub fn any_alt_name(
    san: &[u8],
    mut pred: impl FnMut(AltName<'_>) -> bool,
) -> Result<bool, X509Error> {
    let mut r = Der(san);
    while !r.is_empty() {
        let name = r.tlv()?;
        let name = match name.tag {
            SAN_DNS => AltName::Dns(name.value),
            SAN_IP => AltName::Ip(name.value),
            _ => AltName::Other,
        };
        if pred(name) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// An ECDSA P-256 signature from its DER form (a SEQUENCE of two positive
/// INTEGERs, minimally encoded); `None` if it is not one, or if either
/// value is zero or not below the group order.
pub fn ecdsa_signature(der: &[u8]) -> Option<Signature> {
    let mut outer = Der(der);
    let mut seq = outer.sequence().ok()?;
    outer.finish().ok()?;
    let r = scalar(seq.expect(INTEGER).ok()?)?;
    let s = scalar(seq.expect(INTEGER).ok()?)?;
    seq.finish().ok()?;
    Signature::from_scalars(r, s).ok()
}

/// A positive, minimally encoded INTEGER of at most 32 bytes, big-endian
/// and left-padded to 32.
fn scalar(int: &[u8]) -> Option<[u8; 32]> {
    let digits = match int {
        [0, rest @ ..] if rest.first().is_some_and(|b| b & 0x80 != 0) => rest,
        [first, ..] if first & 0x80 == 0 && *first != 0 => int,
        _ => return None,
    };
    let mut out = [0u8; 32];
    out.get_mut(32usize.checked_sub(digits.len())?..)?
        .copy_from_slice(digits);
    Some(out)
}

/// An ECDSA signature in DER, as TLS's CertificateVerify carries it.
#[derive(Clone)]
pub struct DerSignature {
    bytes: [u8; 72],
    len: usize,
}

impl AsRef<[u8]> for DerSignature {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl From<&Signature> for DerSignature {
    fn from(signature: &Signature) -> Self {
        let (r, s) = signature.split_bytes();
        let mut out = DerSignature {
            bytes: [0; 72],
            len: 2,
        };
        for half in [r, s] {
            let half: &[u8] = &half;
            let skip = half.iter().take_while(|&&b| b == 0).count();
            let digits = &half[skip..];
            let pad = usize::from(digits.first().is_some_and(|b| b & 0x80 != 0));
            let at = out.len;
            out.bytes[at] = INTEGER;
            out.bytes[at + 1] = (pad + digits.len()) as u8;
            out.bytes[at + 2 + pad..at + 2 + pad + digits.len()].copy_from_slice(digits);
            out.len = at + 2 + pad + digits.len();
        }
        out.bytes[0] = SEQUENCE;
        out.bytes[1] = (out.len - 2) as u8;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_unix_seconds() {
        let t = |der: &[u8]| Der(der).time();
        // 2049-12-31T23:59:59Z and 1970-01-01T00:00:00Z, UTCTime.
        assert_eq!(t(b"\x17\x0d491231235959Z"), Ok(2_524_607_999));
        assert_eq!(t(b"\x17\x0d700101000000Z"), Ok(0));
        // 2000-02-29 (a leap day), GeneralizedTime.
        assert_eq!(t(b"\x18\x0f20000229120000Z"), Ok(951_825_600));
        assert_eq!(t(b"\x18\x0f21000229120000Z"), Err(X509Error::Malformed));
        assert_eq!(t(b"\x17\x0d491331235959Z"), Err(X509Error::Malformed));
        assert_eq!(t(b"\x17\x0d4912312359+9Z"), Err(X509Error::Malformed));
        assert_eq!(t(b"\x17\x0b4912312359Z"), Err(X509Error::Malformed));
    }

    #[test]
    fn lengths_must_be_minimal_and_within_the_input() {
        let tlv = |der: &[u8]| Der(der).tlv().map(|t| t.value.len());
        assert_eq!(tlv(&[0x04, 0x01, 0xaa]), Ok(1));
        assert_eq!(tlv(&[0x04, 0x81, 0x01, 0xaa]), Err(X509Error::Malformed));
        assert_eq!(
            tlv(&[0x04, 0x82, 0x00, 0x01, 0xaa]),
            Err(X509Error::Malformed)
        );
        assert_eq!(tlv(&[0x04, 0x80]), Err(X509Error::Malformed));
        assert_eq!(tlv(&[0x04, 0x02, 0xaa]), Err(X509Error::Malformed));
        assert_eq!(tlv(&[0x1f, 0x01, 0xaa]), Err(X509Error::Malformed));
    }

    #[test]
    fn extension_values_must_end_where_they_should() {
        let mut cert = Cert {
            tbs: &[],
            signature: &[],
            issuer: &[],
            subject: &[],
            not_before: 0,
            not_after: 0,
            public_key: &[],
            is_ca: None,
            path_len: None,
            server_auth: false,
            san: None,
        };
        // subjectAltName: an empty GeneralNames, then (in the bad one) a NULL.
        let good = [0x06, 0x03, 0x55, 0x1d, 0x11, 0x04, 0x02, 0x30, 0x00];
        assert_eq!(extension(&mut Der(&good), &mut cert), Ok(()));
        assert_eq!(cert.san, Some(&[][..]));
        let trailing = [
            0x06, 0x03, 0x55, 0x1d, 0x11, 0x04, 0x04, 0x30, 0x00, 0x05, 0x00,
        ];
        assert_eq!(
            extension(&mut Der(&trailing), &mut cert),
            Err(X509Error::Malformed)
        );
        // basicConstraints cA=TRUE, and an unknown critical extension.
        let ca = [
            0x06, 0x03, 0x55, 0x1d, 0x13, 0x04, 0x05, 0x30, 0x03, 0x01, 0x01, 0xff,
        ];
        assert_eq!(extension(&mut Der(&ca), &mut cert), Ok(()));
        assert_eq!(cert.is_ca, Some(true));
        let unknown = [0x06, 0x03, 0x55, 0x1d, 0x1e, 0x01, 0x01, 0xff, 0x04, 0x00];
        assert_eq!(
            extension(&mut Der(&unknown), &mut cert),
            Err(X509Error::UnknownCriticalExtension)
        );
    }

    #[test]
    fn signatures_round_trip_through_der() {
        use p256::ecdsa::SigningKey;
        use p256::ecdsa::signature::Signer;
        let key = SigningKey::from_slice(&[7; 32]).unwrap();
        for message in [&b"a"[..], b"b", b"c", b"d", b"e", b"f", b"g", b"h"] {
            let signature: Signature = key.sign(message);
            let der = DerSignature::from(&signature);
            assert_eq!(der.as_ref(), signature.to_der().as_bytes());
            assert_eq!(ecdsa_signature(der.as_ref()), Some(signature));
        }
        // Negative, non-minimal, zero and over-long integers are refused.
        let one = [0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01];
        assert!(ecdsa_signature(&one).is_some());
        assert!(ecdsa_signature(&[0x30, 0x06, 0x02, 0x01, 0x81, 0x02, 0x01, 0x01]).is_none());
        assert!(ecdsa_signature(&[0x30, 0x07, 0x02, 0x02, 0x00, 0x01, 0x02, 0x01, 0x01]).is_none());
        assert!(ecdsa_signature(&[0x30, 0x06, 0x02, 0x01, 0x00, 0x02, 0x01, 0x01]).is_none());
        let mut long = [0x01u8; 40];
        long[..4].copy_from_slice(&[0x30, 0x26, 0x02, 0x21]);
        long[4] = 0x01;
        long[37..40].copy_from_slice(&[0x02, 0x01, 0x01]);
        assert!(ecdsa_signature(&long).is_none());
    }
}
