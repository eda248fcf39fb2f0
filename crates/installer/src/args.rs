//! `kong-mesh-cni install` flags. Each takes the environment variable of the Go
//! installer's contract (DESIGN.md), so the chart's DaemonSet works unchanged; the
//! `KMC_*` ones are ours.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser, ValueEnum};

use crate::InstallError;
use crate::kubeconfig::server_url;
use crate::template::{DEFAULT_TEMPLATE, Ours};

/// The standalone conf's name when `CNI_CONF_NAME` is empty (the chart's default).
pub const DEFAULT_STANDALONE_NAME: &str = "kuma-cni.conf";

#[derive(Parser, Debug, Clone)]
#[command(about = "Install the CNI plugin on this node and keep it chained until SIGTERM")]
pub struct InstallArgs {
    /// The primary CNI's configuration file to chain into (`X.conf` falls back to
    /// `X.conflist`); empty: the first valid .conf/.conflist in sorted order. In
    /// standalone mode, the name of our own conf (default kuma-cni.conf).
    #[arg(long, env = "CNI_CONF_NAME", default_value = "")]
    pub cni_conf_name: String,
    /// Chain into the primary CNI's configuration (true), or write our own conf (false:
    /// Multus, OpenShift).
    #[arg(long, env = "CHAINED_CNI_PLUGIN", default_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub chained_cni_plugin: bool,
    /// Our plugin's configuration; `__KUBECONFIG_FILEPATH__` is replaced by the
    /// kubeconfig's host path, and `type` names the binary.
    #[arg(long, env = "CNI_NETWORK_CONFIG", default_value = DEFAULT_TEMPLATE, hide_default_value = true)]
    pub cni_network_config: String,
    /// The CNI configuration dir as the host sees it (paths written into our conf).
    #[arg(long, env = "CNI_NET_DIR", default_value = "/etc/cni/net.d")]
    pub cni_net_dir: PathBuf,
    /// The same dir as mounted in this container (where files are written).
    #[arg(long, env = "MOUNTED_CNI_NET_DIR", default_value = "/host/etc/cni/net.d")]
    pub mounted_cni_net_dir: PathBuf,
    /// The host's CNI bin dir as mounted in this container.
    #[arg(long, env = "MOUNTED_CNI_BIN_DIR", default_value = "/host/opt/cni/bin")]
    pub mounted_cni_bin_dir: PathBuf,
    /// A second bin dir that gets the binary too, when it exists (mounted by the chart
    /// for runtimes that look elsewhere).
    #[arg(long, env = "KMC_SECONDARY_BIN_DIR", default_value = "/host/secondary-bin-dir")]
    pub secondary_bin_dir: PathBuf,
    /// File name of the plugin's kubeconfig in the net dir.
    #[arg(long, env = "KUBECFG_FILE_NAME", default_value = "ZZZ-kuma-cni-kubeconfig")]
    pub kubecfg_file_name: String,
    #[arg(long, env = "KUBE_CA_FILE", default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")]
    pub kube_ca_file: PathBuf,
    #[arg(
        long,
        env = "KUBE_SERVICE_ACCOUNT_TOKEN_PATH",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub kube_service_account_token_path: PathBuf,
    #[arg(long, env = "KUBERNETES_SERVICE_HOST", default_value = "")]
    pub kubernetes_service_host: String,
    #[arg(long, env = "KUBERNETES_SERVICE_PORT", default_value = "443")]
    pub kubernetes_service_port: String,
    #[arg(long, env = "KUBERNETES_SERVICE_PROTOCOL", default_value = "https")]
    pub kubernetes_service_protocol: String,
    /// Backstop check of everything, in seconds (or `500ms`), besides the file watch.
    #[arg(long, env = "CFGCHECK_INTERVAL", default_value = "1", value_parser = ops::duration)]
    pub cfgcheck_interval: Duration,
    /// Re-read the service-account token this often (seconds), besides watching it.
    #[arg(long, env = "REFRESH_SA_TOKEN_INTERVAL", default_value = "60", value_parser = ops::duration)]
    pub refresh_sa_token_interval: Duration,
    /// Keep running, watching and repairing, until SIGTERM (false: install once, exit).
    #[arg(long, env = "SLEEP", default_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub sleep: bool,
    /// Present exactly while the binary, kubeconfig and chain are in place.
    #[arg(long, env = "CNI_READY_FILE", default_value = "/tmp/ready")]
    pub cni_ready_file: PathBuf,
    /// Port of /healthz, /readyz and /metrics; 0 disables them.
    #[arg(long, env = "KMC_HEALTH_PORT", default_value_t = 9081)]
    pub health_port: u16,
    /// The address they listen on; empty: every address (IPv6 and IPv4).
    #[arg(long, env = "KMC_HEALTH_ADDRESS", default_value = "", value_parser = parse_address)]
    pub health_address: Address,
    /// Unix socket the plugin sends its log lines to; they are copied to our stderr.
    /// Must be the path the plugin's `log_socket` names, on a dir shared with the host.
    /// Empty: no relay (the plugin then logs to its file on the host).
    #[arg(long, env = "KMC_LOG_SOCKET", default_value = "/run/kong-mesh-cni/log.sock")]
    pub log_socket: PathBuf,
    /// The log level as a file to follow while running (the chart's ConfigMap key
    /// `logLevel`, mounted): a change applies to us, the relay and the next plugin
    /// calls, no restart. Empty: CNI_LOG_LEVEL, fixed.
    #[arg(long, env = "KMC_LOG_LEVEL_FILE", default_value = "")]
    pub log_level_file: String,
    /// Repairs within --repair-window that run at once; past that another agent is
    /// reverting us: repairs are spaced out and a warning names the file.
    #[arg(long, env = "KMC_REPAIR_LIMIT", default_value_t = 10)]
    pub repair_limit: usize,
    #[arg(long, env = "KMC_REPAIR_WINDOW", default_value = "30", value_parser = ops::duration)]
    pub repair_window: Duration,
    /// This node's name (the chart passes `spec.nodeName` through the downward API).
    /// Set: the installer is also the node agent, watching this node's pods and
    /// answering the plugin's lookups from them. Empty: the plugin asks the API server.
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,
    /// The namespaces whose pods the node agent watches, comma-separated (the chart's
    /// `namespaceAllowList`, where the installer may read pods there only); empty: all.
    #[arg(long, env = "KMC_AGENT_NAMESPACES", default_value = "")]
    pub agent_namespaces: String,
    /// The node agent's socket; empty: `agent.sock` in the plugin's run dir (KMC_RUN_DIR,
    /// or the template's `run_dir`, default /run/kong-mesh-cni), where the plugin looks.
    #[arg(long, env = "KMC_AGENT_SOCKET", default_value = "")]
    pub agent_socket: String,
    /// The plugin's run dir as mounted in this container, where it leaves records of pods
    /// it let through without a redirect (programmed in place once the API answers).
    /// Empty: the `run_dir` of CNI_NETWORK_CONFIG, or the plugin's default.
    #[arg(long, env = "KMC_RUN_DIR", default_value = "")]
    pub run_dir: String,
    /// What SIGTERM removes. auto: everything on an uninstall (our DaemonSet is gone or
    /// being deleted), nothing on a rolling update (it is still there: the next pod
    /// takes over), nothing when the API server cannot tell. always / never: no question.
    #[arg(long, env = "KMC_UNINSTALL_ON_SIGTERM", value_enum, default_value = "auto")]
    pub uninstall_on_sigterm: Uninstall,
    /// Our DaemonSet's name (the chart's), asked about at SIGTERM.
    #[arg(long, env = "KMC_DAEMONSET_NAME", default_value = "kong-mesh-cni")]
    pub daemonset_name: String,
    /// Its namespace (the chart passes the pod's own); empty: the `namespace` file next to
    /// the service-account token.
    #[arg(long, env = "KMC_DAEMONSET_NAMESPACE", default_value = "")]
    pub daemonset_namespace: String,
    /// eBPF mode: load our redirect programs once for the node and chain the plugin to
    /// register mesh pods with them, instead of writing iptables rules in each pod.
    #[arg(long, env = "KMC_EBPF", default_value = "false", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub ebpf: bool,
    /// The node's bpffs (Kuma's `experimental.ebpf.bpffsPath`), mounted at the same
    /// path in this container: the plugin on the host opens the pins there too.
    #[arg(long, env = "KMC_EBPF_BPFFS_PATH", default_value = "/sys/fs/bpf")]
    pub ebpf_bpffs_path: PathBuf,
    /// The node's cgroup2 root (Kuma's `experimental.ebpf.cgroupPath`): the programs
    /// are attached there, so they see every pod's sockets.
    #[arg(long, env = "KMC_EBPF_CGROUP_PATH", default_value = "/sys/fs/cgroup")]
    pub ebpf_cgroup_path: PathBuf,
}

