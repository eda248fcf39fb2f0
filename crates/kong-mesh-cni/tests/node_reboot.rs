//! Node reboots on a real node (testkit::node + node_reboot): our chart installed with
//! `cni.delayStartupSeconds`, so that after each reboot the mesh pods' sandboxes are
//! recreated (and their ADD runs) before our DaemonSet pod is up: no node agent, no log
//! relay, no run dir; only what the reboot kept (our conflist entry, binary and
//! kubeconfig). Three reboots of one node, one after the other: as is; with our
//! kubeconfig's token no longer valid when the node comes back (a token whose bound
//! object was deleted: the API server answers 401, as for an expired one; TokenRequest
//! cannot make one that expires within a test); and with the API server unreachable at
//! the `kubernetes` Service's address from anywhere on the node (our plugin, our
//! installer, the controller's pod) for 30 s after the node comes back, as before
//! kube-proxy has run. Each time: every pod is Running again
//! within a bound (printed), no pod was deleted (UIDs unchanged), the mesh pod's
//! validator passed in its new sandbox, and its app (which dials the target every
//! second) never reached the target unredirected: not one `-> serve` line in any of
//! its logs.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Event, Pod, Secret, ServiceAccount};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use testkit::node_chart::{CNI_NAMESPACE, install, uninstall};
use testkit::node_pods::{self, Validator, container, mesh_pod, plain_pod, pod_ip, pod_ready, validation_exit};
use testkit::node_reboot::ServiceRoute;
use testkit::{Node, NodeOptions};

const BINARY: &str = env!("CARGO_BIN_EXE_kong-mesh-cni");
const POD_READY: Duration = Duration::from_secs(90);
/// Our DaemonSet pod's init container sleeps this long after every (re)start.
const CNI_DELAY_S: u64 = 10;
/// How long the `kubernetes` Service leads nowhere in the third reboot.
const SERVICE_AWAY: Duration = Duration::from_secs(30);
/// A limit, not a measurement: every pod Running again after a reboot.
const RUNNING_AGAIN: Duration = Duration::from_secs(240);

#[derive(Debug, Clone, Copy)]
enum Variant {
    AsIs,
    TokenInvalid,
    ApiUnreachable,
}

/// Every pod on the node: `namespace/name`, UID, whether it is Ready, and the IDs of
/// its containers (new ones after a reboot: a stale status still shows the old ones).
struct Seen {
    name: String,
    uid: String,
    ready: bool,
    containers: Vec<String>,
}

