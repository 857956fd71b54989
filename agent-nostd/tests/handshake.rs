//! The agent's handshake (`Agent::run`, the code the firmware runs)
//! against a TLS 1.3 server written here by hand, so that it can misbehave
//! as no real stack will: leave out Certificate or CertificateVerify, sign
//! with the wrong key. The server records what the device sent: its SNI,
//! its handshake messages (decrypted) and its alerts.
//!
//! The server speaks just enough TLS 1.3 for embedded-tls: P-256 key
//! share, TLS_AES_128_GCM_SHA256, ECDSA-P256-SHA256, the whole encrypted
//! flight in one record.

use std::fmt::Display;
use std::time::{Duration, Instant};

use aes_gcm::Aes128Gcm;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use embedded_io_adapters::tokio_1::FromTokio;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use p256::ecdsa::SigningKey;
use p256::ecdsa::signature::Signer;
use p256::pkcs8::DecodePrivateKey;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use twofold_agent_nostd::basic::{BasicApp, Limits};
use twofold_agent_nostd::{
    Agent, Buffers, Clock, Connect, DeviceProvider, Error, NoClock, Refusal, Settings,
    StrictVerifier, Timer,
};
use twofold_protocol::{Bundle, DeviceId};

// ---------------------------------------------------------------- PKI

struct Ca {
    key: KeyPair,
    params: CertificateParams,
    der: Vec<u8>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        Ca::issued(name, None)
    }

    /// A CA (pathLen 0), self-signed or issued by `parent`.
    fn issued(name: &str, parent: Option<&Ca>) -> Ca {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = match parent {
            Some(parent) => params
                .clone()
                .signed_by(&key, &Issuer::new(parent.params.clone(), &parent.key)),
            None => params.clone().self_signed(&key),
        };
        let der = cert.unwrap().der().to_vec();
        Ca { key, params, der }
    }

    /// A leaf from this CA: a gateway certificate unless `edit` says otherwise.
    fn leaf(&self, cn: &str, edit: impl FnOnce(&mut CertificateParams)) -> Leaf {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.subject_alt_names = vec![
            SanType::DnsName("gateway.test".try_into().unwrap()),
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
            SanType::IpAddress("::1".parse().unwrap()),
        ];
        params.not_before = OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = OffsetDateTime::now_utc() + time::Duration::days(30);
        edit(&mut params);
        let issuer = Issuer::new(self.params.clone(), &self.key);
        let der = params.signed_by(&key, &issuer).unwrap().der().to_vec();
        let pkcs8 = key.serialize_der();
        let key = SigningKey::from_pkcs8_der(&pkcs8).unwrap();
        Leaf { der, key, pkcs8 }
    }
}

struct Leaf {
    der: Vec<u8>,
    key: SigningKey,
    pkcs8: Vec<u8>,
}

/// The server CA the device trusts, a gateway certificate from it, and
/// the device's own certificate.
struct Pki {
    server_ca: Ca,
    gateway: Leaf,
    device_ca: Ca,
    device: Leaf,
}

impl Pki {
    fn new() -> Pki {
        let server_ca = Ca::new("Server CA");
        let gateway = server_ca.leaf("gateway", |_| {});
        let device_ca = Ca::new("Device CA");
        let device = device_ca.leaf("mcu-1", |p| {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            p.subject_alt_names = vec![SanType::URI(
                "spiffe://iot.example/device/mcu-1".try_into().unwrap(),
            )];
        });
        Pki {
            server_ca,
            gateway,
            device_ca,
            device,
        }
    }
}

// ---------------------------------------------------- the fake server

/// What the server proves in its flight.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proof {
    /// Certificate and a good CertificateVerify.
    Full,
    /// Certificate, then a CertificateVerify made with another key.
    WrongKey,
    /// Certificate, no CertificateVerify.
    NoCertificateVerify,
    /// Neither Certificate nor CertificateVerify.
    Nothing,
}

/// The server's flight.
struct Flight {
    chain: Vec<Vec<u8>>,
    key: SigningKey,
    proof: Proof,
    /// Send a CertificateRequest (the gateway always does).
    request_certificate: bool,
}

