//! A burst of pod starts on one node: 100 mesh pods ADDed at once through the
//! reference libcni runtime (bridge + host-local + portmap + ours), per backend
//! (iptables nft and legacy, native nftables, eBPF with the programs attached to the
//! bench's own cgroup), with the pod looked up from the node agent and, for the
//! iptables backends, from the API server directly for comparison. Reports pods that
//! ended up without the rules of one of their families (IPv6 is enabled in every pod
//! namespace, so every pod needs both; must be 0; eBPF mode has no rules in the pod,
//! so `-`), failed ADDs (must be 0), and ADD latency p50/p99/max under the burst.
//! Needs root, cgroup2 and the test environment.
//!
//! `cargo bench -p kong-mesh-cni --bench plugin_burst` (PODS=N, default 100;
//! BACKENDS=nft,ebpf for some of nft, legacy, nftables and ebpf).

#[path = "../tests/agent_node/mod.rs"]
mod agent_node;
mod common;
#[path = "../../ebpf/tests/common/mod.rs"]
mod ebpf_node;
#[path = "../tests/installer_host/mod.rs"]
mod installer_host;

use std::time::{Duration, Instant};

use common::{Lookup, MeshPod, ms, percentile};
use testkit::{Attachment, NamedNetns};

/// Whether the namespace holds our outbound chain for the family, with any backend.
fn has_rules(netns: &NamedNetns, v6: bool) -> bool {
    let tools: [&str; 2] = if v6 {
        ["ip6tables-nft-save", "ip6tables-legacy-save"]
    } else {
        ["iptables-nft-save", "iptables-legacy-save"]
    };
    let family = if v6 { "ip6" } else { "ip" };
    tools.iter().any(|t| netns.exec(t, &["-t", "nat"]).contains("-A KUMA_MESH_OUTBOUND "))
        || netns.exec("nft", &["list", "ruleset"]).contains(&format!("table {family} {} {{", rules::nft::TABLE))
}

#[tokio::main]
async fn main() {
    if !testkit::net::require_root() {
        return;
    }
    let pods: usize = std::env::var("PODS").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let only = std::env::var("BACKENDS").unwrap_or_default();
    let backends: Vec<&'static str> = ["nft", "legacy", "nftables", "ebpf"]
        .into_iter()
        .filter(|b| only.is_empty() || only.split(',').any(|o| o == *b))
        .collect();
    let mesh = MeshPod::new("kmc-burst").await;
    // Attaches the programs to a cgroup of the bench's own thread: only with eBPF.
    let node = backends.contains(&"ebpf").then(ebpf_node::TestNode::new);

    println!("{pods} concurrent ADDs of mesh pods through libcni per backend (bridge + host-local + portmap + ours)");
    println!(
        "{:<8} {:<11} {:>14} {:>7} {:>9} {:>9} {:>9} {:>7}",
        "backend", "lookup", "missing family", "failed", "p50 ms", "p99 ms", "max ms", "wall s"
    );
    let runs = backends.iter().flat_map(|&b| match b {
        "nft" | "legacy" => vec![(b, Lookup::Agent), (b, Lookup::Direct)],
        _ => vec![(b, Lookup::Agent)],
    });
    for (backend, lookup) in runs {
        let rt = match (backend, &node) {
            ("ebpf", Some(node)) => mesh.chain_in_ebpf_mode(lookup, &node.paths.bpffs),
            _ => mesh.chain_with_ours(backend, lookup),
        };
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
        let missing = match backend {
            "ebpf" => "-".to_owned(),
            _ => netnses.iter().filter(|n| !(has_rules(n, false) && has_rules(n, true))).count().to_string(),
        };
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
