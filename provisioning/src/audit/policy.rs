//! Which rules of a topic policy grant more than an identity's own
//! subtree to many: read from the rules themselves, not from traffic.
//!
//! Flagged: a pattern that opens every device's subtree to a rule that
//! can apply to devices (a wildcard first level, or a wildcard at the id
//! level of `devices/…`); a pattern of everything (`#`); and a service
//! allowed to publish on devices' channels other than `commands`, which
//! lets it speak as any device. A rule that names the devices it opens (an
//! id, `{member:GROUP}`) says what it grants and is not flagged.

use twofold_trust::policy::{Level, Pattern, Policy, Rule};

use super::Affected;

/// The rules and patterns that grant too much, one item per pattern.
pub fn broad(policy: &Policy) -> Vec<Affected> {
    let mut out = Vec::new();
    for rule in &policy.rules {
        let devices = applies_to_devices(rule);
        let services = applies_to_services(rule);
        let subjects: Vec<String> = rule.applies_to.iter().map(|s| s.to_string()).collect();
        let subjects = subjects.join(", ");
        let mut flag = |access: &str, p: &Pattern, why: &str| {
            out.push(Affected {
                name: format!("rule {:?}", rule.name),
                detail: format!("{access} {p:?} for {subjects}: {why}", p = p.to_string()),
            });
        };
        for (access, patterns) in [("publish", &rule.publish), ("subscribe", &rule.subscribe)] {
            for p in patterns {
                let levels = p.levels();
                if levels.first() == Some(&Level::Hash) {
                    flag(access, p, "every topic");
                } else if devices && opens_every_device(levels) {
                    flag(access, p, "every device's subtree, to devices");
                } else if services && access == "publish" && publishes_as_devices(levels) {
                    flag(
                        access,
                        p,
                        "devices' own channels (not only commands): a service could speak as any device",
                    );
                }
            }
        }
    }
    out
}

fn applies_to_devices(rule: &Rule) -> bool {
    use twofold_trust::policy::Subject;
    rule.applies_to
        .iter()
        .any(|s| matches!(s, Subject::Devices | Subject::Device(_) | Subject::Group(_)))
}

fn applies_to_services(rule: &Rule) -> bool {
    use twofold_trust::policy::Subject;
    rule.applies_to.iter().any(|s| {
        matches!(
            s,
            Subject::Services | Subject::Service(_) | Subject::Group(_)
        )
    })
}

fn wildcard(level: Option<&Level>) -> bool {
    matches!(level, Some(Level::Plus | Level::Hash))
}

fn under_devices(levels: &[Level]) -> bool {
    levels.first() == Some(&Level::Literal(twofold_protocol::topic::DEVICES.into()))
}

/// `+/…`, or `devices/+/…` and `devices/#`.
fn opens_every_device(levels: &[Level]) -> bool {
    levels.first() == Some(&Level::Plus) || (under_devices(levels) && wildcard(levels.get(1)))
}

/// Under `devices/<any>/`, a channel other than `commands`.
fn publishes_as_devices(levels: &[Level]) -> bool {
    if levels.first() == Some(&Level::Plus) {
        return true;
    }
    if !under_devices(levels) || !wildcard(levels.get(1)) {
        return false;
    }
    levels.get(1) == Some(&Level::Hash)
        || levels.len() != 3
        || levels.get(2) != Some(&Level::Literal("commands".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use twofold_trust::policy::file;

    fn flagged(text: &str) -> Vec<String> {
        broad(&file::parse(text).unwrap())
            .into_iter()
            .map(|a| format!("{}: {}", a.name, a.detail))
            .collect()
    }

    #[test]
    fn rules_that_open_every_device_or_everything_are_flagged() {
        let found = flagged(
            r##"
[[rule]]
name = "peek"
applies_to = ["devices"]
subscribe = ["devices/+/telemetry"]

[[rule]]
name = "all"
applies_to = ["service:root"]
subscribe = ["#"]

[[rule]]
name = "spoof"
applies_to = ["services"]
publish = ["devices/+/telemetry", "devices/+/commands"]

[[rule]]
name = "group-wide"
applies_to = ["group:pumps"]
publish = ["+/x"]
"##,
        );
        assert_eq!(found.len(), 4, "{found:#?}");
        assert!(found[0].starts_with("rule \"peek\": subscribe \"devices/+/telemetry\" for devices: every device's subtree"), "{found:#?}");
        assert!(
            found[1].contains("\"all\": subscribe \"#\" for service:root: every topic"),
            "{found:#?}"
        );
        assert!(
            found[2].contains("\"spoof\": publish \"devices/+/telemetry\""),
            "{found:#?}"
        );
        assert!(
            found[3].contains("\"group-wide\": publish \"+/x\" for group:pumps"),
            "{found:#?}"
        );
    }

    #[test]
    fn rules_that_name_what_they_open_are_not() {
        let found = flagged(
            r#"
[[rule]]
name = "own"
applies_to = ["devices"]
publish = ["state/{device}", "devices/{device}/x"]

[[rule]]
name = "pumps"
applies_to = ["service:pump-control"]
subscribe = ["devices/{member:pumps}/telemetry"]
publish = ["devices/{member:pumps}/commands"]

[[rule]]
name = "ops"
applies_to = ["service:ops"]
subscribe = ["devices/+/#"]
publish = ["devices/+/commands", "groups/+/commands"]

[[rule]]
name = "broadcast"
applies_to = ["group:pumps"]
subscribe = ["groups/{group}/commands"]
"#,
        );
        assert!(found.is_empty(), "{found:#?}");
        // The built-in policy alone: nothing.
        assert!(flagged("").is_empty());
    }
}
