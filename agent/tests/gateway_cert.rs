//! Fake gateways (tokio-rustls on loopback) presenting what our PKI never
//! issues to a gateway, signed with the real server CA's key: the agent
//! refuses each, and `agent doctor` names each with its own fix. The fake
//! gateway never speaks MQTT: the agent's own checks are what is tested.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use twofold_provisioning::output::files;
use twofold_tests::*;

/// A TLS server on 127.0.0.1 presenting `chain`, signing the handshake
/// with `key` (which need not belong to the chain's leaf); it stops when
/// dropped.
struct FakeGateway {
    port: u16,
    _runtime: tokio::runtime::Runtime,
}

impl FakeGateway {
    fn start(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> FakeGateway {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let signer = provider.key_provider.load_private_key(key).unwrap();
        // CertifiedKey::new, unlike with_single_cert, lets the key differ
        // from the certificate's.
        let certified = rustls::sign::CertifiedKey::new(chain, signer);
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // The agent aborts the handshake; nothing to do after.
                    let _ = acceptor.accept(tcp).await;
                });
            }
        });
        FakeGateway {
            port,
            _runtime: runtime,
        }
    }
}

/// The server CA as an rcgen issuer, with its key from the PKI.
fn server_ca(fleet: &Fleet) -> Issuer<'static, KeyPair> {
    let key = KeyPair::from_pem(&std::fs::read_to_string(fleet.path("pki/server-ca.key")).unwrap())
        .unwrap();
    Issuer::from_ca_cert_pem(&fleet.pki.server_ca_pem().unwrap(), key).unwrap()
}

/// The gateway profile provisioning issues, for localhost and 127.0.0.1.
fn gateway_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "localhost");
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into().unwrap()),
        SanType::IpAddress("127.0.0.1".parse().unwrap()),
    ];
    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(1);
    p
}

fn server_ca_der(fleet: &Fleet) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(fleet.pki.server_ca_pem().unwrap().as_bytes()).unwrap()
}

fn der_key(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::try_from(key.serialize_der()).unwrap()
}

/// A gateway leaf of `params` for a new key of `alg`, signed by the server
/// CA, served with the server CA after it.
fn forged(
    fleet: &Fleet,
    alg: &'static rcgen::SignatureAlgorithm,
    params: CertificateParams,
) -> FakeGateway {
    let key = KeyPair::generate_for(alg).unwrap();
    let leaf = params.signed_by(&key, &server_ca(fleet)).unwrap();
    FakeGateway::start(
        vec![leaf.der().clone(), server_ca_der(fleet)],
        der_key(&key),
    )
}

fn doctor(fleet: &Fleet, name: &str, who: &Identity, port: u16) -> String {
    let (ok, report) = agent_doctor(&agent_config(fleet, name, who, port, ""));
    assert!(!ok, "{report}");
    assert_doctor_line(&report, "mqtt", "[SKIP]", &[]);
    report
}

