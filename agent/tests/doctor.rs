//! `agent doctor` against a real gateway: the right diagnosis, with its
//! fix, for a healthy device, a revoked, an expired and a foreign
//! certificate, a wrong server CA, an exposed key and a stopped gateway.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use twofold_provisioning::output::files;
use twofold_tests::*;

/// Runs `agent doctor` for `who` against `localhost:port`; returns
/// (success, stdout).
fn doctor(fleet: &Fleet, name: &str, who: &Identity, port: u16) -> (bool, String) {
    agent_doctor(&agent_config(fleet, name, who, port, ""))
}

#[test]
fn doctor_diagnoses_each_failure_with_its_fix() {
    let mut fleet = Fleet::new();
    let good = fleet.device("pi-good");
    let revoked = fleet.device("pi-revoked");
    fleet.revoke("pi-revoked");
    let expired = fleet.mint("pi-expired", |p| {
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(30);
        p.not_after = now - time::Duration::days(1);
    });
    // A device of another PKI for the same trust domain, which trusts our
    // gateway (so it is the gateway that refuses).
    let mut other = Fleet::new();
    let foreign = other.device("pi-foreign");
    let foreign_server_ca = fleet.path("foreign-server-ca.pem");
    std::fs::copy(foreign.dir.join(files::SERVER_CA), &foreign_server_ca).unwrap();
    let foreign_server_crl = fleet.path("foreign-server-crl.pem");
    std::fs::copy(foreign.dir.join(files::SERVER_CRL), &foreign_server_crl).unwrap();
    for file in [files::SERVER_CA, files::SERVER_CRL] {
        std::fs::copy(fleet.path("pi-good").join(file), foreign.dir.join(file)).unwrap();
    }
    // Our own bundle, but the server CA (and its CRL) of the other PKI.
    let misled = fleet.device("pi-misled");
    std::fs::copy(&foreign_server_ca, misled.dir.join(files::SERVER_CA)).unwrap();
    std::fs::copy(&foreign_server_crl, misled.dir.join(files::SERVER_CRL)).unwrap();
    let gw = Gateway::start(&fleet, "");
    let port = gw.addr.port();

    let (ok, report) = doctor(&fleet, "good", &good, port);
    assert!(ok, "{report}");
    for check in [
        "config",
        "files",
        "key",
        "identity",
        "validity",
        "chain",
        "server CA",
        "server CRL",
        "dns",
        "tcp",
        "tls",
    ] {
        assert_doctor_line(&report, check, "[ OK ]", &[]);
    }
    assert_doctor_line(
        &report,
        "mqtt",
        "[ OK ]",
        &["CONNACK accepted device pi-good"],
    );

    let (ok, report) = doctor(&fleet, "revoked", &revoked, port);
    assert!(!ok, "{report}");
    assert_doctor_line(&report, "validity", "[ OK ]", &[]);
    assert_doctor_line(
        &report,
        "tls",
        "[FAIL]",
        &[
            "refused our certificate: revoked",
            "CertificateRevoked",
            "fix:",
            "sign-csr",
        ],
    );
    assert_doctor_line(&report, "mqtt", "[SKIP]", &[]);

    let (ok, report) = doctor(&fleet, "expired", &expired, port);
    assert!(!ok, "{report}");
    assert_doctor_line(
        &report,
        "validity",
        "[FAIL]",
        &["expired on", "local clock", "fix:"],
    );
    assert_doctor_line(
        &report,
        "tls",
        "[FAIL]",
        &["expired or not yet valid", "CertificateExpired"],
    );

    let (ok, report) = doctor(&fleet, "foreign", &foreign, port);
    assert!(!ok, "{report}");
    assert_doctor_line(&report, "chain", "[ OK ]", &[]);
    assert_doctor_line(
        &report,
        "tls",
        "[FAIL]",
        &[
            "a CA it does not trust",
            "UnknownCA",
            "enroll it with the PKI that runs this gateway",
        ],
    );

    let (ok, report) = doctor(&fleet, "misled", &misled, port);
    assert!(!ok, "{report}");
    assert_doctor_line(&report, "server CA", "[ OK ]", &[]);
    assert_doctor_line(
        &report,
        "tls",
        "[FAIL]",
        &[
            "gateway's certificate is not signed by server-ca.pem",
            "UnknownIssuer",
            "fix:",
        ],
    );

    std::fs::set_permissions(&good.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, report) = doctor(&fleet, "exposed", &good, port);
    assert!(!ok, "{report}");
    assert_doctor_line(
        &report,
        "files",
        "[FAIL]",
        &["readable by others", "fix: chmod 600"],
    );
    assert_doctor_line(&report, "mqtt", "[ OK ]", &[]);
    std::fs::set_permissions(&good.key, std::fs::Permissions::from_mode(0o600)).unwrap();

    drop(gw);
    let (ok, report) = doctor(&fleet, "stopped", &good, port);
    assert!(!ok, "{report}");
    assert_doctor_line(&report, "dns", "[ OK ]", &[]);
    assert_doctor_line(
        &report,
        "tcp",
        "[FAIL]",
        &["refused", "is the gateway running"],
    );
    assert_doctor_line(&report, "tls", "[SKIP]", &[]);
    assert_doctor_line(&report, "mqtt", "[SKIP]", &[]);
}

