//! Helpers shared by the plugin tests: our plugin's chain entry and a namespace with
//! the DaemonSet's narrow identity.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use testkit::net::NamedNetns;
use testkit::{ApiServer, TestNamespace, policy_rule};

pub const BIN: &str = env!("CARGO_BIN_EXE_kong-mesh-cni");

/// Our plugin entry, as the installer's template renders it, with test paths.
pub fn our_entry(kubeconfig: &Path, scratch: &Path, extra: Value) -> Value {
    let mut entry = json!({
        "type": "kong-mesh-cni",
        "name": "kong-mesh-cni",
        "log_level": "debug",
        "log_socket": scratch.join("log.sock"),
        "log_file": scratch.join("cni.log"),
        "run_dir": scratch.join("run"),
        "kubernetes": {"kubeconfig": kubeconfig, "exclude_namespaces": ["kube-system"]},
    });
    for (k, v) in extra.as_object().unwrap() {
        entry[k] = v.clone();
    }
    entry
}

pub struct Fixture {
    pub ns: TestNamespace,
    pub kubeconfig: PathBuf,
    pub scratch: tempfile::TempDir,
}

/// A namespace, and a kubeconfig for the DaemonSet's identity with only `get pods`.
pub async fn fixture() -> Fixture {
    let api = ApiServer::shared();
    let ns = api.namespace("kmc-plugin").await;
    let kubeconfig = api.service_account_kubeconfig(ns.name(), "kong-mesh-cni").await;
    ns.grant("kong-mesh-cni", "kong-mesh-cni-plugin", vec![policy_rule(&[""], &["pods"], &["get"])]).await;
    Fixture { ns, kubeconfig, scratch: tempfile::tempdir().unwrap() }
}

/// Our chains and rules in a namespace, both backends and families (empty: none).
pub fn saved_rules(ns: &NamedNetns) -> String {
    ["iptables-nft-save", "iptables-legacy-save", "ip6tables-nft-save", "ip6tables-legacy-save"]
        .iter()
        .map(|tool| ns.exec(tool, &[]))
        .collect::<String>()
        .lines()
        .filter(|l| l.starts_with("-A") || l.starts_with(":KUMA"))
        .collect::<Vec<_>>()
        .join("\n")
}
