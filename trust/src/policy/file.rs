//! The policy file (TOML) and the groups file, parsed and checked.
//!
//! ```toml
//! [builtin]
//! devices = true     # devices use devices/<their id>/…
//! services = true    # services read devices/…, publish devices/<id>/commands
//!
//! [groups]           # also in the groups file `provisioning groups` writes
//! pumps = ["device:pump-1", "device:pump-2"]
//!
//! [[rule]]
//! name = "pumps-broadcast"
//! applies_to = ["group:pumps"]
//! subscribe = ["groups/{group}/commands"]
//! ```
//!
//! Every mistake is an error naming the rule and the problem; nothing is
//! ignored, so a typo cannot silently grant or deny.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;

use twofold_protocol::{DeviceId, GroupName, Principal, ServiceName};

use super::{Groups, Level, Pattern, Policy, Rule, Subject};

/// What is wrong with a policy or groups file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    /// The file, when read from one.
    pub file: Option<String>,
    /// `rule N ("name")`, `[groups] x`, or none for the file as a whole.
    pub place: Option<String>,
    /// What is wrong, and how to put it right.
    pub problem: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{file}: ")?;
        }
        if let Some(place) = &self.place {
            write!(f, "{place}: ")?;
        }
        f.write_str(&self.problem)
    }
}

impl std::error::Error for PolicyError {}

fn error(place: Option<String>, problem: impl Into<String>) -> PolicyError {
    PolicyError {
        file: None,
        place,
        problem: problem.into(),
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    builtin: BuiltinFile,
    #[serde(default)]
    groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    rule: Vec<RuleFile>,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BuiltinFile {
    devices: Option<bool>,
    services: Option<bool>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: Option<String>,
    #[serde(default)]
    applies_to: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupsFile {
    #[serde(default)]
    groups: BTreeMap<String, Vec<String>>,
}

/// Parses a policy file's text. An empty text is the built-in policy.
pub fn parse(text: &str) -> Result<Policy, PolicyError> {
    let file: PolicyFile =
        toml::from_str(text).map_err(|e| error(None, e.message().to_owned() + &at(&e, text)))?;
    let mut names = HashSet::new();
    let mut rules = Vec::with_capacity(file.rule.len());
    for (i, r) in file.rule.into_iter().enumerate() {
        let place = |name: &Option<String>| match name {
            Some(n) => format!("rule {} ({n:?})", i + 1),
            None => format!("rule {}", i + 1),
        };
        let here = place(&r.name);
        let name = r
            .name
            .clone()
            .filter(|n| !n.trim().is_empty())
            .ok_or_else(|| error(Some(here.clone()), "has no name; give it name = \"...\""))?;
        if !names.insert(name.clone()) {
            return Err(error(Some(here), "has the same name as an earlier rule"));
        }
        rules.push(rule(r, name).map_err(|problem| error(Some(here), problem))?);
    }
    Ok(Policy {
        builtin_devices: file.builtin.devices.unwrap_or(true),
        builtin_services: file.builtin.services.unwrap_or(true),
        rules,
        groups: groups(file.groups)?,
    })
}

/// Parses a groups file's text: `[groups]` only.
pub fn parse_groups(text: &str) -> Result<Groups, PolicyError> {
    let file: GroupsFile =
        toml::from_str(text).map_err(|e| error(None, e.message().to_owned() + &at(&e, text)))?;
    groups(file.groups)
}

/// Reads the policy file and, if given, the groups file; errors name the file.
pub fn load(policy: &Path, groups: Option<&Path>) -> Result<Policy, PolicyError> {
    fn named(path: &Path) -> impl Fn(PolicyError) -> PolicyError + '_ {
        move |mut e: PolicyError| {
            e.file = Some(path.display().to_string());
            e
        }
    }
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|e| PolicyError {
            file: Some(path.display().to_string()),
            place: None,
            problem: format!("cannot read it: {e}"),
        })
    };
    let mut p = parse(&read(policy)?).map_err(named(policy))?;
    if let Some(path) = groups {
        p.groups
            .merge(parse_groups(&read(path)?).map_err(named(path))?);
    }
    Ok(p)
}

