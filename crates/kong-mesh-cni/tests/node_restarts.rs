//! Restarts while pods start, on one real node (testkit::node) with our chart installed:
//! three scenarios one after the other, each while mesh and plain pods are being
//! created: containerd stopped for 3 s while an ADD of ours runs, the same with the
//! kubelet, and our DaemonSet pod's installer killed with SIGKILL whenever it runs, at
//! once when an ADD of ours is in flight, else every 3 s, for 15 s. Each
//! time: every pod of the scenario is Running within a bound (the time printed), none
//! was deleted or replaced (a failed ADD is retried by the kubelet until it succeeds),
//! each mesh pod's validator passed, its app's connection lands on its sidecar with its
//! original destination, and no connection of its app ever reached the target
//! unredirected (not one `-> serve` line in any of its logs). The kubelet's failed
//! sandbox creations (`FailedCreatePodSandBox` events) are counted and printed. While
//! our DaemonSet pod is not Ready (its readiness is an exec that fails while containerd
//! is down; a killed installer waits out the kubelet's back-off) our controller taints
//! the node, so pods created meanwhile are scheduled only once it is Ready again: that
//! wait is most of the times printed.
//!
//! First, on the same node, in-place repair (see [`in_place_repair`]): the API server
//! stopped during a mesh pod's ADD, the pod let through with a pending record, the
//! redirect programmed into its running sandbox once the API server answers again.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::Value;
use testkit::node_chart::{cni_pod_ready, install, plugin_types, uninstall};
use testkit::node_pods::{self, Validator, container, mesh_pod, plain_pod, pod_ip, pod_ready, validation_exit};
use testkit::{Node, NodeOptions};

const BINARY: &str = env!("CARGO_BIN_EXE_kong-mesh-cni");
const POD_READY: Duration = Duration::from_secs(90);
/// Mesh and plain pods created in each scenario (each kind).
const PODS_EACH: usize = 2;
/// Between two pod creations.
const CREATE_EVERY: Duration = Duration::from_millis(700);
/// How long containerd or the kubelet stays stopped.
const STOPPED: Duration = Duration::from_secs(3);
/// Our installer killed this often, for this long.
const KILL_EVERY: Duration = Duration::from_secs(3);
const KILLING: Duration = Duration::from_secs(15);
/// A limit, not a measurement: every pod of a scenario Running after its first creation.
const RUNNING_WITHIN: Duration = Duration::from_secs(120);
/// How long the API server stays stopped in the in-place repair scenario.
const API_AWAY: Duration = Duration::from_secs(10);
/// A limit, not a measurement: the redirect in place after the API server answers again.
const REPAIRED_WITHIN: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
enum Scenario {
    ContainerdRestarted,
    KubeletRestarted,
    InstallerKilled,
}

impl Scenario {
    fn prefix(self) -> &'static str {
        match self {
            Scenario::ContainerdRestarted => "containerd",
            Scenario::KubeletRestarted => "kubelet",
            Scenario::InstallerKilled => "killed",
        }
    }
}

/// The scenario's pods, mesh and plain alternating.
fn scenario_pods(scenario: Scenario, node: &Node, target: &str, image: &str) -> Vec<Value> {
    (0..PODS_EACH)
        .flat_map(|i| {
            let mesh = mesh_pod(&format!("{}-mesh-{i}", scenario.prefix()), node, target, Validator::image(image));
            let plain =
                plain_pod(&format!("{}-plain-{i}", scenario.prefix()), node, vec![container("app", &["dial", target])]);
            [mesh, plain]
        })
        .collect()
}

/// Creates `pods` in `default`, [`CREATE_EVERY`] apart.
async fn create(client: &Client, pods: &[Value]) {
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    for pod in pods {
        let pod: Pod = serde_json::from_value(pod.clone()).unwrap();
        api.create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("creating {:?}: {e}", pod.metadata.name));
        tokio::time::sleep(CREATE_EVERY).await;
    }
}

