//! `kong-mesh-cni controller` as the Deployment runs it: the real binary, configured by
//! environment (the Go implementation's variables for the taint controller), with the
//! identity of a ServiceAccount bound to exactly the chart's RBAC files.

#[path = "../../controller/tests/common/mod.rs"]
mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{Harness, SA, eventually, http_get as get, metric, tainted};
use controller::RepairAction;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use testkit::{ApiServer, pod};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_subcommand_acts_reports_and_stops_cleanly() {
    if testkit::skip_heavy("kong-mesh-cni controller") {
        return;
    }
    let server = ApiServer::shared();
    let h = Harness::new(server).await;
    h.controller_client(server, RepairAction::Delete).await;
    let kubeconfig = server.service_account_kubeconfig(h.ns.name(), SA).await;
    let port = free_port();
    let log = server.dir().join(format!("controller-{}.log", h.ns.name()));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kong-mesh-cni"))
        .arg("controller")
        .env("KUBECONFIG", &kubeconfig)
        .env("KUMA_RUNTIME_KUBERNETES_NODE_TAINT_CONTROLLER_CNI_NAMESPACE", h.ns.name())
        .env("KUMA_RUNTIME_KUBERNETES_NODE_TAINT_CONTROLLER_CNI_APP", "my-cni")
        .env("KMC_LEASE_NAMESPACE", h.ns.name())
        .env("KMC_LEADER_IDENTITY", "the-binary")
        .env("KMC_METRICS_PORT", port.to_string())
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("starting kong-mesh-cni controller");

    let took = eventually("/readyz to answer 200", Duration::from_secs(20), || async {
        get(port, "/readyz").await.is_some_and(|(code, _)| code == 200)
    })
    .await;
    eprintln!("ready {took:?} after start");
    assert_eq!(get(port, "/healthz").await.map(|(code, _)| code), Some(200));

    let admin = &h.admin;
    let node = server.node("kmc-binary", &[]).await;
    eventually("the node to be tainted", Duration::from_secs(5), || tainted(admin, node.name())).await;
    // The CNI pods are found by the app label named in the environment.
    h.ns.create_pod(pod("cni").label("app", "my-cni").node_name(node.name()).build()).await;
    h.ns.set_pod_running("cni", None).await;
    eventually("the taint to go", Duration::from_secs(2), || async { !tainted(admin, node.name()).await }).await;

    let (code, metrics) = get(port, "/metrics").await.expect("/metrics answers");
    assert_eq!(code, 200);
    assert_eq!(metric(&metrics, "kong_mesh_cni_controller_leader"), 1, "{metrics}");
    assert_eq!(metric(&metrics, "kong_mesh_cni_controller_taint_changes_total{change=\"add\"}"), 1, "{metrics}");
    assert_eq!(metric(&metrics, "kong_mesh_cni_controller_taint_changes_total{change=\"remove\"}"), 1, "{metrics}");
    assert!(!metrics.contains("kind=\"403\""), "{metrics}");

    // SIGTERM (a rolling update): exit 0, the Lease given up for the next replica.
    let pid = child.id().expect("running") as libc::pid_t;
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.expect("exit within 10s").unwrap();
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}; log:\n{logs}");
    let lease = Api::<Lease>::namespaced(admin.clone(), h.ns.name()).get("kong-mesh-cni-controller").await.unwrap();
    assert_eq!(lease.spec.and_then(|s| s.holder_identity), None);
    // A refusal shows as its reason word; a bare "403" also matches timestamps (.403029Z).
    assert!(!logs.contains("Forbidden") && !logs.contains("forbidden"), "{logs}");
    assert!(logs.contains("released the lease"), "{logs}");
}