/// Something the device sent after the server's flight.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sent {
    /// A handshake message, by type (11 Certificate, 15 CertificateVerify,
    /// 20 Finished), decrypted with the client handshake key.
    Handshake(u8),
    Alert {
        level: u8,
        description: u8,
        encrypted: bool,
    },
    /// A plaintext record of another type, with its first payload byte.
    Plaintext { typ: u8, first: Option<u8> },
    /// A record the client handshake key does not open (application data
    /// after the device's Finished).
    Opaque,
}

/// What the server saw.
#[derive(Debug, Default)]
struct Seen {
    sni: Option<String>,
    sent: Vec<Sent>,
}

impl Seen {
    /// Whether the device sent anything that identifies it or proves its key.
    fn device_spoke(&self) -> bool {
        self.sent.iter().any(|s| {
            matches!(
                s,
                Sent::Handshake(11 | 15 | 20) | Sent::Opaque | Sent::Plaintext { .. }
            )
        })
    }
}

fn u16be(n: usize) -> [u8; 2] {
    (n as u16).to_be_bytes()
}

fn u24be(n: usize) -> [u8; 3] {
    let b = (n as u32).to_be_bytes();
    [b[1], b[2], b[3]]
}

/// A handshake message: type, 24-bit length, body.
fn handshake(typ: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![typ];
    m.extend(u24be(body.len()));
    m.extend(body);
    m
}

/// HKDF-Expand-Label with SHA-256.
fn expand_label(secret: &[u8], label: &str, context: &[u8], len: usize) -> Vec<u8> {
    let hk = Hkdf::<Sha256>::from_prk(secret).unwrap();
    let label = format!("tls13 {label}");
    let mut info = u16be(len).to_vec();
    info.push(label.len() as u8);
    info.extend(label.as_bytes());
    info.push(context.len() as u8);
    info.extend(context);
    let mut out = vec![0; len];
    hk.expand(&info, &mut out).unwrap();
    out
}

/// One direction's record protection.
struct Keys {
    aead: Aes128Gcm,
    iv: Vec<u8>,
    seq: u64,
}

impl Keys {
    fn new(secret: &[u8]) -> Keys {
        let key = expand_label(secret, "key", &[], 16);
        Keys {
            aead: Aes128Gcm::new_from_slice(&key).unwrap(),
            iv: expand_label(secret, "iv", &[], 12),
            seq: 0,
        }
    }

    fn nonce(&mut self) -> aes_gcm::Nonce<aes_gcm::aead::consts::U12> {
        let mut n = self.iv.clone();
        for (i, b) in self.seq.to_be_bytes().iter().enumerate() {
            n[4 + i] ^= b;
        }
        self.seq += 1;
        *aes_gcm::Nonce::from_slice(&n)
    }

    fn seal(&mut self, typ: u8, data: &[u8]) -> Vec<u8> {
        let mut inner = data.to_vec();
        inner.push(typ);
        let len = u16be(inner.len() + 16);
        let header = [23, 3, 3, len[0], len[1]];
        let nonce = self.nonce();
        self.aead
            .encrypt_in_place(&nonce, &header, &mut inner)
            .unwrap();
        [&header[..], &inner].concat()
    }

    /// The inner content type and plaintext, or `None` if it does not open.
    fn open(&mut self, header: &[u8], body: &[u8]) -> Option<(u8, Vec<u8>)> {
        let mut buf = body.to_vec();
        let nonce = self.nonce();
        if self
            .aead
            .decrypt_in_place(&nonce, header, &mut buf)
            .is_err()
        {
            self.seq -= 1;
            return None;
        }
        while buf.last() == Some(&0) {
            buf.pop();
        }
        let typ = buf.pop()?;
        Some((typ, buf))
    }
}

async fn read_record(tcp: &mut TcpStream) -> Option<([u8; 5], Vec<u8>)> {
    let mut header = [0u8; 5];
    tcp.read_exact(&mut header).await.ok()?;
    let mut body = vec![0; u16::from_be_bytes([header[3], header[4]]) as usize];
    tcp.read_exact(&mut body).await.ok()?;
    Some((header, body))
}

