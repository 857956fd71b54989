//! Three gateways behind haproxy over a three-node NATS cluster with
//! JetStream, under QoS 1 telemetry from 200 simulated devices (the Linux
//! agent's own link and disk queue, in this process). One cluster serves
//! every fault in turn: a gateway killed (-9), a NATS node killed (-9),
//! PostgreSQL (the registry) restarted while devices enroll, a revocation
//! pushed while a gateway is down. Every sample any device generated must
//! have reached the backend's subscriber or still be in that device's
//! queue.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use twofold_tests::*;

const DEVICES: usize = 200;

/// Waits (at most `secs`) until every device has delivered a sample at
/// least 3 past what it had delivered at `before`; returns the seconds
/// that took, or `None`.
fn back_after(sub: &Sub, before: &BTreeMap<String, u64>, since: Instant, secs: u64) -> Option<f64> {
    wait_until(secs, || {
        let now = sub.latest_telemetry();
        before
            .iter()
            .all(|(d, seq)| now.get(d).is_some_and(|n| *n >= seq + 3))
    })
    .then(|| since.elapsed().as_secs_f64())
}

/// Sessions bound by the running gateways since audit line `skip` of each.
fn rebound(cluster: &Cluster, skip: &[usize]) -> usize {
    cluster
        .running()
        .zip(skip)
        .map(|(gw, skip)| {
            gw.events()
                .iter()
                .skip(*skip)
                .filter(|e| e["event"] == "connected")
                .count()
        })
        .sum()
}

