//! Validated names: device ids, service names and trust domains.
//!
//! Each type can only be built by its `parse`, so a value that exists is
//! valid and nobody downstream checks it again. They are stored inline
//! (no allocator) and are `Copy`.

use core::fmt;

use serde::de::{self, Deserialize, Deserializer, Visitor};
use serde::{Serialize, Serializer};

/// Why a name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    /// The name is empty.
    Empty,
    /// The name is longer than `max` bytes.
    TooLong {
        /// The length given.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The name starts with `-`.
    LeadingHyphen,
    /// The character at byte offset `at` is not allowed.
    InvalidChar {
        /// The refused character.
        ch: char,
        /// Its byte offset.
        at: usize,
    },
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            NameError::Empty => f.write_str("is empty"),
            NameError::TooLong { len, max } => {
                write!(f, "is {len} characters long; the limit is {max}")
            }
            NameError::LeadingHyphen => f.write_str("starts with '-'"),
            NameError::InvalidChar { ch, at } => {
                let why = match ch {
                    '+' | '#' => " (an MQTT wildcard)",
                    '/' => " (the MQTT topic separator)",
                    '$' => " (reserved by MQTT brokers)",
                    c if c.is_ascii_uppercase() => " (only lowercase is allowed)",
                    _ => "",
                };
                write!(f, "has {ch:?} at position {at}{why}")
            }
        }
    }
}

impl core::error::Error for NameError {}

/// An inline ASCII string of at most `N` bytes. Only the parsers in this
/// module build one, after checking every byte.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Inline<const N: usize> {
    len: u8,
    bytes: [u8; N],
}

impl<const N: usize> Inline<N> {
    /// Checks `s` against the length limit and `allowed`, and copies it.
    fn parse(s: &str, allowed: fn(u8) -> bool) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if let Some((at, ch)) = s
            .char_indices()
            .find(|&(_, c)| !c.is_ascii() || !allowed(c as u8))
        {
            return Err(NameError::InvalidChar { ch, at });
        }
        if s.len() > N {
            return Err(NameError::TooLong {
                len: s.len(),
                max: N,
            });
        }
        let mut bytes = [0u8; N];
        bytes[..s.len()].copy_from_slice(s.as_bytes());
        // N is at most 255 for every instance in this module.
        Ok(Inline {
            len: s.len() as u8,
            bytes,
        })
    }

    fn as_str(&self) -> &str {
        // Every byte was checked to be ASCII in `parse`, so this cannot fail.
        core::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

fn is_label_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'
}

fn is_trust_domain_byte(b: u8) -> bool {
    // The SPIFFE trust domain alphabet.
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
}

fn parse_label(s: &str) -> Result<Inline<64>, NameError> {
    let label = Inline::parse(s, is_label_byte)?;
    if s.starts_with('-') {
        return Err(NameError::LeadingHyphen);
    }
    Ok(label)
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $cap:literal, $parse:expr, $expecting:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Inline<$cap>);

        impl $name {
            /// The longest accepted value, in bytes.
            pub const MAX_LEN: usize = $cap;

            /// Validates `s`; the only way to obtain a value of this type.
            pub fn parse(s: &str) -> Result<Self, NameError> {
                $parse(s).map($name)
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.as_str())
            }
        }

        impl core::str::FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::parse(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$name, E> {
                        $name::parse(v).map_err(|e| E::custom(e))
                    }
                }
                deserializer.deserialize_str(V)
            }
        }
    };
}

name_type!(
    /// A device id: 1–64 characters of `[a-z0-9-]`, not starting with `-`.
    ///
    /// It appears as the certificate CN, in the identity URI, as the MQTT
    /// client id and as a topic level, so anything that could be read as
    /// MQTT syntax (`/`, `+`, `#`, `$`) is refused.
    DeviceId,
    64,
    parse_label,
    "a device id"
);

name_type!(
    /// A backend service name, with the same rules as a [`DeviceId`].
    ServiceName,
    64,
    parse_label,
    "a service name"
);

name_type!(
    /// A group of devices and services named in the topic policy (e.g.
    /// `pumps`), with the same rules as a [`DeviceId`]: it may appear as
    /// a topic level.
    GroupName,
    64,
    parse_label,
    "a group name"
);

name_type!(
    /// A SPIFFE trust domain: 1–255 characters of `[a-z0-9._-]`.
    TrustDomain,
    255,
    |s| Inline::parse(s, is_trust_domain_byte),
    "a trust domain"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in ["a", "sensor-17", "0", "a-", &"x".repeat(64)] {
            assert_eq!(DeviceId::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_with_the_specific_reason() {
        assert_eq!(DeviceId::parse(""), Err(NameError::Empty));
        assert_eq!(DeviceId::parse("-a"), Err(NameError::LeadingHyphen));
        assert_eq!(
            DeviceId::parse(&"x".repeat(65)),
            Err(NameError::TooLong { len: 65, max: 64 })
        );
        assert_eq!(
            DeviceId::parse("a/b"),
            Err(NameError::InvalidChar { ch: '/', at: 1 })
        );
        assert_eq!(
            DeviceId::parse("#"),
            Err(NameError::InvalidChar { ch: '#', at: 0 })
        );
        assert_eq!(
            DeviceId::parse("Sensor"),
            Err(NameError::InvalidChar { ch: 'S', at: 0 })
        );
        assert_eq!(
            DeviceId::parse("é"),
            Err(NameError::InvalidChar { ch: 'é', at: 0 })
        );
    }

    #[test]
    fn error_messages_explain_mqtt_characters() {
        let msg = format!("{}", DeviceId::parse("a+").unwrap_err());
        assert_eq!(msg, "has '+' at position 1 (an MQTT wildcard)");
    }

    #[test]
    fn trust_domain_allows_dots_and_underscores() {
        assert!(TrustDomain::parse("iot.example_corp-1").is_ok());
        assert_eq!(
            TrustDomain::parse("Example.com"),
            Err(NameError::InvalidChar { ch: 'E', at: 0 })
        );
        assert!(TrustDomain::parse(&"a".repeat(255)).is_ok());
        assert!(TrustDomain::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn serde_revalidates_on_decode() {
        let mut buf = [0u8; 80];
        let bad = postcard::to_slice("a/b", &mut buf).unwrap();
        assert!(postcard::from_bytes::<DeviceId>(bad).is_err());
        let mut buf = [0u8; 80];
        let good = postcard::to_slice(&DeviceId::parse("ok-1").unwrap(), &mut buf).unwrap();
        assert_eq!(
            postcard::from_bytes::<DeviceId>(good).unwrap().as_str(),
            "ok-1"
        );
    }
}
