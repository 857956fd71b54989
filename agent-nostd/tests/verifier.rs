//! The strict server verifier in real TLS 1.3 handshakes: embedded-tls on
//! the device side, a rustls server requiring the device's certificate on
//! the other, over loopback TCP. Each refusal names its reason.

use std::sync::Arc;

use embedded_io_adapters::tokio_1::FromTokio;
use embedded_tls::{TlsConfig, TlsConnection, TlsContext, TlsError};
use p256::pkcs8::DecodePrivateKey;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};
use twofold_agent_nostd::{Clock, DeviceProvider, NoClock, Refusal, StrictVerifier};

struct Ca {
    key: KeyPair,
    params: CertificateParams,
    der: Vec<u8>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        Ca::issued(name, BasicConstraints::Unconstrained, None)
    }

    /// A CA with `constraints`, self-signed or issued by `parent`.
    fn issued(name: &str, constraints: BasicConstraints, parent: Option<&Ca>) -> Ca {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(constraints);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = match parent {
            Some(parent) => params.clone().signed_by(&key, &parent.issuer()),
            None => params.clone().self_signed(&key),
        };
        let der = cert.unwrap().der().to_vec();
        Ca { key, params, der }
    }

    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::new(self.params.clone(), &self.key)
    }
}

/// A certificate (DER) and its key.
struct Leaf {
    der: Vec<u8>,
    key: KeyPair,
}

fn leaf(
    name: &str,
    issuer: &Issuer<'_, &KeyPair>,
    edit: impl FnOnce(&mut CertificateParams),
) -> Leaf {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.subject_alt_names = vec![
        SanType::DnsName("gateway.test".try_into().unwrap()),
        SanType::IpAddress("127.0.0.1".parse().unwrap()),
    ];
    params.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
    params.not_after = OffsetDateTime::now_utc() + Duration::days(30);
    edit(&mut params);
    let der = params.signed_by(&key, issuer).unwrap().der().to_vec();
    Leaf { der, key }
}

/// A device PKI: the CA the gateway trusts for clients, and one device.
struct Device {
    ca: Ca,
    leaf: Leaf,
}

fn device() -> Device {
    let ca = Ca::new("Device CA");
    let leaf = leaf("mcu-1", &ca.issuer(), |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.subject_alt_names = vec![SanType::URI(
            "spiffe://iot.example/device/mcu-1".try_into().unwrap(),
        )];
    });
    Device { ca, leaf }
}

struct Clocked(u64);
impl Clock for Clocked {
    fn now(&mut self) -> Option<u64> {
        Some(self.0)
    }
}

fn now() -> u64 {
    OffsetDateTime::now_utc().unix_timestamp() as u64
}

/// What the device saw.
#[derive(Debug)]
struct Outcome {
    open: Result<(), TlsError>,
    refusal: Option<Refusal>,
    verified: bool,
    /// What the server sent after the handshake, if it got that far.
    greeting: Vec<u8>,
}

/// Runs one handshake: a rustls server presenting `chain` (with `key`)
/// and requiring a certificate from `device`'s CA; the device trusting
/// only `anchor` for `name`.
async fn handshake<C: Clock>(
    device: &Device,
    chain: &[&[u8]],
    key: &KeyPair,
    anchor: &[u8],
    name: &str,
    clock: C,
) -> Outcome {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(device.ca.der.clone()))
        .unwrap();
    let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(clients)
        .with_single_cert(
            chain
                .iter()
                .map(|c| CertificateDer::from(c.to_vec()))
                .collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let (tcp, _) = listener.accept().await.unwrap();
        if let Ok(mut tls) = acceptor.accept(tcp).await {
            let _ = tls.write_all(b"hello").await;
            let _ = tls.flush().await;
            // Hold the connection until the device has read.
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    });

    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut rx = vec![0u8; 16_640];
    let mut tx = vec![0u8; 4_096];
    let mut tls: TlsConnection<'_, _, embedded_tls::Aes128GcmSha256> =
        TlsConnection::new(FromTokio::new(tcp), &mut rx, &mut tx);
    let signing =
        p256::ecdsa::SigningKey::from_pkcs8_der(&device.leaf.key.serialize_der()).unwrap();
    let mut dev = DeviceProvider::new(
        rand_core::OsRng,
        signing,
        &device.leaf.der,
        StrictVerifier::new(anchor, name, clock),
    );
    let config = TlsConfig::new().with_server_name(name);
    let open = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tls.open(TlsContext::new(&config, &mut dev)),
    )
    .await
    .expect("handshake timed out");
    let mut greeting = Vec::new();
    if open.is_ok() {
        let mut buf = [0u8; 16];
        if let Ok(Ok(n)) =
            tokio::time::timeout(std::time::Duration::from_secs(10), tls.read(&mut buf)).await
        {
            greeting.extend_from_slice(&buf[..n]);
        }
    }
    drop(tls);
    server.abort();
    Outcome {
        open,
        refusal: dev.verifier().refusal(),
        verified: dev.verifier().verified(),
        greeting,
    }
}

