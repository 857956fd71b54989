//! Keys that never leave a PKCS#11 token, against Debian's SoftHSM2: a
//! device whose key is made in the token enrolls, connects through the
//! gateway, renews (rekeying in the token) and is revoked; `doctor` names
//! each token failure; a CA whose keys are in the token issues and
//! revokes. Neither the token nor the disk gives a private key away.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use twofold_tests::tokens::{SOFTHSM_MODULE, TPM_MODULE, USER_PIN};
use twofold_tests::*;

/// The `[identity.pkcs11]` table for token `token` of `t`.
fn pkcs11_table(t: &TokenEnv, token: &str) -> String {
    format!(
        "[identity.pkcs11]\nmodule = {:?}\ntoken = {token:?}\npin_file = {:?}\n",
        t.module, t.pin_file
    )
}

/// `cmd` with the token's environment, bounded.
fn run(mut cmd: Command, t: &TokenEnv) -> Output {
    cmd.envs(t.env.iter().map(|(k, v)| (k, v)));
    run_bounded(cmd, 120)
}

fn succeeded(what: &str, out: &Output) -> String {
    let said = text(out);
    assert!(out.status.success(), "{what} failed:\n{said}");
    said
}

/// A device `name` whose key `agent keygen` made in token `name`, with
/// the certificate `provisioning sign-csr` issued for its CSR; returns its
/// files and its agent config (gateway on `port`, `extra` appended).
fn enroll_in_token(
    fleet: &Fleet,
    t: &TokenEnv,
    name: &str,
    port: u16,
    extra: &str,
) -> (Identity, PathBuf) {
    let dir = fleet.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["server-ca.pem", "server-crl.pem"] {
        std::fs::copy(fleet.path(&format!("pki/{file}")), dir.join(file)).unwrap();
    }
    let who = Identity {
        cert: dir.join("device.pem"),
        key: dir.join("device.key"),
        dir: dir.clone(),
    };
    let config = agent_config(
        fleet,
        name,
        &who,
        port,
        &format!("{extra}\n{}", pkcs11_table(t, name)),
    );
    let mut keygen = Command::new(built("agent"));
    keygen
        .args(["keygen", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(&dir)
        .args(["--id", name, "--trust-domain", TD]);
    let said = succeeded("agent keygen", &run(keygen, t));
    assert!(said.contains("never extractable"), "{said}");
    assert!(!who.key.exists(), "keygen wrote a key file");
    let mut sign = fleet.provisioning();
    sign.arg("sign-csr")
        .arg(dir.join("device.csr"))
        .arg("--out")
        .arg(&who.cert);
    succeeded("provisioning sign-csr", &run_bounded(sign, 60));
    (who, config)
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// No file under `dir` is or holds a private key.
fn assert_no_key_file(dir: &Path) {
    for file in files_under(dir) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains("PRIVATE KEY") && file.extension().is_none_or(|e| e != "key"),
            "{} is a private key",
            file.display()
        );
    }
}

/// The private keys in token `hsm`, as OpenSC's pkcs11-tool (not ours)
/// lists them: their labels and access flags.
fn private_keys(t: &TokenEnv, token: &str) -> Vec<String> {
    let (ok, listing) = t.pkcs11_tool(&["--token-label", token, "--list-objects"]);
    assert!(ok, "pkcs11-tool --list-objects:\n{listing}");
    listing
        .split("Private Key Object")
        .skip(1)
        .map(|block| block.split("Public Key Object").next().unwrap().to_owned())
        .collect()
}

/// The token refuses to give `label`'s private key away, to a binding
/// that is not ours: no value, and no wrapping under another key. OpenSC
/// lists it as sensitive and never extractable.
fn assert_not_exportable(t: &TokenEnv, token: &str, label: &str) {
    let keys = private_keys(t, token);
    assert!(
        keys.iter().any(|k| k.contains(label)),
        "no key {label}: {keys:#?}"
    );
    for key in keys.iter().filter(|k| k.contains(label)) {
        assert!(
            key.contains("sensitive") && key.contains("never extractable"),
            "{key}"
        );
    }
    let (code, said) = t.export_attempt(token, label);
    println!("export of {label} from {token}: {said}");
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("value: refused"), "{said}");
    assert!(
        said.contains("wrap: refused (CKR_KEY_UNEXTRACTABLE)") || said.contains("wrap: impossible"),
        "{said}"
    );
}

