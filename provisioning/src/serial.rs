//! Certificate serial numbers.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// A certificate serial number: 16 random bytes (126 bits of entropy),
/// always positive and always 16 bytes long in DER. Shown as lowercase hex.
/// Normalised, parsed and compared by [`twofold_trust::Serial`], the same
/// rule the gateway and the agent use; provisioning adds how serials are
/// drawn and written.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(twofold_trust::Serial);

impl Serial {
    /// A fresh random serial. Uniqueness is enforced by the registry; a
    /// collision (never expected) is retried there.
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
        // Top bit clear (positive) and second bit set (no leading zero
        // byte), so the DER encoding is exactly these 16 bytes.
        bytes[0] = (bytes[0] & 0x3f) | 0x40;
        Serial::from_bytes(&bytes)
    }

    /// The serial of a parsed certificate, as its big-endian bytes.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Serial(twofold_trust::Serial::from_der_bytes(bytes))
    }

    /// Big-endian bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// The first four bytes in hex: enough to tell two CAs apart by name.
    pub fn short(&self) -> String {
        let bytes = self.as_bytes();
        hex::encode(&bytes[..bytes.len().min(4)])
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Serial {
    type Err = Error;

    /// Accepts what people paste: `40ab…`, `40AB…`, or openssl's `40:AB:…`.
    fn from_str(s: &str) -> Result<Self, Error> {
        s.parse()
            .map(Serial)
            .map_err(|reason| Error::InvalidSerial {
                value: s.to_owned(),
                reason,
            })
    }
}

impl From<&Serial> for rcgen::SerialNumber {
    fn from(s: &Serial) -> Self {
        rcgen::SerialNumber::from_slice(s.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_serials_are_positive_and_full_length() {
        for _ in 0..100 {
            let s = Serial::random();
            assert_eq!(s.as_bytes().len(), 16);
            assert_eq!(s.as_bytes()[0] & 0xc0, 0x40);
        }
    }

    #[test]
    fn parses_openssl_and_plain_forms() {
        let s: Serial = "40:AB:cd".parse().unwrap();
        assert_eq!(s.to_string(), "40abcd");
        assert_eq!("0040abcd".parse::<Serial>().unwrap(), s);
        assert_eq!("abc".parse::<Serial>().unwrap().to_string(), "0abc");
        assert!(matches!(
            "xyz".parse::<Serial>(),
            Err(Error::InvalidSerial { .. })
        ));
        assert!(matches!(
            "".parse::<Serial>(),
            Err(Error::InvalidSerial { .. })
        ));
    }
}
