//! The chart's default mode on the real node: Kong Mesh behind Multus (OpenShift's
//! first environment), `chained: false`. Multus v4.2.2 (scripts/cnis-build.sh) is the
//! node's CNI and delegates every pod's `eth0` to the bridge network; our chart is
//! installed with its defaults, only the node's paths changed (Node::chart_values_multus).
//! Labelling a namespace makes our controller create the `kuma-cni` NAD there; a mesh
//! pod shaped as Kong Mesh injects it in CNI mode (with `k8s.v1.cni.cncf.io/networks:
//! kuma-cni`) is attached by Multus, which calls our plugin on `net1`. Asserted: the
//! validator passes, the app's connection lands on the sidecar with its original
//! destination, our plugin ran for `net1` (its record's name; network-status lists only
//! interfaces, and our plugin adds none), the plugin's lines are
//! in `kubectl logs` of our DaemonSet pod and say the node agent gave the pod, DEL
//! through Multus removes the redirect and leaves no record, a plain pod is untouched,
//! and a mesh pod in a namespace without the NAD fails with Multus's event naming it and
//! our controller's saying to label the namespace. Under thin Multus, with the API
//! server away while a mesh pod's sandbox is remade, no sandbox starts (Multus must read
//! the pod first: our plugin is not reached) and the pod is redirected once it is back
//! (thick Multus's recovery after the outage was flaky here: not run there).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Namespace, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use testkit::node_chart::{CNI_NAMESPACE, Installed, install_with};
use testkit::node_multus::{Multus, NETWORK, multus_mesh_pod, network_status, wait_for_nad};
use testkit::node_pods::{self, Validator, assert_redirected, container, plain_pod, pod_ip, pod_ready, sandbox_pids};
use testkit::{Node, NodeOptions, unique_suffix};

const BINARY: &str = env!("CARGO_BIN_EXE_kong-mesh-cni");
const POD_READY: Duration = Duration::from_secs(90);
const OUTAGE: Duration = Duration::from_secs(20);

/// Prints each step's duration as it ends.
struct Steps(Instant);

impl Steps {
    fn done(&mut self, what: &str) {
        eprintln!("step: {what}: {:.1?}", self.0.elapsed());
        self.0 = Instant::now();
    }
}

async fn run_pod(client: &Client, node: &Node, pod: Value) -> Pod {
    let more = || format!("{}--- multus\n{}", node_pods::cni_logs(node), node_pods::tail(&multus_log(node), 30));
    node_pods::run_pod(client, node, pod, POD_READY, &more).await.unwrap_or_else(|e| panic!("{e}")).0
}

/// Files under `dir` (none when it does not exist).
fn records(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.path().is_dir() {
            out.extend(records(&entry.path()));
        } else {
            out.push(entry.path());
        }
    }
    out
}

async fn wait_nad(client: &Client, node: &Node, namespace: &str) -> DynamicObject {
    wait_for_nad(client, namespace, Duration::from_secs(60)).await.unwrap_or_else(|e| {
        panic!(
            "{e}\n{}--- controller\n{}--- multus's errors\n{}",
            node_pods::tail(&node.log("kubelet"), 10),
            node_pods::tail(&node_pods::container_logs(node, "controller"), 20),
            multus_log(node).lines().filter(|l| l.contains("error")).take(10).collect::<Vec<_>>().join("\n")
        )
    })
}

