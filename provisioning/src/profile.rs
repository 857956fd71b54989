//! Certificate profiles: which extensions each kind of certificate carries.
//!
//! ```text
//! root CA      CA, pathlen 1, keyCertSign+cRLSign
//!  ├ device CA CA, pathlen 0, keyCertSign+cRLSign, EKU clientAuth
//!  │  └ device / service   not CA, digitalSignature, EKU clientAuth only,
//!  │                       CN=<name>, SAN URI spiffe://<td>/<kind>/<name>
//!  └ server CA CA, pathlen 0, keyCertSign+cRLSign, EKU serverAuth
//!     └ gateway            not CA, digitalSignature, EKU serverAuth only,
//!                          SAN DNS names and IP addresses
//! ```
//!
//! The EKU on each intermediate confines everything below it to one
//! purpose, for verifiers that honour it; devices additionally trust only
//! the server CA.
//!
//! Every certificate is DER, as X.509 requires: strict parsers (Python's
//! `cryptography`, RustCrypto's `x509-cert`) refuse anything else.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, PublicKeyData, SanType,
};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};
use twofold_protocol::Identity;

use crate::error::{Error, Result};
use crate::serial::Serial;

/// Root CA lifetime.
pub const ROOT_DAYS: i64 = 20 * 365;
/// Device CA and server CA lifetime.
pub const INTERMEDIATE_DAYS: i64 = 10 * 365;
/// Default device and service certificate lifetime. Devices renew their
/// own through the CA service (the Linux agent and the microcontroller
/// agent both do), due at two thirds of it less a jitter: day 18.5 to 20.
/// That leaves a device 10 days offline after its due date before it
/// expires, and bounds an unrevoked stolen key to a month. Shorter is
/// possible (`--days`); 30 days is what a fleet with devices offline for
/// a week at a time can live with.
pub const DEVICE_DAYS: u32 = 30;
/// Default gateway certificate lifetime.
pub const GATEWAY_DAYS: u32 = 365;
/// Longest leaf lifetime accepted from `--days`.
pub const MAX_LEAF_DAYS: u32 = 3650;
/// Leaf certificates start this much before "now", for devices whose
/// clocks run a little behind the CA's.
pub const BACKDATE: Duration = Duration::minutes(5);

/// A validity window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// A leaf's window: from `now - BACKDATE` for `days`, cut at the
    /// issuer's own expiry so no certificate outlives its CA.
    pub fn leaf(now: OffsetDateTime, days: u32, issuer_not_after: OffsetDateTime) -> Result<Self> {
        if days == 0 || days > MAX_LEAF_DAYS {
            return Err(Error::InvalidDays {
                days,
                max: MAX_LEAF_DAYS,
            });
        }
        let now = now.replace_nanosecond(0).unwrap_or(now);
        if issuer_not_after <= now + Duration::days(1) {
            return Err(Error::CaExpiring {
                not_after: issuer_not_after,
            });
        }
        Ok(Validity {
            not_before: now - BACKDATE,
            not_after: (now + Duration::days(i64::from(days))).min(issuer_not_after),
        })
    }

    fn ca(now: OffsetDateTime, days: i64) -> Self {
        let now = now.replace_nanosecond(0).unwrap_or(now);
        Validity {
            not_before: now - BACKDATE,
            not_after: now + Duration::days(days),
        }
    }
}

fn base(cn: &str, serial: &Serial, validity: Validity) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.serial_number = Some(serial.into());
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.use_authority_key_identifier_extension = true;
    params
}

/// id-ce-basicConstraints (RFC 5280 4.2.1.9).
const BASIC_CONSTRAINTS: &[u64] = &[2, 5, 29, 19];
/// id-ce-subjectKeyIdentifier (RFC 5280 4.2.1.2).
const SUBJECT_KEY_IDENTIFIER: &[u64] = &[2, 5, 29, 14];

