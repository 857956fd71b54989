//! The topic policy in force: who may publish and subscribe where.
//!
//! The decision is `twofold_trust::policy`'s, a pure function of the
//! policy, the identity and the topic. Without a `policy` setting it is
//! the built-in policy. With one, the file (and the `groups` file) is read
//! at start, where a broken file stops the gateway, and again when either
//! changes (polled every second) or on SIGHUP, where a broken file is
//! refused and the policy in force stays. Every session sees a reload at
//! its next PUBLISH or SUBSCRIBE. What the broker already has (a granted
//! subscription, kept across reconnects by a persistent session) stays
//! there, so with a policy file every delivery is checked too, and what
//! the identity may no longer read is withheld (`session/from_broker.rs`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use twofold_protocol::Principal;
pub use twofold_trust::policy::{Access, Denial, Grant, Policy, PolicyError, shared};

/// Where the policy comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyFiles {
    /// The rules (TOML).
    pub policy: PathBuf,
    /// Group memberships (TOML, `provisioning groups export` writes it).
    pub groups: Option<PathBuf>,
}

impl PolicyFiles {
    /// Reads and checks both files.
    pub fn load(&self) -> Result<Policy, PolicyError> {
        twofold_trust::policy::file::load(&self.policy, self.groups.as_deref())
    }
}

/// The policy in force, as each session reads it.
#[derive(Clone, Debug)]
pub struct InForce {
    policy: watch::Receiver<Arc<Policy>>,
    /// Read from files, so it can change while sessions live.
    reloadable: bool,
}

impl Default for InForce {
    /// The built-in policy, for good.
    fn default() -> Self {
        InForce::fixed(Policy::default())
    }
}

impl InForce {
    /// A policy that never changes.
    pub fn fixed(policy: Policy) -> InForce {
        InForce {
            policy: watch::channel(Arc::new(policy)).1,
            reloadable: false,
        }
    }

    /// A policy that the returned sender replaces (a reload).
    pub fn reloadable(policy: Policy) -> (watch::Sender<Arc<Policy>>, InForce) {
        let (tx, rx) = watch::channel(Arc::new(policy));
        (
            tx,
            InForce {
                policy: rx,
                reloadable: true,
            },
        )
    }

    /// May `who` publish to `topic`?
    pub fn may_publish(&self, who: &Principal, topic: &str) -> Result<(), Denial> {
        self.policy.borrow().may_publish(who, topic).map(|_| ())
    }

    /// May `who` subscribe to `filter`?
    pub fn may_subscribe(&self, who: &Principal, filter: &str) -> Result<(), Denial> {
        self.policy.borrow().may_subscribe(who, filter).map(|_| ())
    }

    /// Whether what the broker delivers must be checked again: with a
    /// policy that can change (a file), a subscription granted earlier may
    /// no longer be allowed. The built-in policy never changes, so what it
    /// granted stays granted, and its deliveries cost no check.
    pub fn restricts_reading(&self) -> bool {
        self.reloadable
    }
}

/// Loads the policy (a broken file is an error: the gateway does not
/// start on it) and starts its reloads. The built-in policy without files.
pub fn start(files: Option<PolicyFiles>) -> Result<InForce, PolicyError> {
    let Some(files) = files else {
        return Ok(InForce::default());
    };
    let policy = files.load()?;
    tracing::info!(
        policy = %files.policy.display(),
        rules = policy.rules.len(),
        "topic policy loaded"
    );
    let (tx, in_force) = InForce::reloadable(policy);
    tokio::spawn(watch_files(files, tx));
    Ok(in_force)
}

async fn watch_files(files: PolicyFiles, tx: watch::Sender<Arc<Policy>>) {
    let stamp = |f: &PolicyFiles| {
        (
            twofold_trust::FileStamp::of(&f.policy),
            f.groups.as_deref().and_then(twofold_trust::FileStamp::of),
        )
    };
    let mut last = stamp(&files);
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            Some(_) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
        };
        let now = stamp(&files);
        if !forced && now == last {
            continue;
        }
        last = now;
        match files.load() {
            Ok(policy) => {
                let rules = policy.rules.len();
                tx.send_replace(Arc::new(policy));
                tracing::info!(rules, "topic policy reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "REFUSED the new topic policy; the previous one stays in force")
            }
        }
    }
}
