//! Framing: whole MQTT packets off a byte stream, the protocol level of a
//! CONNECT, and the few packets the gateway encodes itself.

use super::*;

pub(super) enum FrameError {
    Closed,
    /// The connection failed (a TLS error, a reset), not a clean close.
    Broken(String),
    TooLarge(usize),
    Malformed(String),
}

/// Reads the first packet, refusing at its first byte anything that is not
/// a CONNECT (instead of waiting for the rest of a frame that never comes).
pub(super) async fn read_connect<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<BytesMut, FrameError> {
    while buf.is_empty() {
        match rd.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(FrameError::Closed),
            Ok(_) => {}
        }
    }
    if buf[0] != 0x10 {
        return Err(FrameError::Malformed(
            "the first packet is not CONNECT".into(),
        ));
    }
    read_frame(rd, buf, max).await
}

/// Reads one complete MQTT packet into a frame, reading more as needed.
pub(super) async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<BytesMut, FrameError> {
    loop {
        if let Some(frame) = next_frame(buf, max)? {
            return Ok(frame);
        }
        match rd.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(FrameError::Closed),
            Ok(_) => {}
        }
    }
}

/// Splits one whole MQTT packet off the front of `buf`, if one is there.
pub(super) fn next_frame(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, FrameError> {
    match mqttbytes::check(buf.iter(), max) {
        Ok(header) => Ok(Some(buf.split_to(header.frame_length()))),
        Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(mqttbytes::Error::PayloadSizeLimitExceeded(n)) => Err(FrameError::TooLarge(n)),
        Err(e) => Err(FrameError::Malformed(e.to_string())),
    }
}

/// The protocol level of a CONNECT frame: the byte after the length-prefixed
/// protocol name. Read by hand because the codec to decode the rest with
/// depends on it.
pub(super) fn protocol_level(frame: &[u8]) -> Option<u8> {
    let header_len = 1 + frame.iter().skip(1).position(|b| b & 0x80 == 0)? + 1;
    let name = frame.get(header_len..header_len + 6)?;
    (name == b"\x00\x04MQTT")
        .then(|| frame.get(header_len + 6).copied())
        .flatten()
}

pub(super) fn encode_v4(packet: v4::Packet) -> Bytes {
    let mut out = BytesMut::new();
    let _ = packet.write(&mut out, usize::MAX);
    out.freeze()
}

pub(super) fn encode_v5(packet: v5::Packet) -> Bytes {
    let mut out = BytesMut::new();
    let _ = packet.write(&mut out, None);
    out.freeze()
}

pub(super) fn v4_connack(code: v4::ConnectReturnCode) -> Bytes {
    encode_v4(v4::Packet::ConnAck(v4::ConnAck {
        session_present: false,
        code,
    }))
}

pub(super) fn v5_connack(code: v5::ConnectReturnCode) -> Bytes {
    encode_v5(v5::Packet::ConnAck(v5::ConnAck {
        session_present: false,
        code,
        properties: None,
    }))
}

/// MQTT 5 CONNACK properties with nothing set, for the gateway to fill.
pub(super) fn no_connack_properties() -> v5::ConnAckProperties {
    v5::ConnAckProperties {
        session_expiry_interval: None,
        receive_max: None,
        max_qos: None,
        retain_available: None,
        max_packet_size: None,
        assigned_client_identifier: None,
        topic_alias_max: None,
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    }
}

/// An MQTT 5 DISCONNECT with a reason code and an empty property list.
/// Written by hand: rumqttc 0.25 encodes this packet as remaining length 1
/// followed by two bytes (the reason and a property length), so a client
/// reads a stray byte after it; and its reader (like some others) cannot
/// read the shorter legal form, remaining length 1, at all.
pub(super) fn v5_disconnect(reason_code: v5::DisconnectReasonCode) -> Bytes {
    Bytes::from(vec![0xE0, 0x02, reason_code as u8, 0x00])
}

/// What one read brought.
pub(super) enum Read {
    Data,
    End,
    Failed(std::io::Error),
}

/// The smallest and largest reads of a session, from the device or from
/// the broker. A read from the broker shares its allocation with the
/// frames split off it until the device has them, so at most the 16 queued
/// sends times this is held for a slow device.
pub(super) const READ_CHUNK_MIN: usize = 512;
pub(super) const READ_CHUNK_MAX: usize = 16 * 1024;

/// How much one side of a session reads at a time. Reads grow while they
/// fill the room they were given (a device sending a burst, a subscriber
/// receiving many devices' traffic), so a busy session takes in large
/// pieces and forwards them in one write each; once it is quiet again, it
/// goes back to a small buffer.
pub(super) struct Reads {
    pub(super) chunk: usize,
}

impl Reads {
    pub(super) fn new() -> Reads {
        Reads {
            chunk: READ_CHUNK_MIN,
        }
    }

    /// Reads once into `buf`.
    pub(super) async fn more<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        buf: &mut BytesMut,
    ) -> Read {
        // Quiet again after a burst or a large frame: what is left (at
        // most the start of the next frame) moves to a small buffer.
        if self.chunk == READ_CHUNK_MIN
            && buf.capacity() > 2 * READ_CHUNK_MIN
            && buf.len() < READ_CHUNK_MIN
        {
            let mut small = BytesMut::with_capacity(READ_CHUNK_MIN);
            small.extend_from_slice(buf);
            *buf = small;
        }
        if buf.capacity() - buf.len() < READ_CHUNK_MIN {
            buf.reserve(self.chunk);
        }
        let room = buf.capacity() - buf.len();
        match rd.read_buf(buf).await {
            Ok(0) => Read::End,
            Err(e) => Read::Failed(e),
            Ok(n) => {
                self.chunk = if n == room {
                    (self.chunk * 2).min(READ_CHUNK_MAX)
                } else {
                    READ_CHUNK_MIN
                };
                Read::Data
            }
        }
    }

    /// Reads until `buf` starts with a whole frame, or with a header that
    /// cannot start one (which [`batch`] reports).
    pub(super) async fn frame<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        buf: &mut BytesMut,
        max: usize,
    ) -> Result<(), FrameError> {
        loop {
            match mqttbytes::check(buf.iter(), max) {
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                _ => return Ok(()),
            }
            match self.more(rd, buf).await {
                Read::Data => {}
                Read::End => return Err(FrameError::Closed),
                Read::Failed(e) => return Err(FrameError::Broken(e.to_string())),
            }
        }
    }
}