/// The export attempt does get out a key that a third-party tool made
/// extractable: the check above can fail.
fn assert_export_attempt_catches_an_extractable_key(t: &TokenEnv, token: &str) {
    let (made, said) = t.pkcs11_tool(&[
        "--token-label",
        token,
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--label",
        "weak",
        "--extractable",
    ]);
    assert!(made, "{said}");
    let (code, said) = t.export_attempt(token, "weak");
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("wrap: WRAPPED"), "{said}");
}

#[test]
fn a_device_key_in_a_token_enrolls_connects_renews_and_is_revoked() {
    let hsm = SoftHsm::new(&["pi-t"]);
    let t = hsm.token_env();
    let mut fleet = Fleet::new();
    fleet.service("gw");
    let port = free_port();
    let (who, config) =
        enroll_in_token(&fleet, &t, "pi-t", port, "[telemetry]\ninterval_secs = 1\n");
    // Renewal is due 40 s into a one-minute certificate (same key).
    fleet.one_minute_certificate(&who.cert, "pi-t", time::OffsetDateTime::now_utc());
    let ca = CaService::start(
        &mut fleet,
        &["--ra", "gw", "--lifetime", "60s", "--rate-limit", "100"],
    );
    let relay = Relay::start(&fleet, "devices/pi-t/#", "token");
    let gw = Gateway::start_on(
        &fleet,
        port,
        &format!("{}\n{}", relay.config, ca.gateway_toml(&fleet, "gw")),
    );
    let mut cmd = Command::new(built("agent"));
    cmd.envs(t.env.iter().map(|(k, v)| (k, v)));
    let agent = run_agent(cmd, &fleet, "pi-t", &config);
    wait_connected(&gw, "pi-t");

    let committed = || agent.log().matches("renewed certificate committed").count();
    let renewed = wait_until(200, || committed() >= 2);
    assert!(renewed, "fewer than two renewals:\n{}", agent.log());
    assert!(
        agent.log().contains("made the new key in the token"),
        "{}",
        agent.log()
    );
    // Each renewal made a new key in the token and destroyed the old one:
    // one key left, three certificates with three keys.
    let principal =
        twofold_protocol::Principal::Device(twofold_protocol::DeviceId::parse("pi-t").unwrap());
    let history = fleet.pki.history(&principal).unwrap();
    let keys = public_keys(&history);
    assert!(
        keys.len() >= 3,
        "{} keys in {} certificates",
        keys.len(),
        history.len()
    );
    let left = private_keys(&t, "pi-t");
    assert_eq!(left.len(), 1, "keys left in the token: {left:#?}");
    // Telemetry flowed through the gateway, signed for by the token.
    assert!(
        wait_until(30, || relay
            .sub
            .messages()
            .iter()
            .any(|(topic, _)| topic == "devices/pi-t/telemetry")),
        "no telemetry:\n{}",
        agent.log()
    );

    // Revoked: the gateway closes the session and refuses it after.
    fleet.revoke("pi-t");
    assert!(
        wait_until(60, || agent.log().contains("it is revoked")),
        "agent:\n{}\naudit:\n{:#?}",
        agent.log(),
        gw.events()
    );
    assert_not_exportable(&t, "pi-t", "twofold-device");
    // Nothing the agent or keygen wrote holds a key.
    assert_no_key_file(&who.dir);
}

