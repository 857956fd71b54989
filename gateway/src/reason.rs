//! Why a connection was refused: a fixed set an operator can act on, used
//! as the audit event's `reason` and as the metric label.

use std::fmt;

use rustls::{CertificateError, Error as TlsError};

/// The reason for a refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The client presented no certificate.
    NoCertificate,
    /// The certificate does not chain to a trusted client CA.
    UnknownIssuer,
    /// A certificate that chains to a trusted CA, presented with a
    /// handshake signature (CertificateVerify) made by another key: the
    /// peer holds a copy of the certificate but not its private key.
    KeyNotHeld,
    /// The certificate has expired.
    Expired,
    /// The certificate is not valid yet.
    NotYetValid,
    /// The certificate is on the CRL.
    Revoked,
    /// No CRL of the certificate's CA is in force (or it is out of date),
    /// so whether it is revoked cannot be told: refused, not assumed.
    RevocationUnknown,
    /// The certificate is not for client authentication (EKU, CA used as leaf).
    BadKeyUsage,
    /// No valid identity URI in this gateway's trust domain.
    BadIdentity,
    /// The MQTT client id is not the certificate's identity.
    ClientIdMismatch,
    /// A PUBLISH, SUBSCRIBE or will outside what the identity may use.
    PolicyDenied,
    /// No TLS handshake or CONNECT in time.
    HandshakeTimeout,
    /// Not TLS 1.2/1.3, not MQTT, or a malformed or oversized packet.
    ProtocolError,
    /// An MQTT feature the gateway's broker does not honour (MQTT 5's
    /// no-local with the embedded broker), refused rather than ignored.
    Unsupported,
    /// The broker cannot be reached, or did not accept the session.
    BrokerUnavailable,
    /// The gateway itself could not go on with the connection (its TLS
    /// configuration could not be built, a lock was poisoned).
    GatewayError,
    /// The certificate expired within the grace period: the session may
    /// only renew, and this packet was held back or refused.
    RenewOnly,
}

impl Reason {
    /// Every reason, for metrics that list zero counts too.
    pub const ALL: [Reason; 17] = [
        Reason::NoCertificate,
        Reason::UnknownIssuer,
        Reason::KeyNotHeld,
        Reason::Expired,
        Reason::NotYetValid,
        Reason::Revoked,
        Reason::RevocationUnknown,
        Reason::BadKeyUsage,
        Reason::BadIdentity,
        Reason::ClientIdMismatch,
        Reason::PolicyDenied,
        Reason::HandshakeTimeout,
        Reason::ProtocolError,
        Reason::Unsupported,
        Reason::BrokerUnavailable,
        Reason::GatewayError,
        Reason::RenewOnly,
    ];

    /// The label as written in logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::NoCertificate => "no_certificate",
            Reason::UnknownIssuer => "unknown_issuer",
            Reason::KeyNotHeld => "key_not_held",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::Revoked => "revoked",
            Reason::RevocationUnknown => "revocation_unknown",
            Reason::BadKeyUsage => "bad_key_usage",
            Reason::BadIdentity => "bad_identity",
            Reason::ClientIdMismatch => "client_id_mismatch",
            Reason::PolicyDenied => "policy_denied",
            Reason::HandshakeTimeout => "handshake_timeout",
            Reason::ProtocolError => "protocol_error",
            Reason::Unsupported => "unsupported",
            Reason::BrokerUnavailable => "broker_unavailable",
            Reason::GatewayError => "gateway_error",
            Reason::RenewOnly => "renew_only",
        }
    }

    /// Classifies a failed TLS handshake.
    pub fn from_tls(error: &TlsError) -> Reason {
        match error {
            TlsError::NoCertificatesPresented => Reason::NoCertificate,
            TlsError::InvalidCertificate(e) => Reason::from_certificate(e),
            _ => Reason::ProtocolError,
        }
    }

    fn from_certificate(error: &CertificateError) -> Reason {
        match error {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => Reason::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                Reason::NotYetValid
            }
            CertificateError::Revoked => Reason::Revoked,
            CertificateError::UnknownRevocationStatus
            | CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. } => Reason::RevocationUnknown,
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                Reason::BadKeyUsage
            }
            // webpki reports a CA certificate presented as a leaf as its
            // own error inside `Other`.
            CertificateError::Other(other)
                if matches!(
                    other.0.downcast_ref::<webpki::Error>(),
                    Some(webpki::Error::CaUsedAsEndEntity)
                ) =>
            {
                Reason::BadKeyUsage
            }
            CertificateError::BadEncoding => Reason::ProtocolError,
            // Unknown issuer, a bad signature (a forged chain), and the rest:
            // the certificate does not chain to a CA this gateway trusts.
            _ => Reason::UnknownIssuer,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_rustls_errors() {
        assert_eq!(
            Reason::from_tls(&TlsError::NoCertificatesPresented),
            Reason::NoCertificate
        );
        let cases = [
            (CertificateError::Expired, Reason::Expired),
            (CertificateError::NotValidYet, Reason::NotYetValid),
            (CertificateError::Revoked, Reason::Revoked),
            (
                CertificateError::UnknownRevocationStatus,
                Reason::RevocationUnknown,
            ),
            (CertificateError::InvalidPurpose, Reason::BadKeyUsage),
            (CertificateError::UnknownIssuer, Reason::UnknownIssuer),
            (CertificateError::BadSignature, Reason::UnknownIssuer),
        ];
        for (e, want) in cases {
            assert_eq!(Reason::from_tls(&TlsError::InvalidCertificate(e)), want);
        }
        let ca_as_leaf = CertificateError::Other(rustls::OtherError(std::sync::Arc::new(
            webpki::Error::CaUsedAsEndEntity,
        )));
        assert_eq!(
            Reason::from_tls(&TlsError::InvalidCertificate(ca_as_leaf)),
            Reason::BadKeyUsage
        );
        assert_eq!(
            Reason::from_tls(&TlsError::PeerIncompatible(
                rustls::PeerIncompatible::Tls12NotOffered
            )),
            Reason::ProtocolError
        );
    }

    #[test]
    fn labels_are_snake_case_and_unique() {
        let labels: std::collections::HashSet<_> = Reason::ALL.iter().map(Reason::as_str).collect();
        assert_eq!(labels.len(), Reason::ALL.len());
        assert_eq!(
            serde_json::to_string(&Reason::ClientIdMismatch).unwrap(),
            "\"client_id_mismatch\""
        );
    }
}
