use super::*;
use proptest::prelude::*;

fn device(id: &str) -> Principal {
    Principal::Device(DeviceId::parse(id).unwrap())
}

fn service(name: &str) -> Principal {
    Principal::Service(ServiceName::parse(name).unwrap())
}

const PUMPS: &str = r#"
[groups]
pumps = ["device:pump-1", "device:pump-2", "service:pump-control"]

[[rule]]
name = "pumps-broadcast"
applies_to = ["group:pumps"]
subscribe = ["groups/{group}/commands"]

[[rule]]
name = "broadcast-to-groups"
applies_to = ["service:ops"]
publish = ["groups/+/commands"]
"#;

#[test]
fn an_empty_file_is_the_builtin_policy() {
    let p = file::parse("").unwrap();
    assert_eq!(p, Policy::default());
    let me = device("sensor-1");
    assert_eq!(
        p.may_publish(&me, "devices/sensor-1/telemetry"),
        Ok(Grant::Builtin)
    );
    assert_eq!(
        p.may_publish(&me, "devices/sensor-2/telemetry"),
        Err(Denial::OutsideOwnSubtree)
    );
    assert_eq!(
        p.may_subscribe(&service("ops"), "devices/+/telemetry"),
        Ok(Grant::Builtin)
    );
}

#[test]
fn a_group_broadcast_reaches_its_members_only() {
    let p = file::parse(PUMPS).unwrap();
    for member in [device("pump-1"), device("pump-2"), service("pump-control")] {
        assert_eq!(
            p.may_subscribe(&member, "groups/pumps/commands"),
            Ok(Grant::Rule("pumps-broadcast")),
            "{member:?}"
        );
    }
    // Not a member; another group; a wildcard over groups.
    assert_eq!(
        p.may_subscribe(&device("valve-1"), "groups/pumps/commands"),
        Err(Denial::OutsideOwnSubtree)
    );
    assert_eq!(
        p.may_subscribe(&device("pump-1"), "groups/valves/commands"),
        Err(Denial::OutsideOwnSubtree)
    );
    assert_eq!(
        p.may_subscribe(&device("pump-1"), "groups/+/commands"),
        Err(Denial::OutsideOwnSubtree)
    );
    // Members may not publish there; ops may, to any group.
    assert_eq!(
        p.may_publish(&device("pump-1"), "groups/pumps/commands"),
        Err(Denial::OutsideOwnSubtree)
    );
    assert_eq!(
        p.may_publish(&service("ops"), "groups/pumps/commands"),
        Ok(Grant::Rule("broadcast-to-groups"))
    );
    // The built-in rules still hold.
    assert_eq!(
        p.may_publish(&device("pump-1"), "devices/pump-1/telemetry"),
        Ok(Grant::Builtin)
    );
}

const LIMITED: &str = r#"
[builtin]
services = false

[groups]
pumps = ["device:pump-1", "device:pump-2"]

[[rule]]
name = "pump-control"
applies_to = ["service:pump-control"]
subscribe = ["devices/{member:pumps}/telemetry", "devices/{member:pumps}/replies"]
publish = ["devices/{member:pumps}/commands"]

[[rule]]
name = "ops-everything"
applies_to = ["service:ops"]
subscribe = ["devices/+/#"]
publish = ["devices/+/commands"]
"#;

#[test]
fn a_service_limited_to_a_group() {
    let p = file::parse(LIMITED).unwrap();
    let pc = service("pump-control");
    assert_eq!(
        p.may_publish(&pc, "devices/pump-1/commands"),
        Ok(Grant::Rule("pump-control"))
    );
    assert_eq!(
        p.may_subscribe(&pc, "devices/pump-2/telemetry"),
        Ok(Grant::Rule("pump-control"))
    );
    assert_eq!(
        p.may_subscribe(&pc, "$share/workers/devices/pump-2/telemetry"),
        Ok(Grant::Rule("pump-control"))
    );
    for (access, topic) in [
        (Access::Publish, "devices/valve-1/commands"),
        (Access::Subscribe, "devices/valve-1/telemetry"),
        // A wildcard would cover devices outside the group.
        (Access::Subscribe, "devices/+/telemetry"),
        (Access::Subscribe, "devices/pump-1/#"),
        (Access::Publish, "devices/pump-1/telemetry"),
    ] {
        assert_eq!(
            p.decide(&pc, access, topic),
            Err(Denial::NotGranted),
            "{topic}"
        );
    }
    // Another service with a rule of its own; one with none.
    assert_eq!(
        p.may_subscribe(&service("ops"), "devices/+/telemetry"),
        Ok(Grant::Rule("ops-everything"))
    );
    assert_eq!(
        p.may_subscribe(&service("billing"), "devices/+/telemetry"),
        Err(Denial::NotGranted)
    );
    // Devices keep the built-in rule.
    assert_eq!(
        p.may_publish(&device("pump-1"), "devices/pump-1/telemetry"),
        Ok(Grant::Builtin)
    );
}