/// Runs `agent doctor` with the token's environment.
fn doctor(t: &TokenEnv, config: &Path) -> (bool, String) {
    let mut cmd = Command::new(built("agent"));
    cmd.arg("doctor").arg("--config").arg(config);
    let out = run(cmd, t);
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("agent doctor ({}):\n{report}", config.display());
    (out.status.success(), report)
}

/// `config` with `from` replaced by `to`, written beside it as `name`.
fn variant(config: &Path, name: &str, from: &str, to: &str) -> PathBuf {
    let text = std::fs::read_to_string(config).unwrap();
    assert!(text.contains(from), "{from:?} not in {text}");
    let path = config.with_file_name(name);
    std::fs::write(&path, text.replace(from, to)).unwrap();
    path
}

/// The report of `doctor` on the [`variant`] of `config`, which must
/// fail.
fn doctor_fails(t: &TokenEnv, config: &Path, name: &str, from: &str, to: &str) -> String {
    let (ok, report) = doctor(t, &variant(config, name, from, to));
    assert!(!ok, "{report}");
    report
}

/// A PIN file holding `pin`, with `mode`.
fn pin_file(path: PathBuf, pin: &str, mode: u32) -> PathBuf {
    std::fs::write(&path, format!("{pin}\n")).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    path
}

#[test]
fn doctor_checks_the_token_and_names_each_failure() {
    let hsm = SoftHsm::new(&["pi-d"]);
    let t = hsm.token_env();
    let fleet = Fleet::new();
    let port = free_port();
    let (_who, config) = enroll_in_token(&fleet, &t, "pi-d", port, "");
    let _gw = Gateway::start_on(&fleet, port, "");

    // All well: the handshake through the token reaches a CONNACK.
    let (ok, report) = doctor(&t, &config);
    assert!(ok, "{report}");
    assert_doctor_line(&report, "token", "[ OK ]", &["\"pi-d\"", "logged in"]);
    assert_doctor_line(
        &report,
        "key",
        "[ OK ]",
        &["twofold-device", "sensitive and unextractable"],
    );
    assert_doctor_line(&report, "mqtt", "[ OK ]", &[]);

    // A wrong PIN.
    let pin_line = format!("pin_file = {:?}", t.pin_file);
    let wrong = pin_file(fleet.path("wrong-pin"), "0000", 0o600);
    let to = format!("pin_file = {wrong:?}");
    let report = doctor_fails(&t, &config, "wrong-pin.toml", &pin_line, &to);
    assert_doctor_line(
        &report,
        "token",
        "[FAIL]",
        &["PIN", "is wrong", "wrong-pin"],
    );
    assert!(report.contains("counts towards locking"), "{report}");

    // A PIN file others can read.
    let exposed = pin_file(fleet.path("exposed-pin"), USER_PIN, 0o644);
    let to = format!("pin_file = {exposed:?}");
    let report = doctor_fails(&t, &config, "exposed-pin.toml", &pin_line, &to);
    assert_doctor_line(
        &report,
        "token",
        "[FAIL]",
        &["readable by others", "chmod 600"],
    );

    // A module that is not there.
    let gone = "/usr/lib/softhsm/libsofthsm2-gone.so";
    let report = doctor_fails(&t, &config, "no-module.toml", SOFTHSM_MODULE, gone);
    assert_doctor_line(
        &report,
        "token",
        "[FAIL]",
        &[
            "cannot load the PKCS#11 module",
            "libsofthsm2-gone.so",
            "install the module",
        ],
    );

    // A token that is not there: the ones that are, are named.
    let (from, to) = ("token = \"pi-d\"", "token = \"pi-x\"");
    let report = doctor_fails(&t, &config, "no-token.toml", from, to);
    assert_doctor_line(
        &report,
        "token",
        "[FAIL]",
        &["no token labelled \"pi-x\"", "\"pi-d\""],
    );

    // A key that is not there.
    let to = "token = \"pi-d\"\nkey_label = \"gone\"";
    let report = doctor_fails(&t, &config, "no-key.toml", from, to);
    assert_doctor_line(&report, "token", "[ OK ]", &[]);
    assert_doctor_line(
        &report,
        "key",
        "[FAIL]",
        &["no P-256 key labelled \"gone\"", "keygen"],
    );

    // The running agent refuses the wrong PIN at start, with its reason.
    let mut cmd = Command::new(built("agent"));
    cmd.args(["run", "--config"])
        .arg(fleet.path("wrong-pin.toml"));
    let out = run(cmd, &t);
    let said = String::from_utf8_lossy(&out.stderr);
    // 78: the packaged unit does not restart it and spend another try.
    assert_eq!(out.status.code(), Some(78), "{said}");
    assert_eq!(said.matches("is wrong").count(), 1, "said once: {said}");
}

