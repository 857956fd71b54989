//! The local publish API: a Unix socket through which apps on the board
//! publish under the device's own topics without touching its key.
//!
//! One request per connection: the subtopic on the first line, then the
//! payload until the client shuts down its side; one answer line, `ok
//! <queue position>` or `error <reason>`. (A framing this small needs no
//! crate: a line and a byte stream.)

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;
use twofold_protocol::Channel;
use twofold_protocol::topic::DEVICES;

use crate::queue::Queue;

/// The largest payload a local app may publish.
pub const MAX_PAYLOAD: usize = 256 * 1024;

/// The full topic for a local app's subtopic, or why it is refused. Apps
/// stay under `devices/<id>/`, cannot use wildcards, and cannot use the
/// channels the agent itself speaks on (a message on `commands` would be
/// run by this very agent).
pub fn app_topic(device: &str, subtopic: &str) -> Result<String, String> {
    if subtopic.is_empty() || subtopic.len() > 128 {
        return Err("the subtopic must be 1 to 128 bytes".into());
    }
    if subtopic.contains(['+', '#', '\0']) {
        return Err("the subtopic may not contain +, # or NUL".into());
    }
    if subtopic.split('/').any(str::is_empty) {
        return Err(
            "the subtopic may not have empty levels (leading, trailing or double /)".into(),
        );
    }
    let first = subtopic.split('/').next().unwrap_or_default();
    if Channel::ALL.iter().any(|c| c.as_str() == first) {
        return Err(format!(
            "{first:?} is the agent's own channel; use another subtopic, e.g. app/{subtopic}"
        ));
    }
    Ok(format!("{DEVICES}/{device}/{subtopic}"))
}

/// Serves the socket at `path` (0660) until the task is dropped.
pub async fn serve(
    path: &Path,
    device: String,
    queue: Queue,
    wake: Arc<Notify>,
) -> std::io::Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            return Err(std::io::Error::other(format!(
                "{} exists and is not a socket",
                path.display()
            )));
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let device = device.clone();
        let queue = queue.clone();
        let wake = wake.clone();
        tokio::spawn(async move {
            let _ = handle(stream, &device, &queue, &wake).await;
        });
    }
}

async fn handle(
    stream: UnixStream,
    device: &str,
    queue: &Queue,
    wake: &Notify,
) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let answer = match read_request(&mut rd).await {
        Err(e) => format!("error {e}\n"),
        Ok((subtopic, payload)) => match app_topic(device, &subtopic) {
            Err(e) => format!("error {e}\n"),
            Ok(topic) => {
                let queue = queue.clone();
                match tokio::task::spawn_blocking(move || queue.push(&topic, &payload)).await {
                    Ok(Ok(pushed)) => {
                        if pushed.dropped > 0 {
                            tracing::warn!(
                                dropped = pushed.dropped,
                                "queue full: oldest messages dropped"
                            );
                        }
                        wake.notify_one();
                        format!("ok {}\n", pushed.seq)
                    }
                    Ok(Err(e)) => format!("error {e}\n"),
                    Err(e) => format!("error {e}\n"),
                }
            }
        },
    };
    wr.write_all(answer.as_bytes()).await
}

async fn read_request<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
) -> Result<(String, Vec<u8>), String> {
    let mut line = Vec::new();
    (&mut *rd)
        .take(130)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| e.to_string())?;
    if line.last() != Some(&b'\n') {
        return Err("the first line must be the subtopic (at most 128 bytes)".into());
    }
    line.pop();
    let subtopic = String::from_utf8(line).map_err(|_| "the subtopic is not UTF-8".to_owned())?;
    let mut payload = Vec::new();
    (&mut *rd)
        .take(MAX_PAYLOAD as u64 + 1)
        .read_to_end(&mut payload)
        .await
        .map_err(|e| e.to_string())?;
    if payload.len() > MAX_PAYLOAD {
        return Err(format!("the payload is over {MAX_PAYLOAD} bytes"));
    }
    Ok((subtopic, payload))
}

/// The client side: publishes through a running agent; returns the queue
/// position.
pub async fn publish(socket: &Path, subtopic: &str, payload: &[u8]) -> anyhow::Result<i64> {
    let mut s = UnixStream::connect(socket).await.map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} (is the agent running, and are you in its group?)",
            socket.display()
        )
    })?;
    s.write_all(subtopic.as_bytes()).await?;
    s.write_all(b"\n").await?;
    s.write_all(payload).await?;
    s.shutdown().await?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).await?;
    match answer.trim_end().split_once(' ') {
        Some(("ok", seq)) => Ok(seq.parse()?),
        Some(("error", e)) => anyhow::bail!("the agent refused: {e}"),
        _ => anyhow::bail!("unexpected answer from the agent: {answer:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apps_stay_under_their_device_and_off_the_agents_channels() {
        assert_eq!(app_topic("d1", "app/door").unwrap(), "devices/d1/app/door");
        for bad in [
            "",
            "#",
            "app/+",
            "/x",
            "x/",
            "a//b",
            "commands",
            "commands/x",
            "replies",
            "telemetry",
            "state",
        ] {
            assert!(app_topic("d1", bad).is_err(), "{bad:?}");
        }
        assert!(app_topic("d1", &"x".repeat(129)).is_err());
    }
}
