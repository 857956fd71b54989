//! Every certificate provisioning issues is DER, read by strict parsers:
//! RustCrypto's `x509-cert`, which must also encode each certificate and
//! each extension back to the very same bytes (DER has one encoding per
//! value), and Python's `cryptography` (≥ 42, whose parser refuses BER
//! such as a DEFAULT value written out).

mod common;

use std::path::Path;
use std::process::Command;

use common::{Env, openssl_ok};
use x509_cert::Certificate;
use x509_cert::der::oid::AssociatedOid;
use x509_cert::der::{Decode, Encode};
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, CrlDistributionPoints, ExtendedKeyUsage, KeyUsage,
    SubjectAltName, SubjectKeyIdentifier,
};

/// A PKI with one certificate of every kind provisioning issues, and the
/// PEM files holding them, each with whether its certificates are CAs.
fn every_kind() -> (Env, Vec<(&'static str, &'static [bool])>) {
    let env = Env::with_pki();
    env.ok(&["enroll", "sensor-1", "--out", "dev"]);
    env.ok(&["enroll", "--service", "billing", "--out", "svc"]);
    env.ok(&[
        "gateway-cert",
        "gw.iot.example",
        "--ip",
        "127.0.0.1",
        "--ip",
        "::1",
        "--crl-url",
        "http://pki.iot.example/server-crl.der",
        "--out",
        "gw",
    ]);
    let d = env.dir.path();
    openssl_ok(
        d,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "edge.key",
            "-subj",
            "/CN=edge-1",
            "-out",
            "edge.csr",
        ],
    );
    env.ok(&["sign-csr", "edge.csr", "--out", "edge.pem"]);
    let files: Vec<(&'static str, &'static [bool])> = vec![
        ("pki/root-ca.pem", &[true]),
        ("pki/device-ca.pem", &[true]),
        ("pki/server-ca.pem", &[true]),
        // Each chain file: the leaf, then its CA.
        ("dev/device.pem", &[false, true]),
        ("svc/device.pem", &[false, true]),
        ("edge.pem", &[false, true]),
        ("gw/gateway.pem", &[false, true]),
    ];
    (env, files)
}

fn ders(path: &Path) -> Vec<Vec<u8>> {
    let text = std::fs::read(path).unwrap();
    pem::parse_many(text)
        .unwrap()
        .into_iter()
        .map(|p| {
            assert_eq!(p.tag(), "CERTIFICATE", "{}", path.display());
            p.into_contents()
        })
        .collect()
}

/// Decodes `value` as `T` and encodes it again: the bytes must not change.
fn canonical<'a, T: Decode<'a> + Encode>(value: &'a [u8], what: &str) -> T {
    let decoded = T::from_der(value).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        decoded.to_der().unwrap(),
        value,
        "{what} is not DER: it does not encode back to the same bytes"
    );
    decoded
}

#[test]
fn x509_cert_reads_every_kind_as_der() {
    let (env, files) = every_kind();
    for (file, cas) in files {
        let certs = ders(&env.path(file));
        assert_eq!(certs.len(), cas.len(), "{file}");
        for (der, &is_ca) in certs.iter().zip(cas) {
            let cert: Certificate = canonical(der, file);
            let extensions = cert.tbs_certificate.extensions.as_deref().unwrap_or(&[]);
            let mut basic = None;
            for ext in extensions {
                let what = format!("{file}: extension {}", ext.extn_id);
                let value = ext.extn_value.as_bytes();
                match ext.extn_id {
                    BasicConstraints::OID => {
                        basic = Some(canonical::<BasicConstraints>(value, &what));
                        assert!(ext.critical, "{what} is critical");
                    }
                    KeyUsage::OID => drop(canonical::<KeyUsage>(value, &what)),
                    ExtendedKeyUsage::OID => drop(canonical::<ExtendedKeyUsage>(value, &what)),
                    SubjectAltName::OID => drop(canonical::<SubjectAltName>(value, &what)),
                    SubjectKeyIdentifier::OID => {
                        let id = canonical::<SubjectKeyIdentifier>(value, &what);
                        assert_eq!(id.0.as_bytes().len(), 20, "{what}");
                    }
                    AuthorityKeyIdentifier::OID => {
                        drop(canonical::<AuthorityKeyIdentifier>(value, &what))
                    }
                    CrlDistributionPoints::OID => {
                        drop(canonical::<CrlDistributionPoints>(value, &what))
                    }
                    other => panic!("{file}: an extension this test does not know: {other}"),
                }
            }
            let basic = basic.unwrap_or_else(|| panic!("{file}: no basicConstraints"));
            assert_eq!(basic.ca, is_ca, "{file}");
            if !is_ca {
                assert_eq!(basic.path_len_constraint, None, "{file}");
                assert!(
                    extensions
                        .iter()
                        .any(|e| e.extn_id == SubjectKeyIdentifier::OID),
                    "{file}: a leaf names its key"
                );
            }
        }
    }
}

/// What the Python script prints for each certificate it reads.
const CRYPTOGRAPHY_CHECK: &str = r#"
import sys
import cryptography
from cryptography import x509

major = int(cryptography.__version__.split(".")[0])
if major < 42:
    sys.exit(f"cryptography {cryptography.__version__} is too old to be strict; run scripts/install-deps")
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        for cert in x509.load_pem_x509_certificates(f.read()):
            # Extensions are parsed here: BER in them raises.
            names = [e.oid.dotted_string for e in cert.extensions]
            basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
            print(f"{path} ca={basic.value.ca} critical={basic.critical} extensions={len(names)}")
"#;

/// The parser that found the problem (cryptography 48): CI runs it, with
/// the package from scripts/install-deps.
#[test]
fn python_cryptography_reads_every_kind() {
    let (env, files) = every_kind();
    let out = Command::new("python3")
        .arg("-c")
        .arg(CRYPTOGRAPHY_CHECK)
        .args(files.iter().map(|(file, _)| *file))
        .current_dir(env.dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("python3 must be installed (scripts/install-deps)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "cryptography refused a certificate:\n{stdout}\n{stderr}"
    );
    let mut lines = stdout.lines();
    for (file, cas) in files {
        for is_ca in cas {
            let ca = if *is_ca { "True" } else { "False" };
            let line = lines.next().unwrap_or_default();
            assert!(
                line.starts_with(&format!("{file} ca={ca} critical=True extensions=")),
                "{line}\n{stdout}"
            );
        }
    }
    assert_eq!(lines.next(), None, "{stdout}");
}
