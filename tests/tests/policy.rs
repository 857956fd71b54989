//! The topic policy file with real clients: a group broadcast, a service
//! limited to a group, a reload that is refused and one that is taken, and
//! a gateway that does not start on a broken file.

use std::process::Command;

use twofold_tests::*;

const POLICY: &str = r#"
[builtin]
services = false

[[rule]]
name = "pumps-broadcast"
applies_to = ["group:pumps"]
subscribe = ["groups/{group}/commands"]

[[rule]]
name = "ops-broadcasts"
applies_to = ["service:ops"]
publish = ["groups/+/commands"]
subscribe = ["devices/+/#"]

[[rule]]
name = "pump-control"
applies_to = ["service:pump-control"]
publish = ["devices/{member:pumps}/commands"]
"#;

const GROUPS: &str = r#"
[groups]
pumps = ["device:pump-1", "device:pump-2"]
"#;

/// mosquitto_pub of "x" to `topic` as `client_id`; the gateway's audit
/// says whether it was refused.
fn publish(fleet: &Fleet, gw: &Gateway, who: &Identity, client_id: &str, topic: &str) {
    mosquitto_pub(
        fleet,
        gw,
        Some(who),
        &["-i", client_id, "-q", "1", "-t", topic, "-m", "x"],
    );
}