async fn pods(client: &Client) -> Vec<Seen> {
    let mut out = Vec::new();
    for ns in ["default", CNI_NAMESPACE] {
        let list = Api::<Pod>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap();
        for p in list.items {
            let status = p.status.clone().unwrap_or_default();
            let containers =
                status.container_statuses.iter().flatten().filter_map(|c| c.container_id.clone()).collect();
            out.push(Seen {
                name: format!("{ns}/{}", p.metadata.name.clone().unwrap_or_default()),
                uid: p.metadata.uid.clone().unwrap_or_default(),
                ready: pod_ready(&p),
                containers,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// What happened, for a failure: the Events of both namespaces and our CNI pods' logs.
async fn story(client: &Client, node: &Node) -> String {
    let mut out = String::new();
    for ns in ["default", CNI_NAMESPACE] {
        let events = Api::<Event>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap();
        for e in events.items {
            let object = e.involved_object.name.unwrap_or_default();
            out +=
                &format!("event {ns}/{object}: {} {}\n", e.reason.unwrap_or_default(), e.message.unwrap_or_default());
        }
    }
    let controller = node_pods::tail(&node_pods::container_logs(node, "controller"), 40);
    out + "--- our CNI pods' logs\n" + &node_pods::cni_logs(node) + "--- the controller\n" + &controller
}

/// Every line the mesh pod's app container wrote, in every instance of it.
fn mesh_app_log(node: &Node) -> String {
    let mut out = String::new();
    for pod in std::fs::read_dir(&node.pod_logs_dir).into_iter().flatten().flatten() {
        if pod.file_name().to_string_lossy().starts_with("default_mesh_") {
            for file in std::fs::read_dir(pod.path().join("app")).into_iter().flatten().flatten() {
                out += &std::fs::read_to_string(file.path()).unwrap_or_default();
            }
        }
    }
    out
}

/// A token of our service account the API server refuses (401): bound to a Secret
/// that is then deleted.
async fn invalid_token(client: &Client) -> String {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), CNI_NAMESPACE);
    let secret: Secret =
        serde_json::from_value(serde_json::json!({ "metadata": { "name": "kmc-reboot-bound" } })).unwrap();
    let secret = secrets.create(&PostParams::default(), &secret).await.unwrap();
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Secret".into()),
                name: secret.metadata.name.clone(),
                uid: secret.metadata.uid.clone(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), CNI_NAMESPACE);
    let token = sas.create_token_request("kong-mesh-cni", &PostParams::default(), &request).await.unwrap();
    secrets.delete("kmc-reboot-bound", &DeleteParams::default()).await.unwrap();
    token.status.unwrap().token.expect("a token")
}

/// Replaces the token in the plugin's kubeconfig in the node's net dir.
fn replace_token(node: &Node, token: &str) {
    let path = node.cni_net_dir.join("ZZZ-kuma-cni-kubeconfig");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let replaced: Vec<String> = text
        .lines()
        .map(|l| match l.split_once("token: ") {
            Some((indent, _)) if indent.trim().is_empty() => format!("{indent}token: {token}"),
            _ => l.to_string(),
        })
        .collect();
    assert_ne!(replaced.join("\n"), text.trim_end(), "a token line in {}", path.display());
    std::fs::write(&path, replaced.join("\n") + "\n").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reboot_no_mesh_app_runs_unredirected_and_every_pod_runs_again() {
    if testkit::skip_privileged("the node reboot test") {
        return;
    }
    let mut node = Node::up(NodeOptions::default()).await.unwrap_or_else(|e| panic!("bringing the node up: {e}"));
    let client = node.client().await.unwrap();
    let primary = std::fs::read_to_string(&node.conflist).unwrap();
    let delay = format!("cni.delayStartupSeconds={CNI_DELAY_S}");
    let installed = install(&node, &client, Path::new(BINARY), &[&delay], Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("installing from the chart: {e}"));
    let none = String::new;
    let serve = plain_pod("target", &node, vec![container("serve", &["serve", "8080"])]);
    let (target, _) =
        node_pods::run_pod(&client, &node, serve, POD_READY, &none).await.unwrap_or_else(|e| panic!("{e}"));
    let target_addr = format!("{}:8080", pod_ip(&target));
    let image = installed.image.to_string();
    let mesh = mesh_pod("mesh", &node, &target_addr, Validator::image(&image));
    let (mesh, _) = node_pods::run_pod(&client, &node, mesh, POD_READY, &none).await.unwrap_or_else(|e| panic!("{e}"));
    node_pods::assert_redirected(&client, std::slice::from_ref(&mesh), &target_addr).await;

    for variant in [Variant::AsIs, Variant::TokenInvalid, Variant::ApiUnreachable] {
        let seen = pods(&client).await;
        let uids: Vec<(String, String)> = seen.iter().map(|p| (p.name.clone(), p.uid.clone())).collect();
        let old: Vec<String> = seen.into_iter().flat_map(|p| p.containers).collect();
        let token = match variant {
            Variant::TokenInvalid => Some(invalid_token(&client).await),
            Variant::AsIs | Variant::ApiUnreachable => None,
        };
        let route = match variant {
            Variant::ApiUnreachable => ServiceRoute::Later,
            Variant::AsIs | Variant::TokenInvalid => ServiceRoute::AtBoot,
        };
        node.reboot(route, |node| {
            if let Some(token) = &token {
                replace_token(node, token);
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{variant:?}: rebooting: {e}"));
        let booted = Instant::now();
        if route == ServiceRoute::Later {
            tokio::time::sleep(SERVICE_AWAY).await;
            node.route_service().unwrap_or_else(|e| panic!("{variant:?}: routing the Service again: {e}"));
        }
        let routed = Instant::now();
        // Running again: every pod Ready with containers started after the reboot.
        loop {
            let now = pods(&client).await;
            let restarted = |p: &Seen| !p.containers.is_empty() && p.containers.iter().all(|c| !old.contains(c));
            let names: Vec<(String, String)> = now.iter().map(|p| (p.name.clone(), p.uid.clone())).collect();
            if names != uids {
                panic!("{variant:?}: a pod was deleted or replaced: {names:?}\n{}", story(&client, &node).await);
            }
            if now.iter().all(|p| p.ready && restarted(p)) {
                break;
            }
            if booted.elapsed() > RUNNING_AGAIN {
                let all = ListParams::default();
                panic!(
                    "{variant:?}: not every pod Running {RUNNING_AGAIN:?} after the reboot\n{}{}",
                    node_pods::why_not_ready(&client, &node, "default", &all).await,
                    story(&client, &node).await
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let running_after = booted.elapsed();
        let mesh_now = Api::<Pod>::namespaced(client.clone(), "default").get("mesh").await.unwrap();
        assert_eq!(validation_exit(&mesh_now), Some(0), "{variant:?}: the validator passed in the new sandbox");
        node_pods::assert_redirected(&client, std::slice::from_ref(&mesh_now), &target_addr).await;
        let log = mesh_app_log(&node);
        let unredirected = log.lines().filter(|l| l.contains("-> serve")).count();
        eprintln!(
            "{variant:?}: every pod Running {running_after:.1?} after it ({:.1?} after the Service was routed); app connections unredirected: {unredirected} (of {} logged)",
            running_after.saturating_sub(routed.duration_since(booted)),
            log.lines().filter(|l| l.contains("->")).count()
        );
        assert!(log.lines().any(|l| l.contains("-> sidecar")), "{variant:?}: the app ran and was redirected:\n{log}");
        assert_eq!(unredirected, 0, "{variant:?}: the mesh app reached its target unredirected:\n{log}");
    }

    uninstall(&node, installed.release, &primary).await.unwrap_or_else(|e| panic!("{e}"));
    node.down_leaving_the_host_as_it_was();
}
