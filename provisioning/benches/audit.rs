//! How long `provisioning audit` takes at fleet size.
//!
//! Builds a registry of `--entries` certificates for `--devices` devices
//! (each device's renewal history: superseded certificates, then its
//! current one), and a day of audit log from those devices (a session an
//! hour each, a few refusals, a few clones), then times the release
//! binary's `audit --json` on them three times: wall time, CPU and peak
//! memory.
//!
//!     cargo build --release -p twofold-provisioning --bin provisioning
//!     cargo bench -p twofold-provisioning --bench audit -- --entries 100000 --devices 10000

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{CertificateParams, KeyPair};
use time::OffsetDateTime;
use twofold_protocol::TrustDomain;
use twofold_provisioning::registry::{
    CertRecord, Kind, Revocation, RevocationReason, SqliteStore, Store, StoreTx,
};
use twofold_provisioning::{Pki, Serial};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn main() {
    let entries = arg("--entries", 100_000);
    let devices = arg("--devices", 10_000).min(entries);
    let binary = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/provisioning");
    assert!(
        binary.exists(),
        "build it first: cargo build --release -p twofold-provisioning --bin provisioning"
    );
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    Pki::init(&pki, TrustDomain::parse("bench.example").unwrap(), None).unwrap();

    let start = Instant::now();
    let names = registry(&pki.join("registry.db"), entries, devices);
    println!(
        "registry: {entries} certificates for {devices} devices, built in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let log = dir.path().join("audit.jsonl");
    let lines = day_of_log(&log, &names);
    let size = std::fs::metadata(&log).unwrap().len();
    println!(
        "audit log: {lines} events ({:.0} MB), a day of {devices} devices",
        size as f64 / 1e6
    );
    println!("({} cores, {})", cores(), std::env::consts::ARCH);
    println!("| run | wall s | CPU s | peak RSS MiB | findings |");
    println!("|---|---|---|---|---|");
    for run in 1..=3 {
        let (wall, cpu, rss, out) = timed(
            Command::new(&binary)
                .arg("--pki")
                .arg(&pki)
                .args(["audit", "--json", "--fail-on", "critical", "--audit-log"])
                .arg(&log),
        );
        let report: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
        let found: Vec<String> = report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                format!(
                    "{} {}",
                    f["check"].as_str().unwrap(),
                    f["affected"].as_array().unwrap().len()
                )
            })
            .collect();
        println!(
            "| {run} | {wall:.2} | {cpu:.2} | {:.0} | {} |",
            rss as f64 / 1024.0,
            found.join(", ")
        );
    }
}

/// Fills the registry; returns the device names.
fn registry(path: &Path, entries: usize, devices: usize) -> Vec<String> {
    let now = OffsetDateTime::now_utc();
    let day = time::Duration::DAY;
    let mut store = SqliteStore::open(path).unwrap();
    let tx = store.begin().unwrap();
    let names: Vec<String> = (0..devices).map(|i| format!("dev-{i:06}")).collect();
    for i in 0..entries {
        let device = i % devices;
        let generation = i / devices;
        let generations = entries / devices + usize::from(device < entries % devices);
        let current = generation + 1 == generations;
        let name = &names[device];
        // Current certificates: 90 days, issued 0 to 89 days ago, so a
        // third are past their renewal time. Older ones: superseded.
        let age = day * ((device % 90) as i32) + day * 90 * (generations - 1 - generation) as i32;
        let from = now - age;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.not_before = from;
        params.not_after = from + day * 90;
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let record = CertRecord {
            serial: Serial::random(),
            kind: Kind::Device,
            name: name.clone(),
            identity: Some(format!("spiffe://bench.example/device/{name}")),
            not_before: from,
            not_after: from + day * 90,
            fingerprint: twofold_provisioning::pki::fingerprint(&der),
            issued_at: from,
            revocation: (!current).then_some(Revocation {
                at: from + day * 60,
                reason: RevocationReason::Superseded,
            }),
            der,
            replaces: None,
        };
        tx.insert(&record).unwrap();
    }
    tx.commit().unwrap();
    names
}

/// A day of gateway audit log: every device connects once an hour and
/// disconnects; one in a hundred is refused once; ten are cloned.
fn day_of_log(path: &Path, names: &[String]) -> usize {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let start = OffsetDateTime::now_utc() - time::Duration::DAY;
    let mut events: Vec<(i64, String)> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let ip = format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256);
        let identity = format!("spiffe://bench.example/device/{name}");
        let fields = format!(
            r#""identity":"{identity}","client_id":"{name}","subject":"CN={name}","serial":"{i:032x}","fingerprint":"{:064x}""#,
            i
        );
        for hour in 0..24i64 {
            let t = hour * 3600 + (i as i64 % 3600);
            let peer = format!("{ip}:{}", 40000 + hour);
            events.push((
                t,
                format!(r#""event":"connected","peer":"{peer}",{fields}"#),
            ));
            let end = if i < 10 && hour % 2 == 1 { 3599 } else { 3000 };
            events.push((
                t + end,
                format!(r#""event":"disconnected","peer":"{peer}","identity":"{identity}","client_id":"{name}""#),
            ));
            if i < 10 && hour % 2 == 0 {
                // A clone elsewhere, while the device is connected.
                let peer = format!("192.0.2.{i}:{}", 50000 + hour);
                events.push((
                    t + 60,
                    format!(r#""event":"connected","peer":"{peer}",{fields}"#),
                ));
                events.push((t + 120, format!(r#""event":"disconnected","peer":"{peer}","identity":"{identity}","client_id":"{name}""#)));
            }
        }
        if i % 100 == 0 {
            events.push((
                (i as i64 * 7) % 86_400,
                format!(
                    r#""event":"refused","reason":"expired","detail":"certificate expired","peer":"{ip}:39999","serial":"{:032x}""#,
                    i + 1_000_000
                ),
            ));
        }
    }
    events.sort_by_key(|(t, _)| *t);
    let format = time::format_description::well_known::Rfc3339;
    for (t, rest) in &events {
        let ts = (start + time::Duration::seconds(*t) + time::Duration::microseconds(123))
            .format(&format)
            .unwrap();
        writeln!(out, r#"{{"ts":"{ts}",{rest}}}"#).unwrap();
    }
    out.flush().unwrap();
    events.len()
}

/// Runs `cmd`, sampling its CPU time and peak RSS from /proc until it
/// exits; returns wall seconds, CPU seconds, peak RSS KiB and stdout.
fn timed(cmd: &mut Command) -> (f64, f64, u64, Vec<u8>) {
    let start = Instant::now();
    let stdout = tempfile::NamedTempFile::new().unwrap();
    let mut child = cmd
        .stdout(stdout.reopen().unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id();
    let ticks = 100.0; // USER_HZ on Linux
    let (mut cpu, mut rss) = (0.0, 0);
    loop {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Some(rest) = stat.rsplit(')').next()
        {
            let f: Vec<&str> = rest.split_whitespace().collect();
            if let (Some(u), Some(s)) = (f.get(11), f.get(12)) {
                let t = u.parse::<f64>().unwrap_or(0.0) + s.parse::<f64>().unwrap_or(0.0);
                cpu = f64::max(cpu, t / ticks);
            }
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            && let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:"))
        {
            let kib = line.split_whitespace().nth(1).and_then(|v| v.parse().ok());
            rss = rss.max(kib.unwrap_or(0));
        }
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.code().is_some_and(|c| c == 0 || c == 2), "{status}");
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let wall = start.elapsed().as_secs_f64();
    (wall, cpu, rss, std::fs::read(stdout.path()).unwrap())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
