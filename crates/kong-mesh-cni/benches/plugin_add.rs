//! ADD of a mesh pod through the reference libcni runtime: the chain of bridge,
//! host-local and portmap with ours against the same chain without ours, interleaved,
//! per iptables backend. Our overhead is the difference (API lookup through a service account,
//! decision, rules for both families included). Needs root and the test environment.
//!
//! `cargo bench -p kong-mesh-cni --bench plugin_add` (ROUNDS=N, default 200).

mod common;

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

    println!("ADD of a mesh pod through libcni, {rounds} rounds per backend (bridge + host-local + portmap [+ ours])");
    println!("{:<8} {:<14} {:>9} {:>9}", "backend", "chain", "p50 ms", "p99 ms");
    for backend in ["nft", "legacy", "nftables"] {
        let without = CniRuntime::bridge(Plugins::Upstream);
        let with = mesh.chain_with_ours(backend);
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
        // The native backend spawns nothing: one netlink batch (issue 17).
        let target = if backend == "nftables" { 5 } else { 25 };
        println!(
            "{backend:<8} our overhead: p50 {overhead:.2} ms, p99 {overhead99:.2} ms (target: p50 <= {target} ms)"
        );
    }
}
