//! The CNI installed as users install it, on a real node (testkit::node: kubelet,
//! containerd v2, runc; bridge + host-local + portmap as the primary CNI, then kind's
//! kindnet shape, ptp + host-local + portmap, on a second node): our image
//! (scripts/image-build.sh) imported into the node's containerd, our chart rendered by
//! `kong-mesh-cni manifests` with values for this node and applied to its API server.
//! The node registers with `NodeReadiness:NoSchedule`, as a cluster that waits for its
//! CNI does. Then, in order on one node (each step needs the state the last one left):
//! the DaemonSet pod chains into the primary conflist; the controller untaints the
//! node; a Kuma-shaped mesh pod (our validator as its `kuma-validation` init container)
//! is Ready and its app's connection lands on the UID-5678 sidecar with its original
//! destination; a plain pod is untouched; the DaemonSet pod's log (as `kubectl logs`)
//! has the plugin's lines for both; a rolling update of the DaemonSet while mesh pods
//! are being created leaves every one of them redirected; a primary rewriting its own
//! file (without our entry) every second while mesh pods start leaves every one of them
//! redirected, and the sandboxes our plugin never saw are counted; the API server stopped for
//! 30 s leaves the node Ready, and mesh pods whose ADD ran meanwhile end up
//! redirected; deleting the release restores the primary conflist byte for byte.
//! Every step's duration is printed.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Event, Node as KubeNode, Pod};
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use testkit::node::{ClusterNetwork, node_ready};
use testkit::node_chart::{
    CNI_NAMESPACE, Installed, Release, cni_pod_ready, install, plugin_types, tainted, uninstall,
};
use testkit::node_pods::{
    self, Validator, assert_redirected, container, deployment, mesh_pod, plain_pod, pod_ip, pod_ready, sandbox_pids,
};
use testkit::{Node, NodeOptions};

const BINARY: &str = env!("CARGO_BIN_EXE_kong-mesh-cni");
const POD_READY: Duration = Duration::from_secs(90);
/// Mesh pods created during the rollout (a Deployment, so that a pod the repair
/// controller deletes comes back).
const BURST: i32 = 6;
const OUTAGE: Duration = Duration::from_secs(30);

/// Step durations, printed as they end and once more at the end.
struct Steps {
    at: Instant,
    done: Vec<(String, Duration)>,
}

impl Steps {
    fn new() -> Steps {
        Steps { at: Instant::now(), done: Vec::new() }
    }
    fn done(&mut self, what: &str) {
        let took = self.at.elapsed();
        eprintln!("step: {what}: {took:.1?}");
        self.done.push((what.to_string(), took));
        self.at = Instant::now();
    }
}

fn ready_since(node: &KubeNode) -> Option<String> {
    let conditions = node.status.as_ref()?.conditions.as_ref()?;
    let ready = conditions.iter().find(|c| c.type_ == "Ready" && c.status == "True")?;
    Some(format!("{:?}", ready.last_transition_time))
}

async fn run_pod(client: &Client, node: &Node, pod: Value, more: &dyn Fn() -> String) -> (Pod, Duration) {
    node_pods::run_pod(client, node, pod, POD_READY, more).await.unwrap_or_else(|e| panic!("{e}"))
}

