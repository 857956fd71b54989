//! Bytes from a device after its TLS handshake, through the gateway's
//! session checks (`session::screen`): the CONNECT decision, then the
//! policy on every frame. Beyond not panicking, nothing the policy denies
//! may be forwarded to the broker.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use twofold_gateway::policy;
use twofold_gateway::session::{Version, screen};
use twofold_protocol::{DeviceId, Principal, ServiceName};

fuzz_target!(|data: &[u8]| {
    let Some((&who, input)) = data.split_first() else {
        return;
    };
    // The first byte picks who authenticated: a device or a service.
    let principal = if who & 1 == 0 {
        Principal::Device(DeviceId::parse("sensor-1").unwrap())
    } else {
        Principal::Service(ServiceName::parse("ingest").unwrap())
    };
    let max = 256 + usize::from(who >> 1) * 64;
    let out = screen(&principal, input, max);
    // `screen` decides with the built-in policy, as a gateway without a
    // policy file does.
    let builtin = policy::InForce::default();
    let Some(version) = out.version else {
        assert!(out.forwarded.is_empty());
        return;
    };
    for frame in out.forwarded {
        let mut frame = bytes::BytesMut::from(&frame[..]);
        match frame[0] >> 4 {
            1 | 15 => panic!("a CONNECT or AUTH was forwarded"),
            3 => {
                let topic = match version {
                    Version::V311 => match v4::Packet::read(&mut frame, max) {
                        Ok(v4::Packet::Publish(p)) => p.topic,
                        other => panic!("forwarded a PUBLISH that does not decode: {other:?}"),
                    },
                    Version::V5 => match v5::Packet::read(&mut frame, Some(max as u32)) {
                        Ok(v5::Packet::Publish(p)) => String::from_utf8(p.topic.to_vec()).unwrap(),
                        other => panic!("forwarded a PUBLISH that does not decode: {other:?}"),
                    },
                };
                assert!(builtin.may_publish(&principal, &topic).is_ok(), "{topic:?}");
            }
            8 => {
                let filters: Vec<String> = match version {
                    Version::V311 => match v4::Packet::read(&mut frame, max) {
                        Ok(v4::Packet::Subscribe(s)) => {
                            s.filters.into_iter().map(|f| f.path).collect()
                        }
                        other => panic!("forwarded a SUBSCRIBE that does not decode: {other:?}"),
                    },
                    Version::V5 => match v5::Packet::read(&mut frame, Some(max as u32)) {
                        Ok(v5::Packet::Subscribe(s)) => {
                            s.filters.into_iter().map(|f| f.path).collect()
                        }
                        other => panic!("forwarded a SUBSCRIBE that does not decode: {other:?}"),
                    },
                };
                for f in filters {
                    assert!(builtin.may_subscribe(&principal, &f).is_ok(), "{f:?}");
                }
            }
            _ => {}
        }
    }
});
