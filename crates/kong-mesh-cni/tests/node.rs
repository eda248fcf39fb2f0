//! The CNI under a real kubelet and containerd: a single Kubernetes v1.37 node on this
//! machine (testkit::node), pods scheduled onto it through its primary CNI (bridge +
//! host-local + portmap), then our plugin chained into that conflist by our installer
//! (`kong-mesh-cni install`, run on the host against the node's dirs, as the DaemonSet
//! pod would with its hostPath mounts), a mesh pod shaped as Kong Mesh's injector makes
//! it, and its traffic checked with SO_ORIGINAL_DST.
//!
//! One node at a time (each costs ~1 GiB and most of two cores while it starts).

mod installer_host;

use std::path::Path;
use std::time::{Duration, Instant};

use installer_host::{BINARY, Installer, UNINSTALL, wait_for};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Node as KubeNode, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use testkit::node::node_ready;
use testkit::node_pods::{self, Validator, container, container_logs, mesh_pod, plain_pod, pod_ip, tail};
use testkit::{Node, NodeOptions};

const POD_READY: Duration = Duration::from_secs(60);

static ONE_NODE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn up(options: NodeOptions) -> Node {
    let node = Node::up(options).await.unwrap_or_else(|e| panic!("bringing the node up: {e}"));
    eprintln!("node {} Ready {:.1?} after start", node.name, node.up_time);
    node
}

/// Creates `pod` in `default` and waits until it is Ready; returns it and how long that took.
async fn run_pod(client: &Client, node: &Node, pod: Value) -> (Pod, Duration) {
    run_pod_or(client, node, pod, &String::new).await
}

/// [`run_pod`], with more to tell when it fails.
async fn run_pod_or(client: &Client, node: &Node, pod: Value, more: &dyn Fn() -> String) -> (Pod, Duration) {
    node_pods::run_pod(client, node, pod, POD_READY, more).await.unwrap_or_else(|e| panic!("{e}"))
}

