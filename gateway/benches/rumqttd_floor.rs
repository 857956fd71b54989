//! What one session costs inside rumqttd itself, whatever carries it: the
//! router's state for N links made with rumqttd's own in-process API (no
//! socket, no network buffers, no gateway), as resident memory per link.
//!
//!     cargo bench -p twofold-gateway --bench rumqttd_floor [-- N]
//!
//! It is the floor under the embedded broker's memory per connection
//! (BENCHMARKS.md): the gateway's relay and its TLS session come on top.
//! The router gets the gateway's own settings (`broker::router_config`),
//! and the links the ones a session's link gets; no one publishes here.

use std::time::Duration;

// The gateway's allocator (gateway/src/main.rs), so that this is the
// gateway's floor. With glibc's malloc instead, the same links measured
// 26.8 KiB each (2026-11-24).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5000);
    let limits = twofold_gateway::broker::EmbeddedLimits::default();
    let router = rumqttd::Router::new(0, twofold_gateway::broker::router_config(&limits));
    let router_tx = router.spawn();
    std::thread::sleep(Duration::from_millis(200));
    let before = rss_kib();
    let mut links = Vec::with_capacity(n);
    for i in 0..n {
        let client_id = format!("device-{i:05}");
        let link = rumqttd::local::LinkBuilder::new(&client_id, router_tx.clone())
            .dynamic_filters(true)
            .build()
            .expect("the router accepts the link");
        links.push(link);
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib();
    println!(
        "rumqttd router state: {n} links, RSS {before} KiB -> {after} KiB, {:.1} KiB per link",
        after.saturating_sub(before) as f64 / n as f64
    );
    println!(
        "(rumqttd 0.20: its queue sizes are constants of the crate, room for 200 packets each way per link)"
    );
}
