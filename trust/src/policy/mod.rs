//! Who may publish and subscribe where: the topic policy.
//!
//! The built-in rules ([`builtin`]) are the default and what an empty
//! policy file means: a device uses only `devices/<its id>/…`, a service
//! reads every device and writes their `commands`. A policy file
//! ([`file`]) adds rules in the manner of AWS IoT policies and mosquitto's
//! `%c` ACL patterns: each grants publish and/or subscribe on topic
//! patterns to devices, services, one of them, or a group, with the
//! identity's own names as variables (`{device}`, `{service}`, `{group}`,
//! `{member:GROUP}`), and may switch a built-in rule off.
//!
//! [`Policy::decide`] is a pure function of the policy, the identity and
//! the topic, and says which rule decided. Nothing reaches another
//! device's subtree unless a rule names it: a literal id, a wildcard at
//! its level, or the members of a group (a property test checks this
//! over generated rule sets).

pub mod builtin;
pub mod file;
mod pattern;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use twofold_protocol::{DeviceId, GroupName, Principal, ServiceName};

pub use builtin::shared;
pub use file::PolicyError;
pub use pattern::{Level, Pattern};

/// Why an operation was denied, for the audit log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denial {
    /// The topic or filter is not valid MQTT (empty level misuse, wildcard in a topic, NUL).
    Malformed,
    /// Outside the subtree this identity may use.
    OutsideOwnSubtree,
    /// A service may publish only to `devices/<id>/commands`.
    ServicePublishesCommandsOnly,
    /// Shared subscriptions (`$share/<group>/<filter>`) are for services,
    /// which scale out across instances; a device has no one to share with.
    SharedForServicesOnly,
    /// The built-in rule for this kind of identity is off, and no rule of
    /// the policy file grants this.
    NotGranted,
}

impl Denial {
    /// A short explanation.
    pub fn as_str(&self) -> &'static str {
        match self {
            Denial::Malformed => "not a valid MQTT topic or filter",
            Denial::OutsideOwnSubtree => "outside the identity's own topics",
            Denial::ServicePublishesCommandsOnly => {
                "services may publish only to devices/<id>/commands"
            }
            Denial::SharedForServicesOnly => "shared subscriptions are for services only",
            Denial::NotGranted => "no rule of the policy grants this",
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// PUBLISH to a topic (a will too).
    Publish,
    /// SUBSCRIBE to a filter.
    Subscribe,
}

impl Access {
    /// `publish` or `subscribe`, as in the policy file.
    pub fn as_str(&self) -> &'static str {
        match self {
            Access::Publish => "publish",
            Access::Subscribe => "subscribe",
        }
    }
}

/// What allowed an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant<'a> {
    /// The built-in rule for devices or services.
    Builtin,
    /// The policy file's rule of this name.
    Rule(&'a str),
}

impl fmt::Display for Grant<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Grant::Builtin => f.write_str("the built-in rule"),
            Grant::Rule(name) => write!(f, "rule {name:?}"),
        }
    }
}

/// Whom a rule applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// Every device.
    Devices,
    /// Every service.
    Services,
    /// One device.
    Device(DeviceId),
    /// One service.
    Service(ServiceName),
    /// The members of a group.
    Group(GroupName),
}

impl Subject {
    /// Whether a device, a service, or both can be this subject.
    fn may_be(&self, device: bool) -> bool {
        match self {
            Subject::Devices | Subject::Device(_) => device,
            Subject::Services | Subject::Service(_) => !device,
            Subject::Group(_) => true,
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Devices => f.write_str("devices"),
            Subject::Services => f.write_str("services"),
            Subject::Device(id) => write!(f, "device:{id}"),
            Subject::Service(name) => write!(f, "service:{name}"),
            Subject::Group(g) => write!(f, "group:{g}"),
        }
    }
}

/// One rule of the policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Unique in the file; audit events and `explain` name it.
    pub name: String,
    /// Whom it applies to (any of them).
    pub applies_to: Vec<Subject>,
    /// Topics it lets them publish to.
    pub publish: Vec<Pattern>,
    /// Filters it lets them subscribe to.
    pub subscribe: Vec<Pattern>,
}

impl Rule {
    fn patterns(&self, access: Access) -> &[Pattern] {
        match access {
            Access::Publish => &self.publish,
            Access::Subscribe => &self.subscribe,
        }
    }
}

/// Groups and their members.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Groups {
    members: BTreeMap<GroupName, BTreeSet<Principal>>,
}

