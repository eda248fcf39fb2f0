//! The repair controller against the real API server, with the chart's RBAC.

mod common;

use std::time::Duration;

use common::{Harness, cni_pod, eventually, metric, throughout};
use controller::{EVENT_REASON, REDIRECT_MISSING_LABEL, RepairAction};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kuma::pod::{SIDECAR_CONTAINER, SIDECAR_INJECTED, VALIDATION_CONTAINER, VALIDATOR_EXIT_NOT_REDIRECTED};
use serde_json::json;
use testkit::{ApiServer, TestNamespace, pod};

/// How the kubelet reports the validator's end: in `state` when it just ended, in
/// `lastState` once it was restarted (init containers of a restartPolicy Always pod).
#[derive(Clone, Copy)]
enum Report {
    State,
    LastState,
}

/// Writes through the status subresource what the kubelet would after the validator
/// (init container `kuma-validation`) exited with `code`.
async fn validator_exited(ns: &TestNamespace, name: &str, code: i32, report: Report) {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let terminated = json!({"terminated": {"exitCode": code, "reason": "Error", "startedAt": now, "finishedAt": now}});
    let (state, last_state, restarts) = match report {
        Report::State => (terminated, json!({}), 0),
        Report::LastState => (json!({"waiting": {"reason": "CrashLoopBackOff"}}), terminated, 1),
    };
    let status = json!({"status": {"phase": "Pending", "initContainerStatuses": [{
        "name": VALIDATION_CONTAINER, "image": "kmc-test/none:0", "imageID": "", "ready": false,
        "restartCount": restarts, "state": state, "lastState": last_state,
    }]}});
    ns.api::<Pod>()
        .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .expect("writing the pod status");
}

/// The node the tests' pods are scheduled on (no kubelet runs there, so a deleted pod
/// stays, marked for deletion, and keeps receiving status updates).
const NODE: &str = "kmc-node-gone";

/// A controller of `action` in a new harness, whose [`NODE`] has a Ready CNI pod (the
/// controller repairs nothing on a node without one).
async fn with_controller(action: RepairAction) -> (Harness, common::Running) {
    let (h, ctl) = Harness::with_controller(ApiServer::shared(), action).await;
    cni_pod(&h.ns, "cni", NODE, true).await;
    (h, ctl)
}

/// A mesh pod as the injector makes it, scheduled on [`NODE`].
async fn mesh_pod(ns: &TestNamespace, name: &str) {
    let p = pod(name)
        .annotation(SIDECAR_INJECTED, "true")
        .init_container(VALIDATION_CONTAINER)
        .container("app")
        .container(SIDECAR_CONTAINER);
    ns.create_pod(p.node_name(NODE).build()).await;
}

async fn marked_for_deletion(ns: &TestNamespace, name: &str) -> bool {
    ns.api::<Pod>().get_opt(name).await.unwrap().is_none_or(|p| p.metadata.deletion_timestamp.is_some())
}

async fn untouched(ns: &TestNamespace, name: &str) -> bool {
    let pod = ns.api::<Pod>().get(name).await.unwrap();
    pod.metadata.deletion_timestamp.is_none()
        && !pod.metadata.labels.unwrap_or_default().contains_key(REDIRECT_MISSING_LABEL)
}

/// Our Events about `pod`.
async fn events(ns: &TestNamespace, pod: &str) -> Vec<Event> {
    let all = Api::<Event>::namespaced(ns.client(), ns.name()).list(&ListParams::default()).await.unwrap();
    all.items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(EVENT_REASON)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod)
        })
        .collect()
}

