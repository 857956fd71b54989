//! The messages on device topics, encoded with postcard.
//!
//! All types borrow from the buffer they were decoded from, so a device
//! without an allocator decodes in place. [`decode`] refuses trailing bytes:
//! a payload is exactly one message.

use core::fmt;

use serde::{Deserialize, Serialize};

/// How many readings one telemetry message may carry.
pub const MAX_READINGS: usize = 32;

/// A measured value.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// A count or an integer quantity (bytes, seconds, packets).
    Int(i64),
    /// A measurement (°C, load average, ratio).
    Float(f64),
    /// A flag.
    Bool(bool),
}

/// One named reading, e.g. `cpu_temp_c = 48.3`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct Reading<'a> {
    /// What was measured, `snake_case` with the unit as suffix.
    pub name: &'a str,
    /// The value.
    pub value: Value,
}

/// Device → cloud, on `devices/<id>/telemetry`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Telemetry<'a> {
    /// Increases by one per message from a device; lets a subscriber count
    /// what was lost or duplicated.
    pub seq: u64,
    /// Milliseconds since the Unix epoch, when the device has a clock.
    pub time_ms: Option<u64>,
    /// The readings, at most [`MAX_READINGS`].
    #[serde(borrow)]
    pub readings: heapless::Vec<Reading<'a>, MAX_READINGS>,
}

/// Cloud → device, on `devices/<id>/commands`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct Command<'a> {
    /// Chosen by the sender; echoed in the [`Reply`].
    pub id: u32,
    /// Which command to run, e.g. `ping`. The device maps names to actions;
    /// it never interprets the name as a path or a shell word.
    pub name: &'a str,
    /// Command input, passed to the action as data, never as arguments.
    pub body: &'a [u8],
}

/// Gateway → device, on [`crate::topic::CERT_STATUS`] once the device
/// subscribes to it: where the certificate the device connected with is
/// in its life. Counted in seconds from the gateway's `now`, so a device
/// without a wall clock can count them down on its monotonic timer.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertStatus<'a> {
    /// The certificate's serial: big-endian, without leading zero bytes.
    pub serial: &'a [u8],
    /// Seconds until it expires (0: it has).
    pub expires_in: u64,
    /// Seconds until its renewal is due (0: it is), by
    /// step-ca's rule: two thirds of the lifetime less a jitter of up to a
    /// twentieth, fixed by the identity.
    pub renew_in: u64,
    /// The gateway's time, Unix seconds.
    pub now: u64,
}

/// Device → gateway, on [`crate::topic::CERT_RENEW`]: renew the
/// certificate this session was opened with.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenewRequest<'a> {
    /// Chosen by the device, 1-64 characters of `A-Z a-z 0-9 - _ .`; the
    /// same id after a dropped connection gets the same certificate.
    pub request_id: &'a str,
    /// A PKCS#10 CSR (DER) for a new key (rekey); `None` renews the key
    /// the session was authenticated with (renew: no CSR encoder needed).
    pub csr: Option<&'a [u8]>,
}

/// Why a renewal or commit was refused.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewRefusal {
    /// Another request of this identity is being answered: retry later.
    Busy,
    /// Too many requests lately: retry after `retry_after`.
    RateLimited,
    /// The certificate is revoked: the device must be re-enrolled.
    Revoked,
    /// Not the newest certificate of this device: connect with the newest.
    NotLatest,
    /// The CSR is unusable or names another identity.
    InvalidCsr,
    /// Renewal is not due yet (see [`CertStatus::renew_in`]).
    NotDue,
    /// The certificate expired: re-enroll.
    Expired,
    /// The request itself is malformed (its id, its encoding).
    BadRequest,
    /// The CA cannot be reached or failed: retry after `retry_after`.
    Unavailable,
}

/// Gateway → device, on [`crate::topic::CERT_ANSWER`].
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertAnswer<'a> {
    /// The new certificate, DER, followed by the DER of the CA that issued
    /// it. The device stores it beside its current one, reconnects with
    /// it, then publishes to [`crate::topic::CERT_COMMIT`].
    Issued {
        /// The request's id.
        request_id: &'a str,
        /// The new certificate's DER, then its CA's.
        certs: &'a [u8],
    },
    /// Refused, with a reason for the log; retry no sooner than
    /// `retry_after` seconds (0: do not retry as is).
    Refused {
        /// The request's id (empty for a commit or an unreadable request).
        request_id: &'a str,
        /// Why, for the device to act on.
        code: RenewRefusal,
        /// Seconds to wait before asking again.
        retry_after: u32,
        /// Why, in words, for the device's log.
        reason: &'a str,
    },
    /// The renewed certificate with this serial is now the device's only
    /// one: its predecessor is superseded.
    Committed {
        /// The committed certificate's serial, big-endian.
        serial: &'a [u8],
    },
}

/// How a command ended.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStatus {
    /// It ran and succeeded.
    Ok,
    /// It ran and failed; see `exit_code` and `output`.
    Failed,
    /// The device has no command of that name.
    UnknownCommand,
    /// The device refused to run it (not allowed, bad input).
    Refused,
    /// It did not finish in time and was stopped.
    TimedOut,
}

/// Device → cloud, on `devices/<id>/replies`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct Reply<'a> {
    /// The [`Command::id`] this answers.
    pub id: u32,
    /// How it ended.
    pub status: ReplyStatus,
    /// The process exit code, when a process ran.
    pub exit_code: Option<i32>,
    /// What the command printed, possibly truncated by the device.
    pub output: &'a [u8],
}

