//! Renewing the device's certificate over its own session, with the key
//! it already has (renew, not rekey: no CSR encoder on the device).
//!
//! 1. After CONNACK the device subscribes to the gateway's certificate
//!    status; the answer says in how many seconds renewal is due, counted
//!    down on the monotonic [`Timer`](crate::Timer): no wall clock needed.
//! 2. When it is due, the device publishes a renew request with an id it
//!    keeps until answered, so a request cut off by a dropped connection
//!    gets the same certificate when it is asked again.
//! 3. The new chain is written, *staged*, to the free one of two
//!    [`ChainSlots`] beside the bundle, read back, and the session ends.
//! 4. The next handshake presents the staged certificate. When the
//!    gateway accepts it, the device publishes a commit and, once the CA
//!    answers, marks the slot committed (one byte, no erase). When the
//!    gateway refuses it, the device erases the slot and goes back to the
//!    chain it had: a bad renewal never strands a device.
//!
//! The status also carries the gateway's time, authenticated by the TLS
//! session: the device keeps it, plus the monotonic time since, as a floor
//! for checking that the gateway's certificate has not expired on the next
//! connection ([`StrictVerifier::with_floor`](crate::StrictVerifier::with_floor)).

use core::fmt;

use twofold_protocol::message::{self, CertAnswer, CertStatus, RenewRefusal, RenewRequest};
use twofold_protocol::{Bundle, ChainRecord, ChainState};

use crate::x509;

/// The two chain slots of the bundle partition: NOR flash, or anything
/// that behaves like it (bits are cleared by programming, set by erasing).
pub trait ChainSlots {
    /// False for a device that does not renew: it then never asks.
    fn enabled(&self) -> bool {
        true
    }
    /// The bytes of slot `i` (0 or 1), read in place.
    fn slot(&self, i: usize) -> &[u8];
    /// Erases slot `i`: every byte `0xFF`.
    fn erase(&mut self, i: usize) -> Result<(), SlotError>;
    /// Programs `bytes` at `offset` of slot `i`.
    fn program(&mut self, i: usize, offset: usize, bytes: &[u8]) -> Result<(), SlotError>;
}

impl<S: ChainSlots> ChainSlots for &mut S {
    fn enabled(&self) -> bool {
        (**self).enabled()
    }
    fn slot(&self, i: usize) -> &[u8] {
        (**self).slot(i)
    }
    fn erase(&mut self, i: usize) -> Result<(), SlotError> {
        (**self).erase(i)
    }
    fn program(&mut self, i: usize, offset: usize, bytes: &[u8]) -> Result<(), SlotError> {
        (**self).program(i, offset, bytes)
    }
}

/// `None`: no renewal, as [`NoSlots`].
impl<S: ChainSlots> ChainSlots for Option<S> {
    fn enabled(&self) -> bool {
        self.as_ref().is_some_and(S::enabled)
    }
    fn slot(&self, i: usize) -> &[u8] {
        self.as_ref().map_or(&[], |s| s.slot(i))
    }
    fn erase(&mut self, i: usize) -> Result<(), SlotError> {
        self.as_mut().ok_or(SlotError)?.erase(i)
    }
    fn program(&mut self, i: usize, offset: usize, bytes: &[u8]) -> Result<(), SlotError> {
        self.as_mut().ok_or(SlotError)?.program(i, offset, bytes)
    }
}

/// A flash operation failed, or the slot is too small.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotError;

impl From<twofold_protocol::BundleError> for SlotError {
    fn from(_: twofold_protocol::BundleError) -> Self {
        SlotError
    }
}

/// No slots: the device keeps the bundle's certificate until it is
/// re-enrolled.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSlots;

impl ChainSlots for NoSlots {
    fn enabled(&self) -> bool {
        false
    }
    fn slot(&self, _: usize) -> &[u8] {
        &[]
    }
    fn erase(&mut self, _: usize) -> Result<(), SlotError> {
        Err(SlotError)
    }
    fn program(&mut self, _: usize, _: usize, _: &[u8]) -> Result<(), SlotError> {
        Err(SlotError)
    }
}

/// Which slots hold what: the committed chain in use (the newest), and a
/// staged one newer than it. `None` for the committed one means the
/// bundle's own chain (generation 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Chains {
    active: Option<(usize, u32)>,
    staged: Option<(usize, u32)>,
}

