//! The MQTT topic layout: `devices/<device-id>/<channel>`.
//!
//! Every device owns the subtree `devices/<its id>/`. The four channels
//! below are the ones Twofold itself uses.

use core::fmt;

use crate::name::{DeviceId, NameError};

/// The first topic level of every device topic.
pub const DEVICES: &str = "devices";

/// Topics the gateway itself answers, never forwarded to a broker: the
/// certificate lifecycle's. They name no device: the identity is the TLS
/// session's.
pub const CERT_PREFIX: &str = "$twofold/v1/cert/";

/// Where the gateway sends a device its [`crate::message::CertStatus`]
/// when the device subscribes to it.
pub const CERT_STATUS: &str = "$twofold/v1/cert/status";

/// Device → gateway: a [`crate::message::RenewRequest`]. Handled by the
/// gateway, never forwarded to the broker; the answer comes on
/// [`CERT_ANSWER`].
pub const CERT_RENEW: &str = "$twofold/v1/cert/renew";

/// Device → gateway, empty: "I am connected with my renewed certificate
/// and have stored it", so the one it replaces can be superseded.
pub const CERT_COMMIT: &str = "$twofold/v1/cert/commit";

/// Gateway → device: a [`crate::message::CertAnswer`] to each renew or
/// commit, sent whether or not the device subscribed to it.
pub const CERT_ANSWER: &str = "$twofold/v1/cert/answer";

/// Operator → every gateway, retained: the device CA's CRL as PEM, pushed
/// on the broker by `provisioning revoke --push`. Gateways take it only if
/// a client CA signed it and it is newer than theirs.
pub const CRL: &str = "twofold/v1/crl";

/// What a device topic carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Device → cloud: [`crate::message::Telemetry`].
    Telemetry,
    /// Cloud → device: [`crate::message::Command`].
    Commands,
    /// Device → cloud: [`crate::message::Reply`] to a command.
    Replies,
    /// Device → cloud: retained online/offline state.
    State,
}

impl Channel {
    /// Every channel, in a fixed order.
    pub const ALL: [Channel; 4] = [
        Channel::Telemetry,
        Channel::Commands,
        Channel::Replies,
        Channel::State,
    ];

    /// The last topic level.
    pub fn as_str(&self) -> &'static str {
        match self {
            Channel::Telemetry => "telemetry",
            Channel::Commands => "commands",
            Channel::Replies => "replies",
            Channel::State => "state",
        }
    }

    fn parse(s: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// A concrete (wildcard-free) device topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Topic {
    /// The device that owns the topic.
    pub device: DeviceId,
    /// What the topic carries.
    pub channel: Channel,
}

/// Why a topic is not a Twofold device topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicError {
    /// It does not start with `devices/`.
    NotADeviceTopic,
    /// The device level is not a valid device id.
    DeviceId(NameError),
    /// The last level is not one of the known channels, or there are more levels.
    UnknownChannel,
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicError::NotADeviceTopic => write!(f, "topic does not start with {DEVICES}/"),
            TopicError::DeviceId(e) => write!(f, "device id level of the topic {e}"),
            TopicError::UnknownChannel => {
                f.write_str("topic does not end in telemetry, commands, replies or state")
            }
        }
    }
}

impl core::error::Error for TopicError {}

impl Topic {
    /// The longest topic this layout produces: `devices/` + 64 + `/telemetry`.
    pub const MAX_LEN: usize = DEVICES.len() + 1 + DeviceId::MAX_LEN + 1 + "telemetry".len();

    /// A device's topic on `channel`.
    pub fn new(device: DeviceId, channel: Channel) -> Self {
        Topic { device, channel }
    }

    /// Parses `devices/<id>/<channel>`.
    pub fn parse(topic: &str) -> Result<Self, TopicError> {
        let rest = topic
            .strip_prefix(DEVICES)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or(TopicError::NotADeviceTopic)?;
        let (id, channel) = rest.split_once('/').ok_or(TopicError::UnknownChannel)?;
        let device = DeviceId::parse(id).map_err(TopicError::DeviceId)?;
        let channel = Channel::parse(channel).ok_or(TopicError::UnknownChannel)?;
        Ok(Topic { device, channel })
    }

    /// The topic as a fixed-capacity string, for code without an allocator.
    pub fn to_heapless(&self) -> heapless::String<{ Topic::MAX_LEN }> {
        let mut s = heapless::String::new();
        // Capacity is MAX_LEN, the longest possible topic, so this cannot fail.
        let _ = fmt::write(&mut s, format_args!("{self}"));
        s
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{DEVICES}/{}/{}", self.device, self.channel.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_each_channel() {
        let id = DeviceId::parse("sensor-17").unwrap();
        for channel in Channel::ALL {
            let t = Topic::new(id, channel);
            let s = t.to_heapless();
            assert_eq!(s.as_str(), &alloc_free_concat(channel));
            assert_eq!(Topic::parse(&s), Ok(t));
        }
    }

    fn alloc_free_concat(channel: Channel) -> heapless::String<64> {
        let mut s = heapless::String::new();
        s.push_str("devices/sensor-17/").unwrap();
        s.push_str(channel.as_str()).unwrap();
        s
    }

    #[test]
    fn longest_topic_fits() {
        let id = DeviceId::parse(&"z".repeat(64)).unwrap();
        assert_eq!(
            Topic::new(id, Channel::Telemetry).to_heapless().len(),
            Topic::MAX_LEN
        );
    }

    #[test]
    fn refuses_other_layouts() {
        assert_eq!(
            Topic::parse("dev/a/telemetry"),
            Err(TopicError::NotADeviceTopic)
        );
        assert_eq!(
            Topic::parse("devicesa/telemetry"),
            Err(TopicError::NotADeviceTopic)
        );
        assert_eq!(Topic::parse("devices/a"), Err(TopicError::UnknownChannel));
        assert_eq!(
            Topic::parse("devices/a/telemetry/x"),
            Err(TopicError::UnknownChannel)
        );
        assert_eq!(
            Topic::parse("devices/+/telemetry"),
            Err(TopicError::DeviceId(NameError::InvalidChar {
                ch: '+',
                at: 0
            }))
        );
        assert_eq!(Topic::parse("devices/#"), Err(TopicError::UnknownChannel));
    }
}
