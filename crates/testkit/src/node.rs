//! A real single Kubernetes v1.37 node on this machine: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, containerd v2 (Debian's runc) and the
//! kubelet, with bridge + host-local + portmap as the primary CNI, or kind's kindnet or
//! K3D's Flannel ([`ClusterNetwork`]).
//!
//! Everything lives under a private root (`/tmp/kmc-node-<id>`: its own CNI conf and
//! bin dirs, kubelet root, containerd root/state, pod logs, cgroupRoot `/kmc-node-<id>`).
//! The node IP sits on a bridge of our own with no ports; pods are on a second bridge
//! (made by the bridge plugin) and nothing from it may leave the machine. There is no
//! kube-proxy: one DNAT sends the `kubernetes` Service (10.96.0.1:443) to the API
//! server. Images are OCI archives written here and imported with `ctr`; pods must use
//! `imagePullPolicy: Never`.
//!
//! Every change to the host is recorded in `<root>/state.json` before it is made, and
//! [`teardown`] undoes them from that file alone (also after a killed run:
//! `kmc-node down ROOT`).

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node as KubeNode, ServiceAccount};
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::json;

use crate::node_image::{ImageSpec, write_archive};
use crate::node_state::{Process, State, alive, kill, start_time, wait_gone};
use crate::{bin_dir, cached_build, unique_suffix};

use crate::node_state::teardown as teardown_state;
pub use crate::node_state::{
    HOST_PATHS, HostView, NETNS_DIR, SYSCTLS, cgroup_mounts, iptables_chains, leftovers, mounts_under, propagation,
};

/// The `kubernetes` Service's IP (first of --service-cluster-ip-range).
pub const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// The image every pod sandbox runs (`standin pause`).
pub const PAUSE_IMAGE: &str = "kmc.test/pause:1";
/// The image of the tests' containers: `/standin` and `/kong-mesh-cni` (when given).
pub const TOOLS_IMAGE: &str = "kmc.test/tools:1";
/// How long the node may take to register Ready after its processes start.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("node setup: {0}")]
    Setup(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Command(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("teardown left something behind:\n{0}")]
    Teardown(String),
}

impl NodeError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> NodeError {
        NodeError::Io { path: path.to_path_buf(), source }
    }
}

/// The bin dir of `scripts/node-build.sh` (kubelet, containerd, standin...): from
/// `KMC_NODE_BIN`, else built (many minutes the first time; then instant).
pub fn node_bin_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| cached_build("KMC_NODE_BIN", "scripts/node-build.sh", "kubelet"))
}

/// The bin dir of `scripts/cnis-build.sh` (multus, multus-daemon, multus-shim,
/// flanneld): from `KMC_CNIS_BIN`, else built (minutes the first time; then instant).
pub fn cnis_bin_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| cached_build("KMC_CNIS_BIN", "scripts/cnis-build.sh", "multus"))
}

/// The node's cluster network: its primary CNI, the node's only conflist.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClusterNetwork {
    /// bridge + host-local + portmap, pods on a bridge of the node's own
    /// (`10-kmc-bridge.conflist`).
    #[default]
    Bridge,
    /// kind's: kindnet's ptp + host-local + portmap, written as kind writes
    /// `10-kindnet.conflist` (its whitespace included); each pod on a veth to the host
    /// with a /32 route, no bridge.
    Kindnet,
    /// K3D's (k3s's built-in Flannel): flanneld v0.28 (scripts/cnis-build.sh) with
    /// `--kube-subnet-mgr` (the controller-manager allocates the node's podCIDR), its
    /// host-gw backend, and k3s's `10-flannel.conflist` with the flannel meta plugin
    /// delegating to bridge. Two changes to k3s's file, both forced: cniVersion 0.4.0
    /// (the flannel plugin that builds here, v0.9.1, speaks no later), and no
    /// `firewall` entry (its iptables chains outlive every pod on this shared host).
    Flannel,
}

/// The Flannel network: contains every node's podCIDR (flanneld checks it).
const FLANNEL_NETWORK: &str = "10.88.0.0/16";

/// kind's `10-kindnet.conflist` as recorded for the installer's golden tests (kindnetd's
/// template, whitespace included), and its values the node replaces with its own.
const KINDNET_RECORDED: &str = "crates/installer/tests/golden/kindnet/input/10-kindnet.conflist";
const KINDNET_VALUES: [&str; 3] = ["\"kindnet\"", "10.244.1.0/24", "/run/cni-ipam-state"];

/// What the node is started with.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// The primary CNI.
    pub network: ClusterNetwork,
    /// A static `kong-mesh-cni` binary to put into the tools image (for the validator
    /// init container).
    pub kong_mesh_cni: Option<PathBuf>,
    /// Taints the kubelet registers the node with (`key[=value]:effect`), as a cluster
    /// that waits for its CNI does (`NodeReadiness:NoSchedule`).
    pub taints: Vec<String>,
}