async fn wait_gone(client: &Client, node: &Node, namespace: &str, name: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let start = Instant::now();
    while pods.get_opt(name).await.unwrap().is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{namespace}/{name} still there after 60 s\n--- kubelet\n{}\n--- multus\n{}\n{}",
            about(&node.log("kubelet"), name, 8),
            about(&multus_log(node), name, 8),
            node_pods::cni_logs(node)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The last `n` lines of `log` that mention `what`.
fn about(log: &str, what: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(what)).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The message of the first event about `namespace/pod` whose message contains `needle`.
async fn event_about(client: &Client, namespace: &str, pod: &str, needle: &str, timeout: Duration) -> Option<Event> {
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let params = ListParams::default().fields(&format!("involvedObject.name={pod}"));
    let start = Instant::now();
    loop {
        let list = events.list(&params).await.map(|l| l.items).unwrap_or_default();
        if let Some(e) = list.into_iter().find(|e| e.message.as_deref().is_some_and(|m| m.contains(needle))) {
            return Some(e);
        }
        if start.elapsed() > timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavour {
    /// `multus`, run by the runtime.
    Thin,
    /// `multus-shim`, handing every call to the multus-daemon pod.
    Thick,
}

/// One flavour after the other, each on a node of its own: two nodes at once would
/// share both cores and see each other's changes to the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_chart_defaults_work_behind_thin_and_thick_multus() {
    if testkit::skip_privileged("the Multus node test") {
        return;
    }
    for flavour in [Flavour::Thin, Flavour::Thick] {
        default_mode_behind(flavour).await;
    }
}

async fn default_mode_behind(flavour: Flavour) {
    let started = Instant::now();
    let mut steps = Steps(Instant::now());
    let mut node = Node::up(NodeOptions::default()).await.unwrap_or_else(|e| panic!("bringing the node up: {e}"));
    let (multus, multus_release) = match flavour {
        Flavour::Thin => node.install_multus_thin().await.map(|m| (m, None)),
        Flavour::Thick => node.install_multus_thick().await.map(|(m, r)| (m, Some(r))),
    }
    .unwrap_or_else(|e| panic!("installing {flavour:?} Multus: {e}"));
    let client = node.client().await.unwrap();
    let cluster_network = std::fs::read_to_string(&multus.cluster_network).unwrap();
    steps.done(&format!("node up, {flavour:?} Multus its CNI"));

    let values = |image: &_| node.chart_values_multus(&multus, image);
    let installed = install_with(&node, &client, Path::new(BINARY), &values, &[], Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("installing from the chart: {e}"));
    let Installed { release, image, cni_pod, .. } = installed;
    let cni_pod = cni_pod.metadata.name.clone().unwrap();
    steps.done("chart installed with its defaults, CNI pod Ready");
    assert_standalone_conf(&multus, &cluster_network);
    let installer_log = node_pods::container_logs(&node, "install-cni");
    assert!(
        installer_log.contains("wrote our own CNI configuration (not chained: Multus calls it)"),
        "the installer says what it did:\n{}",
        node_pods::tail(&installer_log, 15)
    );

    the_default_mode_works(&mut node, &client, &image.to_string(), &cni_pod, flavour).await;
    steps.done("the default mode's behaviours");

    release.uninstall(Duration::from_secs(90)).await.unwrap_or_else(|e| panic!("{e}"));
    let ours = multus.conf_dir.join(format!("{NETWORK}.conf"));
    // As node_chart's uninstall: the installer removes it on its way out, allowed 10 s.
    let gone = Instant::now();
    while ours.exists() && gone.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !ours.exists(),
        "the uninstall removed {}; the installer's last lines:\n{}",
        ours.display(),
        node_pods::tail(&node_pods::container_logs(&node, "install-cni"), 15)
    );
    assert_eq!(std::fs::read_to_string(&multus.cluster_network).unwrap(), cluster_network);
    if let Some(multus_release) = multus_release {
        multus_release.uninstall(Duration::from_secs(60)).await.unwrap_or_else(|e| panic!("{e}"));
    }
    steps.done("uninstall");
    node.down_leaving_the_host_as_it_was();
    steps.done("teardown");
    eprintln!("whole test ({flavour:?} Multus): {:.1?}", started.elapsed());
}

/// Multus's own log: thin's file, or the daemon pod's.
fn multus_log(node: &Node) -> String {
    node.log("multus") + &node_pods::container_logs(node, "kube-multus")
}

/// Our own file in Multus's conf dir, named as the NAD; the cluster network untouched.
fn assert_standalone_conf(multus: &Multus, cluster_network: &str) {
    let path = multus.conf_dir.join(format!("{NETWORK}.conf"));
    let conf: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!((conf["name"].as_str(), conf["type"].as_str()), (Some(NETWORK), Some("kong-mesh-cni")), "{conf}");
    assert_eq!(std::fs::read_to_string(&multus.cluster_network).unwrap(), cluster_network, "not chained into");
}

async fn the_default_mode_works(node: &mut Node, client: &Client, image: &str, cni_pod: &str, flavour: Flavour) {
    let mut steps = Steps(Instant::now());
    let validator = Validator::image(image);
    let run_dir = node.root.join("run/kong-mesh-cni");

    // A labelled namespace gets our NAD from the controller.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let label = json!({ "metadata": { "labels": { "kuma.io/sidecar-injection": "enabled" } } });
    namespaces.patch("default", &PatchParams::default(), &Patch::Merge(&label)).await.unwrap();
    let nad = wait_nad(client, node, "default").await;
    assert_eq!(nad.data["spec"]["config"], "", "the NAD takes the network's file from Multus's conf dir");
    steps.done("namespace labelled -> NAD");

    let target = run_pod(client, node, plain_pod("target", node, vec![container("serve", &["serve", "8080"])])).await;
    let target_addr = format!("{}:8080", pod_ip(&target));
    let status = network_status(&target);
    let cni_lines: Vec<String> =
        node.log("containerd").lines().filter(|l| l.to_lowercase().contains("cni")).map(str::to_owned).collect();
    assert_eq!(
        status.len(),
        1,
        "Multus attached the plain pod to the cluster network only: {status:?}\n{}\n{}",
        node_pods::tail(&multus_log(node), 30),
        cni_lines.join("\n")
    );
    assert_eq!(status[0]["default"], true, "{status:?}");

    let mesh = run_pod(client, node, multus_mesh_pod("mesh", node, &target_addr, validator)).await;
    node_pods::assert_validator_passed(&mesh);
    assert_redirected(client, std::slice::from_ref(&mesh), &target_addr).await;
    // Multus lists the interfaces an attachment's result names, and ours makes none
    // (an empty result, as Kuma's plugin returns standalone): network-status shows
    // eth0 only. That Multus called us on net1 shows in our record's name below.
    let status = network_status(&mesh);
    let interfaces: Vec<&str> = status.iter().filter_map(|s| s["interface"].as_str()).collect();
    assert_eq!(interfaces, ["eth0"], "{status:#?}");
    steps.done("mesh pod Ready, validator passed, redirected");

    // The plugin's lines, as `kubectl logs` of our DaemonSet pod shows them; the pod
    // came from the node agent (no request to the API server).
    let logs = |needles: &'static [&'static str]| async move {
        node_pods::log_line(client, CNI_NAMESPACE, cni_pod, "install-cni", needles, Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let programmed = logs(&["default/mesh", "redirect programmed"]).await;
    eprintln!("kubectl logs: {programmed}");
    assert!(programmed.contains("pod_from=\"node agent\""), "the node agent gave the pod: {programmed}");
    let ours: Vec<PathBuf> = records(&run_dir.join("applied"));
    assert_eq!(ours.len(), 1, "one applied record, the mesh pod's net1: {ours:?}");
    assert!(ours[0].to_string_lossy().contains("net1"), "{ours:?}");

    let _plain = run_pod(client, node, plain_pod("plain", node, vec![container("app", &["dial", &target_addr])])).await;
    let line = node_pods::log_line(client, "default", "plain", "app", &["->"], Duration::from_secs(20)).await.unwrap();
    assert_eq!(line, format!("dial {target_addr} -> serve port=8080"), "the plain pod is untouched");
    steps.done("plain pod untouched");

    // DEL through Multus: the redirect removed, no record left.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.delete("mesh", &DeleteParams::default()).await.unwrap();
    wait_gone(client, node, "default", "mesh").await;
    let removed = logs(&["default/mesh", "redirect removed"]).await;
    eprintln!("kubectl logs: {removed}");
    let left = [records(&run_dir.join("applied")), records(&run_dir.join("pending"))].concat();
    assert!(left.is_empty(), "records left after DEL: {left:?}");
    steps.done("DEL through Multus");

    // A namespace without the NAD: Multus cannot attach the mesh pod, and says why.
    let bare = format!("kmc-nonad-{}", unique_suffix());
    let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": bare } })).unwrap();
    namespaces.create(&PostParams::default(), &ns).await.unwrap();
    let mut orphan = multus_mesh_pod("orphan", node, &target_addr, validator);
    orphan["metadata"]["namespace"] = json!(bare);
    let orphan: Pod = serde_json::from_value(orphan).unwrap();
    // Admitted once the controller-manager made the namespace's service account.
    let start = Instant::now();
    while let Err(e) = Api::<Pod>::namespaced(client.clone(), &bare).create(&PostParams::default(), &orphan).await {
        assert!(start.elapsed() < Duration::from_secs(30), "creating the pod in {bare}: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let event = event_about(client, &bare, "orphan", NETWORK, Duration::from_secs(60)).await;
    // Multus's Event says what is missing; ours (the controller's) says what to do.
    let hint = event_about(client, &bare, "orphan", "kubectl label namespace", Duration::from_secs(30)).await;
    namespaces.delete(&bare, &DeleteParams::default()).await.unwrap();
    let event = event.unwrap_or_else(|| panic!("no event about the missing NAD; kubelet:\n{}", node.log("kubelet")));
    let message = event.message.clone().unwrap_or_default();
    eprintln!("event ({}): {message}", event.reason.clone().unwrap_or_default());
    assert!(message.contains("network-attachment-definition") && message.contains(&bare), "{message}");
    let hint = hint.unwrap_or_else(|| {
        panic!(
            "no hint to label {bare}; controller:\n{}",
            node_pods::tail(&node_pods::container_logs(node, "controller"), 20)
        )
    });
    eprintln!("event ({}): {}", hint.reason.clone().unwrap_or_default(), hint.message.clone().unwrap_or_default());
    assert_eq!(hint.reason.as_deref(), Some("NamespaceNotLabelled"));
    steps.done("mesh pod in a namespace without the NAD: Multus's event and our hint");

    for name in ["plain", "target"] {
        pods.delete(name, &DeleteParams::default()).await.unwrap();
    }
    for name in ["plain", "target"] {
        wait_gone(client, node, "default", name).await;
    }
    let left = [records(&run_dir.join("applied")), records(&run_dir.join("pending"))].concat();
    assert!(left.is_empty(), "records left after the pods' DEL: {left:?}");

    // Last (the kubelet is slow to see deletions for a minute after an outage): under
    // thin Multus, the API server away while a mesh pod's sandbox is remade. Multus must
    // read the pod before it calls any delegate, so the ADD fails (no sandbox runs
    // unredirected, our plugin is not reached) until the API server is back; then the
    // kubelet's retry attaches the pod, redirected. (Thick Multus's daemon did not
    // always recover from the outage here, leaving the pod undeletable: not run.)
    if flavour == Flavour::Thin {
        let server =
            run_pod(client, node, plain_pod("server", node, vec![container("serve", &["serve", "8080"])])).await;
        let server_addr = format!("{}:8080", pod_ip(&server));
        api_away_during_an_add(node, client, &pods, &server_addr, validator).await;
        steps.done("API server away during a mesh pod's ADD -> not started, then redirected");
    }
}

async fn api_away_during_an_add(
    node: &mut Node,
    client: &Client,
    pods: &Api<Pod>,
    target: &str,
    validator: Validator<'_>,
) {
    let again = run_pod(client, node, multus_mesh_pod("again", node, target, validator)).await;
    let uid = again.metadata.uid.clone().unwrap();
    let old = sandbox_pids(node, &uid);
    assert_eq!(old.len(), 1, "one sandbox for {uid}: {old:?}");
    node.stop("kube-apiserver").unwrap();
    // SAFETY: kill has no memory-safety preconditions; the pid is the pod's pause.
    unsafe { libc::kill(old[0], libc::SIGKILL) };
    tokio::time::sleep(OUTAGE).await;
    let during: Vec<i32> = sandbox_pids(node, &uid).into_iter().filter(|p| !old.contains(p)).collect();
    assert_eq!(during, Vec::<i32>::new(), "no new sandbox while Multus cannot read the pod");
    node.start("kube-apiserver").unwrap();
    let back = Instant::now();
    loop {
        let pod = pods.get_opt("again").await.ok().flatten();
        let renewed = sandbox_pids(node, &uid).iter().any(|p| !old.contains(p));
        if renewed && pod.as_ref().is_some_and(|p| pod_ready(p) && app_restarted(p)) {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(180), "pod again not running again 180 s after the API came back");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("API back: the pod running in a new sandbox {:.1?} later", back.elapsed());
    let again = pods.get("again").await.unwrap();
    assert_redirected(client, std::slice::from_ref(&again), target).await;
}

/// Whether the pod's app container restarted (a new sandbox runs new containers).
fn app_restarted(pod: &Pod) -> bool {
    let statuses = pod.status.as_ref().and_then(|s| s.container_statuses.as_ref());
    statuses
        .into_iter()
        .flatten()
        .any(|s| s.name == "app" && s.restart_count > 0 && s.state.as_ref().is_some_and(|st| st.running.is_some()))
}
