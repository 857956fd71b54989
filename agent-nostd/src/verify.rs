//! The strict server verifier: what a device checks before it believes it
//! is talking to its gateway.
//!
//! embedded-tls's own `rustpki` verifier checks signatures, the host name
//! and (with a clock) dates, but not what a certificate is *for*: it
//! accepts a server certificate signed by any certificate that chains to
//! the anchor, including a device's own leaf, so one extracted device key
//! could impersonate the gateway to the whole fleet. This verifier checks,
//! for the chain the server sends:
//!
//! - every certificate parses, uses P-256 keys and ECDSA-SHA256 signatures,
//!   and carries no critical extension it does not understand;
//! - the leaf has extendedKeyUsage serverAuth, is not a CA, and names the
//!   configured server (a subjectAltName DNS name, or IP address when the
//!   server name is an address; the CN is never used);
//! - every issuer, intermediates and the anchor, has basicConstraints
//!   cA=TRUE, its subject equals the issuer name of the certificate below
//!   it, its key verifies that certificate's signature, and no more CA
//!   certificates stand below it than its pathLenConstraint allows (the
//!   server CA's 0 means the gateway's certificate comes straight from it);
//! - the chain ends at the single server CA from the bundle (a copy of the
//!   anchor sent by the server is accepted and ignored);
//! - with a clock, every certificate in the chain, the anchor included, is
//!   within its validity period.
//!
//! **Without a clock** (`NoClock`) dates are not checked on the first
//! connection after a reset: an expired or not-yet-valid gateway
//! certificate is accepted if everything else holds. After one session
//! with a device that renews ([`crate::renew`]), the gateway's
//! authenticated time plus the monotonic time since is a floor: a gateway
//! certificate that expired before it is refused ([`StrictVerifier::with_floor`]).
//! With short-lived gateway certificates, that bounds how long a stolen
//! gateway key can fool a device that cannot read a CRL. Revocation lists
//! are never checked on the device.
//!
//! When it refuses, embedded-tls only reports `InvalidCertificate`; the
//! precise [`Refusal`] is kept here for the device's log, and the session
//! tells the server with the TLS alert [`Refusal::alert`] names.

use embedded_tls::alert::AlertDescription;
use embedded_tls::{
    CertificateEntryRef, CertificateRef, CertificateVerifyRef, SignatureScheme, TlsCipherSuite,
    TlsError, TlsVerifier,
};
use p256::ecdsa::VerifyingKey;
use p256::ecdsa::signature::Verifier;
use sha2::Digest;

use crate::link::Gate;
use crate::x509::{self, AltName, Cert, X509Error};

/// At most this many certificates from the server.
pub const MAX_CHAIN: usize = 4;

/// A source of the current time, in Unix seconds.
pub trait Clock {
    /// `None` when the time is not known (yet): dates are then not checked.
    fn now(&mut self) -> Option<u64>;
}

impl<C: Clock> Clock for &mut C {
    fn now(&mut self) -> Option<u64> {
        (**self).now()
    }
}

/// No clock: dates are never checked (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoClock;

impl Clock for NoClock {
    fn now(&mut self) -> Option<u64> {
        None
    }
}

/// Which check refused the server, and for which certificate (`depth` 0 is
/// the server's own, counting up towards the anchor; the anchor is
/// `depth == chain length`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The server sent no certificate, a raw public key, or more than [`MAX_CHAIN`].
    BadChainShape,
    /// The server finished its part of the handshake without a
    /// Certificate (or sent CertificateVerify without one).
    NoCertificate,
    /// The server finished its part of the handshake without a
    /// CertificateVerify: it did not prove it holds its certificate's key.
    NoCertificateVerify,
    /// A certificate could not be read or uses something unsupported.
    Unreadable { depth: u8, error: X509Error },
    /// A certificate's key is not a P-256 key (the device speaks nothing else).
    KeyNotP256 { depth: u8 },
    /// The server's certificate lacks extendedKeyUsage serverAuth.
    NotServerAuth,
    /// The server's certificate is itself a CA certificate.
    LeafIsCa,
    /// The server's certificate does not name the configured server.
    WrongName,
    /// An issuer lacks basicConstraints cA=TRUE (e.g. a device certificate).
    IssuerNotCa { depth: u8 },
    /// An issuer's subject is not the issuer name of the certificate below it.
    IssuerNameMismatch { depth: u8 },
    /// More CA certificates stand below this issuer than its
    /// pathLenConstraint allows (e.g. a sub-CA under a server CA with
    /// pathLen 0).
    PathLenExceeded { depth: u8 },
    /// The signature on a certificate does not verify with its issuer's key.
    BadSignature { depth: u8 },
    /// The chain does not end at the server CA from the bundle: the server
    /// is from another PKI (or an impostor).
    NotOurCa,
    /// Past its notAfter.
    Expired { depth: u8 },
    /// Before its notBefore.
    NotYetValid { depth: u8 },
    /// The handshake signature (CertificateVerify) is not the server key's.
    BadHandshakeSignature,
}

