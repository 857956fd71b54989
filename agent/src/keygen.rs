//! `agent keygen`: a P-256 key made on the board and a CSR for
//! `provisioning sign-csr`, so the key never leaves the device.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use twofold_protocol::{DeviceId, Identity, TrustDomain};

/// The files keygen writes.
pub const KEY: &str = "device.key";
pub const CSR: &str = "device.csr";

/// Writes `DIR/device.key` (0600, refusing to replace an existing key) and
/// `DIR/device.csr` (CN = id, SAN URI = the identity). Returns the paths.
pub fn keygen(
    dir: &Path,
    id: &DeviceId,
    trust_domain: &TrustDomain,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let identity = Identity::device(*trust_domain, *id);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, id.as_str());
    params.subject_alt_names = vec![rcgen::SanType::URI(identity.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?;
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
