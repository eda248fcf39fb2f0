//! Operating the CNI on a real node (testkit::node: kubelet, containerd, runc) without
//! restarting anything: the chart's ConfigMap key `logLevel` edited while pods run; the
//! next pod's ADD logs at debug in `kubectl logs` of the DaemonSet pod; no pod
//! restarted; `kong-mesh-cni status` run in the DaemonSet pod shows the node ready, and
//! the installer's `/metrics` counts the pods' ADDs. Prints what each part took: the
//! kubelet's ConfigMap volume sync dominates (the node's `syncFrequency` is 5 s; a
//! kubelet's default is 1 min).

mod installer_host;

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use testkit::node_chart::{CNI_NAMESPACE, Installed, install, uninstall};
use testkit::node_pods::{self, container, plain_pod};
use testkit::{Node, NodeOptions};

const BINARY: &str = env!("CARGO_BIN_EXE_kong-mesh-cni");
const POD_READY: Duration = Duration::from_secs(90);
/// The kubelet's sync plus its ConfigMap cache, on a loaded machine.
const APPLIED: Duration = Duration::from_secs(90);

fn restarts(pod: &Pod) -> i32 {
    let statuses = pod.status.as_ref().and_then(|s| s.container_statuses.clone()).unwrap_or_default();
    statuses.iter().map(|c| c.restart_count).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_level_changes_through_the_configmap_with_no_pod_restarted() {
    if testkit::skip_privileged("the node ops test") {
        return;
    }
    let node = Node::up(NodeOptions::default()).await.unwrap_or_else(|e| panic!("bringing the node up: {e}"));
    let client = node.client().await.unwrap();
    let primary = std::fs::read_to_string(&node.conflist).unwrap();
    // A health port no other test holds (the DaemonSet's pods use the host's network).
    let port = installer_host::free_port();
    let health = format!("cni.healthPort={port}");
    let Installed { release, cni_pod, .. } =
        install(&node, &client, Path::new(BINARY), &[&health], Duration::from_secs(120))
            .await
            .unwrap_or_else(|e| panic!("installing from the chart: {e}"));
    let cni_name = cni_pod.metadata.name.clone().unwrap();
    let installer_log = || node_pods::cni_logs(&node);
    let (running, _) = node_pods::run_pod(
        &client,
        &node,
        plain_pod("running", &node, vec![container("serve", &["serve", "8080"])]),
        POD_READY,
        &installer_log,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // `kubectl edit configmap kong-mesh-cni-config`: logLevel debug.
    let configs: Api<ConfigMap> = Api::namespaced(client.clone(), CNI_NAMESPACE);
    let edited = Instant::now();
    configs
        .patch("kong-mesh-cni-config", &PatchParams::default(), &Patch::Merge(json!({"data": {"logLevel": "debug"}})))
        .await
        .unwrap();
    let line = node_pods::log_line(
        &client,
        CNI_NAMESPACE,
        &cni_name,
        "install-cni",
        &["log level changed", "to=debug"],
        APPLIED,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let to_applied = edited.elapsed();
    eprintln!("kubectl logs: {line}");

    // The next pod's ADD, at debug, in the DaemonSet pod's log.
    let created = Instant::now();
    node_pods::run_pod(
        &client,
        &node,
        plain_pod("after", &node, vec![container("serve", &["serve", "8080"])]),
        POD_READY,
        &installer_log,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let line = node_pods::log_line(
        &client,
        CNI_NAMESPACE,
        &cni_name,
        "install-cni",
        &["[plugin", "DEBUG", "cmd=ADD", "pod=default/after"],
        Duration::from_secs(20),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let to_plugin_debug = edited.elapsed();
    eprintln!("kubectl logs: {line}");

    // `kubectl exec ds/kong-mesh-cni -- kong-mesh-cni status`, through the node's
    // containerd (what the kubelet's exec does): the node at a glance, from inside.
    let cni_now = Api::<Pod>::namespaced(client.clone(), CNI_NAMESPACE).get(&cni_name).await.unwrap();
    let id =
        cni_now.status.as_ref().and_then(|s| s.container_statuses.as_ref()).and_then(|c| c[0].container_id.clone());
    let id = id.unwrap().trim_start_matches("containerd://").to_owned();
    let wants = [
        "node              READY\n",
        "(plugin 3 of 3: bridge -> portmap -> kong-mesh-cni)\n",
        "(current)\n",
        // The agent's watch may be re-listing for a moment: then status says so, and we ask again.
        "node agent        synced, ",
        " pods cached\n",
        "installer         ready\n",
        "log level         debug\n",
        "exit=0\n",
    ];
    let exec = Instant::now();
    let mut screen = String::new();
    for attempt in 0..10 {
        let exec_id = format!("status-{attempt}");
        let command =
            ["tasks", "exec", "--exec-id", &exec_id, &id, "/bin/sh", "-c", "kong-mesh-cni status 2>&1; echo exit=$?"];
        screen = node.ctr(&command).unwrap_or_else(|e| panic!("kong-mesh-cni status in the CNI pod: {e}"));
        if wants.iter().all(|w| screen.contains(w)) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!("kong-mesh-cni status ({:.1?} to a ready screen):\n{screen}", exec.elapsed());
    for want in wants {
        assert!(screen.contains(want), "{want:?} in:\n{screen}");
    }

    // The plugin's calls for the two pods, on the installer's /metrics.
    let (code, metrics) = installer_host::http_get(port, "/metrics").expect("the installer's /metrics");
    assert_eq!(code, 200);
    let count = |series: &str| -> u64 {
        metrics.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0)
    };
    let plain_adds = count(
        r#"kong_mesh_cni_installer_plugin_requests_total{command="ADD",outcome="passed-through",reason="no-sidecar",code="",backend=""}"#,
    );
    assert!(plain_adds >= 2, "the two plain pods' ADDs (and maybe the controller's):\n{metrics}");
    assert!(count(r#"kong_mesh_cni_installer_plugin_pod_lookups_total{command="ADD",path="agent"}"#) >= 2, "{metrics}");
    assert!(!metrics.contains(r#"outcome="failed""#), "no call failed:\n{metrics}");
    assert!(count(r#"kong_mesh_cni_installer_plugin_request_duration_seconds_count{command="ADD"}"#) >= 2, "{metrics}");
    assert!(metrics.contains("kong_mesh_cni_installer_agent_cached_pods "), "{metrics}");

    // Nothing restarted: the CNI pod and the running pod are the same, with no restarts.
    let pods: Api<Pod> = Api::namespaced(client.clone(), CNI_NAMESPACE);
    let cni_now = pods.get(&cni_name).await.unwrap();
    assert_eq!(cni_now.metadata.uid, cni_pod.metadata.uid, "the CNI pod was not replaced");
    assert_eq!(restarts(&cni_now), restarts(&cni_pod), "the installer was not restarted");
    let default: Api<Pod> = Api::namespaced(client.clone(), "default");
    let running_now = default.get("running").await.unwrap();
    assert_eq!(running_now.metadata.uid, running.metadata.uid);
    assert_eq!(restarts(&running_now), restarts(&running));

    uninstall(&node, release, &primary).await.unwrap_or_else(|e| panic!("{e}"));
    node.down_leaving_the_host_as_it_was();
    eprintln!("--- figures");
    eprintln!("configmap edit -> installer applied the level   {to_applied:.1?}");
    eprintln!(
        "configmap edit -> a plugin ADD's debug line      {to_plugin_debug:.1?} (pod created {:.1?} after the edit)",
        created - edited
    );
}
