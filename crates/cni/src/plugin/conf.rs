//! Our fields of the network configuration (as the installer's template writes them).

use std::path::PathBuf;
use std::time::Duration;

use crate::proto::conf::invalid;
use crate::proto::{CniError, NetConf};
use netfilter::BackendChoice;
use serde_json::Value;

/// What to do with a pod when the API server cannot tell us what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnApiError {
    /// Let it start without a redirect (the default): a node whose API server is away
    /// still starts pods. A mesh pod started this way fails its validator and is
    /// repaired once the API is back.
    PassThrough,
    /// Fail ADD with "try again later": the runtime retries, and no pod (mesh or not)
    /// starts until the API answers.
    Fail,
}

#[derive(Debug, Clone)]
pub struct PluginConf {
    pub log_level: String,
    pub log_socket: PathBuf,
    pub log_file: PathBuf,
    pub run_dir: PathBuf,
    pub iptables_backend: BackendChoice,
    pub kubeconfig: Option<PathBuf>,
    pub exclude_namespaces: Vec<String>,
    pub lookup_timeout: Duration,
    pub on_api_error: OnApiError,
    /// The files a pod may name as its resolv.conf (`redirect.dns.resolvConfigPath`).
    pub dns_resolv_conf_paths: Vec<PathBuf>,
    /// eBPF mode (`"ebpf": {"bpffs_path": ..}`, written by the installer in that mode):
    /// the bpffs holding the programs' pins. `None`: iptables mode.
    pub ebpf_bpffs: Option<PathBuf>,
}

pub const DEFAULT_LOG_SOCKET: &str = "/run/kong-mesh-cni/log.sock";
pub const DEFAULT_LOG_FILE: &str = "/var/log/kong-mesh-cni/cni.log";
pub const DEFAULT_RUN_DIR: &str = "/run/kong-mesh-cni";
/// Well inside the runtime's own timeout (containerd and CRI-O give minutes), short
/// enough that a pod burst on a node cut off from the API does not pile up.
pub const DEFAULT_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

fn string(raw: &Value, path: &[&str]) -> Result<Option<String>, CniError> {
    let mut v = raw;
    for key in path {
        match v.get(key) {
            None | Some(Value::Null) => return Ok(None),
            Some(next) => v = next,
        }
    }
    v.as_str()
        .map(|s| Some(s.to_owned()))
        .ok_or_else(|| invalid(format!("field {} must be a string, not {v}", path.join("."))))
}

impl PluginConf {
    pub fn from_netconf(conf: &NetConf) -> Result<Self, CniError> {
        let raw = &conf.raw;
        let kubernetes = match raw.get("kubernetes") {
            None | Some(Value::Null) => &Value::Null,
            Some(v @ Value::Object(_)) => v,
            Some(other) => return Err(invalid(format!("field kubernetes must be an object, not {other}"))),
        };
        let exclude_namespaces = match kubernetes.get("exclude_namespaces") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| i.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| invalid("field kubernetes.exclude_namespaces must be a list of strings"))?,
            Some(_) => return Err(invalid("field kubernetes.exclude_namespaces must be a list of strings")),
        };
        let lookup_timeout = match kubernetes.get("lookup_timeout_ms") {
            None | Some(Value::Null) => DEFAULT_LOOKUP_TIMEOUT,
            Some(v) => match v.as_u64() {
                Some(ms @ 1..=120_000) => Duration::from_millis(ms),
                _ => return Err(invalid(format!("field kubernetes.lookup_timeout_ms must be 1..=120000, not {v}"))),
            },
        };
        let on_api_error = match string(raw, &["on_api_error"])?.as_deref() {
            None | Some("pass-through") => OnApiError::PassThrough,
            Some("fail") => OnApiError::Fail,
            Some(other) => {
                return Err(invalid(format!("field on_api_error must be pass-through or fail, not {other:?}")));
            }
        };
        let iptables_backend = string(raw, &["iptables_backend"])?
            .unwrap_or_default()
            .parse()
            .map_err(|e: netfilter::FirewallError| invalid(format!("field iptables_backend: {e}")))?;
        let dns_resolv_conf_paths = match raw.get("dns_resolv_conf_paths") {
            None | Some(Value::Null) => vec![PathBuf::from(kuma::DEFAULT_RESOLV_CONF)],
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| i.as_str().filter(|p| p.starts_with('/')).map(PathBuf::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| invalid("field dns_resolv_conf_paths must be a list of absolute paths"))?,
            Some(_) => return Err(invalid("field dns_resolv_conf_paths must be a list of absolute paths")),
        };
        let ebpf_bpffs = match raw.get("ebpf") {
            None | Some(Value::Null) => None,
            Some(Value::Object(_)) => match string(raw, &["ebpf", "bpffs_path"])? {
                Some(p) if p.starts_with('/') => Some(PathBuf::from(p)),
                _ => return Err(invalid("field ebpf.bpffs_path must be an absolute path")),
            },
            Some(other) => return Err(invalid(format!("field ebpf must be an object, not {other}"))),
        };
        let path = |key: &str, default: &str| -> Result<PathBuf, CniError> {
            Ok(string(raw, &[key])?.unwrap_or_else(|| default.to_owned()).into())
        };
        Ok(PluginConf {
            log_level: string(raw, &["log_level"])?.unwrap_or_else(|| "info".to_owned()),
            log_socket: path("log_socket", DEFAULT_LOG_SOCKET)?,
            log_file: path("log_file", DEFAULT_LOG_FILE)?,
            run_dir: path("run_dir", DEFAULT_RUN_DIR)?,
            iptables_backend,
            kubeconfig: string(kubernetes, &["kubeconfig"])?.map(PathBuf::from),
            exclude_namespaces,
            lookup_timeout,
            on_api_error,
            dns_resolv_conf_paths,
            ebpf_bpffs,
        })
    }
}

impl Default for PluginConf {
    /// What DEL works with when the configuration's own fields are invalid.
    fn default() -> Self {
        PluginConf {
            log_level: "info".to_owned(),
            log_socket: DEFAULT_LOG_SOCKET.into(),
            log_file: DEFAULT_LOG_FILE.into(),
            run_dir: DEFAULT_RUN_DIR.into(),
            iptables_backend: BackendChoice::Auto,
            kubeconfig: None,
            exclude_namespaces: Vec::new(),
            lookup_timeout: DEFAULT_LOOKUP_TIMEOUT,
            on_api_error: OnApiError::PassThrough,
            dns_resolv_conf_paths: vec![PathBuf::from(kuma::DEFAULT_RESOLV_CONF)],
            ebpf_bpffs: None,
        }
    }
}
