//! A running agent and a new server CRL: a valid one is taken at once and
//! the session is made again under it, so a gateway revoked while devices
//! are connected loses them; a broken or older CRL is refused, loudly, and
//! the one in force stays, with the session up.

use twofold_provisioning::output::files;
use twofold_provisioning::registry::RevocationReason;
use twofold_tests::*;

#[test]
fn a_running_agent_takes_a_new_server_crl_and_refuses_a_bad_or_older_one() {
    let mut fleet = Fleet::new();
    let pi = fleet.device("pi-1");
    let gw = Gateway::start(&fleet, "");
    let port = gw.addr.port();
    let crl = pi.dir.join(files::SERVER_CRL);
    let connected = || {
        gw.events()
            .iter()
            .filter(|e| e["event"] == "connected")
            .count()
    };
    let disconnected = || {
        gw.events()
            .iter()
            .filter(|e| e["event"] == "disconnected")
            .count()
    };
    let mut agent = agent(&fleet, "pi-1", &pi, port, "");
    assert!(wait_until(30, || connected() == 1), "{}", agent.log());
    let first_crl = std::fs::read(&crl).unwrap();

    // Another gateway's certificate is revoked: a newer server CRL that
    // does not concern this gateway. The agent takes it and connects
    // again under it.
    let other = fleet
        .pki
        .issue_gateway(&["old-gw.example".into()], &[], 30, None)
        .unwrap();
    let newer = fleet.revoke_gateway(&other.record.serial, RevocationReason::Superseded);
    replace(&crl, newer.as_bytes());
    assert!(
        wait_until(30, || agent.log().contains("server CRL reloaded")),
        "{}",
        agent.log()
    );
    assert!(wait_until(30, || connected() == 2), "{}", agent.log());

    // A corrupt file: refused, and the session stays.
    let refusals = || agent.log().matches("REFUSED the new server CRL").count();
    replace(&crl, b"-----BEGIN X509 CRL-----\nnot base64\n");
    assert!(wait_until(30, || refusals() == 1), "{}", agent.log());
    // The CRL from before: older than the one in force, refused too.
    replace(&crl, &first_crl);
    assert!(wait_until(30, || refusals() == 2), "{}", agent.log());
    assert!(
        agent
            .log()
            .contains("lower than the one in force (2); refusing to go back"),
        "{}",
        agent.log()
    );
    // The old CRL in front of the current one: rustls would check against
    // the first, so a file with two CRLs of one CA is refused.
    replace(&crl, [&first_crl[..], newer.as_bytes()].concat().as_slice());
    assert!(wait_until(30, || refusals() == 3), "{}", agent.log());
    assert!(
        agent.log().contains("holds more than one CRL"),
        "{}",
        agent.log()
    );
    assert_eq!(
        (connected(), disconnected()),
        (2, 1),
        "only the reload after the newer CRL made a new session:\n{:?}",
        gw.events()
    );

    // Now this gateway's own certificate is revoked while the agent is
    // connected to it: the agent drops the session and will not come back.
    let revoked = fleet.revoke_this_gateway();
    replace(&crl, revoked.as_bytes());
    assert!(
        wait_until(30, || agent.log().contains("Revoked")),
        "{}",
        agent.log()
    );
    agent.kill();
    assert!(wait_until(10, || disconnected() == 2), "{:?}", gw.events());
    assert_eq!(connected(), 2, "no session under the revoked certificate");
}

/// A bundle written before the PKI had a server CRL: the agent connects,
/// warns, and takes the CRL as soon as the operator copies it in; here it
/// revokes the gateway the agent is connected to.
#[test]
fn an_agent_started_without_a_server_crl_takes_one_when_it_appears() {
    let mut fleet = Fleet::new();
    let pi = fleet.device("pi-1");
    let crl = pi.dir.join(files::SERVER_CRL);
    std::fs::remove_file(&crl).unwrap();
    let gw = Gateway::start(&fleet, "");
    let connected = || {
        gw.events()
            .iter()
            .filter(|e| e["event"] == "connected")
            .count()
    };
    let mut agent = agent(&fleet, "pi-1", &pi, gw.addr.port(), "");
    assert!(wait_until(30, || connected() == 1), "{}", agent.log());
    assert!(agent.log().contains("no server CRL yet"), "{}", agent.log());

    let revoked = fleet.revoke_this_gateway();
    replace(&crl, revoked.as_bytes());
    assert!(
        wait_until(30, || agent.log().contains("server CRL reloaded")),
        "{}",
        agent.log()
    );
    assert!(
        wait_until(30, || agent.log().contains("Revoked")),
        "{}",
        agent.log()
    );
    agent.kill();
    assert_eq!(connected(), 1, "no session under the revoked certificate");
}

