//! A PKI on disk with a gateway certificate, and device bundles.

use std::path::{Path, PathBuf};
use std::process::Command;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use twofold_protocol::{DeviceId, Principal, ServiceName, TrustDomain};
use twofold_provisioning::output::{self, files};
use twofold_provisioning::registry::{RegistryUrl, RevocationReason};
use twofold_provisioning::{
    EnrollOptions, EnrollRequest, KeySource, Pki, RevokeTarget, Serial, atomic::Durability,
};

use crate::process::{Proc, built, exit_status, run_bounded, text};

pub const TD: &str = "iot.example";

/// A PKI for [`TD`] in a temporary directory, with a gateway certificate
/// for `localhost` and 127.0.0.1 in `gw/` (with the client CA and CRL).
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    /// The serial of the certificate in `gw/`.
    pub gateway_serial: Serial,
    /// Where the PKI's registry is.
    pub registry: RegistryUrl,
}

/// A certificate chain and key on disk: a bundle directory from
/// `provisioning enroll`, or a minted one.
#[derive(Clone, Debug)]
pub struct Identity {
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new()
    }
}

impl Fleet {
    pub fn new() -> Fleet {
        Self::with_registry(&RegistryUrl::Sqlite)
    }

    /// A fleet whose PKI keeps its registry in `registry`.
    pub fn with_registry(registry: &RegistryUrl) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let mut pki = Pki::init_with(
            &dir.path().join("pki"),
            TrustDomain::parse(TD).unwrap(),
            None,
            registry,
        )
        .unwrap();
        let gw = pki
            .issue_gateway(
                &["localhost".into()],
                &["127.0.0.1".parse().unwrap()],
                30,
                None,
            )
            .unwrap();
        let fleet = Fleet {
            dir,
            pki,
            gateway_serial: gw.record.serial.clone(),
            registry: registry.clone(),
        };
        output::write_gateway(
            &fleet.path("gw"),
            &gw,
            &fleet.pki.device_ca_pem().unwrap(),
            &fleet.pki.crl_pem().unwrap(),
        )
        .unwrap();
        // OpenSSL (mosquitto) anchors only on a self-signed root, so its CA
        // files hold the intermediate and the root.
        let root = std::fs::read_to_string(fleet.path("pki/root-ca.pem")).unwrap();
        let servers = format!("{}{root}", fleet.pki.server_ca_pem().unwrap());
        std::fs::write(fleet.path("openssl-ca.pem"), servers).unwrap();
        let clients = format!("{}{root}", fleet.pki.device_ca_pem().unwrap());
        std::fs::write(fleet.path("openssl-client-ca.pem"), clients).unwrap();
        fleet
    }

    /// The `provisioning` command on this fleet's PKI and registry.
    pub fn provisioning(&self) -> Command {
        let mut cmd = Command::new(built("provisioning"));
        cmd.arg("--pki").arg(self.path("pki"));
        if let RegistryUrl::Postgres(url) = &self.registry {
            cmd.args(["--registry", url]);
        }
        cmd
    }

    /// A one-minute certificate for device `name`, issued (as a renewal
    /// of its enrolled one, same key) and committed at `at`, written over
    /// `cert`: a device that renews within a minute.
    pub fn one_minute_certificate(&mut self, cert: &Path, name: &str, at: time::OffsetDateTime) {
        use twofold_provisioning::renewal::{NewKey, RenewOptions, RenewRequest};
        let principal = Principal::Device(DeviceId::parse(name).unwrap());
        let enrolled = self.pki.history(&principal).unwrap().remove(0);
        let ca_key = self.pki.device_issuer().unwrap();
        let short = self
            .pki
            .renew(
                &ca_key,
                RenewRequest {
                    principal,
                    presented: enrolled.serial,
                    request_id: "test-seed".into(),
                    key: NewKey::Same,
                },
                RenewOptions {
                    lifetime: time::Duration::seconds(60),
                    enforce_due: false,
                    expired_grace: time::Duration::ZERO,
                },
                at,
            )
            .unwrap();
        self.pki
            .commit_renewal(&ca_key, &principal, &short.record.serial, at)
            .unwrap();
        std::fs::write(cert, &short.chain_pem).unwrap();
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Enrolls a device; its bundle goes to `<id>/`.
    pub fn device(&mut self, id: &str) -> Identity {
        self.enroll(Principal::Device(DeviceId::parse(id).unwrap()), id)
    }

    /// Enrolls a service; its bundle goes to `svc-<name>/`.
    pub fn service(&mut self, name: &str) -> Identity {
        self.enroll(
            Principal::Service(ServiceName::parse(name).unwrap()),
            &format!("svc-{name}"),
        )
    }

    /// Enrolls `principal` as `provisioning enroll` does; the bundle goes to `dir`.
    pub fn enroll(&mut self, principal: Principal, dir: &str) -> Identity {
        let e = self
            .pki
            .enroll(
                vec![EnrollRequest {
                    principal,
                    key: KeySource::Generate,
                }],
                EnrollOptions {
                    days: 30,
                    replace: false,
                    lifetime: None,
                },
                &mut |_| {},
            )
            .unwrap()
            .pop()
            .unwrap();
        let out = self.path(dir);
        output::write_device(
            &out,
            &e,
            &self.pki.server_ca_pem().unwrap(),
            self.pki.server_crl_pem().unwrap().as_deref(),
            Durability::Sync,
        )
        .unwrap();
        Identity {
            cert: out.join(files::DEVICE_CHAIN),
            key: out.join(files::DEVICE_KEY),
            dir: out,
        }
    }

    /// Revokes a device and publishes the new CRL where the gateway reads it.
    pub fn revoke(&mut self, id: &str) {
        let target = RevokeTarget::Principal(Principal::Device(DeviceId::parse(id).unwrap()));
        self.pki
            .revoke(target, RevocationReason::KeyCompromise)
            .unwrap();
        self.publish_crl();
    }

    /// Revokes the gateway certificate with `serial` (`gateway_serial` for
    /// the one in `gw/`); returns the server CRL that now lists it, for the
    /// devices.
    pub fn revoke_gateway(&mut self, serial: &Serial, reason: RevocationReason) -> String {
        self.pki
            .revoke(RevokeTarget::Serial(serial.clone()), reason)
            .unwrap();
        self.pki.server_crl_pem().unwrap().unwrap()
    }

    /// Revokes the certificate in `gw/` (key compromise); returns the
    /// server CRL that now lists it, for the devices.
    pub fn revoke_this_gateway(&mut self) -> String {
        let serial = self.gateway_serial.clone();
        self.revoke_gateway(&serial, RevocationReason::KeyCompromise)
    }

    /// Writes the PKI's current CRL to `gw/crl.pem`, atomically.
    pub fn publish_crl(&self) {
        twofold_provisioning::atomic::write(
            &self.path("gw/crl.pem"),
            self.pki.crl_pem().unwrap().as_bytes(),
            0o644,
            Durability::Sync,
        )
        .unwrap();
    }

    /// Mints a client certificate with the device CA's key but a profile of
    /// the test's choosing (for the refusal cases provisioning never issues).
    /// The directory also gets the server CA, so it is a complete bundle.
    pub fn mint(&self, name: &str, edit: impl FnOnce(&mut CertificateParams)) -> Identity {
        let ca_key =
            KeyPair::from_pem(&std::fs::read_to_string(self.path("pki/device-ca.key")).unwrap())
                .unwrap();
        let issuer = Issuer::from_ca_cert_pem(&self.pki.device_ca_pem().unwrap(), ca_key).unwrap();
        let id = mint_with(
            &self.path(name),
            Some(&issuer),
            &self.pki.device_ca_pem().unwrap(),
            name,
            edit,
        );
        std::fs::write(
            id.dir.join(files::SERVER_CA),
            self.pki.server_ca_pem().unwrap(),
        )
        .unwrap();
        id
    }
}

