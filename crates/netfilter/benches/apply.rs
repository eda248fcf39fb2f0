//! Apply of the default rule set into fresh pod-like namespaces (lo + a veth with IPv4
//! and an IPv6 link-local address, so both families get rules): ours
//! (`netfilter::apply`) with the native nf_tables backend, with iptables-nft and with
//! iptables-legacy, and the way the Go implementation does it (per family, one after
//! the other: iptables-save, iptables-restore --test, iptables-restore) with each
//! iptables flavour; side by side, interleaved (every round applies each method once,
//! in a rotating order, each into its own fresh namespace), in one run. Needs root.
//! Prints figures; asserts nothing.
//!
//! `cargo bench -p netfilter --bench apply` (ROUNDS=N to change the 200 rounds).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kuma::Config;
use netfilter::{BackendChoice, BackendKind, Options, apply};
use netns::NetNs;
use rules::{Family, generate, restore::install_payload};
use testkit::net::NamedNetns;

fn pod_namespace() -> NamedNetns {
    let ns = NamedNetns::new("bench");
    ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "veth1"]);
    ns.ip(&["addr", "add", "10.1.0.2/24", "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    // With the peer up the link has carrier, and the kernel adds eth0's IPv6 link-local
    // (asynchronously: wait for it, outside the timed part).
    ns.ip(&["link", "set", "veth1", "up"]);
    let start = Instant::now();
    while !ns.ip(&["-6", "addr", "show", "dev", "eth0"]).contains("inet6") {
        assert!(start.elapsed() < Duration::from_secs(5), "no IPv6 link-local on eth0");
        std::thread::sleep(Duration::from_millis(1));
    }
    ns
}

fn go_way(ns: &NetNs, kind: BackendKind, cfg: &Config) {
    for family in [Family::V4, Family::V6] {
        let payload = install_payload(&generate(cfg, family, &[]));
        let base = if family == Family::V4 { "iptables" } else { "ip6tables" };
        let tool = |op: &str| format!("{base}-{}-{op}", kind.as_str());
        ns.run(|| {
            let save = Command::new(tool("save")).stdout(Stdio::null()).status().unwrap();
            assert!(save.success());
            for test in [true, false] {
                let mut cmd = Command::new(tool("restore"));
                cmd.arg("--noflush").arg("--wait=5").stdin(Stdio::piped());
                if test {
                    cmd.arg("--test");
                }
                let mut child = cmd.spawn().unwrap();
                use std::io::Write;
                child.stdin.take().unwrap().write_all(payload.as_bytes()).unwrap();
                assert!(child.wait().unwrap().success());
            }
        })
        .unwrap();
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

#[derive(Clone, Copy)]
enum Method {
    Ours(BackendKind),
    Go(BackendKind),
}

impl Method {
    fn name(self) -> String {
        match self {
            Method::Ours(k) => format!("ours, {}", k.label()),
            Method::Go(k) => format!("Go way, {}", k.label()),
        }
    }
}

fn main() {
    if !testkit::net::require_root() {
        return;
    }
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let cfg = Config::default();
    let lock_dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-locks");
    let methods = [
        Method::Ours(BackendKind::Native),
        Method::Ours(BackendKind::Nft),
        Method::Ours(BackendKind::Legacy),
        Method::Go(BackendKind::Nft),
        Method::Go(BackendKind::Legacy),
    ];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); methods.len()];
    for round in 0..rounds {
        // Rotate which goes first, so none always runs on a warmer machine.
        for i in (0..methods.len()).map(|i| (i + round) % methods.len()) {
            let named = pod_namespace();
            let ns = named.open();
            let start = Instant::now();
            match methods[i] {
                Method::Ours(kind) => {
                    let opts = Options {
                        backend: BackendChoice::Forced(kind),
                        lock_dir: lock_dir.clone(),
                        ..Options::default()
                    };
                    let report = apply(&ns, &cfg, &opts).unwrap();
                    assert_eq!(report.families.len(), 2);
                }
                Method::Go(kind) => go_way(&ns, kind, &cfg),
            }
            times[i].push(start.elapsed());
        }
    }
    for v in &mut times {
        v.sort();
    }
    let mean = |v: &[Duration]| v.iter().sum::<Duration>() / v.len() as u32;
    println!("apply of the default rule set into a fresh namespace (both families), {rounds} rounds, interleaved");
    println!("{:<28} {:>10} {:>10} {:>10}", "method", "p50", "p99", "mean");
    for (m, v) in methods.iter().zip(&times) {
        println!("{:<28} {:>10} {:>10} {:>10}", m.name(), ms(percentile(v, 0.5)), ms(percentile(v, 0.99)), ms(mean(v)));
    }
    let p50 = |i: usize| percentile(&times[i], 0.5).as_secs_f64();
    println!("p50 ratio native / ours iptables-nft:    {:.2} (target <= 0.33)", p50(0) / p50(1));
    println!("p50 ratio native / ours iptables-legacy: {:.2}", p50(0) / p50(2));
    println!("p50 ratio ours / Go way, iptables-nft:    {:.2} (target <= 0.33)", p50(1) / p50(3));
    println!("p50 ratio ours / Go way, iptables-legacy: {:.2} (target <= 0.33)", p50(2) / p50(4));
    println!("native p50 {} (target <= 1 ms)", ms(percentile(&times[0], 0.5)));
}
