//! Scale: NODES nodes (default 2,000), each with its CNI pod, created through a real API
//! server 32 at a time while the controller runs in its own process (this binary,
//! re-executed in controller mode: the same `controller::run` as `kong-mesh-cni
//! controller`). Every other CNI pod becomes Ready. Printed: the time until every taint
//! is right (even nodes untainted, odd nodes tainted once), then the time until every
//! taint is gone once the other pods become Ready too, and the controller process's
//! peak and current memory. Targets: under 60 s, under 100 MiB.
//!
//!     cargo bench -p controller --bench scale            # NODES=500 for a quick run

use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use controller::{ControllerArgs, TAINT_KEY};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use testkit::{ApiServer, TestNamespace, pod};

#[path = "../tests/common/mod.rs"]
mod common;
use common::http_get;

/// Set in the child: run the controller with the flags of argv.
const CONTROLLER_MODE: &str = "KMC_SCALE_BENCH_CONTROLLER";
const IN_FLIGHT: usize = 32;

fn main() -> ExitCode {
    if std::env::var_os(CONTROLLER_MODE).is_some() {
        let filter = tracing_subscriber::EnvFilter::try_from_env("KMC_SCALE_LOG").unwrap_or_else(|_| "warn".into());
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
        let flags: Vec<String> = std::env::args().skip(1).collect();
        let run = controller::run(ControllerArgs::from_flags(flags).expect("controller flags"));
        return run.map_or_else(|e| panic!("controller stopped: {e}"), |()| ExitCode::SUCCESS);
    }
    if std::env::args().any(|a| a == "--list") {
        // `cargo bench -- --list` and the like: nothing to enumerate.
        return ExitCode::SUCCESS;
    }
    if testkit::skip_heavy("controllers scale benchmark") {
        return ExitCode::SUCCESS;
    }
    let nodes: usize = std::env::var("NODES").ok().and_then(|n| n.parse().ok()).unwrap_or(2000);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(bench(nodes));
    ExitCode::SUCCESS
}

async fn bench(count: usize) {
    let server = ApiServer::shared();
    let ns = server.namespace("kmc-scale").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut controller = spawn_controller(server, &ns, port);
    wait_ready(port).await;
    let nodes = Api::<Node>::all(ns.client());

    let start = Instant::now();
    futures::stream::iter(0..count)
        .for_each_concurrent(IN_FLIGHT, |i| {
            let (nodes, ns) = (nodes.clone(), &ns);
            async move {
                let node = Node {
                    metadata: ObjectMeta { name: Some(node_name(i)), ..Default::default() },
                    ..Default::default()
                };
                nodes.create(&PostParams::default(), &node).await.expect("creating a node");
                let cni = pod(&format!("cni-{i}")).label("app", "kong-mesh-cni").node_name(&node_name(i)).build();
                ns.create_pod(cni).await;
                if i % 2 == 0 {
                    ns.set_pod_running(&format!("cni-{i}"), None).await;
                }
            }
        })
        .await;
    let created = start.elapsed();
    converge(&nodes, count, |i| i % 2 == 1).await;
    let settled = start.elapsed();
    let (peak, rss) = memory(&controller);

    let second = Instant::now();
    futures::stream::iter((1..count).step_by(2))
        .for_each_concurrent(IN_FLIGHT, |i| {
            let ns = &ns;
            async move {
                ns.set_pod_running(&format!("cni-{i}"), None).await;
            }
        })
        .await;
    let marked = second.elapsed();
    converge(&nodes, count, |_| false).await;
    let untainted = second.elapsed();
    let (peak_after, rss_after) = memory(&controller);
    let (_, metrics) = http_get(port, "/metrics").await.expect("/metrics answers");

    println!(
        "controllers scale benchmark: {count} nodes and {count} CNI pods through a real kube-apiserver, {IN_FLIGHT} requests in flight"
    );
    println!("  created nodes and pods (half of the pods Ready) in {:.1}s", created.as_secs_f64());
    println!("  every taint right {:.1}s after the first node (target < 60 s)", settled.as_secs_f64());
    println!(
        "  the other {} pods Ready in {:.1}s; every taint gone {:.1}s after the first",
        count / 2,
        marked.as_secs_f64(),
        untainted.as_secs_f64()
    );
    println!(
        "  controller process memory: peak {:.1} MiB, now {:.1} MiB (target < 100 MiB)",
        mib(peak.max(peak_after)),
        mib(rss_after)
    );
    println!("    (after the first phase: peak {:.1} MiB, resident {:.1} MiB)", mib(peak), mib(rss));
    for line in metrics.lines().filter(|l| {
        ["taint_changes", "conflicts", "errors"].iter().any(|m| l.starts_with(&format!("kong_mesh_cni_controller_{m}")))
    }) {
        println!("  {line}");
    }
    println!("  command: cargo bench -p controller --bench scale   (NODES={count})");

    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(controller.id() as libc::pid_t, libc::SIGTERM) };
    let status = controller.wait().expect("waiting for the controller");
    assert!(status.success(), "controller exited with {status}");
}

fn node_name(i: usize) -> String {
    format!("scale-{i:05}")
}

fn spawn_controller(server: &ApiServer, ns: &TestNamespace, port: u16) -> Child {
    let port = port.to_string();
    Command::new(std::env::current_exe().unwrap())
        .args(["--cni-namespace", ns.name(), "--lease-namespace", ns.name(), "--metrics-port", &port])
        .env(CONTROLLER_MODE, "1")
        .env("KUBECONFIG", server.kubeconfig_path())
        .stdin(Stdio::null())
        .spawn()
        .expect("starting the controller process")
}

/// Polls the node list until each scale node carries our taint exactly when
/// `tainted(i)`, and never twice.
async fn converge(nodes: &Api<Node>, count: usize, tainted: impl Fn(usize) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let list = nodes.list(&ListParams::default()).await.expect("listing nodes");
        let right = list
            .items
            .iter()
            .filter_map(|n| {
                let i: usize = n.metadata.name.as_deref()?.strip_prefix("scale-")?.parse().ok()?;
                let ours = n.spec.as_ref()?.taints.iter().flatten().filter(|t| t.key == TAINT_KEY).count();
                Some(ours == usize::from(tainted(i)))
            })
            .filter(|ok| *ok)
            .count();
        if right == count {
            return;
        }
        assert!(Instant::now() < deadline, "after 300 s, {right} of {count} nodes are right");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn wait_ready(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(port, "/readyz").await.is_none_or(|(code, _)| code != 200) {
        assert!(Instant::now() < deadline, "controller not ready after 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// VmHWM and VmRSS of the process, in bytes.
fn memory(child: &Child) -> (u64, u64) {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).expect("reading the controller's /proc status");
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap_or_default();
        line.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()).unwrap_or(0) * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
