//! Fetching the server CRL from where the operator publishes it
//! (`identity.server_crl_url`, e.g. the CRL distribution point written
//! into the gateway's certificate by `provisioning gateway-cert
//! --crl-url`). A fetched CRL replaces the file only if it is signed by the
//! server CA, rustls can use it, and its number is not lower than the one
//! in force; the file's watcher ([`crate::identity::watch_server_crl`])
//! then takes it, as it would a file the operator copied over.

use std::path::Path;
use std::time::Duration;

use crate::config::{CrlFetch, IdentityPaths};
use twofold_trust::crl::CrlHistory;

use crate::identity::{self, CrlFloor};

/// The largest CRL accepted: far above a server CA's (a few gateway
/// certificates), far below what would hurt a small board.
const MAX_CRL_BYTES: u64 = 1 << 20;
/// The longest a fetch may take, connection to last byte.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// A CRL the URL served, checked against the server CA.
#[derive(Debug)]
pub struct Served {
    /// As PEM, the way the file holds it.
    pub pem: Vec<u8>,
    /// Its CRL number (the highest, with several server CAs).
    pub number: Option<u64>,
    /// The number in force: the file's, or the running agent's if higher.
    pub in_force: Option<u64>,
    /// Why it is older than the CRL in force, CA by CA: a lower number,
    /// or none where there was one. It would hide revocations made since.
    pub older: Option<String>,
}

/// What one fetch did.
#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    /// The same CRL as the file's.
    Unchanged,
    /// A new CRL, now in the file.
    Replaced { number: Option<u64> },
}

/// Fetches every `fetch.every` (the first at once) while the agent runs.
pub async fn run(fetch: CrlFetch, paths: IdentityPaths, floor: CrlFloor) {
    let mut tick = tokio::time::interval(fetch.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (url, p, floor) = (fetch.url.clone(), paths.clone(), floor.get());
        match tokio::task::spawn_blocking(move || once(&url, &p, &floor)).await {
            Ok(Ok(Fetched::Unchanged)) => {
                tracing::debug!(url = %fetch.url, "server CRL unchanged")
            }
            Ok(Ok(Fetched::Replaced { number })) => {
                tracing::info!(url = %fetch.url, number = ?number, "fetched a new server CRL")
            }
            Ok(Err(e)) => tracing::warn!(
                url = %fetch.url,
                error = %e,
                "cannot use the server CRL from its URL; the one in force stays"
            ),
            Err(e) => tracing::error!(error = %e, "server CRL fetch failed"),
        }
    }
}

/// GETs `url` and checks what it serves against the server CA and the CRL
/// in force (the file's, or `floor` if higher); writes nothing (`agent
/// doctor` reports this). Errors name the URL. Blocking.
pub fn fetch(url: &str, paths: &IdentityPaths, floor: &CrlHistory) -> Result<Served, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(FETCH_TIMEOUT))
        .build()
        .into();
    let mut response = agent.get(url).call().map_err(|e| format!("{url}: {e}"))?;
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_CRL_BYTES)
        .read_to_vec()
        .map_err(|e| format!("{url}: {e}"))?;
    // Distribution points serve DER (RFC 5280); a PEM file is taken too.
    let pem = if body.starts_with(b"-----BEGIN") {
        body
    } else {
        let lf = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
        pem::encode_config(&pem::Pem::new("X509 CRL", body), lf).into_bytes()
    };
    let cas = identity::load_certs(&paths.server_ca).map_err(|e| e.to_string())?;
    let crls =
        identity::server_crl_from_pem(&pem, Path::new(url), &cas).map_err(|e| e.to_string())?;
    let mut in_force = floor.clone();
    if let Some(file) = paths
        .server_crl
        .as_deref()
        .and_then(|path| identity::load_server_crl(path, &cas).ok())
    {
        in_force = in_force.with(&file);
    }
    Ok(Served {
        number: crls.iter().filter_map(|c| c.number).max(),
        pem,
        in_force: in_force.highest(),
        older: in_force
            .accept(&crls, |_| true)
            .err()
            .map(|why| why.to_string()),
    })
}

/// One fetch: GET `url`, check what came, and write it over the server
/// CRL file if it is new. Blocking.
pub fn once(url: &str, paths: &IdentityPaths, floor: &CrlHistory) -> Result<Fetched, String> {
    let path = paths
        .server_crl
        .as_deref()
        .ok_or("no server CRL file to update")?;
    let served = fetch(url, paths, floor)?;
    if std::fs::read(path).is_ok_and(|current| current == served.pem) {
        return Ok(Fetched::Unchanged);
    }
    if let Some(why) = served.older {
        return Err(format!("it serves an older CRL: {why}"));
    }
    // Written beside the file and renamed over it, so the watcher never
    // reads half of it.
    crate::files::replace(path, &served.pem, 0o644)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Fetched::Replaced {
        number: served.number,
    })
}