/// The device checks the gateway's certificate against the server CA's CRL
/// from its bundle: accepted while it is not listed, refused with the
/// reason once the operator revokes it, and a CRL that is not the server
/// CA's is refused before anything connects.
#[test]
fn a_revoked_gateway_certificate_is_refused_by_the_device() {
    let mut fleet = Fleet::new();
    let pi = fleet.device("pi-1");
    let gw = Gateway::start(&fleet, "");
    let port = gw.addr.port();

    let (ok, report) = doctor(&fleet, "before", &pi, port);
    assert!(ok, "{report}");
    assert_doctor_line(
        &report,
        "server CRL",
        "[ OK ]",
        &["0 revoked gateway certificate(s)"],
    );
    assert_doctor_line(&report, "mqtt", "[ OK ]", &[]);

    let server_crl = fleet.revoke_this_gateway();
    std::fs::write(pi.dir.join(files::SERVER_CRL), server_crl).unwrap();
    let (ok, report) = doctor(&fleet, "after", &pi, port);
    assert!(!ok, "{report}");
    assert_doctor_line(
        &report,
        "server CRL",
        "[ OK ]",
        &["1 revoked gateway certificate(s)"],
    );
    assert_doctor_line(
        &report,
        "tls",
        "[FAIL]",
        &[
            "gateway's certificate is revoked",
            "fix:",
            "new certificate",
        ],
    );
    // The running agent refuses it too, and says why: no session is bound
    // beyond the first doctor's.
    let sessions = || {
        gw.events()
            .iter()
            .filter(|e| e["event"] == "connected")
            .count()
    };
    assert_eq!(sessions(), 1);
    let mut agent = agent(&fleet, "agent-after", &pi, port, "");
    assert!(
        wait_until(30, || agent.log().contains("Revoked")),
        "{}",
        agent.log()
    );
    agent.kill();
    assert_eq!(sessions(), 1, "{:?}", gw.events());
    // The operator sees why in the gateway's audit log.
    let refusal = gw.refusal("protocol_error");
    assert!(
        refusal["detail"].as_str().is_some_and(
            |d| d.contains("client refused the gateway") && d.contains("CertificateRevoked")
        ),
        "{refusal}"
    );

    // The device CA's CRL in place of the server CA's.
    std::fs::copy(fleet.path("gw/crl.pem"), pi.dir.join(files::SERVER_CRL)).unwrap();
    let (ok, report) = doctor(&fleet, "wrong-crl", &pi, port);
    assert!(!ok, "{report}");
    assert_doctor_line(
        &report,
        "server CRL",
        "[FAIL]",
        &["not signed by the server CA", "fix:"],
    );

    // A bundle made before there was a server CRL: nothing can refuse the
    // revoked gateway, and doctor says so.
    std::fs::remove_file(pi.dir.join(files::SERVER_CRL)).unwrap();
    let (ok, report) = doctor(&fleet, "no-crl", &pi, port);
    assert!(ok, "{report}");
    assert_doctor_line(
        &report,
        "server CRL",
        "[WARN]",
        &[
            "not checked for revocation",
            "fix:",
            "server-crl.pem; a running agent takes it",
        ],
    );
    assert_doctor_line(&report, "mqtt", "[ OK ]", &[]);
}

/// The key made on the board never leaves it: `agent keygen`, then
/// `provisioning sign-csr` on the operator's side, and the device connects.
#[test]
fn a_key_made_on_the_board_is_signed_and_connects() {
    let fleet = Fleet::new();
    let board = fleet.path("board");
    let mut keygen = Command::new(env!("CARGO_BIN_EXE_agent"));
    keygen
        .args(["keygen", "--id", "pi-csr", "--trust-domain", TD, "--out"])
        .arg(&board);
    let out = run_bounded(keygen, 30);
    assert!(out.status.success(), "{}", text(&out));
    let mode = std::fs::metadata(board.join("device.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let mut sign = Command::new(built("provisioning"));
    sign.arg("--pki")
        .arg(fleet.path("pki"))
        .arg("sign-csr")
        .arg(board.join("device.csr"))
        .args(["--id", "pi-csr", "--out"])
        .arg(board.join(files::DEVICE_CHAIN));
    let out = run_bounded(sign, 30);
    assert!(out.status.success(), "{}", text(&out));
    std::fs::write(
        board.join(files::SERVER_CA),
        fleet.pki.server_ca_pem().unwrap(),
    )
    .unwrap();

    // A second keygen never replaces the key.
    let mut again = Command::new(env!("CARGO_BIN_EXE_agent"));
    again
        .args(["keygen", "--id", "pi-csr", "--trust-domain", TD, "--out"])
        .arg(&board);
    let out = run_bounded(again, 30);
    assert!(!out.status.success());
    assert!(text(&out).contains("never replaced"), "{}", text(&out));

    let gw = Gateway::start(&fleet, "");
    let who = Identity {
        cert: board.join(files::DEVICE_CHAIN),
        key: board.join(files::DEVICE_KEY),
        dir: board,
    };
    let (ok, report) = doctor(&fleet, "csr", &who, gw.addr.port());
    assert!(ok, "{report}");
    assert_doctor_line(
        &report,
        "mqtt",
        "[ OK ]",
        &["CONNACK accepted device pi-csr"],
    );
}
