//! The flashable enrollment bundle for microcontrollers.
//!
//! `provisioning enroll ID --format nostd --gateway HOST:PORT` writes one
//! binary file that a factory writes to a flash partition. The device reads
//! it in place with [`Bundle::decode`]; nothing is copied.
//!
//! # Layout
//!
//! All integers little-endian.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `TWFB` |
//! | 4 | 1 | format version, [`Bundle::VERSION`] |
//! | 5 | 3 | reserved, zero |
//! | 8 | 4 | body length `N` |
//! | 12 | N | body: the [`Bundle`] struct, postcard-encoded, in field order |
//! | 12 + N | 4 | CRC-32/ISO-HDLC (zlib's `crc32`) of bytes `0 .. 12 + N` |
//!
//! Erased flash (all `0xFF`) fails the magic check, a torn write fails the
//! length or CRC check, so a device can tell "no bundle" from "damaged
//! bundle". Bytes after the CRC are ignored: the partition may be larger
//! than the bundle.
//!
//! The body fields, in order: `device_id` (string), `gateway_host`
//! (string), `gateway_port` (varint u16), `server_name` (string),
//! `private_key` (bytes: the 32-byte P-256 secret scalar, big-endian),
//! `chain` (sequence of 1–2 byte strings: leaf certificate DER, then the
//! device CA DER), `server_ca` (bytes: the only trust anchor, DER).
//! Strings and byte strings are a varint length followed by the bytes.

use core::fmt;

use serde::{Deserialize, Serialize};

use crate::name::DeviceId;

const MAGIC: [u8; 4] = *b"TWFB";
const HEADER_LEN: usize = 12;
const CRC_LEN: usize = 4;
// Without a lookup table: a device checks its bundle once per boot, and
// the 1 KiB table would cost flash on every device.
const CRC: crc::Crc<u32, crc::NoTable> = crc::Crc::<u32, crc::NoTable>::new(&crc::CRC_32_ISO_HDLC);

/// Everything a microcontroller needs to connect: its identity, its key
/// and chain, the one CA it trusts, and where the gateway is.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Bundle<'a> {
    /// The device's id; equal to the CN of the leaf certificate.
    pub device_id: DeviceId,
    /// The gateway's DNS name or IP address.
    pub gateway_host: &'a str,
    /// The gateway's TCP port.
    pub gateway_port: u16,
    /// The name the gateway's certificate must carry (DNS name or IP).
    pub server_name: &'a str,
    /// The P-256 secret scalar, 32 bytes big-endian.
    pub private_key: &'a [u8],
    /// Leaf certificate DER, then the issuing device CA DER.
    #[serde(borrow)]
    pub chain: heapless::Vec<&'a [u8], 2>,
    /// The server CA certificate DER: the only trust anchor.
    pub server_ca: &'a [u8],
}

impl fmt::Debug for Bundle<'_> {
    // Written by hand so the private key never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bundle")
            .field("device_id", &self.device_id)
            .field("gateway_host", &self.gateway_host)
            .field("gateway_port", &self.gateway_port)
            .field("server_name", &self.server_name)
            .field("private_key", &"<redacted>")
            .field("chain_len", &self.chain.len())
            .field("server_ca_len", &self.server_ca.len())
            .finish()
    }
}

/// Why a bundle could not be read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleError {
    /// Fewer bytes than a header and a CRC.
    Truncated,
    /// The magic is wrong: erased flash or not a bundle at all.
    NoBundle,
    /// A bundle of a format this firmware does not read.
    UnsupportedVersion(u8),
    /// The reserved header bytes are not zero: written by something else.
    ReservedNotZero,
    /// The header's length runs past the end of the data.
    LengthOutOfRange {
        /// The length in the header.
        body_len: u32,
        /// The bytes after the header.
        available: usize,
    },
    /// The CRC does not match: a torn or corrupted write.
    CrcMismatch,
    /// The body does not decode.
    MalformedBody,
    /// The private key is not 32 bytes.
    BadKeyLength(usize),
    /// The chain is empty, or a field that must not be empty is.
    MissingField(&'static str),
    /// The output buffer is too small.
    BufferFull,
}