#[test]
fn a_cluster_loses_no_qos1_telemetry_when_a_gateway_or_a_nats_node_dies() {
    // The registry in PostgreSQL, restarted below while devices enroll.
    let mut pg = Postgres::start();
    pg.database("cluster");
    let fleet = Fleet::with_registry(&twofold_provisioning::registry::RegistryUrl::Postgres(
        pg.url_with_password("cluster"),
    ));
    let mut cluster = Cluster::start(&fleet, 3, 3, "");
    // The backend's subscriber: a persistent QoS 1 session on the third
    // node, which stays up.
    let mut args = cluster.nats.client_args(2);
    args.extend(
        [
            "-i",
            "counter",
            "-c",
            "-q",
            "1",
            "-t",
            "devices/+/telemetry",
        ]
        .map(str::to_owned),
    );
    let sub = Sub::start(
        &fleet,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "counter",
    );
    let devices = Devices::start(
        &fleet,
        "unit",
        DEVICES,
        cluster.port,
        Some(Duration::from_secs(1)),
    );
    let all_publishing = wait_until(180, || sub.latest_telemetry().len() == DEVICES);
    assert!(
        all_publishing,
        "only {} of {DEVICES} devices delivered telemetry\n{}",
        sub.latest_telemetry().len(),
        cluster.nats.logs()
    );
    let per_gateway: Vec<usize> = cluster
        .running()
        .map(|gw| {
            gw.events()
                .iter()
                .filter(|e| e["event"] == "connected")
                .count()
        })
        .collect();

    // A gateway killed: its devices come back through haproxy to the others.
    let skip: Vec<usize> = cluster.running().map(|gw| gw.events().len()).collect();
    let before = sub.latest_telemetry();
    let killed = Instant::now();
    cluster.kill_gateway(0);
    let gateway_back = back_after(&sub, &before, killed, 120);
    let skip_after: Vec<usize> = skip[1..].to_vec();
    let moved = rebound(&cluster, &skip_after);
    cluster.restart_gateway(&fleet, 0);

    // A NATS node killed, the second: the first node of the second
    // gateway, which holds sessions now (the restarted first gateway has
    // none yet). Its gateway closes them; the devices come back over the
    // other two nodes.
    let skip: Vec<usize> = cluster.running().map(|gw| gw.events().len()).collect();
    let before = sub.latest_telemetry();
    let killed = Instant::now();
    cluster.nats.kill(1);
    let node_back = back_after(&sub, &before, killed, 120);
    let reconnected = rebound(&cluster, &skip);

    // PostgreSQL restarted while 20 more devices are enrolled one by one:
    // the enrollments it cuts off fail, saying why, and go through when
    // retried; the sessions carry on (gateways never read the registry).
    let before = sub.latest_telemetry();
    let restarted = Instant::now();
    let enroll = |i: usize| {
        let mut cmd = fleet.provisioning();
        cmd.args(["enroll", &format!("late-{i:02}"), "--out"])
            .arg(fleet.path(&format!("late/late-{i:02}")));
        cmd
    };
    let queued: Vec<_> = (1..=20).map(|i| (i, enroll(i))).collect();
    let (cut_off, registry_back) = std::thread::scope(|s| {
        let worker = s.spawn(move || {
            queued
                .into_iter()
                .map(|(i, cmd)| (i, run_bounded(cmd, 60)))
                .collect::<Vec<_>>()
        });
        std::thread::sleep(Duration::from_millis(300));
        pg.restart();
        let results = worker.join().unwrap();
        let mut cut_off = 0;
        for (i, out) in results {
            if !out.status.success() {
                // Cut off before COMMIT: nothing recorded. During COMMIT:
                // the outcome is unknown, and if it was recorded the retry
                // is refused for that reason; the operator then enrolls
                // again with --replace (the first bundle was never written).
                let unknown = text(&out).contains("may or may not have been recorded");
                assert!(
                    text(&out).contains("unreachable") || unknown,
                    "late-{i:02}: {}",
                    text(&out)
                );
                cut_off += 1;
                let mut again = run_bounded(enroll(i), 60);
                if unknown && text(&again).contains("already has an active certificate") {
                    let mut replace = enroll(i);
                    replace.arg("--replace");
                    again = run_bounded(replace, 60);
                }
                assert!(again.status.success(), "retry: {}", text(&again));
            }
        }
        (cut_off, back_after(&sub, &before, restarted, 60))
    });
    assert!(
        registry_back.is_some(),
        "telemetry stopped while PostgreSQL restarted"
    );

    // Revocation, pushed on the broker. The first gateway is down while
    // it happens and must catch up when it starts.
    let before = sub.latest_telemetry();
    cluster.kill_gateway(0);
    assert!(back_after(&sub, &before, Instant::now(), 120).is_some());
    // A device connected through the second gateway now.
    let connected = cluster.gateways[1].as_ref().unwrap().events();
    let victim = connected
        .iter()
        .rev()
        .find(|e| e["event"] == "connected")
        .and_then(|e| e["client_id"].as_str())
        .unwrap()
        .to_owned();
    let victim = victim.as_str();
    let password = fleet.path("nats-password");
    std::fs::write(&password, NATS_PASSWORD).unwrap();
    let mut revoke = fleet.provisioning();
    revoke.args(["revoke", victim, "--reason", "key-compromise"]);
    // The dead node first: the push goes on to the next.
    for node in [1, 2, 0] {
        revoke.args([
            "--push",
            &format!("mqtt://127.0.0.1:{}", cluster.nats.nodes[node].mqtt_port),
        ]);
    }
    revoke
        .args(["--push-username", NATS_USER, "--push-password-file"])
        .arg(&password);
    let started = time::OffsetDateTime::now_utc();
    let out = run_bounded(revoke, 60);
    let returned = time::OffsetDateTime::now_utc();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("pushed"), "{}", text(&out));
    let closed = wait_until(15, || {
        cluster.running().any(|gw| {
            gw.events().iter().any(|e| {
                e["reason"] == "revoked"
                    && e["client_id"] == victim
                    && e["detail"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("while connected")
            })
        })
    });
    assert!(
        closed,
        "the revoked device's session was not closed:\n{}",
        cluster
            .running()
            .map(|gw| gw.log())
            .collect::<Vec<_>>()
            .join("\n")
            .lines()
            .filter(|l| l.contains("CRL") || l.contains("crl") || l.contains("TLS files"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let closed_at = cluster
        .running()
        .flat_map(|gw| gw.events())
        .find(|e| e["reason"] == "revoked" && e["client_id"] == victim)
        .and_then(|e| {
            time::OffsetDateTime::parse(
                e["ts"].as_str()?,
                &time::format_description::well_known::Rfc3339,
            )
            .ok()
        })
        .unwrap();
    cluster.restart_gateway(&fleet, 0);
    let newest = cluster.crl_number(1);
    let caught_up = wait_until(15, || cluster.crl_number(0) == newest);
    assert!(
        caught_up,
        "the restarted gateway has CRL {:?}, the others {newest:?}",
        cluster.crl_number(0)
    );
    // Refused at every gateway, the restarted one included.
    let dir = fleet.path(&format!("unit/{victim}"));
    let revoked = Identity {
        cert: dir.join("device.pem"),
        key: dir.join("device.key"),
        dir,
    };
    for (i, gw) in cluster.running().enumerate() {
        let mut publish = std::process::Command::new("mosquitto_pub");
        publish
            .args(tls_args(&fleet, gw.addr.port(), &revoked))
            .args([
                "-i",
                victim,
                "-q",
                "1",
                "-t",
                &format!("devices/{victim}/telemetry"),
                "-m",
                "x",
            ]);
        let out = run_bounded(publish, 10);
        assert!(
            !out.status.success(),
            "gateway {} let a revoked device in",
            i + 1
        );
        let subject = format!("CN={victim}");
        gw.wait_for(|e| {
            e["event"] == "refused" && e["reason"] == "revoked" && e["subject"] == subject.as_str()
        })
        .unwrap_or_else(|| {
            panic!(
                "gateway {} did not refuse it as revoked:\n{}",
                i + 1,
                gw.log()
            )
        });
    }
    println!(
        "revocation pushed through the broker: the session closed {:.2} s after `provisioning \
         revoke` started ({:.2} s after it returned); a gateway started afterwards took CRL \
         {newest:?} from the broker; refused at all 3 gateways",
        (closed_at - started).as_seconds_f64(),
        (closed_at - returned).as_seconds_f64()
    );

    let names = devices.names.clone();
    devices.stop();
    sub.settle(30);
    let total = FleetAccount::of(&fleet, &names, &sub.messages());
    println!(
        "cluster of 3 gateways, 3 NATS nodes, {DEVICES} devices (sessions per gateway at \
         first: {per_gateway:?}): gateway kill -9: {moved} sessions re-bound, every device \
         back in {}; NATS node kill -9: {reconnected} sessions re-bound, every device back in \
         {}; PostgreSQL restarted while enrolling 20: {cut_off} cut off and retried, every \
         device delivering {} after; {total}",
        shown(gateway_back),
        shown(node_back),
        shown(registry_back),
    );
    assert!(total.lost.is_empty(), "lost: {:?}", total.lost);
    assert!(
        gateway_back.is_some(),
        "not every device came back after the gateway kill"
    );
    assert!(
        node_back.is_some(),
        "not every device came back after the node kill\n{}",
        cluster.nats.logs()
    );
}

fn shown(secs: Option<f64>) -> String {
    secs.map_or("(never)".into(), |s| format!("{s:.1} s"))
}
