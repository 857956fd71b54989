//! What enrollment hands out: the files a device or a gateway installs.
//!
//! ```text
//! device (Linux):  device.key (0600)  device.pem (leaf + device CA)  server-ca.pem  server-crl.pem
//! device (MCU):    bundle.bin (0600)  the flash image described in twofold_protocol::bundle
//! gateway:         gateway.key (0600) gateway.pem (leaf + server CA) client-ca.pem  crl.pem
//! ```

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use twofold_protocol::{Bundle, Principal};

use crate::atomic::{self, Durability, PUBLIC, SECRET};
use crate::enrollment::{Enrollment, GatewayCert};
use crate::error::{Error, Result};
use crate::keys;

/// File names in an output directory.
pub mod files {
    pub const DEVICE_KEY: &str = "device.key";
    pub const DEVICE_CHAIN: &str = "device.pem";
    pub const SERVER_CA: &str = "server-ca.pem";
    pub const SERVER_CRL: &str = "server-crl.pem";
    pub const NOSTD_BUNDLE: &str = "bundle.bin";
    pub const GATEWAY_KEY: &str = "gateway.key";
    pub const GATEWAY_CHAIN: &str = "gateway.pem";
    pub const CLIENT_CA: &str = "client-ca.pem";
    pub const CRL: &str = "crl.pem";
}

/// Where a microcontroller finds its gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayAddress {
    pub host: String,
    pub port: u16,
}

impl std::str::FromStr for GatewayAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or("expected HOST:PORT, e.g. gw.example.com:8883")?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("the host part is empty".into());
        }
        if host.parse::<std::net::IpAddr>().is_err() {
            crate::profile::check_dns_name(host).map_err(|e| e.to_string())?;
        }
        let port: u16 = port
            .parse()
            .map_err(|_| format!("port {port:?} is not a number from 1 to 65535"))?;
        if port == 0 {
            return Err("port 0 is not a valid gateway port".into());
        }
        Ok(GatewayAddress {
            host: host.to_owned(),
            port,
        })
    }
}

/// Creates `dir` (0700 when new: it will hold a private key).
pub fn create_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(Error::io(dir))
}

/// Writes a Linux device's bundle: its key (unless the key came from a
/// CSR), its chain, the server CA and, when the PKI has one, the server
/// CA's CRL, which the agent checks the gateway's certificate against.
pub fn write_device(
    dir: &Path,
    e: &Enrollment,
    server_ca_pem: &str,
    server_crl_pem: Option<&str>,
    durability: Durability,
) -> Result<()> {
    create_dir(dir)?;
    if let Some(key) = &e.key {
        atomic::write(
            &dir.join(files::DEVICE_KEY),
            keys::to_pem(key, None)?.as_bytes(),
            SECRET,
            durability,
        )?;
    }
    atomic::write(
        &dir.join(files::DEVICE_CHAIN),
        e.chain_pem.as_bytes(),
        PUBLIC,
        durability,
    )?;
    atomic::write(
        &dir.join(files::SERVER_CA),
        server_ca_pem.as_bytes(),
        PUBLIC,
        durability,
    )?;
    match server_crl_pem {
        Some(crl) => atomic::write(
            &dir.join(files::SERVER_CRL),
            crl.as_bytes(),
            PUBLIC,
            durability,
        ),
        // A PKI from before the server CRL: a server-crl.pem left in the
        // directory by an earlier bundle would be checked as if it were
        // current.
        None => match std::fs::remove_file(dir.join(files::SERVER_CRL)) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(Error::Io {
                path: dir.join(files::SERVER_CRL),
                source: err,
            }),
            _ => Ok(()),
        },
    }
}

/// Writes a microcontroller's flashable bundle.
pub fn write_nostd(
    dir: &Path,
    e: &Enrollment,
    server_ca_pem: &str,
    gateway: &GatewayAddress,
) -> Result<()> {
    let Principal::Device(device_id) =
        twofold_protocol::Identity::parse(e.record.identity.as_deref().unwrap_or(""))
            .map_err(|err| Error::Store(crate::registry::StoreError::Corrupt(err.to_string())))?
            .principal
    else {
        return Err(Error::InvalidName {
            what: "device id",
            value: e.record.name.clone(),
            reason: twofold_protocol::NameError::Empty,
        });
    };
    let key = e.key.as_ref().ok_or_else(|| Error::CorruptKey {
        file: dir.join(files::NOSTD_BUNDLE),
        detail: "a microcontroller bundle needs a generated key".into(),
    })?;
    let scalar = keys::secret_scalar(key)?;
    let server_ca = pem::parse(server_ca_pem).map_err(|err| Error::CorruptCertificate {
        file: "server-ca.pem".into(),
        detail: err.to_string(),
    })?;
    let mut chain = heapless::Vec::new();
    let _ = chain.push(e.record.der.as_slice());
    let _ = chain.push(e.device_ca_der.as_slice());
    let bundle = Bundle {
        device_id,
        gateway_host: &gateway.host,
        gateway_port: gateway.port,
        server_name: &gateway.host,
        private_key: &scalar,
        chain,
        server_ca: server_ca.contents(),
    };
    let mut buf = pkcs8::der::zeroize::Zeroizing::new(vec![0u8; 16 * 1024]);
    let len = bundle
        .encode(&mut buf)
        .map_err(|err| Error::Bundle(err.to_string()))?;
    create_dir(dir)?;
    atomic::write(
        &dir.join(files::NOSTD_BUNDLE),
        &buf[..len],
        SECRET,
        Durability::Sync,
    )
}

/// Writes a gateway's certificate, key, client CA and CRL.
pub fn write_gateway(
    dir: &Path,
    g: &GatewayCert,
    client_ca_pem: &str,
    crl_pem: &str,
) -> Result<()> {
    create_dir(dir)?;
    let sync = Durability::Sync;
    atomic::write(
        &dir.join(files::GATEWAY_KEY),
        keys::to_pem(&g.key, None)?.as_bytes(),
        SECRET,
        sync,
    )?;
    atomic::write(
        &dir.join(files::GATEWAY_CHAIN),
        g.chain_pem.as_bytes(),
        PUBLIC,
        sync,
    )?;
    atomic::write(
        &dir.join(files::CLIENT_CA),
        client_ca_pem.as_bytes(),
        PUBLIC,
        sync,
    )?;
    atomic::write(&dir.join(files::CRL), crl_pem.as_bytes(), PUBLIC, sync)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_address_parses_and_explains() {
        assert_eq!(
            "gw.example:8883".parse::<GatewayAddress>().unwrap(),
            GatewayAddress {
                host: "gw.example".into(),
                port: 8883
            }
        );
        assert_eq!("[::1]:8883".parse::<GatewayAddress>().unwrap().host, "::1");
        assert!(
            "gw.example"
                .parse::<GatewayAddress>()
                .unwrap_err()
                .contains("HOST:PORT")
        );
        assert!("gw:0".parse::<GatewayAddress>().is_err());
        assert!("gw:99999".parse::<GatewayAddress>().is_err());
        assert!(":8883".parse::<GatewayAddress>().is_err());
        assert!("gw example:8883".parse::<GatewayAddress>().is_err());
        assert!("10.0.0.7:8883".parse::<GatewayAddress>().is_ok());
    }
}
