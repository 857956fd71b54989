//! The CA service (`provisioning serve`) from outside: the real binary,
//! real TLS with client certificates, and curl and openssl as clients.
//!
//! Every accepted case and every refusal is asserted with its code and
//! reason as the service sends it.

use std::path::{Path, PathBuf};
use std::process::Command;

use twofold_tests::process::{Proc, built, free_port, run_bounded, spawn, wait_port};

struct Ca {
    dir: tempfile::TempDir,
    port: u16,
    _serve: Proc,
}

fn provisioning(dir: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new(built("provisioning"));
    cmd.current_dir(dir)
        .env_remove("TWOFOLD_CA_PASSPHRASE")
        .args(args);
    let out = run_bounded(cmd, 60);
    assert!(
        out.status.success(),
        "provisioning {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Ca {
    /// A PKI with devices pump-1 … pump-3, the gateway service `gw` (a
    /// registration authority) and the service `billing` (not one), and the
    /// CA service running with `extra` arguments.
    fn start(extra: &[&str]) -> Ca {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        provisioning(d, &["init", "--trust-domain", "iot.example"]);
        provisioning(
            d,
            &[
                "gateway-cert",
                "localhost",
                "--ip",
                "127.0.0.1",
                "--out",
                "svc",
            ],
        );
        for id in ["pump-1", "pump-2", "pump-3"] {
            provisioning(d, &["enroll", id, "--out", id]);
        }
        for name in ["gw", "billing"] {
            provisioning(d, &["enroll", "--service", name, "--out", name]);
        }
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(built("provisioning"));
        cmd.current_dir(d).args([
            "serve",
            "--listen",
            &listen,
            "--cert",
            "svc/gateway.pem",
            "--key",
            "svc/gateway.key",
            "--ra",
            "gw",
        ]);
        cmd.args(extra);
        let serve = spawn(cmd, d.join("serve.log"));
        wait_port(port, "provisioning serve");
        Ca {
            dir,
            port,
            _serve: serve,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// curl as the holder of `who/` (device.pem / service.pem), returning
    /// the HTTP status and the JSON body.
    fn post(&self, who: &str, endpoint: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let (chain, key) = self.credentials(who);
        let mut cmd = Command::new("curl");
        cmd.args(["--silent", "--show-error", "--max-time", "20"])
            .arg("--cacert")
            .arg(self.path(&format!("{who}/server-ca.pem")))
            .arg("--cert")
            .arg(chain)
            .arg("--key")
            .arg(key)
            .args(["--write-out", "\n%{http_code}", "--json"])
            .arg(body.to_string())
            .arg(format!("https://localhost:{}/v1/{endpoint}", self.port));
        let out = run_bounded(cmd, 30);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "curl failed: {text}{}\nservice log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        let (json, code) = text.rsplit_once('\n').unwrap();
        let json = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json:?}"));
        (code.parse().unwrap(), json)
    }

    /// curl GET as the holder of `who/` with extra request headers;
    /// returns the status and the response headers and body as text.
    fn get(&self, who: &str, path: &str, headers: &[String]) -> (u16, String) {
        let (chain, key) = self.credentials(who);
        let mut cmd = Command::new("curl");
        cmd.args(["--silent", "--show-error", "--max-time", "20", "--include"])
            .arg("--cacert")
            .arg(self.path(&format!("{who}/server-ca.pem")))
            .arg("--cert")
            .arg(chain)
            .arg("--key")
            .arg(key);
        for h in headers {
            cmd.arg("-H").arg(h);
        }
        cmd.args(["--write-out", "\n%{http_code}"])
            .arg(format!("https://localhost:{}{path}", self.port));
        let out = run_bounded(cmd, 30);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "curl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (answer, code) = text.rsplit_once('\n').unwrap();
        (code.parse().unwrap(), answer.to_owned())
    }

    fn credentials(&self, who: &str) -> (PathBuf, PathBuf) {
        let dir = self.path(who);
        for base in ["device", "service"] {
            let chain = dir.join(format!("{base}.pem"));
            if chain.exists() {
                return (chain, dir.join(format!("{base}.key")));
            }
        }
        panic!("no credentials in {}", dir.display());
    }

    /// The serial of the certificate in `who/`, as hex.
    fn serial(&self, who: &str) -> String {
        let (chain, _) = self.credentials(who);
        let out = openssl(
            self.dir.path(),
            &["x509", "-noout", "-serial", "-in", chain.to_str().unwrap()],
        );
        out.trim().trim_start_matches("serial=").to_lowercase()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("serve.log")).unwrap_or_default()
    }
}

fn openssl(dir: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new("openssl");
    cmd.current_dir(dir).args(args);
    let out = run_bounded(cmd, 30);
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A new P-256 key in `key` and a CSR for CN = `cn` made by openssl in
/// `dir`, written as `out` says (`-out FILE`, perhaps `-outform DER`).
fn openssl_csr(dir: &Path, cn: &str, key: &str, out: &[&str]) {
    let subject = format!("/CN={cn}");
    let mut args = vec![
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key,
        "-subj",
        &subject,
    ];
    args.extend_from_slice(out);
    openssl(dir, &args);
}

fn assert_refused(answer: (u16, serde_json::Value), status: u16, code: &str, reason: &str) {
    let (got, body) = answer;
    assert_eq!(body["status"], "refused", "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(got, status, "{body}");
    let text = body["reason"].as_str().unwrap();
    assert!(
        text.contains(reason),
        "reason {text:?} should say {reason:?}"
    );
}

fn identity(id: &str) -> String {
    format!("spiffe://iot.example/device/{id}")
}

#[test]
fn a_device_renews_its_own_certificate_and_a_repeat_gets_the_same_one() {
    let ca = Ca::start(&["--allow-early"]);
    let old = ca.serial("pump-1");
    let (status, first) = ca.post("pump-1", "renew", serde_json::json!({"request_id": "r1"}));
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["status"], "issued");
    assert_eq!(first["repeated"], false);
    let chain = first["chain"].as_str().unwrap();
    std::fs::write(ca.path("new.pem"), chain).unwrap();
    // openssl agrees: the device CA issued it, for pump-1's identity.
    let text = openssl(
        ca.dir.path(),
        &["x509", "-noout", "-text", "-in", "new.pem"],
    );
    assert!(
        text.contains(&format!("URI:{}", identity("pump-1"))),
        "{text}"
    );
    let verified = openssl(
        ca.dir.path(),
        &[
            "verify",
            "-CAfile",
            "pki/root-ca.pem",
            "-untrusted",
            "pki/device-ca.pem",
            "new.pem",
        ],
    );
    assert!(verified.contains("new.pem: OK"), "{verified}");
    assert_ne!(first["serial"].as_str().unwrap(), old);

    let (status, again) = ca.post("pump-1", "renew", serde_json::json!({"request_id": "r1"}));
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["serial"], first["serial"]);
    assert_eq!(again["repeated"], true);

    // The device commits the new certificate; the old one lands on the CRL.
    let (status, done) = ca.post(
        "pump-1",
        "commit",
        serde_json::json!({"identity": identity("pump-1"), "serial": first["serial"]}),
    );
    // A device is not a registration authority, even for itself: it commits
    // by renewing from the new certificate or through the gateway.
    assert_refused(
        (status, done),
        403,
        "not-authorized",
        "may renew only its own",
    );
    let (status, done) = ca.post(
        "gw",
        "commit",
        serde_json::json!({"identity": identity("pump-1"), "serial": first["serial"]}),
    );
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["changed"], true);
    let crl = openssl(
        ca.dir.path(),
        &["crl", "-noout", "-text", "-in", "pki/crl.pem"],
    );
    assert!(
        crl.to_lowercase().replace(':', "").contains(&old),
        "old serial {old} not on the CRL:\n{crl}"
    );
    // The superseded certificate may not renew again.
    assert_refused(
        ca.post("pump-1", "renew", serde_json::json!({"request_id": "r2"})),
        409,
        "not-latest",
        "not the newest",
    );
}

