//! A running agent and a new server CRL: a valid one is taken at once and
//! the session is made again under it, so a gateway revoked while devices
//! are connected loses them; a broken or older CRL is refused, loudly, and
//! the one in force stays, with the session up.

use twofold_provisioning::RevokeTarget;
use twofold_provisioning::output::files;
use twofold_provisioning::registry::{Filter, Kind, RevocationReason, Store};
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
    fleet
        .pki
        .revoke(
            RevokeTarget::Serial(other.record.serial.clone()),
            RevocationReason::Superseded,
        )
        .unwrap();
    std::fs::write(&crl, fleet.pki.server_crl_pem().unwrap().unwrap()).unwrap();
    assert!(
        wait_until(30, || agent.log().contains("server CRL reloaded")),
        "{}",
        agent.log()
    );
    assert!(wait_until(30, || connected() == 2), "{}", agent.log());

    // A corrupt file: refused, and the session stays.
    let refusals = || agent.log().matches("REFUSED the new server CRL").count();
    std::fs::write(&crl, b"-----BEGIN X509 CRL-----\nnot base64\n").unwrap();
    assert!(wait_until(30, || refusals() == 1), "{}", agent.log());
    // The CRL from before: older than the one in force, refused too.
    std::fs::write(&crl, &first_crl).unwrap();
    assert!(wait_until(30, || refusals() == 2), "{}", agent.log());
    assert!(
        agent.log().contains("is older than the one in force"),
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
    let this = fleet
        .pki
        .store()
        .find(&Filter {
            kind: Some(Kind::Gateway),
            ..Filter::default()
        })
        .unwrap()
        .into_iter()
        .find(|r| r.serial != other.record.serial)
        .unwrap();
    fleet
        .pki
        .revoke(
            RevokeTarget::Serial(this.serial),
            RevocationReason::KeyCompromise,
        )
        .unwrap();
    std::fs::write(&crl, fleet.pki.server_crl_pem().unwrap().unwrap()).unwrap();
    assert!(
        wait_until(30, || agent.log().contains("Revoked")),
        "{}",
        agent.log()
    );
    agent.kill();
    assert!(wait_until(10, || disconnected() == 2), "{:?}", gw.events());
    assert_eq!(connected(), 2, "no session under the revoked certificate");
}
