//! A burst of pod starts on one node: 100 mesh pods ADDed at once through the
//! reference libcni runtime (bridge + host-local + portmap + ours), per iptables
//! backend, with the pod looked up from the node agent and, for comparison, from the
//! API server directly. Reports pods that ended up without the rules of one of their
//! families (IPv6 is enabled in every pod namespace, so every pod needs both; must be
//! 0), failed ADDs (must be 0), and ADD latency p50/p99/max under the burst. Needs root
//! and the test environment.
//!
//! `cargo bench -p kong-mesh-cni --bench plugin_burst` (PODS=N, default 100).

#[path = "../tests/agent_node/mod.rs"]
mod agent_node;
mod common;
#[path = "../tests/installer_host/mod.rs"]
mod installer_host;

use std::time::{Duration, Instant};

use common::{Lookup, MeshPod, ms, percentile};
use testkit::{Attachment, NamedNetns};

/// Whether the namespace holds our outbound chain for the family, with either backend.
fn has_rules(netns: &NamedNetns, v6: bool) -> bool {
    let tools: [&str; 2] = if v6 {
        ["ip6tables-nft-save", "ip6tables-legacy-save"]
    } else {
        ["iptables-nft-save", "iptables-legacy-save"]
    };
    tools.iter().any(|t| netns.exec(t, &["-t", "nat"]).contains("-A KUMA_MESH_OUTBOUND "))
}

#[tokio::main]
async fn main() {
    if !testkit::net::require_root() {
        return;
    }
    let pods: usize = std::env::var("PODS").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let mesh = MeshPod::new("kmc-burst").await;

    println!("{pods} concurrent ADDs of mesh pods through libcni per backend (bridge + host-local + portmap + ours)");
    println!(
        "{:<8} {:<11} {:>14} {:>7} {:>9} {:>9} {:>9} {:>7}",
        "backend", "lookup", "missing family", "failed", "p50 ms", "p99 ms", "max ms", "wall s"
    );
    let runs = ["nft", "legacy"].into_iter().flat_map(|b| [(b, Lookup::Agent), (b, Lookup::Direct)]);
    for (backend, lookup) in runs {
        let rt = mesh.chain_with_ours(backend, lookup);
        let netnses: Vec<NamedNetns> = (0..pods).map(|_| NamedNetns::new("burst")).collect();
        let attachments: Vec<Attachment> = netnses.iter().map(|n| mesh.attachment(n)).collect();
        let started = Instant::now();
        let results: Vec<(bool, Duration)> = std::thread::scope(|scope| {
            let workers: Vec<_> = attachments
                .iter()
                .map(|a| {
                    let rt = &rt;
                    scope.spawn(move || {
                        let start = Instant::now();
                        let ok = rt.add(a).inspect_err(|e| eprintln!("ADD failed: {e}")).is_ok();
                        (ok, start.elapsed())
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let wall = started.elapsed();
        let failed = results.iter().filter(|(ok, _)| !ok).count();
        let missing = netnses.iter().filter(|n| !(has_rules(n, false) && has_rules(n, true))).count();
        let mut times: Vec<Duration> = results.iter().map(|(_, t)| *t).collect();
        times.sort();
        println!(
            "{backend:<8} {:<11} {missing:>14} {failed:>7} {:>9.1} {:>9.1} {:>9.1} {:>7.1}",
            lookup.name(),
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 0.99)),
            ms(*times.last().unwrap()),
            wall.as_secs_f64()
        );
        for a in &attachments {
            let _ = rt.del(a);
        }
    }
}
