//! A simulated node in temporary directories: the host's CNI configuration dir with a
//! primary CNI's conflist (real reference plugins), the host's CNI bin dir, and our
//! installer running against them as the DaemonSet's container would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// The primary CNI's file, as a bridge-based CNI would install it.
pub const PRIMARY: &str = "10-demo-bridge.conflist";

pub struct Node {
    pub dir: tempfile::TempDir,
    pub bridge: String,
    installer: Option<Child>,
}

impl Node {
    pub fn net_dir(&self) -> PathBuf {
        self.dir.path().join("net.d")
    }
    pub fn bin_dir(&self) -> PathBuf {
        self.dir.path().join("bin")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }
    pub fn primary(&self) -> PathBuf {
        self.net_dir().join(PRIMARY)
    }
    pub fn ready_file(&self) -> PathBuf {
        self.dir.path().join("ready")
    }
    pub fn log_file(&self) -> PathBuf {
        self.dir.path().join("cni.log")
    }

    /// Lays the node out: net dir with the primary conflist, empty bin dir.
    pub fn new(bridge: &str, subnet: &str) -> Result<Node> {
        let node = Node {
            dir: tempfile::Builder::new().prefix("kmc-demo-").tempdir()?,
            bridge: bridge.to_owned(),
            installer: None,
        };
        for d in [node.net_dir(), node.bin_dir(), node.run_dir()] {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(node.primary(), serde_json::to_string_pretty(&primary_conflist(&node, subnet))? + "\n")?;
        Ok(node)
    }

    /// Starts `kong-mesh-cni install` with the DaemonSet's environment, pointed at this
    /// node, and waits for its ready file. The plugin's entry names `iptables_backend`
    /// when given.
    pub fn start_installer(
        &mut self,
        binary: &Path,
        api: &ApiAccess,
        iptables_backend: Option<&str>,
    ) -> Result<Duration> {
        let mut template = json!({
            "cniVersion": "0.3.1",
            "name": "kong-mesh-cni",
            "type": "kong-mesh-cni",
            "log_level": "info",
            "log_socket": self.run_dir().join("log.sock"),
            "log_file": self.log_file(),
            "run_dir": self.run_dir(),
            "kubernetes": {"kubeconfig": "__KUBECONFIG_FILEPATH__", "exclude_namespaces": ["kube-system"]},
        });
        if let Some(backend) = iptables_backend {
            template["iptables_backend"] = backend.into();
        }
        let started = Instant::now();
        let child = Command::new(binary)
            .arg("install")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_NET_DIR", self.net_dir())
            .env("MOUNTED_CNI_NET_DIR", self.net_dir())
            .env("MOUNTED_CNI_BIN_DIR", self.bin_dir())
            .env("CNI_CONF_NAME", PRIMARY)
            .env("CNI_NETWORK_CONFIG", template.to_string())
            .env("KUBE_CA_FILE", &api.ca_file)
            .env("KUBE_SERVICE_ACCOUNT_TOKEN_PATH", &api.token_file)
            .env("KUBERNETES_SERVICE_HOST", &api.host)
            .env("KUBERNETES_SERVICE_PORT", &api.port)
            .env("CNI_READY_FILE", self.ready_file())
            .env("KMC_LOG_SOCKET", self.run_dir().join("log.sock"))
            .env("KMC_HEALTH_PORT", "0")
            // No DaemonSet runs this installer: its SIGTERM stands for an uninstall.
            .env("KMC_UNINSTALL_ON_SIGTERM", "always")
            .env("CNI_LOG_LEVEL", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(self.dir.path().join("installer.log"))?))
            .spawn()
            .context("starting the installer")?;
        self.installer = Some(child);
        // A bound, not a measurement (the report shows the time): generous for a loaded machine.
        wait_for(Duration::from_secs(60), || self.ready_file().exists())
            .context("the installer did not become ready")?;
        Ok(started.elapsed())
    }

    /// SIGTERM to the installer, as the kubelet sends when the DaemonSet pod goes.
    pub fn stop_installer(&mut self) -> Result<()> {
        if let Some(mut child) = self.installer.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let status = child.wait()?;
            if !status.success() {
                bail!("the installer exited with {status} on SIGTERM");
            }
        }
        Ok(())
    }

    /// The installer's stderr so far (it includes the plugin's relayed log lines).
    pub fn installer_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("installer.log")).unwrap_or_default()
    }

    pub fn primary_conf(&self) -> Result<Value> {
        Ok(serde_json::from_slice(&std::fs::read(self.primary())?)?)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.installer.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The bridge plugin never deletes its bridge.
        let _ = Command::new("ip").args(["link", "delete", &self.bridge]).output();
    }
}

/// What the installer needs to reach the API server, as a pod's service account has it.
pub struct ApiAccess {
    pub host: String,
    pub port: String,
    pub ca_file: PathBuf,
    pub token_file: PathBuf,
}

/// bridge + host-local + portmap. The bridge holds no address and the host gets no
/// route or sysctl change; host-local hands out a default route through the subnet's
/// first address, so pods can address anything, as on a real node.
fn primary_conflist(node: &Node, subnet: &str) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "demo-bridge",
        "plugins": [
            {
                "type": "bridge",
                "bridge": node.bridge,
                "isGateway": false,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "dataDir": node.dir.path().join("ipam"),
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ],
    })
}

pub fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> Result<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return Ok(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    bail!("not within {limit:?}")
}
