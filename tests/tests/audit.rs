//! `provisioning audit` against a real gateway: its audit log and its
//! `/metrics`, with a fleet that has each fault and one that has none.

use std::process::{Child, Output};
use std::time::{Duration, Instant};

use twofold_protocol::{DeviceId, Principal};
use twofold_provisioning::RevokeTarget;
use twofold_provisioning::registry::RevocationReason;
use twofold_tests::*;

/// `provisioning audit` on the fleet with the gateway's log and metrics.
fn audit(fleet: &Fleet, gw: &Gateway, metrics: u16, extra: &[&str]) -> Output {
    let mut cmd = fleet.provisioning();
    cmd.arg("audit")
        .arg("--audit-log")
        .arg(&gw.audit)
        .args(["--gateway", &format!("http://127.0.0.1:{metrics}")])
        .args(extra);
    run_bounded(cmd, 60)
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// check name → names affected.
fn found(report: &serde_json::Value) -> std::collections::BTreeMap<String, Vec<String>> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let names = f["affected"].as_array().unwrap();
            (
                f["check"].as_str().unwrap().to_owned(),
                names
                    .iter()
                    .map(|a| a["name"].as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect()
}

/// A device's session from `source` (a loopback address), held open.
fn hold(fleet: &Fleet, gw: &Gateway, who: &Identity, id: &str, source: &str) -> Child {
    mosquitto_sub(
        fleet,
        gw,
        who,
        &[
            "-i",
            id,
            "-A",
            source,
            "-t",
            &format!("devices/{id}/commands"),
        ],
    )
}

fn connections(gw: &Gateway, id: &str) -> usize {
    gw.events()
        .iter()
        .filter(|e| e["event"] == "connected" && e["client_id"] == id)
        .count()
}

/// Waits for `id`'s `n`th connection in the audit log.
fn wait_connections(gw: &Gateway, id: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while connections(gw, id) < n {
        assert!(
            Instant::now() < deadline,
            "{id}: {} connections of {n}; audit:\n{:#?}",
            connections(gw, id),
            gw.events()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_audit_finds_clones_stale_crls_and_revoked_sessions_and_nothing_in_a_healthy_fleet() {
    let mut fleet = Fleet::new();
    let healthy = fleet.device("sensor-1");
    let twin = fleet.device("twin");
    let stolen = fleet.device("stolen");
    let metrics = free_port();
    let gw = Gateway::start(&fleet, &format!("metrics = \"127.0.0.1:{metrics}\""));

    // Healthy: one device connected, the gateway on the registry's CRL.
    let mut sensor = hold(&fleet, &gw, &healthy, "sensor-1", "127.0.0.1");
    wait_connections(&gw, "sensor-1", 1);
    let metrics_out = fleet.path("audit.prom");
    let out = audit(
        &fleet,
        &gw,
        metrics,
        &[
            "--fail-on",
            "info",
            "--metrics-out",
            metrics_out.to_str().unwrap(),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("nothing found"), "{text}");
    assert!(text.contains("1 gateway(s)"), "{text}");
    let gauges = std::fs::read_to_string(&metrics_out).unwrap();
    assert!(
        gauges.contains(r#"twofold_audit_findings{check="cloned-certificate",severity="high"} 0"#),
        "{gauges}"
    );

    // A clone: twin's certificate from 127.0.0.1 and 127.0.0.2 in turn,
    // each connection taking the other's session over.
    let mut clones = Vec::new();
    for round in 0..4 {
        let source = if round % 2 == 0 {
            "127.0.0.1"
        } else {
            "127.0.0.2"
        };
        clones.push(hold(&fleet, &gw, &twin, "twin", source));
        wait_connections(&gw, "twin", round + 1);
    }

    // Revoked in the registry, but the gateway was not given the CRL:
    // the session stays, and a reconnect is admitted.
    let mut thief = hold(&fleet, &gw, &stolen, "stolen", "127.0.0.3");
    wait_connections(&gw, "stolen", 1);
    fleet
        .pki
        .revoke(
            RevokeTarget::Principal(Principal::Device(DeviceId::parse("stolen").unwrap())),
            RevocationReason::KeyCompromise,
        )
        .unwrap();
    // The registry's times are whole seconds; the audit log's are not.
    std::thread::sleep(Duration::from_millis(1100));
    let mut again = hold(&fleet, &gw, &stolen, "stolen", "127.0.0.3");
    wait_connections(&gw, "stolen", 2);

    let out = audit(&fleet, &gw, metrics, &["--json", "--crl-grace", "0s"]);
    assert_eq!(out.status.code(), Some(2), "critical findings exit 2");
    let report = json(&out);
    let f = found(&report);
    assert_eq!(f["cloned-certificate"], ["twin"], "{report:#}");
    assert_eq!(f["revoked-admitted"], ["stolen"], "{report:#}");
    assert_eq!(f["revoked-still-connected"], ["stolen"], "{report:#}");
    let stale = &f["stale-crl"];
    assert_eq!(stale, &[format!("http://127.0.0.1:{metrics}/metrics")]);
    assert!(!f.contains_key("simultaneous-use"), "{report:#}");
    let clone = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "cloned-certificate")
        .unwrap();
    let detail = clone["affected"][0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("127.0.0.1") && detail.contains("127.0.0.2"),
        "{detail}"
    );
    assert_eq!(clone["severity"], "high");

    // The gateway gets the CRL: it closes the session and catches up.
    fleet.publish_crl();
    gw.wait_for(|e| e["event"] == "disconnected" && e["client_id"] == "stolen")
        .expect("the revoked session closed");
    let deadline = Instant::now() + Duration::from_secs(15);
    let report = loop {
        let report = json(&audit(
            &fleet,
            &gw,
            metrics,
            &["--json", "--crl-grace", "0s"],
        ));
        if !found(&report).contains_key("stale-crl") || Instant::now() > deadline {
            break report;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let f = found(&report);
    assert!(!f.contains_key("stale-crl"), "{report:#}");
    assert!(!f.contains_key("revoked-still-connected"), "{report:#}");
    // What happened stays in the log.
    assert_eq!(f["revoked-admitted"], ["stolen"]);

    // A policy whose rule opens every device's subtree to devices.
    let policy = fleet.path("policy.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nname = \"peek\"\napplies_to = [\"devices\"]\nsubscribe = [\"devices/+/telemetry\"]\n",
    )
    .unwrap();
    let mut cmd = fleet.provisioning();
    cmd.args(["audit", "--json", "--policy"]).arg(&policy);
    let report = json(&run_bounded(cmd, 60));
    assert_eq!(
        found(&report)["policy-broad"],
        ["rule \"peek\""],
        "{report:#}"
    );

    // A gateway that cannot be read is medium: under the default
    // --fail-on high it does not fail the run by itself.
    let closed = free_port();
    let mut cmd = fleet.provisioning();
    cmd.args(["audit", "--gateway", &format!("http://127.0.0.1:{closed}")]);
    let out = run_bounded(cmd, 60);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("MEDIUM    gateway-unreadable"), "{text}");
    let mut cmd = fleet.provisioning();
    cmd.args(["audit", "--fail-on", "medium", "--gateway"])
        .arg(format!("http://127.0.0.1:{closed}"));
    assert_eq!(run_bounded(cmd, 60).status.code(), Some(2));

    // An audit log that is not there is an error (1), not a clean audit.
    let mut cmd = fleet.provisioning();
    cmd.args(["audit", "--audit-log"])
        .arg(fleet.path("missing.jsonl"));
    let out = run_bounded(cmd, 60);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read the audit log"),
        "{out:?}"
    );

    for c in clones
        .iter_mut()
        .chain([&mut sensor, &mut thief, &mut again])
    {
        let _ = c.kill();
        let _ = c.wait();
    }
}