/// A running node; torn down on drop (see [`Node::abandon`] for a crash).
pub struct Node {
    pub root: PathBuf,
    pub name: String,
    pub node_ip: Ipv4Addr,
    /// The pods' subnet (host-local), a /24.
    pub pod_subnet: String,
    pub api_port: u16,
    pub kubeconfig: PathBuf,
    /// The node's CNI conf dir (containerd's `conf_dir`), holding the primary conflist.
    pub cni_net_dir: PathBuf,
    /// The node's CNI bin dir (containerd's `bin_dirs`).
    pub cni_bin_dir: PathBuf,
    /// The primary conflist's file (in `cni_net_dir`).
    pub conflist: PathBuf,
    /// Where the kubelet keeps pods' logs (`podLogsDir`).
    pub pod_logs_dir: PathBuf,
    /// Time from start to the node registered Ready.
    pub up_time: Duration,
    ctr_socket: PathBuf,
    pub(crate) state: State,
    armed: bool,
    /// Taken out only by [`Node::down`] and [`Node::abandon`], which end the node.
    host: Option<HostLock>,
}

/// Held while a node lives: two nodes on one host both DNAT 10.96.0.1:443 and would
/// answer each other's pods (test binaries run in parallel sessions). `before` is the
/// host as it was when the lock was taken, so "as before" checks made while it is
/// held see no other node's changes.
pub struct HostLock {
    _file: std::fs::File,
    pub before: HostView,
}

impl HostLock {
    /// What differs on the host now from when the lock was taken (empty: nothing).
    pub fn changes(&self) -> Vec<String> {
        HostView::now().changes_since(&self.before)
    }
}

/// Waits for the host's node lock, saying so when it waits: an flock of `$TMPDIR`
/// itself, which every session shares and no test creates or leaves behind.
async fn one_node_per_host() -> Result<HostLock, NodeError> {
    let path = std::env::temp_dir();
    let file = std::fs::File::open(&path).map_err(|e| NodeError::io(&path, e))?;
    let mut said = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(HostLock { _file: file, before: HostView::now() }),
            Err(std::fs::TryLockError::WouldBlock) => {
                if !said {
                    eprintln!("node: waiting for {} (another node runs on this host)", path.display());
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(NodeError::io(&path, e)),
        }
    }
}

fn free_port(ip: Ipv4Addr) -> Result<u16, NodeError> {
    let l =
        TcpListener::bind(SocketAddrV4::new(ip, 0)).map_err(|e| NodeError::Setup(format!("free port on {ip}: {e}")))?;
    Ok(l.local_addr().expect("bound").port())
}

pub(crate) fn run(program: &str, args: &[&str]) -> Result<String, NodeError> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NodeError::Command(format!("{program}: {e}")))?;
    if !out.status.success() {
        return Err(NodeError::Command(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn write(path: &Path, data: impl AsRef<[u8]>) -> Result<(), NodeError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| NodeError::io(dir, e))?;
    }
    std::fs::write(path, data).map_err(|e| NodeError::io(path, e))
}

fn copy_exe(from: &Path, to: &Path) -> Result<(), NodeError> {
    std::fs::copy(from, to).map_err(|e| NodeError::io(from, e))?;
    Ok(())
}

impl Node {
    /// Brings a node up and waits until it is Ready. On failure everything done so far
    /// is undone before the error is returned.
    pub async fn up(options: NodeOptions) -> Result<Node, NodeError> {
        let host = one_node_per_host().await?;
        let started = Instant::now();
        let id = unique_suffix();
        let root = std::env::temp_dir().join(format!("kmc-node-{id}"));
        std::fs::create_dir(&root).map_err(|e| NodeError::io(&root, e))?;
        // Third octet from the id: parallel nodes (and other tests) get distinct subnets.
        let octet = u8::from_str_radix(&id[..2], 16).expect("hex") % 250 + 2;
        let name = format!("kmc-node-{id}");
        let mut node = Node {
            cni_net_dir: root.join("etc/cni/net.d"),
            cni_bin_dir: root.join("opt/cni/bin"),
            conflist: root.join(match options.network {
                ClusterNetwork::Bridge => "etc/cni/net.d/10-kmc-bridge.conflist",
                ClusterNetwork::Kindnet => "etc/cni/net.d/10-kindnet.conflist",
                ClusterNetwork::Flannel => "etc/cni/net.d/10-flannel.conflist",
            }),
            pod_logs_dir: root.join("var/log/pods"),
            kubeconfig: root.join("admin.kubeconfig"),
            node_ip: Ipv4Addr::new(10, 89, octet, 1),
            pod_subnet: format!("10.88.{octet}.0/24"),
            api_port: 0,
            up_time: Duration::ZERO,
            ctr_socket: PathBuf::new(),
            state: State {
                root: root.clone(),
                id: id.clone(),
                links: vec![format!("kmcn{id}"), format!("kmcp{id}")],
                chain: format!("KMC-NODE-{id}"),
                cgroup: name.clone(),
                network: name.clone(),
                ..State::default()
            },
            name,
            root,
            armed: true,
            host: Some(host),
        };
        node.state.snapshot_host();
        node.state.save()?;
        match node.bring_up(&options).await {
            Ok(()) => {
                node.up_time = started.elapsed();
                Ok(node)
            }
            Err(e) => {
                let logs = format!("{}the node's full logs: {}", node.logs_tail(), node.save_logs());
                node.armed = false;
                if let Err(t) = teardown_state(&node.state) {
                    eprintln!("node: {t}");
                }
                Err(NodeError::Setup(format!("{e}\n{logs}")))
            }
        }
    }