#[test]
fn identity_variables_and_sys_topics() {
    let p = file::parse(
        r##"
[[rule]]
name = "own-state"
applies_to = ["devices"]
publish = ["state/{device}"]
subscribe = ["config/{device}/#"]

[[rule]]
name = "everything"
applies_to = ["service:root"]
subscribe = ["#"]
"##,
    )
    .unwrap();
    let me = device("sensor-1");
    assert_eq!(
        p.may_publish(&me, "state/sensor-1"),
        Ok(Grant::Rule("own-state"))
    );
    assert_eq!(
        p.may_publish(&me, "state/sensor-2"),
        Err(Denial::OutsideOwnSubtree)
    );
    assert_eq!(
        p.may_subscribe(&me, "config/sensor-1/#"),
        Ok(Grant::Rule("own-state"))
    );
    assert_eq!(
        p.may_subscribe(&me, "config/sensor-1"),
        Ok(Grant::Rule("own-state"))
    );
    assert_eq!(
        p.may_subscribe(&me, "config/+/#"),
        Err(Denial::OutsideOwnSubtree)
    );
    // A device named `devices`: {device} first never means devices/.
    let p2 = file::parse(
        "[groups]\ndevices = [\"device:a\"]\n\n[[rule]]\nname = \"mine\"\napplies_to = [\"devices\"]\n\
         subscribe = [\"{device}/#\", \"{group}/+/#\"]\n",
    )
    .unwrap();
    for who in [device("devices"), device("a")] {
        assert_eq!(
            p2.may_subscribe(&who, "devices/b/telemetry"),
            Err(Denial::OutsideOwnSubtree),
            "{who:?}"
        );
    }
    let root = service("root");
    assert_eq!(
        p.may_subscribe(&root, "a/b/#"),
        Ok(Grant::Rule("everything"))
    );
    // A wildcard first level never reaches $ topics.
    assert_eq!(
        p.may_subscribe(&root, "$SYS/#"),
        Err(Denial::OutsideOwnSubtree)
    );
}

#[test]
fn broken_files_name_the_rule_and_the_problem() {
    let cases = [
        (
            "[[rule]]\napplies_to = [\"devices\"]\npublish = [\"a\"]",
            "rule 1: has no name",
        ),
        (
            "[[rule]]\nname = \"a\"\npublish = [\"a\"]",
            "rule 1 (\"a\"): applies to no one",
        ),
        (
            "[[rule]]\nname = \"a\"\napplies_to = [\"devices\"]",
            "rule 1 (\"a\"): grants nothing",
        ),
        (
            "[[rule]]\nname = \"a\"\napplies_to = [\"devices\"]\npublish = [\"a\"]\n\
             [[rule]]\nname = \"a\"\napplies_to = [\"devices\"]\npublish = [\"b\"]",
            "rule 2 (\"a\"): has the same name",
        ),
        (
            "[[rule]]\nname = \"x\"\napplies_to = [\"everyone\"]\npublish = [\"a\"]",
            "applies_to \"everyone\": use",
        ),
        (
            "[[rule]]\nname = \"x\"\napplies_to = [\"devices\"]\npublish = [\"a/{grp}\"]",
            "publish pattern \"a/{grp}\" has the unknown variable {grp}",
        ),
        (
            "[[rule]]\nname = \"x\"\napplies_to = [\"devices\"]\nsubscribe = [\"a/#/b\"]",
            "has # before the last level",
        ),
        (
            "[[rule]]\nname = \"x\"\napplies_to = [\"devices\"]\nsubscribe = [\"a/b+\"]",
            "must be a whole level",
        ),
        (
            "[[rule]]\nname = \"x\"\napplies_to = [\"services\"]\nsubscribe = [\"a/{device}\"]",
            "{device} never matches",
        ),
        (
            "[[rule]]\nname = \"x\"\napplies_to = [\"group:g\"]\npublish = [\"devices/{group}/x\"]",
            "at the device id level",
        ),
        (
            "[[rule]]\nname = \"x\"\napplies_to = [\"devices\"]\nsubscribe = [\"$share/g/a\"]",
            "starts with $share",
        ),
        (
            "[[rule]]\nname = \"x\"\napplies_to = [\"devices\"]\nsubscribe = [\"+/{group}/#\"]",
            "at the device id level",
        ),
        (
            "[groups]\nPumps = [\"device:a\"]",
            "[groups] Pumps: is not a group name",
        ),
        (
            "[groups]\npumps = [\"pump-1\"]",
            "is not device:<id> or service:<name>",
        ),
        ("[rules]\nname = 1", "unknown field `rules`"),
        ("[builtin]\ndevices = \"yes\"", "line 2"),
    ];
    for (text, expected) in cases {
        let e = file::parse(text).unwrap_err().to_string();
        assert!(
            e.contains(expected),
            "{text}\n=> {e}\n(expected {expected:?})"
        );
    }
}