impl fmt::Display for BundleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BundleError::Truncated => f.write_str("bundle is truncated"),
            BundleError::NoBundle => f.write_str("no bundle (magic TWFB not found; flash erased?)"),
            BundleError::UnsupportedVersion(v) => {
                write!(
                    f,
                    "bundle format version {v} is not supported (this build reads {})",
                    Bundle::VERSION
                )
            }
            BundleError::LengthOutOfRange {
                body_len,
                available,
            } => write!(
                f,
                "bundle claims a {body_len}-byte body but only {available} bytes follow the header"
            ),
            BundleError::ReservedNotZero => {
                f.write_str("bundle header reserved bytes are not zero")
            }
            BundleError::CrcMismatch => {
                f.write_str("bundle CRC mismatch (torn or corrupted write)")
            }
            BundleError::MalformedBody => f.write_str("bundle body does not decode"),
            BundleError::BadKeyLength(n) => {
                write!(f, "bundle private key is {n} bytes; a P-256 key is 32")
            }
            BundleError::MissingField(name) => write!(f, "bundle field {name} is empty"),
            BundleError::BufferFull => f.write_str("bundle does not fit in the buffer"),
        }
    }
}

impl core::error::Error for BundleError {}

impl<'a> Bundle<'a> {
    /// The format version this code writes and reads.
    pub const VERSION: u8 = 1;

