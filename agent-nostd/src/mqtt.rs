//! MQTT 3.1.1 framing on top of the `mqttrs` codec.
//!
//! mqttrs encodes and decodes single packets in place, without an
//! allocator. Three things are added here: finding where a packet ends in a
//! stream (mqttrs only says "incomplete"); handing the decoder exactly one
//! packet's bytes, so that a lying length inside a packet cannot make it
//! read into the next one; and [`check_shape`], because mqttrs 0.4.1 indexes
//! past the end of a packet that is too short for its type (a two-byte
//! PUBACK, a QoS 1 PUBLISH without a packet id) and would panic. Only the
//! packets a server may send a client get as far as the decoder.
//!
//! mqttrs's `Packet` is large (its SUBSCRIBE variant holds five 256-byte
//! topic strings, about 1.3 KB), so it never leaves this module: the
//! session passes the small [`Outbound`] and gets the small [`Inbound`],
//! and the `Packet` lives only in the frames of [`encode`] and [`decode`]
//! for the moment they run. On the microcontroller this keeps about 3 KB
//! of stack.

use mqttrs::{
    ConnectReturnCode, Packet, Pid, Protocol, Publish, QoS, QosPid, Subscribe,
    SubscribeReturnCodes, SubscribeTopic, decode_slice, encode_slice,
};

/// What a client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outbound<'a> {
    /// MQTT 3.1.1, clean session, no will, no credentials.
    Connect {
        client_id: &'a str,
        keep_alive: u16,
    },
    /// One topic, QoS 1.
    Subscribe {
        pid: Pid,
        topic: &'a str,
    },
    /// QoS 1 with a packet id, QoS 0 without; not retained.
    Publish {
        pid: Option<Pid>,
        topic: &'a str,
        payload: &'a [u8],
    },
    Puback(Pid),
    Pingreq,
    Disconnect,
}

/// What a server sends a client.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Inbound<'a> {
    Connack(ConnectReturnCode),
    /// QoS 0 (no packet id) or QoS 1.
    Publish {
        pid: Option<Pid>,
        topic: &'a str,
        payload: &'a [u8],
    },
    /// A QoS 2 PUBLISH, which this client never subscribes for.
    PublishQos2,
    Puback(Pid),
    /// `granted`: the first (only) topic was not refused.
    Suback {
        pid: Pid,
        granted: bool,
    },
    Pingresp,
}

/// Why bytes from the gateway are not acceptable MQTT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttError {
    /// The remaining-length field runs past four bytes.
    BadLength,
    /// The packet is larger than the receive buffer.
    TooLarge { len: usize, max: usize },
    /// The packet does not decode.
    Malformed,
    /// An outgoing packet does not fit in the transmit buffer.
    NoRoom,
}

impl core::fmt::Display for MqttError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MqttError::BadLength => f.write_str("packet length field is invalid"),
            MqttError::TooLarge { len, max } => {
                write!(
                    f,
                    "packet of {len} bytes exceeds the {max}-byte receive buffer"
                )
            }
            MqttError::Malformed => f.write_str("packet does not decode as MQTT 3.1.1"),
            MqttError::NoRoom => f.write_str("packet does not fit in the transmit buffer"),
        }
    }
}

/// The length of the first packet in `buf`, header included, once its
/// fixed header is complete; `None` while more bytes are needed for that.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, MqttError> {
    let mut remaining: usize = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some(1 + i + 1 + remaining));
        }
    }
    Err(MqttError::BadLength)
}

/// Refuses a frame that is not a server-to-client packet of a length
/// its type allows, before mqttrs reads it.
pub fn check_shape(frame: &[u8]) -> Result<(), MqttError> {
    let Some(Some(total)) = frame_len(frame).ok() else {
        return Err(MqttError::Malformed);
    };
    let Some(&first) = frame.first() else {
        return Err(MqttError::Malformed);
    };
    if total != frame.len() {
        return Err(MqttError::Malformed);
    }
    let header = 1 + frame[1..].iter().take_while(|b| *b & 0x80 != 0).count() + 1;
    let body = &frame[header..];
    let ok = match first >> 4 {
        // CONNACK, PUBACK
        2 | 4 => body.len() == 2,
        // PUBLISH: topic length, topic, packet id when QoS > 0
        3 => {
            let id = if first & 0b0110 != 0 { 2 } else { 0 };
            match body {
                [hi, lo, rest @ ..] => {
                    usize::from(u16::from_be_bytes([*hi, *lo])) + id <= rest.len()
                }
                _ => false,
            }
        }
        // SUBACK: packet id and one to five return codes
        9 => (3..=7).contains(&body.len()),
        // PINGRESP
        13 => body.is_empty(),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(MqttError::Malformed)
    }
}

/// Decodes exactly `frame` (one whole packet, as sized by [`frame_len`]).
#[inline(never)]
pub fn decode(frame: &[u8]) -> Result<Inbound<'_>, MqttError> {
    check_shape(frame)?;
    let Ok(Some(packet)) = decode_slice(frame) else {
        return Err(MqttError::Malformed);
    };
    Ok(match packet {
        Packet::Connack(c) => Inbound::Connack(c.code),
        Packet::Publish(p) => match p.qospid {
            QosPid::AtMostOnce => Inbound::Publish {
                pid: None,
                topic: p.topic_name,
                payload: p.payload,
            },
            QosPid::AtLeastOnce(pid) => Inbound::Publish {
                pid: Some(pid),
                topic: p.topic_name,
                payload: p.payload,
            },
            QosPid::ExactlyOnce(_) => Inbound::PublishQos2,
        },
        Packet::Puback(pid) => Inbound::Puback(pid),
        Packet::Suback(a) => Inbound::Suback {
            pid: a.pid,
            granted: a
                .return_codes
                .first()
                .is_some_and(|c| *c != SubscribeReturnCodes::Failure),
        },
        Packet::Pingresp => Inbound::Pingresp,
        // check_shape lets nothing else through.
        _ => return Err(MqttError::Malformed),
    })
}

