//! ADD of a mesh pod through the reference libcni runtime, in ONE interleaved run: the
//! chain of bridge, host-local and portmap without ours; the floor, that chain with
//! ours called for an ADD without a pod name (passed through at once: the exec,
//! configuration and log every chained plugin call pays); and, per backend (iptables
//! nft and legacy, native nftables, eBPF with the programs in a private bpffs attached
//! to the bench's own cgroup), the chain with ours asking the node agent (the
//! installer, watching the node's pods) or the API server directly. Each round runs
//! every chain once, a different one first each round, in a fresh namespace each.
//!
//! The floor is the median of the per-round differences "floor chain minus the chain
//! without ours"; a backend's overhead is the median of the per-round differences
//! "its chain minus the floor chain": the work of ours above what any chained plugin
//! costs (lookup, decision, rules for both families or the registration). Pairing
//! within a round keeps the noise of a shared machine out of the difference. Needs
//! root, cgroup2 and the test environment.
//!
//! Then the same without libcni and the other plugins, whose own exec noise on a
//! shared machine is ten times our overhead: ours exec'ed directly with the stdin a
//! runtime gives it (prevResult with an IPv4 and an IPv6 address), in a fresh
//! namespace, the floor and each backend interleaved, 4 x ROUNDS rounds; with
//! BASELINE=PATH (another build of the binary, e.g. before a change) each chain runs
//! with it too, in the same rounds, for a before/after of one run.
//!
//! `cargo bench -p kong-mesh-cni --bench plugin_add` (ROUNDS=N, default 200;
//! BACKENDS=ebpf,nft for some of nft, legacy, nftables and ebpf; STRACE=DIR: then one
//! more ADD per backend with the agent, ours under `strace -f -tt`, the traces in
//! DIR/BACKEND.ADD.strace and DIR/BACKEND.DEL.strace, for the step by step breakdown;
//! TRACER=perf for `perf trace` instead).

#[path = "../tests/agent_node/mod.rs"]
mod agent_node;
mod common;
#[path = "../../ebpf/tests/common/mod.rs"]
mod ebpf_node;
#[path = "../tests/installer_host/mod.rs"]
mod installer_host;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Lookup, MeshPod, ms, percentile};
use serde_json::{Value, json};
use testkit::{Attachment, CniRuntime, NamedNetns, Plugins};

const BIN: &str = env!("CARGO_BIN_EXE_kong-mesh-cni");

/// The targets above the floor, p50 with the agent (issue 27).
fn target_ms(backend: &str) -> f64 {
    match backend {
        "nft" | "legacy" => 2.0,
        _ => 0.5,
    }
}

struct Chain {
    label: String,
    backend: Option<&'static str>,
    lookup: Option<Lookup>,
    /// `None`: the chain without ours.
    rt: Option<CniRuntime>,
    no_pod_name: bool,
}

const WITHOUT: usize = 0;
const FLOOR: usize = 1;

/// `x / floor`, or `-` when the floor is lost in the noise (a run on a loaded
/// machine can measure it at or below zero).
fn ratio(x: f64, floor: f64) -> String {
    if floor < 0.1 { "-".to_owned() } else { format!("{:.1}x", x / floor) }
}

/// The median of the per-round differences `a - b`, in ms (negative allowed).
fn paired(times: &[Vec<Duration>], a: usize, b: usize, q: f64) -> f64 {
    let mut d: Vec<f64> = times[a].iter().zip(&times[b]).map(|(x, y)| ms(*x) - ms(*y)).collect();
    d.sort_by(f64::total_cmp);
    d[((d.len() - 1) as f64 * q).round() as usize]
}

