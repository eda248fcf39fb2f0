//! What the plugin benchmarks share: a mesh pod `web` on a node of its own in a fresh
//! namespace of the real API server, read through a `get pods`-only service account;
//! the installer as that node's agent; and the chain of bridge, host-local and portmap
//! with ours appended, asking the agent first or the API server only.

#![allow(dead_code)] // each benchmark needs a different part

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use testkit::{ApiServer, Attachment, CniRuntime, NamedNetns, Plugins, TestNamespace, pod, policy_rule};

use crate::agent_node::NodeAgent;

const BIN: &str = env!("CARGO_BIN_EXE_kong-mesh-cni");

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// How the plugin learns what the pod is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Lookup {
    /// The node agent answers (its socket is in the plugin's run dir).
    Agent,
    /// No agent in the run dir: a GET to the API server, as before the agent.
    Direct,
}

impl Lookup {
    pub fn name(self) -> &'static str {
        match self {
            Lookup::Agent => "agent",
            Lookup::Direct => "direct GET",
        }
    }
}

pub struct MeshPod {
    pub ns: TestNamespace,
    pub uid: String,
    pub agent: NodeAgent,
    kubeconfig: PathBuf,
    scratch: tempfile::TempDir,
}

impl MeshPod {
    pub async fn new(prefix: &str) -> Self {
        let api = ApiServer::shared();
        let ns = api.namespace(prefix).await;
        let kubeconfig = api.service_account_kubeconfig(ns.name(), "kong-mesh-cni").await;
        ns.grant("kong-mesh-cni", "plugin", vec![policy_rule(&[""], &["pods"], &["get"])]).await;
        let node = format!("kmc-bench-node-{}", testkit::unique_suffix());
        let created = ns
            .create_pod(
                pod("web")
                    .container("app")
                    .container("kuma-sidecar")
                    .annotation("kuma.io/sidecar-injected", "true")
                    .node_name(&node)
                    .build(),
            )
            .await;
        let uid = created.metadata.uid.expect("a created pod has a UID");
        let scratch = tempfile::tempdir().unwrap();
        let agent = NodeAgent::start(api, ns.name(), &node, &scratch.path().join("agent-run"), None).await;
        agent.wait_known(ns.name(), "web", &uid, Duration::from_secs(60));
        MeshPod { ns, uid, agent, kubeconfig, scratch }
    }

    /// The runtime's view of a sandbox of `web`: a fresh container ID, the pod's UID.
    pub fn attachment(&self, netns: &NamedNetns) -> Attachment {
        let mut a = Attachment::new(netns, self.ns.name(), "web");
        a.pod_uid = self.uid.clone();
        a
    }

    /// The primary chain with ours appended, on the given backend, with the lookup asked.
    pub fn chain_with_ours(&self, backend: &str, lookup: Lookup) -> CniRuntime {
        let mut rt = CniRuntime::bridge(Plugins::Upstream);
        rt.prepend_plugin_dir(Path::new(BIN).parent().unwrap());
        let scratch = self.scratch.path();
        let run_dir = match lookup {
            Lookup::Agent => self.agent.run_dir.clone(),
            Lookup::Direct => scratch.join("run"),
        };
        rt.append_plugin(json!({
            "type": "kong-mesh-cni",
            "log_level": "info",
            "log_file": scratch.join("cni.log"),
            "log_socket": scratch.join("none.sock"),
            "run_dir": run_dir,
            "iptables_backend": backend,
            "kubernetes": {"kubeconfig": self.kubeconfig},
        }));
        rt
    }

    /// The same chain with ours in eBPF mode, registering pods with the programs
    /// pinned in `bpffs`.
    pub fn chain_in_ebpf_mode(&self, lookup: Lookup, bpffs: &Path) -> CniRuntime {
        let rt = self.chain_with_ours("auto", lookup);
        let mut conflist = rt.conflist();
        let ours = conflist["plugins"].as_array_mut().unwrap().last_mut().unwrap();
        ours["ebpf"] = json!({"bpffs_path": bpffs});
        rt.set_conflist(&conflist);
        rt
    }
}
