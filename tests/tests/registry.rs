//! The registry on PostgreSQL, with the real `provisioning` command: what
//! it accepts, what it refuses and why, operators racing each other, and
//! the database restarting under an enrollment.

use std::path::Path;
use std::process::{Command, Output};

use twofold_tests::*;

/// `provisioning` against `pki` with its registry at `registry`.
fn provisioning(pki: &Path, registry: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(built("provisioning"));
    cmd.env("PGPASSWORD", PG_PASSWORD)
        .env("TWOFOLD_REGISTRY", registry)
        .env("TWOFOLD_PKI", pki)
        .args(args);
    cmd
}

fn run(pki: &Path, registry: &str, args: &[&str]) -> Output {
    run_bounded(provisioning(pki, registry, args), 60)
}

fn ok(pki: &Path, registry: &str, args: &[&str]) -> String {
    let out = run(pki, registry, args);
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    text(&out)
}

/// The refusal of `args`, asserted to contain `reason`.
fn refused(pki: &Path, registry: &str, args: &[&str], reason: &str) {
    let out = run(pki, registry, args);
    assert!(
        !out.status.success(),
        "{args:?} was accepted: {}",
        text(&out)
    );
    assert!(
        text(&out).contains(reason),
        "{args:?}: expected {reason:?} in: {}",
        text(&out)
    );
}

/// The serial `revoke` printed.
fn revoked_serial(out: &str) -> String {
    let at = out.find("(serial ").expect("serial in revoke's output") + 8;
    out[at..].split(',').next().unwrap().to_owned()
}

fn init(pki: &Path, registry: &str) {
    ok(
        pki,
        registry,
        &["init", "--trust-domain", "iot.example.com"],
    );
}

