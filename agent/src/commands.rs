//! Commands from `devices/<id>/commands`: the built-in `ping`, and the
//! operator's commands from the config, each a fixed program with fixed
//! arguments. Nothing from the message becomes an argument or a path: the
//! name only selects an entry, and the body goes to standard input.

use std::collections::BTreeMap;
use std::process::Stdio;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use twofold_protocol::message::{self, Command, Reply, ReplyStatus};

use crate::config::{CommandSpec, Format};

/// The built-in liveness command.
pub const PING: &str = "ping";

/// The most output sent back in a reply.
pub const MAX_OUTPUT: usize = 4096;

/// A decided reply, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub id: u32,
    pub status: ReplyStatus,
    pub exit_code: Option<i32>,
    pub output: Vec<u8>,
}

impl Outcome {
    fn new(id: u32, status: ReplyStatus, output: impl Into<Vec<u8>>) -> Self {
        Outcome {
            id,
            status,
            exit_code: None,
            output: output.into(),
        }
    }

    /// The reply payload in the configured format.
    pub fn encode(&self, format: Format) -> Vec<u8> {
        let reply = Reply {
            id: self.id,
            status: self.status,
            exit_code: self.exit_code,
            output: &self.output,
        };
        match format {
            Format::Json => serde_json::to_vec(&reply).unwrap_or_default(),
            Format::Postcard => {
                let mut buf = vec![0u8; MAX_OUTPUT + 64];
                message::encode(&reply, &mut buf)
                    .map(|b| b.to_vec())
                    .unwrap_or_default()
            }
        }
    }
}

/// Decodes a command payload. `None` when it is not a command at all
/// (there is then no id to answer to).
pub fn decode(payload: &[u8], format: Format) -> Result<(u32, String, Vec<u8>), String> {
    match format {
        Format::Postcard => message::decode::<Command>(payload)
            .map(|c| (c.id, c.name.to_owned(), c.body.to_vec()))
            .map_err(|e| e.to_string()),
        Format::Json => {
            #[derive(serde::Deserialize)]
            struct Owned {
                id: u32,
                name: String,
                #[serde(default)]
                body: Vec<u8>,
            }
            serde_json::from_slice::<Owned>(payload)
                .map(|c| (c.id, c.name, c.body))
                .map_err(|e| e.to_string())
        }
    }
}

/// Runs one command and decides the reply.
pub async fn run(
    id: u32,
    name: &str,
    body: &[u8],
    table: &BTreeMap<String, CommandSpec>,
) -> Outcome {
    if name == PING {
        let mut o = Outcome::new(id, ReplyStatus::Ok, b"pong".to_vec());
        o.exit_code = None;
        return o;
    }
    let Some(spec) = table.get(name) else {
        return Outcome::new(
            id,
            ReplyStatus::UnknownCommand,
            format!(
                "no command {name:?} on this device (configured: ping{})",
                table.keys().map(|k| format!(", {k}")).collect::<String>()
            ),
        );
    };
    let child = tokio::process::Command::new(&spec.program)
        .args(&spec.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return Outcome::new(
                id,
                ReplyStatus::Failed,
                format!("cannot start {}: {e}", spec.program.display()),
            );
        }
    };
    let mut stdin = child.stdin.take();
    let body = body.to_vec();
    let feed = async move {
        if let Some(stdin) = stdin.as_mut() {
            let _ = stdin.write_all(&body).await;
        }
        drop(stdin);
    };
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let collect = async move {
        // Read both to the end (a child blocked on a full pipe never exits),
        // keeping at most MAX_OUTPUT bytes.
        let mut out = Vec::new();
        let mut err = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut out).await;
        }
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut err).await;
        }
        out.extend_from_slice(&err);
        out.truncate(MAX_OUTPUT);
        out
    };
    let work = async {
        let ((), output) = tokio::join!(feed, collect);
        let status = child.wait().await;
        (status, output)
    };
    match tokio::time::timeout(spec.timeout, work).await {
        Ok((Ok(status), output)) => Outcome {
            id,
            status: if status.success() {
                ReplyStatus::Ok
            } else {
                ReplyStatus::Failed
            },
            exit_code: status.code(),
            output,
        },
        Ok((Err(e), _)) => Outcome::new(id, ReplyStatus::Failed, e.to_string()),
        Err(_) => Outcome::new(
            id,
            ReplyStatus::TimedOut,
            format!("stopped after {:?}", spec.timeout),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn table() -> BTreeMap<String, CommandSpec> {
        let spec = |program: &str, args: &[&str], secs| CommandSpec {
            program: program.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            timeout: Duration::from_secs(secs),
        };
        BTreeMap::from([
            ("echo".to_owned(), spec("/bin/cat", &[], 5)),
            (
                "fail".to_owned(),
                spec("/bin/sh", &["-c", "echo no >&2; exit 3"], 5),
            ),
            ("slow".to_owned(), spec("/bin/sleep", &["30"], 1)),
        ])
    }

    #[tokio::test]
    async fn commands_run_with_fixed_arguments_and_report() {
        let t = table();
        assert_eq!(run(1, "ping", b"", &t).await.output, b"pong");
        let o = run(2, "echo", b"$(reboot); rm -rf /", &t).await;
        assert_eq!((o.status, o.exit_code), (ReplyStatus::Ok, Some(0)));
        // The body is data on stdin, never a shell word.
        assert_eq!(o.output, b"$(reboot); rm -rf /");
        let o = run(3, "fail", b"", &t).await;
        assert_eq!((o.status, o.exit_code), (ReplyStatus::Failed, Some(3)));
        assert_eq!(o.output, b"no\n");
        let o = run(4, "/bin/sh", b"", &t).await;
        assert_eq!(o.status, ReplyStatus::UnknownCommand);
        let o = run(5, "slow", b"", &t).await;
        assert_eq!(o.status, ReplyStatus::TimedOut);
    }

    #[test]
    fn replies_round_trip() {
        let o = Outcome::new(9, ReplyStatus::Ok, b"pong".to_vec());
        let bytes = o.encode(Format::Postcard);
        let r: Reply = message::decode(&bytes).unwrap();
        assert_eq!(
            (r.id, r.status, r.output),
            (9, ReplyStatus::Ok, &b"pong"[..])
        );
        assert!(decode(b"\xff\xff", Format::Postcard).is_err());
    }
}
