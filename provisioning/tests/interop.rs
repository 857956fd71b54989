//! Third-party tools accept what provisioning issues: openssl verifies
//! every chain, shows the right extensions, reads the CRL and the
//! encrypted CA keys.

mod common;

use common::{Env, mode, openssl, openssl_ok};

#[test]
fn init_writes_a_private_pki_directory() {
    let env = Env::with_pki();
    let pki = env.pki();
    assert_eq!(mode(&pki), 0o700);
    for key in ["root-ca.key", "device-ca.key", "server-ca.key"] {
        assert_eq!(mode(&pki.join(key)), 0o600, "{key}");
    }
    for public in [
        "root-ca.pem",
        "device-ca.pem",
        "server-ca.pem",
        "crl.pem",
        "server-crl.pem",
    ] {
        assert_eq!(mode(&pki.join(public)), 0o644, "{public}");
    }
    // The directory holds the PKI and nothing else (no staging leftovers).
    let leftovers: Vec<_> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "pki")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn openssl_verifies_every_chain_for_its_purpose_only() {
    let env = Env::with_pki();
    env.ok(&["enroll", "sensor-1", "--out", "dev"]);
    env.ok(&["enroll", "--service", "billing", "--out", "svc"]);
    env.ok(&[
        "gateway-cert",
        "gw.iot.example",
        "localhost",
        "--ip",
        "127.0.0.1",
        "--out",
        "gw",
    ]);
    let d = env.dir.path();
    let client = [
        "verify",
        "-purpose",
        "sslclient",
        "-CAfile",
        "pki/root-ca.pem",
        "-untrusted",
    ];
    let server = [
        "verify",
        "-purpose",
        "sslserver",
        "-CAfile",
        "pki/root-ca.pem",
        "-untrusted",
    ];
    openssl_ok(
        d,
        &[&client[..], &["pki/device-ca.pem", "dev/device.pem"]].concat(),
    );
    openssl_ok(
        d,
        &[&client[..], &["pki/device-ca.pem", "svc/device.pem"]].concat(),
    );
    openssl_ok(
        d,
        &[&server[..], &["pki/server-ca.pem", "gw/gateway.pem"]].concat(),
    );
    // The chain files carry the intermediate, so they verify on their own.
    openssl_ok(
        d,
        &[
            "verify",
            "-CAfile",
            "pki/root-ca.pem",
            "-untrusted",
            "dev/device.pem",
            "dev/device.pem",
        ],
    );
    // What a device trusts: the server CA alone is enough for the gateway...
    openssl_ok(
        d,
        &[
            "verify",
            "-partial_chain",
            "-purpose",
            "sslserver",
            "-CAfile",
            "dev/server-ca.pem",
            "gw/gateway.pem",
        ],
    );
    // ...and refuses a device certificate presented as a server.
    let (ok, text) = openssl(
        d,
        &[
            "verify",
            "-partial_chain",
            "-CAfile",
            "dev/server-ca.pem",
            "dev/device.pem",
        ],
    );
    assert!(
        !ok && text.contains("unable to get local issuer certificate"),
        "{text}"
    );
    // Purposes do not cross.
    let (ok, text) = openssl(
        d,
        &[&server[..], &["pki/device-ca.pem", "dev/device.pem"]].concat(),
    );
    assert!(
        !ok && text.contains("unsuitable certificate purpose"),
        "{text}"
    );
    let (ok, text) = openssl(
        d,
        &[&client[..], &["pki/server-ca.pem", "gw/gateway.pem"]].concat(),
    );
    assert!(
        !ok && text.contains("unsuitable certificate purpose"),
        "{text}"
    );
}

fn x509_text(env: &Env, file: &str) -> String {
    openssl_ok(env.dir.path(), &["x509", "-in", file, "-noout", "-text"])
}

