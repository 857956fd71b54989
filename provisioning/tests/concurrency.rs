//! Commands running at once serialize on the registry: no duplicate serials,
//! no second active certificate, a CRL that misses no revocation. A command
//! killed mid-write leaves the registry as it was.

mod common;

use std::collections::HashSet;
use std::process::Child;
use std::time::{Duration, Instant};

use common::{Env, openssl_ok};

fn spawn(env: &Env, args: &[&str]) -> Child {
    env.command()
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn provisioning")
}

fn integrity(env: &Env) -> String {
    let db = rusqlite::Connection::open(env.pki().join("registry.db")).unwrap();
    db.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn concurrent_commands_never_share_a_serial_or_an_identity() {
    let env = Env::with_pki();
    let mut bulk: Vec<Child> = ["a", "b", "c", "d"]
        .iter()
        .map(|p| {
            spawn(
                &env,
                &[
                    "bulk-enroll",
                    "--count",
                    "50",
                    "--prefix",
                    p,
                    "--out",
                    &format!("fleet-{p}"),
                ],
            )
        })
        .collect();
    let same: Vec<Child> = (0..4)
        .map(|i| spawn(&env, &["enroll", "contested", "--out", &format!("c{i}")]))
        .collect();
    for child in bulk.drain(..) {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let outcomes: Vec<_> = same
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let winners = outcomes.iter().filter(|o| o.status.success()).count();
    assert_eq!(
        winners, 1,
        "exactly one concurrent enrollment of one id may win"
    );
    for loser in outcomes.iter().filter(|o| !o.status.success()) {
        let stderr = String::from_utf8_lossy(&loser.stderr);
        assert!(
            stderr.contains("device contested already has an active certificate"),
            "{stderr}"
        );
    }

    let records = env.list();
    let devices: Vec<_> = records.iter().filter(|r| r["kind"] == "device").collect();
    assert_eq!(devices.len(), 201);
    let serials: HashSet<_> = records
        .iter()
        .map(|r| r["serial"].as_str().unwrap())
        .collect();
    assert_eq!(serials.len(), records.len(), "duplicate serials");
    let fingerprints: HashSet<_> = records
        .iter()
        .map(|r| r["fingerprint_sha256"].as_str().unwrap())
        .collect();
    assert_eq!(fingerprints.len(), records.len());
    // The certificates on disk, not just the registry rows, are all distinct
    // and all registered.
    let mut on_disk = HashSet::new();
    for entry in std::fs::read_dir(env.dir.path()).unwrap().flatten() {
        let dir = entry.path();
        let mut chains: Vec<_> = vec![dir.join("device.pem")];
        if let Ok(sub) = std::fs::read_dir(&dir) {
            chains.extend(sub.flatten().map(|e| e.path().join("device.pem")));
        }
        for chain in chains.into_iter().filter(|p| p.is_file()) {
            let text = openssl_ok(
                env.dir.path(),
                &["x509", "-in", chain.to_str().unwrap(), "-noout", "-serial"],
            );
            let serial = text.trim().trim_start_matches("serial=").to_lowercase();
            assert!(
                serials.contains(serial.as_str()),
                "{serial} on disk is not in the registry"
            );
            assert!(on_disk.insert(serial), "a serial appears twice on disk");
        }
    }
    assert_eq!(on_disk.len(), 201);
    assert_eq!(integrity(&env), "ok");
}

#[test]
fn concurrent_revocations_all_reach_the_final_crl() {
    let env = Env::with_pki();
    env.ok(&[
        "bulk-enroll",
        "--count",
        "6",
        "--prefix",
        "r",
        "--out",
        "fleet",
    ]);
    let revokes: Vec<Child> = (1..=6)
        .map(|n| spawn(&env, &["revoke", &format!("r-{n}")]))
        .collect();
    for child in revokes {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let crl = openssl_ok(
        env.dir.path(),
        &["crl", "-in", "pki/crl.pem", "-noout", "-text"],
    );
    for r in env.list().iter().filter(|r| r["kind"] == "device") {
        let serial = r["serial"].as_str().unwrap().to_uppercase();
        assert!(
            crl.contains(&format!("Serial Number: {serial}")),
            "{serial} missing from\n{crl}"
        );
    }
    // Init wrote CRL 1; six revocations wrote 2..=7.
    let number = openssl_ok(
        env.dir.path(),
        &["crl", "-in", "pki/crl.pem", "-noout", "-crlnumber"],
    );
    assert_eq!(number.trim(), "crlNumber=0x07");
}

#[test]
fn a_killed_bulk_enroll_leaves_the_registry_as_it_was() {
    let env = Env::with_pki();
    let crl_before = std::fs::read(env.pki().join("crl.pem")).unwrap();
    let mut child = spawn(
        &env,
        &[
            "bulk-enroll",
            "--count",
            "100000",
            "--prefix",
            "k",
            "--out",
            "fleet",
        ],
    );
    // Wait until uncommitted pages have spilled into the write-ahead log,
    // so the kill lands in the middle of the transaction.
    let wal = env.pki().join("registry.db-wal");
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) < 1 << 20 {
        assert!(
            Instant::now() < deadline,
            "bulk-enroll never started writing"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "bulk-enroll ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    assert_eq!(integrity(&env), "ok");
    assert_eq!(env.list().len(), 3, "a killed command left records behind");
    assert_eq!(
        std::fs::read(env.pki().join("crl.pem")).unwrap(),
        crl_before
    );
    assert!(!env.path("fleet").join("k-000001").exists());
    env.ok(&["enroll", "k-000001", "--out", "after"]);
}