    /// The last lines of every component's log, for a failure message.
    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        for p in &self.state.processes {
            let log = std::fs::read_to_string(self.root.join(format!("logs/{}.log", p.name))).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            out.push_str(&format!("--- {} (last 5 lines)\n", p.name));
            for l in &lines[lines.len().saturating_sub(5)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Copies the node's logs (every component's, and the pods' under `podLogsDir`) out
    /// of its root, which its teardown removes, to `$TMPDIR/kmc-node-logs-<id>`; returns
    /// that dir. Called on a failure only: a passing run leaves nothing behind.
    pub fn save_logs(&self) -> String {
        let to = std::env::temp_dir().join(format!("kmc-node-logs-{}", self.state.id));
        let _ = std::fs::create_dir_all(&to);
        let copy = Command::new("cp")
            .args(["-a", "--no-preserve=ownership"])
            .arg(self.root.join("logs"))
            .arg(&self.pod_logs_dir)
            .arg(&to)
            .stdin(Stdio::null())
            .output();
        match copy {
            Ok(o) if o.status.success() => to.display().to_string(),
            Ok(o) => format!("{} (copy incomplete: {})", to.display(), String::from_utf8_lossy(&o.stderr).trim()),
            Err(e) => format!("not saved (cp: {e}); they were under {}", self.root.display()),
        }
    }

    /// A component's whole log (`kubelet`, `containerd`, `kube-apiserver`...).
    pub fn log(&self, component: &str) -> String {
        std::fs::read_to_string(self.root.join(format!("logs/{component}.log"))).unwrap_or_default()
    }

    fn spawn(&mut self, name: &str, program: &Path, args: &[String]) -> Result<(), NodeError> {
        self.spawn_env(name, program, args, &[])
    }

    fn spawn_env(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<(), NodeError> {
        write(&self.root.join(format!("logs/{name}.log")), "")?;
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let process = Process {
            name: name.to_string(),
            pid: 0,
            start_time: 0,
            program: program.into(),
            args: args.to_vec(),
            env,
        };
        self.state.processes.push(process);
        self.launch(self.state.processes.len() - 1)
    }

    /// Starts process `index` of the state as recorded there, its output appended to
    /// its log, and records its PID.
    fn launch(&mut self, index: usize) -> Result<(), NodeError> {
        let p = &self.state.processes[index];
        let log_path = self.root.join(format!("logs/{}.log", p.name));
        let log = std::fs::File::options().append(true).open(&log_path).map_err(|e| NodeError::io(&log_path, e))?;
        let child = Command::new(&p.program)
            .args(&p.args)
            .envs(p.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| NodeError::io(&log_path, e))?)
            .stderr(log)
            // Its own process group: a ^C meant for the test must not kill the node
            // half-way; the teardown stops it in order.
            .process_group(0)
            .spawn()
            .map_err(|e| NodeError::Command(format!("starting {}: {e}", p.program.display())))?;
        let pid = child.id() as i32;
        // The child is reaped by nobody while we run; the teardown kills it by PID.
        std::mem::forget(child);
        let p = &mut self.state.processes[index];
        p.pid = pid;
        p.start_time = start_time(pid).unwrap_or_default();
        self.state.save()
    }

    fn process_index(&self, component: &str) -> Result<usize, NodeError> {
        self.state
            .processes
            .iter()
            .position(|p| p.name == component)
            .ok_or_else(|| NodeError::Setup(format!("the node runs no {component}")))
    }

    /// Stops one of the node's processes (`kube-apiserver`, `kubelet`...) with SIGTERM
    /// (SIGKILL after 10 s), as an outage would; [`Node::start`] starts it again.
    pub fn stop(&mut self, component: &str) -> Result<(), NodeError> {
        let p = self.state.processes[self.process_index(component)?].clone();
        if alive(&p) {
            kill(p.pid, libc::SIGTERM);
            if !wait_gone(std::slice::from_ref(&p), Duration::from_secs(10)) {
                kill(p.pid, libc::SIGKILL);
                wait_gone(std::slice::from_ref(&p), Duration::from_secs(5));
            }
        }
        Ok(())
    }

    /// Starts a process [`Node::stop`] stopped, with the arguments it first had.
    pub fn start(&mut self, component: &str) -> Result<(), NodeError> {
        let index = self.process_index(component)?;
        if alive(&self.state.processes[index]) {
            return Err(NodeError::Setup(format!("{component} is running")));
        }
        self.launch(index)
    }

    async fn bring_up(&mut self, options: &NodeOptions) -> Result<(), NodeError> {
        self.share_netns_dir()?;
        let bins = node_bin_dir().to_path_buf();
        let plugins = bin_dir().join("plugins");
        let (node_bridge, pod_bridge, chain) =
            (self.state.links[0].clone(), self.state.links[1].clone(), self.state.chain.clone());
        let ip = self.node_ip.to_string();

        // Network: the node IP on a portless bridge; our chain in nat and filter.
        run("ip", &["link", "add", &node_bridge, "type", "bridge"])?;
        run("ip", &["addr", "add", &format!("{ip}/24"), "dev", &node_bridge])?;
        run("ip", &["link", "set", &node_bridge, "up"])?;
        for table in ["nat", "filter"] {
            run("iptables", &["-t", table, "-N", &chain])?;
        }
        // Nothing from the pods leaves the machine, nothing from elsewhere reaches them
        // (by subnet: kindnet's pods have no bridge; pod to pod is still forwarded).
        let subnet = self.pod_subnet.as_str();
        run("iptables", &["-A", &chain, "-s", subnet, "!", "-d", subnet, "-j", "DROP"])?;
        run("iptables", &["-A", &chain, "!", "-s", subnet, "-d", subnet, "-j", "DROP"])?;
        run("iptables", &["-I", "FORWARD", "1", "-j", &chain])?;

        // PKI and kubeconfig.
        let pki = crate::node_pki::generate(&self.root.join("pki"), self.node_ip, SERVICE_IP)?;
        self.api_port = free_port(self.node_ip)?;
        let server = format!("https://{ip}:{}", self.api_port);
        write(&self.kubeconfig, kubeconfig(&server, &pki))?;
        let kc = self.kubeconfig.to_string_lossy().into_owned();

        // The kubernetes Service without kube-proxy: pods (PREROUTING) and host-network
        // pods (OUTPUT).
        self.route_service()?;
        for hook in ["PREROUTING", "OUTPUT"] {
            run("iptables", &["-t", "nat", "-I", hook, "1", "-j", &chain])?;
        }

        // etcd and the control plane.
        let (client_port, peer_port) = (free_port(Ipv4Addr::LOCALHOST)?, free_port(Ipv4Addr::LOCALHOST)?);
        let etcd_client = format!("http://127.0.0.1:{client_port}");
        let etcd_peer = format!("http://127.0.0.1:{peer_port}");
        let p = |path: &Path| path.to_string_lossy().into_owned();
        self.spawn(
            "etcd",
            &bins.join("etcd"),
            &[
                format!("--data-dir={}", p(&self.root.join("etcd"))),
                format!("--listen-client-urls={etcd_client}"),
                format!("--advertise-client-urls={etcd_client}"),
                format!("--listen-peer-urls={etcd_peer}"),
                format!("--initial-advertise-peer-urls={etcd_peer}"),
                format!("--initial-cluster=default={etcd_peer}"),
                "--unsafe-no-fsync=true".into(),
                "--log-level=error".into(),
            ],
        )?;
        self.spawn(
            "kube-apiserver",
            &bins.join("kube-apiserver"),
            &[
                format!("--etcd-servers={etcd_client}"),
                format!("--bind-address={ip}"),
                format!("--advertise-address={ip}"),
                format!("--secure-port={}", self.api_port),
                format!("--cert-dir={}", p(&self.root.join("pki"))),
                format!("--tls-cert-file={}", p(&pki.server_cert)),
                format!("--tls-private-key-file={}", p(&pki.server_key)),
                format!("--client-ca-file={}", p(&pki.ca_cert)),
                "--authorization-mode=Node,RBAC".into(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", p(&pki.sa_pub)),
                format!("--service-account-signing-key-file={}", p(&pki.sa_key)),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                "--allow-privileged=true".into(),
                "--kubelet-preferred-address-types=InternalIP".into(),
                format!("--kubelet-client-certificate={}", p(&pki.admin_cert)),
                format!("--kubelet-client-key={}", p(&pki.admin_key)),
                "--profiling=false".into(),
                "--v=0".into(),
            ],
        )?;
        let mut controller_manager = vec![
            format!("--kubeconfig={kc}"),
            "--secure-port=0".into(),
            "--leader-elect=false".into(),
            "--use-service-account-credentials=false".into(),
            format!("--service-account-private-key-file={}", p(&pki.sa_key)),
            format!("--root-ca-file={}", p(&pki.ca_cert)),
            "--v=0".into(),
        ];
        if options.network == ClusterNetwork::Flannel {
            // The node's podCIDR, which flanneld's kube subnet manager leases.
            controller_manager.extend([
                "--allocate-node-cidrs=true".into(),
                format!("--cluster-cidr={}", self.pod_subnet),
                "--node-cidr-mask-size=24".into(),
            ]);
        }
        self.spawn("kube-controller-manager", &bins.join("kube-controller-manager"), &controller_manager)?;
        self.spawn(
            "kube-scheduler",
            &bins.join("kube-scheduler"),
            &[format!("--kubeconfig={kc}"), "--secure-port=0".into(), "--leader-elect=false".into(), "--v=0".into()],
        )?;

        // The primary CNI.
        std::fs::create_dir_all(&self.cni_bin_dir).map_err(|e| NodeError::io(&self.cni_bin_dir, e))?;
        for plugin in ["bridge", "ptp", "host-local", "portmap", "loopback"] {
            copy_exe(&plugins.join(plugin), &self.cni_bin_dir.join(plugin))?;
        }
        let ipam_dir = p(&self.root.join("var/lib/cni/networks"));
        let bridge = json!({
            "cniVersion": "1.1.0",
            "name": self.state.network,
            "plugins": [
                {
                    "type": "bridge", "bridge": pod_bridge, "isGateway": true, "ipMasq": false, "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{ "subnet": self.pod_subnet }]],
                        "routes": [{ "dst": "0.0.0.0/0" }],
                        "dataDir": ipam_dir,
                    },
                },
                { "type": "portmap", "capabilities": { "portMappings": true } },
            ],
        });
        let subnet_file = self.root.join("run/flannel/subnet.env");
        let conflist = match options.network {
            ClusterNetwork::Bridge => serde_json::to_string_pretty(&bridge).expect("JSON") + "\n",
            ClusterNetwork::Flannel => {
                copy_exe(&bin_dir().join("primaries/flannel"), &self.cni_bin_dir.join("flannel"))?;
                copy_exe(&plugins.join("bandwidth"), &self.cni_bin_dir.join("bandwidth"))?;
                let flannel = json!({
                    "name": self.state.network,
                    "cniVersion": "0.4.0",
                    "plugins": [
                        {
                            "type": "flannel",
                            "subnetFile": subnet_file,
                            "dataDir": self.root.join("var/lib/cni/flannel"),
                            "ipam": { "dataDir": ipam_dir },
                            "delegate": {
                                "hairpinMode": true, "forceAddress": true, "isDefaultGateway": true,
                                "bridge": pod_bridge,
                            },
                        },
                        { "type": "portmap", "capabilities": { "portMappings": true } },
                        { "type": "bandwidth", "capabilities": { "bandwidth": true } },
                    ],
                });
                serde_json::to_string_pretty(&flannel).expect("JSON") + "\n"
            }
            // Named after the node, not `kindnet`: the teardown sweeps libcni's cache
            // files by network name.
            ClusterNetwork::Kindnet => {
                let recorded = crate::repo_root().join(KINDNET_RECORDED);
                let text = std::fs::read_to_string(&recorded).map_err(|e| NodeError::io(&recorded, e))?;
                let [name, subnet, data_dir] = KINDNET_VALUES;
                text.replace(name, &format!("\"{}\"", self.state.network))
                    .replace(subnet, &self.pod_subnet)
                    .replace(data_dir, &ipam_dir)
            }
        };
        write(&self.conflist, conflist)?;

        // containerd.
        let ctrd = self.root.join("containerd");
        let sock = ctrd.join("containerd.sock");
        let config = containerd_config(&ctrd, &self.cni_bin_dir, &self.cni_net_dir);
        write(&ctrd.join("config.toml"), config)?;
        let containerd_args = vec![format!("--config={}", p(&ctrd.join("config.toml")))];
        self.share_runtime_netns_dir()?;
        // The shim is found on PATH, next to containerd.
        let path = format!("{}:{}", bins.display(), std::env::var("PATH").unwrap_or_default());
        self.spawn_env("containerd", &bins.join("containerd"), &containerd_args, &[("PATH", &path)])?;
        wait_for(Duration::from_secs(60), "containerd's socket", || sock.exists())?;

        // Images.
        let archive = self.root.join("images.tar");
        self.ctr_socket = sock.clone();
        let standin = bins.join("standin");
        let mut tools = vec![("/standin", standin.as_path())];
        if let Some(kmc) = &options.kong_mesh_cni {
            tools.push(("/kong-mesh-cni", kmc.as_path()));
        }
        write_archive(
            &archive,
            &[
                ImageSpec {
                    name: PAUSE_IMAGE,
                    files: vec![("/standin", &standin)],
                    entrypoint: vec!["/standin", "pause"],
                },
                ImageSpec { name: TOOLS_IMAGE, files: tools, entrypoint: vec!["/standin"] },
            ],
        )?;
        let sock_s = p(&sock);
        // The CRI plugin may still be starting: a first import can fail.
        let import_start = Instant::now();
        loop {
            match self.ctr(&["images", "import", &p(&archive)]) {
                Ok(_) => break,
                Err(e) if import_start.elapsed() > Duration::from_secs(30) => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }

        // The kubelet.
        let kubelet_port = free_port(self.node_ip)?;
        self.make_cgroups()?;
        let kubelet_config = json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            // This host is cgroup v1; root lacks CAP_SYS_RESOURCE (see containerd's config).
            "failCgroupV1": false,
            "oomScoreAdj": 0,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": format!("/{}", self.name),
            "containerRuntimeEndpoint": format!("unix://{sock_s}"),
            "address": ip,
            "port": kubelet_port,
            "readOnlyPort": 0,
            "healthzPort": 0,
            "authentication": {
                "anonymous": { "enabled": true },
                "webhook": { "enabled": false },
                "x509": { "clientCAFile": p(&pki.ca_cert) },
            },
            "authorization": { "mode": "AlwaysAllow" },
            "podLogsDir": p(&self.pod_logs_dir),
            "volumePluginDir": p(&self.root.join("kubelet-plugins")),
            "resolvConf": "",
            "failSwapOn": false,
            "protectKernelDefaults": false,
            "nodeStatusUpdateFrequency": "2s",
            "syncFrequency": "5s",
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": { "memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%", "nodefs.inodesFree": "1%" },
            "serializeImagePulls": false,
        });
        write(&self.root.join("kubelet/config.yaml"), serde_json::to_string_pretty(&kubelet_config).expect("JSON"))?;
        let mut kubelet_args = vec![
            format!("--config={}", p(&self.root.join("kubelet/config.yaml"))),
            format!("--kubeconfig={kc}"),
            format!("--root-dir={}", p(&self.root.join("var/lib/kubelet"))),
            format!("--cert-dir={}", p(&self.root.join("kubelet/pki"))),
            format!("--node-ip={ip}"),
            format!("--hostname-override={}", self.name),
            "--v=1".into(),
        ];
        if !options.taints.is_empty() {
            kubelet_args.push(format!("--register-with-taints={}", options.taints.join(",")));
        }
        self.spawn("kubelet", &bins.join("kubelet"), &kubelet_args)?;

        // Ready: the node registered Ready, and the default service account exists (pods
        // are admitted only after the controller-manager made it).
        let client = self.client().await?;
        let nodes: Api<KubeNode> = Api::all(client.clone());
        let sas: Api<ServiceAccount> = Api::namespaced(client, "default");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let ready = match nodes.get_opt(&self.name).await {
                Ok(Some(n)) => node_ready(&n),
                _ => false,
            };
            if ready && matches!(sas.get_opt("default").await, Ok(Some(_))) {
                break;
            }
            self.check_processes()?;
            if Instant::now() > deadline {
                return Err(NodeError::Timeout(format!("node {} not Ready within {READY_TIMEOUT:?}", self.name)));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if options.network == ClusterNetwork::Flannel {
            // flanneld exits when its node has no podCIDR yet (k3s starts it after).
            loop {
                let node = nodes.get_opt(&self.name).await.ok().flatten();
                if node.and_then(|n| n.spec).and_then(|s| s.pod_cidr).is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(NodeError::Timeout(format!("node {} got no podCIDR", self.name)));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            self.start_flanneld(&node_bridge, &subnet_file)?;
        }
        Ok(())
    }

    /// flanneld as k3s runs it for its node: the kube subnet manager (it waits for the
    /// kubelet's Node and its podCIDR), host-gw, no iptables rules of its own (no
    /// masquerade, no FORWARD accepts: nothing leaves this node). Returns once it wrote
    /// the subnet file the flannel plugin reads.
    fn start_flanneld(&mut self, iface: &str, subnet_file: &Path) -> Result<(), NodeError> {
        let net_conf = self.root.join("etc/kube-flannel/net-conf.json");
        write(&net_conf, json!({ "Network": FLANNEL_NETWORK, "Backend": { "Type": "host-gw" } }).to_string())?;
        let p = |path: &Path| path.to_string_lossy().into_owned();
        let args = [
            "--kube-subnet-mgr".to_owned(),
            format!("--kubeconfig-file={}", p(&self.kubeconfig)),
            format!("--iface={iface}"),
            format!("--net-config-path={}", p(&net_conf)),
            format!("--subnet-file={}", p(subnet_file)),
            "--ip-masq=false".into(),
            "--iptables-forward-rules=false".into(),
        ];
        let name = self.name.clone();
        self.spawn_env("flanneld", &cnis_bin_dir().join("flanneld"), &args, &[("NODE_NAME", &name)])?;
        wait_for(Duration::from_secs(60), "flanneld's subnet file", || subnet_file.exists())
    }

    /// The kubelet's cgroupRoot, under every hierarchy.
    pub(crate) fn make_cgroups(&self) -> Result<(), NodeError> {
        for mount in crate::node_state::cgroup_mounts() {
            let dir = mount.join(&self.name);
            std::fs::create_dir_all(&dir).map_err(|e| NodeError::io(&dir, e))?;
            // A new v1 cpuset cgroup has no CPUs or memory nodes: nothing could join it.
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(v) = std::fs::read_to_string(mount.join(file)) {
                    std::fs::write(dir.join(file), v.trim()).map_err(|e| NodeError::io(&dir.join(file), e))?;
                }
            }
        }
        Ok(())
    }

    /// What kube-proxy does for the `kubernetes` Service: 10.96.0.1:443 to the API
    /// server (a DNAT in the node's nat chain).
    pub fn route_service(&self) -> Result<(), NodeError> {
        let to = format!("{}:{}", self.node_ip, self.api_port);
        let service = format!("{SERVICE_IP}/32");
        let rule = ["-d", &service, "-p", "tcp", "--dport", "443", "-j", "DNAT", "--to-destination", &to];
        run("iptables", &[&["-t", "nat", "-A", &self.state.chain][..], &rule].concat()).map(drop)
    }

    /// Drops what [`Node::route_service`] added, as a reboot drops kube-proxy's rules.
    pub fn unroute_service(&self) -> Result<(), NodeError> {
        run("iptables", &["-t", "nat", "-F", &self.state.chain]).map(drop)
    }

    /// Where this node's containerd keeps pods' network namespaces
    /// (`netns_mounts_under_state_dir`): the path it passes the plugin as CNI_NETNS.
    pub fn runtime_netns_dir(&self) -> PathBuf {
        self.root.join("containerd/state/io.containerd.grpc.v1.cri/netns")
    }

    /// Makes [`Node::runtime_netns_dir`] a shared mount point before containerd starts:
    /// the chart mounts it into our DaemonSet pod (`cni.netnsDirs`) with HostToContainer
    /// propagation, which the runtime refuses on a private mount (the node's root is in
    /// /tmp, on the private `/`). The teardown's unmounts take it with the rest.
    pub(crate) fn share_runtime_netns_dir(&self) -> Result<(), NodeError> {
        let dir = self.runtime_netns_dir();
        std::fs::create_dir_all(&dir).map_err(|e| NodeError::io(&dir, e))?;
        crate::net::bind_shared(&dir, &dir).map_err(|e| NodeError::io(&dir, e))
    }

    /// The host precondition of the chart's HostToContainer mount of the netns dir,
    /// established here instead of inherited from whatever ran `ip netns add` before.
    fn share_netns_dir(&mut self) -> Result<(), NodeError> {
        self.state.netns_dir = crate::node_state::netns_dir_change();
        self.state.save()?;
        crate::node_state::share_netns_dir(self.state.netns_dir)
    }

    /// eBPF mode's places on this node, as `(bpffs, cgroup)`, both shared mounts under
    /// the node's root (the DaemonSet mounts them with Bidirectional propagation, and
    /// the host's cgroup2 mount is not shared): a bpffs of its own at `<root>/bpffs`
    /// (pins never meet the host's) and at `<root>/cgroup2` a bind of the node's cgroup
    /// in the cgroup2 hierarchy, under which runc puts every pod's processes, so the
    /// programs attached there see the node's pods only. The teardown's unmounts free
    /// whatever is left in them.
    pub fn ebpf_paths(&self) -> Result<(PathBuf, PathBuf), NodeError> {
        let (bpffs, cgroup) = (self.root.join("bpffs"), self.root.join("cgroup2"));
        for dir in [&bpffs, &cgroup] {
            std::fs::create_dir_all(dir).map_err(|e| NodeError::io(dir, e))?;
        }
        crate::net::mount_bpffs(&bpffs).map_err(|e| NodeError::io(&bpffs, e))?;
        let cgroup2 = crate::net::cgroup2_mount().ok_or_else(|| NodeError::Setup("no cgroup2 mounted".into()))?;
        crate::net::bind_shared(&cgroup2.join(&self.name), &cgroup).map_err(|e| NodeError::io(&cgroup, e))?;
        Ok((bpffs, cgroup))
    }

    /// Resident memory of every process started with the node's root in its command
    /// line or running in its cgroup (the control plane, the runtime, every pod), in MiB.
    pub fn memory_mib(&self) -> u64 {
        let needle = self.root.to_string_lossy().into_owned();
        let mut kib = 0;
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
            let cgroup = std::fs::read_to_string(entry.path().join("cgroup")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) || cgroup.contains(&self.name) {
                let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
                if let Some(rss) = status.lines().find_map(|l| l.strip_prefix("VmRSS:")) {
                    kib += rss.trim().trim_end_matches(" kB").trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
        kib / 1024
    }

    /// Runs `ctr -n k8s.io ARGS` against the node's containerd.
    pub fn ctr(&self, args: &[&str]) -> Result<String, NodeError> {
        let socket = self.ctr_socket.to_string_lossy().into_owned();
        let ctr = node_bin_dir().join("ctr").to_string_lossy().into_owned();
        run(&ctr, &[&["--address", &socket, "-n", "k8s.io"], args].concat())
    }

    /// Fails when one of the node's processes has died (with its log's tail).
    pub fn check_processes(&self) -> Result<(), NodeError> {
        for p in &self.state.processes {
            if start_time(p.pid) != Some(p.start_time) {
                return Err(NodeError::Setup(format!("{} exited; {}", p.name, self.logs_tail())));
            }
        }
        Ok(())
    }

    /// An admin (system:masters) client.
    pub async fn client(&self) -> Result<Client, NodeError> {
        let kc = Kubeconfig::read_from(&self.kubeconfig).map_err(|e| NodeError::Setup(format!("kubeconfig: {e}")))?;
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| NodeError::Setup(format!("kubeconfig: {e}")))?;
        Client::try_from(config).map_err(|e| NodeError::Setup(format!("client: {e}")))
    }

    /// Stops and removes everything (the same as drop, but reporting failures). The
    /// host lock comes back: compare the host while holding it ([`HostLock::changes`]).
    pub fn down(mut self) -> Result<HostLock, NodeError> {
        self.armed = false;
        teardown_state(&self.state)?;
        Ok(self.into_host_lock())
    }

    /// [`Node::down`] for a test: panics unless the teardown leaves nothing of the node
    /// ([`leftovers`]) and the host as it was before the node; returns how long it took.
    pub fn down_leaving_the_host_as_it_was(self) -> Duration {
        let (root, name) = (self.root.clone(), self.name.clone());
        let start = Instant::now();
        let host = self.down().unwrap_or_else(|e| panic!("teardown: {e}"));
        let took = start.elapsed();
        let left = leftovers(&root, &name);
        assert!(left.is_empty(), "left behind: {left:#?}");
        assert_eq!(host.changes(), Vec::<String>::new(), "the host is as it was");
        took
    }

    /// Forgets the node without stopping it, as a crash of this process would: only
    /// [`teardown`] from the state file can then remove it. The host lock comes back
    /// with its root, to hold until that teardown is done.
    pub fn abandon(mut self) -> (PathBuf, HostLock) {
        self.armed = false;
        let root = self.root.clone();
        (root, self.into_host_lock())
    }

    fn into_host_lock(mut self) -> HostLock {
        self.host.take().expect("the lock is held while the node lives")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.armed
            && let Err(e) = teardown_state(&self.state)
        {
            eprintln!("node {}: {e}", self.name);
        }
    }
}

/// Runs the calling test (`test`, its name for `--exact`) again in a child process, in
/// a private mount namespace where the netns dir is no mount point: the host a user
/// has before anything ran `ip netns add` (CI's earlier tests would have made it one).
/// Returns `true` in that child, where the test goes on; in the parent, `false` once
/// the child passed (it panics when the child failed).
pub fn as_on_a_fresh_host(test: &str) -> bool {
    const CHILD: &str = "KMC_FRESH_HOST_CHILD";
    let dir = Path::new(crate::node_state::NETNS_DIR);
    if std::env::var_os(CHILD).is_some() {
        // Only this namespace's copies go: the host's mounts are untouched.
        while crate::node_state::propagation(dir).is_some() {
            let c = std::ffi::CString::new(crate::node_state::NETNS_DIR).expect("no NUL");
            // SAFETY: umount2(2) with a NUL-terminated path.
            let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            assert_eq!(
                rc,
                0,
                "unmounting {} in the private namespace: {}",
                dir.display(),
                std::io::Error::last_os_error()
            );
        }
        return true;
    }
    let exe = std::env::current_exe().expect("the test binary");
    let status = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--"])
        .arg(exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .status()
        .expect("unshare runs");
    assert!(status.success(), "{test} as on a fresh host (no {} mount point): {status}", dir.display());
    false
}

/// Tears down the node whose root is `root`, from its state file alone.
pub fn teardown(root: &Path) -> Result<(), NodeError> {
    teardown_state(&State::load(root)?)
}

pub fn node_ready(node: &KubeNode) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn wait_for(timeout: Duration, what: &str, mut ok: impl FnMut() -> bool) -> Result<(), NodeError> {
    let deadline = Instant::now() + timeout;
    while !ok() {
        if Instant::now() > deadline {
            return Err(NodeError::Timeout(what.to_string()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn kubeconfig(server: &str, pki: &crate::node_pki::Pki) -> String {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kmc-node\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {}\n    \
         client-key-data: {}\ncontexts:\n- name: admin\n  context:\n    cluster: kmc-node\n    user: admin\n\
         current-context: admin\n",
        b64(&pki.ca_pem),
        b64(&pki.admin_cert_pem),
        b64(&pki.admin_key_pem)
    )
}

/// containerd v2 (config version 3), every path under `dir`. `restrict_oom_score_adj`:
/// root here lacks CAP_SYS_RESOURCE, and runc fails every sandbox without it.
fn containerd_config(dir: &Path, cni_bin: &Path, cni_conf: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 3
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs", "io.containerd.nri.v1.nri",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[plugins.'io.containerd.internal.v1.opt']
  path = "{d}/opt"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{PAUSE_IMAGE}"

[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{cni_bin}"]
    conf_dir = "{cni_conf}"
    max_conf_num = 1
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        Root = "{d}/runc"
        SystemdCgroup = false

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#,
        cni_bin = cni_bin.display(),
        cni_conf = cni_conf.display(),
    )
}
