//! A certificate from the gateway's TLS handshake, through the
//! microcontroller agent's DER reader: the certificate, its subjectAltName
//! entries, its ECDSA signature.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twofold_agent_nostd::verify::names_server;
use twofold_agent_nostd::x509;

fuzz_target!(|der: &[u8]| {
    let Ok(cert) = x509::parse(der) else {
        return;
    };
    assert!(cert.not_before <= 253_402_300_799 && cert.not_after <= 253_402_300_799);
    let _ = x509::ecdsa_signature(cert.signature);
    if let Some(san) = cert.san {
        let _ = x509::any_alt_name(san, |_| false);
        let _ = names_server(san, "localhost");
        let _ = names_server(san, "127.0.0.1");
        let _ = names_server(san, "::1");
    }
});
