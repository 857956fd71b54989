//! System metrics as `protocol` telemetry.

use std::path::Path;

use sysinfo::{Disks, Networks, System};
use twofold_protocol::message::{self, Reading, Telemetry, Value};

use crate::config::Format;

/// Collects the readings; keeps sysinfo's state between samples.
pub struct Sampler {
    system: System,
    disks: Disks,
    networks: Networks,
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler {
            system: System::new(),
            disks: Disks::new_with_refreshed_list(),
            networks: Networks::new_with_refreshed_list(),
        }
    }
}

/// The CPU temperature, from the first thermal zone (where the Raspberry
/// Pi's SoC sensor is). `None` where the board has no thermal zone.
fn cpu_temp_c(thermal: &Path) -> Option<f64> {
    let milli: i64 = std::fs::read_to_string(thermal.join("thermal_zone0/temp"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(milli as f64 / 1000.0)
}

impl Sampler {
    /// One sample of every reading this board has.
    pub fn sample(&mut self) -> Vec<Reading<'static>> {
        self.system.refresh_memory();
        self.disks.refresh(true);
        self.networks.refresh(true);
        let load = System::load_average();
        let mut r = vec![
            reading_f("load_1", load.one),
            reading_f("load_5", load.five),
            reading_f("load_15", load.fifteen),
            reading_i("mem_total_bytes", self.system.total_memory()),
            reading_i("mem_available_bytes", self.system.available_memory()),
            reading_i("uptime_s", System::uptime()),
        ];
        if let Some(t) = cpu_temp_c(Path::new("/sys/class/thermal")) {
            r.push(reading_f("cpu_temp_c", t));
        }
        if let Some(root) = self
            .disks
            .list()
            .iter()
            .find(|d| d.mount_point() == Path::new("/"))
        {
            r.push(reading_i("disk_root_total_bytes", root.total_space()));
            r.push(reading_i(
                "disk_root_available_bytes",
                root.available_space(),
            ));
        }
        let (rx, tx) = self
            .networks
            .list()
            .iter()
            .filter(|(name, _)| name.as_str() != "lo")
            .fold((0u64, 0u64), |(rx, tx), (_, n)| {
                (rx + n.total_received(), tx + n.total_transmitted())
            });
        r.push(reading_i("net_rx_bytes", rx));
        r.push(reading_i("net_tx_bytes", tx));
        r
    }
}

fn reading_f(name: &'static str, v: f64) -> Reading<'static> {
    Reading {
        name,
        value: Value::Float(v),
    }
}

fn reading_i(name: &'static str, v: u64) -> Reading<'static> {
    Reading {
        name,
        value: Value::Int(i64::try_from(v).unwrap_or(i64::MAX)),
    }
}

/// Encodes a telemetry message. Readings beyond the protocol's maximum are
/// left out (there are far fewer).
pub fn encode(seq: u64, time_ms: Option<u64>, readings: &[Reading<'_>], format: Format) -> Vec<u8> {
    let mut t = Telemetry {
        seq,
        time_ms,
        readings: heapless::Vec::new(),
    };
    for r in readings {
        if t.readings.push(*r).is_err() {
            break;
        }
    }
    match format {
        Format::Json => serde_json::to_vec(&t).unwrap_or_default(),
        Format::Postcard => {
            let mut buf = [0u8; 2048];
            message::encode(&t, &mut buf)
                .map(|b| b.to_vec())
                .unwrap_or_default()
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> Option<u64> {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_encodes_and_decodes() {
        let readings = Sampler::default().sample();
        assert!(readings.iter().any(|r| r.name == "mem_total_bytes"));
        let bytes = encode(7, Some(1), &readings, Format::Postcard);
        let t: Telemetry = message::decode(&bytes).unwrap();
        assert_eq!(t.seq, 7);
        assert_eq!(t.readings.len(), readings.len());
        let json = encode(7, Some(1), &readings, Format::Json);
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["seq"], 7);
    }
}