/// A cursor over a message.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        head
    }
    fn u16(&mut self) -> usize {
        let b = self.take(2);
        u16::from_be_bytes([b[0], b[1]]) as usize
    }
    fn vec8(&mut self) -> &'a [u8] {
        let n = self.take(1)[0] as usize;
        self.take(n)
    }
    fn vec16(&mut self) -> &'a [u8] {
        let n = self.u16();
        self.take(n)
    }
}

/// Serves one connection with `flight`; returns what the device did.
async fn serve(listener: TcpListener, flight: Flight) -> Seen {
    let (mut tcp, _) = listener.accept().await.unwrap();
    let mut seen = Seen::default();
    let mut transcript = Sha256::new();

    // ClientHello: its SNI and P-256 key share.
    let (header, hello) = read_record(&mut tcp).await.expect("no ClientHello");
    assert_eq!((header[0], hello[0]), (22, 1), "not a ClientHello");
    transcript.update(&hello);
    let mut r = Reader(&hello[4..]);
    r.take(2 + 32);
    let session_id = r.vec8().to_vec();
    r.vec16();
    r.vec8();
    let mut extensions = Reader(r.vec16());
    let mut client_share = None;
    while !extensions.0.is_empty() {
        let typ = extensions.u16();
        let mut data = Reader(extensions.vec16());
        match typ {
            0 => {
                let mut list = Reader(data.vec16());
                assert_eq!(list.take(1), [0], "SNI of a type other than host_name");
                seen.sni = Some(String::from_utf8(list.vec16().to_vec()).unwrap());
            }
            51 => {
                let mut shares = Reader(data.vec16());
                while !shares.0.is_empty() {
                    let group = shares.u16();
                    let key = shares.vec16();
                    if group == 0x17 {
                        client_share = Some(key.to_vec());
                    }
                }
            }
            _ => {}
        }
    }
    let client_share = p256::PublicKey::from_sec1_bytes(&client_share.unwrap()).unwrap();

    // ServerHello.
    let secret = p256::ecdh::EphemeralSecret::random(&mut rand_core::OsRng);
    let point = p256::EncodedPoint::from(secret.public_key());
    let mut body = vec![3, 3];
    body.extend([0x5a; 32]);
    body.push(session_id.len() as u8);
    body.extend(&session_id);
    body.extend([0x13, 0x01, 0]);
    let mut ext = vec![0, 43, 0, 2, 3, 4, 0, 51];
    ext.extend(u16be(4 + point.len()));
    ext.extend([0, 0x17]);
    ext.extend(u16be(point.len()));
    ext.extend(point.as_bytes());
    body.extend(u16be(ext.len()));
    body.extend(ext);
    let server_hello = handshake(2, &body);
    transcript.update(&server_hello);
    let mut record = vec![22, 3, 3];
    record.extend(u16be(server_hello.len()));
    record.extend(&server_hello);
    tcp.write_all(&record).await.unwrap();

    // The handshake secrets.
    let shared = secret.diffie_hellman(&client_share);
    let (early, _) = Hkdf::<Sha256>::extract(Some(&[0; 32]), &[0; 32]);
    let derived = expand_label(&early, "derived", &Sha256::digest(b""), 32);
    let (hs, _) = Hkdf::<Sha256>::extract(Some(&derived), shared.raw_secret_bytes());
    let hello_hash = transcript.clone().finalize();
    let client_secret = expand_label(&hs, "c hs traffic", &hello_hash, 32);
    let server_secret = expand_label(&hs, "s hs traffic", &hello_hash, 32);
    let mut server_keys = Keys::new(&server_secret);
    let mut client_keys = Keys::new(&client_secret);

    // The encrypted flight, in one record.
    let mut out = Vec::new();
    let mut add = |m: Vec<u8>, transcript: &mut Sha256| {
        transcript.update(&m);
        out.extend(m);
    };
    add(handshake(8, &[0, 0]), &mut transcript);
    if flight.request_certificate {
        // signature_algorithms: ecdsa_secp256r1_sha256.
        let body = [0, 0, 8, 0, 13, 0, 4, 0, 2, 4, 3];
        add(handshake(13, &body), &mut transcript);
    }
    if flight.proof != Proof::Nothing {
        let mut list = Vec::new();
        for der in &flight.chain {
            list.extend(u24be(der.len()));
            list.extend(der);
            list.extend([0, 0]);
        }
        let mut body = vec![0];
        body.extend(u24be(list.len()));
        body.extend(list);
        add(handshake(11, &body), &mut transcript);
    }
    if matches!(flight.proof, Proof::Full | Proof::WrongKey) {
        let mut content = vec![b' '; 64];
        content.extend(b"TLS 1.3, server CertificateVerify\0");
        content.extend(transcript.clone().finalize());
        let key = match flight.proof {
            Proof::Full => flight.key.clone(),
            _ => SigningKey::random(&mut rand_core::OsRng),
        };
        let signature: p256::ecdsa::Signature = key.sign(&content);
        let der = signature.to_der();
        let mut body = vec![4, 3];
        body.extend(u16be(der.as_bytes().len()));
        body.extend(der.as_bytes());
        add(handshake(15, &body), &mut transcript);
    }
    let finished_key = expand_label(&server_secret, "finished", &[], 32);
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&finished_key).unwrap();
    mac.update(&transcript.clone().finalize());
    add(handshake(20, &mac.finalize().into_bytes()), &mut transcript);
    let record = server_keys.seal(22, &out);
    tcp.write_all(&record).await.unwrap();

    // What the device answers, until it closes or has finished.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(Some((header, body))) =
        tokio::time::timeout_at(deadline, read_record(&mut tcp)).await
    {
        match header[0] {
            21 => seen.sent.push(Sent::Alert {
                level: body[0],
                description: body[1],
                encrypted: false,
            }),
            23 => match client_keys.open(&header, &body) {
                Some((22, messages)) => {
                    let mut r = Reader(&messages);
                    while !r.0.is_empty() {
                        let typ = r.take(1)[0];
                        let len = r.take(3);
                        r.take(u32::from_be_bytes([0, len[0], len[1], len[2]]) as usize);
                        seen.sent.push(Sent::Handshake(typ));
                    }
                }
                Some((21, alert)) => seen.sent.push(Sent::Alert {
                    level: alert[0],
                    description: alert[1],
                    encrypted: true,
                }),
                _ => {
                    seen.sent.push(Sent::Opaque);
                    break;
                }
            },
            typ => seen.sent.push(Sent::Plaintext {
                typ,
                first: body.first().copied(),
            }),
        }
    }
    seen
}