/// Waits (up to `within`) until our plugin runs on the node, an ADD in flight (the
/// pods being created are the only ones starting); whether it saw one.
async fn add_in_flight(node: &Node, plugin: &str, within: Duration) -> bool {
    // Blocking (fanotify and poll): off this task, which creates the pods meanwhile.
    let binary = node.cni_bin_dir.join(plugin);
    tokio::task::spawn_blocking(move || node_pods::plugin_starts(&binary, within))
        .await
        .expect("the watch for our plugin's exec")
        .unwrap_or_else(|e| panic!("watching for our plugin's exec: {e}"))
}

/// Stops `component` while an ADD of ours is in flight, for [`STOPPED`], then starts it
/// again; whether an ADD was in flight when it stopped.
async fn restart(node: &mut Node, component: &str, plugin: &str) -> bool {
    let caught = add_in_flight(node, plugin, Duration::from_secs(10)).await;
    node.stop(component).unwrap_or_else(|e| panic!("stopping {component}: {e}"));
    tokio::time::sleep(STOPPED).await;
    node.start(component).unwrap_or_else(|e| panic!("starting {component}: {e}"));
    caught
}

/// SIGKILLs our installer (the DaemonSet pod's container) whenever it runs, as soon as
/// an ADD of ours is in flight or [`KILL_EVERY`] after the last try, for [`KILLING`];
/// returns how many times it did, and how many of them during an ADD.
async fn kill_installer(node: &Node, plugin: &str) -> (usize, usize) {
    let start = Instant::now();
    let (mut kills, mut during_add) = (0, 0);
    while start.elapsed() < KILLING {
        let add = add_in_flight(node, plugin, KILL_EVERY).await;
        for pid in node_pods::container_pids(node, "/install-cni") {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid is our installer's.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            kills += 1;
            during_add += usize::from(add);
        }
        // Past this ADD.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    (kills, during_add)
}

/// The pods of `default` whose names start with `prefix`: name, UID, Ready.
async fn seen(client: &Client, prefix: &str) -> Vec<(String, String, bool)> {
    let list = Api::<Pod>::namespaced(client.clone(), "default").list(&ListParams::default()).await.unwrap();
    let mut out: Vec<(String, String, bool)> = list
        .items
        .iter()
        .filter_map(|p| {
            let name = p.metadata.name.clone()?;
            name.starts_with(prefix).then(|| (name, p.metadata.uid.clone().unwrap_or_default(), pod_ready(p)))
        })
        .collect();
    out.sort();
    out
}

/// The kubelet's failed sandbox creations (failed ADDs among them) for pods named
/// `prefix*`: the sum of the events' counts, and their distinct messages.
async fn failed_sandboxes(client: &Client, prefix: &str) -> (i32, Vec<String>) {
    let events = Api::<Event>::namespaced(client.clone(), "default").list(&ListParams::default()).await.unwrap();
    let mut messages = Vec::new();
    let mut count = 0;
    for e in events.items {
        let ours = e.involved_object.name.as_deref().is_some_and(|n| n.starts_with(prefix));
        if ours && e.reason.as_deref() == Some("FailedCreatePodSandBox") {
            count += e.count.unwrap_or(1);
            let message = e.message.unwrap_or_default();
            if !messages.contains(&message) {
                messages.push(message);
            }
        }
    }
    (count, messages)
}

/// Every line the app containers of pods named `prefix*` wrote, in every instance.
fn app_logs(node: &Node, prefix: &str) -> String {
    let mut out = String::new();
    for pod in std::fs::read_dir(&node.pod_logs_dir).into_iter().flatten().flatten() {
        if pod.file_name().to_string_lossy().starts_with(&format!("default_{prefix}")) {
            for file in std::fs::read_dir(pod.path().join("app")).into_iter().flatten().flatten() {
                out += &std::fs::read_to_string(file.path()).unwrap_or_default();
            }
        }
    }
    out
}

/// The IDs of the pod's containers, init containers included.
fn container_ids(pod: &Pod) -> Vec<String> {
    let status = pod.status.clone().unwrap_or_default();
    let all =
        status.init_container_statuses.into_iter().flatten().chain(status.container_statuses.into_iter().flatten());
    all.filter_map(|c| c.container_id).collect()
}

/// How many times each mesh pod's validator ran again (each a sandbox it found without
/// the redirect, or a failed start), by pod name.
fn validator_restarts(pods: &[Pod]) -> Vec<(String, i32)> {
    pods.iter()
        .map(|p| {
            let statuses = p.status.as_ref().and_then(|s| s.init_container_statuses.clone()).unwrap_or_default();
            let restarts = statuses.iter().find(|c| c.name == "kuma-validation").map_or(0, |c| c.restart_count);
            (p.metadata.name.clone().unwrap_or_default(), restarts)
        })
        .collect()
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let entries = std::fs::read_dir(dir).into_iter().flatten().flatten();
    entries.flat_map(|e| if e.path().is_dir() { walk(&e.path()) } else { vec![e.path()] }).collect()
}

/// Whether the sandbox of `pid` has our redirect (either backend's chains).
fn redirected(pid: i32) -> bool {
    let (nft, legacy) = node_pods::rules_in(pid);
    nft.contains("KUMA_MESH_OUTBOUND") || legacy.contains("KUMA_MESH_OUTBOUND")
}

/// In-place repair on the node: with the API server stopped and our installer (the node
/// agent) killed, a running mesh pod's sandbox dies and the kubelet makes a new one; our
/// plugin cannot look the pod up (the agent's socket is gone, the API server does not
/// answer), lets the sandbox start without the redirect and leaves a pending record. The
/// API server started again, the agent programs the redirect into that sandbox (timed
/// from the API server's first answer), removes the record, and the pod runs again,
/// redirected, not deleted (the repair controller leaves it to the agent).
async fn in_place_repair(node: &mut Node, client: &Client, target: &str, image: &str, run_dir: &Path) {
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let none = String::new;
    let pod = mesh_pod("inplace-mesh", node, target, Validator::image(image));
    let (pod, _) = node_pods::run_pod(client, node, pod, POD_READY, &none).await.unwrap_or_else(|e| panic!("{e}"));
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let old = node_pods::sandbox_pids(node, &uid);
    assert_eq!(old.len(), 1, "one sandbox for {uid}: {old:?}");
    let pending = run_dir.join("pending");
    let records = || std::fs::read_dir(&pending).map(|d| d.count()).unwrap_or(0);
    assert_eq!(records(), 0, "no pending record before");

    node.stop("kube-apiserver").unwrap_or_else(|e| panic!("stopping the API server: {e}"));
    let down = Instant::now();
    let installers = node_pods::container_pids(node, "/install-cni");
    assert!(!installers.is_empty(), "our installer runs");
    for pid in installers.into_iter().chain(old.iter().copied()) {
        // SAFETY: kill(2) has no memory-safety preconditions; the pids are our installer's
        // and the pod's sandbox (pause).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let sandbox = loop {
        let now: Vec<i32> = node_pods::sandbox_pids(node, &uid).into_iter().filter(|p| !old.contains(p)).collect();
        if let (Some(&pid), true) = (now.first(), records() > 0) {
            break pid;
        }
        assert!(
            down.elapsed() < Duration::from_secs(60),
            "no new sandbox let through with a pending record within 60 s (sandboxes {now:?}, records {})\n{}",
            records(),
            node_pods::tail(&node.log("kubelet"), 20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let let_through = down.elapsed();
    assert!(!redirected(sandbox), "the new sandbox started without the redirect");
    tokio::time::sleep(API_AWAY.saturating_sub(down.elapsed())).await;

    node.start("kube-apiserver").unwrap_or_else(|e| panic!("starting the API server: {e}"));
    let started = Instant::now();
    while api.get("inplace-mesh").await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(60), "the API server did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answered = Instant::now();
    let this = ListParams::default().fields("metadata.name=inplace-mesh");
    loop {
        // Gone: the pod deleted (the repair controller's way) or its sandbox replaced.
        let gone = !Path::new(&format!("/proc/{sandbox}/ns/net")).exists();
        if !gone && redirected(sandbox) {
            break;
        }
        if gone || answered.elapsed() > REPAIRED_WITHIN {
            panic!(
                "the sandbox not repaired in place {:.1?} after the API server answered ({})\n{}{}",
                answered.elapsed(),
                if gone { "it is gone" } else { "still without the redirect" },
                node_pods::why_not_ready(client, node, "default", &this).await,
                node_pods::cni_logs(node)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let repaired = answered.elapsed();
    while records() > 0 {
        assert!(answered.elapsed() < REPAIRED_WITHIN, "the pending record removed after the repair");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Running again: Ready with containers started in the new sandbox (until the kubelet
    // reports them, the status is the one from before the outage).
    let before = container_ids(&pod);
    let running = loop {
        let now = api.get("inplace-mesh").await.unwrap();
        assert_eq!(now.metadata.uid.as_deref(), Some(uid.as_str()), "the pod not deleted or replaced");
        let ids = container_ids(&now);
        if pod_ready(&now) && !ids.is_empty() && ids.iter().all(|id| !before.contains(id)) {
            assert_eq!(validation_exit(&now), Some(0), "the validator passed in the repaired sandbox");
            break now;
        }
        assert!(answered.elapsed() < RUNNING_WITHIN, "the repaired pod Running again within {RUNNING_WITHIN:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(node_pods::sandbox_pids(node, &uid), vec![sandbox], "the same sandbox, repaired in place");
    node_pods::assert_redirected(client, std::slice::from_ref(&running), target).await;
    let log = app_logs(node, "inplace-mesh");
    assert_eq!(log.lines().filter(|l| l.contains("-> serve")).count(), 0, "the app never unredirected:\n{log}");
    eprintln!(
        "InPlaceRepair: sandbox let through with a pending record {let_through:.1?} after the API server stopped; redirect in place {repaired:.1?} after it answered again (it answered {:.1?} after its start); pod Running {:.1?} after that",
        answered.duration_since(started),
        answered.elapsed()
    );
    cni_pod_ready(client, &node.name, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("InPlaceRepair: our DaemonSet pod Ready again: {e}"));
    api.delete("inplace-mesh", &DeleteParams::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_while_pods_start_leave_no_mesh_pod_unredirected_and_every_pod_running() {
    if testkit::skip_privileged("the node restarts test") {
        return;
    }
    let mut node = Node::up(NodeOptions::default()).await.unwrap_or_else(|e| panic!("bringing the node up: {e}"));
    let client = node.client().await.unwrap();
    let primary = std::fs::read_to_string(&node.conflist).unwrap();
    let installed = install(&node, &client, Path::new(BINARY), &[], Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("installing from the chart: {e}"));
    let none = String::new;
    let serve = plain_pod("target", &node, vec![container("serve", &["serve", "8080"])]);
    let (target, _) =
        node_pods::run_pod(&client, &node, serve, POD_READY, &none).await.unwrap_or_else(|e| panic!("{e}"));
    let target_addr = format!("{}:8080", pod_ip(&target));
    let image = installed.image.to_string();
    // Our entry is the last of the chain: its type names the binary the runtime runs.
    let types = plugin_types(&std::fs::read_to_string(&node.conflist).unwrap());
    let plugin = types.last().cloned().unwrap_or_default();
    assert!(["kuma-cni", "kong-mesh-cni"].contains(&plugin.as_str()), "our entry last in the chain: {types:?}");
    let run_dir = installed.values["cni"]["runDir"].as_str().map(PathBuf::from).expect("the node's run dir");

    in_place_repair(&mut node, &client, &target_addr, &image, &run_dir).await;

    for scenario in [Scenario::ContainerdRestarted, Scenario::KubeletRestarted, Scenario::InstallerKilled] {
        let prefix = format!("{}-", scenario.prefix());
        let pods = scenario_pods(scenario, &node, &target_addr, &image);
        let start = Instant::now();
        let what = match scenario {
            Scenario::ContainerdRestarted | Scenario::KubeletRestarted => {
                let component = if let Scenario::KubeletRestarted = scenario { "kubelet" } else { "containerd" };
                let (_, caught) = tokio::join!(create(&client, &pods), restart(&mut node, component, &plugin));
                assert!(caught, "{scenario:?}: {component} stopped during an ADD of ours");
                format!("{component} stopped during an ADD")
            }
            Scenario::InstallerKilled => {
                let ((), (kills, during_add)) = tokio::join!(create(&client, &pods), kill_installer(&node, &plugin));
                assert!(during_add > 0, "{scenario:?}: our installer killed during an ADD of ours");
                format!("installer killed {kills} times, {during_add} of them during an ADD")
            }
        };
        let uids = seen(&client, &prefix).await;
        let mut ready_at: Vec<(String, Duration)> = Vec::new();
        assert_eq!(uids.len(), pods.len(), "{scenario:?}: every pod created: {uids:?}");
        loop {
            let now = seen(&client, &prefix).await;
            let names: Vec<(&String, &String)> = now.iter().map(|(n, u, _)| (n, u)).collect();
            let expected: Vec<(&String, &String)> = uids.iter().map(|(n, u, _)| (n, u)).collect();
            assert_eq!(names, expected, "{scenario:?}: no pod deleted or replaced");
            for (name, _, ready) in &now {
                if *ready && !ready_at.iter().any(|(n, _)| n == name) {
                    ready_at.push((name.clone(), start.elapsed()));
                }
            }
            if now.iter().all(|(_, _, ready)| *ready) {
                break;
            }
            if start.elapsed() > RUNNING_WITHIN {
                let all = ListParams::default();
                panic!(
                    "{scenario:?}: not every pod Running within {RUNNING_WITHIN:?}\n{}{}",
                    node_pods::why_not_ready(&client, &node, "default", &all).await,
                    node_pods::cni_logs(&node)
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let running = start.elapsed();
        let api: Api<Pod> = Api::namespaced(client.clone(), "default");
        let mut mesh = Vec::new();
        for (name, _, _) in uids.iter().filter(|(n, _, _)| n.contains("-mesh-")) {
            let pod = api.get(name).await.unwrap();
            assert_eq!(validation_exit(&pod), Some(0), "{scenario:?}: {name}'s validator passed");
            mesh.push(pod);
        }
        node_pods::assert_redirected(&client, &mesh, &target_addr).await;
        let log = app_logs(&node, &format!("{prefix}mesh-"));
        let unredirected = log.lines().filter(|l| l.contains("-> serve")).count();
        assert_eq!(unredirected, 0, "{scenario:?}: a mesh app reached its target unredirected:\n{log}");
        let (failed, messages) = failed_sandboxes(&client, &prefix).await;
        eprintln!(
            "{scenario:?} ({what}): {} pods Running {running:.1?} after the first was created; failed sandbox creations: {failed}; validator reruns {:?}; app connections unredirected: 0 (of {} logged)",
            pods.len(),
            validator_restarts(&mesh),
            log.lines().filter(|l| l.contains("->")).count()
        );
        let ready_at: Vec<String> = ready_at.iter().map(|(n, t)| format!("{n} {t:.1?}")).collect();
        eprintln!("  Ready: {}", ready_at.join(", "));
        for m in messages {
            eprintln!("  {m}");
        }
        // The next scenario starts with our DaemonSet pod Ready and these pods gone.
        cni_pod_ready(&client, &node.name, Duration::from_secs(120))
            .await
            .unwrap_or_else(|e| panic!("{scenario:?}: our DaemonSet pod Ready again: {e}"));
        for (name, _, _) in &uids {
            api.delete(name, &DeleteParams::default()).await.unwrap();
        }
    }

    // Every pod but the target deleted: no record of ours outlives its sandbox, not even
    // one whose ADD containerd lost when it stopped mid-way (the kubelet's new sandbox
    // replaced it).
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let start = Instant::now();
    while api.list(&ListParams::default()).await.unwrap().items.len() > 1 {
        assert!(start.elapsed() < Duration::from_secs(60), "the scenarios' pods gone within 60 s");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let left: Vec<PathBuf> = ["applied", "pending"].iter().flat_map(|d| walk(&run_dir.join(d))).collect();
    assert!(left.is_empty(), "records of gone sandboxes left in the run dir: {left:?}");

    uninstall(&node, installed.release, &primary).await.unwrap_or_else(|e| panic!("{e}"));
    node.down_leaving_the_host_as_it_was();
}
