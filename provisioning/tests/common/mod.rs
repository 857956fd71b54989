//! Runs the real `provisioning` binary and the real `openssl` in a
//! temporary directory.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const PASSPHRASE_ENV: &str = "TWOFOLD_CA_PASSPHRASE";

pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    /// A fresh directory with nothing in it.
    pub fn empty() -> Env {
        Env {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// A fresh directory with a PKI for `iot.example` in `pki/`.
    pub fn with_pki() -> Env {
        let env = Env::empty();
        env.ok(&["init", "--trust-domain", "iot.example"]);
        env
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn pki(&self) -> PathBuf {
        self.path("pki")
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_provisioning"));
        cmd.current_dir(self.dir.path())
            .env_remove("TWOFOLD_PKI")
            .env_remove(PASSPHRASE_ENV)
            .stdin(std::process::Stdio::null());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .output()
            .expect("run provisioning")
    }

    /// Runs with TWOFOLD_CA_PASSPHRASE set.
    pub fn run_with_passphrase(&self, args: &[&str], passphrase: &str) -> Output {
        self.command()
            .args(args)
            .env(PASSPHRASE_ENV, passphrase)
            .output()
            .expect("run provisioning")
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "provisioning {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs and asserts failure with exit code 1; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "provisioning {args:?} should fail; stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stderr).expect("utf-8 stderr")
    }

    /// `provisioning list --json`, parsed.
    pub fn list(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["list", "--json"])).expect("list --json is JSON")
    }

    /// A snapshot of every file under `rel`: path and contents.
    pub fn snapshot(&self, rel: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        snapshot_into(&self.path(rel), &mut out);
        out.sort();
        out
    }
}

fn snapshot_into(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            snapshot_into(&path, out);
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap_or_default()));
        }
    }
}

/// Runs openssl in `dir`; returns (success, stdout + stderr).
pub fn openssl(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl must be installed (Debian package openssl)");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Runs openssl and asserts success; returns its output.
pub fn openssl_ok(dir: &Path, args: &[&str]) -> String {
    let (ok, text) = openssl(dir, args);
    assert!(ok, "openssl {args:?} failed:\n{text}");
    text
}

pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("metadata").mode() & 0o777
}