// ---------------------------------------------------------- the device

#[derive(Clone, Copy)]
struct TokioTimer(Instant);

impl Timer for TokioTimer {
    fn now_ms(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }

    async fn wait_until(&self, deadline: u64) {
        tokio::time::sleep_until((self.0 + Duration::from_millis(deadline)).into()).await;
    }
}

struct Tcp;

impl Connect for Tcp {
    type Io = FromTokio<TcpStream>;
    type Error = std::io::Error;

    async fn connect(&mut self, host: &str, port: u16) -> Result<Self::Io, Self::Error> {
        Ok(FromTokio::new(TcpStream::connect((host, port)).await?))
    }
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

/// The device connects once, for `server_name`, to a server sending
/// `flight`; returns how its session ended and what the server saw.
async fn connect<C: Clock>(
    pki: &Pki,
    server_name: &str,
    clock: C,
    flight: Flight,
) -> (Error, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(serve(listener, flight));
    let error = run_device(pki, server_name, clock, port).await;
    (error, server.await.unwrap())
}

/// The device's one session with the server on `port`, which must fail.
async fn run_device<C: Clock>(pki: &Pki, server_name: &str, mut clock: C, port: u16) -> Error {
    let mut key = pki.device.key.clone();
    let private_key = key.to_bytes();
    let mut chain = heapless::Vec::new();
    chain.push(&pki.device.der[..]).unwrap();
    chain.push(&pki.device_ca.der[..]).unwrap();
    let bundle = Bundle {
        device_id: DeviceId::parse("mcu-1").unwrap(),
        gateway_host: "127.0.0.1",
        gateway_port: port,
        server_name,
        private_key: &private_key,
        chain,
        server_ca: &pki.server_ca.der,
    };
    let timer = TokioTimer(Instant::now());
    let limits = Limits {
        failures: Some(1),
        ..Limits::default()
    };
    let app = BasicApp::new(timer, limits, |e: &dyn Display| eprintln!("device: {e}"));
    let settings = Settings {
        handshake_ms: 5_000,
        response_ms: 2_000,
        ..Settings::default()
    };
    let mut agent = Agent::new(&bundle, settings, app, timer);
    let (mut tls_rx, mut tls_tx) = (vec![0u8; 16_640], [0u8; 1024]);
    let (mut mqtt_rx, mut mqtt_tx) = ([0u8; 512], [0u8; 512]);
    let mut bufs = Buffers {
        tls_rx: &mut tls_rx,
        tls_tx: &mut tls_tx,
        mqtt_rx: &mut mqtt_rx,
        mqtt_tx: &mut mqtt_tx,
    };
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        agent.run(
            &mut Tcp,
            &mut rand_core::OsRng,
            &mut key,
            &mut clock,
            &mut bufs,
        ),
    )
    .await
    .expect("the device hung");
    result.expect_err("the session cannot succeed: the server speaks no MQTT")
}