#[test]
fn only_a_registration_authority_renews_for_a_device() {
    let ca = Ca::start(&["--allow-early", "--rate-limit", "3"]);
    let serial = ca.serial("pump-2");
    let on_behalf = serde_json::json!({
        "request_id": "g1", "identity": identity("pump-2"), "serial": serial,
    });
    // Another service, and another device, may not ask for pump-2.
    assert_refused(
        ca.post("billing", "renew", on_behalf.clone()),
        403,
        "not-authorized",
        "spiffe://iot.example/service/billing is not a registration authority",
    );
    assert_refused(
        ca.post("pump-3", "renew", on_behalf.clone()),
        403,
        "not-authorized",
        "not a registration authority",
    );
    // The gateway may, and the certificate is pump-2's.
    let (status, issued) = ca.post("gw", "renew", on_behalf);
    assert_eq!(status, 200, "{issued}");
    std::fs::write(ca.path("p2.pem"), issued["chain"].as_str().unwrap()).unwrap();
    let text = openssl(ca.dir.path(), &["x509", "-noout", "-text", "-in", "p2.pem"]);
    assert!(
        text.contains(&format!("URI:{}", identity("pump-2"))),
        "{text}"
    );

    // A CSR naming another device is refused; the key is not certified.
    let dir = ca.dir.path();
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "k.pem",
            "-subj",
            "/CN=pump-3",
            "-out",
            "other.csr",
        ],
    );
    let csr = std::fs::read_to_string(ca.path("other.csr")).unwrap();
    assert_refused(
        ca.post(
            "gw",
            "renew",
            serde_json::json!({
                "request_id": "g2", "identity": identity("pump-2"), "serial": serial, "csr": csr,
            }),
        ),
        400,
        "invalid-csr",
        "names \"pump-3\" but the requester is \"pump-2\"",
    );
    // Someone else's serial.
    assert_refused(
        ca.post(
            "gw",
            "renew",
            serde_json::json!({
                "request_id": "g3", "identity": identity("pump-2"), "serial": ca.serial("pump-3"),
            }),
        ),
        403,
        "unknown-certificate",
        "not this identity's",
    );
    // The rate limit: three requests of pump-2 in the window, then 429.
    let (status, limited) = ca.post(
        "gw",
        "renew",
        serde_json::json!({"request_id": "g4", "identity": identity("pump-2"), "serial": serial}),
    );
    assert_refused(
        (status, limited.clone()),
        429,
        "rate-limited",
        "too many renewal requests",
    );
    assert!(limited["retry_after"].as_u64().unwrap() > 0, "{limited}");
    // Other devices are not held up by pump-2's limit.
    let (status, own) = ca.post("pump-3", "renew", serde_json::json!({"request_id": "x"}));
    assert_eq!(status, 200, "{own}");
    // A registration authority whose identity the operator revoked (a
    // stolen gateway) may no longer ask, for anyone.
    provisioning(
        ca.dir.path(),
        &["revoke", "--service", "gw", "--reason", "key-compromise"],
    );
    let on_behalf = serde_json::json!({
        "request_id": "g9", "identity": identity("pump-3"), "serial": ca.serial("pump-3"),
    });
    assert_refused(
        ca.post("gw", "renew", on_behalf),
        403,
        "revoked",
        "spiffe://iot.example/service/gw's certificate",
    );
}

