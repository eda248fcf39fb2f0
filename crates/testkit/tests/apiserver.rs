//! The real kube-apiserver: objects written by the admin, read by a service account
//! with exactly the RBAC the test grants, and refused everything else.

use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use testkit::{ApiServer, pod, policy_rule, skip_heavy, unique_suffix};

fn is_forbidden<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> bool {
    match result {
        Err(kube::Error::Api(s)) => s.code == 403,
        other => panic!("expected 403 Forbidden, got {other:?}"),
    }
}

#[tokio::test]
async fn service_account_reads_pod_created_by_admin() {
    if skip_heavy("service_account_reads_pod_created_by_admin") {
        return;
    }
    let api = ApiServer::shared();
    let ns = api.namespace("kmc-read").await;

    let spec = pod("mesh-app")
        .annotation("kuma.io/sidecar-injected", "true")
        .annotation("traffic.kuma.io/exclude-inbound-ports", "8080,9090")
        .label("app", "demo")
        .init_container("kuma-validation")
        .container("app")
        .container("kuma-sidecar")
        .build();
    ns.create_pod(spec).await;

    ns.grant("kong-mesh-cni", "pod-reader", vec![policy_rule(&[""], &["pods"], &["get"])]).await;
    let sa = api.service_account_client(ns.name(), "kong-mesh-cni").await;
    let got = Api::<Pod>::namespaced(sa, ns.name()).get("mesh-app").await.expect("SA may get pods");

    let annotations = got.metadata.annotations.unwrap_or_default();
    assert_eq!(annotations.get("kuma.io/sidecar-injected").map(String::as_str), Some("true"));
    assert_eq!(annotations.get("traffic.kuma.io/exclude-inbound-ports").map(String::as_str), Some("8080,9090"));
    let spec = got.spec.unwrap();
    let names: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["app", "kuma-sidecar"]);
    assert_eq!(spec.init_containers.unwrap()[0].name, "kuma-validation");

    // Status is written as a kubelet would: the admin may, through the subresource.
    let running = ns.set_pod_running("mesh-app", Some("198.18.0.10")).await;
    let status = running.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.pod_ip.as_deref(), Some("198.18.0.10"));
    assert!(status.conditions.unwrap().iter().any(|c| c.type_ == "Ready" && c.status == "True"));
}

#[tokio::test]
async fn service_account_is_refused_what_rbac_does_not_grant() {
    if skip_heavy("service_account_is_refused_what_rbac_does_not_grant") {
        return;
    }
    let api = ApiServer::shared();
    let ns = api.namespace("kmc-deny").await;
    let other = api.namespace("kmc-other").await;
    ns.create_pod(pod("p").build()).await;
    other.create_pod(pod("p").build()).await;
    let node = api.node("kmc-node", &[]).await;

    ns.grant("kong-mesh-cni", "pod-reader", vec![policy_rule(&[""], &["pods"], &["get"])]).await;
    let sa = api.service_account_client(ns.name(), "kong-mesh-cni").await;

    let pods = Api::<Pod>::namespaced(sa.clone(), ns.name());
    pods.get("p").await.expect("get is granted");
    assert!(is_forbidden(pods.list(&ListParams::default()).await), "list pods");
    assert!(is_forbidden(pods.create(&PostParams::default(), &pod("new").build()).await), "create pods");
    assert!(is_forbidden(Api::<Pod>::namespaced(sa.clone(), other.name()).get("p").await), "get pods elsewhere");
    assert!(
        is_forbidden(Api::<Secret>::namespaced(sa.clone(), ns.name()).list(&ListParams::default()).await),
        "list secrets"
    );
    let taint = Patch::Merge(json!({"spec": {"taints": [{"key": "x", "effect": "NoSchedule"}]}}));
    assert!(
        is_forbidden(Api::<Node>::all(sa).patch(node.name(), &PatchParams::default(), &taint).await),
        "patch nodes"
    );
}