/// A flight from the gateway certificate of `pki`.
fn flight(pki: &Pki, proof: Proof) -> Flight {
    Flight {
        chain: vec![pki.gateway.der.clone(), pki.server_ca.der.clone()],
        key: pki.gateway.key.clone(),
        proof,
        request_certificate: true,
    }
}

const COMPLETE: [Sent; 4] = [
    Sent::Handshake(11),
    Sent::Handshake(15),
    Sent::Handshake(20),
    Sent::Opaque, // MQTT CONNECT
];

#[tokio::test]
async fn a_gateway_that_proves_itself_gets_the_device_certificate() {
    // The control for every test below: the hand-made server is good
    // enough for embedded-tls to finish the handshake with it.
    let pki = Pki::new();
    let (error, seen) = connect(
        &pki,
        "gateway.test",
        Clocked(now()),
        flight(&pki, Proof::Full),
    )
    .await;
    assert_eq!(seen.sent, COMPLETE, "{error}");
    // The server closes after the handshake instead of answering CONNECT:
    // to the device that is a gateway refusing its certificate.
    assert!(matches!(error, Error::CertificateRefused), "{error}");
}

#[tokio::test]
async fn no_sni_is_sent_for_an_ip_address_and_its_san_still_verifies() {
    let pki = Pki::new();
    let (_, seen) = connect(&pki, "gateway.test", NoClock, flight(&pki, Proof::Full)).await;
    assert_eq!(seen.sni.as_deref(), Some("gateway.test"));
    for address in ["127.0.0.1", "::1"] {
        let (error, seen) = connect(&pki, address, NoClock, flight(&pki, Proof::Full)).await;
        // RFC 6066: host names only; a strict server aborts on an address.
        assert_eq!(seen.sni, None, "{address}");
        // The certificate's IP address SAN was checked and matched.
        assert_eq!(seen.sent, COMPLETE, "{address}: {error}");
    }
    // An address the certificate does not name is still refused.
    let (error, seen) = connect(&pki, "127.0.0.2", NoClock, flight(&pki, Proof::Full)).await;
    assert_eq!(seen.sni, None);
    assert!(
        matches!(error, Error::ServerRefused(Refusal::WrongName)),
        "{error}"
    );
}

#[tokio::test]
async fn a_server_that_proves_nothing_learns_nothing_from_the_device() {
    // The device's certificate names it, and its CertificateVerify is a
    // signature on the attacker's transcript: neither may go to a server
    // that has not shown a verified chain and a CertificateVerify made
    // with that chain's key. Nor may its Finished.
    let pki = Pki::new();
    for (proof, request_certificate, refusal) in [
        (
            Proof::NoCertificateVerify,
            true,
            Refusal::NoCertificateVerify,
        ),
        (Proof::Nothing, true, Refusal::NoCertificate),
        (
            Proof::NoCertificateVerify,
            false,
            Refusal::NoCertificateVerify,
        ),
        (Proof::Nothing, false, Refusal::NoCertificate),
        (Proof::WrongKey, true, Refusal::BadHandshakeSignature),
    ] {
        let mut f = flight(&pki, proof);
        f.request_certificate = request_certificate;
        let (error, seen) = connect(&pki, "gateway.test", Clocked(now()), f).await;
        let case = format!("{proof:?}, CertificateRequest {request_certificate}");
        assert!(!seen.device_spoke(), "{case}: {:?}", seen.sent);
        assert!(
            matches!(error, Error::ServerRefused(r) if r == refusal),
            "{case}: {error}"
        );
    }
}

