//! The real-node demo: a single Kubernetes node on this machine (testkit::node:
//! kube-apiserver, etcd, controller-manager, scheduler, kubelet, containerd v2 + runc,
//! bridge + host-local + portmap as its CNI), our CNI installed from our chart and our
//! image, a mesh pod and a plain pod through the real kubelet, the release deleted, the
//! node taken down. [`run`] returns a [`Report`] whose fields the tests assert and
//! whose `Display` is what people read.
//!
//! Two modes: chained into the node's conflist ([`Mode::Chained`], what the tests'
//! other nodes run), or the chart's default, behind thin Multus ([`Mode::Multus`]: the
//! install guide's OpenShift), where the namespace's label makes our controller create
//! the `kuma-cni` NAD and the mesh pod asks Multus for it. The node's cluster network is
//! a [`ClusterNetwork`]: the bridge, kind's kindnet or K3D's Flannel.

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Namespace, Node as KubeNode};
use kube::ResourceExt;
use kube::api::{Api, LogParams, Patch, PatchParams};
use testkit::node::ClusterNetwork;
use testkit::node_chart::{CNI_NAMESPACE, install_with, tainted};
use testkit::node_multus::{Multus, NETWORK, multus_mesh_pod, wait_for_nad};
use testkit::node_pods::{Validator, container, log_line, mesh_pod, plain_pod, pod_ip, run_pod, validation_exit};
use testkit::{Node, NodeOptions};

const POD_READY: Duration = Duration::from_secs(90);
const LOG_WAIT: Duration = Duration::from_secs(20);

/// How our plugin is reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// Chained into the node's primary conflist (`cni.chained=true`).
    #[default]
    Chained,
    /// The chart's defaults behind thin Multus: our own conf in Multus's conf dir.
    Multus,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub mode: Mode,
    pub network: ClusterNetwork,
    /// Flannel: the node's podCIDR and the backend flanneld announced on the node.
    pub flannel_lease: Option<(String, String)>,
    pub node: String,
    pub node_up: Duration,
    /// Registered with NodeReadiness:NoSchedule / still tainted once the CNI is Ready.
    pub tainted_at_start: bool,
    pub image: String,
    pub image_time: Duration,
    pub apply_to_cni_ready: Duration,
    pub apply_to_untainted: Duration,
    pub apply_to_mesh_ready: Duration,
    /// Plugin types of the primary conflist once the CNI pod is Ready.
    pub chained: Vec<String>,
    /// Multus mode: our conf's file in Multus's conf dir, and the time from labelling
    /// the namespace to our NAD in it.
    pub standalone_conf: Option<String>,
    pub label_to_nad: Option<Duration>,
    pub validator_exit: Option<i32>,
    /// Where the mesh pod's app connects.
    pub target: String,
    /// What the mesh pod's app and the plain pod's app logged for their connection.
    pub mesh_line: String,
    pub plain_line: String,
    /// The plugin's lines for the two pods in the CNI pod's log (`kubectl logs`).
    pub plugin_lines: Vec<String>,
    pub memory_mib: u64,
    pub restored_exactly: bool,
    /// Files in the node's CNI net dir after the release was deleted.
    pub net_dir_after: Vec<String>,
    pub teardown: Duration,
    /// What is left of the node on the host (nothing), and what differs in the host's
    /// sysctls, iptables chains and paths from before (nothing).
    pub leftovers: Vec<String>,
    pub host_changes: Vec<String>,
}

/// Runs the real-node demo in `mode` with `binary` (the kong-mesh-cni that goes into the
/// image). Progress goes to stderr as it happens; the report comes back.
pub fn run(binary: &Path, mode: Mode, network: ClusterNetwork) -> Result<Report> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run_async(binary, mode, network))
}

fn step(what: &str) {
    eprintln!("kmc-demo --node: {what}");
}

