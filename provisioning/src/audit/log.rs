//! Reading the gateways' audit logs (JSON lines, one file per gateway and
//! rotation) into what the audit needs: when each identity was last seen,
//! each certificate's last admission, sessions with no disconnect, and
//! identities connected from two addresses at once.
//!
//! The files are merged in time order, so that a session on one gateway
//! and a connection on another are compared as they happened. A line that
//! does not parse is counted and named, never fatal: the rest still counts.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// An identity or certificate seen at a time, from an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sighting {
    pub at: OffsetDateTime,
    pub peer: String,
}

/// A session admitted with a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admission {
    pub at: OffsetDateTime,
    pub serial: String,
    pub peer: String,
    /// The log it is in.
    pub log: String,
}

/// An identity connected while connected from another address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overlaps {
    pub times: usize,
    /// The most times one pair of addresses was seen at once. A clone and
    /// its original meet again and again; a device that moves to a new
    /// network before its old connection timed out meets each old address
    /// once.
    pub repeated: usize,
    /// The addresses (without ports) seen at once, in order of appearance.
    pub addresses: Vec<String>,
    /// Times each pair of addresses (in order) was seen at once.
    pub(crate) pairs: HashMap<(String, String), usize>,
}

/// Lines of one log that could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damaged {
    pub log: String,
    pub lines: u64,
    pub first_line: u64,
    pub first_error: String,
}

impl fmt::Display for Damaged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} line(s) skipped, the first at line {}: {}",
            self.lines, self.first_line, self.first_error
        )
    }
}

/// What the audit logs say.
#[derive(Clone, Debug, Default)]
pub struct LogSummary {
    /// Events read.
    pub events: u64,
    /// When each identity URI was last seen (connected, disconnected, refused).
    pub by_identity: HashMap<String, Sighting>,
    /// When each certificate serial was last presented, admitted or not.
    pub by_serial: HashMap<String, Sighting>,
    /// Each certificate's last admission.
    pub admissions: HashMap<String, Admission>,
    /// Sessions with no disconnect after them in their log.
    pub open_at_end: Vec<Admission>,
    /// Identity URI → times connected while connected from elsewhere.
    pub overlaps: HashMap<String, Overlaps>,
    pub damaged: Vec<Damaged>,
}

impl LogSummary {
    /// The last sighting of an identity or of its certificate, whichever
    /// is later. Refusals at the handshake name the certificate only.
    pub fn last_seen(&self, identity: Option<&str>, serial: &str) -> Option<&Sighting> {
        let a = identity.and_then(|i| self.by_identity.get(i));
        let b = self.by_serial.get(serial);
        match (a, b) {
            (Some(a), Some(b)) => Some(if a.at >= b.at { a } else { b }),
            (a, b) => a.or(b),
        }
    }
}

/// The fields of an audit line the audit uses; see the gateway's audit.rs.
#[derive(serde::Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    ts: Cow<'a, str>,
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    peer: Cow<'a, str>,
    #[serde(borrow, default)]
    identity: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    serial: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    client_id: Option<Cow<'a, str>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Connected,
    Disconnected,
    Other,
}

/// A connection: the peer's address and port, and the identity. Not the
/// log it is in: a gateway's rotated files are several logs, and a
/// session may begin in one and end in the next.
type Connection = (String, Option<String>);
/// An open session's serial, start, log and holder.
type OpenSession = (Option<String>, OffsetDateTime, u16, Option<Holder>);
/// Who holds a broker session: the identity and the client id (each
/// instance of a scaled-out service has its own).
type Holder = (String, String);

struct Event {
    at: OffsetDateTime,
    log: u16,
    kind: Kind,
    peer: String,
    identity: Option<String>,
    serial: Option<String>,
    client_id: Option<String>,
}