fn denials(gw: &Gateway, client_id: &str) -> Vec<String> {
    gw.events()
        .iter()
        .filter(|e| e["reason"] == "policy_denied" && e["client_id"] == client_id)
        .map(|e| e["detail"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn groups_broadcast_and_limit_and_a_broken_reload_keeps_the_policy() {
    let mut fleet = Fleet::new();
    let pump = fleet.device("pump-1");
    let valve = fleet.device("valve-1");
    let ops = fleet.service("ops");
    let control = fleet.service("pump-control");
    let policy = fleet.path("policy.toml");
    let groups = fleet.path("groups.toml");
    std::fs::write(&policy, POLICY).unwrap();
    std::fs::write(&groups, GROUPS).unwrap();
    let gw = Gateway::start(&fleet, &format!("policy = {policy:?}\ngroups = {groups:?}"));
    let port = gw.addr.port();

    // Broadcast: pump-1 (in pumps) hears ops on groups/pumps/commands.
    let sub = Sub::start_tls(
        &fleet,
        port,
        &pump,
        "pump-1",
        &[
            "-i",
            "pump-1",
            "-q",
            "1",
            "-t",
            "groups/pumps/commands",
            "-t",
            "devices/pump-1/commands",
        ],
    );
    publish(&fleet, &gw, &ops, "ops", "groups/pumps/commands");
    assert!(
        wait_until(15, || sub
            .messages()
            .iter()
            .any(|(t, _)| t == "groups/pumps/commands")),
        "no broadcast arrived; audit:\n{:#?}",
        gw.events()
    );
    // valve-1 is not in pumps: its subscription is refused, by rule.
    finish(
        mosquitto_sub(
            &fleet,
            &gw,
            &valve,
            &["-i", "valve-1", "-t", "groups/pumps/commands", "-W", "3"],
        ),
        10,
    );
    let d = denials(&gw, "valve-1");
    assert!(
        d.iter().any(|d| d.contains("groups/pumps/commands")
            && d.contains("outside the identity's own topics")),
        "{d:?}"
    );

    // pump-control may command pumps only; the built-in service rule is off.
    publish(
        &fleet,
        &gw,
        &control,
        "pump-control",
        "devices/pump-1/commands",
    );
    assert!(
        wait_until(15, || sub
            .messages()
            .iter()
            .any(|(t, _)| t == "devices/pump-1/commands")),
        "pump-control's command did not arrive; audit:\n{:#?}",
        gw.events()
    );
    publish(
        &fleet,
        &gw,
        &control,
        "pump-control",
        "devices/valve-1/commands",
    );
    gw.wait_for(|e| e["reason"] == "policy_denied" && e["client_id"] == "pump-control")
        .expect("pump-control refused for valve-1");
    assert!(
        denials(&gw, "pump-control")
            .iter()
            .any(|d| d.contains("devices/valve-1/commands")
                && d.contains("no rule of the policy grants this")),
        "{:?}",
        denials(&gw, "pump-control")
    );

    // A broken policy is refused; the one in force stays: pump-1 may still
    // subscribe to the broadcast.
    std::fs::write(
        &policy,
        format!(
            "{POLICY}\n[[rule]]\nname = \"oops\"\napplies_to = [\"everyone\"]\npublish = [\"a\"]\n"
        ),
    )
    .unwrap();
    assert!(
        wait_until(15, || gw.log().contains("REFUSED the new topic policy")),
        "{}",
        gw.log()
    );
    assert!(gw.log().contains("rule 4 (\"oops\")"), "{}", gw.log());
    let again = Sub::start_tls(
        &fleet,
        port,
        &pump,
        "pump-1b",
        &["-i", "pump-1", "-t", "groups/pumps/commands"],
    );
    drop(again);
    assert!(
        denials(&gw, "pump-1").is_empty(),
        "{:?}",
        denials(&gw, "pump-1")
    );

    // A good one is taken: without the broadcast rule, pump-1 is refused.
    // First a live session of pump-1, subscribed under the policy in force.
    drop(sub);
    let live = Sub::start_tls(
        &fleet,
        port,
        &pump,
        "pump-1-live",
        &["-i", "pump-1", "-q", "1", "-t", "groups/pumps/commands"],
    );
    std::fs::write(
        &policy,
        POLICY.replace(
            "name = \"pumps-broadcast\"\napplies_to = [\"group:pumps\"]",
            "name = \"pumps-broadcast\"\napplies_to = [\"device:pump-2\"]",
        ),
    )
    .unwrap();
    assert!(
        wait_until(15, || gw.log().contains("topic policy reloaded")),
        "{}",
        gw.log()
    );
    // pump-1's live session keeps its subscription at the broker, but
    // what it delivers is withheld now, and audited.
    let heard = |sub: &Sub| {
        sub.messages()
            .iter()
            .filter(|(t, _)| t == "groups/pumps/commands")
            .count()
    };
    let before = heard(&live);
    publish(&fleet, &gw, &ops, "ops", "groups/pumps/commands");
    gw.wait_for(|e| {
        e["client_id"] == "pump-1"
            && e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("delivery of \"groups/pumps/commands\" withheld"))
    })
    .unwrap_or_else(|| panic!("no withheld delivery; audit:\n{:#?}", gw.events()));
    assert_eq!(
        heard(&live),
        before,
        "the broadcast reached pump-1 after the reload"
    );
    drop(live);
    finish(
        mosquitto_sub(
            &fleet,
            &gw,
            &pump,
            &["-i", "pump-1", "-t", "groups/pumps/commands", "-W", "3"],
        ),
        10,
    );
    assert!(
        denials(&gw, "pump-1")
            .iter()
            .any(|d| d.contains("groups/pumps/commands")),
        "{:?}",
        gw.events()
    );
}

#[test]
fn the_gateway_does_not_start_on_a_broken_policy() {
    let fleet = Fleet::new();
    let policy = fleet.path("policy.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nname = \"x\"\napplies_to = [\"devices\"]\nsubscribe = [\"a/{grp}\"]\n",
    )
    .unwrap();
    let config = fleet.path("gw.toml");
    let gw = fleet.path("gw");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{}\"\ntrust_domain = \"{TD}\"\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\ncrl = {:?}\npolicy = {policy:?}\n",
            free_port(),
            gw.join("gateway.pem"),
            gw.join("gateway.key"),
            gw.join("client-ca.pem"),
            gw.join("crl.pem"),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(built("gateway"));
    cmd.arg("--config").arg(&config);
    let out = run_bounded(cmd, 30);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("policy.toml: rule 1 (\"x\"): subscribe pattern \"a/{grp}\" has the unknown variable {grp}"),
        "{err}"
    );
}

fn provisioning(fleet: &Fleet, args: &[&str]) -> std::process::Output {
    let mut cmd = fleet.provisioning();
    cmd.args(args);
    run_bounded(cmd, 60)
}

/// Groups live in the registry; `groups export` writes the file the
/// gateway reloads; `policy explain` names the rule that decides.
#[test]
fn registry_groups_reach_the_gateway_and_explain_names_the_rule() {
    let mut fleet = Fleet::new();
    let pump = fleet.device("pump-1");
    let ops = fleet.service("ops");
    let policy = fleet.path("policy.toml");
    let groups = fleet.path("groups.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let policy_arg = policy.to_str().unwrap();
    let groups_arg = groups.to_str().unwrap();
    let out = provisioning(&fleet, &["groups", "export", "--out", groups_arg]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("0 groups"), "{}", text(&out));
    let gw = Gateway::start(&fleet, &format!("policy = {policy:?}\ngroups = {groups:?}"));
    let sub_args = ["-i", "pump-1", "-t", "groups/pumps/commands", "-W", "3"];
    finish(mosquitto_sub(&fleet, &gw, &pump, &sub_args), 10);
    assert!(!denials(&gw, "pump-1").is_empty(), "not in pumps yet");

    // Explained from the registry's groups: denied, then allowed.
    let explain = |who: &str, access: &str, topic: &str| {
        provisioning(
            &fleet,
            &[
                "policy", "explain", "--policy", policy_arg, who, access, topic,
            ],
        )
    };
    let out = explain("pump-1", "subscribe", "groups/pumps/commands");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("denied: device:pump-1 may not subscribe"),
        "{}",
        text(&out)
    );

    let out = provisioning(&fleet, &["groups", "add", "pumps", "pump-1", "pump-2"]);
    assert!(
        text(&out).contains("device:pump-1, device:pump-2 added to group pumps"),
        "{}",
        text(&out)
    );
    let out = explain("pump-1", "subscribe", "groups/pumps/commands");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("allowed: device:pump-1 may subscribe \"groups/pumps/commands\" (groups pumps): rule \"pumps-broadcast\""),
        "{}",
        text(&out)
    );
    let out = explain(
        "service:pump-control",
        "publish",
        "devices/valve-1/commands",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("no rule of the policy grants this"),
        "{}",
        text(&out)
    );
    let out = explain("pump-1", "publish", "devices/pump-1/telemetry");
    assert!(text(&out).contains("the built-in rule"), "{}", text(&out));

    // Exported, the gateway takes it within a second or so.
    let out = provisioning(&fleet, &["groups", "export", "--out", groups_arg]);
    assert!(
        text(&out).contains("1 groups, 2 memberships"),
        "{}",
        text(&out)
    );
    assert!(
        wait_until(15, || gw.log().contains("topic policy reloaded")),
        "{}",
        gw.log()
    );
    let sub = Sub::start_tls(&fleet, gw.addr.port(), &pump, "pump-1", &sub_args[..4]);
    publish(&fleet, &gw, &ops, "ops", "groups/pumps/commands");
    assert!(
        wait_until(15, || sub
            .messages()
            .iter()
            .any(|(t, _)| t == "groups/pumps/commands")),
        "the broadcast did not arrive; audit:\n{:#?}",
        gw.events()
    );

    // `policy check` warns of a group no member is in (a typo?).
    std::fs::write(
        &policy,
        POLICY.replace(
            "applies_to = [\"group:pumps\"]",
            "applies_to = [\"group:pumsp\"]",
        ),
    )
    .unwrap();
    let out = provisioning(
        &fleet,
        &["policy", "check", policy_arg, "--groups", groups_arg],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains(
            "warning: rule \"pumps-broadcast\" names group pumsp, which has no members here"
        ),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains("group pumps,"), "{}", text(&out));

    // `policy check` names the rule of a broken file.
    std::fs::write(
        &policy,
        "[[rule]]\nname = \"x\"\napplies_to = [\"group:Pumps\"]\npublish = [\"a\"]\n",
    )
    .unwrap();
    let out = provisioning(&fleet, &["policy", "check", policy_arg]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("rule 1 (\"x\"): applies_to \"group:Pumps\": the group name"),
        "{}",
        text(&out)
    );
}