/// A device trusting `anchor`, and the server CA tests usually sign with.
struct Scene {
    device: Device,
    server_ca: Ca,
    anchor: Vec<u8>,
}

impl Scene {
    fn new() -> Scene {
        let server_ca = Ca::new("Server CA");
        Scene {
            device: device(),
            anchor: server_ca.der.clone(),
            server_ca,
        }
    }

    /// A server certificate from the server CA, edited.
    fn server(&self, edit: impl FnOnce(&mut CertificateParams)) -> Leaf {
        leaf("gateway", &self.server_ca.issuer(), edit)
    }

    /// The device connects for `name` to a server presenting `server`
    /// followed by `extra`.
    async fn offer<C: Clock>(
        &self,
        server: &Leaf,
        extra: &[&[u8]],
        name: &str,
        clock: C,
    ) -> Outcome {
        let mut chain = vec![&server.der[..]];
        chain.extend_from_slice(extra);
        handshake(&self.device, &chain, &server.key, &self.anchor, name, clock).await
    }
}

const NAME: &str = "gateway.test";

#[tokio::test]
async fn the_gateway_is_accepted_and_mutual_tls_works() {
    let scene = Scene::new();
    let gw = scene.server(|_| {});
    for name in [NAME, "127.0.0.1"] {
        // The server sends its leaf and the server CA, as the gateway does.
        let out = scene
            .offer(&gw, &[&scene.server_ca.der], name, Clocked(now()))
            .await;
        assert!(out.open.is_ok() && out.verified, "{name}: {out:?}");
        assert_eq!(out.greeting, b"hello", "{name}: {out:?}");
    }
}

#[tokio::test]
async fn a_server_certificate_signed_by_a_device_key_is_refused() {
    // One CA issued the devices; an attacker holding one device's key
    // signs a server certificate with it. The signatures chain to the
    // anchor, which is all embedded-tls's own verifier checks; but the
    // device certificate is not a CA.
    let mut scene = Scene::new();
    scene.anchor = scene.device.ca.der.clone();
    let victim = leaf("mcu-2", &scene.device.ca.issuer(), |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    });
    let mut victim_name = CertificateParams::default();
    victim_name
        .distinguished_name
        .push(DnType::CommonName, "mcu-2");
    let forged = leaf("gateway", &Issuer::new(victim_name, &victim.key), |_| {});
    let out = scene
        .offer(&forged, &[&victim.der], NAME, Clocked(now()))
        .await;
    assert!(
        matches!(out.open, Err(TlsError::InvalidCertificate)),
        "{out:?}"
    );
    assert_eq!(out.refusal, Some(Refusal::IssuerNotCa { depth: 1 }));
    assert!(!out.verified);
}

#[tokio::test]
async fn a_server_certificate_without_server_auth_is_refused() {
    let scene = Scene::new();
    let client_only = scene.server(|p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    });
    let no_eku = scene.server(|p| p.extended_key_usages = vec![]);
    for server in [&client_only, &no_eku] {
        let out = scene.offer(server, &[], NAME, NoClock).await;
        assert_eq!(out.refusal, Some(Refusal::NotServerAuth), "{out:?}");
        assert!(out.open.is_err() && !out.verified);
    }
}