/// Reads `logs` (a name for messages, and the reader), merges them in
/// time order and summarises them. Errors only if a reader fails.
pub fn read<R: Read>(logs: Vec<(String, R)>) -> std::io::Result<LogSummary> {
    let mut summary = LogSummary::default();
    let mut events: Vec<Event> = Vec::new();
    let names: Vec<String> = logs.iter().map(|(n, _)| n.clone()).collect();
    for (index, (name, reader)) in logs.into_iter().enumerate() {
        let log = u16::try_from(index).unwrap_or(u16::MAX);
        let mut damaged: Option<Damaged> = None;
        let mut buf = BufReader::new(reader);
        let mut number = 0u64;
        loop {
            // A line that is not UTF-8 is damage, not an I/O error.
            let mut bytes = Vec::new();
            if buf.read_until(b'\n', &mut bytes)? == 0 {
                break;
            }
            number += 1;
            let parsed = String::from_utf8(bytes)
                .map_err(|_| "not UTF-8".to_owned())
                .and_then(|text| parse(&text, log));
            match parsed {
                Ok(Some(e)) => events.push(e),
                Ok(None) => {}
                Err(why) => {
                    let d = damaged.get_or_insert_with(|| Damaged {
                        log: name.clone(),
                        lines: 0,
                        first_line: number,
                        first_error: why,
                    });
                    d.lines += 1;
                }
            }
        }
        summary.damaged.extend(damaged);
    }
    // Stable: events of one log at the same instant keep their order.
    events.sort_by_key(|e| e.at);
    summary.events = events.len() as u64;

    let mut open: HashMap<Connection, OpenSession> = HashMap::new();
    // Each holder's open connections.
    let mut held: HashMap<Holder, Vec<Connection>> = HashMap::new();
    for e in events {
        let sighting = || Sighting {
            at: e.at,
            peer: e.peer.clone(),
        };
        if let Some(i) = &e.identity {
            summary.by_identity.insert(i.clone(), sighting());
        }
        if let Some(s) = &e.serial {
            summary.by_serial.insert(s.clone(), sighting());
        }
        let key: Connection = (e.peer.clone(), e.identity.clone());
        let holder = e
            .identity
            .clone()
            .map(|i| (i, e.client_id.clone().unwrap_or_default()));
        match e.kind {
            Kind::Connected => {
                if let Some(s) = &e.serial {
                    summary.admissions.insert(
                        s.clone(),
                        Admission {
                            at: e.at,
                            serial: s.clone(),
                            peer: e.peer.clone(),
                            log: names.get(usize::from(e.log)).cloned().unwrap_or_default(),
                        },
                    );
                }
                // A second Connected on the same connection cannot happen;
                // if the logs say so, the first session ended unrecorded.
                if let Some((_, _, _, Some(old))) = open.remove(&key)
                    && let Some(list) = held.get_mut(&old)
                {
                    list.retain(|k| *k != key);
                }
                if let Some(holder) = holder.clone() {
                    let here = host(&e.peer);
                    let list = held.entry(holder.clone()).or_default();
                    let mut elsewhere: Vec<String> = list
                        .iter()
                        .map(|(p, _)| host(p))
                        .filter(|h| *h != here)
                        .collect();
                    elsewhere.sort();
                    elsewhere.dedup();
                    if !elsewhere.is_empty() {
                        let o = summary.overlaps.entry(holder.0).or_default();
                        o.times += 1;
                        for h in elsewhere {
                            let pair = if h < here {
                                (h.clone(), here.clone())
                            } else {
                                (here.clone(), h.clone())
                            };
                            let n = o.pairs.entry(pair).or_default();
                            *n += 1;
                            o.repeated = o.repeated.max(*n);
                            if !o.addresses.contains(&h) && o.addresses.len() < 16 {
                                o.addresses.push(h);
                            }
                        }
                        if !o.addresses.contains(&here) && o.addresses.len() < 16 {
                            o.addresses.push(here);
                        }
                    }
                    list.push(key.clone());
                }
                open.insert(key, (e.serial, e.at, e.log, holder));
            }
            Kind::Disconnected => {
                // The holder the session was opened with: a disconnect
                // line may lack the client id.
                if let Some((_, _, _, Some(old))) = open.remove(&key)
                    && let Some(list) = held.get_mut(&old)
                {
                    list.retain(|k| *k != key);
                }
            }
            Kind::Other => {}
        }
    }
    for ((peer, _), (serial, at, log, _)) in open {
        if let Some(serial) = serial {
            summary.open_at_end.push(Admission {
                at,
                serial,
                peer,
                log: names.get(usize::from(log)).cloned().unwrap_or_default(),
            });
        }
    }
    summary
        .open_at_end
        .sort_by(|a, b| (a.at, &a.peer).cmp(&(b.at, &b.peer)));
    Ok(summary)
}

/// One line; `None` for a blank one.
fn parse(text: &str, log: u16) -> Result<Option<Event>, String> {
    let text = text.trim_end_matches(['\n', '\r']);
    if text.trim().is_empty() {
        return Ok(None);
    }
    let line: Line<'_> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let at = OffsetDateTime::parse(&line.ts, &Rfc3339)
        .map_err(|e| format!("timestamp {:?}: {e}", clip(&line.ts)))?;
    let kind = match &*line.event {
        "connected" => Kind::Connected,
        "disconnected" => Kind::Disconnected,
        _ => Kind::Other,
    };
    Ok(Some(Event {
        at,
        log,
        kind,
        peer: line.peer.into_owned(),
        identity: line.identity.map(Cow::into_owned),
        serial: line.serial.map(Cow::into_owned),
        client_id: line.client_id.map(Cow::into_owned),
    }))
}

