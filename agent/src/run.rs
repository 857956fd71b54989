//! `agent run`: the tasks of a running agent, wired together.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use twofold_protocol::{Channel, Topic};

use crate::commands;
use crate::config::Config;
use crate::identity::{self, Expiry};
use crate::link::{End, Link};
use crate::queue::Queue;
use crate::renew::Renewal;
use crate::telemetry::{self, Sampler};

/// Runs the agent until `shutdown` turns true. A renewal that changes
/// the certificate to connect with starts the agent's tasks again, on the
/// identity then on disk; the queue carries over untouched.
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    loop {
        match run_once(&config, shutdown.clone()).await? {
            End::Shutdown => return Ok(()),
            End::Renewed => continue,
        }
    }
}

async fn run_once(config: &Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<End> {
    let paths = Renewal::recover(&config.identity).map_err(|e| anyhow::anyhow!(e))?;
    let me = identity::load(&paths)?;
    let trust_domain = twofold_protocol::Identity::parse(&me.uri)
        .map_err(|e| anyhow::anyhow!("{}: {e}", paths.cert.display()))?
        .trust_domain;
    let renewal = Arc::new(Renewal::new(&config.identity, me.id, trust_domain));
    let device = me.id.as_str().to_owned();
    if let Some(dir) = config.queue_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let queue = Queue::open(&config.queue_path, config.queue_max)?;
    let waiting = queue.len()?;
    tracing::info!(
        device = %device,
        identity = %me.uri,
        serial = %me.serial,
        gateway = %format!("{}:{}", config.host, config.port),
        queued = waiting,
        "agent starting"
    );
    match (&config.identity.server_crl, &me.server_crl) {
        (Some(path), Some(_)) => tracing::info!(
            crl = %path.display(),
            "the gateway's certificate is checked against this CRL"
        ),
        (Some(path), None) => tracing::warn!(
            crl = %path.display(),
            "no server CRL yet: the gateway's certificate is not checked for revocation; \
             copy the PKI's server-crl.pem there and the agent takes it within seconds"
        ),
        (None, _) => tracing::warn!(
            "no server CRL: the gateway's certificate is not checked for revocation; \
             set identity.server_crl to the PKI's server-crl.pem (or use identity.bundle)"
        ),
    }
    if let Some(fetch) = &config.server_crl_fetch {
        tracing::info!(url = %fetch.url, every = ?fetch.every, "new server CRLs are fetched from this URL");
    }
    let wake = Arc::new(Notify::new());
    let (commands_tx, mut commands_rx) = mpsc::channel::<Vec<u8>>(16);
    let (tls_tx, tls) = watch::channel(me.tls.clone());
    let floor = identity::CrlFloor::new(me.server_crl.as_ref().map(|c| c.crls.as_slice()));
    let crl_watch = tokio::spawn(identity::watch_server_crl(
        me.clone(),
        floor.clone(),
        tls_tx,
    ));
    let crl_fetch = tokio::spawn({
        let (fetch, paths) = (config.server_crl_fetch.clone(), config.identity.clone());
        async move {
            if let Some(fetch) = fetch {
                crate::crl_fetch::run(fetch, paths, floor).await;
            }
        }
    });

    let link = Link {
        identity: me.clone(),
        tls,
        host: config.host.clone(),
        port: config.port,
        keep_alive: config.keep_alive,
        queue: queue.clone(),
        wake: wake.clone(),
        reconnect_min: config.reconnect_min,
        reconnect_max: config.reconnect_max,
        refused_wait: config.reconnect_refused,
        cert_path: config.identity.cert.clone(),
        commands: commands_tx,
        renewal,
    };
    let link = tokio::spawn(link.run(shutdown.clone()));

    // Telemetry every interval, stored before it is sent.
    let telemetry = {
        let queue = queue.clone();
        let wake = wake.clone();
        let topic = Topic::new(me.id, Channel::Telemetry).to_string();
        let format = config.format;
        let interval = config.telemetry_interval;
        tokio::spawn(async move {
            let mut sampler = Sampler::default();
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let readings = sampler.sample();
                let queue = queue.clone();
                let topic = topic.clone();
                let pushed = tokio::task::spawn_blocking(move || {
                    queue.push_with(&topic, Some("telemetry"), |seq| {
                        telemetry::encode(seq, telemetry::now_ms(), &readings, format)
                    })
                })
                .await;
                match pushed {
                    Ok(Ok(p)) => {
                        if p.dropped > 0 {
                            tracing::warn!(
                                dropped = p.dropped,
                                "queue full: oldest messages dropped"
                            );
                        }
                        wake.notify_one();
                    }
                    Ok(Err(e)) => tracing::error!(error = %e, "cannot store telemetry"),
                    Err(e) => tracing::error!(error = %e, "telemetry task failed"),
                }
            }
        })
    };

    // Commands, one at a time; replies go through the queue.
    let runner = {
        let queue = queue.clone();
        let wake = wake.clone();
        let topic = Topic::new(me.id, Channel::Replies).to_string();
        let table = config.commands.clone();
        let format = config.format;
        tokio::spawn(async move {
            while let Some(payload) = commands_rx.recv().await {
                let (id, name, body) = match commands::decode(&payload, format) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, bytes = payload.len(), "not a command; ignored (no id to answer to)");
                        continue;
                    }
                };
                let outcome = commands::run(id, &name, &body, &table).await;
                tracing::info!(id, command = %name, status = ?outcome.status, exit_code = ?outcome.exit_code, "command handled");
                let reply = outcome.encode(format);
                let queue = queue.clone();
                let topic = topic.clone();
                match tokio::task::spawn_blocking(move || queue.push(&topic, &reply)).await {
                    Ok(Ok(_)) => wake.notify_one(),
                    Ok(Err(e)) => tracing::error!(error = %e, "cannot store a reply"),
                    Err(e) => tracing::error!(error = %e, "reply task failed"),
                }
            }
        })
    };

    let api = {
        let socket = config.socket.clone();
        let queue = queue.clone();
        let wake = wake.clone();
        let device = device.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::api::serve(&socket, device, queue, wake).await {
                tracing::error!(socket = %socket.display(), error = %e, "local publish API unavailable");
            }
        })
    };

    let expiry = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tick.tick().await;
            check_expiry(&me);
        }
    });

    let end = link.await.unwrap_or(End::Shutdown);
    for task in [telemetry, runner, api, expiry, crl_watch, crl_fetch] {
        task.abort();
    }
    let _ = std::fs::remove_file(&config.socket);
    if end == End::Shutdown {
        tracing::info!(queued = queue.len().unwrap_or(0), "agent stopped");
    }
    Ok(end)
}

fn check_expiry(me: &identity::DeviceIdentity) {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let renew = "re-enroll this device: on the operator's machine `provisioning enroll ... --replace`, \
                 or `agent keygen` here and `provisioning sign-csr --id <id> --replace` there";
    match identity::expiry(me.not_before, me.not_after, now, me.id.as_str()) {
        Expiry::Fine => {}
        Expiry::RenewSoon { days_left } => tracing::warn!(
            serial = %me.serial, days_left,
            "the device certificate is due for renewal (two thirds of its lifetime); {renew}"
        ),
        Expiry::Expired => tracing::error!(
            serial = %me.serial,
            "the device certificate has EXPIRED; the gateway will refuse it; {renew}"
        ),
        Expiry::NotYetValid => tracing::error!(
            serial = %me.serial,
            "the device certificate is not valid yet: is the clock right? (check NTP)"
        ),
    }
}