/// `KMC_UNINSTALL_ON_SIGTERM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Uninstall {
    Auto,
    Always,
    Never,
}

/// What to maintain in the net dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Our entry in the primary CNI's configuration (`None`: auto-detect the file).
    Chained { conf_name: Option<String> },
    /// Our conf, verbatim, under this name.
    Standalone { conf_name: String },
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    pub ours: Ours,
    /// The net dir as mounted here (where files are read and written).
    pub net_dir: PathBuf,
    /// The same dir as the host sees it: absolute symlinks in it name host paths.
    pub host_net_dir: PathBuf,
    /// Bin dirs that get the binary: the primary, and the secondary if it exists.
    pub bin_dirs: Vec<PathBuf>,
    pub binary_source: PathBuf,
    pub kubeconfig_name: String,
    pub server: String,
    pub ca_file: PathBuf,
    pub token_file: PathBuf,
    pub cfgcheck_interval: Duration,
    pub token_refresh_interval: Duration,
    pub sleep: bool,
    pub ready_file: PathBuf,
    pub health_port: u16,
    /// `None`: every address.
    pub health_address: Option<IpAddr>,
    pub log_socket: Option<PathBuf>,
    /// The level file to follow ([`crate::loglevel`]).
    pub log_level_file: Option<PathBuf>,
    /// The level we started at (CNI_LOG_LEVEL, set by the binary's global flag); `None`
    /// when it is a filter directive rather than one level.
    pub log_level: Option<ops::loglevel::Level>,
    /// CNI_LOG_FORMAT, set by the binary's global flag: the relay and the plugin follow it.
    pub log_format: ops::LogFormat,
    pub repair_limit: usize,
    pub repair_window: Duration,
    /// This node's name: the node agent runs when it is known.
    pub node_name: Option<String>,
    /// The namespaces the agent watches; empty: all.
    pub agent_namespaces: Vec<String>,
    pub agent_socket: PathBuf,
    /// The plugin's run dir, as mounted here.
    pub run_dir: PathBuf,
    pub uninstall: Uninstall,
    /// Our DaemonSet: (namespace, name); no namespace when none was given or found.
    pub daemonset: (Option<String>, String),
    /// eBPF mode: where the programs are pinned and attached. `None`: iptables mode.
    pub ebpf: Option<ebpf::Paths>,
}