#[test]
fn revoked_devices_early_requests_and_strangers_are_refused() {
    let ca = Ca::start(&[]);
    // Not due: a fresh 30-day certificate renews at about day 19.
    assert_refused(
        ca.post("pump-1", "renew", serde_json::json!({"request_id": "r1"})),
        409,
        "not-due",
        "renewal is not due until",
    );
    assert_refused(
        ca.post(
            "pump-1",
            "renew",
            serde_json::json!({"request_id": "no spaces"}),
        ),
        400,
        "bad-request-id",
        "request id",
    );
    // Revoked by the operator while the service runs.
    provisioning(
        ca.dir.path(),
        &["revoke", "pump-2", "--reason", "key-compromise"],
    );
    assert_refused(
        ca.post("pump-2", "renew", serde_json::json!({"request_id": "r1"})),
        403,
        "revoked",
        "revoked (key-compromise)",
    );
    // Malformed JSON and unknown fields get a reason, not a crash.
    assert_refused(
        ca.post(
            "pump-1",
            "renew",
            serde_json::json!({"request_id": "r1", "name": "pump-2"}),
        ),
        400,
        "bad-request",
        "unknown field",
    );
    // No client certificate (EST's cacerts and token enrollment need
    // none): the API refuses the caller.
    let (status, body) = ca.anonymous("/v1/renew", Some("{\"request_id\":\"r9\"}"), &[]);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("no-identity"), "{body}");
}

