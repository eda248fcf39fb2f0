//! eBPF mode on a real node (testkit::node: kubelet, containerd v2, runc), installed
//! from our chart as users install it (`experimental.ebpf.enabled=true`), with the
//! node's own bpffs and its cgroup in the cgroup2 hierarchy as `bpffsPath` and
//! `cgroupPath`: the DaemonSet pod loads and pins the programs and chains the plugin; a
//! Kuma-shaped mesh pod (our validator as its `kuma-validation` init container) is
//! Ready, its app's connection lands on the UID-5678 sidecar with its original
//! destination, and its namespace holds no iptables or nftables rule; a plain pod is
//! untouched; deleting the mesh pod unregisters it; deleting the release detaches and
//! unpins everything and restores the primary conflist byte for byte.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use serde_json::Value;
use testkit::node_chart::{CNI_NAMESPACE, install, plugin_types, uninstall};
use testkit::node_pods::{
    self, Validator, assert_redirected, container, mesh_pod, plain_pod, pod_ip, redirected_line, sandbox_pids,
};
use testkit::{Node, NodeOptions};

const BINARY: &str = env!("CARGO_BIN_EXE_kong-mesh-cni");
const POD_READY: Duration = Duration::from_secs(90);

async fn registered_pods_become(paths: &ebpf::Paths, n: usize, timeout: Duration) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let status = ebpf::status(paths).map_err(|e| e.to_string())?;
        if status.registered_pods == n {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(format!("{} pods registered, not {n}, after {timeout:?}", status.registered_pods));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_mode_from_our_chart_redirects_mesh_pods_under_kubelet_and_containerd() {
    if testkit::skip_privileged("the node eBPF test") {
        return;
    }
    let started = Instant::now();
    let options = NodeOptions { taints: vec!["NodeReadiness:NoSchedule".into()], ..NodeOptions::default() };
    let node = Node::up(options).await.unwrap_or_else(|e| panic!("bringing the node up: {e}"));
    let client = node.client().await.unwrap();
    let (bpffs, cgroup): (PathBuf, PathBuf) = node.ebpf_paths().unwrap_or_else(|e| panic!("{e}"));
    let paths = ebpf::Paths { bpffs: bpffs.clone(), cgroup: cgroup.clone() };
    let primary = std::fs::read_to_string(&node.conflist).unwrap();

    let set = [
        "experimental.ebpf.enabled=true".to_owned(),
        format!("experimental.ebpf.bpffsPath={}", bpffs.display()),
        format!("experimental.ebpf.cgroupPath={}", cgroup.display()),
    ];
    let set: Vec<&str> = set.iter().map(String::as_str).collect();
    let installed = install(&node, &client, Path::new(BINARY), &set, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("installing from the chart in eBPF mode: {e}"));
    eprintln!("apply -> CNI pod Ready in eBPF mode: {:.1?}", installed.apply_to_cni_ready);
    let chained = std::fs::read_to_string(&node.conflist).unwrap();
    assert_eq!(plugin_types(&chained), ["bridge", "portmap", "kong-mesh-cni"], "chained last:\n{chained}");
    let ours: Value = serde_json::from_str(&chained).unwrap();
    assert_eq!(ours["plugins"][2]["ebpf"]["bpffs_path"], bpffs.to_str().unwrap(), "{chained}");
    let status = ebpf::status(&paths).unwrap_or_else(|e| panic!("nothing pinned by the DaemonSet pod: {e}"));
    assert!(status.complete(), "every cgroup program attached: {status:?}");
    assert_eq!(status.registered_pods, 0);

    let installer_log = || node_pods::cni_logs(&node);
    let run_pod = |pod| node_pods::run_pod(&client, &node, pod, POD_READY, &installer_log);
    let (target, _) = run_pod(plain_pod("target", &node, vec![container("serve", &["serve", "8080"])]))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let target_addr = format!("{}:8080", pod_ip(&target));
    let image = installed.image.to_string();
    let (mesh, took) = run_pod(mesh_pod("mesh", &node, &target_addr, Validator::image(&image)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("mesh pod Ready in {took:.1?}");
    node_pods::assert_validator_passed(&mesh);
    assert_redirected(&client, std::slice::from_ref(&mesh), &target_addr).await;
    assert_eq!(ebpf::status(&paths).unwrap().registered_pods, 1, "the mesh pod registered, the plain one not");
    let uid = mesh.metadata.uid.clone().unwrap();
    let pids = sandbox_pids(&node, &uid);
    assert_eq!(pids.len(), 1, "one sandbox for the mesh pod: {pids:?}");
    let (nft, legacy) = node_pods::rules_in(pids[0]);
    assert_eq!(nft.trim(), "", "no nftables (nor iptables-nft) rule in the mesh pod");
    assert!(!legacy.contains("KUMA"), "no legacy iptables rule in the mesh pod:\n{legacy}");

    let (_, _) = run_pod(plain_pod("plain", &node, vec![container("app", &["dial", &target_addr])]))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let line = node_pods::log_line(&client, "default", "plain", "app", &["->"], Duration::from_secs(20)).await.unwrap();
    assert_eq!(line, format!("dial {target_addr} -> serve port=8080"), "the plain pod is untouched");
    assert_ne!(line, redirected_line(&target_addr));

    // The loader's and the plugin's lines in the DaemonSet pod's log (`kubectl logs`).
    let cni_pod = installed.cni_pod.metadata.name.clone().unwrap();
    for needles in [&["eBPF programs loaded and attached"][..], &["default/mesh", "redirect registered (eBPF)"]] {
        let line =
            node_pods::log_line(&client, CNI_NAMESPACE, &cni_pod, "install-cni", needles, Duration::from_secs(20))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        eprintln!("kubectl logs: {line}");
    }

    // DEL unregisters.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.delete("mesh", &DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() }).await.unwrap();
    registered_pods_become(&paths, 0, Duration::from_secs(60)).await.unwrap_or_else(|e| panic!("after DEL: {e}"));

    // Uninstall: the programs detached and unpinned, nothing of ours in the bpffs.
    uninstall(&node, installed.release, &primary).await.unwrap_or_else(|e| panic!("{e}"));
    // The kernel's own iterators (`maps.debug`, `progs.debug`) have a dot, which bpffs
    // refuses in any name we could pin.
    let names = std::fs::read_dir(&bpffs).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned());
    let left: Vec<String> = names.filter(|n| !n.contains('.')).collect();
    assert!(left.is_empty(), "left in the node's bpffs after the uninstall: {left:?}");

    node.down_leaving_the_host_as_it_was();
    eprintln!("whole test {:.1?}", started.elapsed());
}