#[test]
fn openssl_shows_the_profile_of_each_kind() {
    let env = Env::with_pki();
    env.ok(&["enroll", "sensor-1", "--out", "dev"]);
    env.ok(&[
        "gateway-cert",
        "gw.iot.example",
        "--ip",
        "127.0.0.1",
        "--out",
        "gw",
    ]);

    let device = x509_text(&env, "dev/device.pem");
    assert!(device.contains("Subject: CN = sensor-1"), "{device}");
    assert!(
        device.contains("URI:spiffe://iot.example/device/sensor-1"),
        "{device}"
    );
    assert!(device.contains("CA:FALSE"), "{device}");
    assert!(device.contains("Digital Signature"), "{device}");
    assert!(device.contains("TLS Web Client Authentication"), "{device}");
    assert!(
        !device.contains("TLS Web Server Authentication"),
        "{device}"
    );
    assert!(device.contains("NIST CURVE: P-256"), "{device}");
    assert!(!device.contains("Certificate Sign"), "{device}");

    env.ok(&["enroll", "--service", "billing", "--out", "svc"]);
    let service = x509_text(&env, "svc/device.pem");
    assert!(
        service.contains("URI:spiffe://iot.example/service/billing"),
        "{service}"
    );
    assert!(service.contains("Subject: CN = billing"), "{service}");
    assert!(
        service.contains("TLS Web Client Authentication"),
        "{service}"
    );

    let gateway = x509_text(&env, "gw/gateway.pem");
    assert!(
        gateway.contains("TLS Web Server Authentication"),
        "{gateway}"
    );
    assert!(
        !gateway.contains("TLS Web Client Authentication"),
        "{gateway}"
    );
    assert!(gateway.contains("DNS:gw.iot.example"), "{gateway}");
    assert!(gateway.contains("IP Address:127.0.0.1"), "{gateway}");
    assert!(gateway.contains("CA:FALSE"), "{gateway}");

    for (file, eku) in [
        ("pki/device-ca.pem", "Client"),
        ("pki/server-ca.pem", "Server"),
    ] {
        let ca = x509_text(&env, file);
        assert!(ca.contains("CA:TRUE, pathlen:0"), "{ca}");
        assert!(ca.contains("Certificate Sign, CRL Sign"), "{ca}");
        assert!(
            ca.contains(&format!("TLS Web {eku} Authentication")),
            "{ca}"
        );
    }
    let root = x509_text(&env, "pki/root-ca.pem");
    assert!(root.contains("CA:TRUE, pathlen:1"), "{root}");
}

fn crl_number(env: &Env, file: &str) -> u64 {
    let text = openssl_ok(
        env.dir.path(),
        &["crl", "-in", file, "-noout", "-crlnumber"],
    );
    let hex = text.trim().trim_start_matches("crlNumber=0x");
    u64::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("crl number in {text:?}"))
}

#[test]
fn revocation_reaches_the_crl_and_openssl_refuses_the_certificate() {
    let env = Env::with_pki();
    env.ok(&["enroll", "sensor-1", "--out", "dev"]);
    let d = env.dir.path();
    let check = [
        "verify",
        "-crl_check",
        "-CRLfile",
        "pki/crl.pem",
        "-CAfile",
        "pki/root-ca.pem",
        "-untrusted",
        "pki/device-ca.pem",
        "dev/device.pem",
    ];
    openssl_ok(d, &check);
    let before = crl_number(&env, "pki/crl.pem");

    let out = env.ok(&["revoke", "sensor-1", "--reason", "key-compromise"]);
    assert!(out.contains("revoked device sensor-1"), "{out}");
    let (ok, text) = openssl(d, &check);
    assert!(!ok && text.contains("certificate revoked"), "{text}");
    assert!(crl_number(&env, "pki/crl.pem") > before);

    let serial = openssl_ok(d, &["x509", "-in", "dev/device.pem", "-noout", "-serial"]);
    let serial = serial.trim().trim_start_matches("serial=");
    let crl = openssl_ok(d, &["crl", "-in", "pki/crl.pem", "-noout", "-text"]);
    assert!(crl.contains(&format!("Serial Number: {serial}")), "{crl}");
    assert!(crl.contains("Key Compromise"), "{crl}");
    assert!(
        crl.contains("Issuer: CN = Twofold device CA iot.example"),
        "{crl}"
    );
    // The CRL is signed by the device CA.
    openssl_ok(
        d,
        &[
            "crl",
            "-in",
            "pki/crl.pem",
            "-noout",
            "-CAfile",
            "pki/device-ca.pem",
        ],
    );
}