#[test]
fn the_provider_gives_an_unproven_server_no_certificate_and_no_signature() {
    use embedded_tls::CryptoProvider;
    let pki = Pki::new();
    let verifier = StrictVerifier::new(&pki.server_ca.der, "gateway.test", NoClock);
    let mut provider = DeviceProvider::new(
        rand_core::OsRng,
        pki.device.key.clone(),
        &pki.device.der,
        verifier,
    );
    assert!(provider.client_cert().is_none());
    assert!(provider.signer().is_err());
}

/// The alert a refusing device sends: fatal, in plaintext.
fn alert(description: u8) -> Sent {
    Sent::Alert {
        level: 2,
        description,
        encrypted: false,
    }
}

#[tokio::test]
async fn a_refused_server_gets_an_alert_naming_the_reason() {
    let pki = Pki::new();
    let other_ca = Ca::new("Server CA");
    let sub_ca = Ca::issued("Sub CA", Some(&pki.server_ca));
    let with = |gateway: Leaf, extra: &Ca| Flight {
        chain: vec![gateway.der, extra.der.clone()],
        key: gateway.key,
        proof: Proof::Full,
        request_certificate: true,
    };
    let expired = pki.server_ca.leaf("gateway", |p| {
        p.not_after = OffsetDateTime::now_utc() - time::Duration::days(1);
    });
    let client_only = pki.server_ca.leaf("gateway", |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    });
    let cases = [
        ("bad CertificateVerify", flight(&pki, Proof::WrongKey), 51),
        (
            "no CertificateVerify",
            flight(&pki, Proof::NoCertificateVerify),
            10,
        ),
        ("no Certificate", flight(&pki, Proof::Nothing), 10),
        ("expired", with(expired, &pki.server_ca), 45),
        (
            "unknown CA",
            with(other_ca.leaf("gateway", |_| {}), &other_ca),
            48,
        ),
        ("no serverAuth", with(client_only, &pki.server_ca), 43),
        (
            "path length",
            with(sub_ca.leaf("gateway", |_| {}), &sub_ca),
            42,
        ),
    ];
    for (case, flight, description) in cases {
        let (error, seen) = connect(&pki, "gateway.test", Clocked(now()), flight).await;
        assert!(matches!(error, Error::ServerRefused(_)), "{case}: {error}");
        assert_eq!(seen.sent, [alert(description)], "{case}: {error}");
    }
    let (error, seen) = connect(&pki, "other.test", NoClock, flight(&pki, Proof::Full)).await;
    assert_eq!(seen.sent, [alert(42)], "wrong name: {error}");
}

#[tokio::test]
async fn rustls_reads_the_alert_of_a_refusing_device() {
    // The gateway's TLS stack takes the plaintext alert and reports it.
    let pki = Pki::new();
    let expired = pki.server_ca.leaf("gateway", |p| {
        p.not_after = OffsetDateTime::now_utc() - time::Duration::days(1);
    });
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![expired.der.clone().into(), pki.server_ca.der.clone().into()],
            rustls::pki_types::PrivatePkcs8KeyDer::from(expired.pkcs8.clone()).into(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let Err(error) = acceptor.accept(tcp).await else {
            panic!("handshake completed");
        };
        error
            .into_inner()
            .unwrap()
            .downcast::<rustls::Error>()
            .unwrap()
    });
    let error = run_device(&pki, "gateway.test", Clocked(now()), port).await;
    assert!(
        matches!(error, Error::ServerRefused(Refusal::Expired { depth: 0 })),
        "{error}"
    );
    assert_eq!(
        *server.await.unwrap(),
        rustls::Error::AlertReceived(rustls::AlertDescription::CertificateExpired)
    );
}
