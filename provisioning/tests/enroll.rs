//! Enrollment paths: CSRs made by openssl, microcontroller bundles, bulk
//! enrollment, and what `list` and `show` report.

mod common;

use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use common::{Env, mode, openssl, openssl_ok};
use twofold_protocol::Bundle;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Makes a key and a CSR with openssl, the way a device without Twofold's
/// agent would.
fn openssl_csr(env: &Env, name: &str, keygen: &[&str], extra: &[&str]) {
    let d = env.dir.path();
    let key = format!("{name}.key");
    openssl_ok(d, &[&["genpkey"][..], keygen, &["-out", &key]].concat());
    let csr = format!("{name}.csr");
    openssl_ok(
        d,
        &[&["req", "-new", "-key", &key, "-out", &csr][..], extra].concat(),
    );
}

const P256: &[&str] = &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];

#[test]
fn signs_an_openssl_csr_and_the_key_stays_on_the_device() {
    let env = Env::with_pki();
    openssl_csr(&env, "edge-7", P256, &["-subj", "/CN=edge-7"]);
    let out = env.ok(&[
        "sign-csr",
        "edge-7.csr",
        "--out",
        "edge-7.pem",
        "--id",
        "edge-7",
    ]);
    assert!(out.contains("signed CSR for device edge-7"), "{out}");
    let d = env.dir.path();
    openssl_ok(
        d,
        &[
            "verify",
            "-purpose",
            "sslclient",
            "-CAfile",
            "pki/root-ca.pem",
            "-untrusted",
            "edge-7.pem",
            "edge-7.pem",
        ],
    );
    let from_key = openssl_ok(d, &["pkey", "-in", "edge-7.key", "-pubout"]);
    let from_cert = openssl_ok(d, &["x509", "-in", "edge-7.pem", "-noout", "-pubkey"]);
    assert_eq!(from_key, from_cert);
    let text = openssl_ok(d, &["x509", "-in", "edge-7.pem", "-noout", "-text"]);
    assert!(
        text.contains("URI:spiffe://iot.example/device/edge-7"),
        "{text}"
    );
    // A DER CSR with the identity SAN already in it is accepted too.
    openssl_csr(
        &env,
        "edge-8",
        P256,
        &[
            "-subj",
            "/CN=edge-8",
            "-addext",
            "subjectAltName=URI:spiffe://iot.example/device/edge-8",
            "-outform",
            "DER",
        ],
    );
    env.ok(&["sign-csr", "edge-8.csr", "--out", "edge-8.pem"]);
}

#[test]
fn refuses_bad_csrs_with_specific_reasons() {
    let env = Env::with_pki();
    let cases: &[(&str, &[&str], &[&str], &str)] = &[
        (
            "rsa",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            &["-subj", "/CN=rsa"],
            "key is RSA; Twofold issues certificates for ECDSA P-256 keys only",
        ),
        (
            "p384",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
            &["-subj", "/CN=p384"],
            "key is ECDSA P-384",
        ),
        (
            "ed",
            &["-algorithm", "ED25519"],
            &["-subj", "/CN=ed"],
            "key is Ed25519",
        ),
        (
            "upper",
            P256,
            &["-subj", "/CN=Edge_7"],
            "subject CN \"Edge_7\" is not a valid device id",
        ),
        ("nocn", P256, &["-subj", "/O=Acme"], "subject has no CN"),
        (
            "evil",
            P256,
            &[
                "-subj",
                "/CN=evil",
                "-addext",
                "subjectAltName=URI:spiffe://other.example/device/evil",
            ],
            "the only one this CA grants is URI:spiffe://iot.example/device/evil",
        ),
        (
            "dns",
            P256,
            &[
                "-subj",
                "/CN=dns",
                "-addext",
                "subjectAltName=DNS:gateway.example",
            ],
            "requests subject alternative name DNS:gateway.example",
        ),
    ];
    for (name, keygen, extra, reason) in cases {
        openssl_csr(&env, name, keygen, extra);
        let before = env.snapshot("pki");
        let stderr = env.fails(&["sign-csr", &format!("{name}.csr"), "--out", "out.pem"]);
        assert!(
            stderr.contains(reason),
            "{name}: expected {reason:?} in {stderr}"
        );
        assert!(!env.path("out.pem").exists());
        assert_eq!(before, env.snapshot("pki"));
    }

    openssl_csr(&env, "good", P256, &["-subj", "/CN=good"]);
    let stderr = env.fails(&["sign-csr", "good.csr", "--out", "out.pem", "--id", "other"]);
    assert!(
        stderr.contains("request is for device \"good\" but --id says \"other\""),
        "{stderr}"
    );

    // Tamper with the signed part of a DER CSR: the signature no longer verifies.
    openssl_ok(
        env.dir.path(),
        &[
            "req", "-in", "good.csr", "-outform", "DER", "-out", "good.der",
        ],
    );
    let mut der = std::fs::read(env.path("good.der")).unwrap();
    let at = der.windows(4).position(|w| w == b"good").unwrap();
    der[at..at + 4].copy_from_slice(b"evil");
    std::fs::write(env.path("tampered.der"), der).unwrap();
    let stderr = env.fails(&["sign-csr", "tampered.der", "--out", "out.pem"]);
    assert!(stderr.contains("signature does not verify"), "{stderr}");

    std::fs::write(env.path("junk.csr"), "not a csr at all").unwrap();
    let stderr = env.fails(&["sign-csr", "junk.csr", "--out", "out.pem"]);
    assert!(
        stderr.contains("not a PKCS#10 certificate request"),
        "{stderr}"
    );
    let stderr = env.fails(&["sign-csr", "missing.csr", "--out", "out.pem"]);
    assert!(stderr.contains("missing.csr: No such file"), "{stderr}");
}