/// Marks a leaf as not a CA, and names its key.
///
/// basicConstraints is `SEQUENCE { cA BOOLEAN DEFAULT FALSE, ... }`, and
/// DER leaves a DEFAULT value out, so "not a CA" is the empty SEQUENCE
/// `30 00`. rcgen's `IsCa::ExplicitNoCa` writes `cA FALSE` out
/// (`30 03 01 01 00`), which is BER but not DER: strict parsers refuse the
/// whole certificate's extensions. `IsCa::NoCa` would omit the extension,
/// which RFC 5280 allows for a leaf; we keep it, critical as before, so
/// the certificates change only in encoding: every verifier (OpenSSL,
/// webpki, agent-nostd's, which reads the flag) sees the same explicit
/// "not a CA" it saw. rcgen writes the subject key identifier only along
/// with its own basicConstraints, so both extensions are written here,
/// the key identifier derived as rcgen derives it for CAs (the first 20
/// bytes of the SHA-256 of the SubjectPublicKeyInfo).
fn not_a_ca(p: &mut CertificateParams, public_key: &impl PublicKeyData) {
    p.is_ca = IsCa::NoCa;
    let spki = public_key.subject_public_key_info();
    let mut key_id = vec![0x04, 20];
    key_id.extend_from_slice(&Sha256::digest(&spki)[..20]);
    p.custom_extensions.push(CustomExtension::from_oid_content(
        SUBJECT_KEY_IDENTIFIER,
        key_id,
    ));
    let mut basic = CustomExtension::from_oid_content(BASIC_CONSTRAINTS, vec![0x30, 0x00]);
    basic.set_criticality(true);
    p.custom_extensions.push(basic);
}

/// A CA's common name. It carries the start of the CA's serial so that two
/// PKIs for one trust domain (a rotation, a second site) never share a CA
/// name: verifiers find a CRL's and a certificate's issuer by name, and a
/// gateway trusting both CAs would otherwise check one CA's CRL against the
/// other's key and refuse every device of the second.
fn ca_name(label: &str, trust_domain: &str, serial: &Serial) -> String {
    format!("Twofold {label} CA {trust_domain} {}", serial.short())
}

/// The self-signed root CA.
pub fn root_ca(trust_domain: &str, serial: &Serial, now: OffsetDateTime) -> CertificateParams {
    let mut p = base(
        &ca_name("root", trust_domain, serial),
        serial,
        Validity::ca(now, ROOT_DAYS),
    );
    p.use_authority_key_identifier_extension = false;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

/// Which intermediate CA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Intermediate {
    /// Issues device and service client certificates and the CRL.
    Device,
    /// Issues gateway server certificates.
    Server,
}

/// An intermediate CA, signed by the root.
pub fn intermediate_ca(
    which: Intermediate,
    trust_domain: &str,
    serial: &Serial,
    now: OffsetDateTime,
) -> CertificateParams {
    let (label, eku) = match which {
        Intermediate::Device => ("device", ExtendedKeyUsagePurpose::ClientAuth),
        Intermediate::Server => ("server", ExtendedKeyUsagePurpose::ServerAuth),
    };
    let mut p = base(
        &ca_name(label, trust_domain, serial),
        serial,
        Validity::ca(now, INTERMEDIATE_DAYS),
    );
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.extended_key_usages = vec![eku];
    p
}

/// A device or service client certificate for `public_key`: CN is the
/// name, the SAN URI is the identity, and it is good for TLS client
/// authentication only.
pub fn client(
    identity: &Identity,
    serial: &Serial,
    validity: Validity,
    public_key: &impl PublicKeyData,
) -> Result<CertificateParams> {
    let mut p = base(identity.principal.name(), serial, validity);
    not_a_ca(&mut p, public_key);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    Ok(p)
}

