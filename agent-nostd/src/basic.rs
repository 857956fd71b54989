//! A ready [`App`] for boards that have nothing of their own to report yet:
//! uptime and session counters as telemetry, the `ping` and `echo`
//! commands, and optional limits after which it stops (used by the QEMU
//! firmware and the host runner in tests). A product replaces it with its
//! own sensors and actions; the board wiring stays the same.

use core::fmt::Display;

use twofold_protocol::message::{Command, MAX_READINGS, Reading, ReplyStatus, Value};

use crate::session::{App, Error, Event, Stats, Timer};

/// When to stop; `None` runs forever.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// Stop once this many telemetry messages are acknowledged (or, with
    /// QoS 0, sent) and `commands` commands answered.
    pub telemetry: Option<u64>,
    pub commands: u32,
    /// ... and this many renewed certificates committed.
    pub renewals: u32,
    /// Give up after this many failed sessions in a row.
    pub failures: Option<u32>,
}

/// Uptime telemetry, `ping` and `echo`, logging through `log`.
pub struct BasicApp<T, F> {
    timer: T,
    log: F,
    limits: Limits,
    failures_in_row: u32,
    unix_ms: Option<fn() -> Option<u64>>,
}

impl<T: Timer, F: FnMut(&dyn Display)> BasicApp<T, F> {
    pub fn new(timer: T, limits: Limits, log: F) -> Self {
        BasicApp {
            timer,
            log,
            limits,
            failures_in_row: 0,
            unix_ms: None,
        }
    }

    /// Stamps telemetry with the wall-clock time from `unix_ms`.
    pub fn with_time(mut self, unix_ms: fn() -> Option<u64>) -> Self {
        self.unix_ms = Some(unix_ms);
        self
    }
}

impl<T: Timer, F: FnMut(&dyn Display)> App for BasicApp<T, F> {
    fn sample(&mut self, readings: &mut heapless::Vec<Reading<'static>, MAX_READINGS>) {
        let uptime = i64::try_from(self.timer.now_ms()).unwrap_or(i64::MAX);
        // Capacity is MAX_READINGS, far above one.
        let _ = readings.push(Reading {
            name: "uptime_ms",
            value: Value::Int(uptime),
        });
    }

    fn command(&mut self, command: &Command<'_>, output: &mut [u8]) -> (ReplyStatus, usize) {
        let reply: &[u8] = match command.name {
            "ping" => b"pong",
            "echo" => command.body,
            _ => return (ReplyStatus::UnknownCommand, 0),
        };
        if reply.len() > output.len() {
            return (ReplyStatus::Refused, 0);
        }
        output[..reply.len()].copy_from_slice(reply);
        (ReplyStatus::Ok, reply.len())
    }

    fn event(&mut self, event: Event<'_>) {
        if matches!(event, Event::Connected) {
            self.failures_in_row = 0;
        }
        (self.log)(&event);
    }

    fn keep_going(&mut self, stats: &Stats) -> bool {
        match self.limits.telemetry {
            Some(t) => {
                stats.telemetry_acked + stats.telemetry_qos0 < t
                    || stats.commands < self.limits.commands
                    || stats.renewals < self.limits.renewals
            }
            None => true,
        }
    }

    fn retry(&mut self, _error: &Error, _stats: &Stats) -> bool {
        self.failures_in_row += 1;
        self.limits
            .failures
            .is_none_or(|max| self.failures_in_row < max)
    }

    fn time_ms(&mut self) -> Option<u64> {
        self.unix_ms.and_then(|f| f())
    }
}

impl Error {
    /// A process exit code per kind of failure, for firmware under test
    /// and the host runner: 10 cannot connect, 11 link lost or closed,
    /// 12 server certificate refused, 13 our certificate refused by the
    /// gateway, 14 other TLS failure, 15 MQTT protocol, 16 CONNECT or
    /// SUBSCRIBE refused, 17 timeout, 18 telemetry too large.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Connect(_) => 10,
            Error::Io(_) | Error::Closed => 11,
            Error::ServerRefused(_) => 12,
            Error::CertificateRefused => 13,
            Error::HandshakeAlert(_) | Error::Alert | Error::Tls(_) => 14,
            Error::Mqtt(_) | Error::Unexpected(_) => 15,
            Error::ConnectRefused(_) | Error::SubscribeRefused => 16,
            Error::Timeout(_) => 17,
            Error::TelemetryTooLarge => 18,
        }
    }
}
