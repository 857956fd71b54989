//! Child processes with bounded waits.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// A loopback port nothing uses at the moment, below Linux's ephemeral
/// range (32768–60999): a port the kernel handed out (port 0) could be
/// taken as the local end of an outgoing connection (hundreds of them
/// while simulated devices run) before the server binds it. A port is
/// handed out once per process, so parallel tests do not draw the same.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::hash::{BuildHasher, RandomState};
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let random = RandomState::new();
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    for attempt in 0u32..10_000 {
        let port = 10_000 + (random.hash_one(attempt) % 22_000) as u16;
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free loopback port in 10000-31999");
}

/// Waits (at most 20 s) until something accepts on `port`.
pub fn wait_port(port: u16, what: &str) {
    assert!(
        wait_until(20, || TcpStream::connect(("127.0.0.1", port)).is_ok()),
        "{what} did not listen on {port}"
    );
}

/// Polls `cond` every 50 ms for up to `secs`; true as soon as it holds.
pub fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// A workspace binary, found next to the running test binary
/// (`target/<profile>/deps/<test>` → `target/<profile>/<name>`).
pub fn built(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.is_file(),
        "{} is not built; `cargo test --workspace` builds it (or `cargo build --bins`)",
        path.display()
    );
    path
}

/// A child process killed (-9) when dropped, its stderr in `log`.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// kill -9, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `cmd` with no stdin, stdout discarded and stderr into `log`.
pub fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    Proc { child, log }
}

/// Asserts that `child` is still running (`why` says what would have
/// stopped it), then kills and reaps it.
pub fn assert_alive_then_kill(mut child: Child, why: &str) {
    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(alive, "{why}");
}

/// Runs a command to its end, killed after `secs`.
pub fn run_bounded(mut cmd: Command, secs: u64) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    finish(child, secs)
}

/// Waits for a child up to `secs` seconds (then kills it) and collects its
/// output. Stdout and stderr are drained while waiting: a child blocked on a
/// full pipe would otherwise look like a stalled peer.
pub fn finish(mut child: Child, secs: u64) -> Output {
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut out);
            }
            out
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let status = child.wait().unwrap();
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Stdout then stderr, as text.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Waits (at most `secs`) for the process to exit.
pub fn exit_status(p: &mut Proc, secs: u64) -> Option<ExitStatus> {
    let mut status = None;
    wait_until(secs, || {
        status = p.child.try_wait().unwrap();
        status.is_some()
    });
    status
}

/// User and system CPU seconds process `pid` has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}