/// The address without its port: a device's port changes with every
/// connection, its address does not.
fn host(peer: &str) -> String {
    peer.parse::<SocketAddr>()
        .map_or_else(|_| peer.to_owned(), |a| a.ip().to_canonical().to_string())
}

fn clip(s: &str) -> &str {
    let mut end = s.len().min(40);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "spiffe://td/device/a";

    fn line(ts: &str, event: &str, peer: &str, identity: &str, serial: &str) -> String {
        format!(
            r#"{{"ts":"{ts}","event":"{event}","peer":"{peer}","identity":"{identity}","serial":"{serial}","subject":"CN=a"}}"#
        )
    }

    fn service_line(ts: &str, event: &str, peer: &str, client_id: &str) -> String {
        format!(
            r#"{{"ts":"{ts}","event":"{event}","peer":"{peer}","identity":"spiffe://td/service/ingest","client_id":"{client_id}"}}"#
        )
    }

    #[test]
    fn instances_of_a_service_are_not_overlaps() {
        let gw0 = [
            service_line(
                "2026-12-01T10:00:00Z",
                "connected",
                "10.0.0.1:1",
                "ingest-a",
            ),
            service_line(
                "2026-12-01T10:00:01Z",
                "connected",
                "10.0.0.2:1",
                "ingest-b",
            ),
        ];
        assert!(summary(&[&gw0]).overlaps.is_empty());
        // The same instance from two places is one.
        let gw1 = [
            service_line(
                "2026-12-01T10:00:00Z",
                "connected",
                "10.0.0.1:1",
                "ingest-a",
            ),
            service_line(
                "2026-12-01T10:00:01Z",
                "connected",
                "10.0.0.2:1",
                "ingest-a",
            ),
        ];
        assert_eq!(
            summary(&[&gw1]).overlaps["spiffe://td/service/ingest"].times,
            1
        );
    }

    #[test]
    fn a_clone_meets_the_same_address_again_and_a_roaming_device_does_not() {
        let t = |m: u32| format!("2026-12-01T10:{m:02}:00Z");
        // Roaming: each new network's connection arrives before the old one
        // timed out, and never goes back.
        let mut roam = Vec::new();
        for (m, net) in ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
            .iter()
            .enumerate()
        {
            let m = m as u32 * 10;
            roam.push(line(&t(m), "connected", &format!("{net}:1"), A, "01"));
            if m > 0 {
                let prev = format!("10.0.0.{}:1", m / 10);
                roam.push(line(&t(m + 1), "disconnected", &prev, A, ""));
            }
        }
        let o = &summary(&[&roam]).overlaps[A];
        assert_eq!((o.times, o.repeated), (3, 1));
        // A clone: two places taking the session from each other.
        let mut clone = Vec::new();
        for m in 0..6u32 {
            let here = if m % 2 == 0 { "10.0.0.1" } else { "192.0.2.9" };
            let there = if m % 2 == 0 { "192.0.2.9" } else { "10.0.0.1" };
            clone.push(line(
                &t(m * 2),
                "connected",
                &format!("{here}:{m}"),
                A,
                "01",
            ));
            if m > 0 {
                let prev = format!("{there}:{}", m - 1);
                clone.push(line(&t(m * 2 + 1), "disconnected", &prev, A, ""));
            }
        }
        let o = &summary(&[&clone]).overlaps[A];
        assert_eq!((o.times, o.repeated), (5, 5));
        assert_eq!(o.addresses, ["10.0.0.1", "192.0.2.9"]);
    }

    #[test]
    fn a_session_may_begin_in_one_rotated_file_and_end_in_the_next() {
        let old = [line(
            "2026-12-01T10:00:00Z",
            "connected",
            "10.0.0.1:1",
            A,
            "01",
        )];
        let new = [line(
            "2026-12-02T10:00:00Z",
            "disconnected",
            "10.0.0.1:1",
            A,
            "",
        )];
        let s = summary(&[&old, &new]);
        assert!(s.open_at_end.is_empty(), "{:?}", s.open_at_end);
        // An IPv4 client seen through an IPv6 socket is the same address.
        assert_eq!(host("[::ffff:10.0.0.1]:5"), "10.0.0.1");
    }

    fn summary(logs: &[&[String]]) -> LogSummary {
        read(
            logs.iter()
                .enumerate()
                .map(|(i, lines)| {
                    let mut text = lines.join("\n");
                    text.push('\n');
                    (format!("gw-{i}.jsonl"), std::io::Cursor::new(text))
                })
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn two_gateways_at_once_from_two_addresses_is_an_overlap() {
        let gw0 = [
            line(
                "2026-12-01T10:00:00Z",
                "connected",
                "10.0.0.1:4000",
                A,
                "01",
            ),
            line(
                "2026-12-01T10:05:00Z",
                "disconnected",
                "10.0.0.1:4000",
                A,
                "",
            ),
        ];
        let gw1 = [line(
            "2026-12-01T10:01:00Z",
            "connected",
            "10.0.0.2:5000",
            A,
            "01",
        )];
        let s = summary(&[&gw0, &gw1]);
        assert_eq!(s.events, 3);
        let o = &s.overlaps[A];
        assert_eq!(o.times, 1);
        assert_eq!(o.addresses, ["10.0.0.1", "10.0.0.2"]);
        // The second session is still open at the end.
        assert_eq!(s.open_at_end.len(), 1);
        assert_eq!(s.open_at_end[0].peer, "10.0.0.2:5000");
        assert_eq!(s.open_at_end[0].log, "gw-1.jsonl");
    }

    #[test]
    fn reconnects_in_turn_or_from_one_address_are_no_overlap() {
        let gw0 = [
            line(
                "2026-12-01T10:00:00Z",
                "connected",
                "10.0.0.1:4000",
                A,
                "01",
            ),
            line(
                "2026-12-01T10:01:00Z",
                "disconnected",
                "10.0.0.1:4000",
                A,
                "",
            ),
            line(
                "2026-12-01T10:02:00Z",
                "connected",
                "10.0.0.2:4001",
                A,
                "01",
            ),
            // A takeover from the same address: the old connection is
            // still open when the new one connects.
            line(
                "2026-12-01T10:03:00Z",
                "connected",
                "10.0.0.2:4002",
                A,
                "01",
            ),
            line(
                "2026-12-01T10:03:00Z",
                "disconnected",
                "10.0.0.2:4001",
                A,
                "",
            ),
            line(
                "2026-12-01T10:04:00Z",
                "disconnected",
                "10.0.0.2:4002",
                A,
                "",
            ),
        ];
        let s = summary(&[&gw0]);
        assert!(s.overlaps.is_empty(), "{:?}", s.overlaps);
        assert!(s.open_at_end.is_empty());
        assert_eq!(s.admissions["01"].peer, "10.0.0.2:4002");
        assert_eq!(s.by_identity[A].peer, "10.0.0.2:4002");
    }

    #[test]
    fn damaged_lines_are_counted_and_the_rest_still_read() {
        let gw0 = [
            "{not json".to_owned(),
            line("2026-12-01T10:00:00Z", "connected", "10.0.0.1:4000", A, "01"),
            line("yesterday", "connected", "10.0.0.1:4001", A, "01"),
            String::new(),
            r#"{"ts":"2026-12-01T10:00:00Z","event":"refused","peer":"10.0.0.9:1","reason":"expired","serial":"02"}"#.to_owned(),
        ];
        let s = summary(&[&gw0]);
        assert_eq!(s.events, 2);
        assert_eq!(s.damaged.len(), 1);
        let d = &s.damaged[0];
        assert_eq!((d.lines, d.first_line), (2, 1));
        assert!(d.first_error.contains("key must be a string"), "{d}");
        // A refusal names the certificate it saw.
        assert_eq!(s.by_serial["02"].peer, "10.0.0.9:1");
        assert_eq!(s.last_seen(None, "02").unwrap().peer, "10.0.0.9:1");
    }

    #[test]
    fn bytes_that_are_not_utf8_are_damage_not_an_error() {
        let mut text = line(
            "2026-12-01T10:00:00Z",
            "connected",
            "10.0.0.1:4000",
            A,
            "01",
        );
        text.push('\n');
        let mut bytes = vec![0xff, 0xfe, b'\n'];
        bytes.extend_from_slice(text.as_bytes());
        let s = read(vec![("x".to_owned(), std::io::Cursor::new(bytes))]).unwrap();
        assert_eq!(s.events, 1);
        assert_eq!(s.damaged[0].first_error, "not UTF-8");
    }
}
