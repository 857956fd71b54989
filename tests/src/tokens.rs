//! PKCS#11 tokens for tests, made by their own tools in temporary
//! directories: SoftHSM2 (Debian's softhsm2), and a TPM 2.0 (swtpm, with
//! tpm2-abrmd as its resource manager) through libtpm2_pkcs11.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::{Proc, free_port, run_bounded, spawn, text, wait_port, wait_until};

/// What a process needs to use a token: the module, its environment,
/// and a file holding the user PIN.
#[derive(Clone, Debug)]
pub struct TokenEnv {
    pub module: String,
    pub env: Vec<(String, String)>,
    pub pin_file: PathBuf,
}

impl TokenEnv {
    /// Tries to get the private key `label` out of `token` with
    /// tests/tools/pkcs11-export.py (PyKCS11, not our binding): its value,
    /// then wrapped under a fresh AES key. The script's exit code (0: the
    /// token refused both, 1: key material came out) and what it printed.
    pub fn export_attempt(&self, token: &str, label: &str) -> (Option<i32>, String) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/pkcs11-export.py");
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(script)
            .args([self.module.as_str(), token, label])
            .arg(&self.pin_file)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let out = run_bounded(cmd, 60);
        (out.status.code(), text(&out))
    }

    /// Runs `pkcs11-tool` (OpenSC, not ours) on the module with `args`,
    /// logged in as the user; its status and output.
    pub fn pkcs11_tool(&self, args: &[&str]) -> (bool, String) {
        let mut cmd = Command::new("pkcs11-tool");
        cmd.args([
            "--module",
            self.module.as_str(),
            "--login",
            "--pin",
            USER_PIN,
        ])
        .args(args)
        .envs(self.env.iter().map(|(k, v)| (k, v)));
        let out = run_bounded(cmd, 60);
        (out.status.success(), text(&out))
    }
}

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

    /// The token as a process uses it.
    pub fn token_env(&self) -> TokenEnv {
        TokenEnv {
            module: SOFTHSM_MODULE.into(),
            env: vec![("SOFTHSM2_CONF".into(), self.conf.display().to_string())],
            pin_file: self.pin_file.clone(),
        }
    }
}

/// Debian's TPM 2.0 PKCS#11 module (libtpm2-pkcs11-1).
pub const TPM_MODULE: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so";

/// A software TPM 2.0 (swtpm) on loopback, tpm2-abrmd in front of it as
/// the resource manager (on a D-Bus session bus of its own), and a
/// tpm2-pkcs11 store with one token made by tpm2_ptool. All killed when
/// dropped.
pub struct SwTpm {
    dir: tempfile::TempDir,
    _procs: Vec<Proc>,
    tcti: String,
    bus: String,
}

impl SwTpm {
    /// A TPM with a token labelled `label`, user PIN [`USER_PIN`].
    pub fn new(label: &str) -> SwTpm {
        assert!(
            Path::new(TPM_MODULE).is_file(),
            "{TPM_MODULE} is missing: run scripts/install-deps (Debian package libtpm2-pkcs11-1)"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = |p: &str| dir.path().join(p);
        std::fs::create_dir(path("state")).unwrap();
        std::fs::create_dir(path("store")).unwrap();
        // The swtpm TCTI finds the control port at the TPM's port + 1.
        let port = loop {
            let port = free_port();
            if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
                break port;
            }
        };
        let ctrl = port + 1;
        let mut swtpm = Command::new("swtpm");
        swtpm
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", path("state").display()))
            .args([
                "--server",
                &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
            ])
            .args([
                "--ctrl",
                &format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"),
            ])
            .args(["--flags", "not-need-init,startup-clear"]);
        let mut procs = vec![spawn(swtpm, path("swtpm.log"))];
        // The control port: a probe on the TPM's own port would be taken
        // for a client.
        wait_port(ctrl, "swtpm");
        // A bus of its own: no system D-Bus is needed, or touched.
        let bus = format!("unix:path={}", path("bus").display());
        let mut dbus = Command::new("dbus-daemon");
        dbus.args(["--session", "--nofork", "--address", &bus]);
        procs.push(spawn(dbus, path("dbus.log")));
        assert!(
            wait_until(10, || path("bus").exists()),
            "dbus-daemon did not start"
        );
        let name = format!("com.intel.tss2.Tabrmd.twofold{port}");
        let mut abrmd = Command::new("tpm2-abrmd");
        abrmd
            .arg(format!("--tcti=swtpm:host=127.0.0.1,port={port}"))
            .args(["--session", "--allow-root", "--dbus-name", &name])
            .env("DBUS_SESSION_BUS_ADDRESS", &bus);
        procs.push(spawn(abrmd, path("abrmd.log")));
        let tpm = SwTpm {
            tcti: format!("tabrmd:bus_type=session,bus_name={name}"),
            bus,
            _procs: procs,
            dir,
        };
        let up = wait_until(20, || {
            let mut probe = Command::new("tpm2_getrandom");
            probe.args(["8", "--hex"]).envs(tpm.env());
            run_bounded(probe, 10).status.success()
        });
        assert!(
            up,
            "the TPM did not come up:\n{}",
            tpm._procs
                .iter()
                .map(|p| p.log())
                .collect::<Vec<_>>()
                .join("\n")
        );
        let store = tpm.dir.path().join("store");
        for args in [
            vec!["init".to_owned()],
            vec![
                "addtoken".to_owned(),
                "--pid=1".to_owned(),
                format!("--sopin={SO_PIN}"),
                format!("--userpin={USER_PIN}"),
                format!("--label={label}"),
            ],
        ] {
            let mut ptool = Command::new("tpm2_ptool");
            ptool
                .args(&args)
                .arg(format!("--path={}", store.display()))
                .envs(tpm.env());
            let out = run_bounded(ptool, 120);
            assert!(
                out.status.success(),
                "tpm2_ptool {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::fs::write(tpm.dir.path().join("pin"), format!("{USER_PIN}\n")).unwrap();
        std::fs::set_permissions(
            tpm.dir.path().join("pin"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        tpm
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("DBUS_SESSION_BUS_ADDRESS".into(), self.bus.clone()),
            ("TPM2TOOLS_TCTI".into(), self.tcti.clone()),
            ("TPM2_PKCS11_TCTI".into(), self.tcti.clone()),
            (
                "TPM2_PKCS11_STORE".into(),
                self.dir.path().join("store").display().to_string(),
            ),
        ]
    }

    /// The token as a process uses it.
    pub fn token_env(&self) -> TokenEnv {
        TokenEnv {
            module: TPM_MODULE.into(),
            env: self.env(),
            pin_file: self.dir.path().join("pin"),
        }
    }
}
