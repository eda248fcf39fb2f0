//! eBPF mode against iptables mode, side by side, interleaved, in one run (root):
//! - ADD overhead: registering a pod (`Registry::register`) against applying its
//!   iptables rules (`netfilter::apply`, nft backend), into fresh namespaces;
//! - connection set-up rate through the redirect: 10,000 connections from the pod to an
//!   outside address, redirected over the pod's loopback to its outbound listener.
//!
//! The programs are attached to a private child cgroup and pinned in a private bpffs,
//! as in the tests. Prints figures; asserts nothing beyond each step working.
//!
//! `cargo bench -p ebpf --bench ebpf_vs_iptables` (ROUNDS=N, CONNECTIONS=N to change).

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use kuma::Config;
use netfilter::{BackendChoice, BackendKind, Options};
use netns::NetNs;
use testkit::net::{NamedNetns, listen_tcp};

fn pod_namespace() -> NamedNetns {
    let ns = NamedNetns::new("bench");
    ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "veth1"]);
    ns.ip(&["addr", "add", "10.1.0.2/24", "dev", "eth0"]);
    ns.ip(&["addr", "add", "fd00:1::2/64", "dev", "eth0", "nodad"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns.ip(&["link", "set", "veth1", "up"]);
    ns
}

fn addresses() -> Vec<IpAddr> {
    vec!["10.1.0.2".parse().unwrap(), "fd00:1::2".parse().unwrap()]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Connects `n` times from inside `ns` to `dest`, each connection accepted on the
/// outbound listener (a blocking accept never held the loop back); returns the time.
fn connections(
    ns: &NetNs,
    n: usize,
    dest: SocketAddr,
    listener: &std::net::TcpListener,
    each: &mut Vec<Duration>,
) -> Duration {
    listener.set_nonblocking(false).unwrap();
    std::thread::scope(|scope| {
        let acceptor = scope.spawn(|| {
            for _ in 0..n {
                listener.accept().expect("accept on the outbound listener");
            }
        });
        let start = Instant::now();
        ns.run(|| {
            for _ in 0..n {
                let one = Instant::now();
                TcpStream::connect_timeout(&dest, Duration::from_secs(5)).expect("connect through the redirect");
                each.push(one.elapsed());
            }
        })
        .unwrap();
        acceptor.join().unwrap();
        start.elapsed()
    })
}

fn main() {
    if !common::require_ebpf() {
        return;
    }
    let rounds = env("ROUNDS", 100);
    let total = env("CONNECTIONS", 10_000);
    let node = common::TestNode::new();
    let mut registry = node.registry();
    let cfg = Config::default();
    let lock_dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-locks");
    let opts = Options { backend: BackendChoice::Forced(BackendKind::Nft), lock_dir, ..Options::default() };

    println!("ADD overhead into a fresh namespace (IPv4 + IPv6), {rounds} rounds each, interleaved");
    let (mut ebpf_add, mut ipt_add) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for which in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
            let named = pod_namespace();
            let ns = named.open();
            let start = Instant::now();
            if which == 0 {
                registry.register("bench", &ns, &cfg, &addresses()).unwrap();
                ebpf_add.push(start.elapsed());
                registry.unregister("bench").unwrap();
            } else {
                netfilter::apply(&ns, &cfg, &opts).unwrap();
                ipt_add.push(start.elapsed());
            }
        }
    }
    println!("{:<28} {:>10} {:>10}", "method", "p50", "p99");
    for v in [&mut ebpf_add, &mut ipt_add] {
        v.sort();
    }
    for (name, v) in [("eBPF register", &ebpf_add), ("iptables apply (nft)", &ipt_add)] {
        println!("{name:<28} {:>10} {:>10}", ms(percentile(v, 0.5)), ms(percentile(v, 0.99)));
    }
    println!(
        "p50 ratio eBPF/iptables: {:.3} (target: eBPF <= 2 ms p50)",
        percentile(&ebpf_add, 0.5).as_secs_f64() / percentile(&ipt_add, 0.5).as_secs_f64()
    );

    println!("\nconnection set-up through the redirect: {total} connections each, in interleaved batches of 1000");
    let (ebpf_named, ipt_named) = (pod_namespace(), pod_namespace());
    let (ebpf_ns, ipt_ns) = (ebpf_named.open(), ipt_named.open());
    registry.register("bench", &ebpf_ns, &cfg, &addresses()).unwrap();
    netfilter::apply(&ipt_ns, &cfg, &opts).unwrap();
    let (ebpf_listener, ipt_listener) = (listen_tcp(&ebpf_ns, false, 15001), listen_tcp(&ipt_ns, false, 15001));
    // Envoy listens with the backlog net.core.somaxconn allows (4096 by default), not
    // std's 128: with 128, an acceptor descheduled for a few milliseconds overflows the
    // queue, the SYN is dropped and that connection waits the 1 s initial RTO. The
    // faster the redirect, the likelier that is, which made the eBPF figure the lower.
    for l in [&ebpf_listener, &ipt_listener] {
        socket2::SockRef::from(l).listen(4096).unwrap();
    }
    let dest: SocketAddr = "10.1.0.1:8080".parse().unwrap();
    let (mut ebpf_time, mut ipt_time) = (Duration::ZERO, Duration::ZERO);
    let (mut ebpf_each, mut ipt_each) = (Vec::new(), Vec::new());
    let batch = 1000.min(total);
    for round in 0..total.div_ceil(batch) {
        for which in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
            if which == 0 {
                ebpf_time += connections(&ebpf_ns, batch, dest, &ebpf_listener, &mut ebpf_each);
            } else {
                ipt_time += connections(&ipt_ns, batch, dest, &ipt_listener, &mut ipt_each);
            }
        }
    }
    let n = (total.div_ceil(batch) * batch) as f64;
    let rate = |t: Duration| n / t.as_secs_f64();
    for v in [&mut ebpf_each, &mut ipt_each] {
        v.sort();
    }
    println!(
        "{:<28} {:>12} {:>14} {:>12} {:>12} {:>12} {:>8}",
        "method", "total", "connections/s", "connect p50", "p99", "max", ">= 1 s"
    );
    for (name, t, v) in
        [("eBPF connect redirect", ebpf_time, &ebpf_each), ("iptables REDIRECT (nft)", ipt_time, &ipt_each)]
    {
        let (p50, p99, max) = (percentile(v, 0.5), percentile(v, 0.99), percentile(v, 1.0));
        // A connection this slow had its SYN dropped and retransmitted.
        let retransmitted = v.iter().filter(|d| **d >= Duration::from_secs(1)).count();
        println!(
            "{name:<28} {:>12} {:>14.0} {:>12} {:>12} {:>12} {retransmitted:>8}",
            ms(t),
            rate(t),
            ms(p50),
            ms(p99),
            ms(max)
        );
    }
    println!("rate ratio eBPF/iptables: {:.2} (target >= 1)", rate(ebpf_time) / rate(ipt_time));
    registry.unregister("bench").unwrap();
}