impl Ca {
    /// curl without a client certificate; the status and the body.
    fn anonymous(&self, path: &str, json: Option<&str>, args: &[&str]) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["--silent", "--show-error", "--max-time", "20", "--cacert"])
            .arg(self.path("pump-1/server-ca.pem"))
            .args(["--write-out", "\n%{http_code}"])
            .args(args);
        if let Some(json) = json {
            cmd.args(["--json", json]);
        }
        cmd.arg(format!("https://localhost:{}{path}", self.port));
        let out = run_bounded(cmd, 30);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.parse().unwrap(), body.to_owned())
    }

    /// Writes an EST answer (base64 PKCS#7) to `name` and prints its
    /// certificates with openssl.
    fn pkcs7_certs(&self, name: &str, body: &str) -> String {
        std::fs::write(self.path(name), body).unwrap();
        let der = format!("{name}.der");
        openssl(
            self.dir.path(),
            &["base64", "-d", "-A", "-in", name, "-out", &der],
        );
        openssl(
            self.dir.path(),
            &[
                "pkcs7",
                "-inform",
                "DER",
                "-in",
                &der,
                "-print_certs",
                "-text",
                "-noout",
            ],
        )
    }

    /// A P-256 key and CSR (CN = `cn`) made by openssl, the CSR as base64 DER.
    fn est_csr(&self, cn: &str) -> PathBuf {
        let d = self.dir.path();
        let key = format!("{cn}.est.key");
        let der = format!("{cn}.csr.der");
        let b64 = format!("{cn}.csr.b64");
        openssl_csr(d, cn, &key, &["-outform", "DER", "-out", &der]);
        openssl(d, &["base64", "-in", &der, "-out", &b64]);
        self.path(&b64)
    }
}