/// A gateway certificate is revoked through the server CA's own CRL, which
/// its CRL distribution point names; the device CA's CRL and number
/// sequence are untouched, and a gateway that is not revoked still passes.
#[test]
fn a_revoked_gateway_certificate_is_refused_through_the_server_crl() {
    let env = Env::with_pki();
    let url = "http://pki.iot.example/server-crl.der";
    for out in ["gw", "gw2"] {
        env.ok(&[
            "gateway-cert",
            "gw.iot.example",
            "--crl-url",
            url,
            "--out",
            out,
        ]);
    }
    let gateway = x509_text(&env, "gw/gateway.pem");
    assert!(
        gateway.contains("X509v3 CRL Distribution Points"),
        "{gateway}"
    );
    assert!(gateway.contains(&format!("URI:{url}")), "{gateway}");
    // Without --crl-url there is no distribution point.
    env.ok(&["gateway-cert", "gw.iot.example", "--out", "gw3"]);
    assert!(!x509_text(&env, "gw3/gateway.pem").contains("CRL Distribution"));

    // Devices get the server CRL in their bundle.
    env.ok(&["enroll", "sensor-1", "--out", "dev"]);
    assert_eq!(
        std::fs::read(env.path("dev/server-crl.pem")).unwrap(),
        std::fs::read(env.pki().join("server-crl.pem")).unwrap()
    );

    let d = env.dir.path();
    let check = |leaf: &str| {
        openssl(
            d,
            &[
                "verify",
                "-crl_check",
                "-purpose",
                "sslserver",
                "-CRLfile",
                "pki/server-crl.pem",
                "-CAfile",
                "pki/root-ca.pem",
                "-untrusted",
                "pki/server-ca.pem",
                leaf,
            ],
        )
    };
    let (ok, text) = check("gw/gateway.pem");
    assert!(ok, "{text}");
    let device_crl = crl_number(&env, "pki/crl.pem");
    let server_crl = crl_number(&env, "pki/server-crl.pem");

    let serial = openssl_ok(d, &["x509", "-in", "gw/gateway.pem", "-noout", "-serial"]);
    let serial = serial.trim().trim_start_matches("serial=").to_owned();
    let out = env.ok(&["revoke", "--serial", &serial, "--reason", "key-compromise"]);
    assert!(out.contains("server-crl.pem regenerated"), "{out}");
    let (ok, text) = check("gw/gateway.pem");
    assert!(!ok && text.contains("certificate revoked"), "{text}");
    let (ok, text) = check("gw2/gateway.pem");
    assert!(ok, "{text}");

    assert_eq!(crl_number(&env, "pki/server-crl.pem"), server_crl + 1);
    assert_eq!(crl_number(&env, "pki/crl.pem"), device_crl);
    let crl = openssl_ok(d, &["crl", "-in", "pki/server-crl.pem", "-noout", "-text"]);
    assert!(crl.contains(&format!("Serial Number: {serial}")), "{crl}");
    assert!(
        crl.contains("Issuer: CN = Twofold server CA iot.example"),
        "{crl}"
    );
    let device = openssl_ok(d, &["crl", "-in", "pki/crl.pem", "-noout", "-text"]);
    assert!(!device.contains(&serial), "{device}");

    // What is published at the URL: DER, signed by the server CA.
    env.ok(&["crl", "--server", "--der", "--out", "server-crl.der"]);
    openssl_ok(
        d,
        &[
            "crl",
            "-inform",
            "DER",
            "-in",
            "server-crl.der",
            "-noout",
            "-CAfile",
            "pki/server-ca.pem",
        ],
    );
    assert_eq!(crl_number(&env, "pki/server-crl.pem"), server_crl + 2);
    assert_eq!(crl_number(&env, "pki/crl.pem"), device_crl);
}