/// The agent fetches the server CRL from an HTTP server (python's, on
/// loopback) every second: what is not a CRL signed by the server CA is
/// refused and the file stays; a new CRL revoking the gateway is written
/// over the file, taken, and ends the device's session with that gateway.
#[test]
fn a_running_agent_fetches_the_server_crl_from_its_url() {
    let mut fleet = Fleet::new();
    let pi = fleet.device("pi-1");
    let gw = Gateway::start(&fleet, "");
    let www = fleet.path("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("server-crl.der"), b"not a CRL").unwrap();
    let web_port = free_port();
    let mut python = std::process::Command::new("python3");
    python
        .args([
            "-m",
            "http.server",
            &web_port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .arg("--directory")
        .arg(&www);
    let _web = spawn(python, fleet.path("http-server.log"));
    wait_port(web_port, "python3 -m http.server");

    let config = agent_config(&fleet, "pi-1", &pi, gw.addr.port(), "");
    let with_url = std::fs::read_to_string(&config).unwrap().replace(
        "[identity]\n",
        &format!(
            "[identity]\nserver_crl_url = \"http://127.0.0.1:{web_port}/server-crl.der\"\n\
             server_crl_refresh_secs = 1\n"
        ),
    );
    std::fs::write(&config, with_url).unwrap();
    let crl = pi.dir.join(files::SERVER_CRL);
    let before = std::fs::read(&crl).unwrap();
    let mut agent = run_agent(
        std::process::Command::new(built("agent")),
        &fleet,
        "pi-1",
        &config,
    );
    let connected = || {
        gw.events()
            .iter()
            .filter(|e| e["event"] == "connected")
            .count()
    };
    assert!(wait_until(30, || connected() == 1), "{}", agent.log());
    assert!(
        wait_until(30, || agent
            .log()
            .contains("cannot use the server CRL from its URL")),
        "{}",
        agent.log()
    );
    assert_eq!(connected(), 1, "the session stays");
    assert!(
        agent.log().contains("a CRL does not parse"),
        "{}",
        agent.log()
    );
    let (_, report) = agent_doctor(&config);
    assert_doctor_line(&report, "CRL URL", "[WARN]", &["a CRL does not parse"]);
    assert_eq!(std::fs::read(&crl).unwrap(), before, "the file stays");
    // doctor's session took the agent's over (same client id); the agent
    // connects again.
    let sessions = || {
        agent
            .log()
            .matches("link: connected to the gateway")
            .count()
    };
    assert!(wait_until(30, || sessions() == 2), "{}", agent.log());

    // Another gateway's certificate is revoked: a newer CRL, served in
    // DER as `provisioning crl --server --der` writes it. The agent takes
    // it (and connects again under it).
    let other = fleet
        .pki
        .issue_gateway(&["old-gw.example".into()], &[], 30, None)
        .unwrap();
    let newer = fleet.revoke_gateway(&other.record.serial, RevocationReason::Superseded);
    serve_der(&fleet, &www, &newer);
    let fetched = || agent.log().matches("fetched a new server CRL").count();
    assert!(wait_until(30, || fetched() == 1), "{}", agent.log());
    assert!(wait_until(30, || sessions() == 3), "{}", agent.log());
    assert_eq!(std::fs::read_to_string(&crl).unwrap(), newer, "in PEM");

    // The first CRL again, as a replay would serve it: older, refused.
    serve_der(&fleet, &www, std::str::from_utf8(&before).unwrap());
    assert!(
        wait_until(30, || agent.log().contains("lower than the one in force")),
        "{}",
        agent.log()
    );
    assert_eq!(
        std::fs::read_to_string(&crl).unwrap(),
        newer,
        "the file stays"
    );
    let before_revocation = connected();

    // Now this gateway's own certificate is revoked.
    let revoked = fleet.revoke_this_gateway();
    serve_der(&fleet, &www, &revoked);
    assert!(wait_until(30, || fetched() == 2), "{}", agent.log());
    assert!(
        wait_until(30, || agent.log().contains("Revoked")),
        "{}",
        agent.log()
    );
    agent.kill();
    let (_, report) = agent_doctor(&config);
    assert_doctor_line(
        &report,
        "CRL URL",
        "[ OK ]",
        &["CRL number 3 (the file's: 3)"],
    );
    assert_eq!(std::fs::read_to_string(&crl).unwrap(), revoked);
    assert_eq!(
        connected(),
        before_revocation,
        "no session under the revoked certificate"
    );
}

/// Puts `pem` where the web server serves it, converted to DER by openssl,
/// in one rename.
fn serve_der(fleet: &Fleet, www: &std::path::Path, pem: &str) {
    let from = fleet.path("serve.pem");
    std::fs::write(&from, pem).unwrap();
    let der = www.join("server-crl.der.tmp");
    let mut openssl = std::process::Command::new("openssl");
    openssl
        .args(["crl", "-outform", "DER", "-in"])
        .arg(&from)
        .arg("-out")
        .arg(&der);
    let out = run_bounded(openssl, 30);
    assert!(out.status.success(), "{}", text(&out));
    std::fs::rename(&der, www.join("server-crl.der")).unwrap();
}

/// Writes `bytes` over `path` in one rename, as an operator's tools would.
fn replace(path: &std::path::Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