impl Groups {
    /// Adds `who` to `group`.
    pub fn add(&mut self, group: GroupName, who: Principal) {
        self.members.entry(group).or_default().insert(who);
    }

    /// Whether `who` is in `group`.
    pub fn contains(&self, group: &GroupName, who: &Principal) -> bool {
        self.members.get(group).is_some_and(|m| m.contains(who))
    }

    /// The groups `who` is in.
    pub fn of(&self, who: &Principal) -> impl Iterator<Item = &GroupName> {
        self.members
            .iter()
            .filter(move |(_, m)| m.contains(who))
            .map(|(g, _)| g)
    }

    /// Every group and its members.
    pub fn iter(&self) -> impl Iterator<Item = (&GroupName, &BTreeSet<Principal>)> {
        self.members.iter()
    }

    /// Adds every membership of `other`.
    pub fn merge(&mut self, other: Groups) {
        for (g, members) in other.members {
            self.members.entry(g).or_default().extend(members);
        }
    }
}

/// A topic policy: the built-in rules (each may be off), the file's rules
/// and the groups they name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Devices use `devices/<their id>/…`.
    pub builtin_devices: bool,
    /// Services read `devices/…` and publish `devices/<id>/commands`.
    pub builtin_services: bool,
    /// In file order; the first that grants decides.
    pub rules: Vec<Rule>,
    /// Memberships, from the policy file and the groups file.
    pub groups: Groups,
}

impl Default for Policy {
    /// The built-in policy alone: what an empty file means.
    fn default() -> Self {
        Policy {
            builtin_devices: true,
            builtin_services: true,
            rules: Vec::new(),
            groups: Groups::default(),
        }
    }
}

impl Policy {
    /// May `who` publish to `topic`? Says what granted it, or why not.
    pub fn may_publish(&self, who: &Principal, topic: &str) -> Result<Grant<'_>, Denial> {
        self.decide(who, Access::Publish, topic)
    }

    /// May `who` subscribe to `filter`? A service may also share a filter
    /// it may read with its other instances: `$share/<group>/<filter>`.
    pub fn may_subscribe(&self, who: &Principal, filter: &str) -> Result<Grant<'_>, Denial> {
        self.decide(who, Access::Subscribe, filter)
    }

    /// The decision, and which rule made it.
    pub fn decide(
        &self,
        who: &Principal,
        access: Access,
        topic: &str,
    ) -> Result<Grant<'_>, Denial> {
        if access == Access::Subscribe
            && let Some(split) = shared(topic)
        {
            let (_, inner) = split?;
            return match who {
                Principal::Service(_) => self.decide_plain(who, access, inner),
                Principal::Device(_) => Err(Denial::SharedForServicesOnly),
            };
        }
        self.decide_plain(who, access, topic)
    }

    fn decide_plain(
        &self,
        who: &Principal,
        access: Access,
        topic: &str,
    ) -> Result<Grant<'_>, Denial> {
        let valid = match access {
            Access::Publish => builtin::valid_topic(topic),
            Access::Subscribe => builtin::valid_filter(topic),
        };
        if !valid {
            return Err(Denial::Malformed);
        }
        let builtin_on = match who {
            Principal::Device(_) => self.builtin_devices,
            Principal::Service(_) => self.builtin_services,
        };
        let builtin = if builtin_on {
            let decided = match access {
                Access::Publish => builtin::may_publish(who, topic),
                Access::Subscribe => builtin::may_subscribe_plain(who, topic),
            };
            match decided {
                Ok(()) => return Ok(Grant::Builtin),
                Err(d) => Some(d),
            }
        } else {
            None
        };
        let levels: Vec<&str> = topic.split('/').collect();
        for rule in &self.rules {
            if !rule.applies_to.iter().any(|s| self.is(who, s)) {
                continue;
            }
            let granted = rule.patterns(access).iter().any(|p| match access {
                Access::Publish => p.matches(&levels, who, &self.groups),
                Access::Subscribe => p.covers(&levels, who, &self.groups),
            });
            if granted {
                return Ok(Grant::Rule(&rule.name));
            }
        }
        Err(builtin.unwrap_or(Denial::NotGranted))
    }

    /// Whether `who` is `subject`.
    fn is(&self, who: &Principal, subject: &Subject) -> bool {
        match (subject, who) {
            (Subject::Devices, Principal::Device(_)) => true,
            (Subject::Services, Principal::Service(_)) => true,
            (Subject::Device(id), Principal::Device(me)) => id == me,
            (Subject::Service(name), Principal::Service(me)) => name == me,
            (Subject::Group(g), _) => self.groups.contains(g, who),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests;