/// Another provisioning node: `from`'s files (CA certificates and keys,
/// CRLs) copied to `to`, the same registry.
fn copy_node(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// `dev` revoked on `pki`, then the revocation undone in the database
/// `db` as a COMMIT that never reached the server leaves it: the CRL file
/// written, the registry as before. Returns the serial.
fn revoke_and_lose_the_commit(pg: &Postgres, db: &str, pki: &Path, url: &str, dev: &str) -> String {
    let settings =
        "SELECT key, value FROM settings WHERE key IN ('crl_number', 'crl_listed') ORDER BY key";
    let before = pg.psql(db, settings).unwrap();
    let serial = revoked_serial(&ok(pki, url, &["revoke", dev]));
    let mut undo = format!(
        "UPDATE certificates SET revoked_at = NULL, revocation_reason = NULL \
         WHERE serial = '{serial}';"
    );
    for line in before.lines() {
        let (key, value) = line.split_once('|').unwrap();
        undo.push_str(&format!(
            "UPDATE settings SET value = '{value}' WHERE key = '{key}';"
        ));
    }
    pg.psql(db, &undo).unwrap();
    serial
}

/// A PEM CRL file as openssl shows it (its number first), lowercase.
fn crl_text(file: &Path) -> String {
    let mut c = Command::new("openssl");
    c.args(["crl", "-noout", "-crlnumber", "-text", "-in"])
        .arg(file);
    text(&run_bounded(c, 30)).to_lowercase()
}

/// The `crlnumber=0x…` line of a PEM CRL file.
fn crl_number(file: &Path) -> String {
    crl_text(file).lines().next().unwrap_or_default().to_owned()
}

/// A PKI kept in PostgreSQL does what one kept in SQLite does, and a
/// registry that is wrong is refused with what to do about it.
#[test]
fn a_postgres_registry_carries_a_pki_and_refuses_what_is_wrong() {
    let pg = Postgres::start();
    let url = pg.database("fleet");
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    init(&pki, &url);
    assert!(
        !pki.join("registry.db").exists(),
        "no SQLite file beside a PostgreSQL registry"
    );
    let out = |name: &str| dir.path().join(name).display().to_string();
    ok(&pki, &url, &["enroll", "dev-1", "--out", &out("dev-1")]);
    ok(
        &pki,
        &url,
        &[
            "enroll",
            "dev-2",
            "--group",
            "pumps",
            "--out",
            &out("dev-2"),
        ],
    );
    ok(
        &pki,
        &url,
        &["groups", "add", "pumps", "dev-1", "service:ops"],
    );
    ok(&pki, &url, &["groups", "remove", "pumps", "dev-1"]);
    let groups: serde_json::Value =
        serde_json::from_str(&ok(&pki, &url, &["groups", "list", "--json"])).unwrap();
    assert_eq!(
        groups,
        serde_json::json!({ "pumps": ["device:dev-2", "service:ops"] })
    );
    refused(
        &pki,
        &url,
        &["enroll", "dev-1", "--out", &out("dev-1b")],
        "device dev-1 already has an active certificate",
    );
    let revoked = revoked_serial(&ok(&pki, &url, &["revoke", "dev-1"]));
    let crl = run_bounded(
        {
            let mut c = Command::new("openssl");
            c.args(["crl", "-noout", "-text", "-in"])
                .arg(pki.join("crl.pem"));
            c
        },
        30,
    );
    assert!(
        text(&crl).to_lowercase().contains(&revoked.to_lowercase()),
        "{revoked} not in the CRL: {}",
        text(&crl)
    );
    let list: serde_json::Value =
        serde_json::from_str(&ok(&pki, &url, &["list", "--json"])).unwrap();
    let active: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "device" && r["status"] == "active")
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(active, ["dev-2"], "{list}");
    // What the registry holds is what the database holds.
    assert_eq!(
        pg.psql(
            "fleet",
            "SELECT count(*) FROM certificates WHERE kind = 'device' AND revoked_at IS NULL"
        )
        .unwrap()
        .trim(),
        "1"
    );

    // Refused, each with its reason.
    let other = dir.path().join("other");
    refused(
        &other,
        &url,
        &["init", "--trust-domain", "iot.example.com"],
        "already holds a PKI",
    );
    assert!(!other.exists(), "a refused init leaves no directory");
    refused(&pki, "sqlite", &["list"], "give --registry");
    let empty = pg.database("empty");
    refused(&pki, &empty, &["list"], "holds no PKI");
    refused(&pki, "mysql://db/x", &["list"], "is not a registry");
    let mut wrong = provisioning(&pki, &url, &["list"]);
    wrong.env("PGPASSWORD", "wrong");
    let out = run_bounded(wrong, 60);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("password authentication failed"),
        "{}",
        text(&out)
    );
    let closed = format!("postgres://{PG_USER}@127.0.0.1:{}/fleet", free_port());
    refused(&pki, &closed, &["list"], "unreachable");
}

