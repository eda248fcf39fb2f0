//! ADD of a mesh pod through the reference libcni runtime: the chain of bridge,
//! host-local and portmap with ours against the same chain without ours, interleaved,
//! per iptables backend and in eBPF mode (programs loaded into a private bpffs and
//! attached to the bench's own cgroup). Our overhead is the difference (API lookup
//! through a service account, decision, rules for both families or the registration
//! included). Needs root, cgroup2 and the test environment.
//!
//! `cargo bench -p kong-mesh-cni --bench plugin_add` (ROUNDS=N, default 200).

mod common;
#[path = "../../ebpf/tests/common/mod.rs"]
mod ebpf_node;

use std::time::Instant;

use common::{MeshPod, ms, percentile};
use testkit::{Attachment, CniRuntime, NamedNetns, Plugins};

#[tokio::main]
async fn main() {
    if !testkit::net::require_root() {
        return;
    }
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let mesh = MeshPod::new("kmc-bench").await;
    let ns = &mesh.ns;
    let node = ebpf_node::TestNode::new();

    println!("ADD of a mesh pod through libcni, {rounds} rounds per backend (bridge + host-local + portmap [+ ours])");
    println!("{:<8} {:<14} {:>9} {:>9}", "backend", "chain", "p50 ms", "p99 ms");
    let mut overheads = Vec::new();
    for backend in ["nft", "legacy", "nftables", "ebpf"] {
        let without = CniRuntime::bridge(Plugins::Upstream);
        let with = match backend {
            "ebpf" => {
                let rt = mesh.chain_with_ours("auto");
                let mut conflist = rt.conflist();
                let ours = conflist["plugins"].as_array_mut().unwrap().last_mut().unwrap();
                ours["ebpf"] = serde_json::json!({"bpffs_path": node.paths.bpffs});
                rt.set_conflist(&conflist);
                rt
            }
            _ => mesh.chain_with_ours(backend),
        };
        let (mut t_with, mut t_without) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            for first in if round % 2 == 0 { [true, false] } else { [false, true] } {
                let (rt, times) = if first { (&with, &mut t_with) } else { (&without, &mut t_without) };
                let netns = NamedNetns::new("badd");
                let a = Attachment::new(&netns, ns.name(), "web");
                let start = Instant::now();
                rt.add(&a).expect("ADD");
                times.push(start.elapsed());
                rt.del(&a).expect("DEL");
            }
        }
        t_with.sort();
        t_without.sort();
        for (name, v) in [("with ours", &t_with), ("without", &t_without)] {
            println!("{backend:<8} {name:<14} {:>9.2} {:>9.2}", ms(percentile(v, 0.5)), ms(percentile(v, 0.99)));
        }
        let overhead = ms(percentile(&t_with, 0.5)) - ms(percentile(&t_without, 0.5));
        let overhead99 = ms(percentile(&t_with, 0.99)) - ms(percentile(&t_without, 0.99));
        let target = if backend == "ebpf" { 2 } else { 25 };
        println!(
            "{backend:<8} our overhead: p50 {overhead:.2} ms, p99 {overhead99:.2} ms (target: p50 <= {target} ms)"
        );
        overheads.push((backend, overhead));
    }
    let ebpf = overheads.iter().find(|(b, _)| *b == "ebpf").unwrap().1;
    for (backend, overhead) in overheads.iter().filter(|(b, _)| *b != "ebpf") {
        println!("p50 overhead {backend} / ebpf: {:.1}x", overhead / ebpf.max(0.01));
    }
}