/// Waits until `deployment` has `replicas` pods, all Ready and none being deleted.
async fn deployment_ready(client: &Client, deployment: &str, replicas: usize, timeout: Duration) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let start = Instant::now();
    loop {
        let list = pods.list(&ListParams::default().labels(&format!("app={deployment}"))).await.unwrap().items;
        let live: Vec<Pod> = list.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
        if live.len() == replicas && live.iter().all(pod_ready) {
            return live;
        }
        if start.elapsed() > timeout {
            let states: Vec<_> = live
                .iter()
                .map(|p| (p.metadata.name.clone(), p.status.as_ref().map(|s| s.init_container_statuses.clone())))
                .collect();
            panic!("{deployment}: not {replicas} Ready pods within {timeout:?}: {states:#?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn scale(client: &Client, name: &str, replicas: i32) {
    let patch = json!({ "spec": { "replicas": replicas } });
    Api::<Deployment>::namespaced(client.clone(), "default")
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// Waits until the DaemonSet's current template runs Ready on the node.
async fn rolled_out(client: &Client, timeout: Duration) {
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), CNI_NAMESPACE);
    let start = Instant::now();
    loop {
        let ds = api.get("kong-mesh-cni").await.unwrap();
        let status = ds.status.clone().unwrap_or_default();
        if status.observed_generation >= ds.metadata.generation
            && status.updated_number_scheduled == Some(status.desired_number_scheduled)
            && status.number_available == Some(status.desired_number_scheduled)
            && status.number_unavailable.unwrap_or(0) == 0
        {
            return;
        }
        assert!(start.elapsed() < timeout, "DaemonSet not rolled out within {timeout:?}: {status:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The scenario on each cluster network, one after the other (a node each): today's
/// bridge, and kind's (kindnet's ptp: no bridge, a veth and a /32 route per pod).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cni_installed_from_our_chart_and_image_works_under_kubelet_and_containerd() {
    if testkit::skip_privileged("the node chart test") {
        return;
    }
    for network in [ClusterNetwork::Bridge, ClusterNetwork::Kindnet] {
        eprintln!("=== cluster network: {network:?}");
        chart_scenario(network).await;
    }
}

async fn chart_scenario(network: ClusterNetwork) {
    let started = Instant::now();
    let mut steps = Steps::new();
    let options = NodeOptions { network, taints: vec!["NodeReadiness:NoSchedule".into()], ..NodeOptions::default() };
    let mut node = Node::up(options).await.unwrap_or_else(|e| panic!("bringing the node up: {e}"));
    eprintln!("node {} Ready {:.1?} after start", node.name, node.up_time);
    steps.done("node up");
    let client = node.client().await.unwrap();
    let nodes: Api<KubeNode> = Api::all(client.clone());
    assert!(tainted(&nodes.get(&node.name).await.unwrap()), "registered with NodeReadiness:NoSchedule");
    let primary = std::fs::read_to_string(&node.conflist).unwrap();

    // Install, as a user would: image, chart, apply; then the controller takes the taint off.
    let installed = install(&node, &client, Path::new(BINARY), &[], Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("installing from the chart: {e}"));
    let installed_times = (installed.image_time, installed.apply_to_cni_ready, installed.apply_to_untainted);
    let Installed { image, values, cni_pod, applied, .. } = installed;
    steps.done("image built (scripts/image-build.sh) and imported, chart applied, CNI pod Ready, node untainted");
    let cni_pod = cni_pod.metadata.name.clone().unwrap();
    let chained = std::fs::read_to_string(&node.conflist).unwrap();
    let primary_type = match network {
        ClusterNetwork::Bridge => "bridge",
        ClusterNetwork::Kindnet => "ptp",
        ClusterNetwork::Flannel => "flannel",
    };
    assert_eq!(plugin_types(&chained), [primary_type, "portmap", "kong-mesh-cni"], "chained last:\n{chained}");
    assert!(node.cni_bin_dir.join("kong-mesh-cni").is_file(), "the plugin binary in the node's bin dir");

    // A mesh pod and a plain one.
    let installer_log = || node_pods::cni_logs(&node);
    let (target, _) = run_pod(
        &client,
        &node,
        plain_pod("target", &node, vec![container("serve", &["serve", "8080"])]),
        &installer_log,
    )
    .await;
    let target_addr = format!("{}:8080", pod_ip(&target));
    let image_ref = image.to_string();
    let validator = Validator::image(&image_ref);
    let (mesh, _) = run_pod(&client, &node, mesh_pod("mesh", &node, &target_addr, validator), &installer_log).await;
    let apply_to_mesh_ready = applied.elapsed();
    steps.done("mesh pod Ready");
    node_pods::assert_validator_passed(&mesh);
    assert_redirected(&client, std::slice::from_ref(&mesh), &target_addr).await;
    let (_, _) = run_pod(
        &client,
        &node,
        plain_pod("plain", &node, vec![container("app", &["dial", &target_addr])]),
        &installer_log,
    )
    .await;
    let line = node_pods::log_line(&client, "default", "plain", "app", &["->"], Duration::from_secs(20)).await.unwrap();
    assert_eq!(line, format!("dial {target_addr} -> serve port=8080"), "the plain pod is untouched");
    steps.done("plain pod Ready, untouched");

    // The plugin's lines in the DaemonSet pod's log, as `kubectl logs` shows them.
    let logs = |needles: &'static [&'static str]| {
        let (client, pod) = (client.clone(), cni_pod.clone());
        async move {
            node_pods::log_line(&client, CNI_NAMESPACE, &pod, "install-cni", needles, Duration::from_secs(20))
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        }
    };
    eprintln!("kubectl logs: {}", logs(&["default/mesh", "redirect programmed"]).await);
    eprintln!("kubectl logs: {}", logs(&["default/plain", "pass through"]).await);
    eprintln!("node memory with 3 pods and the CNI: {} MiB", node.memory_mib());

    // A rolling update of the DaemonSet while mesh pods are being created.
    let burst = deployment("burst", mesh_pod("burst", &node, &target_addr, validator), 0);
    let burst: Deployment = serde_json::from_value(burst).unwrap();
    Api::<Deployment>::namespaced(client.clone(), "default").create(&PostParams::default(), &burst).await.unwrap();
    let upgraded = node.render_chart(Path::new(BINARY), &values, &["cni.podAnnotations.rollout=1"]).unwrap();
    // The same objects: the release is what was applied last.
    let release = Release::apply(&client, &upgraded).await.unwrap_or_else(|e| panic!("{e}"));
    // One more mesh pod each second while the old CNI pod stops and the new one starts.
    for replicas in 1..=BURST {
        scale(&client, "burst", replicas).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    rolled_out(&client, Duration::from_secs(120)).await;
    let new_cni = cni_pod_ready(&client, &node.name, Duration::from_secs(10)).await.unwrap();
    assert_ne!(new_cni.metadata.name.as_ref(), Some(&cni_pod), "the rolling update replaced the CNI pod");
    let pods = deployment_ready(&client, "burst", BURST as usize, Duration::from_secs(240)).await;
    assert_redirected(&client, &pods, &target_addr).await;
    let repaired = repair_events(&client).await;
    eprintln!("rollout: {BURST} mesh pods Ready and redirected ({repaired} repaired by the controller on the way)");
    steps.done("rolling update while mesh pods are created");

    // A primary CNI that rewrites its own file (without our entry) each time its agent
    // restarts, as Calico's and Cilium's do: restarted every second while mesh pods
    // start. Each ADD whose sandbox the runtime set up from a file without our entry
    // shows as a sandbox our plugin never saw.
    let rewritten = deployment("rewritten", mesh_pod("rewritten", &node, &target_addr, validator), 0);
    let rewritten: Deployment = serde_json::from_value(rewritten).unwrap();
    Api::<Deployment>::namespaced(client.clone(), "default").create(&PostParams::default(), &rewritten).await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (file, text, stop) = (node.conflist.clone(), primary.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut restarts = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // In place, as the agents write it (the runtime reloads on a write).
                std::fs::write(&file, &text).expect("the primary rewrites its file");
                restarts += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            restarts
        })
    };
    for replicas in 1..=BURST {
        scale(&client, "rewritten", replicas).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let restarts = writer.join().unwrap();
    let pods = deployment_ready(&client, "rewritten", BURST as usize, Duration::from_secs(240)).await;
    assert_redirected(&client, &pods, &target_addr).await;
    let sandboxes = sandbox_ids(&node.log("containerd"), "rewritten-");
    assert!(sandboxes.len() >= BURST as usize, "a sandbox per pod in containerd's log: {sandboxes:?}");
    let seen = node_pods::container_logs(&node, "install-cni");
    let without_us: Vec<&String> = sandboxes.iter().filter(|id| !seen.contains(&format!("container={id}"))).collect();
    let chained = std::fs::read_to_string(&node.conflist).unwrap();
    assert_eq!(plugin_types(&chained).last().map(String::as_str), Some("kong-mesh-cni"), "our entry back:\n{chained}");
    eprintln!(
        "primary rewritten {restarts} times while {BURST} mesh pods started: {} sandboxes, {} ADDs without our entry \
         ({without_us:?}), {} repairs by the controller so far; every pod redirected",
        sandboxes.len(),
        without_us.len(),
        repair_events(&client).await - repaired,
    );
    steps.done("primary rewriting its file while mesh pods start");

    // The API server away for 30 s; meanwhile two mesh pods get a new sandbox (ADD).
    let ready_before = ready_since(&nodes.get(&node.name).await.unwrap());
    let kubelet_at = node.log("kubelet").len();
    let disrupted: Vec<(String, Vec<i32>, Option<String>)> = pods
        .iter()
        .take(2)
        .map(|p| {
            let uid = p.metadata.uid.clone().unwrap();
            let pids = sandbox_pids(&node, &uid);
            assert_eq!(pids.len(), 1, "one sandbox for {uid}: {pids:?}");
            (uid, pids, app_container(p))
        })
        .collect();
    node.stop("kube-apiserver").unwrap();
    let down = Instant::now();
    for (_, pids, _) in &disrupted {
        // SAFETY: kill has no memory-safety preconditions; the pid is a pod's pause.
        unsafe { libc::kill(pids[0], libc::SIGKILL) };
    }
    for (uid, old, _) in &disrupted {
        while sandbox_pids(&node, uid).iter().all(|p| old.contains(p)) {
            assert!(down.elapsed() < OUTAGE, "the kubelet made no new sandbox for pod {uid} while the API was away");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eprintln!("API away: new sandboxes (their ADD ran) {:.1?} after the stop", down.elapsed());
    tokio::time::sleep(OUTAGE.saturating_sub(down.elapsed())).await;
    node.start("kube-apiserver").unwrap();
    let start = Instant::now();
    while nodes.get(&node.name).await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(90), "the API server did not come back");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("API back {:.1?} after its start", start.elapsed());
    // The statuses read now may still be those from before the outage: wait until each
    // disrupted pod is gone (repaired by replacement) or runs new containers in its new
    // sandbox, then until all are Ready.
    let all: Api<Pod> = Api::namespaced(client.clone(), "default");
    for (uid, _, app) in &disrupted {
        let start = Instant::now();
        loop {
            let list = all.list(&ListParams::default().labels("app=burst")).await.unwrap().items;
            match list.iter().find(|p| p.metadata.uid.as_ref() == Some(uid)) {
                None => break,
                Some(p) if pod_ready(p) && app_container(p).is_some() && app_container(p) != *app => break,
                Some(_) => {}
            }
            assert!(
                start.elapsed() < Duration::from_secs(240),
                "disrupted pod {uid} neither replaced nor running again"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let pods = deployment_ready(&client, "burst", BURST as usize, Duration::from_secs(240)).await;
    assert_redirected(&client, &pods, &target_addr).await;
    let n = nodes.get(&node.name).await.unwrap();
    assert!(node_ready(&n), "node NotReady after the outage: {:#?}", n.status.and_then(|s| s.conditions));
    assert_eq!(ready_since(&n), ready_before, "the node's Ready condition never changed");
    let kubelet_since = &node.log("kubelet")[kubelet_at..];
    assert!(
        !kubelet_since.contains("network not ready") && !kubelet_since.contains("NetworkPluginNotReady"),
        "the runtime's network went not ready:\n{}",
        node_pods::tail(kubelet_since, 30)
    );
    let repaired_after = repair_events(&client).await - repaired;
    eprintln!("outage: {BURST} mesh pods Ready and redirected ({repaired_after} repaired by the controller)");
    steps.done("API server away 30 s, pods redirected after");
    eprintln!("node memory with {} pods: {} MiB", BURST + 3, node.memory_mib());

    // Uninstall: every object of the release deleted.
    uninstall(&node, release, &primary).await.unwrap_or_else(|e| panic!("{e}"));
    steps.done("uninstall -> primary conflist restored");

    node.down_leaving_the_host_as_it_was();
    steps.done("teardown");

    eprintln!("--- figures");
    eprintln!("image build + import     {:.1?}", installed_times.0);
    eprintln!("apply -> CNI pod Ready   {:.1?}", installed_times.1);
    eprintln!("apply -> node untainted  {:.1?}", installed_times.2);
    eprintln!("apply -> mesh pod Ready  {apply_to_mesh_ready:.1?}");
    for (what, took) in &steps.done {
        eprintln!("{what:<48} {took:.1?}");
    }
    eprintln!("{:<48} {:.1?}", format!("whole scenario ({network:?})"), started.elapsed());
}

/// The sandbox IDs containerd returned for pods named `prefix...` (from its log).
fn sandbox_ids(containerd_log: &str, prefix: &str) -> Vec<String> {
    let name = format!("RunPodSandbox for name:\\\"{prefix}");
    containerd_log
        .lines()
        .filter(|l| l.contains(&name))
        .filter_map(|l| l.split("returns sandbox id \\\"").nth(1))
        .filter_map(|rest| rest.split('\\').next())
        .map(str::to_owned)
        .collect()
}

/// The ID of the pod's running `app` container.
fn app_container(pod: &Pod) -> Option<String> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let app = statuses.iter().find(|s| s.name == "app")?;
    app.state.as_ref()?.running.as_ref()?;
    app.container_id.clone()
}

/// Events the repair controller recorded (reason RedirectMissing) in `default`.
async fn repair_events(client: &Client) -> usize {
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    events
        .list(&ListParams::default())
        .await
        .map(|l| l.items.iter().filter(|e| e.reason.as_deref() == Some("RedirectMissing")).count())
        .unwrap_or(0)
}
