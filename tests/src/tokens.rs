//! SoftHSM2 tokens in a temporary directory: a real PKCS#11 module
//! (Debian's softhsm2) with tokens made by its own tool.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian's SoftHSM2 module.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The user PIN of every token made here; the SO PIN is [`SO_PIN`].
pub const USER_PIN: &str = "4711-user";
pub const SO_PIN: &str = "4711-so";

/// A SoftHSM2 configuration and its token directory. Processes that use
/// the tokens need [`SoftHsm::env`] (the module reads its configuration
/// once, when it is initialized).
pub struct SoftHsm {
    _dir: tempfile::TempDir,
    conf: PathBuf,
    pin_file: PathBuf,
}

impl SoftHsm {
    /// A configuration with tokens labelled `labels`, each with
    /// [`USER_PIN`], and a PIN file holding it (mode 0600).
    pub fn new(labels: &[&str]) -> SoftHsm {
        assert!(
            Path::new(SOFTHSM_MODULE).is_file(),
            "{SOFTHSM_MODULE} is missing: run scripts/install-deps (Debian package softhsm2)"
        );
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let pin_file = dir.path().join("pin");
        std::fs::write(&pin_file, format!("{USER_PIN}\n")).unwrap();
        std::fs::set_permissions(
            &pin_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let hsm = SoftHsm {
            _dir: dir,
            conf,
            pin_file,
        };
        for label in labels {
            hsm.init_token(label);
        }
        hsm
    }

    /// Makes one more token.
    pub fn init_token(&self, label: &str) {
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", label])
            .args(["--pin", USER_PIN, "--so-pin", SO_PIN])
            .env("SOFTHSM2_CONF", &self.conf)
            .output()
            .expect("softhsm2-util (Debian package softhsm2)");
        assert!(
            out.status.success(),
            "softhsm2-util --init-token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The environment a process needs to see these tokens.
    pub fn env(&self) -> [(&'static str, PathBuf); 1] {
        [("SOFTHSM2_CONF", self.conf.clone())]
    }

    /// A file holding [`USER_PIN`].
    pub fn pin_file(&self) -> &Path {
        &self.pin_file
    }

    /// The module's configuration file.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// Runs `pkcs11-tool` (OpenSC, not ours) on the module with `args`,
    /// logged in as the user; its status and output.
    pub fn pkcs11_tool(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("pkcs11-tool")
            .args(["--module", SOFTHSM_MODULE, "--login", "--pin", USER_PIN])
            .args(args)
            .env("SOFTHSM2_CONF", &self.conf)
            .output()
            .expect("pkcs11-tool (Debian package opensc)");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Tries to get the private key `label` out of `token` with
    /// tests/tools/pkcs11-export.py (PyKCS11, not our binding): its value,
    /// then wrapped under a fresh AES key. The script's exit code (0: the
    /// token refused both, 1: key material came out) and what it printed.
    pub fn export_attempt(&self, token: &str, label: &str) -> (Option<i32>, String) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/pkcs11-export.py");
        let out = Command::new("/usr/bin/python3")
            .arg(script)
            .args([SOFTHSM_MODULE, token, label])
            .arg(&self.pin_file)
            .env("SOFTHSM2_CONF", &self.conf)
            .output()
            .expect("python3 with PyKCS11 (Debian package python3-pykcs11)");
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}