/// Encodes `packet` at the start of `buf`, returning its length.
#[inline(never)]
pub fn encode(packet: Outbound<'_>, buf: &mut [u8]) -> Result<usize, MqttError> {
    let packet = match packet {
        Outbound::Connect {
            client_id,
            keep_alive,
        } => Packet::Connect(mqttrs::Connect {
            protocol: Protocol::MQTT311,
            keep_alive,
            client_id,
            clean_session: true,
            last_will: None,
            username: None,
            password: None,
        }),
        Outbound::Subscribe { pid, topic } => {
            let mut topic_path = heapless07::String::new();
            topic_path.push_str(topic).map_err(|_| MqttError::NoRoom)?;
            let mut topics = heapless07::Vec::new();
            // One topic in a five-topic vector.
            let _ = topics.push(SubscribeTopic {
                topic_path,
                qos: QoS::AtLeastOnce,
            });
            Packet::Subscribe(Subscribe::new(pid, topics))
        }
        Outbound::Publish {
            pid,
            topic,
            payload,
        } => Packet::Publish(Publish {
            dup: false,
            qospid: pid.map_or(QosPid::AtMostOnce, QosPid::AtLeastOnce),
            retain: false,
            topic_name: topic,
            payload,
        }),
        Outbound::Puback(pid) => Packet::Puback(pid),
        Outbound::Pingreq => Packet::Pingreq,
        Outbound::Disconnect => Packet::Disconnect,
    };
    encode_slice(&packet, buf).map_err(|_| MqttError::NoRoom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_decodes_a_publish() {
        let mut buf = [0u8; 64];
        let pid = Pid::try_from(7).unwrap();
        let (topic, payload) = ("devices/d1/commands", &b"abc"[..]);
        let n = encode(
            Outbound::Publish {
                pid: Some(pid),
                topic,
                payload,
            },
            &mut buf,
        )
        .unwrap();
        assert_eq!(frame_len(&buf[..1]), Ok(None));
        assert_eq!(frame_len(&buf[..n]), Ok(Some(n)));
        assert_eq!(
            decode(&buf[..n]),
            Ok(Inbound::Publish {
                pid: Some(pid),
                topic,
                payload
            })
        );
        let n = encode(
            Outbound::Publish {
                pid: None,
                topic,
                payload,
            },
            &mut buf,
        )
        .unwrap();
        assert_eq!(
            decode(&buf[..n]),
            Ok(Inbound::Publish {
                pid: None,
                topic,
                payload
            })
        );
        assert_eq!(decode(&buf[..n - 1]), Err(MqttError::Malformed));
    }

    #[test]
    fn refuses_packets_too_short_for_their_type() {
        // mqttrs alone would index past the end of each of these.
        for frame in [
            &[0x40, 0x00][..],               // PUBACK without its packet id
            &[0x20, 0x01, 0x00],             // CONNACK without its code
            &[0x32, 0x03, 0x00, 0x01, b'a'], // QoS 1 PUBLISH without a packet id
            &[0x90, 0x02, 0x00, 0x01],       // SUBACK without a return code
            &[0x10, 0x00],                   // CONNECT: never sent to a client
        ] {
            assert_eq!(decode(frame), Err(MqttError::Malformed), "{frame:?}");
        }
        assert_eq!(decode(&[0xd0, 0x00]), Ok(Inbound::Pingresp));
        let pid = Pid::try_from(1).unwrap();
        for (code, granted) in [(0x01, true), (0x80, false)] {
            let suback = [0x90, 0x03, 0x00, 0x01, code];
            assert_eq!(decode(&suback), Ok(Inbound::Suback { pid, granted }));
        }
        assert_eq!(
            decode(&[0x34, 0x05, 0x00, 0x01, b'a', 0x00, 0x01]),
            Ok(Inbound::PublishQos2)
        );
    }

    #[test]
    fn refuses_a_five_byte_length() {
        assert_eq!(
            frame_len(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(MqttError::BadLength)
        );
    }

    /// Hostile bytes from the gateway: every truncation and every
    /// single-byte change of valid packets either decodes or is refused;
    /// nothing panics.
    #[test]
    fn damaged_packets_never_panic() {
        let mut valid = [[0u8; 48]; 4];
        let lens = [
            encode(
                Outbound::Publish {
                    pid: Some(Pid::try_from(9).unwrap()),
                    topic: "devices/x/commands",
                    payload: &[1, 2, 3, 4],
                },
                &mut valid[0],
            )
            .unwrap(),
            encode(Outbound::Puback(Pid::try_from(1).unwrap()), &mut valid[1]).unwrap(),
            {
                valid[2][..2].copy_from_slice(&[0xd0, 0]); // PINGRESP
                2
            },
            {
                valid[3][..5].copy_from_slice(&[0x90, 3, 0, 1, 1]); // SUBACK
                5
            },
        ];
        for (p, &len) in valid.iter().zip(&lens) {
            for cut in 0..=len {
                let frame = &p[..cut];
                if let Ok(Some(n)) = frame_len(frame) {
                    let _ = decode(&frame[..n.min(frame.len())]);
                }
                let _ = decode(frame);
            }
            for at in 0..len {
                for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                    let mut m = *p;
                    m[at] = v;
                    if let Ok(Some(n)) = frame_len(&m[..len]) {
                        if n <= len {
                            let _ = decode(&m[..n]);
                        }
                    }
                }
            }
        }
    }
}
