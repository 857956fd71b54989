//! Private keys: generation, and PEM files that may be encrypted at rest.
//!
//! Keys are ECDSA P-256 in PKCS#8. An encrypted key is a standard PKCS#8
//! `ENCRYPTED PRIVATE KEY` (PBES2: scrypt and AES-256-CBC), so
//! `openssl pkey` can read it with the same passphrase.

use std::fmt;
use std::path::Path;

use aws_lc_rs::encoding::{AsBigEndian, EcPrivateKeyBin};
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use pkcs8::der::zeroize::Zeroizing;
use pkcs8::pkcs5::{self, pbes2};
use pkcs8::{EncryptedPrivateKeyInfo, LineEnding, PrivateKeyInfo};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};

use crate::error::{Error, Result};

const PLAIN_LABEL: &str = "PRIVATE KEY";
const ENCRYPTED_LABEL: &str = "ENCRYPTED PRIVATE KEY";

/// A passphrase for CA keys. Its `Debug` never shows it.
#[derive(Clone)]
pub struct Passphrase(Zeroizing<String>);

impl Passphrase {
    /// Wraps a passphrase; an empty one is refused.
    pub fn new(s: String) -> Result<Self> {
        if s.is_empty() {
            return Err(Error::EmptyPassphrase);
        }
        Ok(Passphrase(Zeroizing::new(s)))
    }

    fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

/// Where a passphrase comes from when an encrypted key is opened. It is
/// asked for only when a key turns out to be encrypted.
pub trait PassphraseSource {
    /// Returns the passphrase for `file`, or `None` if none can be had.
    fn passphrase(&self, file: &Path) -> Result<Option<Passphrase>>;
}

/// No passphrase available: opening an encrypted key fails.
pub struct NoPassphrase;

impl PassphraseSource for NoPassphrase {
    fn passphrase(&self, _: &Path) -> Result<Option<Passphrase>> {
        Ok(None)
    }
}

impl PassphraseSource for Passphrase {
    fn passphrase(&self, _: &Path) -> Result<Option<Passphrase>> {
        Ok(Some(self.clone()))
    }
}

/// scrypt with N = 2^14, r = 8, p = 1: 16 MiB of memory per attempt.
/// The crate's default (N = 2^15) needs just over 32 MiB, which OpenSSL's
/// default memory cap refuses, and operators must be able to read their
/// CA keys with `openssl pkey`.
fn scrypt_params() -> pkcs8::Result<pkcs5::scrypt::Params> {
    pkcs5::scrypt::Params::new(14, 8, 1, 32).map_err(|_| {
        pkcs8::Error::EncryptedPrivateKey(pkcs5::Error::AlgorithmParametersInvalid {
            oid: pbes2::SCRYPT_OID,
        })
    })
}

/// Generates a fresh ECDSA P-256 key.
pub fn generate() -> Result<KeyPair> {
    Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?)
}

/// The key as PEM: PKCS#8, encrypted when a passphrase is given.
pub fn to_pem(key: &KeyPair, passphrase: Option<&Passphrase>) -> Result<Zeroizing<String>> {
    let der = Zeroizing::new(key.serialize_der());
    let Some(pass) = passphrase else {
        return Ok(Zeroizing::new(key.serialize_pem()));
    };
    let encrypt = || -> pkcs8::Result<Zeroizing<String>> {
        let info = PrivateKeyInfo::try_from(der.as_slice())?;
        let mut salt = [0u8; 16];
        let mut iv = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut salt);
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut iv);
        let params = pbes2::Parameters::scrypt_aes256cbc(scrypt_params()?, &salt, &iv)?;
        let doc = info.encrypt_with_params(params, pass.as_bytes())?;
        Ok(doc.to_pem(ENCRYPTED_LABEL, LineEnding::LF)?)
    };
    encrypt().map_err(|e| Error::CorruptKey {
        file: "<new key>".into(),
        detail: e.to_string(),
    })
}

/// Whether a PEM key file is encrypted.
pub fn is_encrypted(pem: &str) -> bool {
    pem.contains(&format!("-----BEGIN {ENCRYPTED_LABEL}-----"))
}