impl Chains {
    /// Reads both slots. Damaged or older records are ignored (and
    /// overwritten by the next renewal).
    pub fn scan<S: ChainSlots>(slots: &S) -> Self {
        let mut chains = Chains::default();
        if !slots.enabled() {
            return chains;
        }
        let mut staged = None;
        for i in 0..2 {
            match ChainRecord::decode(slots.slot(i)) {
                Ok((r, ChainState::Committed)) if chains.generation() < r.generation => {
                    chains.active = Some((i, r.generation));
                }
                Ok((r, ChainState::Staged)) if staged.is_none_or(|(_, g)| g < r.generation) => {
                    staged = Some((i, r.generation));
                }
                _ => {}
            }
        }
        chains.staged = staged.filter(|&(_, g)| g > chains.generation());
        chains
    }

    /// The generation of the committed chain (0: the bundle's).
    pub fn generation(&self) -> u32 {
        self.active.map_or(0, |(_, g)| g)
    }

    /// A staged chain waits to be proven.
    pub fn staged(&self) -> bool {
        self.staged.is_some()
    }

    /// The leaf certificate the next handshake presents: the staged one
    /// if there is one, else the committed one.
    pub fn leaf<'s>(&self, bundle: &Bundle<'s>, slots: &'s impl ChainSlots) -> &'s [u8] {
        for (i, _) in [self.staged, self.active].into_iter().flatten() {
            if let Ok((record, _)) = ChainRecord::decode(slots.slot(i)) {
                return record.leaf();
            }
        }
        bundle.leaf()
    }

    /// The slot a new chain goes to: never the committed one.
    fn free(&self) -> usize {
        match self.active {
            Some((0, _)) => 1,
            _ => 0,
        }
    }
}

/// What renewal did, for the device's log.
#[derive(Debug, Clone, Copy)]
pub enum RenewEvent<'a> {
    /// The gateway's status: renewal due in `renew_in` seconds.
    Status {
        renew_in: u64,
        expires_in: u64,
    },
    /// The gateway does not offer renewal (it refused the subscription).
    Unavailable,
    Asked {
        generation: u32,
    },
    /// A new chain is staged; the session ends to try it.
    Staged {
        generation: u32,
    },
    /// The issued certificate is unusable; nothing was written.
    BadCertificate(&'static str),
    Refused {
        code: RenewRefusal,
        retry_after: u32,
        reason: &'a str,
    },
    Committed {
        generation: u32,
    },
    /// The gateway refused the staged certificate: back to the last one.
    RolledBack {
        generation: u32,
    },
    /// Writing the slot failed.
    Flash,
}

impl fmt::Display for RenewEvent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Short: every byte of these strings is flash.
        match self {
            RenewEvent::Status {
                renew_in,
                expires_in,
            } => write!(f, "renewal due in {renew_in} s, expiry in {expires_in} s"),
            RenewEvent::Unavailable => f.write_str("the gateway offers no renewal"),
            RenewEvent::Asked { generation } => write!(f, "asking for certificate {generation}"),
            RenewEvent::Staged { generation } => {
                write!(f, "certificate {generation} staged; reconnecting")
            }
            RenewEvent::BadCertificate(why) => write!(f, "renewal unusable: {why}"),
            RenewEvent::Refused {
                code,
                retry_after,
                reason,
            } => write!(
                f,
                "renewal refused ({}): {reason}; retry in {retry_after} s",
                *code as u8
            ),
            RenewEvent::Committed { generation } => {
                write!(f, "certificate {generation} committed")
            }
            RenewEvent::RolledBack { generation } => {
                write!(f, "gateway refused certificate {generation}; rolled back")
            }
            RenewEvent::Flash => f.write_str("chain slot write failed"),
        }
    }
}

/// How long an unanswered request waits before it is asked again (the
/// gateway gives up on the CA after 15 s).
const ANSWER_MS: u64 = 30_000;
/// When a refusal names no retry time and renewal may still be asked.
const LATER_MS: u64 = 3_600_000;

/// A request id: `g<generation, 8 hex>-<boot nonce, 8 hex>`.
type RequestId = heapless::String<18>;

/// Written by hand: core's integer formatting costs flash.
fn request_id(generation: u32, nonce: u32) -> RequestId {
    let mut id = RequestId::new();
    for (lead, n) in [('g', generation), ('-', nonce)] {
        let _ = id.push(lead);
        for shift in (0..8).rev() {
            let digit = (n >> (shift * 4)) & 0xf;
            let _ = id.push(char::from(b"0123456789abcdef"[digit as usize]));
        }
    }
    id
}

