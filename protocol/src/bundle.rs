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
        frame(&MAGIC, 0, self, out)
    }

    /// Reads a framed bundle from the start of `data` (e.g. a flash
    /// partition), borrowing from it.
    pub fn decode(data: &'a [u8]) -> Result<Self, BundleError> {
        let (state, body) = unframe(&MAGIC, data)?;
        if state != 0 {
            return Err(BundleError::ReservedNotZero);
        }
        let bundle =
            crate::message::decode::<Bundle>(body).map_err(|_| BundleError::MalformedBody)?;
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

/// Writes `body` framed (header, postcard body, CRC) into `out`; byte 5 of
/// the header is `state` and, so that it can change in place, is counted
/// as zero in the CRC.
fn frame<T: Serialize>(
    magic: &[u8; 4],
    state: u8,
    body: &T,
    out: &mut [u8],
) -> Result<usize, BundleError> {
    if out.len() < HEADER_LEN + CRC_LEN {
        return Err(BundleError::BufferFull);
    }
    let body_cap = out.len() - HEADER_LEN - CRC_LEN;
    let body_len = postcard::to_slice(body, &mut out[HEADER_LEN..HEADER_LEN + body_cap])
        .map_err(|_| BundleError::BufferFull)?
        .len();
    out[0..4].copy_from_slice(magic);
    out[4] = Bundle::VERSION;
    out[5..8].fill(0);
    // body_len is bounded by out.len(); a bundle is a few kilobytes.
    out[8..12].copy_from_slice(&(body_len as u32).to_le_bytes());
    let end = HEADER_LEN + body_len;
    let crc = CRC.checksum(&out[..end]);
    out[end..end + CRC_LEN].copy_from_slice(&crc.to_le_bytes());
    out[5] = state;
    Ok(end + CRC_LEN)
}

/// Checks the frame at the start of `data`; returns the state byte and
/// the body.
fn unframe<'a>(magic: &[u8; 4], data: &'a [u8]) -> Result<(u8, &'a [u8]), BundleError> {
    let header = data.get(..HEADER_LEN).ok_or(BundleError::Truncated)?;
    if header[0..4] != *magic {
        return Err(BundleError::NoBundle);
    }
    if header[4] != Bundle::VERSION {
        return Err(BundleError::UnsupportedVersion(header[4]));
    }
    if header[6..8] != [0, 0] {
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
    let mut digest = CRC.digest();
    digest.update(&header[..5]);
    digest.update(&[0]);
    digest.update(&data[6..end]);
    if digest.finalize() != stored {
        return Err(BundleError::CrcMismatch);
    }
    Ok((header[5], &data[HEADER_LEN..end]))
}

/// A certificate chain the device received by renewing, kept in one of
/// the two chain slots of the bundle partition (after the bundle). Its
/// key is the bundle's: renewal keeps it.
///
/// The frame is the bundle's (magic `TWFC`), body `generation` (varint
/// u32) then `chain`, with one difference: header byte 5 is the state,
/// `0xFF` as written (staged: not yet proven by a handshake) and `0x00`
/// once committed. The CRC counts it as zero, so committing is one byte
/// programmed from `0xFF` to `0x00`, which NOR flash does without an
/// erase, and a torn commit leaves the record staged, never damaged.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ChainRecord<'a> {
    /// 1 for the first renewal, one more for each after it; the bundle's
    /// own chain is generation 0.
    pub generation: u32,
    /// Leaf certificate DER, then the issuing device CA DER.
    #[serde(borrow)]
    pub chain: heapless::Vec<&'a [u8], 2>,
}

/// Where a [`ChainRecord`] is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainState {
    /// Written after the CA issued it; not yet used for a good connection.
    Staged,
    /// Used for a good connection and committed with the CA.
    Committed,
}

const CHAIN_MAGIC: [u8; 4] = *b"TWFC";
const STAGED: u8 = 0xff;

impl<'a> ChainRecord<'a> {
    /// The offset of the state byte: write `0x00` there to commit.
    pub const STATE_OFFSET: usize = 5;
    /// The value of the state byte of a committed record.
    pub const COMMITTED: u8 = 0;

