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
}

impl FromBroker {
    /// Takes the whole frames at the front of `buf`. Bytes the codec cannot
    /// frame are passed on as they are: they come from the broker, which
    /// the gateway trusts.
    pub(super) fn take(&self, buf: &mut BytesMut, pings: &mut VecDeque<Ping>) -> ToDevice {
        let mut at = 0;
        let mut publishes = 0;
        let mut answers = 0;
        // Cut points: a frame to drop, or to replace.
        let mut edits: Vec<(std::ops::Range<usize>, Option<Bytes>)> = Vec::new();
        while at < buf.len() {
            match mqttbytes::check(buf[at..].iter(), usize::MAX) {
                Ok(header) => {
                    let end = at + header.frame_length();
                    let kind = buf[at] >> 4;
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
