//! Bad input gets a specific, actionable error, exit code 1, and changes
//! nothing: neither the PKI nor the output directory.

mod common;

use common::Env;

/// Runs a command that must fail, asserts its message, and asserts the
/// PKI is byte-for-byte unchanged and `out` was not created.
fn refused(env: &Env, args: &[&str], expect: &str) {
    let before = env.snapshot("pki");
    let stderr = env.fails(args);
    assert!(
        stderr.contains(expect),
        "provisioning {args:?}: expected {expect:?} in:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        before,
        env.snapshot("pki"),
        "provisioning {args:?} changed the PKI"
    );
}

#[test]
fn missing_pki_says_how_to_create_one() {
    let env = Env::empty();
    let stderr = env.fails(&["--pki", "nowhere", "enroll", "sensor-1", "--out", "dev"]);
    assert!(stderr.contains("no PKI at nowhere"), "{stderr}");
    assert!(
        stderr.contains("provisioning init --trust-domain"),
        "{stderr}"
    );
    assert!(!env.path("dev").exists());
    let stderr = env.fails(&["list"]);
    assert!(stderr.contains("no PKI at pki"), "{stderr}");
}

#[test]
fn init_refuses_an_existing_pki_and_a_non_empty_directory() {
    let env = Env::with_pki();
    refused(
        &env,
        &["init", "--trust-domain", "other.example"],
        "a PKI already exists at pki",
    );
    std::fs::create_dir(env.path("notes")).unwrap();
    std::fs::write(env.path("notes/todo.txt"), "x").unwrap();
    let stderr = env.fails(&["--pki", "notes", "init", "--trust-domain", "iot.example"]);
    assert!(
        stderr.contains("notes is not empty and holds no PKI"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(env.path("notes")).unwrap().count(), 1);
}

#[test]
fn init_refuses_a_bad_trust_domain() {
    let env = Env::empty();
    let stderr = env.fails(&["init", "--trust-domain", "IoT/Example"]);
    assert!(
        stderr.contains("invalid trust domain \"IoT/Example\""),
        "{stderr}"
    );
    assert!(!env.path("pki").exists());
}

#[test]
fn invalid_device_ids_are_refused_with_the_reason() {
    let env = Env::with_pki();
    let long = "a".repeat(65);
    let cases: &[(&str, &str)] = &[
        (
            "Sensor-1",
            "has 'S' at position 0 (only lowercase is allowed)",
        ),
        ("a/b", "has '/' at position 1 (the MQTT topic separator)"),
        ("a+", "has '+' at position 1 (an MQTT wildcard)"),
        ("#", "has '#' at position 0 (an MQTT wildcard)"),
        ("$sys", "has '$' at position 0 (reserved by MQTT brokers)"),
        ("-a", "starts with '-'"),
        (&long, "is 65 characters long; the limit is 64"),
    ];
    for (id, reason) in cases {
        // `--` so that clap hands "-a" over as the id instead of reading a flag.
        refused(&env, &["enroll", "--out", "dev", "--", id], reason);
        assert!(!env.path("dev").exists(), "{id}");
    }
    refused(
        &env,
        &["enroll", "--service", "Bad Name", "--out", "dev"],
        "invalid service name",
    );
    refused(
        &env,
        &[
            "bulk-enroll",
            "--count",
            "2",
            "--prefix",
            "A",
            "--out",
            "bulk",
        ],
        "invalid device id \"A-1\"",
    );
    assert!(!env.path("bulk").exists());
    // Nothing was recorded: only the three CAs are listed.
    assert_eq!(env.list().len(), 3);
}

#[test]
fn a_second_active_enrollment_needs_replace() {
    let env = Env::with_pki();
    env.ok(&["enroll", "sensor-1", "--out", "dev"]);
    let first_files = env.snapshot("dev");
    refused(
        &env,
        &["enroll", "sensor-1", "--out", "dev2"],
        "pass --replace to issue a new one",
    );
    assert_eq!(
        first_files,
        env.snapshot("dev"),
        "the refused enrollment touched the bundle"
    );

    let out = env.ok(&["enroll", "sensor-1", "--out", "dev", "--replace"]);
    assert!(out.contains("superseded"), "{out}");
    let devices: Vec<_> = env
        .list()
        .into_iter()
        .filter(|r| r["name"] == "sensor-1")
        .collect();
    assert_eq!(devices.len(), 2);
    assert_eq!(
        devices.iter().filter(|r| r["status"] == "active").count(),
        1
    );
    let old = devices.iter().find(|r| r["status"] == "revoked").unwrap();
    assert_eq!(old["revocation_reason"], "superseded");
}

#[test]
fn revoking_what_does_not_exist_is_explained() {
    let env = Env::with_pki();
    refused(
        &env,
        &["revoke", "ghost"],
        "no certificate was ever issued to device ghost",
    );
    refused(
        &env,
        &["revoke", "--serial", "0123abcd"],
        "no certificate with serial 0123abcd",
    );
    refused(&env, &["revoke", "--serial", "zz"], "invalid serial \"zz\"");
    env.ok(&["enroll", "sensor-1", "--out", "dev"]);
    env.ok(&["revoke", "sensor-1"]);
    refused(
        &env,
        &["revoke", "sensor-1"],
        "device sensor-1 has no active certificate to revoke",
    );
    let serial = env
        .list()
        .into_iter()
        .find(|r| r["name"] == "sensor-1")
        .unwrap()["serial"]
        .clone();
    refused(
        &env,
        &["revoke", "--serial", serial.as_str().unwrap()],
        "was already revoked at",
    );
    // A CA is not revoked through its own CRL.
    let ca = env
        .list()
        .into_iter()
        .find(|r| r["kind"] == "server-ca")
        .unwrap()["serial"]
        .clone();
    refused(
        &env,
        &["revoke", "--serial", ca.as_str().unwrap()],
        "is a server-ca certificate; only device, service and gateway certificates",
    );
}

#[test]
fn a_bad_crl_url_is_refused_before_anything_is_issued() {
    let env = Env::with_pki();
    for (url, says) in [
        ("https://pki.example/s.der", "must be an http:// URL"),
        ("ldap://pki.example/s.der", "must be an http:// URL"),
        ("pki.example/s.der", "not a URL"),
        ("http://pki.example/", "names no file"),
        (
            "http://pki example/s.der",
            "only printable ASCII without spaces",
        ),
        ("http:///s.der", "not a URL"),
        ("http://pki.example/\u{e9}.der", "only printable ASCII"),
        ("http://pki.example/s.der#x", "#fragment"),
    ] {
        refused(
            &env,
            &["gateway-cert", "localhost", "--crl-url", url, "--out", "gw"],
            says,
        );
    }
    assert!(!env.path("gw").exists());
    assert!(env.list().iter().all(|r| r["kind"] != "gateway"));
}

#[test]
fn corrupted_ca_files_are_named() {
    let env = Env::with_pki();
    std::fs::write(
        env.pki().join("device-ca.key"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    refused(
        &env,
        &["enroll", "sensor-1", "--out", "dev"],
        "device-ca.key is not a usable private key",
    );
    assert!(!env.path("dev").exists());

    let env = Env::with_pki();
    // A valid key that is not the device CA's.
    let server_key = std::fs::read(env.pki().join("server-ca.key")).unwrap();
    std::fs::write(env.pki().join("device-ca.key"), server_key).unwrap();
    refused(
        &env,
        &["enroll", "sensor-1", "--out", "dev"],
        "does not match the key in device-ca.key",
    );

    let env = Env::with_pki();
    std::fs::remove_file(env.pki().join("server-ca.pem")).unwrap();
    refused(
        &env,
        &["enroll", "sensor-1", "--out", "dev"],
        "server-ca.pem is missing",
    );
}

#[test]
fn bad_numbers_and_addresses_are_refused() {
    let env = Env::with_pki();
    refused(
        &env,
        &["enroll", "sensor-1", "--out", "dev", "--days", "0"],
        "--days must be between 1 and 3650, got 0",
    );
    refused(
        &env,
        &["bulk-enroll", "--count", "0", "--prefix", "p", "--out", "b"],
        "--count must be at least 1",
    );
    refused(
        &env,
        &["gateway-cert", "*.example.com", "--out", "gw"],
        "no wildcards",
    );
    refused(
        &env,
        &["gateway-cert", "--out", "gw"],
        "give at least one DNS name or --ip",
    );
    // clap refuses these before anything runs (exit code 2).
    for args in [
        &["enroll", "mcu-1", "--format", "nostd", "--out", "m"][..],
        &[
            "enroll",
            "mcu-1",
            "--format",
            "nostd",
            "--gateway",
            "nohost",
            "--out",
            "m",
        ][..],
        &["gateway-cert", "gw", "--ip", "1.2.3", "--out", "gw"][..],
    ] {
        let out = env.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!env.path("m").exists() && !env.path("gw").exists());
    }
}

#[test]
fn an_existing_bundle_is_never_overwritten_by_accident() {
    let env = Env::with_pki();
    env.ok(&["enroll", "sensor-1", "--out", "dev"]);
    let bundle = env.snapshot("dev");
    refused(
        &env,
        &["enroll", "sensor-2", "--out", "dev"],
        "dev/device.key already exists; choose another --out",
    );
    assert_eq!(bundle, env.snapshot("dev"));
    assert_eq!(
        env.list().iter().filter(|r| r["kind"] == "device").count(),
        1,
        "nothing was issued"
    );

    env.ok(&["gateway-cert", "localhost", "--out", "gw"]);
    refused(
        &env,
        &["gateway-cert", "localhost", "--out", "gw"],
        "gw/gateway.key already exists; write it to another --out",
    );

    env.ok(&[
        "bulk-enroll",
        "--count",
        "2",
        "--prefix",
        "b",
        "--out",
        "fleet",
    ]);
    std::fs::remove_dir_all(env.path("fleet/b-2")).unwrap();
    refused(
        &env,
        &[
            "bulk-enroll",
            "--count",
            "2",
            "--prefix",
            "b",
            "--out",
            "fleet",
        ],
        "fleet/b-1/device.key already exists",
    );

    // --replace re-enrolls into the same place.
    env.ok(&["enroll", "sensor-1", "--out", "dev", "--replace"]);
    assert_ne!(bundle, env.snapshot("dev"));
}

#[test]
fn replace_never_overwrites_another_identitys_bundle() {
    let env = Env::with_pki();
    env.ok(&["enroll", "sensor-1", "--out", "dev"]);
    let before = env.snapshot("dev");
    refused(
        &env,
        &["enroll", "sensor-2", "--out", "dev", "--replace"],
        "dev holds the bundle of sensor-1, not sensor-2",
    );
    assert_eq!(before, env.snapshot("dev"));
    env.ok(&[
        "enroll",
        "mcu-1",
        "--format",
        "nostd",
        "--gateway",
        "gw:8883",
        "--out",
        "mcu",
    ]);
    refused(
        &env,
        &[
            "enroll",
            "mcu-2",
            "--format",
            "nostd",
            "--gateway",
            "gw:8883",
            "--out",
            "mcu",
            "--replace",
        ],
        "mcu holds the bundle of mcu-1, not mcu-2",
    );
    env.ok(&[
        "enroll",
        "mcu-1",
        "--format",
        "nostd",
        "--gateway",
        "gw:8883",
        "--out",
        "mcu",
        "--replace",
    ]);
    refused(
        &env,
        &["enroll", "sensor-3", "--out", "d3", "--gateway", "gw:8883"],
        "--gateway is stored only in a microcontroller bundle",
    );
    assert!(!env.path("d3").exists());
    std::fs::write(env.path("x.csr"), "irrelevant").unwrap();
    refused(
        &env,
        &["sign-csr", "x.csr", "--out", "x.pem", "--replace"],
        "sign-csr --replace needs --id",
    );
}

#[test]
fn crl_numbers_never_repeat_even_after_a_lost_commit() {
    let env = Env::with_pki();
    env.ok(&[
        "bulk-enroll",
        "--count",
        "2",
        "--prefix",
        "n",
        "--out",
        "fleet",
    ]);
    // Simulate a revoke whose CRL was written but whose commit was lost:
    // keep the registry from before it, and the CRL from after it.
    let registry = env.pki().join("registry.db");
    let saved = std::fs::read(&registry).unwrap();
    env.ok(&["revoke", "n-1"]);
    let published = crl_number(&env);
    std::fs::write(&registry, saved).unwrap();
    env.ok(&["revoke", "n-2"]);
    assert!(crl_number(&env) > published, "a CRL number was reused");
}

fn crl_number(env: &Env) -> u64 {
    let text = common::openssl_ok(
        env.dir.path(),
        &["crl", "-in", "pki/crl.pem", "-noout", "-crlnumber"],
    );
    u64::from_str_radix(text.trim().trim_start_matches("crlNumber=0x"), 16).unwrap()
}

#[test]
fn the_registry_refuses_to_issue_from_an_expiring_ca_and_huge_batches() {
    let env = Env::with_pki();
    refused(
        &env,
        &[
            "bulk-enroll",
            "--count",
            "100001",
            "--prefix",
            "p",
            "--out",
            "f",
        ],
        "--count 100001 is too large",
    );
    refused(
        &env,
        &[
            "bulk-enroll",
            "--count",
            "2",
            "--start",
            "18446744073709551615",
            "--prefix",
            "p",
            "--out",
            "f",
        ],
        "runs past the largest number",
    );
    // A window reaching past year 9999 means "no limit", not a crash.
    let out = env.ok(&["list", "--expiring-within", "9000years"]);
    assert!(out.contains("3 certificates"), "{out}");
}