#[test]
fn a_ca_whose_keys_are_in_a_token_issues_and_revokes() {
    let hsm = SoftHsm::new(&["ca"]);
    let t = hsm.token_env();
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let provisioning = |args: &[&str]| {
        let mut cmd = Command::new(built("provisioning"));
        cmd.arg("--pki")
            .arg(&pki)
            .args(args)
            .current_dir(dir.path());
        run(cmd, &t)
    };
    let pin = t.pin_file.to_str().unwrap().to_owned();
    let said = succeeded(
        "init",
        &provisioning(&[
            "init",
            "--trust-domain",
            TD,
            "--pkcs11-module",
            SOFTHSM_MODULE,
            "--token",
            "ca",
            "--pin-file",
            &pin,
        ]),
    );
    assert!(said.contains("in token \"ca\""), "{said}");
    // No key file, and the token file names the PIN's file, not the PIN.
    assert_no_key_file(&pki);
    let token_file = std::fs::read_to_string(pki.join("token.toml")).unwrap();
    assert!(
        token_file.contains(&pin) && !token_file.contains(USER_PIN),
        "{token_file}"
    );
    let keys = private_keys(&t, "ca");
    assert_eq!(keys.len(), 3, "{keys:#?}");
    for label in ["twofold-root-ca", "twofold-device-ca", "twofold-server-ca"] {
        assert_not_exportable(&t, "ca", label);
    }
    assert_export_attempt_catches_an_extractable_key(&t, "ca");

    succeeded(
        "gateway-cert",
        &provisioning(&[
            "gateway-cert",
            "localhost",
            "--ip",
            "127.0.0.1",
            "--out",
            "gw",
        ]),
    );
    succeeded(
        "enroll",
        &provisioning(&["enroll", "dev-1", "--out", "dev-1"]),
    );
    let verify = |extra: &[&str], cert: &str| {
        let mut cmd = Command::new("openssl");
        cmd.current_dir(dir.path())
            .args(["verify", "-CAfile", "pki/root-ca.pem"])
            .args(extra)
            .arg(cert);
        let out = run_bounded(cmd, 30);
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, said) = verify(&["-untrusted", "pki/device-ca.pem"], "dev-1/device.pem");
    assert!(ok, "{said}");
    let (ok, said) = verify(&["-untrusted", "pki/server-ca.pem"], "gw/gateway.pem");
    assert!(ok, "{said}");

    succeeded("revoke", &provisioning(&["revoke", "dev-1"]));
    let (ok, said) = verify(
        &[
            "-untrusted",
            "pki/device-ca.pem",
            "-crl_check",
            "-CRLfile",
            "pki/crl.pem",
        ],
        "dev-1/device.pem",
    );
    assert!(!ok && said.contains("certificate revoked"), "{said}");

    // A wrong PIN: named, with its fix, and nothing is issued.
    std::fs::write(&t.pin_file, "0000\n").unwrap();
    let out = provisioning(&["enroll", "dev-2", "--out", "dev-2"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(said.contains("the PIN for token \"ca\" is wrong"), "{said}");
    assert_eq!(said.matches("is wrong").count(), 1, "said once: {said}");
    std::fs::write(&t.pin_file, format!("{USER_PIN}\n")).unwrap();
    let listed = succeeded("list", &provisioning(&["list"]));
    assert!(!listed.contains("dev-2"), "{listed}");
    // The CA service signs with the token too: a renewal over HTTPS,
    // curl as the device.
    succeeded(
        "enroll",
        &provisioning(&["enroll", "dev-3", "--out", "dev-3"]),
    );
    let port = free_port();
    let mut serve = Command::new(built("provisioning"));
    serve
        .arg("--pki")
        .arg(&pki)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--cert",
            "gw/gateway.pem",
            "--key",
            "gw/gateway.key",
            "--allow-early",
        ])
        .current_dir(dir.path())
        .envs(t.env.iter().map(|(k, v)| (k, v)));
    let service = spawn(serve, dir.path().join("serve.log"));
    wait_port(port, "provisioning serve");
    let mut curl = Command::new("curl");
    curl.current_dir(dir.path())
        .args(["--silent", "--show-error", "--max-time", "20"])
        .args([
            "--cacert",
            "dev-3/server-ca.pem",
            "--cert",
            "dev-3/device.pem",
        ])
        .args([
            "--key",
            "dev-3/device.key",
            "--json",
            r#"{"request_id": "r1"}"#,
        ])
        .arg(format!("https://localhost:{port}/v1/renew"));
    let out = run_bounded(curl, 30);
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {out:?}\n{}", service.log()));
    assert_eq!(answer["status"], "issued", "{answer}\n{}", service.log());
    std::fs::write(
        dir.path().join("renewed.pem"),
        answer["chain"].as_str().unwrap(),
    )
    .unwrap();
    let (ok, said) = verify(&["-untrusted", "pki/device-ca.pem"], "renewed.pem");
    assert!(ok, "{said}");

    // Only the devices' own bundles hold keys (enroll makes them there).
    assert_no_key_file(&pki);
}