#[tokio::test]
async fn a_server_under_a_sub_ca_of_a_path_len_0_server_ca_is_refused() {
    // The server CA may sign gateways only (pathLen 0); a sub-CA it
    // signed anyway, or whose key leaked from a mis-issuance, must not
    // be able to mint gateways.
    for (server_ca_constraints, accepted) in [
        (BasicConstraints::Constrained(0), false),
        (BasicConstraints::Constrained(1), true),
        (BasicConstraints::Unconstrained, true),
    ] {
        let server_ca = Ca::issued("Server CA", server_ca_constraints, None);
        let sub = Ca::issued("Sub CA", BasicConstraints::Unconstrained, Some(&server_ca));
        let scene = Scene {
            device: device(),
            anchor: server_ca.der.clone(),
            server_ca,
        };
        let gw = leaf("gateway", &sub.issuer(), |_| {});
        let out = scene.offer(&gw, &[&sub.der], NAME, Clocked(now())).await;
        if accepted {
            assert!(out.open.is_ok() && out.verified, "{out:?}");
        } else {
            assert_eq!(
                out.refusal,
                Some(Refusal::PathLenExceeded { depth: 2 }),
                "{out:?}"
            );
            assert!(out.open.is_err() && !out.verified);
        }
    }
    // An impostor sending its own root of the same name is not ours; its
    // chain is not long, it is foreign.
    let server_ca = Ca::issued("Server CA", BasicConstraints::Constrained(0), None);
    let impostor = Ca::new("Server CA");
    let forged = leaf("gateway", &impostor.issuer(), |_| {});
    let mut verifier = StrictVerifier::new(&server_ca.der, NAME, NoClock);
    assert_eq!(
        verifier.check_chain(&[&forged.der, &impostor.der]).err(),
        Some(Refusal::NotOurCa)
    );
    // A sub-CA's own pathLen 0 forbids another sub-CA below it.
    let server_ca = Ca::new("Server CA");
    let sub = Ca::issued("Sub CA", BasicConstraints::Constrained(0), Some(&server_ca));
    let sub2 = Ca::issued("Sub CA 2", BasicConstraints::Unconstrained, Some(&sub));
    let gw = leaf("gateway", &sub2.issuer(), |_| {});
    let mut verifier = StrictVerifier::new(&server_ca.der, NAME, NoClock);
    assert_eq!(
        verifier.check_chain(&[&gw.der, &sub2.der, &sub.der]).err(),
        Some(Refusal::PathLenExceeded { depth: 2 })
    );
}

#[test]
fn a_server_key_other_than_p256_is_refused_as_such() {
    let server_ca = Ca::new("Server CA");
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "gateway");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.subject_alt_names = vec![SanType::DnsName(NAME.try_into().unwrap())];
    let p384 = params.signed_by(&key, &server_ca.issuer()).unwrap();
    let mut verifier = StrictVerifier::new(&server_ca.der, NAME, NoClock);
    let refusal = verifier.check_chain(&[p384.der()]).err();
    assert_eq!(refusal, Some(Refusal::KeyNotP256 { depth: 0 }));
    assert_eq!(
        refusal.unwrap().to_string(),
        "not a P-256 key (certificate 0; 0 is the server's)"
    );
}

#[tokio::test]
async fn a_server_from_a_ca_the_bundle_does_not_name_is_refused() {
    let scene = Scene::new();
    let same_name = Ca::new("Server CA"); // another key
    let other_name = Ca::new("Another CA");
    for ca in [&same_name, &other_name] {
        let impostor = leaf("gateway", &ca.issuer(), |_| {});
        let out = scene.offer(&impostor, &[&ca.der], NAME, NoClock).await;
        assert_eq!(out.refusal, Some(Refusal::NotOurCa), "{out:?}");
        assert!(out.open.is_err() && !out.verified);
    }
}

