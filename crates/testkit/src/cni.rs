//! The reference CNI runtime (`cni-runtime`, a CLI over libcni) driving real plugins.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::Deserialize;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::net::NamedNetns;
use crate::{bin_dir, unique_suffix};

/// Which build of the reference plugins a chain uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plugins {
    /// Debian's `containernetworking-plugins` 1.1.1 in /usr/lib/cni: CNI up to 1.0.0,
    /// no STATUS or GC. What many nodes still run.
    Debian,
    /// containernetworking/plugins v1.10.0, built by `scripts/testenv-build.sh`:
    /// CNI 1.1.0 with STATUS and GC.
    Upstream,
}

impl Plugins {
    pub fn dir(self) -> PathBuf {
        match self {
            Plugins::Debian => PathBuf::from("/usr/lib/cni"),
            Plugins::Upstream => bin_dir().join("plugins"),
        }
    }

    /// The newest CNI spec version these plugins speak.
    pub fn cni_version(self) -> &'static str {
        match self {
            Plugins::Debian => "1.0.0",
            Plugins::Upstream => "1.1.0",
        }
    }
}

/// What a runtime knows about one pod sandbox's network attachment: the CNI_* values
/// and the kubelet-like CNI_ARGS.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub netns: PathBuf,
    pub container_id: String,
    pub ifname: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
}

impl Attachment {
    /// `eth0` of pod `namespace/name` in `netns`, with a fresh container ID and UID.
    pub fn new(netns: &NamedNetns, pod_namespace: &str, pod_name: &str) -> Attachment {
        Attachment {
            netns: PathBuf::from(netns.path()),
            container_id: format!("kmc{}{}", unique_suffix(), unique_suffix()),
            ifname: "eth0".into(),
            pod_namespace: pod_namespace.into(),
            pod_name: pod_name.into(),
            pod_uid: format!("{}-0000-4000-8000-0000{}", unique_suffix(), unique_suffix()),
        }
    }
}

/// A CNI error as the runtime reports it. `code`/`msg`/`details` are the plugin's
/// error JSON; `code` is `None` when the failure was not a plugin's error result
/// (plugin binary missing, bad config, ...), and `stderr` then says why.
#[derive(Debug, Clone, Deserialize)]
pub struct CniError {
    pub code: Option<u32>,
    #[serde(default)]
    pub msg: String,
    #[serde(default)]
    pub details: String,
    #[serde(skip)]
    pub stderr: String,
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(code) => write!(f, "CNI error {code}: {} {}", self.msg, self.details),
            None => write!(f, "cni-runtime failed: {}", self.stderr.trim()),
        }
    }
}

impl std::error::Error for CniError {}

/// A conflist, the plugin dirs to search and a private state dir (libcni cache,
/// host-local `dataDir`), all removed on drop, together with any host bridge the chain
/// created and any attachment still added (DEL is run for it, best effort).
pub struct CniRuntime {
    dir: TempDir,
    /// The conflist, or (with `net_dir`) the configuration dir to load it from.
    conflist: PathBuf,
    net_dir: bool,
    plugin_dirs: Vec<PathBuf>,
    bridge: Option<String>,
    added: Mutex<Vec<Attachment>>,
}