impl Settings {
    pub fn from_args(args: InstallArgs) -> Result<Settings, InstallError> {
        let bad = |what: &str| InstallError::Setting(what.to_string());
        if args.kubernetes_service_host.is_empty() {
            return Err(bad("KUBERNETES_SERVICE_HOST is not set (the API server address for the plugin's kubeconfig)"));
        }
        for (var, name) in [("CNI_CONF_NAME", &args.cni_conf_name), ("KUBECFG_FILE_NAME", &args.kubecfg_file_name)] {
            if name.contains('/') || name == "." || name == ".." {
                return Err(bad(&format!("{var}={name:?} must be a file name in the net dir")));
            }
        }
        if args.kubecfg_file_name.is_empty() {
            return Err(bad("KUBECFG_FILE_NAME is empty"));
        }
        for (var, d) in [
            ("CFGCHECK_INTERVAL", args.cfgcheck_interval),
            ("REFRESH_SA_TOKEN_INTERVAL", args.refresh_sa_token_interval),
        ] {
            if d.is_zero() {
                return Err(bad(&format!("{var} must be greater than 0")));
            }
        }
        let host_kubeconfig = args.cni_net_dir.join(&args.kubecfg_file_name);
        let mut ours = Ours::render(&args.cni_network_config, &host_kubeconfig.to_string_lossy())?;
        let ebpf = args.ebpf.then_some(ebpf::Paths { bpffs: args.ebpf_bpffs_path, cgroup: args.ebpf_cgroup_path });
        if let Some(paths) = &ebpf {
            for (var, path) in [("KMC_EBPF_BPFFS_PATH", &paths.bpffs), ("KMC_EBPF_CGROUP_PATH", &paths.cgroup)] {
                if !path.is_absolute() {
                    return Err(bad(&format!("{var}={} must be an absolute path", path.display())));
                }
            }
            ours.set_ebpf(&paths.bpffs);
        }
        let run_dir = match args.run_dir.is_empty() {
            false => PathBuf::from(args.run_dir),
            true => run_dir_of(&ours)?,
        };
        let agent_socket = match args.agent_socket.is_empty() {
            true => run_dir.join(cni::agent::SOCKET_NAME),
            false => PathBuf::from(args.agent_socket),
        };
        let node_name = Some(args.node_name.trim().to_owned()).filter(|n| !n.is_empty());
        if let Some(node) = &node_name
            && (node.len() > 253 || node.contains(['/', ',', '=', ' ']))
        {
            return Err(bad(&format!("NODE_NAME={node:?} is not a node name")));
        }
        let agent_namespaces: Vec<String> =
            args.agent_namespaces.split(',').map(str::trim).filter(|n| !n.is_empty()).map(str::to_owned).collect();
        if let Some(ns) = agent_namespaces.iter().find(|ns| !kuma::pod::dns1123_label(ns)) {
            return Err(bad(&format!("KMC_AGENT_NAMESPACES: {ns:?} is not a namespace name")));
        }
        let conf_name = Some(args.cni_conf_name).filter(|n| !n.is_empty());
        let mode = match args.chained_cni_plugin {
            true if conf_name.as_deref().is_some_and(|n| !crate::conflist::is_conf_name(n)) => {
                return Err(bad("CNI_CONF_NAME must name a .conf or .conflist file to chain into"));
            }
            true => Mode::Chained { conf_name },
            false => Mode::Standalone { conf_name: conf_name.unwrap_or_else(|| DEFAULT_STANDALONE_NAME.into()) },
        };
        let daemonset_namespace = Some(args.daemonset_namespace).filter(|n| !n.is_empty()).or_else(|| {
            let file = args.kube_service_account_token_path.with_file_name("namespace");
            std::fs::read_to_string(file).ok().map(|n| n.trim().to_owned()).filter(|n| !n.is_empty())
        });
        let mut bin_dirs = vec![args.mounted_cni_bin_dir];
        if args.secondary_bin_dir.is_dir() {
            bin_dirs.push(args.secondary_bin_dir);
        }
        Ok(Settings {
            mode,
            ours,
            net_dir: args.mounted_cni_net_dir,
            host_net_dir: args.cni_net_dir,
            bin_dirs,
            binary_source: PathBuf::from("/proc/self/exe"),
            kubeconfig_name: args.kubecfg_file_name,
            server: server_url(
                &args.kubernetes_service_protocol,
                &args.kubernetes_service_host,
                &args.kubernetes_service_port,
            ),
            ca_file: args.kube_ca_file,
            token_file: args.kube_service_account_token_path,
            cfgcheck_interval: args.cfgcheck_interval,
            token_refresh_interval: args.refresh_sa_token_interval,
            sleep: args.sleep,
            ready_file: args.cni_ready_file,
            health_port: args.health_port,
            health_address: args.health_address.0,
            log_socket: Some(args.log_socket).filter(|p| !p.as_os_str().is_empty()),
            log_level_file: Some(args.log_level_file).filter(|p| !p.is_empty()).map(PathBuf::from),
            log_level: None,
            log_format: ops::LogFormat::Text,
            repair_limit: args.repair_limit,
            repair_window: args.repair_window,
            node_name,
            agent_namespaces,
            agent_socket,
            run_dir,
            uninstall: args.uninstall_on_sigterm,
            daemonset: (daemonset_namespace, args.daemonset_name),
            ebpf,
        })
    }