impl core::fmt::Display for Refusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let (what, depth) = match *self {
            Refusal::BadChainShape => ("no usable certificate chain", None),
            Refusal::NoCertificate => ("the server sent no certificate", None),
            Refusal::NoCertificateVerify => (
                "the server did not prove it holds its key (no CertificateVerify)",
                None,
            ),
            Refusal::Unreadable { depth, error } => {
                return write!(f, "certificate {depth} unreadable: {}", error.as_str());
            }
            Refusal::KeyNotP256 { depth } => ("not a P-256 key", Some(depth)),
            Refusal::NotServerAuth => ("the server certificate lacks serverAuth", None),
            Refusal::LeafIsCa => ("the server certificate is a CA certificate", None),
            Refusal::WrongName => ("the server certificate does not name the gateway", None),
            Refusal::IssuerNotCa { depth } => ("an issuer is not a CA", Some(depth)),
            Refusal::IssuerNameMismatch { depth } => ("issuer name mismatch", Some(depth)),
            Refusal::PathLenExceeded { depth } => (
                "chain longer than the issuer's path length constraint allows",
                Some(depth),
            ),
            Refusal::BadSignature { depth } => ("bad signature", Some(depth)),
            Refusal::NotOurCa => ("not issued by the server CA in the bundle", None),
            Refusal::Expired { depth } => ("expired", Some(depth)),
            Refusal::NotYetValid { depth } => ("not yet valid", Some(depth)),
            Refusal::BadHandshakeSignature => ("bad CertificateVerify signature", None),
        };
        f.write_str(what)?;
        match depth {
            Some(depth) => write!(f, " (certificate {depth}; 0 is the server's)"),
            None => Ok(()),
        }
    }
}

impl Refusal {
    /// The TLS alert that tells the server why (RFC 8446 6.2; as rustls
    /// and OpenSSL name these reasons), so the gateway can record it.
    pub fn alert(self) -> AlertDescription {
        match self {
            // Its Finished came where Certificate or CertificateVerify had to.
            Refusal::NoCertificate | Refusal::NoCertificateVerify => {
                AlertDescription::UnexpectedMessage
            }
            Refusal::Unreadable {
                error: X509Error::Malformed,
                ..
            } => AlertDescription::BadCertificate,
            Refusal::Unreadable { .. } | Refusal::KeyNotP256 { .. } | Refusal::NotServerAuth => {
                AlertDescription::UnsupportedCertificate
            }
            Refusal::BadChainShape
            | Refusal::LeafIsCa
            | Refusal::WrongName
            | Refusal::PathLenExceeded { .. }
            | Refusal::BadSignature { .. } => AlertDescription::BadCertificate,
            Refusal::IssuerNotCa { .. }
            | Refusal::IssuerNameMismatch { .. }
            | Refusal::NotOurCa => AlertDescription::UnknownCa,
            Refusal::Expired { .. } | Refusal::NotYetValid { .. } => {
                AlertDescription::CertificateExpired
            }
            Refusal::BadHandshakeSignature => AlertDescription::DecryptError,
        }
    }
}

/// The verifier; one per connection attempt.
pub struct StrictVerifier<'a, C: Clock> {
    server_ca: &'a [u8],
    server_name: &'a str,
    clock: C,
    /// The server's key, kept for CertificateVerify.
    leaf_key: Option<VerifyingKey>,
    /// The transcript hash up to the server's Certificate.
    transcript: heapless::Vec<u8, 48>,
    refusal: Option<Refusal>,
    verified: bool,
    /// A time (Unix seconds) known to have passed: see [`Self::with_floor`].
    floor: Option<u64>,
    /// Opened once the server has proven itself.
    gate: Option<&'a Gate>,
}