/// EST (RFC 7030) with curl and openssl as the client: cacerts,
/// simplereenroll with the device's certificate, simpleenroll with a
/// one-time token, and csrattrs.
#[test]
fn est_clients_enroll_and_re_enroll_with_curl_and_openssl() {
    let ca = Ca::start(&["--allow-early"]);
    // cacerts: the device CA, as certs-only PKCS#7.
    let (status, body) = ca.anonymous("/.well-known/est/cacerts", None, &[]);
    assert_eq!(status, 200, "{body}");
    let printed = ca.pkcs7_certs("cacerts.b64", &body);
    let device_ca = openssl(
        ca.dir.path(),
        &["x509", "-noout", "-subject", "-in", "pki/device-ca.pem"],
    );
    let device_ca = device_ca.trim().trim_start_matches("subject=");
    // openssl prints "CN = x" here and "CN=x" there.
    let squeeze = |s: &str| s.replace(' ', "");
    assert!(
        squeeze(&printed).contains(&squeeze(device_ca)),
        "{device_ca} not in:\n{printed}"
    );

    // simplereenroll: pump-1's current certificate, a new key's CSR.
    let csr = ca.est_csr("pump-1");
    let (chain, key) = ca.credentials("pump-1");
    let mut cmd = Command::new("curl");
    cmd.args(["--silent", "--show-error", "--max-time", "20", "--cacert"])
        .arg(ca.path("pump-1/server-ca.pem"))
        .arg("--cert")
        .arg(&chain)
        .arg("--key")
        .arg(&key)
        .args(["-H", "Content-Type: application/pkcs10"])
        .args(["--write-out", "\n%{http_code}", "--data-binary"])
        .arg(format!("@{}", csr.display()))
        .arg(format!(
            "https://localhost:{}/.well-known/est/simplereenroll",
            ca.port
        ));
    let out = run_bounded(cmd, 30);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    assert_eq!(code, "200", "{body}\n{}", ca.log());
    let printed = ca.pkcs7_certs("reenroll.b64", body);
    assert!(
        printed.contains(&format!("URI:{}", identity("pump-1"))),
        "{printed}"
    );
    // It certifies openssl's new key.
    let d = ca.dir.path();
    let new_key = openssl(d, &["pkey", "-in", "pump-1.est.key", "-pubout"]);
    openssl(
        d,
        &[
            "pkcs7",
            "-inform",
            "DER",
            "-in",
            "reenroll.b64.der",
            "-print_certs",
            "-out",
            "reenrolled.pem",
        ],
    );
    let issued_key = openssl(d, &["x509", "-in", "reenrolled.pem", "-pubkey", "-noout"]);
    assert_eq!(issued_key, new_key);

    // simpleenroll: a device never enrolled, with its one-time token.
    let token = provisioning(d, &["est-token", "pump-9"]);
    let token = token.trim();
    let csr = ca.est_csr("pump-9");
    let enroll = |user: &str| {
        let credentials = format!("{user}:{token}");
        let body = format!("@{}", csr.display());
        ca.anonymous(
            "/.well-known/est/simpleenroll",
            None,
            &[
                "-u",
                &credentials,
                "-H",
                "Content-Type: application/pkcs10",
                "--data-binary",
                &body,
            ],
        )
    };
    // Another device's id with this token: refused.
    let (status, body) = enroll("pump-8");
    assert_eq!(status, 401, "{body}");
    assert!(
        body.contains("unknown, used, expired or for another device"),
        "{body}"
    );
    let (status, body) = enroll("pump-9");
    assert_eq!(status, 200, "{body}\n{}", ca.log());
    let printed = ca.pkcs7_certs("enroll.b64", &body);
    assert!(
        printed.contains(&format!("URI:{}", identity("pump-9"))),
        "{printed}"
    );
    // The token worked once.
    let (status, body) = enroll("pump-9");
    assert_eq!(status, 401, "{body}");
    // No credentials at all.
    let (status, body) = ca.anonymous("/.well-known/est/simpleenroll", Some("{}"), &[]);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("HTTP Basic"), "{body}");

    // csrattrs: P-256 and ECDSA with SHA-256.
    let (status, body) = ca.anonymous("/.well-known/est/csrattrs", None, &[]);
    assert_eq!(status, 200, "{body}");
    std::fs::write(ca.path("attrs.b64"), &body).unwrap();
    openssl(
        d,
        &[
            "base64",
            "-d",
            "-A",
            "-in",
            "attrs.b64",
            "-out",
            "attrs.der",
        ],
    );
    let parsed = openssl(d, &["asn1parse", "-inform", "DER", "-in", "attrs.der"]);
    assert!(
        parsed.contains("prime256v1") && parsed.contains("ecdsa-with-SHA256"),
        "{parsed}"
    );
}

/// A factory CA made by openssl, and certificates from it as a device
/// maker would install them: CN = the device id, clientAuth, perhaps a
/// SAN URI that tries to pass for an enrolled device.
struct FactoryCa {
    dir: tempfile::TempDir,
}

impl FactoryCa {
    fn new() -> FactoryCa {
        let dir = tempfile::tempdir().unwrap();
        openssl(
            dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "factory-ca.key",
                "-out",
                "factory-ca.pem",
                "-subj",
                "/CN=Pump Factory CA",
                "-days",
                "30",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        FactoryCa { dir }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("factory-ca.pem")
    }

    /// A certificate and key for `cn`, with `san` (a URI) if given.
    fn issue(&self, cn: &str, san: Option<&str>) -> (PathBuf, PathBuf) {
        let d = self.dir.path();
        let mut ext = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n".to_owned();
        if let Some(uri) = san {
            ext.push_str(&format!("subjectAltName=URI:{uri}\n"));
        }
        std::fs::write(d.join(format!("{cn}.ext")), ext).unwrap();
        let (key, csr, pem) = (
            format!("{cn}.key"),
            format!("{cn}.csr"),
            format!("{cn}.pem"),
        );
        openssl_csr(d, cn, &key, &["-out", &csr]);
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "factory-ca.pem",
                "-CAkey",
                "factory-ca.key",
                "-CAcreateserial",
                "-days",
                "30",
                "-out",
                &pem,
                "-extfile",
                &format!("{cn}.ext"),
            ],
        );
        (d.join(pem), d.join(key))
    }
}

