//! `telemetry-table FILE`: a table of the devices whose telemetry is in
//! FILE, one row per device with its message count, last sequence number,
//! gaps and latest readings. FILE holds `mosquitto_sub -F '%t %x'` lines
//! (topic, space, the payload in hex). The demo redraws it while devices
//! publish.

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
                    .take(4)
                    .map(|r| format!("{}={}", r.name, show(r.value)))
                    .collect::<Vec<_>>()
                    .join("  ");
            }
            _ => row.undecodable += 1,
        }
    }
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
        println!(
            "  {:<10} {:>5} {:>6} {:>5}  {}",
            device, row.messages, row.last_seq, gaps, readings
        );
    }
    if rows.is_empty() {
        println!("  (no telemetry yet)");
    }
    ExitCode::SUCCESS
}

fn show(v: Value) -> String {
    match v {
        Value::Int(i) => i.to_string(),
        Value::Float(f) => format!("{f:.1}"),
        Value::Bool(b) => b.to_string(),
    }
}