impl<'a, C: Clock> StrictVerifier<'a, C> {
    /// Trusts only `server_ca` (DER) for `server_name` (DNS name or IP
    /// address).
    pub fn new(server_ca: &'a [u8], server_name: &'a str, clock: C) -> Self {
        StrictVerifier {
            server_ca,
            server_name,
            clock,
            leaf_key: None,
            transcript: heapless::Vec::new(),
            refusal: None,
            verified: false,
            floor: None,
            gate: None,
        }
    }

    /// A time known to have passed: the gateway's authenticated time at
    /// its last session plus the monotonic time since ([`crate::renew`]).
    /// A certificate that expired before it is refused even without a
    /// clock, or with a clock that is behind. Only expiry is checked
    /// against it: a floor says nothing about `notBefore`.
    pub fn with_floor(mut self, floor: Option<u64>) -> Self {
        self.floor = floor;
        self
    }

    /// Opens `gate` (the link's) once the chain and the CertificateVerify
    /// signature have both been verified, and not before.
    pub fn opening(mut self, gate: &'a Gate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Why the last handshake's server was refused, if it was.
    pub fn refusal(&self) -> Option<Refusal> {
        self.refusal
    }

    /// True once a certificate chain and the handshake signature both
    /// passed. A connection must not be used unless this holds.
    pub fn verified(&self) -> bool {
        self.verified
    }

    /// What the server has left out, when it has not proven itself and no
    /// check refused it: its certificate, or the CertificateVerify for the
    /// certificate it sent.
    pub fn unproven(&self) -> Refusal {
        if self.leaf_key.is_some() {
            Refusal::NoCertificateVerify
        } else {
            Refusal::NoCertificate
        }
    }

    fn refuse(&mut self, why: Refusal) -> TlsError {
        self.refusal = Some(why);
        TlsError::InvalidCertificate
    }

    /// Checks `chain` (the server's certificates, leaf first, DER) and
    /// returns the server's key.
    pub fn check_chain(&mut self, chain: &[&[u8]]) -> Result<VerifyingKey, Refusal> {
        // The server may send the anchor too; it adds nothing.
        let mut n = chain.len();
        while n > 1 && chain[n - 1] == self.server_ca {
            n -= 1;
        }
        if n == 0 || n > MAX_CHAIN {
            return Err(Refusal::BadChainShape);
        }
        let now = self.clock.now();
        let anchor = x509::parse(self.server_ca).map_err(|e| unreadable(n, e))?;
        let mut certs: heapless::Vec<Cert<'_>, MAX_CHAIN> = heapless::Vec::new();
        for (depth, der) in chain[..n].iter().enumerate() {
            let cert = x509::parse(der).map_err(|e| unreadable(depth, e))?;
            // Cannot fail: n <= MAX_CHAIN.
            let _ = certs.push(cert);
        }

        let leaf = &certs[0];
        if !leaf.server_auth {
            return Err(Refusal::NotServerAuth);
        }
        if leaf.is_ca == Some(true) {
            return Err(Refusal::LeafIsCa);
        }
        let named = match leaf.san {
            Some(san) => names_server(san, self.server_name)
                .map_err(|error| Refusal::Unreadable { depth: 0, error })?,
            None => false,
        };
        if !named {
            return Err(Refusal::WrongName);
        }

        for depth in 0..=n {
            let cert: Cert<'_> = if depth < n { certs[depth] } else { anchor };
            if let Some(now) = now
                && now < cert.not_before
            {
                return Err(Refusal::NotYetValid { depth: depth as u8 });
            }
            if now.max(self.floor).is_some_and(|t| t > cert.not_after) {
                return Err(Refusal::Expired { depth: depth as u8 });
            }
            if depth == 0 {
                continue;
            }
            // `cert` issued the one below it.
            let issued = &certs[depth - 1];
            let below = (depth - 1) as u8;
            if cert.is_ca != Some(true) {
                return Err(Refusal::IssuerNotCa { depth: depth as u8 });
            }
            let at_anchor = depth == n;
            if cert.subject != issued.issuer {
                return Err(if at_anchor {
                    Refusal::NotOurCa
                } else {
                    Refusal::IssuerNameMismatch { depth: below }
                });
            }
            let key = VerifyingKey::from_sec1_bytes(cert.public_key)
                .map_err(|_| Refusal::KeyNotP256 { depth: depth as u8 })?;
            let signature = x509::ecdsa_signature(issued.signature)
                .ok_or(Refusal::BadSignature { depth: below })?;
            if key.verify(issued.tbs, &signature).is_err() {
                return Err(if at_anchor {
                    Refusal::NotOurCa
                } else {
                    Refusal::BadSignature { depth: below }
                });
            }
            // Below `cert`, now known to be the issuer: depth - 1 CA
            // certificates, then the leaf.
            if cert
                .path_len
                .is_some_and(|max| usize::from(max) < depth - 1)
            {
                return Err(Refusal::PathLenExceeded { depth: depth as u8 });
            }
        }
        VerifyingKey::from_sec1_bytes(leaf.public_key).map_err(|_| Refusal::KeyNotP256 { depth: 0 })
    }
}

/// Why the certificate at `depth` could not be used; a key of another
/// kind gets its own refusal, as it is a choice of the PKI, not damage.
fn unreadable(depth: usize, error: X509Error) -> Refusal {
    let depth = depth as u8;
    match error {
        X509Error::UnsupportedKey => Refusal::KeyNotP256 { depth },
        error => Refusal::Unreadable { depth, error },
    }
}

/// Whether the subjectAltName `san` names `server`: as an IP address entry
/// when `server` is an address, else as a DNS entry (ASCII case-insensitive,
/// a `*` only as the whole left-most label of a name with three or more
/// labels, matching exactly one label).
pub fn names_server(san: &[u8], server: &str) -> Result<bool, X509Error> {
    let mut ip = [0u8; 16];
    let ip = parse_ip(server, &mut ip);
    x509::any_alt_name(san, |name| match (name, ip) {
        (AltName::Ip(bytes), Some(ip)) => bytes == ip,
        (AltName::Dns(pattern), None) => dns_matches(pattern, server.as_bytes()),
        _ => false,
    })
}

/// Whether `name` is an IPv4 or IPv6 address rather than a host name.
pub fn is_ip_address(name: &str) -> bool {
    parse_ip(name, &mut [0; 16]).is_some()
}

/// `text` as an IPv4 address (four decimal parts, no leading zeros) or an
/// IPv6 address (hex groups, at most one `::`; no embedded IPv4 part).
///
/// Written here rather than using `core::net`'s parser, which costs about
/// 1.5 KB of the firmware's flash for the generality of `IpAddr::from_str`.
fn parse_ip<'b>(text: &str, out: &'b mut [u8; 16]) -> Option<&'b [u8]> {
    if text.contains(':') {
        let (head, tail) = match text.split_once("::") {
            Some((head, tail)) => (head, Some(tail)),
            None => (text, None),
        };
        let mut groups = [0u16; 8];
        let n = hex_groups(head, &mut groups)?;
        let filled = match tail {
            None if n == 8 => 8,
            Some(tail) if n < 8 => {
                let mut back = [0u16; 8];
                let m = hex_groups(tail, &mut back[..7 - n])?;
                groups[8 - m..].copy_from_slice(&back[..m]);
                8
            }
            _ => return None,
        };
        for (i, g) in groups[..filled].iter().enumerate() {
            out[2 * i..2 * i + 2].copy_from_slice(&g.to_be_bytes());
        }
        return Some(&out[..16]);
    }
    let mut parts = text.split('.');
    for byte in out[..4].iter_mut() {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || (part.len() > 1 && part.starts_with('0')) {
            return None;
        }
        let n = part.bytes().try_fold(0u16, |n, c| {
            c.is_ascii_digit().then(|| n * 10 + (c - b'0') as u16)
        })?;
        *byte = u8::try_from(n).ok()?;
    }
    parts.next().is_none().then_some(&out[..4])
}

