//! The device's side of the TLS handshake for embedded-tls: its
//! certificate, its key behind [`DeviceKey`], the [`StrictVerifier`] and
//! the random number generator.

use embedded_tls::{
    Aes128GcmSha256, Certificate, CryptoProvider, SignatureScheme, TlsError, TlsVerifier,
};
use p256::ecdsa::Signature;
use rand_core::{CryptoRng, CryptoRngCore, RngCore};

use crate::verify::{Clock, StrictVerifier};
use crate::x509::DerSignature;

/// Whatever holds the device's P-256 private key: the key itself
/// ([`p256::ecdsa::SigningKey`], e.g. from the bundle in flash), or a
/// secure element such as an ATECC608 that signs without ever giving the
/// key out.
pub trait DeviceKey {
    /// Signs `message` with ECDSA P-256 and SHA-256 (the signer hashes);
    /// the signature as r and s, the way secure elements return it.
    fn sign(&mut self, message: &[u8]) -> Result<Signature, signature::Error>;
}

impl DeviceKey for p256::ecdsa::SigningKey {
    fn sign(&mut self, message: &[u8]) -> Result<Signature, signature::Error> {
        signature::Signer::try_sign(self, message)
    }
}

impl<K: DeviceKey> DeviceKey for &mut K {
    fn sign(&mut self, message: &[u8]) -> Result<Signature, signature::Error> {
        (**self).sign(message)
    }
}

/// Lends a [`DeviceKey`] to embedded-tls for one signature.
struct Lend<'k, K>(&'k mut K);

impl<K: DeviceKey> signature::SignerMut<DerSignature> for Lend<'_, K> {
    fn try_sign(&mut self, message: &[u8]) -> Result<DerSignature, signature::Error> {
        self.0.sign(message).map(|s| DerSignature::from(&s))
    }
}

/// The crypto embedded-tls needs for one connection: TLS 1.3 with
/// AES-128-GCM and SHA-256, P-256 everywhere.
pub struct DeviceProvider<'a, R, K, C: Clock> {
    rng: R,
    key: K,
    leaf: &'a [u8],
    verifier: StrictVerifier<'a, C>,
}

impl<'a, R, K, C> DeviceProvider<'a, R, K, C>
where
    R: RngCore + CryptoRng,
    K: DeviceKey,
    C: Clock,
{
    /// `leaf` is the device certificate (DER) sent to the gateway; the
    /// gateway holds the device CA.
    pub fn new(rng: R, key: K, leaf: &'a [u8], verifier: StrictVerifier<'a, C>) -> Self {
        DeviceProvider {
            rng,
            key,
            leaf,
            verifier,
        }
    }

    pub fn verifier(&self) -> &StrictVerifier<'a, C> {
        &self.verifier
    }

    /// The generator and the key back, for the next connection.
    pub fn into_parts(self) -> (R, K) {
        (self.rng, self.key)
    }
}

impl<'a, R, K, C> CryptoProvider for DeviceProvider<'a, R, K, C>
where
    R: RngCore + CryptoRng,
    K: DeviceKey,
    C: Clock,
{
    type CipherSuite = Aes128GcmSha256;
    type Signature = DerSignature;

    fn rng(&mut self) -> impl CryptoRngCore {
        &mut self.rng
    }

    fn verifier(&mut self) -> Result<&mut impl TlsVerifier<Self::CipherSuite>, TlsError> {
        Ok(&mut self.verifier)
    }

    // embedded-tls asks for the certificate and the signature whenever
    // the server's Finished checks out, proven or not (see link::Gate,
    // which keeps the answer in); neither is given to a server that has
    // not proven itself.

    fn signer(
        &mut self,
    ) -> Result<(impl signature::SignerMut<Self::Signature>, SignatureScheme), TlsError> {
        if !self.verifier.verified() {
            return Err(TlsError::InvalidCertificate);
        }
        Ok((Lend(&mut self.key), SignatureScheme::EcdsaSecp256r1Sha256))
    }

    fn client_cert(&mut self) -> Option<Certificate<impl AsRef<[u8]>>> {
        self.verifier
            .verified()
            .then_some(Certificate::X509(self.leaf))
    }
}
