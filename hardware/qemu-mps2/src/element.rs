//! A secure element for the device key, simulated, and the driver that
//! makes it the agent's [`DeviceKey`].
//!
//! Real parts (Microchip ATECC608, NXP SE050, Infineon OPTIGA Trust M)
//! sit on I2C and answer command frames; the private key is made or
//! written into a slot once, the slot is locked, and from then on the
//! key can be used but never read. The simulation keeps that shape so
//! the driver is the one a board would use with a real bus:
//!
//! - the element is reached only through [`Bus::transact`], byte frames
//!   in, byte frames out, as over I2C;
//! - `WRITE_KEY` puts a P-256 scalar in a slot once, before `LOCK`
//!   (the factory's personalization; a real element may instead make
//!   the key itself and export only the public key);
//! - after `LOCK`, `SIGN` signs a 32-byte digest with a slot's key and
//!   `PUBLIC` returns its public point; no command returns a scalar.
//!
//! The firmware's driver, [`ElementKey`], hashes the handshake transcript
//! with SHA-256 and sends the digest, as real elements want it.

use p256::ecdsa::{Signature, SigningKey};
use signature::hazmat::PrehashSigner;
use twofold_agent_nostd::DeviceKey;

/// Command codes of the simulated element's frames.
pub const WRITE_KEY: u8 = 0x01;
pub const LOCK: u8 = 0x02;
pub const SIGN: u8 = 0x03;
pub const PUBLIC: u8 = 0x04;

/// Status byte first in every answer.
pub const OK: u8 = 0x00;
pub const REFUSED: u8 = 0x0F;

const SLOTS: usize = 2;

/// What a transaction on the bus can do: one command frame in, one
/// answer frame out (its length returned). A board's I2C driver
/// implements this for the real part.
pub trait Bus {
    fn transact(&mut self, command: &[u8], answer: &mut [u8]) -> usize;
}

/// The simulated part: its key slots are private to it.
pub struct SimulatedElement {
    slots: [Option<SigningKey>; SLOTS],
    locked: bool,
}

impl SimulatedElement {
    pub const fn new() -> Self {
        SimulatedElement {
            slots: [None, None],
            locked: false,
        }
    }

    fn run(&mut self, command: &[u8], answer: &mut [u8]) -> Option<usize> {
        let (&code, rest) = command.split_first()?;
        let (&slot, rest) = rest.split_first()?;
        let slot = usize::from(slot);
        match code {
            WRITE_KEY if !self.locked && slot < SLOTS && self.slots[slot].is_none() => {
                self.slots[slot] = Some(SigningKey::from_slice(rest.get(..32)?).ok()?);
                answer[0] = OK;
                Some(1)
            }
            LOCK if !self.locked => {
                self.locked = true;
                answer[0] = OK;
                Some(1)
            }
            SIGN if self.locked => {
                let key = self.slots.get(slot)?.as_ref()?;
                let digest = rest.get(..32)?;
                let sig: Signature = key.sign_prehash(digest).ok()?;
                answer[0] = OK;
                answer.get_mut(1..65)?.copy_from_slice(&sig.to_bytes());
                Some(65)
            }
            PUBLIC if self.locked => {
                let key = self.slots.get(slot)?.as_ref()?;
                let point = key.verifying_key().to_encoded_point(false);
                answer[0] = OK;
                answer.get_mut(1..66)?.copy_from_slice(point.as_bytes());
                Some(66)
            }
            _ => None,
        }
    }
}

impl Bus for SimulatedElement {
    fn transact(&mut self, command: &[u8], answer: &mut [u8]) -> usize {
        match self.run(command, answer) {
            Some(n) => n,
            None => {
                answer[0] = REFUSED;
                1
            }
        }
    }
}

/// Writes `scalar` into `slot` and locks the element: the factory's
/// step, here at boot. False if the element refused (it was locked, or
/// the scalar is not a P-256 key).
pub fn personalize(bus: &mut impl Bus, slot: u8, scalar: &[u8]) -> bool {
    let mut frame = [0u8; 34];
    let mut answer = [0u8; 1];
    frame[0] = WRITE_KEY;
    frame[1] = slot;
    let Some(dst) = frame.get_mut(2..34) else {
        return false;
    };
    if scalar.len() != 32 {
        return false;
    }
    dst.copy_from_slice(scalar);
    let written = bus.transact(&frame, &mut answer) == 1 && answer[0] == OK;
    frame.fill(0);
    written && bus.transact(&[LOCK, 0], &mut answer) == 1 && answer[0] == OK
}

/// The device key in slot `slot` of the element on `bus`.
pub struct ElementKey<'b, B: Bus> {
    bus: &'b mut B,
    slot: u8,
}

impl<'b, B: Bus> ElementKey<'b, B> {
    pub fn new(bus: &'b mut B, slot: u8) -> Self {
        ElementKey { bus, slot }
    }

    /// The slot's public point (uncompressed, 65 bytes), to check it
    /// against the certificate before the first handshake.
    pub fn public(&mut self) -> Option<[u8; 65]> {
        let mut answer = [0u8; 66];
        let n = self.bus.transact(&[PUBLIC, self.slot], &mut answer);
        if n != 66 || answer[0] != OK {
            return None;
        }
        let mut point = [0u8; 65];
        point.copy_from_slice(&answer[1..]);
        Some(point)
    }
}

impl<B: Bus> DeviceKey for ElementKey<'_, B> {
    fn sign(&mut self, message: &[u8]) -> Result<Signature, signature::Error> {
        use sha2::Digest;
        let mut frame = [0u8; 34];
        frame[0] = SIGN;
        frame[1] = self.slot;
        frame[2..].copy_from_slice(&sha2::Sha256::digest(message));
        let mut answer = [0u8; 65];
        if self.bus.transact(&frame, &mut answer) != 65 || answer[0] != OK {
            return Err(signature::Error::new());
        }
        Signature::from_slice(&answer[1..]).map_err(|_| signature::Error::new())
    }
}
