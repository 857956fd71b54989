//! `provisioning groups` and `provisioning policy`: group memberships in
//! the registry, the groups file gateways read, and the policy file
//! checked and explained with `twofold_trust::policy`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use twofold_protocol::{DeviceId, GroupName, Principal};
use twofold_provisioning::registry::{Kind, Membership, Store, StoreTx};
use twofold_provisioning::{Error, Pki, atomic};
use twofold_trust::policy::{self, Access, Groups, Policy};

#[derive(clap::Subcommand)]
pub enum GroupsAction {
    /// Put devices or services in a group (created by its first member).
    ///
    /// A MEMBER is a device id, device:<id> or service:<name>. Gateways
    /// see the change once the groups file is exported where their
    /// `groups` setting reads it (`groups export`); they reload it within
    /// a second.
    Add {
        group: String,
        #[arg(required = true, value_name = "MEMBER")]
        members: Vec<String>,
    },
    /// Take devices or services out of a group.
    Remove {
        group: String,
        #[arg(required = true, value_name = "MEMBER")]
        members: Vec<String>,
    },
    /// List every group and its members.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the memberships as the gateway's groups file (atomically).
    Export {
        /// e.g. /etc/twofold/groups.toml on the gateway.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Subcommand)]
pub enum PolicyAction {
    /// Check a policy file: every problem is named with its rule.
    Check {
        file: PathBuf,
        /// A groups file to check with it.
        #[arg(long)]
        groups: Option<PathBuf>,
    },
    /// May IDENTITY publish or subscribe to TOPIC, and which rule decides?
    ///
    /// Exit status 0 if allowed, 2 if denied, 1 on error.
    Explain {
        /// The policy file; the built-in policy when absent.
        #[arg(long)]
        policy: Option<PathBuf>,
        /// A groups file; the registry's memberships when absent.
        #[arg(long)]
        groups: Option<PathBuf>,
        /// A device id, device:<id> or service:<name>.
        identity: String,
        #[arg(value_enum)]
        access: AccessArg,
        /// The topic (publish) or filter (subscribe).
        topic: String,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum AccessArg {
    Publish,
    Subscribe,
}

/// A device id alone, or `device:<id>` / `service:<name>`.
pub fn member(text: &str) -> anyhow::Result<Principal> {
    if text.contains(':') {
        return policy::file::principal(text).map_err(|e| anyhow::anyhow!(e));
    }
    DeviceId::parse(text)
        .map(Principal::Device)
        .map_err(|e| anyhow::anyhow!("{text:?}: the device id {e}"))
}

fn group(text: &str) -> anyhow::Result<GroupName> {
    GroupName::parse(text).map_err(|e| {
        anyhow::anyhow!("{text:?} is not a group name: {e} (a-z, 0-9 and '-', at most 64)")
    })
}

fn membership(group: &GroupName, who: Principal) -> Membership {
    let (kind, name) = match who {
        Principal::Device(id) => (Kind::Device, id.as_str().to_owned()),
        Principal::Service(name) => (Kind::Service, name.as_str().to_owned()),
    };
    Membership {
        group: group.as_str().to_owned(),
        kind,
        name,
    }
}

/// Adds (or removes) `members` to `group` in one transaction; says what changed.
pub fn set(pki: &mut Pki, group_name: &str, members: &[String], add: bool) -> anyhow::Result<()> {
    let g = group(group_name)?;
    let members: Vec<Principal> = members
        .iter()
        .map(|m| member(m))
        .collect::<anyhow::Result<_>>()?;
    let tx = pki.store_mut().begin()?;
    let mut changed = Vec::new();
    for who in members {
        if tx.set_membership(&membership(&g, who), add)? {
            changed.push(label(&who));
        }
    }
    tx.commit()?;
    let verb = if add { "added to" } else { "removed from" };
    if changed.is_empty() {
        println!("nothing changed in group {g}");
    } else {
        println!("{} {verb} group {g}", changed.join(", "));
        println!(
            "gateways see it once the groups file is exported: provisioning groups export --out FILE"
        );
    }
    Ok(())
}

fn label(who: &Principal) -> String {
    match who {
        Principal::Device(id) => format!("device:{id}"),
        Principal::Service(name) => format!("service:{name}"),
    }
}

/// The registry's memberships as policy groups; a row that is not a
/// valid membership is a corrupt registry.
pub fn registry_groups(pki: &Pki) -> anyhow::Result<Groups> {
    let mut groups = Groups::default();
    for m in pki.store().memberships()? {
        let g = GroupName::parse(&m.group)
            .map_err(|e| anyhow::anyhow!("the registry holds the group {:?}: {e}", m.group))?;
        let who = match m.kind {
            Kind::Device => DeviceId::parse(&m.name).map(Principal::Device),
            Kind::Service => twofold_protocol::ServiceName::parse(&m.name).map(Principal::Service),
            other => bail!(
                "the registry holds a membership of a {other} in {}",
                m.group
            ),
        }
        .map_err(|e| anyhow::anyhow!("the registry holds the member {:?}: {e}", m.name))?;
        groups.add(g, who);
    }
    Ok(groups)
}

/// The groups file the gateway reads.
pub fn groups_file(groups: &Groups) -> String {
    let mut out = String::from(
        "# Written by `provisioning groups export` from the registry: change\n\
         # memberships with `provisioning groups add/remove`, not here.\n[groups]\n",
    );
    for (g, members) in groups.iter() {
        let list: Vec<String> = members.iter().map(|m| format!("{:?}", label(m))).collect();
        out.push_str(&format!("{g} = [{}]\n", list.join(", ")));
    }
    out
}

pub fn groups(pki: Result<Pki, Error>, action: &GroupsAction) -> anyhow::Result<()> {
    let mut pki = pki?;
    match action {
        GroupsAction::Add { group, members } => set(&mut pki, group, members, true),
        GroupsAction::Remove { group, members } => set(&mut pki, group, members, false),
        GroupsAction::List { json } => {
            let groups = registry_groups(&pki)?;
            if *json {
                let map: std::collections::BTreeMap<String, Vec<String>> = groups
                    .iter()
                    .map(|(g, m)| (g.to_string(), m.iter().map(label).collect()))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&map)?);
            } else {
                for (g, members) in groups.iter() {
                    let list: Vec<String> = members.iter().map(label).collect();
                    println!("{g}: {}", list.join(", "));
                }
            }
            Ok(())
        }
        GroupsAction::Export { out } => {
            let groups = registry_groups(&pki)?;
            let text = groups_file(&groups);
            // What the gateway will read must parse as it reads it.
            policy::file::parse_groups(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
            atomic::write(out, text.as_bytes(), 0o644, atomic::Durability::Sync)
                .with_context(|| format!("cannot write {}", out.display()))?;
            let members: usize = groups.iter().map(|(_, m)| m.len()).sum();
            println!(
                "wrote {} ({} groups, {members} memberships)",
                out.display(),
                groups.iter().count()
            );
            Ok(())
        }
    }
}

pub fn policy(
    pki: impl FnOnce() -> Result<Pki, Error>,
    action: &PolicyAction,
) -> anyhow::Result<ExitCode> {
    match action {
        PolicyAction::Check { file, groups } => {
            let p =
                policy::file::load(file, groups.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?;
            println!(
                "{}: {} rules, built-in devices {}, built-in services {}, {} groups",
                file.display(),
                p.rules.len(),
                on(p.builtin_devices),
                on(p.builtin_services),
                p.groups.iter().count()
            );
            // A group with no member grants nothing: most likely a typo,
            // unless its members come from the registry's export.
            for (rule, group) in named_groups(&p) {
                if !p.groups.iter().any(|(g, _)| *g == group) {
                    println!(
                        "warning: rule {rule:?} names group {group}, which has no members here \
                         (give the groups file with --groups; a misspelt group grants nothing)"
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyAction::Explain {
            policy: file,
            groups,
            identity,
            access,
            topic,
        } => {
            let mut p = match file {
                Some(f) => {
                    policy::file::load(f, groups.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?
                }
                None => Policy::default(),
            };
            if groups.is_none() {
                let pki =
                    pki().context("reading the groups from the registry (or give --groups)")?;
                p.groups.merge(registry_groups(&pki)?);
                println!(
                    "(groups from the registry: a gateway sees a change once `groups export` \
                     has written its groups file)"
                );
            }
            let who = member(identity)?;
            let access = match access {
                AccessArg::Publish => Access::Publish,
                AccessArg::Subscribe => Access::Subscribe,
            };
            let in_groups: Vec<String> = p.groups.of(&who).map(|g| g.to_string()).collect();
            let groups_text = if in_groups.is_empty() {
                "no groups".to_owned()
            } else {
                format!("groups {}", in_groups.join(", "))
            };
            match p.decide(&who, access, topic) {
                Ok(grant) => {
                    println!(
                        "allowed: {} may {} {topic:?} ({groups_text}): {grant}",
                        label(&who),
                        access.as_str()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(denial) => {
                    println!(
                        "denied: {} may not {} {topic:?} ({groups_text}): {denial}",
                        label(&who),
                        access.as_str()
                    );
                    Ok(ExitCode::from(2))
                }
            }
        }
    }
}

/// Every (rule, group) the rules name, as a subject or in {member:G}.
fn named_groups(p: &Policy) -> Vec<(String, GroupName)> {
    use twofold_trust::policy::{Level, Subject};
    let mut out = Vec::new();
    for rule in &p.rules {
        for s in &rule.applies_to {
            if let Subject::Group(g) = s {
                out.push((rule.name.clone(), *g));
            }
        }
        for pattern in rule.publish.iter().chain(&rule.subscribe) {
            for level in pattern.levels() {
                if let Level::Member(g) = level {
                    out.push((rule.name.clone(), *g));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn on(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}