/// Two operators (here six) enrolling and revoking one device at the same
/// moment, round after round: never two active certificates for it, and
/// every revocation reported is in the registry and in the CRL.
#[test]
fn operators_racing_never_make_two_active_certificates_or_lose_a_revocation() {
    let pg = Postgres::start();
    let url = pg.database("race");
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    init(&pki, &url);
    let mut revoked = Vec::new();
    let mut enrolled = 0;
    for round in 0..5 {
        let children: Vec<_> = (0..6)
            .map(|i| {
                let out = dir.path().join(format!("r{round}-{i}"));
                let out = out.display().to_string();
                let args: Vec<&str> = if i % 2 == 0 {
                    vec!["enroll", "pump-1", "--out", &out]
                } else {
                    vec!["revoke", "pump-1"]
                };
                let mut cmd = provisioning(&pki, &url, &args);
                cmd.stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for (i, child) in children.into_iter().enumerate() {
            let out = finish(child, 120);
            let said = text(&out);
            match (i % 2 == 0, out.status.success()) {
                (true, true) => enrolled += 1,
                (true, false) => assert!(
                    said.contains("already has an active certificate"),
                    "an enroll failed for another reason: {said}"
                ),
                (false, true) => revoked.push(revoked_serial(&said)),
                (false, false) => assert!(
                    said.contains("has no active certificate")
                        || said.contains("no certificate was ever"),
                    "a revoke failed for another reason: {said}"
                ),
            }
        }
        let active = pg
            .psql(
                "race",
                "SELECT count(*) FROM certificates WHERE name = 'pump-1' AND revoked_at IS NULL",
            )
            .unwrap();
        assert!(
            active.trim() == "0" || active.trim() == "1",
            "round {round}: {active} active certificates for pump-1"
        );
    }
    assert!(
        enrolled >= 1 && !revoked.is_empty(),
        "{enrolled} {revoked:?}"
    );
    // Every revocation is in the registry and in the CRL on disk (the
    // last revoke wrote it, under the same lock).
    let in_db = pg
        .psql(
            "race",
            "SELECT serial FROM certificates WHERE revoked_at IS NOT NULL AND kind = 'device'",
        )
        .unwrap();
    let crl = {
        let mut c = Command::new("openssl");
        c.args(["crl", "-noout", "-text", "-in"])
            .arg(pki.join("crl.pem"));
        text(&run_bounded(c, 30)).to_lowercase()
    };
    for serial in &revoked {
        assert!(in_db.contains(serial.as_str()), "{serial} lost: {in_db}");
        assert!(
            crl.contains(&serial.to_lowercase()),
            "{serial} not in the CRL"
        );
    }
    eprintln!(
        "race: {enrolled} enrolled, {} revoked over 5 rounds of 6 operators",
        revoked.len()
    );
}

/// PostgreSQL restarts while devices are enrolled one after another: the
/// enrollments it cuts off fail with a reason and record nothing; the
/// rest, and a retry of the failed ones, are all there once, each device
/// with one active certificate.
#[test]
fn postgres_restarting_while_enrolling_loses_nothing_and_doubles_nothing() {
    let mut pg = Postgres::start();
    let url = pg.database("restart");
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    init(&pki, &url);
    const DEVICES: usize = 40;
    let enroll = {
        let (pki, url, dir) = (pki.clone(), url.clone(), dir.path().to_owned());
        move |i: usize, attempt: usize| {
            let out = dir
                .join(format!("dev-{i:02}-{attempt}"))
                .display()
                .to_string();
            run(
                &pki,
                &url,
                &["enroll", &format!("dev-{i:02}"), "--out", &out],
            )
        }
    };
    let worker = {
        let enroll = enroll.clone();
        std::thread::spawn(move || (0..DEVICES).map(|i| (i, enroll(i, 0))).collect::<Vec<_>>())
    };
    // Restart once a few have gone through, and again a moment later.
    assert!(wait_until(60, || {
        pg.psql(
            "restart",
            "SELECT count(*) FROM certificates WHERE kind = 'device'",
        )
        .is_ok_and(|n| n.trim().parse::<usize>().unwrap_or(0) >= 5)
    }));
    pg.restart();
    std::thread::sleep(std::time::Duration::from_millis(300));
    pg.stop();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    pg.resume();
    let results = worker.join().unwrap();
    let mut failed = Vec::new();
    for (i, out) in &results {
        if !out.status.success() {
            let said = text(out);
            let unknown = said.contains("may or may not have been recorded");
            assert!(
                said.contains("unreachable") || unknown,
                "dev-{i:02} failed without saying the registry was away: {said}"
            );
            assert!(
                !dir.path().join(format!("dev-{i:02}-0")).exists(),
                "dev-{i:02}: a failed enrollment wrote a bundle"
            );
            failed.push((*i, unknown));
        }
    }
    for (i, unknown) in &failed {
        let out = enroll(*i, 1);
        // Only a commit cut off mid-way may have gone through, and then
        // the retry is refused for the right reason.
        let recorded = *unknown && text(&out).contains("already has an active certificate");
        assert!(
            out.status.success() || recorded,
            "retry of dev-{i:02}: {}",
            text(&out)
        );
    }
    let per_device = pg
        .psql(
            "restart",
            "SELECT name, count(*) FROM certificates WHERE kind = 'device' \
             AND revoked_at IS NULL GROUP BY name ORDER BY name",
        )
        .unwrap();
    let rows: Vec<&str> = per_device.lines().collect();
    assert_eq!(rows.len(), DEVICES, "{per_device}");
    assert!(rows.iter().all(|r| r.ends_with("|1")), "{per_device}");
    eprintln!(
        "restart: {DEVICES} enrolled, {} cut off by the restarts and retried",
        failed.len()
    );
}

/// Two provisioning nodes share the registry: one runs the CA service the
/// gateway pulls its CRL from, the other revokes. The service signs the
/// CRL again when the registry moves on, and the gateway closes the
/// revoked device's session.
#[test]
fn a_revocation_on_another_node_reaches_the_gateway_through_the_ca_service() {
    let pg = Postgres::start();
    pg.database("nodes");
    let registry =
        twofold_provisioning::registry::RegistryUrl::Postgres(pg.url_with_password("nodes"));
    let mut fleet = Fleet::with_registry(&registry);
    let dev = fleet.device("sensor-1");
    fleet.service("gw");
    let ca = CaService::start(
        &mut fleet,
        &["--ra", "gw", "--registry", &pg.url_with_password("nodes")],
    );
    let config = format!("{}crl_poll_secs = 1\n", ca.gateway_toml(&fleet, "gw"));
    let gw = Gateway::start(&fleet, &config);
    let sub = mosquitto_sub(
        &fleet,
        &gw,
        &dev,
        &["-i", "sensor-1", "-t", "devices/sensor-1/commands"],
    );
    wait_connected(&gw, "sensor-1");

    // The second node: the same CA files, the same registry.
    let node2 = fleet.path("node-2");
    copy_node(&fleet.path("pki"), &node2);
    let said = ok(&node2, &pg.url("nodes"), &["revoke", "sensor-1"]);
    let serial = revoked_serial(&said);
    let closed = gw.wait_for(|e| {
        e["reason"] == "revoked"
            && e["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("while connected")
    });
    assert!(closed.is_some(), "{}\n{}", gw.log(), ca.proc.log());
    assert!(
        finish(sub, 10).status.code().is_some(),
        "the session was left open"
    );
    // The gateway's CRL is the service's, signed again after node 2's.
    let crl = {
        let mut c = Command::new("openssl");
        c.args(["crl", "-noout", "-text", "-in"])
            .arg(fleet.path("gw/crl.pem"));
        text(&run_bounded(c, 30)).to_lowercase()
    };
    assert!(crl.contains(&serial.to_lowercase()), "{crl}");
    assert!(
        ca.proc.log().contains("CRL signed again"),
        "{}",
        ca.proc.log()
    );

    // A second CA service, on node 2: the two catch up with each other
    // once and settle; neither keeps signing new numbers.
    let second = CaService::start_on(
        &mut fleet,
        &node2,
        &["--ra", "gw", "--registry", &pg.url_with_password("nodes")],
    );
    let number = || {
        pg.psql(
            "nodes",
            "SELECT value FROM settings WHERE key = 'crl_number'",
        )
        .unwrap()
        .trim()
        .to_owned()
    };
    std::thread::sleep(std::time::Duration::from_secs(2));
    let settled = number();
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(
        number(),
        settled,
        "the services keep signing:\n{}\n{}",
        ca.proc.log(),
        second.proc.log()
    );
    let on_disk = |dir: &std::path::Path| {
        let mut c = Command::new("openssl");
        c.args(["crl", "-noout", "-crlnumber", "-in"])
            .arg(dir.join("crl.pem"));
        text(&run_bounded(c, 30))
    };
    assert_eq!(on_disk(&fleet.path("pki")), on_disk(&node2));
}

/// A registry that stops answering on an open connection (a silent
/// partition: no reset, no close) costs the CA service the call that was
/// waiting, not the service: that call gives up after the answer timeout
/// and says so, the CRL is served all the while, and the service goes on
/// once the database answers again.
#[test]
fn a_registry_that_stops_answering_holds_up_one_call_not_the_service() {
    let pg = Postgres::start();
    pg.database("silent");
    let url = pg.url_with_password("silent");
    let registry = twofold_provisioning::registry::RegistryUrl::Postgres(url.clone());
    let mut fleet = Fleet::with_registry(&registry);
    fleet.service("gw");
    let ca = CaService::start(&mut fleet, &["--ra", "gw", "--registry", &url]);
    let get_crl = || {
        let svc = fleet.path("svc-gw");
        let mut cmd = Command::new("curl");
        cmd.args(["--silent", "--max-time", "10", "--output", "/dev/null"])
            .args(["--write-out", "%{http_code}"])
            .arg("--cacert")
            .arg(fleet.path("pki/server-ca.pem"))
            .arg("--cert")
            .arg(svc.join("device.pem"))
            .arg("--key")
            .arg(svc.join("device.key"))
            .arg(format!("https://localhost:{}/v1/crl", ca.port));
        String::from_utf8_lossy(&run_bounded(cmd, 30).stdout).into_owned()
    };
    assert_eq!(get_crl(), "200");
    {
        let _frozen = pg.freeze();
        // The service looks at the registry every second, holding the
        // PKI meanwhile: after 2 s one such look is waiting.
        std::thread::sleep(std::time::Duration::from_secs(2));
        assert_eq!(get_crl(), "200", "{}", ca.proc.log());
        let gave_up = wait_until(60, || ca.proc.log().contains("no answer from 127.0.0.1"));
        assert!(gave_up, "{}", ca.proc.log());
        assert!(
            ca.proc.log().contains("the connection was dropped"),
            "{}",
            ca.proc.log()
        );
    }
    let back = wait_until(60, || ca.proc.log().contains("the registry answers again"));
    assert!(back, "{}", ca.proc.log());
    assert_eq!(get_crl(), "200");
}

/// A node whose revoke wrote its CRL file and then lost its COMMIT holds a
/// CRL with a number the registry then gives to another node's
/// revocation: same number, other serials. Its CA service notices and
/// signs a fresh CRL, with a new number, that lists what the registry
/// holds; comparing numbers alone, it would serve the other node's
/// revocation never.
#[test]
fn a_crl_with_the_registrys_number_but_other_serials_is_replaced() {
    crl_after_lost_commits_is_replaced(&["z"]);
}

/// The same after two lost COMMITs in a row: the node's file is ahead of
/// the registry's number even after the other node's revocation.
#[test]
fn a_crl_ahead_of_the_registry_with_other_serials_is_replaced() {
    crl_after_lost_commits_is_replaced(&["z", "y"]);
}

/// Node 2 revokes each of `lost`, every one undone in PostgreSQL (a
/// COMMIT that never reached the server; its CRL file stays); then node 1
/// revokes w. Node 2's CA service must serve a CRL that lists x and w,
/// none of `lost`, under a number above node 1's, and then settle.
fn crl_after_lost_commits_is_replaced(lost: &[&str]) {
    let pg = Postgres::start();
    pg.database("split");
    let url = pg.url("split");
    let dir = tempfile::tempdir().unwrap();
    let node1 = dir.path().join("node-1");
    init(&node1, &url);
    let out = |name: &str| dir.path().join(name).display().to_string();
    for dev in ["x", "w"].iter().chain(lost) {
        ok(&node1, &url, &["enroll", dev, "--out", &out(dev)]);
    }
    ok(&node1, &url, &["revoke", "x"]);
    let node2 = dir.path().join("node-2");
    copy_node(&node1, &node2);
    let undone: Vec<String> = lost
        .iter()
        .map(|dev| revoke_and_lose_the_commit(&pg, "split", &node2, &url, dev))
        .collect();
    // Node 1 revokes w, and the registry gives it a number node 2's file
    // has reached already.
    let w = revoked_serial(&ok(&node1, &url, &["revoke", "w"]));
    let listed = |pki: &Path| crl_text(&pki.join("crl.pem"));
    let number = |pki: &Path| crl_number(&pki.join("crl.pem"));
    let hex = |n: String| u64::from_str_radix(n.trim_start_matches("crlnumber=0x"), 16).unwrap();
    assert_eq!(
        hex(number(&node1)) + lost.len() as u64 - 1,
        hex(number(&node2)),
        "the setting of the test"
    );
    assert!(!listed(&node2).contains(&w.to_lowercase()));

    let mut fleet = Fleet::new();
    let ca = CaService::start_on(
        &mut fleet,
        &node2,
        &["--registry", &pg.url_with_password("split")],
    );
    let caught_up = wait_until(30, || listed(&node2).contains(&w.to_lowercase()));
    assert!(caught_up, "{}", ca.proc.log());
    let listed = listed(&node2);
    for serial in &undone {
        assert!(
            !listed.contains(&serial.to_lowercase()),
            "{serial} is not revoked in the registry:\n{listed}"
        );
    }
    assert!(hex(number(&node2)) > hex(number(&node1)), "a new number");
    // And it settles: the number stays put.
    let settled = number(&node2);
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(number(&node2), settled, "{}", ca.proc.log());
}

/// The registry over TLS, as across a network: a server that takes TLS
/// only, verified by its CA and its address. A plaintext connection, a
/// server certificate from another CA, and a name the certificate does
/// not carry are each refused, with the reason.
#[test]
fn a_registry_over_tls_is_verified_and_nothing_else_connects() {
    let pg = Postgres::start_tls();
    pg.database("tls");
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let verified = |host: &str, ca: &Path| {
        format!(
            "postgres://{PG_USER}@{host}:{}/tls?sslmode=verify-full&sslrootcert={}",
            pg.port,
            ca.display()
        )
    };
    let url = verified("127.0.0.1", pg.tls_ca());
    init(&pki, &url);
    let out = dir.path().join("dev-1").display().to_string();
    ok(&pki, &url, &["enroll", "dev-1", "--out", &out]);
    ok(&pki, &url, &["revoke", "dev-1"]);
    assert!(ok(&pki, &url, &["list"]).contains("dev-1"));

    refused(
        &pki,
        &format!(
            "postgres://{PG_USER}@127.0.0.1:{}/tls?sslmode=disable",
            pg.port
        ),
        &["list"],
        "the server takes TLS connections only",
    );
    // Another CA: a fresh one of openssl's.
    let other = dir.path().join("other-ca.pem");
    let mut c = Command::new("openssl");
    c.args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args([
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=other",
        ])
        .arg("-keyout")
        .arg(dir.path().join("other-ca.key"))
        .arg("-out")
        .arg(&other);
    assert!(run_bounded(c, 30).status.success());
    refused(
        &pki,
        &verified("127.0.0.1", &other),
        &["list"],
        "UnknownIssuer",
    );
    // Nor when the system's store trusts the server's CA: the URL's
    // sslrootcert is the only CA (sqlx would add the system's to it).
    let mut system_trusts_it = provisioning(&pki, &verified("127.0.0.1", &other), &["list"]);
    system_trusts_it.env("SSL_CERT_FILE", pg.tls_ca());
    let out = run_bounded(system_trusts_it, 60);
    assert!(
        !out.status.success() && text(&out).contains("UnknownIssuer"),
        "a CA of the system's store was trusted: {}",
        text(&out)
    );
    refused(
        &pki,
        &verified("localhost", pg.tls_ca()),
        &["list"],
        "certificate not valid for name \"localhost\"",
    );
    refused(
        &pki,
        &verified("localhost", pg.tls_ca()),
        &["list"],
        "TLS to the registry database failed",
    );
}

/// A serial already in the registry (drawn twice: a 2^-126 event, which
/// issuing handles by drawing again) is refused as such, and the
/// transaction goes on: on PostgreSQL a failed statement would abort the
/// whole transaction, and the second draw with it.
#[test]
fn a_duplicate_serial_leaves_the_transaction_usable() {
    use twofold_provisioning::registry::{CertRecord, Kind, PgStore, Store, StoreError, StoreTx};
    use twofold_provisioning::serial::Serial;

    let pg = Postgres::start();
    pg.database("dup");
    let mut store = PgStore::open(&pg.url_with_password("dup")).unwrap();
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap();
    let record = |name: &str, serial: &Serial| CertRecord {
        serial: serial.clone(),
        kind: Kind::Device,
        name: name.into(),
        identity: None,
        not_before: now,
        not_after: now + time::Duration::days(1),
        fingerprint: format!("fingerprint-of-{name}"),
        issued_at: now,
        revocation: None,
        der: vec![0x30, 0x00],
        replaces: None,
    };
    let (first, second) = (Serial::random(), Serial::random());
    let tx = store.begin().unwrap();
    tx.insert(&record("dev-1", &first)).unwrap();
    match tx.insert(&record("dev-2", &first)) {
        Err(StoreError::DuplicateSerial(s)) => assert_eq!(s, first),
        other => panic!("expected a duplicate serial, got {other:?}"),
    }
    tx.insert(&record("dev-2", &second)).unwrap();
    tx.commit().unwrap();
    let names: Vec<String> = store
        .find(&Default::default())
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&"dev-1".into()) && names.contains(&"dev-2".into()));
}

/// `push-crl` on a node whose CRL file is behind the registry (another
/// node revoked, no CA service here) first signs it again at the
/// registry's number: pushed as it was, gateways would ignore it as older
/// than theirs while the command said it was pushed.
#[test]
fn push_crl_on_a_node_behind_the_registry_pushes_the_registrys_crl() {
    push_crl_pushes_what_the_registry_holds(false);
}

/// `push-crl` on a node whose last revoke lost its COMMIT (its file lists
/// a device the registry holds as not revoked) signs a CRL from the
/// registry first: pushed as it was, it would take the number of the next
/// revocation on another node, which gateways would then ignore.
#[test]
fn push_crl_after_a_lost_commit_pushes_the_registrys_crl() {
    push_crl_pushes_what_the_registry_holds(true);
}

fn push_crl_pushes_what_the_registry_holds(lost_commit: bool) {
    let pg = Postgres::start();
    pg.database("behind");
    let url = pg.url("behind");
    let dir = tempfile::tempdir().unwrap();
    let node1 = dir.path().join("node-1");
    init(&node1, &url);
    for dev in ["a", "z"] {
        let out = dir.path().join(dev).display().to_string();
        ok(&node1, &url, &["enroll", dev, "--out", &out]);
    }
    let node2 = dir.path().join("node-2");
    copy_node(&node1, &node2);
    let a = revoked_serial(&ok(&node1, &url, &["revoke", "a"]));
    let mut absent = Vec::new();
    if lost_commit {
        absent.push(revoke_and_lose_the_commit(&pg, "behind", &node2, &url, "z"));
    }

    let fleet = Fleet::new();
    let (_broker, port) = mosquitto(&fleet, "allow_anonymous true\n");
    let pushed = ok(
        &node2,
        &url,
        &["push-crl", "--push", &format!("mqtt://127.0.0.1:{port}")],
    );
    assert!(pushed.contains("signed again"), "{pushed}");
    let mut sub = Command::new("mosquitto_sub");
    sub.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", "twofold/v1/crl", "-C", "1", "-W", "10"]);
    let retained = run_bounded(sub, 20);
    assert!(retained.status.success(), "{}", text(&retained));
    let crl = dir.path().join("pushed.pem");
    std::fs::write(&crl, &retained.stdout).unwrap();
    let pushed = crl_text(&crl);
    assert!(pushed.contains(&a.to_lowercase()), "{pushed}");
    for serial in &absent {
        assert!(!pushed.contains(&serial.to_lowercase()), "{pushed}");
    }
    // The registry's number, which node 2's file now carries too.
    let in_registry = pg
        .psql(
            "behind",
            "SELECT value FROM settings WHERE key = 'crl_number'",
        )
        .unwrap();
    assert_eq!(
        crl_number(&crl),
        format!(
            "crlnumber=0x{:02x}",
            in_registry.trim().parse::<u64>().unwrap()
        ),
    );
    assert_eq!(crl_number(&crl), crl_number(&node2.join("crl.pem")));
}
