//! The built-in policy: what an empty policy file means, and the default.
//! Pure functions of the identity and the topic.
//!
//! Templated on the identity:
//! - a device publishes and subscribes only under `devices/<its id>/`;
//! - a service subscribes to `devices/<id or +>/…` (also shared with its
//!   other instances: `$share/<group>/devices/…`) and publishes only to
//!   `devices/<id>/commands`.
//!
//! Everything else, `#`, `$SYS/…` and other devices' subtrees included, is
//! denied.

use twofold_protocol::{Channel, DeviceId, Principal, topic::DEVICES};

use super::Denial;

/// Checks MQTT filter syntax: `#` only as the whole last level, `+` only as
/// a whole level, no NUL, not empty.
pub(crate) fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains('#') && !l.contains('+'),
    })
}

pub(crate) fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['#', '+', '\0'])
}

/// `devices/<id>/<rest>` split into the id level and a non-empty rest.
fn device_levels(s: &str) -> Option<(&str, &str)> {
    let rest = s.strip_prefix(DEVICES)?.strip_prefix('/')?;
    let (id, tail) = rest.split_once('/')?;
    (!tail.is_empty()).then_some((id, tail))
}

/// May `who` publish to `topic`?
pub fn may_publish(who: &Principal, topic: &str) -> Result<(), Denial> {
    if !valid_topic(topic) {
        return Err(Denial::Malformed);
    }
    let (id, tail) = device_levels(topic).ok_or(Denial::OutsideOwnSubtree)?;
    match who {
        Principal::Device(me) if id == me.as_str() => Ok(()),
        Principal::Device(_) => Err(Denial::OutsideOwnSubtree),
        Principal::Service(_) => {
            if DeviceId::parse(id).is_ok() && tail == Channel::Commands.as_str() {
                Ok(())
            } else {
                Err(Denial::ServicePublishesCommandsOnly)
            }
        }
    }
}

/// A shared subscription, `$share/<group>/<filter>`, split into its
/// group and filter; `None` for any other filter. The group is one
/// non-empty level without wildcards.
pub fn shared(filter: &str) -> Option<Result<(&str, &str), Denial>> {
    let rest = filter.strip_prefix("$share/")?;
    Some(match rest.split_once('/') {
        Some((group, filter))
            if !group.is_empty() && !group.contains(['+', '#', '\0']) && !filter.is_empty() =>
        {
            Ok((group, filter))
        }
        _ => Err(Denial::Malformed),
    })
}

/// May `who` subscribe to `filter`? A service may also share a filter it
/// may read with its other instances: `$share/<group>/<filter>`.
pub fn may_subscribe(who: &Principal, filter: &str) -> Result<(), Denial> {
    if let Some(split) = shared(filter) {
        let (_, filter) = split?;
        return match who {
            Principal::Service(_) => may_subscribe_plain(who, filter),
            Principal::Device(_) => Err(Denial::SharedForServicesOnly),
        };
    }
    may_subscribe_plain(who, filter)
}