/// One call of the binary at `bin` as a runtime makes it: the CNI_* variables, our
/// entry of the conflist with the chain's name and version (and for ADD a previous
/// result with both families) on stdin. Returns how long the call took.
fn call(bin: &Path, entry: &Value, a: &Attachment, command: &str) -> Duration {
    let mut conf = entry.clone();
    conf["cniVersion"] = json!("1.0.0");
    conf["name"] = json!("kmc-bench");
    if command == "ADD" {
        conf["prevResult"] = json!({
            "cniVersion": "1.0.0",
            "ips": [{"address": "10.1.0.2/24"}, {"address": "fd00:1::2/64"}],
        });
    }
    let args = format!("K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={}", a.pod_namespace, a.pod_name, a.pod_uid);
    let stdin = conf.to_string();
    let start = Instant::now();
    let mut child = Command::new(bin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &a.container_id)
        .env("CNI_NETNS", &a.netns)
        .env("CNI_IFNAME", &a.ifname)
        .env("CNI_ARGS", args)
        .env("CNI_PATH", bin.parent().unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let took = start.elapsed();
    assert!(out.status.success(), "{command} by {}: {}", bin.display(), String::from_utf8_lossy(&out.stdout));
    took
}

/// Ours alone (see the header): the floor and each chain's entry, with our binary and
/// the baseline's, interleaved.
fn direct(mesh: &MeshPod, chains: &[Chain], rounds: usize) {
    let baseline = std::env::var_os("BASELINE").map(PathBuf::from);
    let mut bins = vec![("", PathBuf::from(BIN))];
    bins.extend(baseline.map(|b| ("baseline ", b)));
    // (bin, chain index): the chain's entry of ours; FLOOR's without a pod name.
    let calls: Vec<(usize, usize)> = (0..bins.len()).flat_map(|b| (FLOOR..chains.len()).map(move |c| (b, c))).collect();
    let entry =
        |c: usize| chains[c].rt.as_ref().unwrap().conflist()["plugins"].as_array().unwrap().last().unwrap().clone();
    let entries: Vec<Value> = (0..chains.len()).map(|c| if c < FLOOR { Value::Null } else { entry(c) }).collect();
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(rounds); calls.len()];
    for round in 0..rounds {
        for i in (0..calls.len()).map(|i| (i + round) % calls.len()) {
            let (b, c) = calls[i];
            let netns = NamedNetns::new("bdir");
            let mut a = mesh.attachment(&netns);
            if chains[c].no_pod_name {
                a.pod_name.clear();
            }
            times[i].push(call(&bins[b].1, &entries[c], &a, "ADD"));
            call(&bins[b].1, &entries[c], &a, "DEL");
        }
    }
    println!("ours alone (exec'ed with a runtime's stdin, no libcni, no other plugin), {rounds} interleaved rounds");
    println!(
        "{:<37} {:>9} {:>9} {:>16} {:>16} {:>12}",
        "call", "p50 ms", "p99 ms", "above floor p50", "above floor p90", "p50 / floor"
    );
    for (i, &(b, c)) in calls.iter().enumerate() {
        let mut sorted = times[i].clone();
        sorted.sort();
        let floor_i = calls.iter().position(|&x| x == (b, FLOOR)).unwrap();
        let label = format!("{}{}", bins[b].0, chains[c].label);
        let (p50, p99) = (ms(percentile(&sorted, 0.5)), ms(percentile(&sorted, 0.99)));
        if c == FLOOR {
            println!("{label:<37} {p50:>9.2} {p99:>9.2}");
            continue;
        }
        let floor = ms(percentile(
            &{
                let mut f = times[floor_i].clone();
                f.sort();
                f
            },
            0.5,
        ));
        let (above50, above90) = (paired(&times, i, floor_i, 0.5), paired(&times, i, floor_i, 0.9));
        let target = match chains[c].lookup {
            Some(Lookup::Agent) => {
                let t = target_ms(chains[c].backend.unwrap());
                format!("  target <= {t} ms: {}", if above50 <= t { "met" } else { "not met" })
            }
            _ => String::new(),
        };
        println!(
            "{label:<37} {p50:>9.2} {p99:>9.2} {above50:>13.2} ms {above90:>13.2} ms {:>12}{target}",
            ratio(above50, floor)
        );
    }
}

/// A plugin directory whose `kong-mesh-cni` runs ours under strace, writing
/// `TRACE.COMMAND.strace`.
fn strace_wrapper(trace: &std::path::Path) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_kong-mesh-cni"));
    // TRACER=perf: `perf trace` (tracepoints, no ptrace stop per syscall: timings
    // closer to an untraced run than strace's).
    const SYSCALLS: &str =
        "execve,clone,clone3,setns,unshare,mount,openat,connect,sendto,sendmsg,recvmsg,write,rename,wait4,exit_group";
    let script = match std::env::var("TRACER").as_deref() {
        Ok("perf") => format!(
            "#!/bin/sh\nexec perf trace -T -e {SYSCALLS} -o {}.$CNI_COMMAND.strace -- {}\n",
            trace.display(),
            bin.display()
        ),
        _ => format!(
            "#!/bin/sh\nexec strace -f -tt --seccomp-bpf -e trace={SYSCALLS} -o {}.$CNI_COMMAND.strace {}\n",
            trace.display(),
            bin.display()
        ),
    };
    let path = dir.path().join("kong-mesh-cni");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[tokio::main]