impl Ca {
    /// curl with `cert`/`key` as the client certificate: POSTs `csr`
    /// (base64 DER) to `path`, or JSON when `json` is given.
    fn with_cert(
        &self,
        cert: &Path,
        key: &Path,
        path: &str,
        body: Result<&Path, &str>,
    ) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["--silent", "--show-error", "--max-time", "20", "--cacert"])
            .arg(self.path("pump-1/server-ca.pem"))
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .args(["--write-out", "\n%{http_code}"]);
        match body {
            Ok(csr) => cmd
                .args(["-H", "Content-Type: application/pkcs10", "--data-binary"])
                .arg(format!("@{}", csr.display())),
            Err(json) => cmd.args(["--json", json]),
        };
        cmd.arg(format!("https://localhost:{}{path}", self.port));
        let out = run_bounded(cmd, 30);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.parse().unwrap(), body.to_owned())
    }
}

/// EST simpleenroll with a factory certificate from a bootstrap CA: a
/// device's first certificate, once; never an identity anywhere else.
#[test]
fn a_factory_certificate_enrolls_its_device_once_and_nothing_more() {
    let factory = FactoryCa::new();
    let bootstrap = factory.ca();
    let ca = Ca::start(&["--est-bootstrap-ca", bootstrap.to_str().unwrap()]);
    let enroll = "/.well-known/est/simpleenroll";

    // pump-9's factory certificate and a CSR for pump-9: its first certificate.
    let (cert, key) = factory.issue("pump-9", None);
    let csr = ca.est_csr("pump-9");
    let (status, body) = ca.with_cert(&cert, &key, enroll, Ok(&csr));
    assert_eq!(status, 200, "{body}\n{}", ca.log());
    let printed = ca.pkcs7_certs("factory.b64", &body);
    assert!(
        printed.contains(&format!("URI:{}", identity("pump-9"))),
        "{printed}"
    );
    assert!(
        ca.log()
            .contains("enrolled over EST with a factory certificate"),
        "{}",
        ca.log()
    );

    // Once: the same certificate again, or any for an enrolled device.
    let (status, body) = ca.with_cert(&cert, &key, enroll, Ok(&csr));
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("enrolls a device once"), "{body}");
    let (cert1, key1) = factory.issue("pump-1", None);
    let csr1 = ca.est_csr("pump-1");
    let (status, body) = ca.with_cert(&cert1, &key1, enroll, Ok(&csr1));
    assert_eq!(status, 409, "{body}");

    // The CSR must name the device the factory certificate names.
    let (cert7, key7) = factory.issue("pump-7", None);
    let csr8 = ca.est_csr("pump-8");
    let (status, body) = ca.with_cert(&cert7, &key7, enroll, Ok(&csr8));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid CSR"), "{body}");

    // A factory certificate is never an identity, whatever it names: one
    // carrying pump-1's identity URI may not renew pump-1.
    let (forged, forged_key) = factory.issue("pump-6", Some(&identity("pump-1")));
    let (status, body) = ca.with_cert(
        &forged,
        &forged_key,
        "/v1/renew",
        Err("{\"request_id\":\"f1\"}"),
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("may only enroll"), "{body}");
    let (status, body) = ca.with_cert(
        &forged,
        &forged_key,
        "/.well-known/est/simplereenroll",
        Ok(&csr1),
    );
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("may only enroll"), "{body}");
}

