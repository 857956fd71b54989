//! The renewal of a device key in a PKCS#11 token (SoftHSM2), step by
//! step, with the CA in process: each step and each state a kill can
//! leave must keep a certificate whose key is in the token, and no step
//! may destroy the key in use.
//!
//! Without libtest's harness: the token's module reads SOFTHSM2_CONF once,
//! when it is loaded, so this binary makes the token and then runs itself
//! again with that environment, rather than change the environment of a
//! running (threaded) process.

use std::path::{Path, PathBuf};
use std::process::Command;

use twofold_agent::config::{IdentityPaths, KeyStore};
use twofold_agent::identity;
use twofold_agent::renew::{Next, Renewal, State};
use twofold_protocol::message::{self, CertAnswer, RenewRequest};
use twofold_protocol::{DeviceId, Principal, TrustDomain};
use twofold_provisioning::renewal::{self as ca_renewal, NewKey, RenewOptions};
use twofold_provisioning::{EnrollOptions, csr};
use twofold_tests::tokens::SOFTHSM_MODULE;
use twofold_tests::{Fleet, SoftHsm, TD};
use twofold_token::{PinSource, Token, TokenSpec};

const NAME: &str = "a_key_in_a_token_survives_every_step_of_a_renewal";
const CHILD: &str = "TWOFOLD_TOKEN_TEST_PIN";
const LABEL: &str = "twofold-device";

fn main() {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if std::env::args().any(|a| a == "--list") {
        println!("{NAME}: test");
        return;
    }
    if !filters.is_empty() && !filters.iter().any(|f| NAME.contains(f.as_str())) {
        println!("test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 1 filtered out");
        return;
    }
    match std::env::var_os(CHILD) {
        None => {
            let hsm = SoftHsm::new(&["pi-r"]);
            let t = hsm.token_env();
            let status = Command::new(std::env::current_exe().unwrap())
                .args(std::env::args_os().skip(1))
                .envs(t.env.iter().map(|(k, v)| (k, v)))
                .env(CHILD, &t.pin_file)
                .status()
                .unwrap();
            if !status.success() {
                // The child panicked before its own summary.
                println!(
                    "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out"
                );
            }
            // exit() runs no destructors: the token's directory goes first.
            drop(hsm);
            std::process::exit(status.code().unwrap_or(101));
        }
        Some(pin) => {
            println!("test {NAME} ...");
            a_key_in_a_token_survives_every_step_of_a_renewal(PathBuf::from(pin));
            println!("test {NAME} ... ok");
            println!("test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out");
        }
    }
}

/// The chain's certificates as one DER run, as the gateway sends them.
fn ders(chain_pem: &str) -> Vec<u8> {
    pem::parse_many(chain_pem)
        .unwrap()
        .iter()
        .flat_map(|p| p.contents().to_vec())
        .collect()
}

fn issued(request_id: &str, chain_pem: &str) -> Vec<u8> {
    let certs = ders(chain_pem);
    let mut buf = vec![0u8; certs.len() + 256];
    message::encode(
        &CertAnswer::Issued {
            request_id,
            certs: &certs,
        },
        &mut buf,
    )
    .unwrap()
    .to_vec()
}

fn committed() -> Vec<u8> {
    let mut buf = [0u8; 64];
    message::encode(&CertAnswer::Committed { serial: &[1, 2] }, &mut buf)
        .unwrap()
        .to_vec()
}

