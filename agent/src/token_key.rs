//! A device key in a PKCS#11 token as rustls's signing key: the TLS
//! handshake's CertificateVerify is signed by the token.

use rustls::pki_types::SubjectPublicKeyInfoDer;
use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use twofold_token::TokenKey;

/// The key as rustls sees it: ECDSA P-256 with SHA-256, the one scheme
/// Twofold's keys have.
#[derive(Debug)]
pub struct TlsTokenKey {
    key: TokenKey,
    spki: Vec<u8>,
}

impl TlsTokenKey {
    pub fn new(key: TokenKey) -> TlsTokenKey {
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        TlsTokenKey { key, spki }
    }
}

impl SigningKey for TlsTokenKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| Box::new(TokenSigner(self.key.clone())) as Box<dyn Signer>)
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.spki.as_slice()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

#[derive(Debug)]
struct TokenSigner(TokenKey);

/// The token failed to sign our side of a handshake: this device's
/// fault, never taken for the gateway's refusal.
#[derive(Debug, thiserror::Error)]
#[error("the token did not sign the handshake: {0}")]
pub struct SignFailed(String);

impl Signer for TokenSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.0.sign_sha256(message).map_err(|e| {
            tracing::error!(error = %e, "the token did not sign the handshake");
            rustls::Error::Other(rustls::OtherError(std::sync::Arc::new(SignFailed(
                e.to_string(),
            ))))
        })
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}