#[test]
fn nostd_bundle_holds_a_matching_key_the_chain_and_only_the_server_ca() {
    let env = Env::with_pki();
    env.ok(&[
        "enroll",
        "mcu-1",
        "--format",
        "nostd",
        "--gateway",
        "gw.iot.example:8883",
        "--out",
        "mcu",
    ]);
    assert_eq!(std::fs::read_dir(env.path("mcu")).unwrap().count(), 1);
    let path = env.path("mcu/bundle.bin");
    assert_eq!(mode(&path), 0o600);
    let bytes = std::fs::read(&path).unwrap();
    let bundle = Bundle::decode(&bytes).unwrap();
    assert_eq!(bundle.device_id.as_str(), "mcu-1");
    assert_eq!(
        (bundle.gateway_host, bundle.gateway_port, bundle.server_name),
        ("gw.iot.example", 8883, "gw.iot.example")
    );
    assert_eq!(bundle.chain.len(), 2);

    let pem_der = |file: &str| {
        pem::parse(std::fs::read(env.pki().join(file)).unwrap())
            .unwrap()
            .into_contents()
    };
    assert_eq!(bundle.server_ca, pem_der("server-ca.pem").as_slice());
    assert_eq!(bundle.chain[1], pem_der("device-ca.pem").as_slice());

    // The leaf is the registered certificate, and the key is its key.
    let (_, leaf) = X509Certificate::from_der(bundle.leaf()).unwrap();
    let listed = env
        .list()
        .into_iter()
        .find(|r| r["name"] == "mcu-1")
        .unwrap();
    assert_eq!(listed["serial"], hex::encode(leaf.raw_serial()));
    let public = leaf.public_key().subject_public_key.data.to_vec();
    EcdsaKeyPair::from_private_key_and_public_key(
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        bundle.private_key,
        &public,
    )
    .expect("bundle key matches the certificate");
}

