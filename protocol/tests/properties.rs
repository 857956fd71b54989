//! Property tests: parse/format round trips, and rejection of everything
//! outside the documented alphabets, for arbitrary input.

use proptest::prelude::*;
use twofold_protocol::{
    Bundle, Channel, DeviceId, Identity, NameError, Principal, ServiceName, Topic, TrustDomain,
    message,
};

fn device_id() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9-]{0,63}"
}

fn trust_domain() -> impl Strategy<Value = String> {
    "[a-z0-9._-]{1,80}"
}

proptest! {
    #[test]
    fn device_id_round_trips(s in device_id()) {
        let id = DeviceId::parse(&s).unwrap();
        prop_assert_eq!(id.as_str(), s.as_str());
        prop_assert_eq!(id.to_string().parse::<DeviceId>().unwrap(), id);
    }

    #[test]
    fn any_forbidden_char_is_refused(prefix in "[a-z0-9]{0,20}", bad in "[^a-z0-9-]", suffix in "[a-z0-9-]{0,20}") {
        let s = format!("{prefix}{bad}{suffix}");
        let ch = bad.chars().next().unwrap();
        prop_assert_eq!(DeviceId::parse(&s), Err(NameError::InvalidChar { ch, at: prefix.len() }));
        prop_assert!(ServiceName::parse(&s).is_err());
    }

    #[test]
    fn mqtt_syntax_is_refused_anywhere(s in device_id(), pos in 0usize..64, c in prop::sample::select(vec!['/', '+', '#', '$', '\0', ' '])) {
        let mut v: Vec<char> = s.chars().collect();
        let at = pos.min(v.len());
        v.insert(at, c);
        let s: String = v.into_iter().collect();
        prop_assert!(DeviceId::parse(&s).is_err());
    }

    #[test]
    fn over_long_ids_are_refused(s in "[a-z0-9]{65,200}") {
        prop_assert_eq!(DeviceId::parse(&s), Err(NameError::TooLong { len: s.len(), max: 64 }));
    }

    #[test]
    fn identity_uri_round_trips(td in trust_domain(), id in device_id(), service in any::<bool>()) {
        let td = TrustDomain::parse(&td).unwrap();
        let identity = if service {
            Identity::service(td, ServiceName::parse(&id).unwrap())
        } else {
            Identity::device(td, DeviceId::parse(&id).unwrap())
        };
        let uri = identity.to_string();
        prop_assert_eq!(Identity::parse(&uri).unwrap(), identity);
        let kind = if service { "service" } else { "device" };
        prop_assert_eq!(uri, format!("spiffe://{}/{}/{}", td, kind, id));
    }

    #[test]
    fn identity_parse_never_panics(s in ".{0,300}") {
        if let Ok(id) = Identity::parse(&s) {
            prop_assert_eq!(id.to_string(), s);
            prop_assert!(matches!(id.principal, Principal::Device(_) | Principal::Service(_)));
        }
    }

    #[test]
    fn topic_round_trips(id in device_id(), ch in prop::sample::select(Channel::ALL.to_vec())) {
        let t = Topic::new(DeviceId::parse(&id).unwrap(), ch);
        prop_assert_eq!(Topic::parse(&t.to_string()).unwrap(), t);
        prop_assert!(t.to_string().len() <= Topic::MAX_LEN);
    }

    #[test]
    fn topic_parse_refuses_wildcards(id in device_id(), wild in prop::sample::select(vec!["+", "#"])) {
        let wild_device = format!("devices/{wild}/telemetry");
        let wild_channel = format!("devices/{id}/{wild}");
        prop_assert!(Topic::parse(&wild_device).is_err());
        prop_assert!(Topic::parse(&wild_channel).is_err());
    }

    #[test]
    fn decoders_never_panic_on_garbage(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = message::decode::<message::Telemetry>(&bytes);
        let _ = message::decode::<message::Command>(&bytes);
        let _ = message::decode::<message::Reply>(&bytes);
        let _ = Bundle::decode(&bytes);
    }

    #[test]
    fn framed_garbage_never_panics(body in prop::collection::vec(any::<u8>(), 0..256)) {
        // A valid header and CRC around an arbitrary body reaches the body decoder.
        let mut framed = b"TWFB\x01\0\0\0".to_vec();
        framed.extend_from_slice(&(body.len() as u32).to_le_bytes());
        framed.extend_from_slice(&body);
        let crc = crc32(&framed);
        framed.extend_from_slice(&crc.to_le_bytes());
        if let Ok(bundle) = Bundle::decode(&framed) {
            let mut again = vec![0u8; framed.len() + 16];
            let n = bundle.encode(&mut again).unwrap();
            prop_assert_eq!(Bundle::decode(&again[..n]).unwrap(), bundle);
        }
    }
}

#[test]
fn documented_layout_matches_the_encoder() {
    let mut chain = heapless::Vec::new();
    chain.push(&b"leaf"[..]).unwrap();
    let bundle = Bundle {
        device_id: DeviceId::parse("mcu-1").unwrap(),
        gateway_host: "10.0.0.1",
        gateway_port: 8883,
        server_name: "10.0.0.1",
        private_key: &[9u8; 32],
        chain,
        server_ca: b"ca",
    };
    let mut buf = [0u8; 256];
    let n = bundle.encode(&mut buf).unwrap();
    let framed = &buf[..n];
    assert_eq!(&framed[..8], b"TWFB\x01\0\0\0");
    let body_len = u32::from_le_bytes(framed[8..12].try_into().unwrap()) as usize;
    assert_eq!(n, 12 + body_len + 4);
    let trailer = u32::from_le_bytes(framed[n - 4..].try_into().unwrap());
    assert_eq!(trailer, crc32(&framed[..n - 4]));
    // The body starts with the device id as a length-prefixed string.
    assert_eq!(&framed[12..18], b"\x05mcu-1");
}

fn crc32(bytes: &[u8]) -> u32 {
    // Bitwise reference CRC-32 (zlib), independent of the crate under test.
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