/// The client profile provisioning issues, for device `id`.
/// The distinct public keys (SPKI) of the certificates in `records`.
pub fn public_keys(
    records: &[twofold_provisioning::registry::CertRecord],
) -> std::collections::BTreeSet<Vec<u8>> {
    records
        .iter()
        .map(|r| {
            let (_, c) = x509_parser::parse_x509_certificate(&r.der).unwrap();
            c.public_key().raw.to_vec()
        })
        .collect()
}

pub fn client_params(id: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, id);
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{TD}/device/{id}").try_into().unwrap(),
    )];
    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(1);
    p
}

/// Writes `dir/device.pem` (leaf + `chain_pem`) and `dir/device.key`
/// (mode 0600); self-signed without an issuer.
pub fn mint_with(
    dir: &Path,
    issuer: Option<&Issuer<'_, KeyPair>>,
    chain_pem: &str,
    id: &str,
    edit: impl FnOnce(&mut CertificateParams),
) -> Identity {
    use std::os::unix::fs::PermissionsExt;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = client_params(id);
    edit(&mut params);
    let cert = match issuer {
        Some(issuer) => params.signed_by(&key, issuer).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    std::fs::create_dir_all(dir).unwrap();
    let chain = if issuer.is_some() {
        format!("{}{chain_pem}", cert.pem())
    } else {
        cert.pem()
    };
    let identity = Identity {
        dir: dir.to_owned(),
        cert: dir.join(files::DEVICE_CHAIN),
        key: dir.join(files::DEVICE_KEY),
    };
    std::fs::write(&identity.cert, chain).unwrap();
    std::fs::write(&identity.key, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&identity.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    identity
}

/// The gateway's MCU profile: records small enough for a 2 KiB receive
/// buffer.
pub const MCU_LIMITS: &str = "[limits]\nmax_tls_record = 2048\n";

/// `provisioning enroll ID --format nostd --gateway localhost:PORT`.
pub fn enroll_nostd(fleet: &Fleet, id: &str, port: u16) -> PathBuf {
    enroll_nostd_with(fleet, id, port, &[])
}

/// [`enroll_nostd`] with more `provisioning enroll` arguments, such as
/// `--lifetime 1m`.
pub fn enroll_nostd_with(fleet: &Fleet, id: &str, port: u16, extra: &[&str]) -> PathBuf {
    let out = fleet.path(&format!("mcu-{id}"));
    let mut enroll = Command::new(built("provisioning"));
    enroll
        .arg("--pki")
        .arg(fleet.path("pki"))
        .args(["enroll", id, "--format", "nostd", "--gateway"])
        .arg(format!("localhost:{port}"))
        .arg("--out")
        .arg(&out)
        .args(extra);
    let done = run_bounded(enroll, 30);
    assert!(done.status.success(), "{}", text(&done));
    out.join("bundle.bin")
}

/// A microcontroller agent run (host runner or firmware) that the gateway
/// refused: it exits with 13 within `secs` and its log says why.
pub fn assert_mcu_refused_by_gateway(dev: &mut Proc, secs: u64) {
    let status = exit_status(dev, secs);
    assert_eq!(status.and_then(|s| s.code()), Some(13), "{}", dev.log());
    assert!(
        dev.log().contains("the gateway refused our certificate"),
        "{}",
        dev.log()
    );
}

impl Fleet {
    /// A TLS client presenting `who`'s certificate and trusting the
    /// server CA alone, as the Linux agent's (rustls, aws-lc-rs).
    pub fn client_tls(&self, who: &Identity) -> std::sync::Arc<rustls::ClientConfig> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        let server_ca = self.pki.server_ca_pem().unwrap();
        for ca in CertificateDer::pem_slice_iter(server_ca.as_bytes()) {
            roots.add(ca.unwrap()).unwrap();
        }
        let chain: Vec<_> = CertificateDer::pem_file_iter(&who.cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(&who.key).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
        std::sync::Arc::new(config)
    }
}
