//! Who is on the other end: the identity URI in the client certificate.

use sha2::{Digest, Sha256};
use twofold_protocol::{Principal, TrustDomain};
use twofold_trust::Serial;
use x509_parser::prelude::{FromDer, X509Certificate};

/// What the audit log records about a certificate.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CertInfo {
    pub subject: String,
    /// In the normal form of [`twofold_trust::Serial`], as `provisioning
    /// list` shows it and as [`crate::revocation`] looks it up.
    pub serial: String,
    /// SHA-256 of the DER, lowercase hex.
    pub fingerprint: String,
    /// Unix seconds.
    #[serde(skip)]
    pub not_before: i64,
    /// Unix seconds.
    #[serde(skip)]
    pub not_after: i64,
    /// The issuer's name, DER: with the serial, what a CRL lists.
    #[serde(skip)]
    pub issuer: Vec<u8>,
}

impl CertInfo {
    /// Reads what it can from a DER certificate; `None` if it does not parse.
    pub fn from_der(der: &[u8]) -> Option<CertInfo> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        Some(CertInfo {
            subject: cert.subject().to_string(),
            serial: Serial::from_der_bytes(cert.raw_serial()).to_string(),
            fingerprint: hex::encode(Sha256::digest(der)),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            issuer: cert.issuer().as_raw().to_vec(),
        })
    }
}

/// Why a verified certificate still carries no usable identity.
pub use twofold_trust::IdentityUriError as IdentityError;

/// The principal named by the certificate's single SAN URI in
/// `trust_domain`, under the rule of [`twofold_trust::identity`]: a
/// certificate with any URI beside its identity is refused, as the agent
/// refuses it.
pub fn principal(der: &[u8], trust_domain: &TrustDomain) -> Result<Principal, IdentityError> {
    twofold_trust::principal_in(der, trust_domain)
}

/// Is `client_id` the one this principal must use? A device uses its id; a
/// service its name, or its name, `-` and an instance suffix.
pub fn client_id_matches(principal: &Principal, client_id: &str) -> bool {
    match principal {
        Principal::Device(id) => client_id == id.as_str(),
        Principal::Service(name) => {
            client_id == name.as_str()
                || client_id
                    .strip_prefix(name.as_str())
                    .and_then(|rest| rest.strip_prefix('-'))
                    .is_some_and(|suffix| {
                        !suffix.is_empty()
                            && suffix.len() <= 32
                            && suffix
                                .bytes()
                                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    })
        }
    }
}

/// The client id used at the broker: `<kind>:<name>` for a device or a
/// service's own session, `service:<name>:<instance>` for a service
/// instance. Names and instances never contain `:`, so the mapping is
/// injective over (kind, name, instance): service `dashboard` with client
/// id `dashboard-eu` (instance `eu`) is `service:dashboard:eu`, never the
/// session `service:dashboard-eu` of service `dashboard-eu`; and no
/// service instance can take over a device's session.
pub fn broker_client_id(principal: &Principal, client_id: &str) -> String {
    match principal {
        Principal::Device(_) => format!("{}:{client_id}", principal.kind()),
        Principal::Service(name) => match client_id
            .strip_prefix(name.as_str())
            .and_then(|rest| rest.strip_prefix('-'))
        {
            Some(instance) => format!("{}:{}:{instance}", principal.kind(), name.as_str()),
            None => format!("{}:{}", principal.kind(), name.as_str()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twofold_protocol::{DeviceId, ServiceName};

    #[test]
    fn a_certificate_with_an_extra_uri_names_no_principal() {
        // The gateway used to skip non-SPIFFE URIs that the agent refused.
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = [
            "spiffe://example.org/device/sensor-1",
            "https://example.org/x",
        ]
        .into_iter()
        .map(|u| rcgen::SanType::URI(u.try_into().unwrap()))
        .collect();
        let key = rcgen::KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let td = TrustDomain::parse("example.org").unwrap();
        assert_eq!(
            principal(&der, &td),
            Err(IdentityError::Ambiguous { count: 2 })
        );
    }

    #[test]
    fn client_ids_bind_to_the_identity() {
        let dev = Principal::Device(DeviceId::parse("sensor-1").unwrap());
        assert!(client_id_matches(&dev, "sensor-1"));
        for other in ["sensor-2", "sensor-1-x", "", "SENSOR-1"] {
            assert!(!client_id_matches(&dev, other), "{other}");
        }
        let svc = Principal::Service(ServiceName::parse("billing").unwrap());
        for ok in ["billing", "billing-1", "billing-eu-west-2"] {
            assert!(client_id_matches(&svc, ok), "{ok}");
        }
        for bad in ["billing-", "billingx", "billing-A", "billing-1/x", "other"] {
            assert!(!client_id_matches(&svc, bad), "{bad}");
        }
        assert_ne!(
            broker_client_id(&svc, "billing-1"),
            broker_client_id(
                &Principal::Device(DeviceId::parse("billing-1").unwrap()),
                "billing-1"
            )
        );
    }

    #[test]
    fn broker_ids_never_collide_across_services_and_instances() {
        let svc = |n: &str| Principal::Service(ServiceName::parse(n).unwrap());
        let dev = |n: &str| Principal::Device(DeviceId::parse(n).unwrap());
        // (principal, client id) pairs that were one broker session before.
        let pairs = [
            (svc("dashboard"), "dashboard-eu"),
            (svc("dashboard-eu"), "dashboard-eu"),
            (svc("dashboard"), "dashboard-eu-1"),
            (svc("dashboard-eu"), "dashboard-eu-1"),
            (svc("dashboard-eu-1"), "dashboard-eu-1"),
            (dev("dashboard-eu"), "dashboard-eu"),
        ];
        let ids: std::collections::HashSet<String> = pairs
            .iter()
            .map(|(p, c)| {
                assert!(client_id_matches(p, c), "{p:?} {c}");
                broker_client_id(p, c)
            })
            .collect();
        assert_eq!(ids.len(), pairs.len(), "{ids:?}");
        assert_eq!(
            broker_client_id(&svc("dashboard"), "dashboard-eu"),
            "service:dashboard:eu"
        );
        assert_eq!(
            broker_client_id(&svc("dashboard-eu"), "dashboard-eu"),
            "service:dashboard-eu"
        );
        assert_eq!(
            broker_client_id(&dev("sensor-1"), "sensor-1"),
            "device:sensor-1"
        );
    }
}