    /// The node agent's settings, when it is to run.
    pub fn agent(&self) -> Option<crate::agent::AgentSettings> {
        Some(crate::agent::AgentSettings {
            node_name: self.node_name.clone()?,
            namespaces: self.agent_namespaces.clone(),
            socket: self.agent_socket.clone(),
            identity: crate::api::Identity::new(self),
        })
    }
}

/// The run dir of the plugin rendered from `ours`: where it looks for the agent and
/// leaves its records.
fn run_dir_of(ours: &Ours) -> Result<PathBuf, InstallError> {
    let run_dir = match ours.conf.get("run_dir") {
        None | Some(serde_json::Value::Null) => cni::plugin::DEFAULT_RUN_DIR,
        Some(serde_json::Value::String(dir)) if dir.starts_with('/') => dir.as_str(),
        Some(other) => {
            return Err(InstallError::Template(format!("field run_dir must be an absolute path, not {other}")));
        }
    };
    Ok(PathBuf::from(run_dir))
}

/// An IP address, or none (empty).
#[derive(Debug, Clone, Copy)]
pub struct Address(pub Option<IpAddr>);

fn parse_address(text: &str) -> Result<Address, String> {
    match text.trim() {
        "" => Ok(Address(None)),
        ip => ip.parse().map(|ip| Address(Some(ip))).map_err(|_| format!("{ip:?} is not an IP address")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, InstallError> {
        let mut argv = vec!["install", "--kubernetes-service-host", "10.96.0.1"];
        argv.extend_from_slice(args);
        Settings::from_args(InstallArgs::try_parse_from(argv).map_err(|e| InstallError::Setting(e.to_string()))?)
    }

    #[test]
    fn defaults_follow_the_contract() {
        let s = parse(&[]).unwrap();
        assert_eq!(s.mode, Mode::Chained { conf_name: None });
        assert_eq!(s.net_dir, PathBuf::from("/host/etc/cni/net.d"));
        assert_eq!(s.bin_dirs[0], PathBuf::from("/host/opt/cni/bin"));
        assert_eq!(s.kubeconfig_name, "ZZZ-kuma-cni-kubeconfig");
        assert_eq!(s.ours.conf["kubernetes"]["kubeconfig"], "/etc/cni/net.d/ZZZ-kuma-cni-kubeconfig");
        assert_eq!(s.server, "https://10.96.0.1:443");
        assert_eq!((s.cfgcheck_interval, s.token_refresh_interval), (Duration::from_secs(1), Duration::from_secs(60)));
        assert!(s.sleep);
        assert_eq!(s.ready_file, PathBuf::from("/tmp/ready"));
        assert_eq!(s.run_dir, PathBuf::from("/run/kong-mesh-cni"));
        assert_eq!((s.uninstall, s.daemonset.1.as_str()), (Uninstall::Auto, "kong-mesh-cni"));
    }

    #[test]
    fn the_run_dir_is_the_plugins_unless_given() {
        let template = r#"{"type":"kong-mesh-cni","run_dir":"/var/run/kmc","kubernetes":{"kubeconfig":"__KUBECONFIG_FILEPATH__"}}"#;
        assert_eq!(parse(&["--cni-network-config", template]).unwrap().run_dir, PathBuf::from("/var/run/kmc"));
        let s = parse(&["--cni-network-config", template, "--run-dir", "/host/run/kmc"]).unwrap();
        assert_eq!(s.run_dir, PathBuf::from("/host/run/kmc"));
    }

    #[test]
    fn the_daemonsets_namespace_is_given_or_the_service_accounts() {
        let sa = tempfile::tempdir().unwrap();
        let token = sa.path().join("token");
        std::fs::write(sa.path().join("namespace"), "kong-mesh-system\n").unwrap();
        let token = token.to_str().unwrap();
        let s = parse(&["--kube-service-account-token-path", token]).unwrap();
        assert_eq!(s.daemonset.0.as_deref(), Some("kong-mesh-system"));
        let s = parse(&["--kube-service-account-token-path", token, "--daemonset-namespace", "kube-system"]).unwrap();
        assert_eq!(s.daemonset.0.as_deref(), Some("kube-system"));
        let s = parse(&["--kube-service-account-token-path", "/nonexistent/token"]).unwrap();
        assert_eq!(s.daemonset.0, None);
        assert_eq!(parse(&["--uninstall-on-sigterm", "never"]).unwrap().uninstall, Uninstall::Never);
        assert!(parse(&["--uninstall-on-sigterm", "sometimes"]).is_err());
    }

    #[test]
    fn standalone_defaults_to_kuma_cni_conf_and_bools_read_like_go() {
        let s = parse(&["--chained-cni-plugin", "False"]).unwrap();
        assert_eq!(s.mode, Mode::Standalone { conf_name: "kuma-cni.conf".into() });
        let s = parse(&["--chained-cni-plugin", "0", "--cni-conf-name", "00-kuma.conf"]).unwrap();
        assert_eq!(s.mode, Mode::Standalone { conf_name: "00-kuma.conf".into() });
    }

    #[test]
    fn intervals_take_seconds_or_units() {
        let interval = |v: &str| parse(&["--cfgcheck-interval", v]).map(|s| s.cfgcheck_interval);
        assert_eq!(interval("5").unwrap(), Duration::from_secs(5));
        assert_eq!(interval("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(interval("2m").unwrap(), Duration::from_secs(120));
        assert!(interval("x").is_err() && interval("0").is_err());
    }

    #[test]
    fn health_address_is_every_address_or_one_ip() {
        assert_eq!(parse(&[]).unwrap().health_address, None);
        let s = parse(&["--health-address", "127.0.0.1"]).unwrap();
        assert_eq!(s.health_address, Some(IpAddr::from([127, 0, 0, 1])));
        assert!(InstallArgs::try_parse_from(["install", "--health-address", "localhost"]).is_err());
    }

    #[test]
    fn ebpf_mode_names_the_bpffs_in_our_entry() {
        assert!(parse(&[]).unwrap().ebpf.is_none());
        assert!(parse(&[]).unwrap().ours.conf.get("ebpf").is_none(), "iptables mode by default");
        let s = parse(&["--ebpf", "true", "--ebpf-bpffs-path", "/run/bpf"]).unwrap();
        let paths = s.ebpf.expect("eBPF mode");
        assert_eq!((paths.bpffs, paths.cgroup), (PathBuf::from("/run/bpf"), PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(s.ours.conf["ebpf"]["bpffs_path"], "/run/bpf");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&s.ours.text).unwrap(), s.ours.conf);
        let e = parse(&["--ebpf", "1", "--ebpf-cgroup-path", "sys/fs/cgroup"]).unwrap_err().to_string();
        assert!(e.contains("KMC_EBPF_CGROUP_PATH"), "{e}");
    }

    #[test]
    fn bad_settings_are_named() {
        let e = Settings::from_args(InstallArgs::try_parse_from(["install", "--kubernetes-service-host", ""]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("KUBERNETES_SERVICE_HOST"), "{e}");
        let e = parse(&["--cni-conf-name", "../x.conf"]).unwrap_err().to_string();
        assert!(e.contains("CNI_CONF_NAME"), "{e}");
        let e = parse(&["--cni-conf-name", "10-calico.json"]).unwrap_err().to_string();
        assert!(e.contains(".conflist"), "{e}");
        let e = parse(&["--cni-network-config", "{}"]).unwrap_err().to_string();
        assert!(e.contains("CNI_NETWORK_CONFIG"), "{e}");
        let e = parse(&["--node-name", "a/b"]).unwrap_err().to_string();
        assert!(e.contains("NODE_NAME"), "{e}");
        let e = parse(&["--agent-namespaces", "mesh,Not_A_Namespace"]).unwrap_err().to_string();
        assert!(e.contains("KMC_AGENT_NAMESPACES") && e.contains("Not_A_Namespace"), "{e}");
        let e =
            parse(&["--cni-network-config", r#"{"type":"kong-mesh-cni","run_dir":"run"}"#]).unwrap_err().to_string();
        assert!(e.contains("run_dir"), "{e}");
    }

    #[test]
    fn the_agent_runs_with_a_node_name_on_the_socket_where_the_plugin_looks() {
        assert!(parse(&[]).unwrap().agent().is_none());
        let agent = parse(&["--node-name", "node-1"]).unwrap().agent().unwrap();
        assert_eq!(agent.node_name, "node-1");
        assert!(agent.namespaces.is_empty(), "every namespace in one watch");
        let allowed = parse(&["--node-name", "node-1", "--agent-namespaces", " mesh , apps,"]).unwrap();
        assert_eq!(allowed.agent().unwrap().namespaces, ["mesh", "apps"]);
        assert_eq!(agent.socket, PathBuf::from("/run/kong-mesh-cni/agent.sock"));
        let template = r#"{"type":"kong-mesh-cni","run_dir":"/var/run/kmc"}"#;
        let s = parse(&["--node-name", "n", "--cni-network-config", template]).unwrap();
        assert_eq!(s.agent().unwrap().socket, PathBuf::from("/var/run/kmc/agent.sock"));
        let s = parse(&["--node-name", "n", "--agent-socket", "/tmp/a.sock"]).unwrap();
        assert_eq!(s.agent().unwrap().socket, PathBuf::from("/tmp/a.sock"));
    }
}