#[tokio::test]
async fn nodes_take_status_from_the_admin() {
    if skip_heavy("nodes_take_status_from_the_admin") {
        return;
    }
    let api = ApiServer::shared();
    let node = api.node("kmc-node", &[("kubernetes.io/os", "linux")]).await;
    let ready = node.set_ready(true).await;
    let conditions = ready.status.unwrap().conditions.unwrap();
    assert!(conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    // No controller-manager runs: nothing else touches the node.
    let got = Api::<Node>::all(api.client().await).get(node.name()).await.unwrap();
    assert_eq!(got.metadata.labels.unwrap()["kubernetes.io/os"], "linux");
}

#[tokio::test]
async fn network_attachment_definition_crd_is_installed() {
    if skip_heavy("network_attachment_definition_crd_is_installed") {
        return;
    }
    let api = ApiServer::shared();
    let ns = api.namespace("kmc-nad").await;
    let gvk = GroupVersionKind::gvk("k8s.cni.cncf.io", "v1", "NetworkAttachmentDefinition");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "network-attachment-definitions");
    let nads = Api::<DynamicObject>::namespaced_with(ns.client(), ns.name(), &resource);
    let nad = DynamicObject::new("kuma-cni", &resource).data(json!({"spec": {"config": "{\"type\":\"kuma-cni\"}"}}));
    nads.create(&PostParams::default(), &nad).await.expect("creating a NetworkAttachmentDefinition");
    let got = nads.get("kuma-cni").await.unwrap();
    assert_eq!(got.data["spec"]["config"], "{\"type\":\"kuma-cni\"}");
}

#[tokio::test]
async fn tests_can_install_crds_at_runtime() {
    if skip_heavy("tests_can_install_crds_at_runtime") {
        return;
    }
    let api = ApiServer::shared();
    let client = api.client().await;
    let group = format!("g{}.test.kmc.dev", unique_suffix());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("widgets.{group}")},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {
                "type": "object", "x-kubernetes-preserve-unknown-fields": true}}}],
        },
    }))
    .unwrap();
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    crds.create(&PostParams::default(), &crd).await.expect("creating a CRD");

    let ns = api.namespace("kmc-crd").await;
    let gvk = GroupVersionKind::gvk(&group, "v1", "Widget");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "widgets");
    let widgets = Api::<DynamicObject>::namespaced_with(client, ns.name(), &resource);
    // Served once Established, which takes a moment.
    let widget = DynamicObject::new("w", &resource).data(json!({"size": 3}));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match widgets.create(&PostParams::default(), &widget).await {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("creating a Widget: {e}"),
        }
    }
    assert_eq!(widgets.get("w").await.unwrap().data["size"], 3);
    crds.delete(&crd.metadata.name.unwrap(), &Default::default()).await.expect("deleting the CRD");
}

#[tokio::test]
async fn namespace_guard_removes_namespace_and_pods() {
    if skip_heavy("namespace_guard_removes_namespace_and_pods") {
        return;
    }
    use k8s_openapi::api::core::v1::Namespace;
    let api = ApiServer::shared();
    let client = api.client().await;
    let ns = api.namespace("kmc-gone").await;
    let name = ns.name().to_string();
    ns.create_pod(pod("p").node_name("nowhere").build()).await;
    drop(ns);
    let got = Api::<Namespace>::all(client.clone()).get_opt(&name).await.unwrap();
    assert!(got.is_none(), "namespace {name} still there: {got:?}");
    let pods = Api::<Pod>::namespaced(client, &name).list(&ListParams::default()).await.unwrap();
    assert!(pods.items.is_empty(), "pods left in {name}");
}

#[test]
fn private_server_stops_and_removes_its_dir_on_drop() {
    if skip_heavy("private_server_stops_and_removes_its_dir_on_drop") {
        return;
    }
    let server = ApiServer::start(&[]);
    let dir = server.dir().to_path_buf();
    assert!(server.kubeconfig_path().is_file());
    drop(server);
    assert!(!dir.exists(), "{} left behind", dir.display());
}