/// EST with a second client that is not ours: the `est-ca` crate's
/// (reqwest over native TLS, its own CSR and PKCS#7 code): cacerts,
/// simpleenroll with a token, simplereenroll with a device certificate.
#[test]
fn est_enrolls_and_re_enrolls_with_the_est_ca_crates_client() {
    use est_ca::est::client;
    let ca = Ca::start(&["--allow-early"]);
    let d = ca.dir.path();
    let base = format!("https://localhost:{}", ca.port);
    // OpenSSL (native-tls) wants the chain up to the root; curl accepts
    // the server CA alone.
    let root = reqwest::Certificate::from_pem(&std::fs::read(ca.path("pki/root-ca.pem")).unwrap())
        .unwrap();
    let anonymous = reqwest::Client::builder()
        .add_root_certificate(root.clone())
        .build()
        .unwrap();
    let (chain, key) = ca.credentials("pump-1");
    let credentials = reqwest::Identity::from_pkcs8_pem(
        &std::fs::read(&chain).unwrap(),
        &std::fs::read(&key).unwrap(),
    )
    .unwrap();
    let pump_1 = reqwest::Client::builder()
        .add_root_certificate(root)
        .identity(credentials)
        .build()
        .unwrap();
    let token = provisioning(d, &["est-token", "pump-9"]);
    let token = token.trim().to_owned();
    let der = |path: &str| {
        let text = std::fs::read(ca.path(path)).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&text).unwrap();
        pem.contents
    };
    let uri_of = |cert: &[u8]| {
        let (_, c) = x509_parser::parse_x509_certificate(cert).unwrap();
        let san = c.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .unwrap()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // cacerts: the device CA.
        let cacert = client::cacerts(&anonymous, &base).await.unwrap();
        assert_eq!(cacert, der("pki/device-ca.pem"));
        // simpleenroll: pump-9's first certificate, with its token and a
        // CSR the crate makes (CN and a DNS name of "pump-9").
        let (csr, _key) = client::make_csr("pump-9").unwrap();
        let issued = client::simpleenroll(&anonymous, &base, "pump-9", &token, &csr)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", ca.log()));
        assert_eq!(uri_of(&issued), identity("pump-9"));
        // The token is used up.
        let again = client::simpleenroll(&anonymous, &base, "pump-9", &token, &csr).await;
        assert!(again.is_err(), "a used token enrolled again");
        // simplereenroll: pump-1 with its certificate, for a new key.
        let (csr, _key) = client::make_csr("pump-1").unwrap();
        let renewed = client::simplereenroll(&pump_1, &base, &csr)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", ca.log()));
        assert_eq!(uri_of(&renewed), identity("pump-1"));
        assert_ne!(renewed, der("pump-1/device.pem"));
    });
}

/// The serial of the certificate the gateway on `port` serves, as hex.
fn served_serial(fleet: &twofold_tests::Fleet, port: u16, who: &twofold_tests::Identity) -> String {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "openssl s_client -connect 127.0.0.1:{port} -servername localhost -CAfile {} \
         -cert {} -key {} </dev/null 2>/dev/null | openssl x509 -noout -serial",
        fleet.path("openssl-ca.pem").display(),
        who.cert.display(),
        who.key.display()
    ));
    let out = run_bounded(cmd, 30);
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_lowercase()
}