/// Why a message could not be encoded or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// The output buffer is too small.
    BufferFull,
    /// The bytes are not a valid message of the expected type.
    Malformed,
    /// A valid message is followed by `extra` more bytes.
    TrailingBytes {
        /// How many bytes follow the message.
        extra: usize,
    },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::BufferFull => f.write_str("message does not fit in the buffer"),
            WireError::Malformed => f.write_str("payload is not a valid message"),
            WireError::TrailingBytes { extra } => {
                write!(f, "payload has {extra} bytes after the message")
            }
        }
    }
}

impl core::error::Error for WireError {}

/// Encodes `msg` into `buf` and returns the used prefix.
pub fn encode<'b, T: Serialize>(msg: &T, buf: &'b mut [u8]) -> Result<&'b mut [u8], WireError> {
    postcard::to_slice(msg, buf).map_err(|e| match e {
        postcard::Error::SerializeBufferFull => WireError::BufferFull,
        _ => WireError::Malformed,
    })
}

/// Decodes exactly one message from `bytes`.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, WireError> {
    let (msg, rest) = postcard::take_from_bytes(bytes).map_err(|_| WireError::Malformed)?;
    if rest.is_empty() {
        Ok(msg)
    } else {
        Err(WireError::TrailingBytes { extra: rest.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_round_trips() {
        let mut readings = heapless::Vec::new();
        readings
            .push(Reading {
                name: "cpu_temp_c",
                value: Value::Float(48.5),
            })
            .unwrap();
        readings
            .push(Reading {
                name: "uptime_s",
                value: Value::Int(3600),
            })
            .unwrap();
        let t = Telemetry {
            seq: 7,
            time_ms: Some(1_700_000_000_000),
            readings,
        };
        let mut buf = [0u8; 128];
        let bytes = encode(&t, &mut buf).unwrap();
        assert_eq!(decode::<Telemetry>(bytes).unwrap(), t);
    }

    #[test]
    fn cert_status_round_trips_in_a_few_bytes() {
        let s = CertStatus {
            serial: &[0x8f, 0x01, 0x22],
            expires_in: 30 * 86_400,
            renew_in: 19 * 86_400,
            now: 1_796_000_000,
        };
        let mut buf = [0u8; 64];
        let bytes = encode(&s, &mut buf).unwrap();
        // Small enough for any board: 20-byte serials fit in 48 bytes.
        assert!(bytes.len() <= 24, "{} bytes", bytes.len());
        assert_eq!(decode::<CertStatus>(bytes).unwrap(), s);
    }

    #[test]
    fn renewal_messages_round_trip() {
        let mut buf = [0u8; 256];
        let r = RenewRequest {
            request_id: "r-1",
            csr: None,
        };
        let bytes = encode(&r, &mut buf).unwrap();
        assert_eq!(decode::<RenewRequest>(bytes).unwrap(), r);
        for a in [
            CertAnswer::Issued {
                request_id: "r-1",
                certs: &[0x30, 0x03, 1, 2, 3],
            },
            CertAnswer::Refused {
                request_id: "r-1",
                code: RenewRefusal::NotDue,
                retry_after: 60,
                reason: "renewal is not due until …",
            },
            CertAnswer::Committed { serial: &[0x40, 1] },
        ] {
            let bytes = encode(&a, &mut buf).unwrap();
            assert_eq!(decode::<CertAnswer>(bytes).unwrap(), a);
        }
    }

    #[test]
    fn command_and_reply_round_trip() {
        let c = Command {
            id: 9,
            name: "ping",
            body: b"x",
        };
        let mut buf = [0u8; 64];
        let bytes = encode(&c, &mut buf).unwrap();
        assert_eq!(decode::<Command>(bytes).unwrap(), c);
        let r = Reply {
            id: 9,
            status: ReplyStatus::Ok,
            exit_code: Some(0),
            output: b"pong",
        };
        let bytes = encode(&r, &mut buf).unwrap();
        assert_eq!(decode::<Reply>(bytes).unwrap(), r);
    }

    #[test]
    fn refuses_trailing_bytes_and_garbage() {
        let c = Command {
            id: 1,
            name: "ping",
            body: b"",
        };
        let mut buf = [0u8; 64];
        let len = encode(&c, &mut buf).unwrap().len();
        assert_eq!(
            decode::<Command>(&buf[..len + 2]),
            Err(WireError::TrailingBytes { extra: 2 })
        );
        assert_eq!(
            decode::<Command>(&[0xff, 0xff, 0xff]),
            Err(WireError::Malformed)
        );
    }

    #[test]
    fn too_many_readings_is_malformed_not_a_panic() {
        // A length prefix of 33 readings: more than the Vec can hold.
        let mut bytes = [0u8; 64];
        bytes[0] = 1; // seq
        bytes[1] = 0; // time_ms: None
        bytes[2] = 33; // readings length
        assert_eq!(decode::<Telemetry>(&bytes[..3]), Err(WireError::Malformed));
    }

    #[test]
    fn small_buffer_is_reported() {
        let c = Command {
            id: 1,
            name: "a-long-command-name",
            body: b"",
        };
        let mut buf = [0u8; 4];
        assert_eq!(encode(&c, &mut buf), Err(WireError::BufferFull));
    }
}
