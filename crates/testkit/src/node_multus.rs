//! Multus v4 (scripts/cnis-build.sh) in front of the node's bridge network, as
//! OpenShift runs it: Multus's file is the node's first CNI configuration, the bridge
//! conflist is the cluster default network it delegates every pod's `eth0` to (kept,
//! as OpenShift keeps OVN-Kubernetes', under `/run/multus/cni/net.d`), and the
//! NetworkAttachmentDefinitions a pod names in `k8s.v1.cni.cncf.io/networks` are
//! attached after it as `net1`, `net2`... A NAD without a config of its own is the
//! network of that name in Multus's conf dir (`/etc/cni/multus/net.d`): where our
//! chart's defaults write `kuma-cni.conf`. Every path lies under the node's root, so the
//! teardown removes it all.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::{Value, json};

use crate::node::{Node, NodeError, cnis_bin_dir};
use crate::node_pods::{Validator, mesh_pod};
use crate::repo_root;

/// The pod annotation Multus reads the extra networks from.
pub const NETWORKS_ANNOTATION: &str = "k8s.v1.cni.cncf.io/networks";
/// The pod annotation Multus writes every attachment's result into.
pub const NETWORK_STATUS_ANNOTATION: &str = "k8s.v1.cni.cncf.io/network-status";
const NAD_CRD: &str = "network-attachment-definitions.k8s.cni.cncf.io";
/// Our NAD and network: the name Kong Mesh's injector asks Multus for.
pub const NETWORK: &str = "kuma-cni";
/// The image of the multus-daemon pod (its static binary alone).
pub const MULTUS_IMAGE: &str = "kmc.test/multus:1";

/// Multus as installed on a node.
#[derive(Debug, Clone)]
pub struct Multus {
    /// Multus's own conf dir: a NAD without a config names a network in here (the
    /// chart's `cni.netDir` for Multus).
    pub conf_dir: PathBuf,
    /// Multus's file, the node's first CNI configuration.
    pub conf: PathBuf,
    /// The cluster default network every pod gets as `eth0` (the node's bridge).
    pub cluster_network: PathBuf,
}

impl Node {
    /// Installs thin Multus (the `multus` binary, run by the runtime as the node's CNI)
    /// in front of the node's bridge network, with the NAD CRD in the API server.
    pub async fn install_multus_thin(&self) -> Result<Multus, NodeError> {
        self.install_nad_crd().await?;
        let multus = Multus {
            conf_dir: self.root.join("etc/cni/multus/net.d"),
            conf: self.cni_net_dir.join("00-multus.conf"),
            cluster_network: self.root.join("run/multus/cni/net.d").join(file_name(&self.conflist)),
        };
        for dir in [&multus.conf_dir, parent(&multus.cluster_network)] {
            std::fs::create_dir_all(dir).map_err(|e| NodeError::io(dir, e))?;
        }
        std::fs::copy(&self.conflist, &multus.cluster_network).map_err(|e| NodeError::io(&self.conflist, e))?;
        let binary = cnis_bin_dir().join("multus");
        std::fs::copy(&binary, self.cni_bin_dir.join("multus")).map_err(|e| NodeError::io(&binary, e))?;
        // Its own credentials, where OpenShift keeps them (an admin's here: Multus reads
        // pods and NADs and writes the pods' network-status).
        let kubeconfig = self.root.join("etc/kubernetes/cni/net.d/multus.d/multus.kubeconfig");
        std::fs::create_dir_all(parent(&kubeconfig)).map_err(|e| NodeError::io(&kubeconfig, e))?;
        std::fs::copy(&self.kubeconfig, &kubeconfig).map_err(|e| NodeError::io(&self.kubeconfig, e))?;
        let conf = json!({
            "cniVersion": "0.3.1",
            // Named after the node: the runtime's libcni cache files are then the
            // teardown's to sweep.
            "name": format!("{}-multus", self.name),
            "type": "multus",
            "kubeconfig": kubeconfig,
            // The dir, not the file: Multus v4.2.2 re-encodes a .conflist named by
            // path into its own types, which drop host-local's ranges, and every DEL
            // then fails ("no IP ranges specified"); a dir's file is kept as written.
            "clusterNetwork": parent(&multus.cluster_network),
            "confDir": multus.conf_dir,
            "cniDir": self.root.join("var/lib/cni/multus"),
            "binDir": self.cni_bin_dir,
            // As OpenShift's: a pod may name NADs of its own namespace only.
            "namespaceIsolation": true,
            "globalNamespaces": "default",
            // Where Node::log("multus") reads it.
            "logFile": self.root.join("logs/multus.log"),
            "logLevel": "verbose",
        });
        // Written in place, not renamed into the dir: containerd reloads its CNI
        // configuration on a write and ignores a create (which a rename is). It sorts
        // before the bridge conflist, so the runtime (max_conf_num = 1) then uses
        // Multus for every new sandbox.
        let text = serde_json::to_vec_pretty(&conf).expect("JSON");
        std::fs::write(&multus.conf, text).map_err(|e| NodeError::io(&multus.conf, e))?;
        Ok(multus)
    }

