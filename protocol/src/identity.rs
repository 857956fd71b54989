//! The identity URI carried in every Twofold client certificate.
//!
//! `spiffe://<trust-domain>/device/<device-id>` for a device and
//! `spiffe://<trust-domain>/service/<name>` for a backend service. The
//! gateway reads this SAN URI, never the CN.

use core::fmt;

use crate::name::{DeviceId, NameError, ServiceName, TrustDomain};

const SCHEME: &str = "spiffe://";

/// Who a certificate speaks for, inside one trust domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Principal {
    /// A device in the field.
    Device(DeviceId),
    /// A backend service that reads telemetry and sends commands.
    Service(ServiceName),
}

impl Principal {
    /// The path segment naming the kind: `device` or `service`.
    pub fn kind(&self) -> &'static str {
        match self {
            Principal::Device(_) => "device",
            Principal::Service(_) => "service",
        }
    }

    /// The device id or service name.
    pub fn name(&self) -> &str {
        match self {
            Principal::Device(id) => id.as_str(),
            Principal::Service(name) => name.as_str(),
        }
    }
}

/// A parsed identity URI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The trust domain chosen at `provisioning init`.
    pub trust_domain: TrustDomain,
    /// The device or service inside it.
    pub principal: Principal,
}

/// Why an identity URI was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityError {
    /// It does not start with `spiffe://`.
    NotSpiffe,
    /// The trust domain is not valid.
    TrustDomain(NameError),
    /// There is no `/device/` or `/service/` after the trust domain.
    UnknownKind,
    /// The device id is not valid.
    DeviceId(NameError),
    /// The service name is not valid.
    ServiceName(NameError),
}

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityError::NotSpiffe => f.write_str("identity URI does not start with spiffe://"),
            IdentityError::TrustDomain(e) => write!(f, "trust domain in identity URI {e}"),
            IdentityError::UnknownKind => {
                f.write_str("identity URI path is neither /device/<id> nor /service/<name>")
            }
            IdentityError::DeviceId(e) => write!(f, "device id in identity URI {e}"),
            IdentityError::ServiceName(e) => write!(f, "service name in identity URI {e}"),
        }
    }
}

impl core::error::Error for IdentityError {}

impl Identity {
    /// The identity of a device.
    pub fn device(trust_domain: TrustDomain, id: DeviceId) -> Self {
        Identity {
            trust_domain,
            principal: Principal::Device(id),
        }
    }

    /// The identity of a backend service.
    pub fn service(trust_domain: TrustDomain, name: ServiceName) -> Self {
        Identity {
            trust_domain,
            principal: Principal::Service(name),
        }
    }

    /// Parses `spiffe://<td>/device/<id>` or `spiffe://<td>/service/<name>`.
    ///
    /// Anything else (query, fragment, port, userinfo, extra segments) is
    /// refused: those characters are outside the name alphabets.
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let rest = uri.strip_prefix(SCHEME).ok_or(IdentityError::NotSpiffe)?;
        let (td, path) = rest.split_once('/').ok_or(IdentityError::UnknownKind)?;
        let trust_domain = TrustDomain::parse(td).map_err(IdentityError::TrustDomain)?;
        let principal = if let Some(id) = path.strip_prefix("device/") {
            Principal::Device(DeviceId::parse(id).map_err(IdentityError::DeviceId)?)
        } else if let Some(name) = path.strip_prefix("service/") {
            Principal::Service(ServiceName::parse(name).map_err(IdentityError::ServiceName)?)
        } else {
            return Err(IdentityError::UnknownKind);
        };
        Ok(Identity {
            trust_domain,
            principal,
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/{}/{}",
            self.trust_domain,
            self.principal.kind(),
            self.principal.name()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_services() {
        let id = Identity::parse("spiffe://iot.example/device/sensor-17").unwrap();
        assert_eq!(id.trust_domain.as_str(), "iot.example");
        assert_eq!(
            id.principal,
            Principal::Device(DeviceId::parse("sensor-17").unwrap())
        );
        let svc = Identity::parse("spiffe://iot.example/service/billing").unwrap();
        assert_eq!(svc.principal.kind(), "service");
        assert_eq!(svc.principal.name(), "billing");
    }

    #[test]
    fn refuses_each_malformed_part() {
        use IdentityError::*;
        let cases: &[(&str, IdentityError)] = &[
            ("https://iot.example/device/a", NotSpiffe),
            ("spiffe://iot.example", UnknownKind),
            ("spiffe://iot.example/user/a", UnknownKind),
            ("spiffe:///device/a", TrustDomain(NameError::Empty)),
            (
                "spiffe://IOT/device/a",
                TrustDomain(NameError::InvalidChar { ch: 'I', at: 0 }),
            ),
            (
                "spiffe://iot:8443/device/a",
                TrustDomain(NameError::InvalidChar { ch: ':', at: 3 }),
            ),
            ("spiffe://iot/device/", DeviceId(NameError::Empty)),
            (
                "spiffe://iot/device/a/b",
                DeviceId(NameError::InvalidChar { ch: '/', at: 1 }),
            ),
            (
                "spiffe://iot/device/a?x",
                DeviceId(NameError::InvalidChar { ch: '?', at: 1 }),
            ),
            (
                "spiffe://iot/service/-x",
                ServiceName(NameError::LeadingHyphen),
            ),
        ];
        for (uri, want) in cases {
            assert_eq!(Identity::parse(uri), Err(*want), "{uri}");
        }
    }
}
