//! What the broker sends, made ready for the device.

use super::*;

/// What the broker sent, made ready for the device: whole frames only,
/// with the broker's UNSUBACKs dropped and the gateway's own taking the
/// place of the PINGRESP that answers its PINGREQ (see [`Ping`]).
pub(super) struct FromBroker {
    pub(super) version: Version,
    /// The broker speaks 3.1.1 to an MQTT 5 device: its PUBLISHes and
    /// SUBACKs are rewritten up (see `downgrade`).
    pub(super) upgrade: bool,
}

/// Frames for the device, with how many are PUBLISH and how many answer
/// the device's PUBLISHes.
pub(super) struct ToDevice {
    pub(super) frames: Bytes,
    pub(super) publishes: u64,
    pub(super) answers: u64,
    /// PUBLISHes the policy in force no longer lets the device read.
    pub(super) withheld: Vec<Withheld>,
}

/// A PUBLISH from the broker kept from the device.
pub(super) struct Withheld {
    pub(super) topic: String,
    pub(super) qos: u8,
    pub(super) pkid: u16,
}

/// Who the session is and the policy in force, for what the broker
/// delivers: a subscription granted under an earlier policy (a reload, a
/// group membership removed, a persistent session's subscription kept by
/// the broker across reconnects) must not go on delivering.
pub(super) struct Reader<'a> {
    pub(super) principal: &'a Principal,
    pub(super) policy: &'a InForce,
}

/// The topic, QoS and packet id of a whole PUBLISH frame (MQTT 3.1.1 and
/// 5 put them first, after the fixed header). Read by hand because the
/// codec's reader copies the payload too, for every message.
pub(super) fn publish_head(frame: &[u8]) -> Option<(String, u8, u16)> {
    let qos = (frame.first()? >> 1) & 0b11;
    // The remaining length: 1 to 4 bytes, each but the last with bit 7 set.
    let varint = frame.get(1..)?.iter().take(4).position(|b| b & 0x80 == 0)? + 1;
    let rest = frame.get(1 + varint..)?;
    let len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
    let topic = std::str::from_utf8(rest.get(2..2 + len)?).ok()?.to_owned();
    let pkid = if qos > 0 {
        u16::from_be_bytes([*rest.get(2 + len)?, *rest.get(3 + len)?])
    } else {
        0
    };
    Some((topic, qos, pkid))
}

impl FromBroker {
    /// Takes the whole frames at the front of `buf`. Bytes the codec cannot
    /// frame are passed on as they are: they come from the broker, which
    /// the gateway trusts.
    pub(super) fn take(
        &self,
        buf: &mut BytesMut,
        pings: &mut VecDeque<Ping>,
        reader: &Reader<'_>,
    ) -> ToDevice {
        let mut at = 0;
        let mut publishes = 0;
        let mut answers = 0;
        let mut withheld = Vec::new();
        let check = reader.policy.restricts_reading();
        // Cut points: a frame to drop, or to replace.
        let mut edits: Vec<(std::ops::Range<usize>, Option<Bytes>)> = Vec::new();
        while at < buf.len() {
            match mqttbytes::check(buf[at..].iter(), usize::MAX) {
                Ok(header) => {
                    let end = at + header.frame_length();
                    let kind = buf[at] >> 4;
                    if kind == 3
                        && check
                        && let Some((topic, qos, pkid)) = publish_head(&buf[at..end])
                        && reader
                            .policy
                            .may_subscribe(reader.principal, &topic)
                            .is_err()
                    {
                        edits.push((at..end, None));
                        withheld.push(Withheld { topic, qos, pkid });
                        at = end;
                        continue;
                    }
                    if self.upgrade
                        && (kind == 3 || kind == 9)
                        && let Some(up) = downgrade::frame_up(&buf[at..end])
                    {
                        edits.push((at..end, Some(up)));
                    }
                    match kind {
                        3 => publishes += 1,
                        4 | 5 => answers += 1,
                        11 => edits.push((at..end, None)),
                        13 => {
                            if let Some(Ping::Unsubscribe { pkid, filters }) = pings.pop_front() {
                                edits.push((at..end, Some(self.unsuback(pkid, filters))));
                            }
                        }
                        _ => {}
                    }
                    at = end;
                }
                Err(mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(_) => {
                    at = buf.len();
                    break;
                }
            }
        }
        let taken = buf.split_to(at).freeze();
        let frames = if edits.is_empty() {
            taken
        } else {
            let mut joined = BytesMut::with_capacity(taken.len());
            let mut from = 0;
            for (cut, with) in edits {
                joined.extend_from_slice(&taken[from..cut.start]);
                if let Some(with) = with {
                    joined.extend_from_slice(&with);
                }
                from = cut.end;
            }
            joined.extend_from_slice(&taken[from..]);
            joined.freeze()
        };
        ToDevice {
            frames,
            publishes,
            answers,
            withheld,
        }
    }

    /// One UNSUBACK for one UNSUBSCRIBE. The broker cannot tell which
    /// filters it held, so MQTT 5 gets Success for each (the
    /// specification's answer once the subscription is gone).
    pub(super) fn unsuback(&self, pkid: u16, filters: usize) -> Bytes {
        match self.version {
            Version::V311 => encode_v4(v4::Packet::UnsubAck(v4::UnsubAck { pkid })),
            Version::V5 => encode_v5(v5::Packet::UnsubAck(v5::UnsubAck {
                pkid,
                reasons: vec![v5::UnsubAckReason::Success; filters],
                properties: None,
            })),
        }
    }
}