#[test]
fn list_filters_and_show_reports_history() {
    let env = Env::with_pki();
    env.ok(&["enroll", "short", "--days", "10", "--out", "a"]);
    env.ok(&["enroll", "long", "--out", "b"]);
    env.ok(&["enroll", "gone", "--out", "c"]);
    env.ok(&["revoke", "gone", "--reason", "cessation-of-operation"]);
    env.ok(&["enroll", "--service", "billing", "--out", "s"]);

    let names = |args: &[&str]| -> Vec<String> {
        let json = env.ok(&[&["list", "--json"][..], args].concat());
        let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
        let mut names: Vec<String> = rows
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(&["--kind", "device"]), ["gone", "long", "short"]);
    assert_eq!(names(&["--kind", "service"]), ["billing"]);
    assert_eq!(names(&["--status", "revoked"]), ["gone"]);
    assert_eq!(names(&["--expiring-within", "20d"]), ["short"]);
    assert_eq!(
        names(&["--kind", "device", "--status", "active"]),
        ["long", "short"]
    );

    let table = env.ok(&["list"]);
    assert!(
        table.contains("revoked (cessation-of-operation)"),
        "{table}"
    );
    assert!(table.lines().next().unwrap().starts_with("KIND"), "{table}");

    let shown: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["show", "gone", "--json"])).unwrap();
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0]["identity"], "spiffe://iot.example/device/gone");
    assert_eq!(shown[0]["status"], "revoked");
    assert!(
        shown[0]["certificate_pem"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    let text = env.ok(&["show", "--service", "billing"]);
    assert!(
        text.contains("identity     spiffe://iot.example/service/billing"),
        "{text}"
    );
    let serial = shown[0]["serial"].as_str().unwrap();
    assert!(
        env.ok(&["show", "--serial", &serial.to_uppercase()])
            .contains("device gone")
    );
    let stderr = env.fails(&["show", "nobody"]);
    assert!(
        stderr.contains("no certificate was ever issued to device nobody"),
        "{stderr}"
    );
}

#[test]
fn bulk_enroll_writes_one_bundle_per_device() {
    let env = Env::with_pki();
    let out = env.ok(&[
        "bulk-enroll",
        "--count",
        "12",
        "--prefix",
        "pump",
        "--out",
        "fleet",
    ]);
    assert!(
        out.contains("enrolled 12 devices pump-01..pump-12"),
        "{out}"
    );
    for n in 1..=12 {
        let dir = env.path(&format!("fleet/pump-{n:02}"));
        assert_eq!(mode(&dir.join("device.key")), 0o600);
        let (ok, text) = openssl(
            env.dir.path(),
            &[
                "verify",
                "-CAfile",
                "pki/root-ca.pem",
                "-untrusted",
                &format!("fleet/pump-{n:02}/device.pem"),
                &format!("fleet/pump-{n:02}/device.pem"),
            ],
        );
        assert!(ok, "{text}");
    }
    // The same ids again are refused as a whole; with --replace they are reissued.
    let again = ["bulk-enroll", "--count", "12", "--prefix", "pump", "--out"];
    let stderr = env.fails(&[&again[..], &["fleet"]].concat());
    assert!(
        stderr.contains("fleet/pump-01/device.key already exists"),
        "{stderr}"
    );
    let stderr = env.fails(&[&again[..], &["elsewhere"]].concat());
    assert!(
        stderr.contains("device pump-01 already has an active certificate"),
        "{stderr}"
    );
    assert!(!env.path("elsewhere").exists());
    env.ok(&[
        "bulk-enroll",
        "--count",
        "2",
        "--prefix",
        "pump",
        "--start",
        "13",
        "--out",
        "fleet",
    ]);
    let devices = env
        .list()
        .into_iter()
        .filter(|r| r["kind"] == "device")
        .count();
    assert_eq!(devices, 14);
}

#[test]
fn what_a_csr_asks_for_beyond_its_key_and_name_is_ignored() {
    let env = Env::with_pki();
    openssl_csr(
        &env,
        "greedy",
        P256,
        &[
            "-subj",
            "/CN=greedy",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-addext",
            "extendedKeyUsage=serverAuth",
        ],
    );
    env.ok(&["sign-csr", "greedy.csr", "--out", "greedy.pem"]);
    let text = openssl_ok(
        env.dir.path(),
        &["x509", "-in", "greedy.pem", "-noout", "-text"],
    );
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(!text.contains("Certificate Sign"), "{text}");
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(!text.contains("TLS Web Server Authentication"), "{text}");
}

#[test]
fn a_bundle_rewritten_from_a_pki_without_a_server_crl_loses_the_stale_one() {
    let env = Env::with_pki();
    env.ok(&["enroll", "edge-9", "--out", "dev"]);
    assert!(env.path("dev/server-crl.pem").exists());
    // A PKI made before server CRLs existed has no server-crl.pem.
    std::fs::remove_file(env.pki().join("server-crl.pem")).unwrap();
    let out = env.ok(&["enroll", "edge-9", "--out", "dev", "--replace"]);
    let files = out
        .lines()
        .find(|l| l.trim_start().starts_with("files"))
        .unwrap();
    assert!(!files.contains("server-crl.pem"), "{out}");
    assert!(
        !env.path("dev/server-crl.pem").exists(),
        "the agent would check the gateway against the old bundle's CRL"
    );
    assert!(env.path("dev/device.pem").exists());
}