/// The first line of `default/pod`'s `container` log holding `needle` (as `kubectl logs`).
async fn log_line(client: &Client, pod: &str, container: &str, needle: &str) -> String {
    node_pods::log_line(client, "default", pod, container, &[needle], Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_registers_ready_runs_a_plain_pod_and_a_teardown_from_its_state_file_restores_the_host() {
    if testkit::skip_privileged("node tests") {
        return;
    }
    let _one = ONE_NODE_AT_A_TIME.lock().await;
    let node = up(NodeOptions::default()).await;
    let client = node.client().await.unwrap();

    let n = Api::<KubeNode>::all(client.clone()).get(&node.name).await.unwrap();
    assert!(node_ready(&n));
    let addresses = n.status.as_ref().and_then(|s| s.addresses.clone()).unwrap_or_default();
    assert!(
        addresses.iter().any(|a| a.type_ == "InternalIP" && a.address == node.node_ip.to_string()),
        "{addresses:?}"
    );

    let (server, took) =
        run_pod(&client, &node, plain_pod("server", &node, vec![container("serve", &["serve", "8080"])])).await;
    eprintln!("plain pod Ready in {took:.1?}");
    let ip = pod_ip(&server);
    let prefix = node.pod_subnet.trim_end_matches("0/24");
    assert!(ip.starts_with(prefix), "{ip} is not from the primary CNI's subnet {}", node.pod_subnet);
    let (_, took) =
        run_pod(&client, &node, plain_pod("client", &node, vec![container("app", &["dial", &format!("{ip}:8080")])]))
            .await;
    eprintln!("second plain pod Ready in {took:.1?}");
    let line = log_line(&client, "client", "app", "->").await;
    assert_eq!(
        line,
        format!("dial {ip}:8080 -> serve port=8080"),
        "pod to pod through the primary CNI, not redirected"
    );
    eprintln!("node memory with 2 pods: {} MiB", node.memory_mib());

    // A crash of the process that brought it up: only the state file is left to go by.
    let name = node.name.clone();
    let (root, host) = node.abandon();
    let start = Instant::now();
    testkit::node::teardown(&root).unwrap_or_else(|e| panic!("teardown from {}: {e}", root.display()));
    eprintln!("teardown from the state file in {:.1?}", start.elapsed());
    let left = testkit::node::leftovers(&root, &name);
    assert!(left.is_empty(), "left behind: {left:#?}");
    assert_eq!(host.changes(), Vec::<String>::new(), "the host is as it was");
}

/// `kong-mesh-cni install` on the host, with the environment the DaemonSet gives it and
/// hostPath mounts that are the node's own dirs; returns once its ready file is written.
async fn start_installer(node: &Node, client: &Client) -> Installer {
    let sa_dir = node.root.join("installer-sa");
    std::fs::create_dir_all(&sa_dir).unwrap();
    let (token, ca) = service_account_token(client, node, "kube-system", "kong-mesh-cni").await;
    std::fs::write(sa_dir.join("token"), token).unwrap();
    std::fs::write(sa_dir.join("ca.crt"), ca).unwrap();
    let ready = node.root.join("installer-ready");
    let p = |p: &Path| p.to_string_lossy().into_owned();
    // The chart's default template with the plugin's run dir under the node's root, as
    // the chart's `cni.runDir` puts it: the host's /run/kong-mesh-cni stays untouched.
    let mut template: Value = serde_json::from_str(installer::template::DEFAULT_TEMPLATE).unwrap();
    template["run_dir"] = json!(node.root.join("run/kong-mesh-cni"));
    let env = [
        ("CNI_NETWORK_CONFIG", template.to_string()),
        ("KUBERNETES_SERVICE_HOST", node.node_ip.to_string()),
        ("KUBERNETES_SERVICE_PORT", node.api_port.to_string()),
        ("CNI_NET_DIR", p(&node.cni_net_dir)),
        ("MOUNTED_CNI_NET_DIR", p(&node.cni_net_dir)),
        ("MOUNTED_CNI_BIN_DIR", p(&node.cni_bin_dir)),
        ("KMC_SECONDARY_BIN_DIR", p(&node.root.join("secondary-bin"))),
        ("KUBE_CA_FILE", p(&sa_dir.join("ca.crt"))),
        ("KUBE_SERVICE_ACCOUNT_TOKEN_PATH", p(&sa_dir.join("token"))),
        ("CNI_READY_FILE", p(&ready)),
        ("KMC_HEALTH_PORT", "0".into()),
        ("KMC_LOG_SOCKET", p(&node.root.join("run/kong-mesh-cni/log.sock"))),
        // No DaemonSet runs this installer: its SIGTERM stands for an uninstall.
        (UNINSTALL.0, UNINSTALL.1.into()),
    ];
    let installer = Installer::spawn(Path::new(BINARY), &["install"], env.map(|(k, v)| (k.to_string(), v.to_string())));
    let up = wait_for(Duration::from_secs(30), || ready.exists());
    assert!(up.is_some(), "installer not ready in 30s:\n{}", installer.log());
    installer
}

/// ServiceAccount `namespace/name` with the chart's ClusterRole (get pods), and a bound
/// token for it (TokenRequest) with the cluster CA: what the kubelet projects.
async fn service_account_token(client: &Client, node: &Node, namespace: &str, name: &str) -> (String, String) {
    let role: ClusterRole = serde_json::from_value(json!({
        "metadata": { "name": name },
        "rules": [{ "apiGroups": [""], "resources": ["pods"], "verbs": ["get"] }],
    }))
    .unwrap();
    Api::<ClusterRole>::all(client.clone()).create(&PostParams::default(), &role).await.unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": { "name": name },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name },
        "subjects": [{ "kind": "ServiceAccount", "name": name, "namespace": namespace }],
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(client.clone()).create(&PostParams::default(), &binding).await.unwrap();
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let sa: ServiceAccount = serde_json::from_value(json!({ "metadata": { "name": name } })).unwrap();
    sas.create(&PostParams::default(), &sa).await.unwrap();
    let request = TokenRequest {
        spec: Some(TokenRequestSpec { expiration_seconds: Some(3600), ..Default::default() }),
        ..Default::default()
    };
    let token = sas
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .unwrap()
        .token
        .expect("a token");
    let ca = std::fs::read_to_string(node.root.join("pki/ca.crt")).unwrap();
    (token, ca)
}

fn chained(conflist: &Path) -> bool {
    let list: Value = serde_json::from_str(&std::fs::read_to_string(conflist).unwrap_or_default()).unwrap_or_default();
    list["plugins"].as_array().is_some_and(|p| p.iter().any(|p| p["type"] == "kong-mesh-cni"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_pod_under_our_chained_plugin_is_redirected_and_the_node_stays_ready() {
    if testkit::skip_privileged("node tests") {
        return;
    }
    let _one = ONE_NODE_AT_A_TIME.lock().await;
    let node = up(NodeOptions { kong_mesh_cni: Some(BINARY.into()), ..NodeOptions::default() }).await;
    let client = node.client().await.unwrap();
    let primary = std::fs::read_to_string(&node.conflist).unwrap();

    let start = Instant::now();
    let mut installer = start_installer(&node, &client).await;
    eprintln!("installer ready in {:.1?}", start.elapsed());
    let kubelet_log_at_chaining = node.log("kubelet").len();
    assert!(
        chained(&node.conflist),
        "our entry in the node's conflist:\n{}",
        std::fs::read_to_string(&node.conflist).unwrap()
    );
    assert!(node.cni_bin_dir.join("kong-mesh-cni").is_file(), "the plugin binary in the node's CNI bin dir");

    let (target, took) =
        run_pod(&client, &node, plain_pod("target", &node, vec![container("serve", &["serve", "8080"])])).await;
    eprintln!("plain pod Ready in {took:.1?} (our plugin chained)");
    let target_addr = format!("{}:8080", pod_ip(&target));

    let (mesh, took) = run_pod_or(&client, &node, mesh_pod("mesh", &node, &target_addr, Validator::TOOLS), &|| {
        format!(
            "--- installer (and the plugin's lines)\n{}--- validator\n{}",
            installer.log(),
            container_logs(&node, "kuma-validation")
        )
    })
    .await;
    eprintln!("mesh pod Ready in {took:.1?} (validator passed as its init container)");
    node_pods::assert_validator_passed(&mesh);

    // The app's connection to another pod lands on the sidecar, with its original destination.
    let line = log_line(&client, "mesh", "app", "->").await;
    assert_eq!(line, node_pods::redirected_line(&target_addr));
    // A non-mesh pod is untouched.
    let (_, _) =
        run_pod(&client, &node, plain_pod("plain", &node, vec![container("app", &["dial", &target_addr])])).await;
    let line = log_line(&client, "plain", "app", "->").await;
    assert_eq!(line, format!("dial {target_addr} -> serve port=8080"));

    // containerd calls the chain's STATUS every ~5 s; ours must keep the network ready.
    let start = Instant::now();
    let nodes = Api::<KubeNode>::all(client.clone());
    while start.elapsed() < Duration::from_secs(15) {
        let n = nodes.get(&node.name).await.unwrap();
        assert!(node_ready(&n), "node NotReady with our plugin chained: {:#?}", n.status.and_then(|s| s.conditions));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let since_chained = &node.log("kubelet")[kubelet_log_at_chaining..];
    assert!(
        !since_chained.contains("network not ready"),
        "the runtime's network went not ready:\n{}",
        tail(since_chained, 30)
    );
    eprintln!("node memory with 3 pods: {} MiB", node.memory_mib());

    let status = installer.terminate();
    assert!(status.success(), "{status}; log:\n{}", installer.log());
    assert_eq!(
        std::fs::read_to_string(&node.conflist).unwrap(),
        primary,
        "the primary conflist restored byte for byte"
    );
    let took = node.down_leaving_the_host_as_it_was();
    eprintln!("teardown in {took:.1?}");
}