    /// Writes the framed bundle into `out` and returns its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, BundleError> {
        self.check()?;
        if out.len() < HEADER_LEN + CRC_LEN {
            return Err(BundleError::BufferFull);
        }
        let body_cap = out.len() - HEADER_LEN - CRC_LEN;
        let body_len = postcard::to_slice(self, &mut out[HEADER_LEN..HEADER_LEN + body_cap])
            .map_err(|_| BundleError::BufferFull)?
            .len();
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = Self::VERSION;
        out[5..8].fill(0);
        // body_len is bounded by out.len(); a bundle is a few kilobytes.
        out[8..12].copy_from_slice(&(body_len as u32).to_le_bytes());
        let end = HEADER_LEN + body_len;
        let crc = CRC.checksum(&out[..end]);
        out[end..end + CRC_LEN].copy_from_slice(&crc.to_le_bytes());
        Ok(end + CRC_LEN)
    }

    /// Reads a framed bundle from the start of `data` (e.g. a flash
    /// partition), borrowing from it.
    pub fn decode(data: &'a [u8]) -> Result<Self, BundleError> {
        let header = data.get(..HEADER_LEN).ok_or(BundleError::Truncated)?;
        if header[0..4] != MAGIC {
            return Err(BundleError::NoBundle);
        }
        if header[4] != Self::VERSION {
            return Err(BundleError::UnsupportedVersion(header[4]));
        }
        if header[5..8] != [0, 0, 0] {
            return Err(BundleError::ReservedNotZero);
        }
        let body_len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        let available = data.len() - HEADER_LEN;
        let end = usize::try_from(body_len)
            .ok()
            .and_then(|n| n.checked_add(HEADER_LEN))
            .filter(|&end| end.saturating_add(CRC_LEN) <= data.len())
            .ok_or(BundleError::LengthOutOfRange {
                body_len,
                available,
            })?;
        let stored = data.get(end..end + CRC_LEN).ok_or(BundleError::Truncated)?;
        let stored = u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]);
        if CRC.checksum(&data[..end]) != stored {
            return Err(BundleError::CrcMismatch);
        }
        let bundle = crate::message::decode::<Bundle>(&data[HEADER_LEN..end])
            .map_err(|_| BundleError::MalformedBody)?;
        bundle.check()?;
        Ok(bundle)
    }

    fn check(&self) -> Result<(), BundleError> {
        if self.private_key.len() != 32 {
            return Err(BundleError::BadKeyLength(self.private_key.len()));
        }
        let required = [
            ("gateway_host", self.gateway_host.is_empty()),
            ("server_name", self.server_name.is_empty()),
            (
                "chain",
                self.chain.first().is_none_or(|leaf| leaf.is_empty()),
            ),
            ("server_ca", self.server_ca.is_empty()),
        ];
        match required.into_iter().find(|(_, empty)| *empty) {
            Some((name, _)) => Err(BundleError::MissingField(name)),
            None => Ok(()),
        }
    }

    /// The leaf (device) certificate DER.
    pub fn leaf(&self) -> &'a [u8] {
        // `check` guarantees a non-empty chain for every decoded bundle.
        self.chain.first().copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Bundle<'static> {
        let mut chain = heapless::Vec::new();
        chain.push(&b"leaf-der"[..]).unwrap();
        chain.push(&b"device-ca-der"[..]).unwrap();
        Bundle {
            device_id: DeviceId::parse("mcu-1").unwrap(),
            gateway_host: "gw.example",
            gateway_port: 8883,
            server_name: "gw.example",
            private_key: &[7u8; 32],
            chain,
            server_ca: b"server-ca-der",
        }
    }

    #[test]
    fn round_trips_with_trailing_erased_flash() {
        let mut flash = [0xffu8; 512];
        let n = sample().encode(&mut flash).unwrap();
        assert!(n < 512);
        let b = Bundle::decode(&flash).unwrap();
        assert_eq!(b, sample());
        assert_eq!(b.leaf(), b"leaf-der");
    }

    #[test]
    fn tells_erased_from_damaged() {
        assert_eq!(Bundle::decode(&[0xff; 64]), Err(BundleError::NoBundle));
        assert_eq!(Bundle::decode(&[0xff; 4]), Err(BundleError::Truncated));
        let mut flash = [0u8; 256];
        let n = sample().encode(&mut flash).unwrap();
        let mut torn = flash;
        torn[n - 10] ^= 1;
        assert_eq!(Bundle::decode(&torn), Err(BundleError::CrcMismatch));
        let mut reserved = flash;
        reserved[6] = 1;
        assert_eq!(Bundle::decode(&reserved), Err(BundleError::ReservedNotZero));
        let mut newer = flash;
        newer[4] = 2;
        assert_eq!(
            Bundle::decode(&newer),
            Err(BundleError::UnsupportedVersion(2))
        );
        assert_eq!(
            Bundle::decode(&flash[..n - 1]),
            Err(BundleError::LengthOutOfRange {
                body_len: (n - 16) as u32,
                available: n - 13
            })
        );
    }

    #[test]
    fn refuses_a_bad_key_length_on_both_sides() {
        let mut b = sample();
        b.private_key = &[1u8; 31];
        let mut buf = [0u8; 256];
        assert_eq!(b.encode(&mut buf), Err(BundleError::BadKeyLength(31)));
    }

    #[test]
    fn decode_refuses_a_bad_key_length() {
        // Frame a body whose key is 31 bytes, bypassing encode's own check.
        let mut b = sample();
        b.private_key = &[1u8; 31];
        let mut body = [0u8; 256];
        let body_len = postcard::to_slice(&b, &mut body).unwrap().len();
        let mut framed = [0u8; 300];
        framed[..5].copy_from_slice(b"TWFB\x01");
        framed[8..12].copy_from_slice(&(body_len as u32).to_le_bytes());
        framed[12..12 + body_len].copy_from_slice(&body[..body_len]);
        let crc = CRC.checksum(&framed[..12 + body_len]);
        framed[12 + body_len..16 + body_len].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(Bundle::decode(&framed), Err(BundleError::BadKeyLength(31)));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let text = format!("{:?}", sample());
        assert!(text.contains("<redacted>"));
        assert!(!text.contains("7, 7"));
    }
}