/// " (line L, column C)" for a TOML error with a place.
fn at(e: &toml::de::Error, text: &str) -> String {
    let Some(span) = e.span() else {
        return String::new();
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!(" (line {line}, column {column})")
}

fn groups(table: BTreeMap<String, Vec<String>>) -> Result<Groups, PolicyError> {
    let mut groups = Groups::default();
    for (name, members) in table {
        let place = Some(format!("[groups] {name}"));
        let group = GroupName::parse(&name).map_err(|e| {
            error(
                place.clone(),
                format!("is not a group name: {e} (a-z, 0-9 and '-', at most 64)"),
            )
        })?;
        for m in members {
            let who = principal(&m).map_err(|p| error(place.clone(), p))?;
            groups.add(group, who);
        }
    }
    Ok(groups)
}

/// `device:<id>` or `service:<name>`.
pub fn principal(text: &str) -> Result<Principal, String> {
    if let Some(id) = text.strip_prefix("device:") {
        return DeviceId::parse(id)
            .map(Principal::Device)
            .map_err(|e| format!("{text:?}: the device id {e}"));
    }
    if let Some(name) = text.strip_prefix("service:") {
        return ServiceName::parse(name)
            .map(Principal::Service)
            .map_err(|e| format!("{text:?}: the service name {e}"));
    }
    Err(format!("{text:?} is not device:<id> or service:<name>"))
}

fn subject(text: &str) -> Result<Subject, String> {
    Ok(match text {
        "devices" => Subject::Devices,
        "services" => Subject::Services,
        t if t.starts_with("group:") => {
            let g = &t["group:".len()..];
            Subject::Group(
                GroupName::parse(g).map_err(|e| format!("applies_to {t:?}: the group name {e}"))?,
            )
        }
        t => match principal(t) {
            Ok(Principal::Device(id)) => Subject::Device(id),
            Ok(Principal::Service(name)) => Subject::Service(name),
            Err(_) => {
                return Err(format!(
                    "applies_to {t:?}: use \"devices\", \"services\", \"device:<id>\", \
                     \"service:<name>\" or \"group:<name>\""
                ));
            }
        },
    })
}

fn rule(r: RuleFile, name: String) -> Result<Rule, String> {
    if r.applies_to.is_empty() {
        return Err(
            "applies to no one; give applies_to = [\"devices\"], [\"group:...\"], ...".into(),
        );
    }
    let applies_to = r
        .applies_to
        .iter()
        .map(|s| subject(s))
        .collect::<Result<Vec<_>, _>>()?;
    if r.publish.is_empty() && r.subscribe.is_empty() {
        return Err("grants nothing; give publish = [...] and/or subscribe = [...]".into());
    }
    let devices = applies_to.iter().any(|s| s.may_be(true));
    let services = applies_to.iter().any(|s| s.may_be(false));
    let patterns = |list: &[String], access: &str| -> Result<Vec<Pattern>, String> {
        list.iter()
            .map(|text| {
                let p =
                    Pattern::parse(text).map_err(|e| format!("{access} pattern {text:?} {e}"))?;
                check(&p, devices, services)
                    .map_err(|e| format!("{access} pattern {text:?}: {e}"))?;
                Ok(p)
            })
            .collect()
    };
    let publish = patterns(&r.publish, "publish")?;
    let subscribe = patterns(&r.subscribe, "subscribe")?;
    Ok(Rule {
        name,
        applies_to,
        publish,
        subscribe,
    })
}

/// What a pattern must not do whatever it applies to.
fn check(p: &Pattern, devices: bool, services: bool) -> Result<(), String> {
    let levels = p.levels();
    if !devices && levels.contains(&Level::Device) {
        return Err("{device} never matches: the rule applies to no device".into());
    }
    if !services && levels.contains(&Level::Service) {
        return Err("{service} never matches: the rule applies to no service".into());
    }
    // Under devices/, the id level is a device id: a group or service
    // name there could equal another device's id and open its subtree. A
    // first level of `+` reaches devices/ too. (A variable first level
    // never matches `devices`: pattern.rs.)
    let reaches_devices = match levels.first() {
        Some(Level::Plus) => true,
        Some(Level::Literal(l)) => l == twofold_protocol::topic::DEVICES,
        _ => false,
    };
    if reaches_devices && matches!(levels.get(1), Some(Level::Group | Level::Service)) {
        return Err(
            "puts {group} or {service} at the device id level of devices/…: a name there can \
             equal another device's id; use {device}, {member:GROUP}, an id or +"
                .into(),
        );
    }
    Ok(())
}
