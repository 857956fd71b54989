//! What a key in a token costs: P-256 signatures per second through
//! SoftHSM2 and through a software TPM 2.0 (swtpm behind tpm2-abrmd, with
//! libtpm2_pkcs11), against the same signature by aws-lc-rs in process
//! (a key file). One signature is one TLS handshake for a device, and one
//! certificate or CRL for the CA.
//!
//! `cargo bench -p twofold-token --bench sign [-- --count N]`
//!
//! It makes its tokens with their own tools (Debian's softhsm2, swtpm,
//! tpm2-abrmd, libtpm2-pkcs11-tools; scripts/install-deps) and runs itself
//! again with their environment: the modules read it once, when loaded.

use std::time::Instant;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use twofold_tests::tokens::{SOFTHSM_MODULE, TPM_MODULE};
use twofold_tests::{SoftHsm, SwTpm};
use twofold_token::{PinSource, Token, TokenSpec};

const CHILD: &str = "TWOFOLD_SIGN_BENCH";

fn main() {
    let count: usize = std::env::args()
        .skip_while(|a| a != "--count")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    if std::env::var_os(CHILD).is_none() {
        let hsm = SoftHsm::new(&["bench"]);
        let tpm = SwTpm::new("bench");
        let (soft, t) = (hsm.token_env(), tpm.token_env());
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(std::env::args_os().skip(1))
            .envs(soft.env.iter().chain(&t.env).map(|(k, v)| (k, v)))
            .env(
                CHILD,
                format!("{}\n{}", soft.pin_file.display(), t.pin_file.display()),
            )
            .status()
            .unwrap();
        // exit() runs no destructors: the TPM's processes go first.
        drop((hsm, tpm));
        std::process::exit(status.code().unwrap_or(101));
    }
    let pins = std::env::var(CHILD).unwrap();
    let (soft_pin, tpm_pin) = pins.split_once('\n').unwrap();
    let message = [0x5a_u8; 130];

    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref()).unwrap();
    let file = rate(count * 10, || {
        pair.sign(&rng, &message).unwrap();
    });

    let in_token = |module: &str, pin: &str, n: usize| {
        let token = Token::open(&TokenSpec {
            module: module.into(),
            token: "bench".into(),
            pin: PinSource::File(pin.into()),
        })
        .unwrap();
        let key = token.key(token.generate_p256("bench", &[1, 2, 3]).unwrap());
        rate(n, || {
            key.sign_sha256(&message).unwrap();
        })
    };
    let soft = in_token(SOFTHSM_MODULE, soft_pin, count);
    // A TPM is slow by design: a tenth as many.
    let tpm = in_token(TPM_MODULE, tpm_pin, (count / 10).max(20));

    println!("P-256 signatures per second (one per TLS handshake, certificate or CRL)");
    println!("| key | signatures/s | ms each | vs a key file |");
    println!("|---|---|---|---|");
    for (name, r) in [
        ("file (aws-lc-rs, in process)", file),
        ("SoftHSM2 2.6.1 (PKCS#11)", soft),
        ("swtpm 0.7.1 + tpm2-abrmd + libtpm2-pkcs11 1.9.0", tpm),
    ] {
        println!("| {name} | {r:.0} | {:.2} | {:.3}x |", 1000.0 / r, r / file);
    }
}

/// Calls per second of `f`, over `n` calls.
fn rate(n: usize, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    for _ in 0..n {
        f();
    }
    n as f64 / start.elapsed().as_secs_f64()
}