#[test]
fn crl_command_writes_pem_or_der_with_a_new_number() {
    let env = Env::with_pki();
    let first = crl_number(&env, "pki/crl.pem");
    env.ok(&["crl", "--out", "fresh.pem"]);
    assert_eq!(crl_number(&env, "fresh.pem"), first + 1);
    assert_eq!(crl_number(&env, "pki/crl.pem"), first + 1);
    env.ok(&["crl", "--out", "fresh.der", "--der"]);
    let text = openssl_ok(
        env.dir.path(),
        &[
            "crl",
            "-inform",
            "DER",
            "-in",
            "fresh.der",
            "-noout",
            "-crlnumber",
        ],
    );
    assert_eq!(text.trim(), format!("crlNumber=0x{:02X}", first + 2));
}

#[test]
fn encrypted_ca_keys_are_standard_pkcs8_and_need_the_passphrase() {
    let env = Env::empty();
    let init = env.run_with_passphrase(
        &["init", "--trust-domain", "iot.example", "--encrypt"],
        "correct horse",
    );
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    for file in ["root-ca.key", "device-ca.key", "server-ca.key"] {
        let key = std::fs::read_to_string(env.pki().join(file)).unwrap();
        assert!(
            key.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"),
            "{file}"
        );
    }
    let key = std::fs::read_to_string(env.pki().join("device-ca.key")).unwrap();
    assert!(
        key.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"),
        "{key}"
    );
    // openssl reads it with the same passphrase, and not with another.
    let d = env.dir.path();
    openssl_ok(
        d,
        &[
            "pkey",
            "-in",
            "pki/device-ca.key",
            "-passin",
            "pass:correct horse",
            "-noout",
        ],
    );
    let (ok, _) = openssl(
        d,
        &[
            "pkey",
            "-in",
            "pki/device-ca.key",
            "-passin",
            "pass:wrong",
            "-noout",
        ],
    );
    assert!(!ok);

    let before = env.snapshot("pki");
    let no_pass = env.fails(&["enroll", "sensor-1", "--out", "dev"]);
    assert!(
        no_pass.contains("device-ca.key is encrypted and no passphrase was given"),
        "{no_pass}"
    );
    let wrong = env.run_with_passphrase(&["enroll", "sensor-1", "--out", "dev"], "wrong");
    assert_eq!(wrong.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        stderr.contains("wrong passphrase for") && stderr.contains("device-ca.key"),
        "{stderr}"
    );
    assert!(!env.path("dev").exists());
    assert_eq!(
        before,
        env.snapshot("pki"),
        "a refused command changed the PKI"
    );

    let right = env.run_with_passphrase(&["enroll", "sensor-1", "--out", "dev"], "correct horse");
    assert!(
        right.status.success(),
        "{}",
        String::from_utf8_lossy(&right.stderr)
    );
    openssl_ok(
        d,
        &[
            "verify",
            "-CAfile",
            "pki/root-ca.pem",
            "-untrusted",
            "dev/device.pem",
            "dev/device.pem",
        ],
    );
}

#[test]
fn the_issued_key_matches_the_certificate() {
    let env = Env::with_pki();
    env.ok(&["enroll", "sensor-1", "--out", "dev"]);
    let d = env.dir.path();
    let from_key = openssl_ok(d, &["pkey", "-in", "dev/device.key", "-pubout"]);
    let from_cert = openssl_ok(d, &["x509", "-in", "dev/device.pem", "-noout", "-pubkey"]);
    assert_eq!(from_key, from_cert);
    assert_eq!(mode(&env.path("dev/device.key")), 0o600);
    assert_eq!(mode(&env.path("dev")), 0o700);
}