/// Reads a P-256 key from `pem` (the contents of `file`), decrypting it
/// with a passphrase from `source` if it is encrypted.
pub fn from_pem(file: &Path, pem: &str, source: &dyn PassphraseSource) -> Result<KeyPair> {
    let corrupt = |detail: String| Error::CorruptKey {
        file: file.to_owned(),
        detail,
    };
    let block = pem::parse(pem).map_err(|e| corrupt(format!("not PEM: {e}")))?;
    let der: Zeroizing<Vec<u8>> = match block.tag() {
        PLAIN_LABEL => Zeroizing::new(block.into_contents()),
        ENCRYPTED_LABEL => {
            let info = EncryptedPrivateKeyInfo::try_from(block.contents())
                .map_err(|e| corrupt(format!("bad encrypted key structure: {e}")))?;
            let pass = source
                .passphrase(file)?
                .ok_or_else(|| Error::PassphraseRequired {
                    file: file.to_owned(),
                })?;
            let plain = info
                .decrypt(pass.as_bytes())
                .map_err(|_| Error::WrongPassphrase {
                    file: file.to_owned(),
                })?;
            Zeroizing::new(plain.as_bytes().to_vec())
        }
        other => {
            return Err(corrupt(format!(
                "PEM label is {other:?}, expected {PLAIN_LABEL:?}"
            )));
        }
    };
    KeyPair::from_pkcs8_der_and_sign_algo(&der.as_slice().into(), &PKCS_ECDSA_P256_SHA256)
        .map_err(|e| corrupt(format!("not a P-256 PKCS#8 key: {e}")))
}

/// The raw 32-byte P-256 secret scalar, for microcontroller bundles.
pub fn secret_scalar(key: &KeyPair) -> Result<Zeroizing<Vec<u8>>> {
    let der = Zeroizing::new(key.serialize_der());
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &der).map_err(|e| {
        Error::CorruptKey {
            file: "<new key>".into(),
            detail: e.to_string(),
        }
    })?;
    let bin: EcPrivateKeyBin<'_> =
        pair.private_key()
            .as_be_bytes()
            .map_err(|e| Error::CorruptKey {
                file: "<new key>".into(),
                detail: e.to_string(),
            })?;
    Ok(Zeroizing::new(bin.as_ref().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(s: &str) -> Passphrase {
        Passphrase::new(s.into()).unwrap()
    }

    #[test]
    fn plain_round_trip() {
        let key = generate().unwrap();
        let pem = to_pem(&key, None).unwrap();
        assert!(!is_encrypted(&pem));
        let back = from_pem(Path::new("k"), &pem, &NoPassphrase).unwrap();
        assert_eq!(back.public_key_raw(), key.public_key_raw());
    }

    #[test]
    fn encrypted_round_trip_and_refusals() {
        let key = generate().unwrap();
        let pem = to_pem(&key, Some(&pass("correct horse"))).unwrap();
        assert!(is_encrypted(&pem));
        let back = from_pem(Path::new("k"), &pem, &pass("correct horse")).unwrap();
        assert_eq!(back.public_key_raw(), key.public_key_raw());
        assert!(matches!(
            from_pem(Path::new("k"), &pem, &pass("wrong")),
            Err(Error::WrongPassphrase { .. })
        ));
        assert!(matches!(
            from_pem(Path::new("k"), &pem, &NoPassphrase),
            Err(Error::PassphraseRequired { .. })
        ));
    }

    #[test]
    fn corrupt_files_are_named() {
        let err = from_pem(Path::new("ca.key"), "garbage", &NoPassphrase).unwrap_err();
        assert!(matches!(err, Error::CorruptKey { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("ca.key is not a usable private key"),
            "{err}"
        );
        let cert_pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let err = from_pem(Path::new("ca.key"), cert_pem, &NoPassphrase).unwrap_err();
        assert!(
            err.to_string().contains("PEM label is \"CERTIFICATE\""),
            "{err}"
        );
    }

    #[test]
    fn empty_passphrase_is_refused() {
        assert!(matches!(
            Passphrase::new(String::new()),
            Err(Error::EmptyPassphrase)
        ));
    }

    #[test]
    fn scalar_is_32_bytes() {
        assert_eq!(secret_scalar(&generate().unwrap()).unwrap().len(), 32);
    }
}