    /// Installs thick Multus as upstream's multus-daemonset-thick.yml does, with its
    /// paths under the node's root: `multus-shim` is the node's CNI and hands every
    /// call to `multus-daemon`, a privileged host-network DaemonSet pod in kube-system
    /// that runs the delegates (the bridge, our plugin) chrooted into the host's root
    /// (`chrootDir: /hostroot`). The daemon installs the shim's file itself (a
    /// `multusConfigFile` it copies into the node's conf dir); this returns once that
    /// file is there and the daemon pod runs. Returns the release of its objects too.
    pub async fn install_multus_thick(&self) -> Result<(Multus, crate::node_chart::Release), NodeError> {
        self.install_nad_crd().await?;
        let multus = Multus {
            conf_dir: self.root.join("etc/cni/multus/net.d"),
            conf: self.cni_net_dir.join("00-multus.conf"),
            cluster_network: self.root.join("run/multus/cni/net.d").join(file_name(&self.conflist)),
        };
        let cache = self.root.join("var/lib/cni/multus");
        for dir in [&multus.conf_dir, parent(&multus.cluster_network), &cache] {
            std::fs::create_dir_all(dir).map_err(|e| NodeError::io(dir, e))?;
        }
        std::fs::copy(&self.conflist, &multus.cluster_network).map_err(|e| NodeError::io(&self.conflist, e))?;
        let bins = cnis_bin_dir();
        let shim = bins.join("multus-shim");
        std::fs::copy(&shim, self.cni_bin_dir.join("multus-shim")).map_err(|e| NodeError::io(&shim, e))?;
        let archive = self.root.join("multus-image.tar");
        let daemon = bins.join("multus-daemon");
        crate::node_image::write_archive(
            &archive,
            &[crate::node_image::ImageSpec {
                name: MULTUS_IMAGE,
                files: vec![("/multus-daemon", &daemon)],
                entrypoint: vec!["/multus-daemon"],
            }],
        )?;
        self.ctr(&["images", "import", &archive.to_string_lossy()])?;
        // The runtime's netns dir, a shared mount point (Node::up makes it one): the
        // pods' namespaces made after the daemon started reach its view of the host.
        let netns = self.runtime_netns_dir();
        let host_run = self.root.join("run");
        let in_host_run = |p: &Path| Path::new("/host/run").join(p.strip_prefix(&host_run).expect("under run/"));
        let daemon_conf = json!({
            "chrootDir": "/hostroot",
            "cniVersion": "0.3.1",
            "logLevel": "verbose",
            "logToStderr": true,
            // "auto", as upstream's: the daemon writes the shim's file (00-multus.conf)
            // into the node's conf dir for the primary network it finds in the
            // autoconfig dir, and stays up to keep it so (any other value makes
            // v4.2.2's daemon copy a file and exit).
            "multusConfigFile": "auto",
            "cniConfigDir": "/host/etc/cni/net.d",
            "multusAutoconfigDir": in_host_run(parent(&multus.cluster_network)),
            "socketDir": "/host/run/multus/socket",
            // Where the shim, on the host, finds that socket.
            "daemonSocketDir": host_run.join("multus/socket"),
            // The dir: see install_multus_thin.
            "clusterNetwork": in_host_run(parent(&multus.cluster_network)),
            "confDir": "/etc/cni/multus/net.d",
            "cniDir": "/var/lib/cni/multus",
            "binDir": self.cni_bin_dir,
            "namespaceIsolation": true,
            "globalNamespaces": "default",
        });
        let host_path = |name: &str, path: &Path| json!({ "name": name, "hostPath": { "path": path } });
        let mount = |name: &str, path: &str| json!({ "name": name, "mountPath": path });
        let netns_in_hostroot = format!("/hostroot{}", netns.display());
        let objects = [
            json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": "multus", "namespace": "kube-system" } }),
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": { "name": "multus" },
                "rules": [
                    { "apiGroups": ["k8s.cni.cncf.io"], "resources": ["*"], "verbs": ["*"] },
                    { "apiGroups": [""], "resources": ["pods", "pods/status"], "verbs": ["get", "list", "update", "watch"] },
                    { "apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch", "update"] },
                ],
            }),
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": { "name": "multus" },
                "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "multus" },
                "subjects": [{ "kind": "ServiceAccount", "name": "multus", "namespace": "kube-system" }],
            }),
            json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": { "name": "multus-daemon-config", "namespace": "kube-system" },
                "data": {
                    "daemon-config.json": serde_json::to_string_pretty(&daemon_conf).expect("JSON"),
                },
            }),
            json!({
                "apiVersion": "apps/v1", "kind": "DaemonSet",
                "metadata": { "name": "kube-multus-ds", "namespace": "kube-system" },
                "spec": {
                    "selector": { "matchLabels": { "name": "multus" } },
                    "template": {
                        "metadata": { "labels": { "name": "multus" } },
                        "spec": {
                            "hostNetwork": true, "hostPID": true, "serviceAccountName": "multus",
                            "tolerations": [{ "operator": "Exists", "effect": "NoSchedule" }, { "operator": "Exists", "effect": "NoExecute" }],
                            "terminationGracePeriodSeconds": 1,
                            "containers": [{
                                "name": "kube-multus", "image": MULTUS_IMAGE, "imagePullPolicy": "Never",
                                "command": ["/multus-daemon"],
                                // Go's user lookup without cgo or an /etc/passwd.
                                "env": [{ "name": "USER", "value": "root" }, { "name": "HOME", "value": "/" }],
                                "securityContext": { "privileged": true },
                                "volumeMounts": [
                                    mount("cni", "/host/etc/cni/net.d"),
                                    // Upstream: "the cni bin path must be identical between pod and host".
                                    mount("cnibin", &self.cni_bin_dir.to_string_lossy()),
                                    mount("host-run", "/host/run"),
                                    mount("host-var-lib-cni-multus", "/var/lib/cni/multus"),
                                    mount("multus-daemon-config", "/etc/cni/net.d/multus.d"),
                                    mount("hostroot", "/hostroot"),
                                    // Upstream mounts /hostroot with HostToContainer; this
                                    // host's / is a private mount, so only the netns dir is.
                                    json!({ "name": "netns", "mountPath": netns_in_hostroot, "mountPropagation": "HostToContainer" }),
                                    // And where the daemon itself checks the pod's netns
                                    // (upstream's /run/netns mount: the runtime's dir).
                                    json!({ "name": "netns", "mountPath": netns, "mountPropagation": "HostToContainer" }),
                                    mount("multus-conf-dir", "/etc/cni/multus/net.d"),
                                ],
                            }],
                            "volumes": [
                                host_path("cni", &self.cni_net_dir),
                                host_path("cnibin", &self.cni_bin_dir),
                                host_path("hostroot", Path::new("/")),
                                host_path("host-run", &host_run),
                                host_path("host-var-lib-cni-multus", &cache),
                                host_path("netns", &netns),
                                host_path("multus-conf-dir", &multus.conf_dir),
                                { "name": "multus-daemon-config", "configMap": { "name": "multus-daemon-config" } },
                            ],
                        },
                    },
                },
            }),
        ];
        let stream: String = objects.iter().map(|o| format!("---\n{o}\n")).collect();
        let client = self.client().await?;
        let release = crate::node_chart::Release::apply(&client, &stream).await?;
        // Up: its file installed, its pod Ready, and still so a moment later (a daemon
        // that cannot serve exits after copying the file).
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), "kube-system");
        let params = kube::api::ListParams::default().labels("name=multus");
        let start = Instant::now();
        let mut ready_since: Option<Instant> = None;
        loop {
            let list = pods.list(&params).await.map(|l| l.items).unwrap_or_default();
            let pod = list.first();
            let restarts = pod
                .and_then(|p| p.status.as_ref()?.container_statuses.as_ref()?.first().map(|c| c.restart_count))
                .unwrap_or(0);
            if restarts > 0 || start.elapsed() > Duration::from_secs(90) {
                let name = pod.and_then(|p| p.metadata.name.clone()).unwrap_or_default();
                let previous = kube::api::LogParams { previous: true, ..Default::default() };
                let log = pods.logs(&name, &previous).await.unwrap_or_else(|e| format!("(logs: {e})"));
                return Err(NodeError::Setup(format!(
                    "multus-daemon not up ({restarts} restarts, {:?}); its log:\n{log}\n{}",
                    start.elapsed(),
                    crate::node_pods::tail(&self.log("kubelet"), 20)
                )));
            }
            if multus.conf.exists() && pod.is_some_and(crate::node_pods::pod_ready) {
                let since = *ready_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(2) {
                    return Ok((multus, release));
                }
            } else {
                ready_since = None;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Creates the NetworkAttachmentDefinition CRD (testenv/crds/, as Multus ships it)
    /// and waits until it is served.
    pub async fn install_nad_crd(&self) -> Result<(), NodeError> {
        let path = repo_root().join("testenv/crds/network-attachment-definition.yaml");
        let text = std::fs::read_to_string(&path).map_err(|e| NodeError::io(&path, e))?;
        let crd: CustomResourceDefinition =
            serde_norway::from_str(&text).map_err(|e| NodeError::Setup(format!("{}: {e}", path.display())))?;
        let crds: Api<CustomResourceDefinition> = Api::all(self.client().await?);
        match crds.create(&PostParams::default(), &crd).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(NodeError::Command(format!("creating the NAD CRD: {e}"))),
        }
        let start = Instant::now();
        loop {
            let got = crds.get(NAD_CRD).await.map_err(|e| NodeError::Command(format!("getting the NAD CRD: {e}")))?;
            let conditions = got.status.and_then(|s| s.conditions).unwrap_or_default();
            if conditions.iter().any(|c| c.type_ == "Established" && c.status == "True") {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(NodeError::Timeout(format!("the NAD CRD not Established within 30 s: {conditions:?}")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn parent(path: &Path) -> &Path {
    path.parent().expect("an absolute path under the node's root")
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// A mesh pod as Kong Mesh's injector makes it with the CNI behind Multus: its networks
/// annotation names our NAD (../shared/kuma-reference/injected/pod-34.yaml).
pub fn multus_mesh_pod(name: &str, node: &Node, target: &str, validator: Validator) -> Value {
    let mut pod = mesh_pod(name, node, target, validator);
    pod["metadata"]["annotations"][NETWORKS_ANNOTATION] = json!(NETWORK);
    pod
}

/// Waits up to `timeout` for our NAD in `namespace` (our controller makes it once the
/// namespace is labelled).
pub async fn wait_for_nad(
    client: &kube::Client,
    namespace: &str,
    timeout: Duration,
) -> Result<DynamicObject, NodeError> {
    let nads = nads(client, namespace);
    let start = Instant::now();
    loop {
        if let Ok(Some(nad)) = nads.get_opt(NETWORK).await {
            return Ok(nad);
        }
        if start.elapsed() > timeout {
            return Err(NodeError::Timeout(format!("no NAD {NETWORK} in {namespace} within {timeout:?}")));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The NetworkAttachmentDefinitions of `namespace`.
pub fn nads(client: &kube::Client, namespace: &str) -> Api<DynamicObject> {
    let gvk = kube::api::GroupVersionKind::gvk("k8s.cni.cncf.io", "v1", "NetworkAttachmentDefinition");
    let resource = kube::api::ApiResource::from_gvk_with_plural(&gvk, "network-attachment-definitions");
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// The attachments of a pod's `k8s.v1.cni.cncf.io/network-status` annotation (empty
/// when there is none).
pub fn network_status(pod: &k8s_openapi::api::core::v1::Pod) -> Vec<serde_json::Value> {
    let text = pod.metadata.annotations.as_ref().and_then(|a| a.get(NETWORK_STATUS_ANNOTATION));
    text.and_then(|t| serde_json::from_str::<Vec<serde_json::Value>>(t).ok()).unwrap_or_default()
}