/// The CA's answer to the request in `payload`: a certificate for its
/// CSR's key.
fn renew(
    fleet: &mut Fleet,
    presented: &twofold_provisioning::Serial,
    payload: &[u8],
) -> (String, String) {
    let request: RenewRequest = message::decode(payload).unwrap();
    let ca = fleet.pki.device_issuer().unwrap();
    let renewed = fleet
        .pki
        .renew(
            &ca,
            ca_renewal::RenewRequest {
                principal: Principal::Device(DeviceId::parse("pi-r").unwrap()),
                presented: presented.clone(),
                request_id: request.request_id.to_owned(),
                key: NewKey::Rekey(request.csr.expect("a rekey").to_vec()),
            },
            RenewOptions {
                lifetime: time::Duration::days(30),
                enforce_due: false,
                expired_grace: time::Duration::ZERO,
            },
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
    (request.request_id.to_owned(), renewed.chain_pem)
}

/// The public point of the first certificate in `path`.
fn point(path: &Path) -> Vec<u8> {
    let chain = identity::load_certs(path).unwrap();
    twofold_token::public_point_of_cert(&chain[0]).unwrap()
}

fn write_state(paths: &IdentityPaths, state: &State) {
    std::fs::write(
        Renewal::state_path(&paths.cert),
        serde_json::to_vec(state).unwrap(),
    )
    .unwrap();
}

fn a_key_in_a_token_survives_every_step_of_a_renewal(pin: PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::new();
    let spec = TokenSpec {
        module: SOFTHSM_MODULE.into(),
        token: "pi-r".into(),
        pin: PinSource::File(pin),
    };
    let id = DeviceId::parse("pi-r").unwrap();
    let td = TrustDomain::parse(TD).unwrap();
    let (_, csr_path) =
        twofold_agent::keygen::keygen_in_token(&spec, LABEL, dir.path(), &id, &td).unwrap();
    let request = csr::parse(&std::fs::read(csr_path).unwrap(), &td, Some(&id)).unwrap();
    let enrolled = fleet
        .pki
        .sign_csr(
            request,
            EnrollOptions {
                days: 30,
                replace: false,
                lifetime: None,
            },
        )
        .unwrap();
    let paths = IdentityPaths {
        cert: dir.path().join("device.pem"),
        key: KeyStore::Token {
            spec: spec.clone(),
            label: LABEL.into(),
        },
        server_ca: dir.path().join("server-ca.pem"),
        server_crl: None,
        server_crl_required: false,
    };
    std::fs::write(&paths.cert, &enrolled.chain_pem).unwrap();
    std::fs::write(&paths.server_ca, fleet.pki.server_ca_pem().unwrap()).unwrap();
    let token = Token::open(&spec).unwrap();
    let keys = || token.keys(LABEL).unwrap();
    let usable = |paths: &IdentityPaths| {
        identity::load(paths).unwrap_or_else(|e| panic!("no usable pair: {e}"));
    };
    usable(&paths);
    let a = point(&paths.cert);

    // A request: its new key B is made in the token, recorded first; asked
    // again (a dropped connection), the same id and key.
    let r = Renewal::new(&paths, id, td);
    let first = r.request().unwrap();
    assert_eq!(keys().len(), 2);
    let state = r.state();
    assert!(state.next_key.is_some() && state.request_id.is_some());
    let again = r.request().unwrap();
    assert_eq!(keys().len(), 2, "asked again: no new key");
    let decoded = |p: &[u8]| {
        message::decode::<RenewRequest>(p)
            .unwrap()
            .request_id
            .to_owned()
    };
    assert_eq!(decoded(&first), decoded(&again));

    // A certificate for the key in force is refused: its commit would
    // destroy that key.
    let request_id = decoded(&first);
    assert_eq!(
        r.answer(&issued(&request_id, &enrolled.chain_pem)),
        Next::RetryIn(300)
    );
    assert!(!r.staged());
    assert!(r.state().last_answer.unwrap().contains("key in force"));

    // Issued for B: staged, and the session connects with it.
    let (request_id, chain) = renew(&mut fleet, &enrolled.record.serial, &first);
    assert_eq!(r.answer(&issued(&request_id, &chain)), Next::Reconnect);
    assert!(r.staged());
    let staged = Renewal::recover(&paths).unwrap();
    assert_ne!(staged.cert, paths.cert);
    usable(&staged);
    usable(&paths);
    // No new request while the pair awaits its commit: it would replace
    // the staged certificate's key.
    assert!(r.request().unwrap_err().contains("awaits its commit"));
    assert_eq!(keys().len(), 2);
    usable(&staged);

    // The gateway refuses it: B is destroyed, A stays in force.
    r.roll_back("refused in the test");
    assert_eq!(keys().len(), 1);
    assert_eq!(keys()[0].public, a);
    assert!(!r.staged());
    usable(&paths);

    // Again, to the end: key C issued, committed; A is destroyed.
    let second = r.request().unwrap();
    assert_eq!(keys().len(), 2);
    let (request_id, chain) = renew(&mut fleet, &enrolled.record.serial, &second);
    assert_eq!(r.answer(&issued(&request_id, &chain)), Next::Reconnect);
    assert_eq!(r.answer(&committed()), Next::Reconnect);
    assert!(!r.staged());
    usable(&paths);
    let c = point(&paths.cert);
    assert_ne!(c, a);
    let left = keys();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].public, c);

    // A commit killed after its rename with its record still naming C as
    // the new key: a new request makes a new key and leaves C alone; a
    // rollback in that state destroys nothing in use.
    let c_id = hex::encode(&left[0].id);
    let cut = State {
        request_id: Some(request_id.clone()),
        next_key: Some(c_id.clone()),
        ..State::default()
    };
    write_state(&paths, &cut);
    let r = Renewal::new(&paths, id, td);
    r.roll_back("refused in the test");
    assert_eq!(keys().len(), 1);
    usable(&paths);
    write_state(&paths, &cut);
    let r = Renewal::new(&paths, id, td);
    let third = r.request().unwrap();
    assert_ne!(
        decoded(&third),
        request_id,
        "the cut-off request is not reused"
    );
    assert_eq!(keys().len(), 2);
    assert_ne!(r.state().next_key, Some(c_id));
    usable(&paths);

    // A request that cannot go on (refused as invalid): its key goes when
    // the next one is made, so keys do not pile up in the token.
    let refused = {
        let mut buf = [0u8; 128];
        message::encode(
            &CertAnswer::Refused {
                request_id: &decoded(&third),
                code: twofold_protocol::message::RenewRefusal::InvalidCsr,
                retry_after: 0,
                reason: "test",
            },
            &mut buf,
        )
        .unwrap()
        .to_vec()
    };
    assert_eq!(r.answer(&refused), Next::RetryIn(3600));
    r.request().unwrap();
    assert_eq!(
        keys().len(),
        2,
        "the refused request's key was not destroyed"
    );
    usable(&paths);
}