async fn main() {
    if !testkit::net::require_root() {
        return;
    }
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let only = std::env::var("BACKENDS").unwrap_or_default();
    let backends: Vec<&'static str> = ["nft", "legacy", "nftables", "ebpf"]
        .into_iter()
        .filter(|b| only.is_empty() || only.split(',').any(|o| o == *b))
        .collect();
    let mesh = MeshPod::new("kmc-bench").await;
    // Attaches the programs to a cgroup of the bench's own thread: only with eBPF.
    let node = backends.contains(&"ebpf").then(ebpf_node::TestNode::new);

    let mut chains = vec![
        Chain { label: "without ours".into(), backend: None, lookup: None, rt: None, no_pod_name: false },
        Chain {
            label: "floor: ours, no pod name".into(),
            backend: None,
            lookup: None,
            rt: Some(mesh.chain_with_ours("nft", Lookup::Agent)),
            no_pod_name: true,
        },
    ];
    for &backend in &backends {
        for lookup in [Lookup::Agent, Lookup::Direct] {
            let rt = match (backend, &node) {
                ("ebpf", Some(node)) => mesh.chain_in_ebpf_mode(lookup, &node.paths.bpffs),
                _ => mesh.chain_with_ours(backend, lookup),
            };
            let label = format!("{backend}, {}", lookup.name());
            chains.push(Chain {
                label,
                backend: Some(backend),
                lookup: Some(lookup),
                rt: Some(rt),
                no_pod_name: false,
            });
        }
    }
    let without = CniRuntime::bridge(Plugins::Upstream);
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(rounds); chains.len()];
    for round in 0..rounds {
        // A different chain goes first each round: none profits from a warm cache.
        for i in (0..chains.len()).map(|i| (i + round) % chains.len()) {
            let rt = chains[i].rt.as_ref().unwrap_or(&without);
            let netns = NamedNetns::new("badd");
            let mut a = mesh.attachment(&netns);
            if chains[i].no_pod_name {
                a.pod_name.clear();
            }
            let start = Instant::now();
            rt.add(&a).unwrap_or_else(|e| panic!("ADD through {}: {e}", chains[i].label));
            times[i].push(start.elapsed());
            rt.del(&a).expect("DEL");
        }
    }

    println!(
        "ADD of a mesh pod through libcni (bridge + host-local + portmap [+ ours]), {rounds} interleaved rounds of {} chains",
        chains.len()
    );
    println!("{:<28} {:>9} {:>9}", "chain", "p50 ms", "p99 ms");
    let mut sorted = times.clone();
    for t in &mut sorted {
        t.sort();
    }
    for (chain, t) in chains.iter().zip(&sorted) {
        println!("{:<28} {:>9.2} {:>9.2}", chain.label, ms(percentile(t, 0.5)), ms(percentile(t, 0.99)));
    }
    let floor = paired(&times, FLOOR, WITHOUT, 0.5);
    println!("floor (ours passing a pod through, above the chain without ours): p50 {floor:.2} ms");
    println!(
        "{:<9} {:<11} {:>16} {:>16} {:>15} {:>16}",
        "backend", "lookup", "above floor p50", "above floor p90", "p50 / floor", "target (agent)"
    );
    for (i, chain) in chains.iter().enumerate().skip(FLOOR + 1) {
        let (backend, lookup) = (chain.backend.unwrap(), chain.lookup.unwrap());
        let (p50, p90) = (paired(&times, i, FLOOR, 0.5), paired(&times, i, FLOOR, 0.9));
        let target = match lookup {
            Lookup::Agent => {
                let t = target_ms(backend);
                format!("<= {t} ms: {}", if p50 <= t { "met" } else { "not met" })
            }
            Lookup::Direct => String::new(),
        };
        println!(
            "{backend:<9} {:<11} {:>13.2} ms {:>13.2} ms {:>15} {target:>16}",
            lookup.name(),
            p50,
            p90,
            ratio(p50, floor)
        );
    }
    direct(&mesh, &chains, rounds * 4);
    if let Some(dir) = std::env::var_os("STRACE") {
        for chain in chains.iter_mut().filter(|c| c.lookup == Some(Lookup::Agent)) {
            let trace = std::path::Path::new(&dir).join(chain.backend.unwrap());
            let wrapper = strace_wrapper(&trace);
            let rt = chain.rt.as_mut().unwrap();
            rt.prepend_plugin_dir(wrapper.path().to_path_buf());
            let netns = NamedNetns::new("badd");
            let a = mesh.attachment(&netns);
            rt.add(&a).expect("ADD under strace");
            rt.del(&a).expect("DEL");
            println!("one ADD through {} under strace: {}.ADD.strace", chain.label, trace.display());
        }
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