async fn run_async(binary: &Path, mode: Mode, network: ClusterNetwork) -> Result<Report> {
    let mut report = Report { mode, network, ..Report::default() };
    step(&format!("bringing the node up (kubelet, containerd, control plane; cluster network {network:?})"));
    let options = NodeOptions { network, taints: vec!["NodeReadiness:NoSchedule".into()], ..NodeOptions::default() };
    let node = Node::up(options).await?;
    report.node = node.name.clone();
    report.node_up = node.up_time;
    let client = node.client().await?;
    let nodes: Api<KubeNode> = Api::all(client.clone());
    let registered = nodes.get(&node.name).await?;
    report.tainted_at_start = tainted(&registered);
    if network == ClusterNetwork::Flannel {
        let cidr = registered.spec.as_ref().and_then(|s| s.pod_cidr.clone()).unwrap_or_default();
        let backend = registered.annotations().get("flannel.alpha.coreos.com/backend-type").cloned();
        report.flannel_lease = Some((cidr, backend.unwrap_or_default()));
    }
    let multus = match mode {
        Mode::Chained => None,
        Mode::Multus => {
            step("installing thin Multus v4.2.2 as the node's CNI, the bridge network its cluster default");
            Some(node.install_multus_thin().await?)
        }
    };
    // The file our install changes (the chained conflist) or must leave alone (Multus's).
    let primary_file = multus.as_ref().map_or(node.conflist.clone(), |m| m.conf.clone());
    let primary = std::fs::read(&primary_file)?;

    step("building our image, installing the chart (kong-mesh-cni manifests), waiting for the CNI pod");
    let values = |image: &_| match &multus {
        None => node.chart_values(image),
        Some(multus) => node.chart_values_multus(multus, image),
    };
    let installed = install_with(&node, &client, binary, &values, &[], Duration::from_secs(120)).await?;
    report.image = installed.image.to_string();
    report.image_time = installed.image_time;
    report.apply_to_cni_ready = installed.apply_to_cni_ready;
    report.apply_to_untainted = installed.apply_to_untainted;
    let conflist: serde_json::Value = serde_json::from_slice(&std::fs::read(&node.conflist)?)?;
    report.chained = conflist["plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["type"].as_str().unwrap_or("?").to_owned())
        .collect();
    if let Some(multus) = &multus {
        report.standalone_conf = Some(standalone_conf(multus)?);
        step("labelling namespace default kuma.io/sidecar-injection=enabled, waiting for our NAD");
        let label = serde_json::json!({ "metadata": { "labels": { "kuma.io/sidecar-injection": "enabled" } } });
        let labelled = Instant::now();
        Api::<Namespace>::all(client.clone()).patch("default", &PatchParams::default(), &Patch::Merge(&label)).await?;
        wait_for_nad(&client, "default", Duration::from_secs(60)).await?;
        report.label_to_nad = Some(labelled.elapsed());
    }

    step("running a plain server, a mesh pod and a plain client");
    let none = String::new;
    let serve = plain_pod("target", &node, vec![container("serve", &["serve", "8080"])]);
    let (target, _) = run_pod(&client, &node, serve, POD_READY, &none).await?;
    report.target = format!("{}:8080", pod_ip(&target));
    let validator = Validator::image(&report.image);
    let mesh = match mode {
        Mode::Chained => mesh_pod("mesh", &node, &report.target, validator),
        Mode::Multus => multus_mesh_pod("mesh", &node, &report.target, validator),
    };
    let (mesh, _) = run_pod(&client, &node, mesh, POD_READY, &none).await?;
    report.apply_to_mesh_ready = installed.applied.elapsed();
    report.validator_exit = validation_exit(&mesh);
    let dial = plain_pod("plain", &node, vec![container("app", &["dial", &report.target])]);
    run_pod(&client, &node, dial, POD_READY, &none).await?;
    report.mesh_line = log_line(&client, "default", "mesh", "app", &["->", "sidecar"], LOG_WAIT).await?;
    report.plain_line = log_line(&client, "default", "plain", "app", &["->"], LOG_WAIT).await?;
    let cni_pod = installed.cni_pod.metadata.name.clone().context("the CNI pod's name")?;
    // Behind Multus our plugin runs for the pods that ask for its network only.
    let called_for: &[&str] = match mode {
        Mode::Chained => &["default/mesh", "default/plain"],
        Mode::Multus => &["default/mesh"],
    };
    for pod in called_for {
        log_line(&client, CNI_NAMESPACE, &cni_pod, "install-cni", &[pod], LOG_WAIT).await?;
    }
    let params = LogParams { container: Some("install-cni".into()), ..LogParams::default() };
    let log = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), CNI_NAMESPACE)
        .logs(&cni_pod, &params)
        .await?;
    report.plugin_lines = log
        .lines()
        .filter(|l| l.contains("[plugin") && (l.contains("default/mesh") || l.contains("default/plain")))
        .map(str::to_owned)
        .collect();
    report.memory_mib = node.memory_mib();

    step("deleting the release");
    installed.release.uninstall(Duration::from_secs(90)).await?;
    let restored = Instant::now();
    let ours_gone = || multus.as_ref().is_none_or(|m| !m.conf_dir.join(format!("{NETWORK}.conf")).exists());
    while (std::fs::read(&primary_file)? != primary || !ours_gone()) && restored.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    report.restored_exactly = std::fs::read(&primary_file)? == primary && ours_gone();
    report.net_dir_after = std::fs::read_dir(&node.cni_net_dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;

    step("taking the node down");
    let (root, name) = (node.root.clone(), node.name.clone());
    let down = Instant::now();
    let host = node.down()?;
    report.teardown = down.elapsed();
    report.leftovers = testkit::node::leftovers(&root, &name);
    report.host_changes = host.changes();
    Ok(report)
}

