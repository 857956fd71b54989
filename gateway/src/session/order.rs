//! The order of what goes to the device: the broker's answers and the
//! gateway's own, as MQTT 5 wants them.

use super::*;

/// Is this (a frame's first byte) the broker's answer to a device's
/// PUBLISH: PUBACK (QoS 1) or PUBREC (QoS 2)?
pub(super) fn is_answer(first: u8) -> bool {
    matches!(first >> 4, 4 | 5)
}

/// What goes to the device's writer.
pub(super) enum Out {
    /// Whole frames from the broker, `answers` of them PUBACK or PUBREC.
    Broker { frames: Bytes, answers: u64 },
    /// A packet of the gateway's own, to go out once the broker has
    /// answered the first `after` QoS 1 and 2 PUBLISHes the device sent
    /// through.
    Gateway { packet: Bytes, after: u64 },
}

/// The most packets of the gateway's own held back for their turn, and
/// the most bytes (a refused SUBSCRIBE's SUBACK grows with its filters).
pub(super) const MAX_HELD: usize = 1024;
pub(super) const MAX_HELD_BYTES: usize = 64 * 1024;

/// Keeps what goes to the device in order. The broker answers the
/// PUBLISHes it was sent in order; the gateway's own answer to a refused
/// PUBLISH waits until the broker has answered every PUBLISH the device
/// sent before it, since MQTT 5 wants PUBACKs (and PUBRECs) in the order
/// of the PUBLISHes. The gateway's other packets (a refused SUBSCRIBE's
/// SUBACK, a DISCONNECT) keep their place after those answers too.
#[derive(Default)]
pub(super) struct DeviceOrder {
    /// The broker's PUBACKs and PUBRECs passed on so far.
    pub(super) answered: u64,
    /// The gateway's packets waiting for their turn, in order.
    pub(super) held: std::collections::VecDeque<(u64, Bytes)>,
    /// Their bytes.
    pub(super) held_bytes: usize,
}

impl DeviceOrder {
    /// Takes one message; appends what may go out now to `out`, in order.
    pub(super) fn take(&mut self, message: Out, out: &mut Vec<Bytes>) {
        match message {
            Out::Broker { frames, answers } if self.held.is_empty() => {
                self.answered += answers;
                out.push(frames);
            }
            Out::Broker { frames, .. } => {
                // Frame by frame: a held packet goes out right after the
                // answer it waits for.
                let (mut at, mut start) = (0, 0);
                while at < frames.len() {
                    let Ok(header) = mqttbytes::check(frames[at..].iter(), usize::MAX) else {
                        break;
                    };
                    let answer = is_answer(frames[at]);
                    at += header.frame_length();
                    if answer {
                        self.answered += 1;
                        if self.ready() {
                            out.push(frames.slice(start..at.min(frames.len())));
                            start = at.min(frames.len());
                            self.release(out);
                        }
                    }
                }
                if start < frames.len() {
                    out.push(frames.slice(start..));
                }
            }
            Out::Gateway { packet, after } => {
                self.held_bytes += packet.len();
                self.held.push_back((after, packet));
                self.release(out);
                // A device that floods refused PUBLISHes while the broker
                // has yet to answer an earlier one: the order gives way
                // before memory does.
                while self.held.len() > MAX_HELD || self.held_bytes > MAX_HELD_BYTES {
                    self.pop(out);
                }
            }
        }
    }

    pub(super) fn ready(&self) -> bool {
        self.held
            .front()
            .is_some_and(|(after, _)| *after <= self.answered)
    }

    pub(super) fn release(&mut self, out: &mut Vec<Bytes>) {
        while self.ready() {
            self.pop(out);
        }
    }

    pub(super) fn pop(&mut self, out: &mut Vec<Bytes>) {
        if let Some((_, packet)) = self.held.pop_front() {
            self.held_bytes -= packet.len();
            out.push(packet);
        }
    }

    /// The session is ending: whatever is still held goes out, in order.
    pub(super) fn flush(&mut self, out: &mut Vec<Bytes>) {
        while !self.held.is_empty() {
            self.pop(out);
        }
    }
}
