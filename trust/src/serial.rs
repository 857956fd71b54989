//! Certificate serial numbers: one normal form for comparing them.
//!
//! The rule: a serial is the big-endian content bytes of its DER INTEGER
//! without leading zero bytes (a zero serial keeps one zero byte), shown as
//! lowercase hex. So `00 8f 01` (a positive serial with its sign byte), and
//! `8f 01` (as a careless encoder or a CRL entry may write it) are the same
//! serial, `8f01`. A CRL lists the serial it revokes with whatever leading
//! bytes its issuer wrote; comparing normal forms means a revoked
//! certificate is never missed because of an extra zero.
//!
//! Serials are compared as byte strings, never as numbers: RFC 5280 allows
//! 20 octets, more than any integer type holds.

use std::fmt;
use std::str::FromStr;

/// A certificate serial number in its normal form (see the module doc).
/// Constructed only through [`Serial::from_der_bytes`] or parsing, so two
/// equal serials always compare equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(Vec<u8>);

/// Why a typed serial was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SerialError {
    /// Nothing but separators or whitespace.
    #[error("the serial is empty")]
    Empty,
    /// More than 40 hex digits: longer than RFC 5280's 20 octets.
    #[error("the serial has {digits} hex digits; at most 40 (20 bytes) are allowed")]
    TooLong {
        /// How many digits were given.
        digits: usize,
    },
    /// A character other than a hex digit or `:`.
    #[error("the serial holds {0:?}, which is not a hex digit or ':'")]
    NotHex(char),
}

impl Serial {
    /// The serial of a parsed certificate or CRL entry: the content bytes
    /// of its DER INTEGER (x509-parser's `raw_serial()`), with or without
    /// the leading sign byte.
    pub fn from_der_bytes(bytes: &[u8]) -> Self {
        let start = bytes
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(bytes.len().saturating_sub(1));
        let mut kept = bytes.get(start..).unwrap_or_default().to_vec();
        if kept.is_empty() {
            kept.push(0);
        }
        Serial(kept)
    }

    /// Big-endian bytes, without leading zero bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0))
    }
}

impl FromStr for Serial {
    type Err = SerialError;

    /// Accepts what people paste: `40ab…`, `40AB…`, openssl's `40:AB:…`,
    /// with or without leading zeros, an odd number of digits included.
    fn from_str(s: &str) -> Result<Self, SerialError> {
        let mut nibbles = Vec::new();
        for c in s.trim().chars().filter(|&c| c != ':') {
            nibbles.push(c.to_digit(16).ok_or(SerialError::NotHex(c))? as u8);
        }
        if nibbles.is_empty() {
            return Err(SerialError::Empty);
        }
        if nibbles.len() > 40 {
            return Err(SerialError::TooLong {
                digits: nibbles.len(),
            });
        }
        if nibbles.len() % 2 == 1 {
            nibbles.insert(0, 0);
        }
        let bytes: Vec<u8> = nibbles.chunks(2).map(|p| p[0] << 4 | p[1]).collect();
        Ok(Serial::from_der_bytes(&bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_zero_bytes_do_not_make_another_serial() {
        let plain = Serial::from_der_bytes(&[0x8f, 0x01]);
        assert_eq!(plain.to_string(), "8f01");
        // The sign byte DER adds to a serial with its top bit set.
        assert_eq!(Serial::from_der_bytes(&[0x00, 0x8f, 0x01]), plain);
        // Zero padding a sloppy encoder adds.
        assert_eq!(Serial::from_der_bytes(&[0x00, 0x00, 0x8f, 0x01]), plain);
        // A zero inside or at the end is significant.
        assert_eq!(Serial::from_der_bytes(&[0x8f, 0x00]).to_string(), "8f00");
        assert_ne!(Serial::from_der_bytes(&[0x8f, 0x01, 0x00]), plain);
    }

    #[test]
    fn a_zero_serial_keeps_one_byte() {
        assert_eq!(Serial::from_der_bytes(&[0x00]).to_string(), "00");
        assert_eq!(Serial::from_der_bytes(&[0x00, 0x00]).to_string(), "00");
        assert_eq!(Serial::from_der_bytes(&[]).to_string(), "00");
        assert_eq!("0".parse::<Serial>().unwrap().to_string(), "00");
    }

    #[test]
    fn typed_serials_meet_parsed_ones() {
        let der = Serial::from_der_bytes(&[0x00, 0x40, 0xab, 0xcd]);
        for typed in ["40abcd", "40:AB:cd", "0040abcd", "00:40:AB:CD", " 40abcd\n"] {
            assert_eq!(typed.parse::<Serial>().unwrap(), der, "{typed}");
        }
        assert_eq!("abc".parse::<Serial>().unwrap().to_string(), "0abc");
        assert_eq!("0abc".parse::<Serial>().unwrap().as_bytes(), [0x0a, 0xbc]);
    }

    #[test]
    fn typed_serials_are_refused_with_their_reason() {
        assert_eq!("".parse::<Serial>(), Err(SerialError::Empty));
        assert_eq!(":::".parse::<Serial>(), Err(SerialError::Empty));
        assert_eq!("40xb".parse::<Serial>(), Err(SerialError::NotHex('x')));
        assert_eq!("4é".parse::<Serial>(), Err(SerialError::NotHex('é')));
        assert_eq!(
            "1".repeat(41).parse::<Serial>(),
            Err(SerialError::TooLong { digits: 41 })
        );
        assert!("f".repeat(40).parse::<Serial>().is_ok());
    }
}