/// Renewal state across sessions (RAM: a reset forgets a pending request,
/// and a new id makes the CA discard what it issued for the old one).
pub(crate) struct Renewal {
    pub chains: Chains,
    pub nonce: u32,
    /// Monotonic ms at which to ask; `None` until a status says.
    due: Option<u64>,
    /// The request being asked.
    id: Option<RequestId>,
    /// When it was last sent, this session.
    asked: Option<u64>,
    /// The gateway's authenticated time: Unix seconds, and the monotonic
    /// ms at which it arrived.
    floor: Option<(u64, u64)>,
    /// This session presented the staged chain.
    pub trying: bool,
    /// The commit went out this session.
    committing: bool,
    /// A chain was staged this session: end it to try the chain.
    pub staged_now: bool,
    /// The status subscription was granted this session.
    pub offered: bool,
}

impl Renewal {
    pub fn new(chains: Chains, nonce: u32) -> Self {
        Renewal {
            chains,
            nonce,
            due: None,
            id: None,
            asked: None,
            floor: None,
            trying: false,
            committing: false,
            staged_now: false,
            offered: false,
        }
    }

    /// A session starts: it presents the staged chain if there is one.
    pub fn start(&mut self) {
        self.trying = self.chains.staged();
        self.committing = false;
        self.staged_now = false;
        self.offered = false;
        self.asked = None;
    }

    /// The time floor at `now_ms`: the gateway's last time plus the
    /// monotonic seconds since.
    pub fn floor(&self, now_ms: u64) -> Option<u64> {
        self.floor
            .map(|(unix, at)| unix.saturating_add(now_ms.saturating_sub(at) / 1000))
    }

