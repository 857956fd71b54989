//! Topic patterns of policy rules: MQTT filter syntax plus variables that
//! stand for one whole level.

use std::fmt;

use twofold_protocol::{DeviceId, GroupName, Principal};

use super::Groups;

/// One level of a pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Level {
    /// This exact text.
    Literal(String),
    /// `+`: any one level.
    Plus,
    /// `#`: every level from here on, none included (last only).
    Hash,
    /// `{device}`: the device's own id (never matches a service).
    Device,
    /// `{service}`: the service's own name (never matches a device).
    Service,
    /// `{group}`: any group the identity is in.
    Group,
    /// `{member:GROUP}`: the id of any device in GROUP.
    Member(GroupName),
}

/// A parsed pattern; [`Pattern::parse`] is the only way to make one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    levels: Vec<Level>,
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Pattern {
    /// Parses `text`, or says what is wrong with it.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        if text.is_empty() {
            return Err("is empty".into());
        }
        if text.contains('\0') {
            return Err("contains NUL".into());
        }
        if text.starts_with("$share/") || text == "$share" {
            return Err(
                "starts with $share: shared subscriptions are checked by their filter, so grant \
                 the filter itself"
                    .into(),
            );
        }
        let parts: Vec<&str> = text.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let level = match *part {
                "#" if i + 1 == parts.len() => Level::Hash,
                "#" => return Err("has # before the last level".into()),
                "+" => Level::Plus,
                "{device}" => Level::Device,
                "{service}" => Level::Service,
                "{group}" => Level::Group,
                p if p.starts_with('{') => {
                    let inner = p
                        .strip_prefix("{member:")
                        .and_then(|r| r.strip_suffix('}'))
                        .ok_or_else(|| {
                            format!(
                                "has the unknown variable {p}; use {{device}}, {{service}}, \
                                 {{group}} or {{member:GROUP}}"
                            )
                        })?;
                    let group = GroupName::parse(inner)
                        .map_err(|e| format!("names the group {inner:?} in {p}: {e}"))?;
                    Level::Member(group)
                }
                p if p.contains(['+', '#', '{', '}']) => {
                    return Err(format!(
                        "has {p:?}: wildcards and variables must be a whole level"
                    ));
                }
                p => Level::Literal(p.to_owned()),
            };
            levels.push(level);
        }
        Ok(Pattern {
            text: text.to_owned(),
            levels,
        })
    }

    /// The levels.
    pub fn levels(&self) -> &[Level] {
        &self.levels
    }

    /// Whether the topic (levels, no wildcards) matches, for `who`.
    pub fn matches(&self, topic: &[&str], who: &Principal, groups: &Groups) -> bool {
        // MQTT: a wildcard first level never matches a `$` topic.
        if topic.first().is_some_and(|t| t.starts_with('$'))
            && matches!(self.levels.first(), Some(Level::Plus | Level::Hash))
        {
            return false;
        }
        let mut t = topic.iter();
        for (i, level) in self.levels.iter().enumerate() {
            if *level == Level::Hash {
                return true;
            }
            let Some(part) = t.next() else {
                return false;
            };
            if !level_matches(level, i, part, who, groups) {
                return false;
            }
        }
        t.next().is_none()
    }

    /// Whether every topic the filter (levels) can match is one this
    /// pattern matches, for `who`.
    pub fn covers(&self, filter: &[&str], who: &Principal, groups: &Groups) -> bool {
        if filter.first().is_some_and(|t| t.starts_with('$'))
            && matches!(self.levels.first(), Some(Level::Plus | Level::Hash))
        {
            return false;
        }
        let mut f = filter.iter();
        for (i, level) in self.levels.iter().enumerate() {
            if *level == Level::Hash {
                return true;
            }
            let Some(part) = f.next() else {
                return false;
            };
            let ok = match *part {
                // Only # covers #, only + or # covers +.
                "#" => false,
                "+" => *level == Level::Plus,
                part => level_matches(level, i, part, who, groups),
            };
            if !ok {
                return false;
            }
        }
        f.next().is_none()
    }
}

/// One concrete topic level, the `index`th, against one pattern level.
/// A variable first level never stands for `devices`: a device, service
/// or group named so must not turn `{device}/#` into every device's
/// subtree.
fn level_matches(
    level: &Level,
    index: usize,
    part: &str,
    who: &Principal,
    groups: &Groups,
) -> bool {
    let variable = matches!(
        level,
        Level::Device | Level::Service | Level::Group | Level::Member(_)
    );
    if variable && index == 0 && part == twofold_protocol::topic::DEVICES {
        return false;
    }
    match level {
        Level::Literal(l) => l == part,
        Level::Plus | Level::Hash => true,
        Level::Device => matches!(who, Principal::Device(me) if me.as_str() == part),
        Level::Service => matches!(who, Principal::Service(me) if me.as_str() == part),
        Level::Group => GroupName::parse(part).is_ok_and(|g| groups.contains(&g, who)),
        Level::Member(group) => {
            DeviceId::parse(part).is_ok_and(|id| groups.contains(group, &Principal::Device(id)))
        }
    }
}