/// The same code path through a TPM 2.0: swtpm behind tpm2-abrmd, with
/// Debian's libtpm2_pkcs11 and a token made by tpm2_ptool. The key is
/// made in the TPM, doctor reaches a CONNACK with it, the running agent's
/// telemetry arrives through the gateway, and the TPM gives nothing away.
#[test]
fn a_device_key_in_a_tpm_connects_through_the_same_code_path() {
    let tpm = SwTpm::new("pi-tpm");
    let t = tpm.token_env();
    assert_eq!(t.module, TPM_MODULE);
    let fleet = Fleet::new();
    let port = free_port();
    let relay = Relay::start(&fleet, "devices/pi-tpm/#", "tpm");
    let gw = Gateway::start_on(&fleet, port, &relay.config);
    let (who, config) = enroll_in_token(
        &fleet,
        &t,
        "pi-tpm",
        port,
        "[telemetry]\ninterval_secs = 1\n",
    );
    let (ok, report) = doctor(&t, &config);
    assert!(ok, "{report}");
    assert_doctor_line(&report, "token", "[ OK ]", &["libtpm2_pkcs11.so"]);
    assert_doctor_line(&report, "key", "[ OK ]", &["sensitive and unextractable"]);

    let mut cmd = Command::new(built("agent"));
    cmd.envs(t.env.iter().map(|(k, v)| (k, v)));
    let agent = run_agent(cmd, &fleet, "pi-tpm", &config);
    wait_connected(&gw, "pi-tpm");
    assert!(
        wait_until(30, || relay
            .sub
            .messages()
            .iter()
            .any(|(topic, _)| topic == "devices/pi-tpm/telemetry")),
        "no telemetry:\n{}",
        agent.log()
    );
    assert_not_exportable(&t, "pi-tpm", "twofold-device");
    assert_no_key_file(&who.dir);
}