/// Pods that must be left alone whatever happens: no sidecar, not injected, another
/// exit code.
async fn bystanders(ns: &TestNamespace) -> [&'static str; 3] {
    ns.create_pod(pod("plain").init_container(VALIDATION_CONTAINER).container("app").build()).await;
    validator_exited(ns, "plain", VALIDATOR_EXIT_NOT_REDIRECTED, Report::State).await;
    ns.create_pod(pod("not-injected").init_container(VALIDATION_CONTAINER).container(SIDECAR_CONTAINER).build()).await;
    validator_exited(ns, "not-injected", VALIDATOR_EXIT_NOT_REDIRECTED, Report::State).await;
    mesh_pod(ns, "other-code").await;
    validator_exited(ns, "other-code", 1, Report::LastState).await;
    ["plain", "not-injected", "other-code"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_pod_without_redirect_is_deleted_once_with_an_event() {
    if testkit::skip_heavy("repair controller") {
        return;
    }
    let (h, ctl) = with_controller(RepairAction::Delete).await;
    let ns = &h.ns;

    let left_alone = bystanders(ns).await;
    mesh_pod(ns, "raced").await;
    validator_exited(ns, "raced", VALIDATOR_EXIT_NOT_REDIRECTED, Report::State).await;
    mesh_pod(ns, "crashlooping").await;
    validator_exited(ns, "crashlooping", VALIDATOR_EXIT_NOT_REDIRECTED, Report::LastState).await;
    for name in ["raced", "crashlooping"] {
        eventually("the pod to be deleted", Duration::from_secs(5), || marked_for_deletion(ns, name)).await;
    }
    // The kubelet keeps reporting on the terminating pod: nothing more happens.
    validator_exited(ns, "raced", VALIDATOR_EXIT_NOT_REDIRECTED, Report::LastState).await;
    throughout("one delete per pod", Duration::from_millis(500), || async {
        metric(&ctl.status.render(), "kong_mesh_cni_controller_repair_actions_total{action=\"delete\"}") == 2
    })
    .await;
    for name in ["raced", "crashlooping"] {
        let events = events(ns, name).await;
        assert_eq!(events.len(), 1, "{name}: {events:?}");
        assert_eq!(events[0].type_.as_deref(), Some("Warning"));
        assert!(events[0].note.as_deref().unwrap_or_default().contains("exited 97"), "{events:?}");
    }
    for name in left_alone {
        assert!(untouched(ns, name).await, "{name} was touched");
        assert!(events(ns, name).await.is_empty(), "{name} has our Event");
    }
    assert_eq!(metric(&ctl.status.render(), "kong_mesh_cni_controller_events_total{change=\"recorded\"}"), 2);
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_label_action_labels_once_and_deletes_nothing() {
    if testkit::skip_heavy("repair controller") {
        return;
    }
    let (h, ctl) = with_controller(RepairAction::Label).await;
    let ns = &h.ns;

    let left_alone = bystanders(ns).await;
    mesh_pod(ns, "raced").await;
    validator_exited(ns, "raced", VALIDATOR_EXIT_NOT_REDIRECTED, Report::State).await;
    eventually("the label", Duration::from_secs(5), || async { !untouched(ns, "raced").await }).await;
    let raced = ns.api::<Pod>().get("raced").await.unwrap();
    assert!(raced.metadata.deletion_timestamp.is_none());
    assert_eq!(raced.metadata.labels.unwrap_or_default().get(REDIRECT_MISSING_LABEL).map(String::as_str), Some("true"));

    validator_exited(ns, "raced", VALIDATOR_EXIT_NOT_REDIRECTED, Report::LastState).await;
    throughout("one label", Duration::from_millis(500), || async {
        metric(&ctl.status.render(), "kong_mesh_cni_controller_repair_actions_total{action=\"label\"}") == 1
    })
    .await;
    assert_eq!(events(ns, "raced").await.len(), 1);
    for name in left_alone {
        assert!(untouched(ns, name).await, "{name} was touched");
    }
    ctl.stop().await;
}

/// A pod exactly as Kong Mesh's injector writes it in CNI mode
/// (testenv/kuma-reference/injected/pod-34.yaml): its `kuma-validation` runs Kuma's own
/// validator, which exits 1 when the redirect is missing.
async fn injected_pod(ns: &TestNamespace, name: &str) {
    let path = testkit::repo_root().join("testenv/kuma-reference/injected/pod-34.yaml");
    let mut p: Pod = serde_norway::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    p.metadata.name = Some(name.into());
    p.spec.as_mut().unwrap().node_name = Some(NODE.into());
    ns.create_pod(p).await;
}

/// The validator's run that ended at `finished`, in `lastState` (crash-looping).
async fn validator_failed_at(ns: &TestNamespace, name: &str, code: i32, finished: k8s_openapi::jiff::Timestamp) {
    let at = finished.to_string();
    let status = json!({"status": {"phase": "Pending", "initContainerStatuses": [{
        "name": VALIDATION_CONTAINER, "image": "kuma/kuma-init:latest", "imageID": "", "ready": false,
        "restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": code, "reason": "Error", "startedAt": at, "finishedAt": at}},
    }]}});
    ns.api::<Pod>()
        .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .expect("writing the pod status");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kumas_injected_validator_failing_with_1_is_repaired_once_unless_repaired_in_place() {
    if testkit::skip_heavy("repair controller") {
        return;
    }
    let (h, ctl) = with_controller(RepairAction::Delete).await;
    let ns = &h.ns;
    let now = k8s_openapi::jiff::Timestamp::now();
    let secs = |s: i64| now + k8s_openapi::jiff::SignedDuration::from_secs(s);

    injected_pod(ns, "busybox").await;
    validator_exited(ns, "busybox", 1, Report::State).await;
    // The node agent programmed this one's redirect in place after its validator failed.
    injected_pod(ns, "repaired").await;
    validator_failed_at(ns, "repaired", 1, secs(-10)).await;
    let mark = json!({"metadata": {"annotations": {kuma::pod::REDIRECT_REPAIRED_AT: secs(-5).to_string()}}});
    ns.api::<Pod>().patch("repaired", &PatchParams::default(), &Patch::Merge(mark)).await.unwrap();

    eventually("the pod to be deleted", Duration::from_secs(8), || marked_for_deletion(ns, "busybox")).await;
    validator_exited(ns, "busybox", 1, Report::LastState).await;
    throughout("one delete, and the repaired pod left alone", Duration::from_secs(3), || async {
        metric(&ctl.status.render(), "kong_mesh_cni_controller_repair_actions_total{action=\"delete\"}") == 1
            && untouched(ns, "repaired").await
    })
    .await;
    let events = events(ns, "busybox").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].note.as_deref().unwrap_or_default().contains("kuma-validation exited 1"), "{events:?}");

    // Its validator fails again after the repair: that one the controller acts on.
    validator_failed_at(ns, "repaired", 1, secs(1)).await;
    eventually("the repaired pod to be deleted", Duration::from_secs(8), || marked_for_deletion(ns, "repaired")).await;
    ctl.stop().await;
}

/// A node just rebooted: its CNI pod is not Ready yet, so the node agent there cannot
/// have repaired in place what the plugin let through. The controller waits for the CNI
/// pod, then acts (no in-place repair came).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_repaired_on_a_node_until_its_cni_pod_is_ready() {
    if testkit::skip_heavy("repair controller") {
        return;
    }
    let (h, ctl) = Harness::with_controller(ApiServer::shared(), RepairAction::Delete).await;
    let ns = &h.ns;
    cni_pod(ns, "cni", NODE, false).await;
    mesh_pod(ns, "rebooted").await;
    validator_exited(ns, "rebooted", VALIDATOR_EXIT_NOT_REDIRECTED, Report::State).await;
    throughout("left alone while the node has no Ready CNI pod", Duration::from_secs(4), || untouched(ns, "rebooted"))
        .await;
    ns.set_pod_running("cni", None).await;
    eventually("the pod to be deleted", Duration::from_secs(8), || marked_for_deletion(ns, "rebooted")).await;
    ctl.stop().await;
}