/// A gateway server certificate for `dns_names` and `ips`, for
/// `public_key`.
pub fn gateway(
    dns_names: &[String],
    ips: &[IpAddr],
    crl_url: Option<&str>,
    serial: &Serial,
    validity: Validity,
    public_key: &impl PublicKeyData,
) -> Result<CertificateParams> {
    let cn = dns_names
        .first()
        .cloned()
        .or_else(|| ips.first().map(IpAddr::to_string))
        .ok_or(Error::InvalidHostName {
            value: String::new(),
            reason: "give at least one name or --ip",
        })?;
    let mut p = base(&cn, serial, validity);
    not_a_ca(&mut p, public_key);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    for name in dns_names {
        check_dns_name(name)?;
        p.subject_alt_names
            .push(SanType::DnsName(name.as_str().try_into()?));
    }
    p.subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    if let Some(url) = crl_url {
        check_crl_url(url)?;
        p.crl_distribution_points = vec![rcgen::CrlDistributionPoint {
            uris: vec![url.to_owned()],
        }];
    }
    Ok(p)
}

/// Accepts an absolute `http://` URL with a host: where a CRL
/// distribution point may point (RFC 5280 4.2.1.13; HTTPS would need a
/// TLS connection checked against the very CRL being fetched).
pub fn check_crl_url(url: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(Error::InvalidCrlUrl {
            value: url.to_owned(),
            reason: reason.to_owned(),
        })
    };
    if url.len() > 1024 {
        return bad("longer than 1024 characters");
    }
    // The certificate stores it as an IA5String: ASCII only, and exactly
    // as given (a parser would drop a #fragment).
    if !url.bytes().all(|b| b.is_ascii_graphic()) {
        return bad("only printable ASCII without spaces; percent-encode anything else");
    }
    if url.contains('#') {
        return bad("a #fragment has no place in a CRL distribution point");
    }
    let uri = match url.parse::<http::Uri>() {
        Ok(uri) => uri,
        Err(e) => return bad(&format!("not a URL: {e}")),
    };
    if uri.scheme_str() != Some("http") {
        return bad("a CRL distribution point must be an http:// URL");
    }
    match uri.host() {
        Some(host) if !host.is_empty() => {}
        _ => return bad("the URL has no host"),
    }
    if uri.path() == "/" && uri.query().is_none() {
        return bad("the URL names no file, e.g. http://pki.example.com/server-crl.der");
    }
    Ok(())
}

/// Accepts an ordinary DNS host name: dot-separated labels of letters,
/// digits and '-', no wildcards.
pub fn check_dns_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidHostName {
            value: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 253 {
        return bad("a DNS name is 1-253 characters long");
    }
    if name.parse::<IpAddr>().is_ok() {
        return bad("this is an IP address; pass it with --ip");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return bad("each dot-separated label must be 1-63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return bad("only letters, digits, '-' and '.' are allowed (no wildcards)");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a label must not start or end with '-'");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_validity_is_backdated_and_capped_by_the_issuer() {
        let now = OffsetDateTime::UNIX_EPOCH + Duration::days(1000);
        let v = Validity::leaf(now, 90, now + Duration::days(30)).unwrap();
        assert_eq!(v.not_before, now - BACKDATE);
        assert_eq!(v.not_after, now + Duration::days(30));
        let v = Validity::leaf(now, 90, now + Duration::days(3000)).unwrap();
        assert_eq!(v.not_after, now + Duration::days(90));
        assert!(matches!(
            Validity::leaf(now, 0, now),
            Err(Error::InvalidDays { days: 0, .. })
        ));
        assert!(matches!(
            Validity::leaf(now, 3651, now),
            Err(Error::InvalidDays { .. })
        ));
    }

    #[test]
    fn dns_names_are_checked() {
        assert!(check_dns_name("gw-1.iot.example.com").is_ok());
        assert!(check_dns_name("localhost").is_ok());
        for bad in [
            "",
            "*.example.com",
            "a..b",
            "-a.b",
            "a_b",
            "127.0.0.1",
            &"a".repeat(64),
        ] {
            assert!(
                matches!(check_dns_name(bad), Err(Error::InvalidHostName { .. })),
                "{bad}"
            );
        }
    }
}