/// What provisioning never issues to a gateway is refused even though the
/// server CA signed it: no extendedKeyUsage, an RSA key, a CA between the
/// server CA and the leaf (with and without a server CRL in the bundle).
#[test]
fn the_agent_refuses_gateway_certificates_the_pki_never_issues() {
    let mut fleet = Fleet::new();
    let pi = fleet.device("pi-1");

    // The harness itself: the real gateway certificate and key pass.
    let real_chain = CertificateDer::pem_file_iter(fleet.path("gw/gateway.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let real_key = PrivateKeyDer::from_pem_file(fleet.path("gw/gateway.key")).unwrap();
    let real = FakeGateway::start(real_chain, real_key);
    let (_, report) = agent_doctor(&agent_config(&fleet, "real", &pi, real.port, ""));
    assert_doctor_line(&report, "tls", "[ OK ]", &[]);

    let mut no_eku = gateway_params();
    no_eku.extended_key_usages.clear();
    let gw = forged(&fleet, &rcgen::PKCS_ECDSA_P256_SHA256, no_eku);
    let report = doctor(&fleet, "no-eku", &pi, gw.port);
    assert_doctor_line(
        &report,
        "tls",
        "[FAIL]",
        &[
            "has no extendedKeyUsage",
            "not one provisioning issued",
            "fix:",
            "provisioning gateway-cert",
        ],
    );

    let gw = forged(&fleet, &rcgen::PKCS_RSA_SHA256, gateway_params());
    let report = doctor(&fleet, "rsa", &pi, gw.port);
    assert_doctor_line(
        &report,
        "tls",
        "[FAIL]",
        &[
            "has an RSA-2048 key",
            "ECDSA P-256 keys only",
            "fix:",
            "provisioning gateway-cert",
        ],
    );

    // A sub-CA below the server CA (whose pathLenConstraint is 0).
    let mut sub_params = CertificateParams::default();
    sub_params
        .distinguished_name
        .push(DnType::CommonName, "Rogue sub CA");
    sub_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    sub_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    sub_params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    sub_params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(1);
    let sub_key = KeyPair::generate().unwrap();
    let sub_cert = sub_params.signed_by(&sub_key, &server_ca(&fleet)).unwrap();
    let sub = Issuer::new(sub_params, sub_key);
    let key = KeyPair::generate().unwrap();
    let leaf = gateway_params().signed_by(&key, &sub).unwrap();
    let gw = FakeGateway::start(
        vec![
            leaf.der().clone(),
            sub_cert.der().clone(),
            server_ca_der(&fleet),
        ],
        der_key(&key),
    );
    let below = [
        "issued by \"CN=Rogue sub CA\", a CA below the server CA",
        "fix:",
        "server CA must be replaced",
    ];
    let report = doctor(&fleet, "sub-ca-crl", &pi, gw.port);
    assert_doctor_line(&report, "server CRL", "[ OK ]", &[]);
    assert_doctor_line(&report, "tls", "[FAIL]", &below);
    std::fs::remove_file(pi.dir.join(files::SERVER_CRL)).unwrap();
    let report = doctor(&fleet, "sub-ca-no-crl", &pi, gw.port);
    assert_doctor_line(&report, "server CRL", "[WARN]", &[]);
    assert_doctor_line(&report, "tls", "[FAIL]", &below);

    // The running agent refuses it too, and logs why.
    let mut agent = agent(&fleet, "agent-sub-ca", &pi, gw.port, "");
    assert!(
        wait_until(30, || agent.log().contains("a CA below the server CA")),
        "{}",
        agent.log()
    );
    agent.kill();
}

/// Failures that used to be misnamed: the real gateway certificate with a
/// handshake signed by another key, and a chain through a leaf of our PKI
/// used as a CA (webpki's reason, which rustls passes on only as `Other`).
#[test]
fn doctor_names_a_stolen_certificate_and_a_leaf_used_as_ca() {
    let mut fleet = Fleet::new();
    let pi = fleet.device("pi-1");
    let real_chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(fleet.path("gw/gateway.pem"))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();

    let other_key = KeyPair::generate().unwrap();
    let gw = FakeGateway::start(real_chain.clone(), der_key(&other_key));
    let report = doctor(&fleet, "stolen", &pi, gw.port);
    assert_doctor_line(
        &report,
        "tls",
        "[FAIL]",
        &[
            "signed the handshake with another key",
            "does not hold that certificate's key",
            "fix:",
            "do not trust this endpoint",
        ],
    );
    assert!(!report.contains("not signed by server-ca.pem"), "{report}");
    assert!(!report.contains("replace server-ca.pem"), "{report}");

    // A leaf signed with the real gateway's key, as if it were a CA.
    let gateway_key =
        KeyPair::from_pem(&std::fs::read_to_string(fleet.path("gw/gateway.key")).unwrap()).unwrap();
    let gateway_issuer = Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(fleet.path("gw/gateway.pem")).unwrap(),
        gateway_key,
    )
    .unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = gateway_params().signed_by(&key, &gateway_issuer).unwrap();
    let mut chain = vec![leaf.der().clone()];
    chain.extend(real_chain);
    let gw = FakeGateway::start(chain, der_key(&key));
    let report = doctor(&fleet, "leaf-as-ca", &pi, gw.port);
    assert_doctor_line(
        &report,
        "tls",
        "[FAIL]",
        &[
            "signed by a certificate that is not a CA",
            "(EndEntityUsedAsCa)",
            "fix:",
            "must be revoked",
        ],
    );
    assert!(!report.contains("OtherError"), "{report}");
}
