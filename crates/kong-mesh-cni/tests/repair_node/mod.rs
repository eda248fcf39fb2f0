//! A node for in-place repair, shared by `tests/repair_in_place.rs` and
//! `benches/repair_in_place.rs`: a private API server (it gets paused), the installer
//! running as its ServiceAccount with the chart's pod rules, a bridge chain with
//! host-local IPAM as the primary CNI's conflist, and libcni reading the node's net dir.

#![allow(dead_code)] // each of the two users needs a different part

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use serde_json::json;
use testkit::net::NamedNetns;
use testkit::{ApiServer, Attachment, CniRuntime, Plugins, TestNamespace, policy_rule};

use crate::installer_host::{Host, Installer, wait_for};

const STARTUP: Duration = Duration::from_secs(30);

pub struct RepairNode {
    pub runtime: tokio::runtime::Runtime,
    pub ns: TestNamespace,
    pub installer: Installer,
    pub cni: CniRuntime,
    pub run_dir: PathBuf,
    pub host: Host,
    /// Owns the primary chain's bridge and IPAM state.
    _primary: CniRuntime,
    /// Last: the namespace's cleanup needs it.
    pub api: ApiServer,
}

impl RepairNode {
    /// The installer's ServiceAccount may do `verbs` on pods.
    pub fn new(verbs: &[&str]) -> RepairNode {
        // A private server: pausing it must not stall other tests.
        let api = ApiServer::start(&[]);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let host = Host::new();
        let run_dir = host.root.path().join("run");
        let primary = CniRuntime::bridge(Plugins::Upstream);
        let mut conflist = primary.conflist();
        conflist["name"] = json!("k8s-pod-network");
        std::fs::write(host.net_file("10-bridge.conflist"), serde_json::to_string_pretty(&conflist).unwrap()).unwrap();
        let (ns, projected) = runtime.block_on(async {
            let ns = api.namespace("kmc-inplace").await;
            let creds = tempfile::tempdir().unwrap();
            let projected = api.project_service_account(ns.name(), "kong-mesh-cni", creds.path()).await;
            ns.grant("kong-mesh-cni", "kong-mesh-cni", vec![policy_rule(&[""], &["pods"], verbs)]).await;
            host.rotate_token(
                &std::fs::read_to_string(&projected.token_file).unwrap(),
                &std::fs::read(&projected.ca_file).unwrap(),
            );
            (ns, projected)
        });
        let template = json!({
            "cniVersion": "0.3.1", "name": "kuma-cni", "type": "kong-mesh-cni", "log_level": "debug",
            "run_dir": run_dir, "log_socket": host.log_socket(), "log_file": host.root.path().join("cni.log"),
            "kubernetes": {"kubeconfig": "__KUBECONFIG_FILEPATH__", "lookup_timeout_ms": 1000},
        })
        .to_string();
        let net_dir = host.net.to_string_lossy().into_owned();
        let installer = Installer::start(
            &host,
            &[
                ("KUBERNETES_SERVICE_HOST", &projected.host),
                ("KUBERNETES_SERVICE_PORT", &projected.port),
                ("CNI_NETWORK_CONFIG", &template),
                ("CNI_NET_DIR", &net_dir),
                ("KMC_RUN_DIR", &run_dir.to_string_lossy()),
                ("CNI_LOG_LEVEL", "debug"),
            ],
        );
        assert!(wait_for(STARTUP, || host.ready.exists()).is_some(), "not ready; log:\n{}", installer.log());
        let mut cni = CniRuntime::net_dir(&host.net, vec![Plugins::Upstream.dir()]);
        cni.prepend_plugin_dir(&host.bin);
        RepairNode { runtime, ns, installer, cni, run_dir, host, _primary: primary, api }
    }

    pub fn create_pod(&self, pod: Pod) -> Pod {
        self.runtime.block_on(self.ns.create_pod(pod))
    }

    /// A sandbox for `pod`, as the runtime names it to ADD (the pod's own UID).
    pub fn attach(&self, pod: &Pod, tag: &str) -> (NamedNetns, Attachment) {
        let netns = NamedNetns::new(tag);
        let mut a = Attachment::new(&netns, self.ns.name(), pod.metadata.name.as_deref().unwrap());
        a.pod_uid = pod.metadata.uid.clone().unwrap();
        (netns, a)
    }

    pub fn pending(&self) -> Vec<PathBuf> {
        records(&self.run_dir.join("pending"))
    }

    /// Stops the API server until the returned guard is dropped (also on a panic).
    pub fn pause(&self) -> Resume<'_> {
        self.api.pause();
        Resume(&self.api)
    }
}

/// Resumes the API server when dropped.
pub struct Resume<'a>(&'a ApiServer);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        self.0.resume();
    }
}

/// Our chains in a namespace, both backends and families (empty: none).
pub fn our_rules(ns: &NamedNetns) -> String {
    ["iptables-nft-save", "iptables-legacy-save", "ip6tables-nft-save", "ip6tables-legacy-save"]
        .iter()
        .map(|tool| ns.exec(tool, &[]))
        .collect::<String>()
        .lines()
        .filter(|l| l.contains("KUMA_MESH"))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn records(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
}
