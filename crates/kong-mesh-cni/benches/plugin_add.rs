//! ADD of a mesh pod through the reference libcni runtime: the chain of bridge,
//! host-local and portmap with ours, asking the node agent (the installer, watching the
//! node's pods) or the API server directly, against the same chain without ours, and
//! ours for an ADD without a pod name (passed through at once: the cost of any call);
//! the four interleaved, per iptables backend and in eBPF mode (programs loaded into a
//! private bpffs and attached to the bench's own cgroup). Our overhead is the difference
//! (lookup, decision, rules for both families or the registration). Needs root, cgroup2
//! and the test environment.
//!
//! `cargo bench -p kong-mesh-cni --bench plugin_add` (ROUNDS=N, default 200;
//! BACKENDS=ebpf,nft for some of nft, legacy, nftables and ebpf).

#[path = "../tests/agent_node/mod.rs"]
mod agent_node;
mod common;
#[path = "../../ebpf/tests/common/mod.rs"]
mod ebpf_node;
#[path = "../tests/installer_host/mod.rs"]
mod installer_host;

use std::time::{Duration, Instant};

use common::{Lookup, MeshPod, ms, percentile};
use testkit::{CniRuntime, NamedNetns, Plugins};

/// The chain whose ADDs carry no pod name: ours passes them through at once.
const NO_POD_NAME: usize = 3;

#[tokio::main]
async fn main() {
    if !testkit::net::require_root() {
        return;
    }
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let mesh = MeshPod::new("kmc-bench").await;
    let node = ebpf_node::TestNode::new();

    println!("ADD of a mesh pod through libcni, {rounds} rounds per backend (bridge + host-local + portmap [+ ours])");
    println!("{:<9} {:<18} {:>9} {:>9}", "backend", "chain", "p50 ms", "p99 ms");
    let mut overheads = Vec::new();
    let only = std::env::var("BACKENDS").unwrap_or_default();
    let chosen = |b: &&str| only.is_empty() || only.split(',').any(|o| o == *b);
    for backend in ["nft", "legacy", "nftables", "ebpf"].into_iter().filter(chosen) {
        let with = |lookup| match backend {
            "ebpf" => {
                let rt = mesh.chain_with_ours("auto", lookup);
                let mut conflist = rt.conflist();
                let ours = conflist["plugins"].as_array_mut().unwrap().last_mut().unwrap();
                ours["ebpf"] = serde_json::json!({"bpffs_path": node.paths.bpffs});
                rt.set_conflist(&conflist);
                rt
            }
            _ => mesh.chain_with_ours(backend, lookup),
        };
        let chains = [
            ("ours, agent", Some(with(Lookup::Agent))),
            ("ours, direct GET", Some(with(Lookup::Direct))),
            ("without ours", None),
            // What any call of ours costs before its work: exec, configuration, log.
            ("ours, no pod name", Some(with(Lookup::Agent))),
        ];
        let without = CniRuntime::bridge(Plugins::Upstream);
        let mut times: Vec<Vec<Duration>> = vec![Vec::new(); chains.len()];
        for round in 0..rounds {
            // A different chain goes first each round: none profits from a warm cache.
            for i in (0..chains.len()).map(|i| (i + round) % chains.len()) {
                let rt = chains[i].1.as_ref().unwrap_or(&without);
                let netns = NamedNetns::new("badd");
                let mut a = mesh.attachment(&netns);
                if i == NO_POD_NAME {
                    a.pod_name.clear();
                }
                let start = Instant::now();
                rt.add(&a).expect("ADD");
                times[i].push(start.elapsed());
                rt.del(&a).expect("DEL");
            }
        }
        for t in &mut times {
            t.sort();
        }
        let p = |i: usize, q: f64| ms(percentile(&times[i], q));
        for (i, (name, _)) in chains.iter().enumerate() {
            println!("{backend:<9} {name:<18} {:>9.2} {:>9.2}", p(i, 0.5), p(i, 0.99));
        }
        let (agent50, agent99) = (p(0, 0.5) - p(2, 0.5), p(0, 0.99) - p(2, 0.99));
        let (direct50, direct99) = (p(1, 0.5) - p(2, 0.5), p(1, 0.99) - p(2, 0.99));
        let target = match backend {
            "ebpf" => "agent p50 <= 2 ms",
            "nftables" => "agent p50 < the nft row's, <= 5 ms either way",
            _ => "agent p50 <= 3 ms on nft",
        };
        let floor = p(NO_POD_NAME, 0.5) - p(2, 0.5);
        println!(
            "{backend:<9} our overhead: agent p50 {agent50:.2} ms p99 {agent99:.2} ms | direct GET p50 {direct50:.2} ms p99 {direct99:.2} ms | direct/agent p50 {:.1}x | a call with nothing to do p50 {floor:.2} ms (target: {target})",
            direct50 / agent50.max(0.01)
        );
        overheads.push((backend, agent50));
    }
    let ebpf = overheads.iter().find(|(b, _)| *b == "ebpf").map_or(0.0, |(_, o)| *o);
    for (backend, overhead) in overheads.iter().filter(|(b, _)| *b != "ebpf") {
        println!("p50 overhead with the agent, {backend} / ebpf: {:.1}x", overhead / ebpf.max(0.01));
    }
    // That the agent rows are the agent's: ADDs through its chain make no pod GET.
    let rt = mesh.chain_with_ours("nft", Lookup::Agent);
    let before = testkit::request_count(&mesh.ns.client(), "GET", "pods").await;
    for _ in 0..20 {
        let netns = NamedNetns::new("badd");
        let a = mesh.attachment(&netns);
        rt.add(&a).expect("ADD");
        rt.del(&a).expect("DEL");
    }
    let gets = testkit::request_count(&mesh.ns.client(), "GET", "pods").await - before;
    println!("pod GETs at the API server during 20 more ADDs through the agent chain: {gets} (must be 0)");
}