impl CniRuntime {
    /// `bridge` (host bridge `kmc-br-xxxxxxxx`, no gateway address, no masquerade)
    /// with `host-local` IPAM on a fresh /24 of 198.18.0.0/15 and a private `dataDir`,
    /// then `portmap` (a no-op without port mappings). Speaks
    /// [`Plugins::cni_version`]. Without a gateway the bridge plugin changes nothing on
    /// the host but the bridge and the veth ends; give it one through
    /// [`CniRuntime::set_conflist`] if a test needs to reach the pod from the host.
    pub fn bridge(plugins: Plugins) -> CniRuntime {
        let bridge = format!("kmc-br-{}", unique_suffix());
        let b = bridge.clone();
        let mut rt = CniRuntime::custom(vec![plugins.dir()], move |dir| {
            json!({
                "cniVersion": plugins.cni_version(),
                "name": format!("kmc-test-{}", unique_suffix()),
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": b,
                        "isGateway": false,
                        "ipMasq": false,
                        "ipam": {
                            "type": "host-local",
                            "dataDir": dir.join("ipam"),
                            "ranges": [[{"subnet": test_subnet()}]],
                        },
                    },
                    {"type": "portmap", "capabilities": {"portMappings": true}},
                ],
            })
        });
        rt.bridge = Some(bridge);
        rt
    }

    /// `ptp` (a veth pair with a host route) with `host-local` IPAM as in
    /// [`CniRuntime::bridge`]. Note that ptp turns on IPv4 forwarding on the host.
    pub fn ptp(plugins: Plugins) -> CniRuntime {
        CniRuntime::custom(vec![plugins.dir()], move |dir| {
            json!({
                "cniVersion": plugins.cni_version(),
                "name": format!("kmc-test-{}", unique_suffix()),
                "plugins": [{
                    "type": "ptp",
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": dir.join("ipam"),
                        "ranges": [[{"subnet": test_subnet()}]],
                    },
                }],
            })
        })
    }

    /// Any conflist: `conflist` gets the private state dir (for `dataDir`s and the like).
    pub fn custom(plugin_dirs: Vec<PathBuf>, conflist: impl FnOnce(&Path) -> Value) -> CniRuntime {
        let dir = tempfile::Builder::new().prefix("kmc-cni-").tempdir().expect("creating temp dir");
        let rt = CniRuntime {
            conflist: dir.path().join("net.conflist"),
            net_dir: false,
            plugin_dirs,
            bridge: None,
            added: Mutex::new(Vec::new()),
            dir,
        };
        rt.set_conflist(&conflist(rt.dir.path()));
        rt
    }

    /// The configuration of `net_dir` as kubelet/containerd load it (the first valid
    /// file, read anew on every command): for tests of what an installer wrote there.
    /// `conflist`/`set_conflist` do not apply.
    pub fn net_dir(net_dir: &Path, plugin_dirs: Vec<PathBuf>) -> CniRuntime {
        let dir = tempfile::Builder::new().prefix("kmc-cni-").tempdir().expect("creating temp dir");
        CniRuntime {
            conflist: net_dir.to_owned(),
            net_dir: true,
            plugin_dirs,
            bridge: None,
            added: Mutex::new(Vec::new()),
            dir,
        }
    }

    /// Searches `dir` before the other plugin dirs (e.g. the dir of our own plugin).
    pub fn prepend_plugin_dir(&mut self, dir: impl Into<PathBuf>) {
        self.plugin_dirs.insert(0, dir.into());
    }

    pub fn conflist(&self) -> Value {
        let text = std::fs::read(&self.conflist).expect("reading conflist");
        serde_json::from_slice(&text).expect("conflist is JSON")
    }

    /// Replaces the conflist, e.g. to chain another plugin after the reference ones.
    pub fn set_conflist(&self, conflist: &Value) {
        std::fs::write(&self.conflist, serde_json::to_vec_pretty(conflist).unwrap()).expect("writing conflist");
    }

    /// Chains `entry` after the plugins already in the conflist.
    pub fn append_plugin(&self, entry: Value) {
        let mut conflist = self.conflist();
        conflist["plugins"].as_array_mut().expect("a conflist has a plugins list").push(entry);
        self.set_conflist(&conflist);
    }

    /// The private state dir (removed on drop); host-local keeps its leases in `ipam/`.
    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The host bridge this chain uses, if any (deleted on drop).
    pub fn bridge_name(&self) -> Option<&str> {
        self.bridge.as_deref()
    }

    /// ADD: the chain's result JSON.
    pub fn add(&self, a: &Attachment) -> Result<Value, CniError> {
        // Recorded before the call: a failed ADD may leave state that DEL must undo.
        self.added.lock().unwrap().push(a.clone());
        let out = self.run("add", Some(a), &[])?;
        Ok(serde_json::from_slice(&out.stdout).expect("ADD result is JSON"))
    }

    pub fn check(&self, a: &Attachment) -> Result<(), CniError> {
        self.run("check", Some(a), &[]).map(drop)
    }

    pub fn del(&self, a: &Attachment) -> Result<(), CniError> {
        let result = self.run("del", Some(a), &[]).map(drop);
        if result.is_ok() {
            self.added.lock().unwrap().retain(|x| x.container_id != a.container_id || x.ifname != a.ifname);
        }
        result
    }

    /// STATUS (CNI 1.1.0; libcni skips it for older conflists).
    pub fn status(&self) -> Result<(), CniError> {
        self.run("status", None, &[]).map(drop)
    }

    /// GC: libcni DELs every cached attachment of this network not in `valid`, then
    /// sends GC with `cni.dev/valid-attachments` to each plugin (CNI 1.1.0).
    pub fn gc(&self, valid: &[&Attachment]) -> Result<(), CniError> {
        let args: Vec<String> = valid
            .iter()
            .flat_map(|a| ["--valid-attachment".to_string(), format!("{}:{}", a.container_id, a.ifname)])
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run("gc", None, &args).map(drop)
    }

    /// Runs `cni-runtime COMMAND` and returns its output when it exits 0.
    pub fn run(&self, command: &str, a: Option<&Attachment>, extra: &[&str]) -> Result<Output, CniError> {
        let mut cmd = Command::new(bin_dir().join("cni-runtime"));
        cmd.arg(if self.net_dir { "--net-dir" } else { "--conflist" })
            .arg(&self.conflist)
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"));
        for d in &self.plugin_dirs {
            cmd.arg("--bin-dir").arg(d);
        }
        if let Some(a) = a {
            cmd.arg("--netns").arg(&a.netns);
            cmd.args(["--container-id", &a.container_id, "--ifname", &a.ifname]);
            cmd.args(["--pod-namespace", &a.pod_namespace, "--pod-name", &a.pod_name, "--pod-uid", &a.pod_uid]);
        }
        cmd.arg(command).args(extra);
        let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        match out.status.code() {
            Some(0) => Ok(out),
            // A plugin's error result: its JSON is on stdout.
            Some(2) => {
                let mut err: CniError = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                    panic!("cni-runtime error JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
                });
                err.stderr = stderr;
                Err(err)
            }
            _ => Err(CniError { code: None, msg: String::new(), details: String::new(), stderr }),
        }
    }
}

impl Drop for CniRuntime {
    fn drop(&mut self) {
        let leftovers = std::mem::take(&mut *self.added.lock().unwrap_or_else(|e| e.into_inner()));
        for a in &leftovers {
            if let Err(e) = self.run("del", Some(a), &[]) {
                eprintln!("testenv: cleanup DEL of {}: {e}", a.container_id);
            }
        }
        if let Some(bridge) = &self.bridge {
            // The bridge plugin never deletes its bridge; ignore "does not exist".
            let _ = Command::new("ip").args(["link", "delete", bridge]).output();
        }
    }
}

/// A /24 of 198.18.0.0/15 (reserved for benchmarking, so never a real network), distinct
/// for each chain of this process and random across processes.
pub fn test_subnet() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        u32::from_str_radix(&unique_suffix(), 16).unwrap() % 512,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % 512;
    format!("198.{}.{}.0/24", 18 + n / 256, n % 256)
}
