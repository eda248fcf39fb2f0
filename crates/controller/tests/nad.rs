//! The NetworkAttachmentDefinition controller against the real API server, with the
//! chart's RBAC.

mod common;

use std::time::Duration;

use common::{Harness, eventually, metric, throughout};
use controller::{MANAGED_BY, MANAGED_BY_LABEL, RepairAction, SIDECAR_INJECTION_LABEL, nad_resource};
use k8s_openapi::api::core::v1::{Event, Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use testkit::{ApiServer, repo_root, unique_suffix};

const NAD: &str = "kuma-cni";

fn nads(admin: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(admin.clone(), ns, &nad_resource())
}

async fn nad(admin: &Client, ns: &str) -> Option<DynamicObject> {
    nads(admin, ns).get_opt(NAD).await.expect("reading the NAD")
}

async fn has_nad(admin: &Client, ns: &str) -> bool {
    nad(admin, ns).await.is_some()
}

async fn label(admin: &Client, ns: &str, value: Option<&str>) {
    let patch = json!({"metadata": {"labels": {SIDECAR_INJECTION_LABEL: value}}});
    Api::<Namespace>::all(admin.clone())
        .patch(ns, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .expect("labelling the namespace");
}

async fn install_crd(admin: &Client) {
    let path = repo_root().join("testenv/crds/network-attachment-definition.yaml");
    let crd: CustomResourceDefinition = serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    Api::<CustomResourceDefinition>::all(admin.clone())
        .create(&PostParams::default(), &crd)
        .await
        .expect("creating the CRD");
    // Served a moment after it is created; until then the test's own reads would fail.
    let nads = nads(admin, "default");
    eventually("the NAD API to be served", Duration::from_secs(10), || async {
        nads.list(&Default::default()).await.is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_label_adds_and_removes_the_nad() {
    if testkit::skip_heavy("NAD controller") {
        return;
    }
    let server = ApiServer::shared();
    let (h, ctl) = Harness::with_controller(server, RepairAction::Off).await;
    let admin = &h.admin;

    let mesh = server.namespace("kmc-mesh").await;
    label(admin, mesh.name(), Some("enabled")).await;
    eventually("the NAD", Duration::from_secs(5), || has_nad(admin, mesh.name())).await;
    let created = nad(admin, mesh.name()).await.unwrap();
    assert_eq!(created.labels().get(MANAGED_BY_LABEL).map(String::as_str), Some(MANAGED_BY));
    assert_eq!(created.data["spec"], json!({"config": ""}));

    // Any value of the label counts, `disabled` too.
    label(admin, mesh.name(), Some("disabled")).await;
    throughout("the NAD with label value disabled", Duration::from_millis(500), || has_nad(admin, mesh.name())).await;
    label(admin, mesh.name(), None).await;
    eventually("the NAD to go", Duration::from_secs(5), || async { !has_nad(admin, mesh.name()).await }).await;

    // A NAD of that name that someone else made is neither replaced nor deleted.
    let own = server.namespace("kmc-own").await;
    let mut theirs = DynamicObject::new(NAD, &nad_resource()).within(own.name());
    theirs.data = json!({"spec": {"config": "{\"cniVersion\": \"1.0.0\", \"type\": \"theirs\"}"}});
    nads(admin, own.name()).create(&PostParams::default(), &theirs).await.expect("creating their NAD");
    label(admin, own.name(), Some("enabled")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    label(admin, own.name(), None).await;
    throughout("their NAD", Duration::from_millis(500), || async {
        nad(admin, own.name()).await.is_some_and(|n| n.labels().is_empty())
    })
    .await;

    let text = ctl.status.render();
    assert_eq!(metric(&text, "kong_mesh_cni_controller_nad_changes_total{change=\"create\"}"), 1);
    assert_eq!(metric(&text, "kong_mesh_cni_controller_nad_changes_total{change=\"delete\"}"), 1);
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_namespaces_are_skipped() {
    if testkit::skip_heavy("NAD controller") {
        return;
    }
    let server = ApiServer::shared();
    let (h, ctl) = Harness::with_controller(server, RepairAction::Off).await;
    let admin = &h.admin;

    // No namespace controller runs: a deleted namespace stays Terminating until its
    // finalizer is cleared by hand below.
    let name = format!("kmc-term-{}", unique_suffix());
    let namespaces = Api::<Namespace>::all(admin.clone());
    let ns =
        Namespace { metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() }, ..Default::default() };
    namespaces.create(&PostParams::default(), &ns).await.expect("creating the namespace");
    namespaces.delete(&name, &DeleteParams::default()).await.expect("deleting the namespace");
    label(admin, &name, Some("enabled")).await;
    // Creating in it would be refused (403): the controller must not even try.
    throughout("no NAD in the terminating namespace", Duration::from_secs(1), || async {
        !has_nad(admin, &name).await
    })
    .await;
    let errors = metric(&ctl.status.render(), "kong_mesh_cni_controller_errors_total{controller=\"nad\",kind=\"403\"}");
    assert_eq!(errors, 0);

    let finalize = json!({"metadata": {"name": name}, "spec": {"finalizers": []}});
    namespaces.replace_subresource("finalize", &name, &PostParams::default(), &finalize).await.expect("finalizing");
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crd_installed_after_start_is_picked_up_without_restart() {
    if testkit::skip_heavy("NAD controller") {
        return;
    }
    // A private API server without the NAD CRD.
    let server = ApiServer::start(&[]);
    let (h, ctl) = Harness::with_controller(&server, RepairAction::Off).await;
    let admin = &h.admin;
    let mesh = server.namespace("kmc-mesh").await;
    label(admin, mesh.name(), Some("enabled")).await;

    install_crd(admin).await;
    eventually("the NAD once the CRD exists", Duration::from_secs(10), || has_nad(admin, mesh.name())).await;

    // The CRD going away (its NADs with it) and coming back is followed too.
    let crds = Api::<CustomResourceDefinition>::all(admin.clone());
    crds.delete("network-attachment-definitions.k8s.cni.cncf.io", &DeleteParams::default())
        .await
        .expect("deleting the CRD");
    eventually("the CRD to be gone", Duration::from_secs(20), || async {
        crds.get_opt("network-attachment-definitions.k8s.cni.cncf.io").await.unwrap().is_none()
    })
    .await;
    install_crd(admin).await;
    let second = server.namespace("kmc-mesh").await;
    label(admin, second.name(), Some("true")).await;
    eventually("the NADs with the CRD back", Duration::from_secs(10), || async {
        has_nad(admin, mesh.name()).await && has_nad(admin, second.name()).await
    })
    .await;

    let text = ctl.status.render();
    assert_eq!(metric(&text, "kong_mesh_cni_controller_nad_changes_total{change=\"create\"}"), 3);
    let not_found = metric(&text, "kong_mesh_cni_controller_errors_total{controller=\"nad\",kind=\"404\"}");
    eprintln!("NAD watch errors while the CRD was away: {not_found}");
    ctl.stop().await;
    drop((mesh, second, h));
}

/// A pod of `ns` that asks Multus for our network, and Multus's `NoNetworkFound` Event
/// about it, in the shape Multus v4.2.2 writes (client-go's recorder: core/v1). Here
/// the test writes that Event for Multus; node_multus has the real Multus write it.
async fn multus_could_not_attach(admin: &Client, ns: &str) -> (Pod, String) {
    let pods = Api::<Pod>::namespaced(admin.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "mesh", "annotations": { "k8s.v1.cni.cncf.io/networks": NAD } },
        "spec": { "containers": [{ "name": "app", "image": "app" }] },
    }))
    .unwrap();
    let pod = pods.create(&PostParams::default(), &pod).await.expect("creating the pod");
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let name = format!("mesh.{}", unique_suffix());
    let event: Event = serde_json::from_value(json!({
        "metadata": { "name": name },
        "involvedObject": { "apiVersion": "v1", "kind": "Pod", "namespace": ns, "name": "mesh", "uid": pod.uid() },
        "reason": "NoNetworkFound",
        "type": "Warning",
        "message": format!("cannot find a network-attachment-definition ({NAD}) in namespace ({ns}): network-attachment-definitions.k8s.cni.cncf.io \"{NAD}\" not found"),
        "source": { "component": "multus" },
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    }))
    .unwrap();
    Api::<Event>::namespaced(admin.clone(), ns).create(&PostParams::default(), &event).await.expect("Multus's Event");
    (pod, name)
}

/// Our Events about `pod` (core/v1 shows the events.k8s.io ones the recorder writes).
async fn hints(admin: &Client, pod: &Pod) -> Vec<Event> {
    let ns = pod.namespace().unwrap();
    let params =
        ListParams::default().fields(&format!("involvedObject.uid={},reason=NamespaceNotLabelled", pod.uid().unwrap()));
    Api::<Event>::namespaced(admin.clone(), &ns).list(&params).await.expect("listing events").items
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_multus_cannot_attach_is_told_to_label_its_namespace() {
    if testkit::skip_heavy("NAD controller") {
        return;
    }
    let server = ApiServer::shared();
    let (h, ctl) = Harness::with_controller(server, RepairAction::Off).await;
    let admin = &h.admin;

    let bare = server.namespace("kmc-bare").await;
    let (pod, multus_event) = multus_could_not_attach(admin, bare.name()).await;
    eventually("our hint on the pod", Duration::from_secs(10), || async { !hints(admin, &pod).await.is_empty() }).await;
    let hint = hints(admin, &pod).await.remove(0);
    let note = hint.message.unwrap_or_default();
    assert!(
        note.contains(&format!("kubectl label namespace {} kuma.io/sidecar-injection=enabled", bare.name())),
        "{note}"
    );
    assert_eq!(hint.type_.as_deref(), Some("Warning"));

    // Multus repeats its Event on each retry of the kubelet (client-go counts it up):
    // one hint, not one per retry.
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let again = json!({ "count": 2, "lastTimestamp": now });
    Api::<Event>::namespaced(admin.clone(), bare.name())
        .patch(&multus_event, &PatchParams::default(), &Patch::Merge(again))
        .await
        .expect("Multus's Event, again");
    throughout("one hint per pod", Duration::from_secs(1), || async { hints(admin, &pod).await.len() == 1 }).await;

    // Labelled, the namespace gets our NAD: the kubelet's retry will attach, no hint.
    let labelled = server.namespace("kmc-labelled").await;
    label(admin, labelled.name(), Some("enabled")).await;
    let (waiting, _) = multus_could_not_attach(admin, labelled.name()).await;
    throughout("no hint in a labelled namespace", Duration::from_secs(1), || async {
        hints(admin, &waiting).await.is_empty()
    })
    .await;

    let text = ctl.status.render();
    assert_eq!(metric(&text, "kong_mesh_cni_controller_events_total{change=\"recorded\"}"), 1);
    common::assert_no_forbidden(&ctl.status);
    ctl.stop().await;
}
