//! `agent keygen`: a P-256 key made on the board (in a file, or inside a
//! PKCS#11 token) and a CSR for `provisioning sign-csr`, so the key never
//! leaves the device.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use twofold_protocol::{DeviceId, Identity, TrustDomain};

/// The files keygen writes.
pub const KEY: &str = "device.key";
pub const CSR: &str = "device.csr";

/// Makes the key inside the token `spec`, labelled `label` (refusing a
/// token that holds a key with that label already), and writes
/// `DIR/device.csr` signed by it. Returns the key's id and the CSR's path.
pub fn keygen_in_token(
    spec: &twofold_token::TokenSpec,
    label: &str,
    dir: &Path,
    id: &DeviceId,
    trust_domain: &TrustDomain,
) -> anyhow::Result<(Vec<u8>, PathBuf)> {
    let token =
        twofold_token::Token::open(spec).map_err(|e| anyhow::anyhow!("{e}; fix: {}", e.fix()))?;
    let existing = token.keys(label)?;
    if !existing.is_empty() {
        anyhow::bail!(
            "token \"{}\" holds {} key(s) labelled \"{label}\" already; an existing key is never \
             replaced: give [identity.pkcs11] key_label another label, or delete the old key \
             (pkcs11-tool --delete-object --type privkey --label {label}) once nothing uses it",
            spec.token,
            existing.len()
        );
    }
    let key_id = twofold_token::new_key_id();
    let key = token.key(token.generate_p256(label, &key_id)?);
    let csr = csr_params(id, trust_domain)?
        .serialize_request(&key)
        .map_err(|e| anyhow::anyhow!(key.last_error().unwrap_or_else(|| e.to_string())))?;
    std::fs::create_dir_all(dir)?;
    let csr_path = dir.join(CSR);
    std::fs::write(&csr_path, csr.pem()?)?;
    Ok((key_id, csr_path))
}

/// The CSR's subject: CN = id, SAN URI = the identity.
fn csr_params(
    id: &DeviceId,
    trust_domain: &TrustDomain,
) -> anyhow::Result<rcgen::CertificateParams> {
    let identity = Identity::device(*trust_domain, *id);
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, id.as_str());
    params.subject_alt_names = vec![rcgen::SanType::URI(identity.to_string().try_into()?)];
    Ok(params)
}

/// Writes `DIR/device.key` (0600, refusing to replace an existing key) and
/// `DIR/device.csr` (CN = id, SAN URI = the identity). Returns the paths.
pub fn keygen(
    dir: &Path,
    id: &DeviceId,
    trust_domain: &TrustDomain,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = csr_params(id, trust_domain)?.serialize_request(&key)?;
    std::fs::create_dir_all(dir)?;
    let key_path = dir.join(KEY);
    let csr_path = dir.join(CSR);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(|e| {
            anyhow::anyhow!(
                "{}: {e}; an existing key is never replaced (move it away first)",
                key_path.display()
            )
        })?;
    f.write_all(key.serialize_pem().as_bytes())?;
    f.sync_all()?;
    std::fs::write(&csr_path, csr.pem()?)?;
    Ok((key_path, csr_path))
}