/// The rule for a filter that is not shared.
pub(crate) fn may_subscribe_plain(who: &Principal, filter: &str) -> Result<(), Denial> {
    if !valid_filter(filter) {
        return Err(Denial::Malformed);
    }
    let (id, _) = device_levels(filter).ok_or(Denial::OutsideOwnSubtree)?;
    match who {
        Principal::Device(me) if id == me.as_str() => Ok(()),
        Principal::Device(_) => Err(Denial::OutsideOwnSubtree),
        Principal::Service(_) if id == "+" || DeviceId::parse(id).is_ok() => Ok(()),
        Principal::Service(_) => Err(Denial::OutsideOwnSubtree),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twofold_protocol::ServiceName;

    #[test]
    fn services_may_share_what_they_may_read_and_devices_may_not_share() {
        let ingest = service("ingest");
        for ok in [
            "$share/workers/devices/+/telemetry",
            "$share/w-1/devices/sensor-1/#",
        ] {
            assert_eq!(may_subscribe(&ingest, ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("$share/workers/#", Denial::OutsideOwnSubtree),
            ("$share/workers/$SYS/#", Denial::OutsideOwnSubtree),
            (
                "$share/workers/$share/x/devices/+/telemetry",
                Denial::OutsideOwnSubtree,
            ),
            ("$share//devices/+/telemetry", Denial::Malformed),
            ("$share/+/devices/+/telemetry", Denial::Malformed),
            ("$share/#/devices/+/telemetry", Denial::Malformed),
            ("$share/workers", Denial::Malformed),
            ("$share/workers/", Denial::Malformed),
        ] {
            assert_eq!(may_subscribe(&ingest, bad), Err(why), "{bad}");
        }
        assert_eq!(
            may_subscribe(&device("sensor-1"), "$share/g/devices/sensor-1/commands"),
            Err(Denial::SharedForServicesOnly)
        );
    }

    fn device(id: &str) -> Principal {
        Principal::Device(DeviceId::parse(id).unwrap())
    }

    fn service(name: &str) -> Principal {
        Principal::Service(ServiceName::parse(name).unwrap())
    }

    #[test]
    fn a_device_uses_its_own_subtree() {
        let me = device("sensor-1");
        for topic in [
            "devices/sensor-1/telemetry",
            "devices/sensor-1/replies",
            "devices/sensor-1/app/x",
        ] {
            assert_eq!(may_publish(&me, topic), Ok(()), "{topic}");
        }
        for filter in [
            "devices/sensor-1/commands",
            "devices/sensor-1/#",
            "devices/sensor-1/+",
        ] {
            assert_eq!(may_subscribe(&me, filter), Ok(()), "{filter}");
        }
    }

    #[test]
    fn a_device_is_refused_everything_else() {
        let me = device("sensor-1");
        for topic in [
            "devices/sensor-2/telemetry",
            "devices/sensor-1",
            "devices/sensor-1/",
            "$SYS/x",
            "other",
            "devices/sensor-10/telemetry",
        ] {
            assert_eq!(
                may_publish(&me, topic),
                Err(Denial::OutsideOwnSubtree),
                "{topic}"
            );
        }
        assert_eq!(
            may_publish(&me, "devices/sensor-1/#"),
            Err(Denial::Malformed)
        );
        assert_eq!(
            may_publish(&me, "devices/sensor-1/a\0"),
            Err(Denial::Malformed)
        );
        for filter in [
            "#",
            "+/#",
            "devices/#",
            "devices/+/telemetry",
            "$SYS/#",
            "devices/sensor-2/#",
            "devices/+/+",
        ] {
            assert_eq!(
                may_subscribe(&me, filter),
                Err(Denial::OutsideOwnSubtree),
                "{filter}"
            );
        }
        for filter in [
            "devices/sensor-1/#/x",
            "devices/sensor-1/a#",
            "devices/sensor-1/a+",
            "",
        ] {
            assert_eq!(
                may_subscribe(&me, filter),
                Err(Denial::Malformed),
                "{filter}"
            );
        }
    }

    #[test]
    fn a_service_reads_all_devices_and_writes_commands() {
        let svc = service("billing");
        for filter in [
            "devices/+/telemetry",
            "devices/+/#",
            "devices/sensor-1/replies",
        ] {
            assert_eq!(may_subscribe(&svc, filter), Ok(()), "{filter}");
        }
        for filter in ["#", "devices/#", "$SYS/#", "devices/Bad/telemetry"] {
            assert_eq!(
                may_subscribe(&svc, filter),
                Err(Denial::OutsideOwnSubtree),
                "{filter}"
            );
        }
        assert_eq!(may_publish(&svc, "devices/sensor-1/commands"), Ok(()));
        for topic in [
            "devices/sensor-1/telemetry",
            "devices/sensor-1/commands/x",
            "devices/BAD/commands",
        ] {
            assert_eq!(
                may_publish(&svc, topic),
                Err(Denial::ServicePublishesCommandsOnly),
                "{topic}"
            );
        }
        assert_eq!(may_publish(&svc, "$SYS/x"), Err(Denial::OutsideOwnSubtree));
    }
}