/// Colon-separated groups of 1–4 hex digits into `groups`; how many there
/// were (an empty `text` is none).
fn hex_groups(text: &str, groups: &mut [u16]) -> Option<usize> {
    if text.is_empty() {
        return Some(0);
    }
    let mut n = 0;
    for part in text.split(':') {
        if part.is_empty() || part.len() > 4 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        *groups.get_mut(n)? = u16::from_str_radix(part, 16).ok()?;
        n += 1;
    }
    Some(n)
}

fn dns_matches(pattern: &[u8], host: &[u8]) -> bool {
    if let Some(rest) = pattern.strip_prefix(b"*.") {
        let labels = rest.iter().filter(|&&b| b == b'.').count() + 1;
        if labels < 2 || rest.contains(&b'*') {
            return false;
        }
        return match host.iter().position(|&b| b == b'.') {
            Some(dot) if dot > 0 => host[dot + 1..].eq_ignore_ascii_case(rest),
            _ => false,
        };
    }
    !pattern.contains(&b'*') && pattern.eq_ignore_ascii_case(host)
}

impl<CS: TlsCipherSuite, C: Clock> TlsVerifier<CS> for StrictVerifier<'_, C> {
    fn set_hostname_verification(&mut self, hostname: &str) -> Result<(), TlsError> {
        // The name to check comes from the bundle; the TLS config's (the
        // SNI) must be the same, or the configuration is wrong.
        if hostname != self.server_name {
            return Err(self.refuse(Refusal::WrongName));
        }
        Ok(())
    }

    fn verify_certificate(
        &mut self,
        transcript: &CS::Hash,
        cert: CertificateRef<'_>,
    ) -> Result<(), TlsError> {
        self.verified = false;
        self.leaf_key = None;
        let mut chain: heapless::Vec<&[u8], { MAX_CHAIN + 1 }> = heapless::Vec::new();
        for entry in &cert.entries {
            let CertificateEntryRef::X509(der) = entry else {
                return Err(self.refuse(Refusal::BadChainShape));
            };
            if chain.push(der).is_err() {
                return Err(self.refuse(Refusal::BadChainShape));
            }
        }
        match self.check_chain(&chain) {
            Ok(key) => {
                self.leaf_key = Some(key);
                self.transcript.clear();
                let hash = transcript.clone().finalize();
                self.transcript
                    .extend_from_slice(&hash)
                    .map_err(|_| TlsError::EncodeError)?;
                Ok(())
            }
            Err(why) => Err(self.refuse(why)),
        }
    }

    fn verify_signature(&mut self, verify: CertificateVerifyRef<'_>) -> Result<(), TlsError> {
        let Some(key) = self.leaf_key.take() else {
            return Err(self.refuse(Refusal::NoCertificate));
        };
        if verify.signature_scheme != SignatureScheme::EcdsaSecp256r1Sha256 {
            return Err(self.refuse(Refusal::BadHandshakeSignature));
        }
        // RFC 8446 4.4.3: 64 spaces, the context string, a zero byte, the
        // transcript hash.
        let mut message: heapless::Vec<u8, 146> = heapless::Vec::new();
        let _ = message.resize(64, b' ');
        let _ = message.extend_from_slice(b"TLS 1.3, server CertificateVerify\0");
        if message.extend_from_slice(&self.transcript).is_err() {
            return Err(TlsError::EncodeError);
        }
        let ok = x509::ecdsa_signature(verify.signature)
            .is_some_and(|signature| key.verify(&message, &signature).is_ok());
        if !ok {
            return Err(self.refuse(Refusal::BadHandshakeSignature));
        }
        self.verified = true;
        if let Some(gate) = self.gate {
            gate.open();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_match_strictly() {
        assert!(dns_matches(b"gw.example.com", b"GW.example.com"));
        assert!(dns_matches(b"*.example.com", b"gw.example.com"));
        assert!(!dns_matches(b"*.example.com", b"a.gw.example.com"));
        assert!(!dns_matches(b"*.example.com", b"example.com"));
        assert!(!dns_matches(b"*.com", b"example.com"));
        assert!(!dns_matches(b"g*.example.com", b"gw.example.com"));
        assert!(!dns_matches(b"gw.example.com", b"gw.example.com.evil"));
    }

    #[test]
    fn ip_addresses_parse_like_core_net() {
        for text in [
            "127.0.0.1",
            "10.0.255.1",
            "::1",
            "::",
            "fe80::1:2",
            "2001:db8::",
            "1:2:3:4:5:6:7:8",
            "1::8",
            "1:2:3:4:5:6::8",
            "01.2.3.4",
            "256.1.1.1",
            "1.2.3",
            "1.2.3.4.5",
            "1.2.3.4.",
            "1:2:3:4:5:6:7:8:9",
            "1::2::3",
            ":1",
            "1:",
            "12345::",
            "::ffff:1.2.3.4",
            "gw.local",
            "1:2:3:4:5:6:7::",
            "::2:3:4:5:6:7:8",
            "+1.2.3.4",
            "g::",
            "+1::",
        ] {
            let mut buf = [0u8; 16];
            let ours = parse_ip(text, &mut buf).map(|b| b.to_vec());
            let core = text.parse::<core::net::IpAddr>().ok().map(|ip| match ip {
                core::net::IpAddr::V4(v4) => v4.octets().to_vec(),
                core::net::IpAddr::V6(v6) => v6.octets().to_vec(),
            });
            if text == "::ffff:1.2.3.4" {
                assert_eq!(ours, None, "embedded IPv4 is not supported");
            } else {
                assert_eq!(ours, core, "{text}");
            }
        }
    }
}
