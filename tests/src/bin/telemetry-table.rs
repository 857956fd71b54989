//! `telemetry-table FILE`: a table of the devices whose telemetry is in
//! FILE, one row per device with its message count, last sequence number,
//! gaps and latest readings. FILE holds `mosquitto_sub -F '%t %x'` lines
//! (topic, space, the payload in hex). The demo redraws it while devices
//! publish. Every reading is shown, in its unit (bytes, seconds, °C),
//! wrapped to the terminal's width (`COLUMNS`, default 100).

use std::collections::BTreeMap;
use std::process::ExitCode;

use twofold_protocol::message::{self, Telemetry, Value};

#[derive(Default)]
struct Row {
    messages: u64,
    /// Sequence numbers seen, for gaps and duplicates.
    seqs: std::collections::BTreeSet<u64>,
    last_seq: u64,
    readings: String,
    undecodable: u64,
}

fn main() -> ExitCode {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: telemetry-table FILE  (lines from mosquitto_sub -F '%t %x')");
        return ExitCode::from(2);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("telemetry-table: {}: {e}", path.to_string_lossy());
            return ExitCode::from(1);
        }
    };
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for line in text.lines() {
        let Some((topic, hex_payload)) = line.split_once(' ') else {
            continue;
        };
        let Some(device) = topic
            .strip_prefix("devices/")
            .and_then(|t| t.strip_suffix("/telemetry"))
        else {
            continue;
        };
        let row = rows.entry(device.to_string()).or_default();
        row.messages += 1;
        let decoded = hex::decode(hex_payload.trim()).ok();
        match decoded.as_deref().map(message::decode::<Telemetry>) {
            Some(Ok(t)) => {
                row.seqs.insert(t.seq);
                row.last_seq = t.seq;
                row.readings = t
                    .readings
                    .iter()
                    .map(|r| show(r.name, r.value))
                    .collect::<Vec<_>>()
                    .join("  ");
            }
            _ => row.undecodable += 1,
        }
    }
    let width = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse::<usize>().ok())
        .filter(|w| *w >= 60)
        .unwrap_or(100);
    println!(
        "  {:<10} {:>5} {:>6} {:>5}  LATEST READINGS",
        "DEVICE", "MSGS", "SEQ", "GAPS"
    );
    for (device, row) in &rows {
        // Missing sequence numbers between the first and last seen.
        let gaps = match (row.seqs.first(), row.seqs.last()) {
            (Some(first), Some(last)) => last - first + 1 - row.seqs.len() as u64,
            _ => 0,
        };
        let mut readings = row.readings.clone();
        if row.undecodable > 0 {
            readings.push_str(&format!("  ({} not telemetry)", row.undecodable));
        }
        let lead = format!(
            "  {:<10} {:>5} {:>6} {:>5}  ",
            device, row.messages, row.last_seq, gaps
        );
        for (i, line) in wrap(&readings, width.saturating_sub(lead.len()))
            .iter()
            .enumerate()
        {
            let lead = if i == 0 {
                lead.clone()
            } else {
                " ".repeat(lead.len())
            };
            println!("{lead}{line}");
        }
    }
    if rows.is_empty() {
        println!("  (no telemetry yet)");
    }
    ExitCode::SUCCESS
}

/// `name=value` in the unit the name's suffix gives: `_bytes`, `_s`,
/// `_ms`, `_c` (the agents' naming convention); anything else as it is.
fn show(name: &str, v: Value) -> String {
    let number = match v {
        Value::Int(i) => i as f64,
        Value::Float(f) => f,
        Value::Bool(b) => return format!("{name}={b}"),
    };
    let raw = || match v {
        Value::Float(f) => format!("{f:.2}"),
        _ => format!("{number}"),
    };
    if let Some(base) = name.strip_suffix("_bytes") {
        format!("{base}={}", bytes(number))
    } else if let Some(base) = name.strip_suffix("_ms") {
        format!("{base}={}", duration(number / 1000.0))
    } else if let Some(base) = name.strip_suffix("_s") {
        format!("{base}={}", duration(number))
    } else if let Some(base) = name.strip_suffix("_c") {
        format!("{base}={number:.1}°C")
    } else {
        format!("{name}={}", raw())
    }
}

fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut n = n;
    let mut unit = 0;
    while n.abs() >= 1024.0 && unit < UNITS.len() - 1 {
        n /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n:.0}{}", UNITS[0])
    } else {
        format!("{n:.1}{}", UNITS[unit])
    }
}

fn duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Splits `text` at double spaces into lines of at most `width` (a single
/// item longer than that gets a line of its own).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for item in text.split("  ").filter(|i| !i.is_empty()) {
        let line = lines.last_mut().expect("never empty");
        if !line.is_empty() && line.chars().count() + 2 + item.chars().count() > width {
            lines.push(item.to_owned());
        } else {
            if !line.is_empty() {
                line.push_str("  ");
            }
            line.push_str(item);
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_shown_in_their_units() {
        assert_eq!(
            show("mem_total_bytes", Value::Int(8 << 30)),
            "mem_total=8.0GiB"
        );
        assert_eq!(show("net_rx_bytes", Value::Int(512)), "net_rx=512B");
        assert_eq!(show("uptime_s", Value::Int(3 * 3600 + 125)), "uptime=3h02m");
        assert_eq!(show("uptime_ms", Value::Int(42_000)), "uptime=42s");
        assert_eq!(show("cpu_temp_c", Value::Float(48.31)), "cpu_temp=48.3°C");
        assert_eq!(show("load_1", Value::Float(0.5)), "load_1=0.50");
        assert_eq!(show("door_open", Value::Bool(true)), "door_open=true");
        assert_eq!(show("count", Value::Int(-3)), "count=-3");
    }

    #[test]
    fn long_readings_wrap_without_losing_any() {
        let text = "a=1  bb=22  ccc=333  dddd=4444";
        assert_eq!(wrap(text, 12), ["a=1  bb=22", "ccc=333", "dddd=4444"]);
        assert_eq!(wrap(text, 100), [text]);
        assert_eq!(wrap("", 10), [""]);
        assert_eq!(wrap("much-too-long=1  b=2", 5), ["much-too-long=1", "b=2"]);
    }
}
