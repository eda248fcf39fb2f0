//! The installer as a node agent against the real API server: its own service account
//! (projected as the kubelet would), allowed to get, list and watch pods cluster-wide
//! as the chart's ClusterRole allows (or in one namespace, as under the chart's
//! `namespaceAllowList`), on a node of its own name. Shared by
//! `tests/agent.rs` and the plugin benchmarks (which include it with `#[path]`, next to
//! `installer_host`).

#![allow(dead_code)] // each user needs a different part

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cni::plugin::ask::{self, Asked};
use k8s_openapi::api::rbac::v1::PolicyRule;
use serde_json::json;
use testkit::{ApiServer, ClusterGrant, TestNamespace, policy_rule};

use crate::installer_host::{CALICO, Host, Installer, KUBECONFIG};

pub const AGENT_SA: &str = "kmc-agent";

pub struct NodeAgent {
    pub node: String,
    /// The plugin's run dir; the agent's socket is in it.
    pub run_dir: PathBuf,
    /// Before `host`: fields drop in order, and the installer must be gone before its
    /// dirs are removed (it would write into them meanwhile).
    pub installer: Installer,
    pub host: Host,
    /// The API server's address as the installer was given it.
    pub server: (String, String),
    /// The installer's environment beyond the host's (`kong-mesh-cni status` needs it too).
    pub env: Vec<(String, String)>,
    /// `None`: the grant is a Role in the test's namespace, gone with it.
    _grant: Option<ClusterGrant>,
    _creds: tempfile::TempDir,
}

impl NodeAgent {
    /// Starts the installer on node `node` (a name only: pods are bound to it by their
    /// spec.nodeName), with the plugin's run dir `run_dir` in its template (the socket
    /// goes where the plugin looks, derived as in production). `via` replaces the API
    /// server's port (a proxy in front of it).
    pub async fn start(api: &ApiServer, namespace: &str, node: &str, run_dir: &Path, via: Option<u16>) -> NodeAgent {
        NodeAgent::start_with(api, namespace, node, run_dir, via, &[]).await
    }

    /// [`NodeAgent::start`] with more of the installer's environment (which wins).
    pub async fn start_with(
        api: &ApiServer,
        namespace: &str,
        node: &str,
        run_dir: &Path,
        via: Option<u16>,
        extra: &[(&str, &str)],
    ) -> NodeAgent {
        let grant = ClusterGrant::new(api, namespace, AGENT_SA, agent_rules()).await;
        NodeAgent::launch(api, namespace, node, run_dir, via, Some(grant), extra).await
    }

    /// As [`NodeAgent::start`], but allowed to read pods in `ns` only (a Role there, as
    /// the chart's `namespaceAllowList` grants) and told so, as the chart tells it.
    pub async fn start_allowed_in(api: &ApiServer, ns: &TestNamespace, node: &str, run_dir: &Path) -> NodeAgent {
        ns.grant(AGENT_SA, "kmc-agent-pods", agent_rules()).await;
        NodeAgent::launch(api, ns.name(), node, run_dir, None, None, &[("KMC_AGENT_NAMESPACES", ns.name())]).await
    }

    async fn launch(
        api: &ApiServer,
        namespace: &str,
        node: &str,
        run_dir: &Path,
        via: Option<u16>,
        grant: Option<ClusterGrant>,
        extra: &[(&str, &str)],
    ) -> NodeAgent {
        let creds = tempfile::tempdir().unwrap();
        let projected = api.project_service_account(namespace, AGENT_SA, creds.path()).await;
        let host = Host::new();
        host.rotate_token(
            &std::fs::read_to_string(&projected.token_file).unwrap(),
            &std::fs::read(&projected.ca_file).unwrap(),
        );
        std::fs::write(host.net_file("10-calico.conflist"), CALICO).unwrap();
        let port = via.map(|p| p.to_string()).unwrap_or(projected.port.clone());
        let template = json!({
            "cniVersion": "0.3.1", "name": "kuma-cni", "type": "kong-mesh-cni",
            "run_dir": run_dir,
            "kubernetes": {"kubeconfig": "__KUBECONFIG_FILEPATH__"},
        })
        .to_string();
        let run_dir_text = run_dir.to_string_lossy();
        let mut env = vec![
            ("KUBERNETES_SERVICE_HOST", projected.host.as_str()),
            ("KUBERNETES_SERVICE_PORT", &port),
            ("NODE_NAME", node),
            ("CNI_NETWORK_CONFIG", &template),
            // The run dir as the installer sees it: the template's (one dir, as in the chart).
            ("KMC_RUN_DIR", &run_dir_text),
            ("CFGCHECK_INTERVAL", "3600"),
        ];
        env.extend_from_slice(extra);
        let installer = Installer::start(&host, &env);
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        NodeAgent {
            node: node.to_owned(),
            run_dir: run_dir.to_owned(),
            host,
            installer,
            server: (projected.host, port),
            env,
            _grant: grant,
            _creds: creds,
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.run_dir.join(cni::agent::SOCKET_NAME)
    }

    /// The kubeconfig the installer writes for the plugin (its own identity, the
    /// server as it was given).
    pub fn plugin_kubeconfig(&self) -> PathBuf {
        self.host.net_file(KUBECONFIG)
    }

    /// The agent's answer for a pod, as the plugin gets it.
    pub fn ask(&self, namespace: &str, name: &str, uid: Option<&str>) -> Asked {
        ask::pod(&self.socket(), namespace, name, uid)
    }

    /// Waits until the agent answers with this pod; panics with its log after `within`.
    pub fn wait_known(&self, namespace: &str, name: &str, uid: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            match self.ask(namespace, name, Some(uid)) {
                Asked::Found(..) => return,
                Asked::Miss(why) | Asked::Unreachable(why) if Instant::now() > deadline => {
                    panic!(
                        "the agent does not know {namespace}/{name} after {within:?}: {why}\nlog:\n{}",
                        self.installer.log()
                    )
                }
                Asked::Miss(_) | Asked::Unreachable(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// What the chart's role lets the agent do: read pods, and say things on them.
fn agent_rules() -> Vec<PolicyRule> {
    vec![
        policy_rule(&[""], &["pods"], &["get", "list", "watch"]),
        policy_rule(&[""], &["events"], &["create", "patch"]),
    ]
}
