//! The taint controller against the real API server, with the chart's RBAC.

mod common;

use std::time::Duration;

use common::{Harness, Running, cni_pod, eventually, metric, tainted, taints, throughout};
use controller::{RepairAction, TAINT_KEY};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, NodeSpec, Pod, Taint};
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use testkit::{ApiServer, TestNamespace, unique_suffix};

const OURS: &str = "NodeReadiness:NoSchedule";
const NOT_READY: &str = "node.kubernetes.io/not-ready:NoSchedule";

async fn delete_pod(ns: &TestNamespace, name: &str) {
    let now = DeleteParams { grace_period_seconds: Some(0), ..Default::default() };
    ns.api::<Pod>().delete(name, &now).await.expect("deleting the CNI pod");
}

/// A node as a kubelet with `--register-with-taints NodeReadiness=:NoSchedule` creates it.
async fn register_tainted_node(admin: &kube::Client) -> String {
    let name = format!("kmc-registered-{}", unique_suffix());
    let node = Node {
        metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() },
        spec: Some(NodeSpec {
            taints: Some(vec![Taint { key: TAINT_KEY.into(), effect: "NoSchedule".into(), ..Default::default() }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    Api::<Node>::all(admin.clone()).create(&PostParams::default(), &node).await.expect("registering the node");
    name
}

async fn delete_node(admin: &kube::Client, name: &str) {
    Api::<Node>::all(admin.clone()).delete(name, &DeleteParams::default()).await.expect("deleting the node");
}

async fn copies_of_ours(admin: &kube::Client, node: &str) -> usize {
    taints(admin, node).await.iter().filter(|t| *t == OURS).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_is_tainted_until_its_cni_pod_is_ready() {
    if testkit::skip_heavy("taint controller") {
        return;
    }
    let server = ApiServer::shared();
    let (h, ctl) = Harness::with_controller(server, RepairAction::Off).await;
    let admin = &h.admin;

    let node = server.node("kmc-taint", &[]).await;
    eventually("the new node to be tainted", Duration::from_secs(5), || tainted(admin, node.name())).await;

    cni_pod(&h.ns, "cni", node.name(), false).await;
    throughout("the taint while the CNI pod is not ready", Duration::from_millis(500), || tainted(admin, node.name()))
        .await;

    h.ns.set_pod_running("cni", None).await;
    let took =
        eventually("the taint to go", Duration::from_secs(5), || async { !tainted(admin, node.name()).await }).await;
    eprintln!("taint removed {took:?} after the CNI pod became Ready");
    assert!(took <= Duration::from_secs(1), "taint removed only after {took:?}");

    delete_pod(&h.ns, "cni").await;
    eventually("the taint to come back", Duration::from_secs(5), || tainted(admin, node.name())).await;
    // The admission plugin's taint was there all along and is still there.
    assert!(taints(admin, node.name()).await.iter().any(|t| t == NOT_READY));

    let text = ctl.status.render();
    assert_eq!(metric(&text, "kong_mesh_cni_controller_taint_changes_total{change=\"add\"}"), 2);
    assert_eq!(metric(&text, "kong_mesh_cni_controller_taint_changes_total{change=\"remove\"}"), 1);
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_taints_and_concurrent_label_updates_survive() {
    if testkit::skip_heavy("taint controller") {
        return;
    }
    let server = ApiServer::shared();
    let (h, ctl) = Harness::with_controller(server, RepairAction::Off).await;
    let admin = &h.admin;
    let node = server.node("kmc-taint", &[]).await;
    eventually("the new node to be tainted", Duration::from_secs(5), || tainted(admin, node.name())).await;

    // Someone else's taint, after ours in the list.
    let nodes = Api::<Node>::all(admin.clone());
    let dedicated = json!([{"op": "add", "path": "/spec/taints/-", "value": {"key": "example.com/dedicated", "value": "db", "effect": "NoSchedule"}}]);
    let dedicated: json_patch::Patch = serde_json::from_value(dedicated).unwrap();
    nodes.patch(node.name(), &PatchParams::default(), &Patch::Json::<()>(dedicated)).await.expect("adding a taint");

    // A label writer keeps changing the node while the CNI pod comes and goes: our
    // patches meet conflicts and must retry from fresh reads without losing a label.
    const LABELS: usize = 150;
    let writer = {
        let (nodes, name) = (nodes.clone(), node.name().to_owned());
        tokio::spawn(async move {
            for i in 0..LABELS {
                let patch = json!({"metadata": {"labels": {format!("kmc-test/l{i}"): "x"}}});
                nodes.patch(&name, &PatchParams::default(), &Patch::Merge(patch)).await.expect("labelling the node");
            }
        })
    };
    for round in 0..3 {
        let name = format!("cni-{round}");
        cni_pod(&h.ns, &name, node.name(), true).await;
        eventually("the taint to go", Duration::from_secs(5), || async { !tainted(admin, node.name()).await }).await;
        delete_pod(&h.ns, &name).await;
        eventually("the taint to come back", Duration::from_secs(5), || tainted(admin, node.name())).await;
    }
    writer.await.expect("label writer");

    let labels = nodes.get(node.name()).await.unwrap().metadata.labels.unwrap_or_default();
    let missing: Vec<usize> = (0..LABELS).filter(|i| !labels.contains_key(&format!("kmc-test/l{i}"))).collect();
    assert!(missing.is_empty(), "labels lost: {missing:?}");
    let now = taints(admin, node.name()).await;
    assert!(now.iter().any(|t| t == "example.com/dedicated:NoSchedule"), "{now:?}");
    assert!(now.iter().any(|t| t == NOT_READY), "{now:?}");
    assert_eq!(now.iter().filter(|t| *t == OURS).count(), 1, "{now:?}");
    let conflicts = metric(&ctl.status.render(), "kong_mesh_cni_controller_conflicts_total{controller=\"taint\"}");
    eprintln!("conflicts met and retried: {conflicts}");
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_registered_with_the_taint_are_untainted_when_their_cni_pod_is_ready() {
    if testkit::skip_heavy("taint controller") {
        return;
    }
    let server = ApiServer::shared();
    let h = Harness::new(server).await;
    let admin = &h.admin;
    // Before the controller starts: a tainted node whose CNI pod is ready already, and
    // a node that registered without the taint and has no CNI pod.
    let early = register_tainted_node(admin).await;
    cni_pod(&h.ns, "cni-early", &early, true).await;
    let bare = server.node("kmc-bare", &[]).await;

    let client = h.controller_client(server, RepairAction::Off).await;
    let ctl = Running::start(client, &h.flags("only", RepairAction::Off)).await;
    eventually("the early node to be untainted", Duration::from_secs(5), || async { !tainted(admin, &early).await })
        .await;
    eventually("the bare node to be tainted", Duration::from_secs(5), || tainted(admin, bare.name())).await;

    // Registered with the taint while the controller runs: left as it is, one copy.
    let late = register_tainted_node(admin).await;
    throughout("one copy of the taint", Duration::from_millis(500), || async {
        copies_of_ours(admin, &late).await == 1
    })
    .await;
    cni_pod(&h.ns, "cni-late", &late, true).await;
    let took =
        eventually("the late node to be untainted", Duration::from_secs(5), || async { !tainted(admin, &late).await })
            .await;
    assert!(took <= Duration::from_secs(1), "taint removed only after {took:?}");

    ctl.stop().await;
    delete_node(admin, &early).await;
    delete_node(admin, &late).await;
}

/// A CNI DaemonSet in the harness's namespace (no controller-manager runs: it only
/// exists to be read), placed on nodes labelled `kmc-test/pool=<pool>`.
fn cni_daemonset(pool: &str) -> DaemonSet {
    serde_json::from_value(json!({
        "metadata": {"name": "kong-mesh-cni", "labels": {"app": "kong-mesh-cni"}},
        "spec": {
            "selector": {"matchLabels": {"app": "kong-mesh-cni"}},
            "template": {
                "metadata": {"labels": {"app": "kong-mesh-cni"}},
                "spec": {
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [{"key": "kmc-test/pool", "operator": "In", "values": [pool]}]}]
                    }}},
                    "tolerations": [{"key": "NodeReadiness", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [{"name": "install-cni", "image": "kong-mesh-cni:test"}]
                }
            }
        }
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_nodes_the_cni_daemonset_targets_are_tainted() {
    if testkit::skip_heavy("taint controller") {
        return;
    }
    let server = ApiServer::shared();
    let h = Harness::new(server).await;
    let admin = &h.admin;
    let (pool, other_pool) = (format!("p{}", unique_suffix()), format!("q{}", unique_suffix()));
    let daemonsets = Api::<DaemonSet>::namespaced(admin.clone(), h.ns.name());
    daemonsets.create(&PostParams::default(), &cni_daemonset(&pool)).await.expect("creating the DaemonSet");
    let client = h.controller_client(server, RepairAction::Off).await;
    let ctl = Running::start(client, &h.flags("only", RepairAction::Off)).await;

    let linux = ("kubernetes.io/os", "linux");
    let in_pool = server.node("kmc-target", &[linux, ("kmc-test/pool", &pool)]).await;
    let outside = server.node("kmc-target", &[linux]).await;
    let windows = server.node("kmc-target", &[("kubernetes.io/os", "windows"), ("kmc-test/pool", &pool)]).await;
    let dedicated = server.node("kmc-target", &[linux, ("kmc-test/pool", &pool)]).await;
    let untolerated = json!([{"op": "add", "path": "/spec/taints/-", "value": {"key": "example.com/dedicated", "value": "db", "effect": "NoSchedule"}}]);
    let untolerated: json_patch::Patch = serde_json::from_value(untolerated).unwrap();
    Api::<Node>::all(admin.clone())
        .patch(dedicated.name(), &PatchParams::default(), &Patch::Json::<()>(untolerated))
        .await
        .expect("adding a taint the DaemonSet does not tolerate");
    // Registered with our taint by its kubelet, but the CNI never comes there.
    let registered = register_tainted_node(admin).await;

    eventually("the targeted node to be tainted", Duration::from_secs(5), || tainted(admin, in_pool.name())).await;
    eventually("our taint off the node the DaemonSet skips", Duration::from_secs(5), || async {
        !tainted(admin, &registered).await
    })
    .await;
    throughout("no taint where the DaemonSet never runs", Duration::from_secs(1), || async {
        !tainted(admin, outside.name()).await
            && !tainted(admin, windows.name()).await
            && !tainted(admin, dedicated.name()).await
    })
    .await;

    // The node joins the pool: now targeted, so tainted until a CNI pod is Ready there.
    let label = json!({"metadata": {"labels": {"kmc-test/pool": pool}}});
    Api::<Node>::all(admin.clone())
        .patch(outside.name(), &PatchParams::default(), &Patch::Merge(&label))
        .await
        .expect("labelling the node");
    eventually("the node that joined the pool to be tainted", Duration::from_secs(5), || {
        tainted(admin, outside.name())
    })
    .await;
    cni_pod(&h.ns, "cni", outside.name(), true).await;
    eventually("its taint to go once its CNI pod is Ready", Duration::from_secs(5), || async {
        !tainted(admin, outside.name()).await
    })
    .await;

    // The DaemonSet moves to another pool: the nodes it left lose the taint (a change of
    // the DaemonSet reconciles every node).
    let moved = json!({"spec": {"template": {"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "kmc-test/pool", "operator": "In", "values": [other_pool]}]}]
    }}}}}}});
    daemonsets
        .patch("kong-mesh-cni", &PatchParams::default(), &Patch::Merge(&moved))
        .await
        .expect("moving the DaemonSet");
    eventually("the taint off the node the DaemonSet left", Duration::from_secs(5), || async {
        !tainted(admin, in_pool.name()).await
    })
    .await;
    assert_eq!(copies_of_ours(admin, dedicated.name()).await, 0);
    delete_node(admin, &registered).await;
    ctl.stop().await;
}