    /// Writes the record, staged, into `out`; returns its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, BundleError> {
        if self.chain.first().is_none_or(|leaf| leaf.is_empty()) {
            return Err(BundleError::MissingField("chain"));
        }
        frame(&CHAIN_MAGIC, STAGED, self, out)
    }

    /// Writes the record, staged, in pieces through `program(offset,
    /// bytes)`, the way flash is programmed in place: the chain is never
    /// copied to RAM. Writes exactly what [`ChainRecord::encode`] does;
    /// returns the length.
    pub fn write<E: From<BundleError>>(
        &self,
        mut program: impl FnMut(usize, &[u8]) -> Result<(), E>,
    ) -> Result<usize, E> {
        if self.chain.first().is_none_or(|leaf| leaf.is_empty()) {
            return Err(BundleError::MissingField("chain").into());
        }
        // The body is postcard: varint generation, varint count, then
        // each certificate as varint length and bytes.
        let mut head = [0u8; 10];
        let mut n = postcard::to_slice(&self.generation, &mut head)
            .map_err(|_| BundleError::BufferFull)?
            .len();
        n += postcard::to_slice(&self.chain.len(), &mut head[n..])
            .map_err(|_| BundleError::BufferFull)?
            .len();
        let mut lens = [[0u8; 5]; 2];
        let mut lens_n = [0usize; 2];
        for (i, cert) in self.chain.iter().enumerate() {
            lens_n[i] = postcard::to_slice(&cert.len(), &mut lens[i])
                .map_err(|_| BundleError::BufferFull)?
                .len();
        }
        let mut pieces: heapless::Vec<&[u8], 5> = heapless::Vec::new();
        let _ = pieces.push(&head[..n]);
        for (i, cert) in self.chain.iter().enumerate() {
            let _ = pieces.push(&lens[i][..lens_n[i]]);
            let _ = pieces.push(cert);
        }
        let body_len: usize = pieces.iter().map(|p| p.len()).sum();
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&CHAIN_MAGIC);
        header[4] = Bundle::VERSION;
        let body_len32 = u32::try_from(body_len).map_err(|_| BundleError::BufferFull)?;
        header[8..12].copy_from_slice(&body_len32.to_le_bytes());
        let mut digest = CRC.digest();
        digest.update(&header);
        let mut offset = HEADER_LEN;
        for piece in &pieces {
            digest.update(piece);
            program(offset, piece)?;
            offset += piece.len();
        }
        program(offset, &digest.finalize().to_le_bytes())?;
        header[Self::STATE_OFFSET] = STAGED;
        program(0, &header)?;
        Ok(offset + CRC_LEN)
    }

    /// Reads a record from the start of a slot, borrowing from it.
    /// [`BundleError::NoBundle`] means an erased (empty) slot.
    pub fn decode(data: &'a [u8]) -> Result<(Self, ChainState), BundleError> {
        let (state, body) = unframe(&CHAIN_MAGIC, data)?;
        let state = match state {
            STAGED => ChainState::Staged,
            Self::COMMITTED => ChainState::Committed,
            _ => return Err(BundleError::ReservedNotZero),
        };
        let record =
            crate::message::decode::<ChainRecord>(body).map_err(|_| BundleError::MalformedBody)?;
        if record.chain.first().is_none_or(|leaf| leaf.is_empty()) || record.generation == 0 {
            return Err(BundleError::MissingField("chain"));
        }
        Ok((record, state))
    }

    /// The leaf (device) certificate DER.
    pub fn leaf(&self) -> &'a [u8] {
        // `decode` and `encode` refuse an empty chain.
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

    #[test]
    fn a_chain_record_commits_in_place_and_survives_a_torn_write() {
        let mut chain = heapless::Vec::new();
        chain.push(&b"new-leaf"[..]).unwrap();
        chain.push(&b"device-ca-der"[..]).unwrap();
        let record = ChainRecord {
            generation: 3,
            chain,
        };
        let mut slot = [0xffu8; 128];
        assert_eq!(ChainRecord::decode(&slot), Err(BundleError::NoBundle));
        let n = record.encode(&mut slot).unwrap();
        let (read, state) = ChainRecord::decode(&slot).unwrap();
        assert_eq!(
            (read.generation, read.leaf(), state),
            (3, &b"new-leaf"[..], ChainState::Staged)
        );
        // Committing programs one byte, bits only cleared: no erase.
        let mut committed = slot;
        committed[ChainRecord::STATE_OFFSET] = ChainRecord::COMMITTED;
        assert_eq!(
            ChainRecord::decode(&committed).unwrap().1,
            ChainState::Committed
        );
        // A state that is neither is damage, as is a torn body.
        let mut odd = slot;
        odd[ChainRecord::STATE_OFFSET] = 0x0f;
        assert_eq!(ChainRecord::decode(&odd), Err(BundleError::ReservedNotZero));
        let mut torn = slot;
        torn[n - 6] ^= 1;
        assert_eq!(ChainRecord::decode(&torn), Err(BundleError::CrcMismatch));
        // A bundle is not a chain record, nor the other way round.
        assert_eq!(Bundle::decode(&slot), Err(BundleError::NoBundle));
        let mut flash = [0xffu8; 256];
        sample().encode(&mut flash).unwrap();
        assert_eq!(ChainRecord::decode(&flash), Err(BundleError::NoBundle));
        // Written in pieces, the same bytes.
        let mut pieces = [0xffu8; 128];
        let written = record
            .write(|at, bytes: &[u8]| {
                pieces[at..at + bytes.len()].copy_from_slice(bytes);
                Ok::<(), BundleError>(())
            })
            .unwrap();
        assert_eq!((written, &pieces[..]), (n, &slot[..]));
    }

    #[test]
    fn a_bundle_with_a_nonzero_state_byte_is_refused() {
        let mut flash = [0u8; 256];
        sample().encode(&mut flash).unwrap();
        flash[5] = 0xff;
        assert_eq!(Bundle::decode(&flash), Err(BundleError::ReservedNotZero));
    }
}