/// The rule levels the generator draws from.
fn level() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("devices"),
        Just("groups"),
        Just("a"),
        Just("b"),
        Just("x"),
        Just("+"),
        Just("{device}"),
        Just("{service}"),
        Just("{group}"),
        Just("{member:g1}"),
        Just("{member:g2}"),
    ]
}

fn pattern() -> impl Strategy<Value = String> {
    (prop::collection::vec(level(), 1..4), any::<bool>()).prop_map(|(levels, hash)| {
        let mut text = levels.join("/");
        if hash {
            text.push_str("/#");
        }
        text
    })
}

fn rule_text() -> impl Strategy<Value = String> {
    let subject = prop_oneof![
        Just("devices"),
        Just("services"),
        Just("device:a"),
        Just("service:s"),
        Just("group:g1"),
        Just("group:g2"),
    ];
    (
        prop::collection::vec(subject, 1..3),
        prop::collection::vec(pattern(), 0..3),
        prop::collection::vec(pattern(), 0..3),
    )
        .prop_map(|(subjects, publish, subscribe)| {
            let list = |v: &[String]| {
                v.iter()
                    .map(|s| format!("{s:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let subjects: Vec<String> = subjects.iter().map(|s| s.to_string()).collect();
            format!(
                "applies_to = [{}]\npublish = [{}]\nsubscribe = [{}]\n",
                list(&subjects),
                list(&publish),
                list(&subscribe)
            )
        })
}

/// Whether a pattern names other devices' subtrees explicitly: a wildcard
/// or literal at the first level or at `devices/`'s id level, or a group's
/// members there. Read from the text, not from the matcher under test.
fn names_others(text: &str, other: &str, members: &[&str]) -> bool {
    let levels: Vec<&str> = text.split('/').collect();
    match levels.first() {
        Some(&"#") => return true,
        // `+` first reaches devices/ as the literal does.
        Some(&"+") | Some(&"devices") => {}
        _ => return false,
    }
    match levels.get(1) {
        None => false,
        Some(&"+") | Some(&"#") => true,
        Some(l) if *l == other => true,
        Some(l) => l
            .strip_prefix("{member:")
            .and_then(|g| g.strip_suffix('}'))
            .is_some_and(|g| g == "g1" && members.contains(&other)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// No rule set lets device a into device b's subtree unless the rule
    /// that decided names it explicitly; group names that equal device ids
    /// included (group "b" has a as a member), and a group named
    /// "devices" (which {group} at the first level must not expand to).
    #[test]
    fn no_rule_set_opens_another_devices_subtree_implicitly(
        rules in prop::collection::vec(rule_text(), 0..4),
        builtin_devices in any::<bool>(),
        rest in prop::collection::vec(prop_oneof![Just("telemetry"), Just("commands"), Just("x"), Just("#"), Just("+")], 1..3),
        other in prop_oneof![Just("b"), Just("pump-2")],
        subscribe in any::<bool>(),
    ) {
        let mut text = format!(
            "[builtin]\ndevices = {builtin_devices}\n\n[groups]\ng1 = [\"device:a\", \"device:pump-2\"]\nb = [\"device:a\"]\ndevices = [\"device:a\"]\n"
        );
        for (i, r) in rules.iter().enumerate() {
            text.push_str(&format!("\n[[rule]]\nname = \"r{i}\"\n{r}"));
        }
        let Ok(policy) = file::parse(&text) else {
            // Refused files grant nothing: nothing to check.
            return Ok(());
        };
        let me = device("a");
        let mut topic = format!("devices/{other}");
        for r in &rest {
            topic.push('/');
            topic.push_str(r);
        }
        let access = if subscribe { Access::Subscribe } else { Access::Publish };
        match policy.decide(&me, access, &topic) {
            Ok(Grant::Builtin) => prop_assert!(false, "the built-in rule let a into {topic}"),
            Ok(Grant::Rule(name)) => {
                let i: usize = name[1..].parse().unwrap();
                let rule = &policy.rules[i];
                let patterns = match access {
                    Access::Publish => &rule.publish,
                    Access::Subscribe => &rule.subscribe,
                };
                prop_assert!(
                    patterns.iter().any(|p| names_others(&p.to_string(), other, &["pump-2"])),
                    "rule {name} let a into {topic} without naming it:\n{text}"
                );
            }
            Err(_) => {}
        }
    }
}
