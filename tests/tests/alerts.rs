//! The Prometheus alerting rules shipped in deploy/prometheus: valid,
//! each alert tested by promtool from both sides, and every metric they
//! read really exported by the gateway or the audit.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use twofold_tests::*;

fn rules_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

fn promtool(args: &[&str]) -> String {
    let mut cmd = Command::new("promtool");
    cmd.args(args).current_dir(rules_dir());
    let out = run_bounded(cmd, 60);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let checked = promtool(&["check", "rules", "twofold.rules.yml"]);
    assert!(checked.contains("SUCCESS: 11 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "twofold.rules.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// Metric names in an exposition page.
fn names(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_metric_the_rules_read_is_exported() {
    let fleet = Fleet::new();
    let port = free_port();
    let _gw = Gateway::start(&fleet, &format!("metrics = \"127.0.0.1:{port}\""));
    let (_, page) = http_get(format!("127.0.0.1:{port}").parse().unwrap(), "/metrics");
    let gauges = fleet.path("audit.prom");
    let mut cmd = fleet.provisioning();
    cmd.args(["audit", "--metrics-out"]).arg(&gauges);
    assert_eq!(run_bounded(cmd, 60).status.code(), Some(0));
    let mut exported = names(&page);
    exported.extend(names(&std::fs::read_to_string(&gauges).unwrap()));

    let rules = std::fs::read_to_string(rules_dir().join("twofold.rules.yml")).unwrap();
    let used: BTreeSet<String> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("twofold_") && !w.ends_with('_'))
        .map(str::to_owned)
        .collect();
    assert!(used.len() >= 8, "{used:?}");
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "not exported: {missing:?}\n{exported:?}"
    );
}
