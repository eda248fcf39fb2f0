//! Our CNI installed on the node as a user installs it: the image written by
//! `scripts/image-build.sh` imported into the node's containerd, the chart rendered by
//! `kong-mesh-cni manifests` with values for this node, and every object applied to the
//! node's API server (server-side apply, in the stream's order, which is Helm's install
//! order); uninstalled by deleting them all in the reverse order, as `helm uninstall`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use kube::discovery::{Scope, pinned_kind};
use serde_json::json;

use crate::node::{Node, NodeError};
use crate::node_pods::pod_ready;
use crate::repo_root;

/// Namespace of the chart's DaemonSet and controller (the chart's default).
pub const CNI_NAMESPACE: &str = "kube-system";
/// The label of the DaemonSet's pods.
pub const CNI_SELECTOR: &str = "app=kong-mesh-cni";
const FIELD_MANAGER: &str = "kmc-node";

/// Writes our image with `scripts/image-build.sh --binary BINARY` as an OCI layout into
/// `out`; returns the layout's dir.
pub fn build_image(binary: &Path, out: &Path) -> Result<PathBuf, NodeError> {
    let script = repo_root().join("scripts/image-build.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg("--binary")
        .arg(binary)
        .arg("--out")
        .arg(out)
        // Fast compression: the tests' debug binaries are 100 MB (11 s of CPU at 9).
        .env("KMC_IMAGE_GZIP", "1")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NodeError::Command(format!("{}: {e}", script.display())))?;
    if !output.status.success() {
        return Err(NodeError::Command(format!(
            "{} failed ({}): {}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(out.to_path_buf())
}

/// An image reference split as the chart's `cni.image.*` values take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub registry: String,
    pub repository: String,
    pub tag: String,
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}:{}", self.registry, self.repository, self.tag)
    }
}

impl Node {
    /// Imports the OCI layout `layout` (one image, tagged by its index's
    /// `org.opencontainers.image.ref.name`, as image-build.sh writes it) under
    /// `registry/repository`, and returns the reference the runtime now knows it by.
    pub fn import_image(&self, layout: &Path, registry: &str, repository: &str) -> Result<ImageRef, NodeError> {
        let index_path = layout.join("index.json");
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&index_path).map_err(|e| NodeError::io(&index_path, e))?)
                .map_err(|e| NodeError::Setup(format!("{}: {e}", index_path.display())))?;
        let tag = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .ok_or_else(|| NodeError::Setup(format!("{}: no ref.name annotation", index_path.display())))?
            .to_string();
        let archive = self.root.join(format!("{repository}.oci.tar"));
        let file = std::fs::File::create(&archive).map_err(|e| NodeError::io(&archive, e))?;
        let mut tar = tar::Builder::new(file);
        tar.append_dir_all(".", layout).map_err(|e| NodeError::io(layout, e))?;
        tar.finish().map_err(|e| NodeError::io(&archive, e))?;
        let base = format!("{registry}/{repository}");
        self.ctr(&["images", "import", "--base-name", &base, &archive.to_string_lossy()])?;
        let image = ImageRef { registry: registry.into(), repository: repository.into(), tag };
        let known = self.ctr(&["images", "ls", "-q"])?;
        if !known.lines().any(|l| l == image.to_string()) {
            return Err(NodeError::Setup(format!("imported {}, but containerd knows only:\n{known}", image)));
        }
        Ok(image)
    }

    /// The chart's values for this node (the preset a user would write): chained into
    /// the node's primary conflist in its own CNI dirs, the plugin's run dir under the
    /// node's root, our image as imported (never pulled), readiness from the ready file
    /// (no fixed port on the host), the taint controller on.
    pub fn chart_values(&self, image: &ImageRef) -> serde_json::Value {
        let file_name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        json!({
            "cni": {
                "chained": true,
                "netDir": self.cni_net_dir,
                "binDir": self.cni_bin_dir,
                "confName": file_name(&self.conflist),
                "runDir": self.root.join("run/kong-mesh-cni"),
                "netnsDirs": ["/var/run/netns", self.runtime_netns_dir()],
                "healthPort": 0,
                "logLevel": "info",
                "taintController": { "enabled": true },
                "image": {
                    "registry": image.registry, "repository": image.repository, "tag": image.tag,
                    "pullPolicy": "Never",
                },
            },
        })
    }

    /// The chart's values for this node behind Multus: the chart's defaults (not
    /// chained: our own `kuma-cni.conf` in Multus's conf dir, where a NAD without a
    /// config finds it) with only what is this node's changed: its Multus conf dir and
    /// CNI bin dir, the plugin's run dir under its root, our image as imported, and no
    /// fixed health port on the shared host.
    pub fn chart_values_multus(&self, multus: &crate::node_multus::Multus, image: &ImageRef) -> serde_json::Value {
        json!({
            "cni": {
                "netDir": multus.conf_dir,
                "binDir": self.cni_bin_dir,
                "runDir": self.root.join("run/kong-mesh-cni"),
                "netnsDirs": ["/var/run/netns", self.runtime_netns_dir()],
                "healthPort": 0,
                "image": {
                    "registry": image.registry, "repository": image.repository, "tag": image.tag,
                    "pullPolicy": "Never",
                },
            },
        })
    }

    /// Renders the chart with `kong-mesh-cni manifests -f VALUES [--set SET]...`, the
    /// values written to `<root>/values.json`; returns the YAML stream.
    pub fn render_chart(&self, binary: &Path, values: &serde_json::Value, set: &[&str]) -> Result<String, NodeError> {
        let file = self.root.join("values.json");
        std::fs::write(&file, serde_json::to_vec_pretty(values).expect("JSON")).map_err(|e| NodeError::io(&file, e))?;
        let mut cmd = Command::new(binary);
        cmd.arg("manifests").arg("-f").arg(&file);
        for s in set {
            cmd.arg("--set").arg(s);
        }
        let out =
            cmd.stdin(Stdio::null()).output().map_err(|e| NodeError::Command(format!("{}: {e}", binary.display())))?;
        if !out.status.success() {
            return Err(NodeError::Command(format!(
                "kong-mesh-cni manifests: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        String::from_utf8(out.stdout).map_err(|e| NodeError::Command(format!("kong-mesh-cni manifests: {e}")))
    }
}

/// The objects of one install, in the order they were applied.
pub struct Release {
    client: Client,
    objects: Vec<(Api<DynamicObject>, String)>,
}

impl Release {
    /// Applies every object of the YAML `stream` (server-side apply: the same call
    /// installs and upgrades).
    pub async fn apply(client: &Client, stream: &str) -> Result<Release, NodeError> {
        let mut objects = Vec::new();
        for doc in serde_norway::Deserializer::from_str(stream) {
            let value: serde_json::Value = serde::Deserialize::deserialize(doc)
                .map_err(|e| NodeError::Setup(format!("the rendered stream is not YAML: {e}")))?;
            if value.is_null() {
                continue;
            }
            let obj: DynamicObject = serde_json::from_value(value)
                .map_err(|e| NodeError::Setup(format!("a rendered document is not an object: {e}")))?;
            let types = obj.types.clone().ok_or_else(|| NodeError::Setup("an object without a kind".into()))?;
            let gvk = GroupVersionKind::try_from(&types).map_err(|e| NodeError::Setup(format!("{types:?}: {e}")))?;
            let (resource, caps) = pinned_kind(client, &gvk)
                .await
                .map_err(|e| NodeError::Command(format!("the API server does not serve {gvk:?}: {e}")))?;
            let name = obj.metadata.name.clone().unwrap_or_default();
            let api = api_for(client, &resource, caps.scope, obj.metadata.namespace.as_deref());
            let params = PatchParams::apply(FIELD_MANAGER).force();
            api.patch(&name, &params, &Patch::Apply(&obj))
                .await
                .map_err(|e| NodeError::Command(format!("applying {} {name}: {e}", types.kind)))?;
            objects.push((api, format!("{} {name}", types.kind)));
        }
        Ok(Release { client: client.clone(), objects })
    }

    /// `helm uninstall`: every object deleted, last applied first, the dependents in the
    /// background; then waits (up to `timeout`) until the DaemonSet's pods are gone.
    pub async fn uninstall(self, timeout: Duration) -> Result<(), NodeError> {
        for (api, what) in self.objects.iter().rev() {
            let name = what.split_once(' ').map(|(_, n)| n).unwrap_or_default();
            match api.delete(name, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(NodeError::Command(format!("deleting {what}: {e}"))),
            }
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), CNI_NAMESPACE);
        let start = Instant::now();
        loop {
            let left = pods.list(&ListParams::default().labels(CNI_SELECTOR)).await.map(|l| l.items.len());
            if matches!(left, Ok(0)) {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(NodeError::Timeout(format!("the CNI pods still there {timeout:?} after the uninstall")));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn api_for(client: &Client, resource: &ApiResource, scope: Scope, namespace: Option<&str>) -> Api<DynamicObject> {
    match scope {
        Scope::Namespaced => Api::namespaced_with(client.clone(), namespace.unwrap_or("default"), resource),
        Scope::Cluster => Api::all_with(client.clone(), resource),
    }
}

/// The DaemonSet's pod on `node` if one is Ready (and not being deleted).
async fn ready_cni_pod(client: &Client, node: &str) -> Option<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), CNI_NAMESPACE);
    let params = ListParams::default().labels(CNI_SELECTOR).fields(&format!("spec.nodeName={node}"));
    let list = pods.list(&params).await.ok()?;
    list.items.into_iter().find(|p| p.metadata.deletion_timestamp.is_none() && pod_ready(p))
}

/// The DaemonSet's pod on `node` once it is Ready (and not being deleted), within `timeout`.
pub async fn cni_pod_ready(client: &Client, node: &str, timeout: Duration) -> Result<Pod, NodeError> {
    let start = Instant::now();
    loop {
        if let Some(pod) = ready_cni_pod(client, node).await {
            return Ok(pod);
        }
        if start.elapsed() > timeout {
            return Err(NodeError::Timeout(format!("no Ready CNI pod on {node} within {timeout:?}")));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether the node carries the taint the CNI's controller manages (`NodeReadiness`).
pub fn tainted(node: &k8s_openapi::api::core::v1::Node) -> bool {
    node.spec.as_ref().and_then(|s| s.taints.as_ref()).is_some_and(|ts| ts.iter().any(|t| t.key == "NodeReadiness"))
}

/// What [`install`] did, and how long each part took.
pub struct Installed {
    pub release: Release,
    pub image: ImageRef,
    /// The chart values used (for an upgrade with more `--set`s).
    pub values: serde_json::Value,
    /// The DaemonSet's pod on the node, Ready.
    pub cni_pod: Pod,
    /// Image build and import.
    pub image_time: Duration,
    /// From the first object applied to the CNI pod Ready.
    pub apply_to_cni_ready: Duration,
    /// From the first object applied to the node without the NodeReadiness taint.
    pub apply_to_untainted: Duration,
    /// When the objects were applied.
    pub applied: Instant,
}

/// Installs our CNI on `node` as a user would: our image built from `binary` and
/// imported, the chart rendered with [`Node::chart_values`] and `set` (`--set`s) by
/// `binary manifests` and applied; waits until the DaemonSet's pod is Ready and the node
/// has no NodeReadiness taint (the controller's work), each within `timeout`.
pub async fn install(
    node: &Node,
    client: &Client,
    binary: &Path,
    set: &[&str],
    timeout: Duration,
) -> Result<Installed, NodeError> {
    install_with(node, client, binary, &|image| node.chart_values(image), set, timeout).await
}

/// [`install`] with the values `values` gives for the imported image.
pub async fn install_with(
    node: &Node,
    client: &Client,
    binary: &Path,
    values: &dyn Fn(&ImageRef) -> serde_json::Value,
    set: &[&str],
    timeout: Duration,
) -> Result<Installed, NodeError> {
    let start = Instant::now();
    let layout = build_image(binary, &node.root.join("image"))?;
    let image = node.import_image(&layout, "kmc.test", "kong-mesh-cni")?;
    let image_time = start.elapsed();
    let values = values(&image);
    let stream = node.render_chart(binary, &values, set)?;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let was_tainted = nodes.get(&node.name).await.map(|n| tainted(&n)).unwrap_or(false);
    let applied = Instant::now();
    let release = Release::apply(client, &stream).await?;
    // The node is read before the pods: a node seen untainted while no CNI pod is Ready
    // afterwards lost its taint too early.
    let mut cni_ready = None;
    loop {
        let n = nodes.get(&node.name).await.map_err(|e| NodeError::Command(format!("getting the node: {e}")))?;
        if cni_ready.is_none() {
            cni_ready = ready_cni_pod(client, &node.name).await.map(|p| (p, applied.elapsed()));
        }
        match (&cni_ready, tainted(&n)) {
            (Some(_), false) => break,
            (None, false) if was_tainted => {
                return Err(NodeError::Setup("the NodeReadiness taint went before the CNI pod was Ready".into()));
            }
            _ => {}
        }
        if applied.elapsed() > timeout {
            let what = if cni_ready.is_some() { "the node kept its NodeReadiness taint" } else { "no Ready CNI pod" };
            let ours = ListParams::default().labels(CNI_SELECTOR);
            return Err(NodeError::Timeout(format!(
                "{what} {timeout:?} after the apply\n{}",
                crate::node_pods::why_not_ready(client, node, CNI_NAMESPACE, &ours).await
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (cni_pod, apply_to_cni_ready) = cni_ready.expect("set before the loop ends");
    let apply_to_untainted = applied.elapsed();
    Ok(Installed { release, image, values, cni_pod, image_time, apply_to_cni_ready, apply_to_untainted, applied })
}

/// The `type` of every plugin in a conflist, in order.
pub fn plugin_types(conflist: &str) -> Vec<String> {
    let list: serde_json::Value = serde_json::from_str(conflist).unwrap_or_default();
    list["plugins"].as_array().into_iter().flatten().map(|p| p["type"].as_str().unwrap_or("?").to_string()).collect()
}

/// Uninstalls `release` ([`Release::uninstall`]) and waits until the node's primary
/// conflist is `primary` byte for byte and the only file in its net dir.
pub async fn uninstall(node: &Node, release: Release, primary: &str) -> Result<(), NodeError> {
    let start = Instant::now();
    release.uninstall(Duration::from_secs(90)).await.map_err(|e| {
        NodeError::Command(format!("{e}\n{}", crate::node_pods::tail(&node.log("kube-controller-manager"), 40)))
    })?;
    eprintln!("uninstall: the CNI pod gone {:.1?} after the deletes", start.elapsed());
    let start = Instant::now();
    loop {
        let now = std::fs::read_to_string(&node.conflist).map_err(|e| NodeError::io(&node.conflist, e))?;
        if now == primary {
            break;
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(NodeError::Timeout(format!("the primary conflist not restored byte for byte:\n{now}")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dir = std::fs::read_dir(&node.cni_net_dir).map_err(|e| NodeError::io(&node.cni_net_dir, e))?;
    let left: Vec<String> = dir.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    let primary_name = node.conflist.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if left != [primary_name] {
        return Err(NodeError::Teardown(format!("the net dir holds more than the primary conflist: {left:?}")));
    }
    Ok(())
}