/// Our standalone conf in Multus's conf dir: its file name, checked to be our network.
fn standalone_conf(multus: &Multus) -> Result<String> {
    let path = multus.conf_dir.join(format!("{NETWORK}.conf"));
    let conf: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).context("our conf for Multus")?)?;
    anyhow::ensure!(conf["name"] == NETWORK && conf["type"] == "kong-mesh-cni", "{}: {conf}", path.display());
    Ok(path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
}

fn s(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kong-mesh-cni on a real node (kubelet + containerd v2 + runc, Kubernetes v1.37)")?;
        let network = match self.network {
            ClusterNetwork::Bridge => "bridge + host-local + portmap".to_owned(),
            ClusterNetwork::Kindnet => "kind's kindnet (ptp + host-local + portmap, 10-kindnet.conflist)".to_owned(),
            ClusterNetwork::Flannel => {
                let (cidr, backend) = self.flannel_lease.clone().unwrap_or_default();
                format!("K3D's Flannel (flanneld {backend}, podCIDR {cidr}; flannel -> bridge, 10-flannel.conflist)")
            }
        };
        writeln!(f, "  cluster network: {network}")?;
        writeln!(
            f,
            "  node {} Ready in {}, registered with NodeReadiness:NoSchedule: {}",
            self.node,
            s(self.node_up),
            { if self.tainted_at_start { "yes" } else { "no" } }
        )?;
        writeln!(f, "  image {} built and imported in {}", self.image, s(self.image_time))?;
        writeln!(f, "install from the chart (kong-mesh-cni manifests -f <this node's values>), applied")?;
        writeln!(f, "  -> CNI pod Ready             {}", s(self.apply_to_cni_ready))?;
        writeln!(f, "  -> node untainted            {} (by our controller)", s(self.apply_to_untainted))?;
        writeln!(f, "  -> mesh pod Ready            {}", s(self.apply_to_mesh_ready))?;
        match (&self.standalone_conf, self.label_to_nad) {
            (Some(conf), Some(nad)) => {
                writeln!(f, "  Multus (thin) is the node's CNI; its cluster network conflist untouched")?;
                writeln!(f, "  our conf for Multus           {conf} (in Multus's conf dir, not chained)")?;
                writeln!(f, "  namespace labelled -> NAD    {} (kuma-cni, by our controller)", s(nad))?;
            }
            _ => writeln!(f, "  primary conflist now chains  {}", self.chained.join(" -> "))?,
        }
        writeln!(f, "pods, scheduled and started by the kubelet")?;
        let exit = self.validator_exit.map_or("none".to_owned(), |c| c.to_string());
        if self.mode == Mode::Multus {
            writeln!(f, "  mesh   asks Multus for kuma-cni (k8s.v1.cni.cncf.io/networks): our plugin ran on net1")?;
        }
        writeln!(f, "  mesh   kuma-validation (our validator as UID 5678) exited {exit}")?;
        writeln!(f, "         app: {}", self.mesh_line)?;
        writeln!(f, "  plain  app: {}", self.plain_line)?;
        writeln!(f, "  the plugin's lines in `kubectl logs` of the CNI pod:")?;
        for line in &self.plugin_lines {
            writeln!(f, "    {}", line.trim())?;
        }
        writeln!(f, "  memory of the node (control plane, runtime, pods): {} MiB", self.memory_mib)?;
        writeln!(f, "removal")?;
        writeln!(
            f,
            "  release deleted: {} {}; net dir now: {}",
            if self.mode == Mode::Multus { "Multus's conf unchanged, ours removed:" } else { "primary conflist" },
            if self.restored_exactly { "restored byte for byte" } else { "NOT restored" },
            self.net_dir_after.join(", ")
        )?;
        writeln!(
            f,
            "  node down in {}: left on the host: {}; sysctls, iptables and paths as before: {}",
            s(self.teardown),
            if self.leftovers.is_empty() { "nothing".to_owned() } else { self.leftovers.join(", ") },
            if self.host_changes.is_empty() {
                "yes".to_owned()
            } else {
                format!("NO ({})", self.host_changes.join("; "))
            }
        )
    }
}
