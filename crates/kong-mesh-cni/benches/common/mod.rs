//! What the plugin benchmarks share: a mesh pod `web` in a fresh namespace of the real
//! API server, read through a `get pods`-only service account, and the chain of bridge,
//! host-local and portmap with ours appended.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use testkit::{ApiServer, CniRuntime, Plugins, TestNamespace, pod, policy_rule};

const BIN: &str = env!("CARGO_BIN_EXE_kong-mesh-cni");

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub struct MeshPod {
    pub ns: TestNamespace,
    kubeconfig: PathBuf,
    scratch: tempfile::TempDir,
}

impl MeshPod {
    pub async fn new(prefix: &str) -> Self {
        let api = ApiServer::shared();
        let ns = api.namespace(prefix).await;
        let kubeconfig = api.service_account_kubeconfig(ns.name(), "kong-mesh-cni").await;
        ns.grant("kong-mesh-cni", "plugin", vec![policy_rule(&[""], &["pods"], &["get"])]).await;
        ns.create_pod(
            pod("web")
                .container("app")
                .container("kuma-sidecar")
                .annotation("kuma.io/sidecar-injected", "true")
                .build(),
        )
        .await;
        MeshPod { ns, kubeconfig, scratch: tempfile::tempdir().unwrap() }
    }

    /// The primary chain with ours appended, on the given backend.
    pub fn chain_with_ours(&self, backend: &str) -> CniRuntime {
        let mut rt = CniRuntime::bridge(Plugins::Upstream);
        rt.prepend_plugin_dir(Path::new(BIN).parent().unwrap());
        let mut conflist = rt.conflist();
        let scratch = self.scratch.path();
        conflist["plugins"].as_array_mut().unwrap().push(json!({
            "type": "kong-mesh-cni",
            "log_level": "info",
            "log_file": scratch.join("cni.log"),
            "log_socket": scratch.join("none.sock"),
            "run_dir": scratch.join("run"),
            "iptables_backend": backend,
            "kubernetes": {"kubeconfig": self.kubeconfig},
        }));
        rt.set_conflist(&conflist);
        rt
    }
}
