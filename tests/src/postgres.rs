//! A PostgreSQL server in a temporary directory on a free loopback port:
//! the shared registry of several provisioning nodes. PostgreSQL refuses
//! to run as root, so as root it runs as `nobody`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::{Proc, exit_status, free_port, run_bounded, spawn, text, wait_until};

/// The database superuser the tests (and scripts/cluster) connect as, with
/// password authentication over TCP.
pub const PG_USER: &str = "twofold";
pub const PG_PASSWORD: &str = "twofold-registry";

/// The uid and gid PostgreSQL runs as when the tests run as root.
const NOBODY: u32 = 65534;

/// A PostgreSQL server; stopped (-9) when dropped, with its directory.
pub struct Postgres {
    proc: Option<Proc>,
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    starts: usize,
    /// With TLS: the CA file that issued the server's certificate.
    tls_ca: Option<PathBuf>,
}

/// Where Debian keeps the server's programs (not on PATH), or PATH.
fn server_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").is_file())
        .collect();
    versions.sort();
    versions.pop().unwrap_or_default()
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `program` of the server's, as the unprivileged user when root.
fn as_server_user(bin: &Path, program: &str) -> Command {
    let program = bin.join(program);
    if is_root() {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid",
            &NOBODY.to_string(),
            "--regid",
            &NOBODY.to_string(),
            "--clear-groups",
        ])
        .arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

impl Postgres {
    /// initdb (password authentication on 127.0.0.1 only) and start.
    pub fn start() -> Postgres {
        let mut pg = Self::init();
        pg.resume();
        pg
    }

    /// A server that takes TLS connections only (`hostssl` in pg_hba),
    /// with a certificate for 127.0.0.1 from a CA of its own
    /// ([`Self::tls_ca`]).
    pub fn start_tls() -> Postgres {
        let mut pg = Self::init();
        let data = pg.dir.path().join("data");
        let ca = pg.dir.path().join("ca");
        std::fs::create_dir_all(&ca).unwrap();
        let openssl = |args: &[&str]| {
            let mut c = Command::new("openssl");
            c.current_dir(&ca).args(args);
            let out = run_bounded(c, 30);
            assert!(out.status.success(), "openssl {args:?}: {}", text(&out));
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-subj",
                    "/CN=registry test CA",
                    "-days",
                    "2",
                ],
            ]
            .concat(),
        );
        openssl(
            &[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                    "-subj",
                    "/CN=127.0.0.1",
                ],
            ]
            .concat(),
        );
        std::fs::write(ca.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ]);
        // The server reads them as itself, and wants its key private.
        for (from, to, mode) in [
            ("server.pem", "server.pem", 0o644),
            ("server.key", "server.key", 0o600),
        ] {
            std::fs::copy(ca.join(from), data.join(to)).unwrap();
            if is_root() {
                std::os::unix::fs::chown(data.join(to), Some(NOBODY), Some(NOBODY)).unwrap();
            }
            std::fs::set_permissions(data.join(to), std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let hba = data.join("pg_hba.conf");
        let only_tls: String = std::fs::read_to_string(&hba)
            .unwrap()
            .lines()
            .map(|l| match l.strip_prefix("host ") {
                Some(rest) => format!("hostssl {rest}\n"),
                None => format!("{l}\n"),
            })
            .collect();
        std::fs::write(&hba, only_tls).unwrap();
        std::fs::write(
            data.join("postgresql.auto.conf"),
            "ssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'\n",
        )
        .unwrap();
        pg.tls_ca = Some(ca.join("ca.pem"));
        pg.resume();
        pg
    }

    /// The CA of a server from [`Self::start_tls`].
    pub fn tls_ca(&self) -> &Path {
        self.tls_ca.as_deref().expect("a server started with TLS")
    }

    /// initdb (password authentication on 127.0.0.1 only), not started.
    fn init() -> Postgres {
        let dir = tempfile::Builder::new()
            .prefix("twofold-pg-")
            .tempdir_in(std::env::temp_dir())
            .unwrap();
        if is_root() {
            std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, PG_PASSWORD).unwrap();
        std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o644)).unwrap();
        let bin = server_bin();
        let mut initdb = as_server_user(&bin, "initdb");
        initdb
            .arg("-D")
            .arg(dir.path().join("data"))
            .args([
                "-U",
                PG_USER,
                "--auth-local=reject",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["--no-instructions", "--encoding=UTF8", "--locale=C"]);
        let out = run_bounded(initdb, 120);
        assert!(out.status.success(), "initdb: {}", text(&out));
        Postgres {
            proc: None,
            dir,
            bin,
            port: free_port(),
            starts: 0,
            tls_ca: None,
        }
    }

    /// Starts the server again on the same port and data.
    pub fn resume(&mut self) {
        self.starts += 1;
        let mut cmd = as_server_user(&self.bin, "postgres");
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"]);
        let log = self.dir.path().join(format!("log-{}", self.starts));
        self.proc = Some(spawn(cmd, log));
        let ready = wait_until(60, || {
            self.psql("postgres", "SELECT 1")
                .is_ok_and(|o| o.trim() == "1")
        });
        assert!(ready, "PostgreSQL did not start:\n{}", self.log());
    }

    /// A fast shutdown (SIGINT: clients are disconnected, nothing
    /// committed is lost), as an operator's restart does.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(p.child.id() as i32).unwrap(),
                rustix::process::Signal::INT,
            );
            assert!(
                exit_status(&mut p, 60).is_some(),
                "PostgreSQL did not stop:\n{}",
                p.log()
            );
        }
    }

    /// A stop and a start on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.resume();
    }

    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log).unwrap_or_default()
    }

    /// Stops the server and its backends with SIGSTOP, as a silent network
    /// partition looks to a client: connections stay open and nothing
    /// answers. The server goes on when the guard is dropped.
    pub fn freeze(&self) -> Frozen<'_> {
        self.signal_all(rustix::process::Signal::STOP);
        Frozen { pg: self }
    }

    /// Sends `signal` to the postmaster and every process it started.
    fn signal_all(&self, signal: rustix::process::Signal) {
        let Some(p) = &self.proc else { return };
        let main = p.child.id();
        let mut pids = vec![main];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // The parent's pid is the second field after the name.
            let parent = stat
                .rfind(')')
                .and_then(|i| stat[i + 2..].split_whitespace().nth(1))
                .and_then(|f| f.parse::<u32>().ok());
            if parent == Some(main) {
                pids.push(pid);
            }
        }
        for pid in pids {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, signal);
            }
        }
    }

    /// A new, empty database, and its URL (the password is not in it:
    /// clients take it from PGPASSWORD, as operators are told to).
    pub fn database(&self, name: &str) -> String {
        let out = self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        assert!(out.is_ok(), "CREATE DATABASE {name}: {out:?}");
        self.url(name)
    }

    /// The URL with the password in it, for a process whose environment
    /// the test cannot set (and never for an operator: `ps` shows it).
    pub fn url_with_password(&self, database: &str) -> String {
        format!(
            "postgres://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://{PG_USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs `sql` with psql; its unaligned output, or the error.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, String> {
        let mut cmd = Command::new("psql");
        cmd.env("PGPASSWORD", PG_PASSWORD)
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args(["-p", &self.port.to_string(), "-U", PG_USER, "-d", database])
            .args(["-c", sql]);
        let out = run_bounded(cmd, 30);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(text(&out))
        }
    }
}

/// A server stopped by [`Postgres::freeze`]; continued when dropped.
pub struct Frozen<'a> {
    pg: &'a Postgres,
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        self.pg.signal_all(rustix::process::Signal::CONT);
    }
}
