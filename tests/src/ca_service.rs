//! The CA service (`provisioning serve`) on a free loopback port, over a
//! [`Fleet`]'s PKI, killed when dropped.

use std::process::Command;

use twofold_provisioning::atomic::{self, Durability};
use twofold_provisioning::enrollment::pem_encode;

use crate::fleet::Fleet;
use crate::process::{Proc, built, free_port, spawn, wait_port};

pub struct CaService {
    pub port: u16,
    pub proc: Proc,
}

impl CaService {
    /// Starts the service with a server certificate for `localhost` and
    /// 127.0.0.1 in `ca-service/`, with `args` (e.g. `--ra gw`) after the
    /// fleet's PKI and the listening address.
    pub fn start(fleet: &mut Fleet, args: &[&str]) -> CaService {
        let pki = fleet.path("pki");
        Self::start_on(fleet, &pki, args)
    }

    /// [`Self::start`] on the PKI directory `pki` (another provisioning
    /// node's copy of the fleet's CA files).
    pub fn start_on(fleet: &mut Fleet, pki: &std::path::Path, args: &[&str]) -> CaService {
        let dir = fleet.path("ca-service");
        std::fs::create_dir_all(&dir).unwrap();
        let cert = fleet
            .pki
            .issue_gateway(
                &["localhost".into()],
                &["127.0.0.1".parse().unwrap()],
                30,
                None,
            )
            .unwrap();
        atomic::write(
            &dir.join("service.pem"),
            cert.chain_pem.as_bytes(),
            0o644,
            Durability::Sync,
        )
        .unwrap();
        let key = pem_encode("PRIVATE KEY", cert.key.serialized_der());
        atomic::write(
            &dir.join("service.key"),
            key.as_bytes(),
            0o600,
            Durability::Sync,
        )
        .unwrap();
        let port = free_port();
        let mut cmd = Command::new(built("provisioning"));
        cmd.arg("--pki")
            .arg(pki)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--cert")
            .arg(dir.join("service.pem"))
            .arg("--key")
            .arg(dir.join("service.key"))
            .args(args);
        let proc = spawn(cmd, fleet.path(&format!("ca-service-{port}.log")));
        wait_port(port, "provisioning serve");
        CaService { port, proc }
    }

    /// The gateway's `[ca_service]` section, calling as the service whose
    /// bundle is in `svc-<name>/`.
    pub fn gateway_toml(&self, fleet: &Fleet, name: &str) -> String {
        let svc = fleet.path(&format!("svc-{name}"));
        format!(
            "[ca_service]\naddress = \"localhost:{}\"\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            self.port,
            fleet.path("pki/server-ca.pem"),
            svc.join("device.pem"),
            svc.join("device.key"),
        )
    }
}

/// A microcontroller `id` enrolled with a one-minute certificate, the CA
/// service renewing for 60 s (the gateway service `gw` its registration
/// authority), a gateway with the MCU profile renewing through it, and a
/// subscriber (service `ops`) to the device's telemetry and replies.
pub struct RenewingMcu {
    pub sub: crate::mqtt::Sub,
    pub gw: crate::gateway::Gateway,
    pub ca: CaService,
    pub port: u16,
    pub bundle: std::path::PathBuf,
    pub fleet: Fleet,
}

impl RenewingMcu {
    pub fn start(id: &str) -> RenewingMcu {
        let mut fleet = Fleet::new();
        let ops = fleet.service("ops");
        fleet.service("gw");
        let port = free_port();
        let bundle = crate::fleet::enroll_nostd_with(&fleet, id, port, &["--lifetime", "1m"]);
        let ca = CaService::start(
            &mut fleet,
            &["--ra", "gw", "--lifetime", "60s", "--rate-limit", "100"],
        );
        let gw = crate::gateway::Gateway::start_on(
            &fleet,
            port,
            &format!(
                "{}\n{}",
                crate::fleet::MCU_LIMITS,
                ca.gateway_toml(&fleet, "gw")
            ),
        );
        let sub = crate::mqtt::Sub::telemetry_and_replies(&fleet, port, &ops, "ops", id);
        RenewingMcu {
            sub,
            gw,
            ca,
            port,
            bundle,
            fleet,
        }
    }
}