    /// The handshake with the staged chain was refused: erase it.
    #[inline(never)]
    pub fn roll_back<S: ChainSlots>(&mut self, slots: &mut S) -> Option<RenewEvent<'static>> {
        let (i, generation) = self.chains.staged.filter(|_| self.trying)?;
        self.trying = false;
        // An erase that fails leaves a record scan() would pick again;
        // say so rather than loop on it silently.
        let erased = slots.erase(i);
        self.chains = Chains::scan(slots);
        self.id = None;
        Some(match erased {
            Ok(()) if !self.chains.staged() => RenewEvent::RolledBack { generation },
            _ => RenewEvent::Flash,
        })
    }

    /// When the session next has something to do here.
    pub fn wake(&self) -> Option<u64> {
        if !self.offered || self.staged_now || (self.trying && self.committing) {
            return None;
        }
        if self.trying {
            return Some(0);
        }
        match self.asked {
            Some(at) => Some(at + ANSWER_MS),
            None => self.due,
        }
    }

    /// Encodes what is due now into `tx`: the commit of a chain this
    /// session proved, or a renew request.
    #[inline(never)]
    pub fn poll(&mut self, now: u64, tx: &mut [u8]) -> Result<Option<usize>, crate::Error> {
        if self.wake().is_none_or(|w| now < w) || self.staged_now {
            return Ok(None);
        }
        if self.trying {
            self.committing = true;
            return encode(twofold_protocol::topic::CERT_COMMIT, &[], tx).map(Some);
        }
        let generation = self.chains.generation() + 1;
        let nonce = self.nonce;
        let id = self.id.get_or_insert_with(|| request_id(generation, nonce));
        let request = RenewRequest {
            request_id: id.as_str(),
            csr: None,
        };
        let mut payload = [0u8; 32];
        let payload = message::encode(&request, &mut payload)
            .map_err(|_| crate::Error::Unexpected("renew request too large"))?;
        self.asked = Some(now);
        encode(twofold_protocol::topic::CERT_RENEW, payload, tx).map(Some)
    }

    /// Asked: the generation the request is for.
    pub fn asking(&self) -> u32 {
        self.chains.generation() + 1
    }

    /// A PUBLISH on the status topic.
    #[inline(never)]
    pub fn status(&mut self, payload: &[u8], now: u64) -> Option<RenewEvent<'static>> {
        let status = message::decode::<CertStatus>(payload).ok()?;
        self.floor = Some((status.now, now));
        self.due = Some(now.saturating_add(status.renew_in.saturating_mul(1000)));
        Some(RenewEvent::Status {
            renew_in: status.renew_in,
            expires_in: status.expires_in,
        })
    }

    /// A PUBLISH on the answer topic.
    #[inline(never)]
    pub fn answer<'p, S: ChainSlots>(
        &mut self,
        payload: &'p [u8],
        now: u64,
        bundle: &Bundle<'_>,
        slots: &mut S,
    ) -> Option<RenewEvent<'p>> {
        let answer = message::decode::<CertAnswer>(payload).ok()?;
        match answer {
            CertAnswer::Committed { .. } if self.trying && self.committing => {
                let (i, generation) = self.chains.staged?;
                let done = slots.program(i, ChainRecord::STATE_OFFSET, &[ChainRecord::COMMITTED]);
                self.chains = Chains::scan(slots);
                self.trying = false;
                self.committing = false;
                Some(match done {
                    Ok(()) if self.chains.generation() == generation => {
                        RenewEvent::Committed { generation }
                    }
                    _ => RenewEvent::Flash,
                })
            }
            CertAnswer::Issued { request_id, certs }
                if self.id.as_deref() == Some(request_id) && !self.trying =>
            {
                self.asked = None;
                let generation = self.chains.generation() + 1;
                if let Err(why) = usable(certs, self.chains.leaf(bundle, &*slots)) {
                    // Asking again gets the same answer: wait for the
                    // next session's status.
                    self.due = None;
                    self.id = None;
                    return Some(RenewEvent::BadCertificate(why));
                }
                Some(match self.stage(certs, generation, slots) {
                    Ok(()) => {
                        self.id = None;
                        self.staged_now = true;
                        RenewEvent::Staged { generation }
                    }
                    Err(SlotError) => {
                        self.due = Some(now + LATER_MS);
                        RenewEvent::Flash
                    }
                })
            }
            CertAnswer::Refused {
                code,
                retry_after,
                reason,
                ..
            } => {
                self.asked = None;
                self.committing = false;
                let later = match code {
                    _ if retry_after > 0 => Some(now + u64::from(retry_after) * 1000),
                    // Asking again cannot help; a new status (next
                    // session) decides.
                    RenewRefusal::Revoked | RenewRefusal::Expired | RenewRefusal::NotLatest => None,
                    _ => Some(now + LATER_MS),
                };
                if self.trying {
                    // A commit refused: the next session tries again.
                    self.offered = false;
                } else {
                    self.due = later;
                }
                Some(RenewEvent::Refused {
                    code,
                    retry_after,
                    reason,
                })
            }
            // An answer to something this session did not ask.
            _ => None,
        }
    }

    /// Writes `certs` (leaf DER then CA DER) as a staged record of
    /// `generation` to the free slot and reads it back.
    #[inline(never)]
    fn stage<S: ChainSlots>(
        &mut self,
        certs: &[u8],
        generation: u32,
        slots: &mut S,
    ) -> Result<(), SlotError> {
        let (leaf, ca) = x509::split_first(certs).map_err(|_| SlotError)?;
        let mut chain = heapless::Vec::new();
        let _ = chain.push(leaf);
        if !ca.is_empty() {
            let _ = chain.push(ca);
        }
        let record = ChainRecord { generation, chain };
        let i = self.chains.free();
        slots.erase(i)?;
        record
            .write(|offset, bytes| slots.program(i, offset, bytes))
            .map_err(|_| SlotError)?;
        self.chains = Chains::scan(slots);
        match self.chains.staged {
            Some((j, g)) if (j, g) == (i, generation) => Ok(()),
            _ => Err(SlotError),
        }
    }
}

/// The checks a device can make of its new certificate without a clock:
/// it is a certificate, for the key it holds, with the subject and issuer
/// it has now (the CA decides the rest, and the next handshake proves it).
fn usable(certs: &[u8], current: &[u8]) -> Result<(), &'static str> {
    let (leaf, ca) = x509::split_first(certs).map_err(|_| "not DER")?;
    if !ca.is_empty() && x509::split_first(ca).is_err() {
        return Err("not DER");
    }
    let new = x509::parse(leaf).map_err(|_| "not X.509")?;
    let old = x509::parse(current).map_err(|_| "not X.509")?;
    if new.public_key != old.public_key {
        return Err("another key");
    }
    if new.subject != old.subject {
        return Err("another subject");
    }
    if new.issuer != old.issuer {
        return Err("another CA");
    }
    Ok(())
}

/// A QoS 0 PUBLISH of `payload` on `topic` into `tx`.
fn encode(topic: &str, payload: &[u8], tx: &mut [u8]) -> Result<usize, crate::Error> {
    let publish = crate::mqtt::Outbound::Publish {
        pid: None,
        topic,
        payload,
    };
    Ok(crate::mqtt::encode(publish, tx)?)
}
