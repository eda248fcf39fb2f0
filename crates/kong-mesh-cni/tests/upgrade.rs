//! Upgrades without a gap, against a real API server: at SIGTERM the installer asks
//! whether its DaemonSet is going. Still there (a rolling update): the node's files are
//! left byte for byte, and the next installer adopts them without a write. Gone or being
//! deleted (an uninstall): the primary's conflist comes back byte for byte. No answer:
//! everything stays. kill -9 leaves our entry chained, and the next start adopts it.

mod installer_host;

use std::time::Duration;

use installer_host::*;
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use testkit::{ApiServer, TestNamespace, policy_rule};

const STARTUP: Duration = Duration::from_secs(30);
const DAEMONSET: &str = "kong-mesh-cni";

/// The node's files of ours: the conflist, the binary and the kubeconfig, as bytes.
fn node_files(host: &Host) -> [Option<Vec<u8>>; 3] {
    [host.net_file("10-calico.conflist"), host.bin.join("kong-mesh-cni"), host.net_file(KUBECONFIG)]
        .map(|p| std::fs::read(p).ok())
}

struct Node {
    host: Host,
    env: Vec<(String, String)>,
}

impl Node {
    /// A node whose installer runs as ServiceAccount `kong-mesh-cni` of `ns`, with the
    /// chart's rules (get pods; get our DaemonSet), and its namespace in the projected
    /// volume's `namespace` file (what the kubelet writes).
    async fn new(api: &ApiServer, ns: &TestNamespace) -> Node {
        let host = Host::new();
        std::fs::write(host.net_file("10-calico.conflist"), CALICO).unwrap();
        let creds = tempfile::tempdir().unwrap();
        let sa = api.project_service_account(ns.name(), "kong-mesh-cni", creds.path()).await;
        host.rotate_token(&std::fs::read_to_string(&sa.token_file).unwrap(), &std::fs::read(&sa.ca_file).unwrap());
        std::fs::write(host.sa.join("namespace"), ns.name()).unwrap();
        let env = vec![
            ("KUBERNETES_SERVICE_HOST".to_owned(), sa.host.clone()),
            ("KUBERNETES_SERVICE_PORT".to_owned(), sa.port.clone()),
            ("CFGCHECK_INTERVAL".to_owned(), "3600".to_owned()),
        ];
        Node { host, env }
    }

    fn start(&self) -> Installer {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let installer = Installer::start(&self.host, &env);
        assert!(wait_for(STARTUP, || self.host.ready.exists()).is_some(), "not ready:\n{}", installer.log());
        installer
    }
}

async fn grant(ns: &TestNamespace) {
    ns.grant(
        "kong-mesh-cni",
        "kong-mesh-cni",
        vec![policy_rule(&[""], &["pods"], &["get"]), policy_rule(&["apps"], &["daemonsets"], &["get"])],
    )
    .await;
}

/// Our DaemonSet as the chart makes it (no controller runs here: it has no pods).
async fn create_daemonset(ns: &TestNamespace, finalizer: bool) {
    let mut ds: DaemonSet = serde_json::from_value(json!({
        "metadata": {"name": DAEMONSET},
        "spec": {
            "selector": {"matchLabels": {"app": DAEMONSET}},
            "template": {
                "metadata": {"labels": {"app": DAEMONSET}},
                "spec": {"containers": [{"name": "install-cni", "image": "kmc-test/none:0"}]},
            },
        },
    }))
    .unwrap();
    if finalizer {
        ds.metadata.finalizers = Some(vec!["kmc-test/hold".into()]);
    }
    ns.api::<DaemonSet>().create(&PostParams::default(), &ds).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_leaves_the_node_byte_for_byte_and_an_uninstall_restores_it() {
    if testkit::skip_heavy("upgrade without a gap") {
        return;
    }
    let api = ApiServer::shared();
    let ns = api.namespace("kmc-upgrade").await;
    let node = Node::new(api, &ns).await;
    grant(&ns).await;
    create_daemonset(&ns, false).await;

    let mut old = node.start();
    let installed = node_files(&node.host);
    assert!(
        installed.iter().all(Option::is_some) && chained(&node.host.net_file("10-calico.conflist"), "kong-mesh-cni")
    );

    // A rolling update: SIGTERM with the DaemonSet there.
    let status = old.terminate();
    assert!(status.success(), "{status}:\n{}", old.log());
    assert_eq!(node_files(&node.host), installed, "left byte for byte:\n{}", old.log());
    assert!(old.log().contains("is still there"), "{}", old.log());
    assert!(!node.host.ready.exists(), "not ready any more");

    // The new pod adopts it all without writing.
    let mut new = node.start();
    assert_eq!(node_files(&node.host), installed);
    assert!(!new.log().contains("chained our plugin into"), "{}", new.log());

    // kill -9: nothing runs; our entry stays, and the next start adopts it.
    new.signal(libc::SIGKILL);
    new.wait(Duration::from_secs(10)).expect("killed");
    assert_eq!(node_files(&node.host), installed);
    let _ = std::fs::remove_file(&node.host.ready); // a new container's /tmp
    let mut last = node.start();
    assert_eq!(node_files(&node.host), installed, "adopted:\n{}", last.log());

    // The uninstall: the DaemonSet is deleted; the primary's file comes back byte for byte.
    ns.api::<DaemonSet>().delete(DAEMONSET, &DeleteParams::default()).await.unwrap();
    let status = last.terminate();
    assert!(status.success(), "{status}:\n{}", last.log());
    assert!(last.log().contains("is gone"), "{}", last.log());
    assert_eq!(std::fs::read_to_string(node.host.net_file("10-calico.conflist")).unwrap(), CALICO);
    assert_eq!(node_files(&node.host)[1..], [None, None], "binary and kubeconfig removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemonset_being_deleted_is_an_uninstall() {
    if testkit::skip_heavy("upgrade without a gap") {
        return;
    }
    let api = ApiServer::shared();
    let ns = api.namespace("kmc-upgrade-del").await;
    let node = Node::new(api, &ns).await;
    grant(&ns).await;
    // A finalizer holds it while it is being deleted (foreground deletion does the same).
    create_daemonset(&ns, true).await;
    let mut installer = node.start();
    let dss = ns.api::<DaemonSet>();
    dss.delete(DAEMONSET, &DeleteParams::default()).await.unwrap();
    assert!(dss.get(DAEMONSET).await.unwrap().metadata.deletion_timestamp.is_some());

    let status = installer.terminate();
    assert!(status.success(), "{status}:\n{}", installer.log());
    assert!(installer.log().contains("is being deleted"), "{}", installer.log());
    assert_eq!(std::fs::read_to_string(node.host.net_file("10-calico.conflist")).unwrap(), CALICO);
    let release = json!({"metadata": {"finalizers": null}});
    dss.patch(DAEMONSET, &PatchParams::default(), &Patch::Merge(release)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_api_server_cannot_tell_everything_stays() {
    if testkit::skip_heavy("upgrade without a gap") {
        return;
    }
    let api = ApiServer::shared();
    let ns = api.namespace("kmc-upgrade-unknown").await;
    let mut node = Node::new(api, &ns).await;
    // Nothing listens on this port: the question gets no answer.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    node.env[1].1 = closed.to_string();
    let mut installer = node.start();
    let installed = node_files(&node.host);

    let status = installer.terminate();
    assert!(status.success(), "{status}:\n{}", installer.log());
    assert_eq!(node_files(&node.host), installed, "kept byte for byte");
    let log = installer.log();
    assert!(log.contains("cannot tell whether DaemonSet") && log.contains("keeping the chain entry"), "{log}");
}