/// A gateway renews its own server certificate from the CA service, for
/// a new key, and serves it without a restart; devices still connect.
#[test]
fn a_gateway_renews_its_own_server_certificate_and_swaps_it_in() {
    use twofold_provisioning::output::files;
    use twofold_provisioning::registry::{Filter, Kind, Store};
    use twofold_tests::{CaService, Fleet, Gateway, mosquitto_pub, text, wait_until};
    let mut fleet = Fleet::new();
    let dev = fleet.device("pump-1");
    fleet.service("gw");
    // The gateway starts on a one-minute certificate (as if renewed
    // before), so that renewal falls due within the test.
    let gw_dir = fleet.path("gw");
    let current = std::fs::read(gw_dir.join(files::GATEWAY_CHAIN)).unwrap();
    let (_, current) = x509_parser::pem::parse_x509_pem(&current).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let server_ca = fleet.pki.server_issuer().unwrap();
    let short = fleet
        .pki
        .renew_gateway(
            &server_ca,
            &current.contents,
            csr.as_bytes(),
            time::Duration::seconds(60),
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
    std::fs::write(gw_dir.join(files::GATEWAY_CHAIN), &short.chain_pem).unwrap();
    std::fs::write(gw_dir.join(files::GATEWAY_KEY), key.serialize_pem()).unwrap();

    let ca = CaService::start(&mut fleet, &["--ra", "gw", "--server-lifetime", "1h"]);
    let port = free_port();
    let gw = Gateway::start_on(&fleet, port, &ca.gateway_toml(&fleet, "gw"));
    let first = served_serial(&fleet, port, &dev);
    assert_eq!(
        first,
        short.record.serial.to_string().to_lowercase(),
        "{}",
        gw.log()
    );

    // Due about 34 s after it was issued.
    assert!(
        wait_until(90, || gw.log().contains("server certificate renewed")),
        "{}",
        gw.log()
    );
    assert!(wait_until(10, || gw
        .log()
        .matches("TLS files reloaded")
        .count()
        >= 1));
    let gateways = fleet
        .pki
        .store()
        .find(&Filter {
            kind: Some(Kind::Gateway),
            ..Filter::default()
        })
        .unwrap();
    // The renewed one is the only one of the CA service's one-hour
    // lifetime (the CA service's own certificate is a gateway one too).
    let renewed: Vec<_> = gateways
        .iter()
        .filter(|r| {
            let life = r.not_after - r.not_before;
            life > time::Duration::minutes(50) && life < time::Duration::hours(2)
        })
        .collect();
    assert_eq!(renewed.len(), 1, "{gateways:?}");
    let newest = renewed[0];
    let expected = newest.serial.to_string().to_lowercase();
    assert!(
        wait_until(10, || served_serial(&fleet, port, &dev) == expected),
        "serves {}, not {expected}:\n{}",
        served_serial(&fleet, port, &dev),
        gw.log()
    );
    // A new key, and the names kept.
    let (_, renewed) = x509_parser::parse_x509_certificate(&newest.der).unwrap();
    let (_, before) = x509_parser::parse_x509_certificate(&current.contents).unwrap();
    assert_ne!(renewed.public_key().raw, before.public_key().raw);
    assert_eq!(
        renewed.subject_alternative_name().unwrap().unwrap().value,
        before.subject_alternative_name().unwrap().unwrap().value
    );
    // Devices connect to it.
    let out = mosquitto_pub(
        &fleet,
        &gw,
        Some(&dev),
        &["-i", "pump-1", "-t", "devices/pump-1/telemetry", "-m", "x"],
    );
    assert!(out.status.success(), "{}", text(&out));
}

/// Gateways pull the CRL with the ETag of the last answer: unchanged, a
/// 304 and no body; after a revocation, the new CRL and a new ETag.
#[test]
fn the_crl_is_pulled_with_an_etag() {
    let ca = Ca::start(&[]);
    let etag_of = |answer: &str| {
        answer
            .lines()
            .find_map(|l| {
                l.strip_prefix("etag: ")
                    .or_else(|| l.strip_prefix("ETag: "))
            })
            .map(|t| t.trim().to_owned())
            .unwrap_or_else(|| panic!("no ETag in {answer}"))
    };
    let (status, answer) = ca.get("gw", "/v1/crl", &[]);
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("-----BEGIN X509 CRL-----"), "{answer}");
    let etag = etag_of(&answer);
    let (status, answer) = ca.get("gw", "/v1/crl", &[format!("If-None-Match: {etag}")]);
    assert_eq!(status, 304, "{answer}");
    assert!(!answer.contains("BEGIN X509 CRL"), "{answer}");

    provisioning(ca.dir.path(), &["revoke", "pump-3"]);
    let (status, answer) = ca.get("gw", "/v1/crl", &[format!("If-None-Match: {etag}")]);
    assert_eq!(status, 200, "{answer}");
    assert_ne!(etag_of(&answer), etag);
}