#[tokio::test]
async fn a_wrong_host_name_is_refused() {
    let scene = Scene::new();
    let gw = scene.server(|_| {});
    for name in ["other.test", "127.0.0.2", "gateway.test.evil"] {
        let out = scene.offer(&gw, &[], name, NoClock).await;
        assert_eq!(out.refusal, Some(Refusal::WrongName), "{name}: {out:?}");
        assert!(out.open.is_err() && !out.verified);
    }
}

#[tokio::test]
async fn dates_are_checked_when_there_is_a_clock_and_only_then() {
    let scene = Scene::new();
    let expired = scene.server(|p| {
        p.not_before = OffsetDateTime::now_utc() - Duration::days(30);
        p.not_after = OffsetDateTime::now_utc() - Duration::days(1);
    });
    let out = scene.offer(&expired, &[], NAME, Clocked(now())).await;
    assert_eq!(out.refusal, Some(Refusal::Expired { depth: 0 }), "{out:?}");
    assert!(out.open.is_err());
    // A clock far behind: not valid yet.
    let out = scene
        .offer(&expired, &[], NAME, Clocked(1_000_000_000))
        .await;
    assert_eq!(
        out.refusal,
        Some(Refusal::NotYetValid { depth: 0 }),
        "{out:?}"
    );
    // Without a clock the dates are not checked (documented).
    let out = scene.offer(&expired, &[], NAME, NoClock).await;
    assert!(out.open.is_ok() && out.verified, "{out:?}");
}

#[test]
fn a_time_floor_refuses_a_gateway_certificate_that_expired_before_it() {
    let scene = Scene::new();
    let expired = scene.server(|p| {
        p.not_before = OffsetDateTime::now_utc() - Duration::days(30);
        p.not_after = OffsetDateTime::now_utc() - Duration::days(1);
    });
    // No clock, but the gateway's last authenticated time: refused.
    let mut v = StrictVerifier::new(&scene.anchor, NAME, NoClock).with_floor(Some(now()));
    assert_eq!(
        v.check_chain(&[&expired.der]).err(),
        Some(Refusal::Expired { depth: 0 })
    );
    // A clock two days behind accepts it alone; with the floor it is refused.
    let behind = Clocked(now() - 2 * 86_400);
    assert!(
        StrictVerifier::new(&scene.anchor, NAME, Clocked(now() - 2 * 86_400))
            .check_chain(&[&expired.der])
            .is_ok()
    );
    let mut v = StrictVerifier::new(&scene.anchor, NAME, behind).with_floor(Some(now()));
    assert_eq!(
        v.check_chain(&[&expired.der]).err(),
        Some(Refusal::Expired { depth: 0 })
    );
    // A floor is a lower bound: it says nothing about notBefore, and a
    // certificate that expires after it passes.
    let later = scene.server(|p| {
        p.not_before = OffsetDateTime::now_utc() + Duration::days(1);
        p.not_after = OffsetDateTime::now_utc() + Duration::days(30);
    });
    let mut v = StrictVerifier::new(&scene.anchor, NAME, NoClock).with_floor(Some(now()));
    assert!(v.check_chain(&[&later.der]).is_ok());
}

#[tokio::test]
async fn a_ca_certificate_as_the_server_leaf_is_refused() {
    let scene = Scene::new();
    let ca_leaf = scene.server(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained));
    let out = scene.offer(&ca_leaf, &[], NAME, NoClock).await;
    assert_eq!(out.refusal, Some(Refusal::LeafIsCa), "{out:?}");
}

#[test]
fn damaged_certificates_are_refused_without_panicking() {
    let server_ca = Ca::new("Server CA");
    let gw = leaf("gateway", &server_ca.issuer(), |_| {});
    assert!(twofold_agent_nostd::x509::parse(&gw.der).is_ok());
    for len in 0..gw.der.len() {
        assert!(
            twofold_agent_nostd::x509::parse(&gw.der[..len]).is_err(),
            "{len}"
        );
    }
    let mut damaged = gw.der.clone();
    for i in 0..damaged.len() {
        for flip in [0x01, 0x80, 0xff] {
            damaged[i] ^= flip;
            let _ = twofold_agent_nostd::x509::parse(&damaged);
            damaged[i] ^= flip;
        }
    }
}
