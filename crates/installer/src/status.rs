//! `kong-mesh-cni status`: one screen for the node, run in the DaemonSet's container
//! (`kubectl exec ds/kong-mesh-cni -- kong-mesh-cni status`), so it sees what the
//! installer sees: the same environment, the same host mounts.
//!
//! What is on the node (the chain, the binary, the kubeconfig, the token, the pending
//! in-place repairs, the level file) it reads itself, with the installer's own
//! settings and planner: nothing to keep in sync. What only the running installer knows
//! (its state, repairs, fights, eBPF registrations) it reads from the installer's
//! `/readyz` and `/metrics`, which already carry it; the node agent is asked on its
//! socket whether it is synced. So the installer needed no new socket, file or
//! protocol: the smaller change than either (a status file would need hooks in the
//! event loop, a socket verb a new protocol).
//!
//! [`gather`] does the I/O; [`NodeStatus::problems`] and [`render`] are pure.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

use crate::args::Settings;
use crate::{kubeconfig, plan};

/// Each question to the installer or the agent; the command must answer promptly.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeStatus {
    pub ready: bool,
    /// Why the node is not ready, one reason each; empty when it is.
    pub problems: Vec<String>,
    pub chain: Chain,
    pub binaries: Vec<FileState>,
    pub kubeconfig: FileState,
    /// Seconds since the service-account token file last changed.
    pub token_age_seconds: Option<u64>,
    pub agent: String,
    /// Pods let through while the API server could not be asked, waiting for in-place repair.
    pub pending_repairs: usize,
    pub backend: String,
    pub installer: Installer,
    pub log_level: String,
    pub log_format: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Chain {
    /// The file holding our entry, when chained.
    pub file: Option<String>,
    /// Our entry's position in its `plugins` (1-based) and how many there are.
    pub position: Option<(usize, usize)>,
    pub plugins: Vec<String>,
    pub entry: Option<Value>,
    /// Why we are not chained.
    pub problem: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileState {
    pub path: String,
    /// `current`, `stale` (present, not what the installer would write) or `missing`.
    pub state: String,
}

/// What the running installer says about itself.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Installer {
    /// `ready`, `waiting`, ... or why it could not be asked.
    pub state: String,
    pub detail: Option<String>,
    pub repairs: Option<u64>,
    pub last_repair_unix: Option<u64>,
    pub fighting: Option<bool>,
    pub ebpf_registered_pods: Option<u64>,
    /// Pods in the node agent's cache.
    pub agent_cached_pods: Option<u64>,
}

impl NodeStatus {
    /// The reasons the node is not ready: a part not in place, or the installer not ready.
    fn find_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(why) = &self.chain.problem {
            problems.push(format!("not chained: {why}"));
        }
        for file in self.binaries.iter().chain([&self.kubeconfig]) {
            if file.state != "current" {
                problems.push(format!("{} is {}", file.path, file.state));
            }
        }
        if self.installer.state != "ready" {
            let detail = self.installer.detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default();
            problems.push(format!("installer {}{detail}", self.installer.state));
        }
        problems
    }
}

/// Looks at the node as `settings` (the installer's own, from the same environment) describe it.
pub fn gather(settings: &Settings) -> NodeStatus {
    let run_file = |name: &str| {
        std::fs::read_to_string(settings.run_dir.join(name)).ok().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty())
    };
    let mut status = NodeStatus {
        ready: false,
        problems: Vec::new(),
        chain: chain(settings),
        binaries: settings.bin_dirs.iter().map(|dir| binary(&dir.join(&settings.ours.binary))).collect(),
        kubeconfig: kubeconfig_state(settings),
        token_age_seconds: std::fs::metadata(&settings.token_file)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .map(|d| d.as_secs()),
        agent: agent(settings),
        pending_repairs: cni::plugin::pending::list(&settings.run_dir).len(),
        backend: match &settings.ebpf {
            Some(paths) => format!("ebpf (programs pinned under {})", paths.bpffs.display()),
            None => "iptables (rules in each mesh pod's namespace)".to_owned(),
        },
        installer: installer(settings),
        log_level: run_file(cni::plugin::logging::LEVEL_FILE)
            .unwrap_or_else(|| "the plugin conf's (no level file in the run dir)".to_owned()),
        log_format: run_file(cni::plugin::logging::FORMAT_FILE).unwrap_or_else(|| "text".to_owned()),
    };
    status.problems = status.find_problems();
    status.ready = status.problems.is_empty();
    status
}

fn chain(s: &Settings) -> Chain {
    let mut chain = Chain { file: None, position: None, plugins: Vec::new(), entry: None, problem: None };
    let snap = match crate::fsio::snapshot(&s.net_dir, &s.host_net_dir, crate::daemon::wanted_of(&s.mode)) {
        Ok(snap) => snap,
        Err(e) => {
            chain.problem = Some(format!("cannot read {}: {e}", s.net_dir.display()));
            return chain;
        }
    };
    let file = match crate::daemon::plan_of(&s.mode, &snap, &s.ours) {
        plan::Plan::InPlace { file, .. } => file,
        plan::Plan::Apply { file, .. } => {
            chain.problem = Some(format!("our entry is not (as it should be) in {}", s.net_dir.join(&file).display()));
            file
        }
        plan::Plan::Waiting { reason } => {
            chain.problem = Some(format!("no primary CNI configuration in {}: {reason}", s.net_dir.display()));
            return chain;
        }
        plan::Plan::Refused { file, reason } => {
            chain.problem = Some(format!("{} cannot be chained into: {reason}", s.net_dir.join(&file).display()));
            return chain;
        }
    };
    let parsed: Option<Value> =
        snap.get(&file).and_then(|c| c.as_ref().ok()).and_then(|b| serde_json::from_slice(b).ok());
    chain.file = Some(s.net_dir.join(&file).display().to_string());
    match parsed.as_ref().and_then(|v| v.get("plugins")).and_then(Value::as_array) {
        Some(plugins) => {
            chain.plugins = plugins.iter().map(|p| crate::template::plugin_type(p).unwrap_or("?").to_owned()).collect();
            if let Some(at) = plugins.iter().position(|p| s.ours.is_ours(p)) {
                chain.position = Some((at + 1, plugins.len()));
                chain.entry = Some(plugins[at].clone());
            }
        }
        // Standalone: the file is our conf.
        None => chain.entry = parsed,
    }
    chain
}

/// The installed binary against ours (this process's: the same image as the installer's).
fn binary(path: &Path) -> FileState {
    // Compared in chunks: the container's memory limit is far below two binaries.
    let state = match crate::fsio::same_content(Path::new("/proc/self/exe"), path) {
        Err(_) if !path.exists() => "missing",
        Ok(true) => "current",
        _ => "stale",
    };
    FileState { path: path.display().to_string(), state: state.to_owned() }
}

fn kubeconfig_state(s: &Settings) -> FileState {
    let path = s.net_dir.join(&s.kubeconfig_name);
    let wanted = kubeconfig::from_files(&s.server, &s.ca_file, &s.token_file);
    let state = match (std::fs::read(&path), wanted) {
        (Err(_), _) => "missing",
        (Ok(on_disk), Ok(wanted)) if on_disk == wanted.expose().as_bytes() => "current",
        (Ok(_), _) => "stale",
    };
    FileState { path: path.display().to_string(), state: state.to_owned() }
}

/// Asks the node agent about a pod that cannot exist: `not found` means its cache is synced.
fn agent(s: &Settings) -> String {
    if s.node_name.is_none() {
        return "off (no NODE_NAME): the plugin asks the API server".to_owned();
    }
    let request = cni::agent::Request::new("kube-system", "kong-mesh-cni-status-probe", None);
    match cni::plugin::ask::answer(&s.agent_socket, &request, ASK_TIMEOUT) {
        Err(e @ cni::plugin::ask::AskError::Protocol(_)) => {
            format!("answering on {}, but: {e}", s.agent_socket.display())
        }
        Err(e) => format!("not answering on {}: {e}", s.agent_socket.display()),
        Ok(answer) => match answer.status {
            cni::agent::Status::NotSynced => {
                format!("not synced ({}): the plugin asks the API server", answer.detail.unwrap_or_default())
            }
            cni::agent::Status::Refused => format!("refusing lookups: {}", answer.detail.unwrap_or_default()),
            _ => "synced".to_owned(),
        },
    }
}

fn installer(s: &Settings) -> Installer {
    let mut installer = Installer {
        state: String::new(),
        detail: None,
        repairs: None,
        last_repair_unix: None,
        fighting: None,
        ebpf_registered_pods: None,
        agent_cached_pods: None,
    };
    if s.health_port == 0 {
        // No endpoints: the ready file is all there is.
        installer.state = if s.ready_file.exists() { "ready" } else { "not ready (no ready file)" }.to_owned();
        installer.detail = Some("KMC_HEALTH_PORT=0: no metrics to read".to_owned());
        return installer;
    }
    let ip = s.health_address.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let address = SocketAddr::new(ip, s.health_port);
    let metrics = match http_get(address, "/metrics") {
        Ok((_, body)) => body,
        Err(e) => {
            installer.state = "not answering".to_owned();
            installer.detail = Some(format!("http://{address}/metrics: {e}"));
            return installer;
        }
    };
    let value = |name: &str| -> Option<u64> {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
            .map(|v| v as u64)
    };
    installer.repairs = value("kong_mesh_cni_installer_repairs_total");
    installer.last_repair_unix = value("kong_mesh_cni_installer_last_repair_timestamp_seconds").filter(|&t| t > 0);
    installer.fighting = value("kong_mesh_cni_installer_fighting").map(|v| v == 1);
    installer.ebpf_registered_pods = value("kong_mesh_cni_installer_ebpf_registered_pods");
    installer.agent_cached_pods = value("kong_mesh_cni_installer_agent_cached_pods");
    installer.state = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kong_mesh_cni_installer_state{state=\"")?.strip_suffix("\"} 1"))
        .unwrap_or("unknown")
        .to_owned();
    if installer.state != "ready" {
        installer.detail = http_get(address, "/readyz").ok().map(|(_, body)| body.trim().to_owned());
    }
    installer
}

/// A plain HTTP/1.0 GET: the status, and the body.
fn http_get(address: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, ASK_TIMEOUT)?;
    stream.set_read_timeout(Some(ASK_TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = String::new();
    stream.take(1 << 20).read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((code, body.to_owned()))
}

/// The screen: what a person reads first (ready or why not), then each part.
pub fn render(s: &NodeStatus, now_unix: u64) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: &str| out.push_str(&format!("{label:<18}{value}\n"));
    match s.ready {
        true => line("node", "READY"),
        false => line("node", &format!("NOT READY: {}", s.problems.join("; "))),
    }
    match (&s.chain.file, s.chain.position) {
        (Some(file), Some((at, of))) => {
            line("chained in", &format!("{file} (plugin {at} of {of}: {})", s.chain.plugins.join(" -> ")))
        }
        (Some(file), None) => line("conf", file),
        (None, _) => line("chained in", "-"),
    }
    if let Some(why) = &s.chain.problem {
        line("", why);
    }
    if let Some(entry) = &s.chain.entry {
        line("our entry", &entry.to_string());
    }
    for b in &s.binaries {
        line("binary", &format!("{} ({})", b.path, b.state));
    }
    line("kubeconfig", &format!("{} ({})", s.kubeconfig.path, s.kubeconfig.state));
    line("token age", &s.token_age_seconds.map_or("unknown".to_owned(), |a| format!("{a}s")));
    match s.installer.agent_cached_pods {
        Some(pods) => line("node agent", &format!("{}, {pods} pods cached", s.agent)),
        None => line("node agent", &s.agent),
    }
    line("pending repairs", &s.pending_repairs.to_string());
    line("backend", &s.backend);
    if let Some(pods) = s.installer.ebpf_registered_pods {
        line("ebpf pods", &pods.to_string());
    }
    let i = &s.installer;
    line("installer", &i.detail.as_ref().map_or(i.state.clone(), |d| format!("{} ({d})", i.state)));
    let last = i.last_repair_unix.map_or("none".to_owned(), |t| format!("{}s ago", now_unix.saturating_sub(t)));
    match i.repairs {
        Some(n) => line("repairs", &format!("{n} (last: {last})")),
        None => line("repairs", "unknown"),
    }
    match i.fighting {
        Some(true) => line("fighting", "yes: another agent keeps removing our entry (repairs spaced out)"),
        Some(false) => line("fighting", "no"),
        None => line("fighting", "unknown"),
    }
    line("log level", &s.log_level);
    line("log format", &s.log_format);
    out
}

/// Seconds since the epoch, for [`render`].
pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> NodeStatus {
        let mut s = NodeStatus {
            ready: false,
            problems: Vec::new(),
            chain: Chain {
                file: Some("/host/etc/cni/net.d/10-calico.conflist".into()),
                position: Some((3, 3)),
                plugins: vec!["calico".into(), "portmap".into(), "kong-mesh-cni".into()],
                entry: Some(serde_json::json!({"type": "kong-mesh-cni", "name": "kuma-cni", "log_level": "info"})),
                problem: None,
            },
            binaries: vec![FileState { path: "/host/opt/cni/bin/kong-mesh-cni".into(), state: "current".into() }],
            kubeconfig: FileState { path: "/host/etc/cni/net.d/ZZZ-kuma-cni-kubeconfig".into(), state: "stale".into() },
            token_age_seconds: Some(1800),
            agent: "synced".into(),
            pending_repairs: 2,
            backend: "iptables (rules in each mesh pod's namespace)".into(),
            installer: Installer {
                state: "degraded".into(),
                detail: Some("not ready: cannot write the plugin's kubeconfig".into()),
                repairs: Some(4),
                last_repair_unix: Some(1_000_000 - 95),
                fighting: Some(false),
                ebpf_registered_pods: None,
                agent_cached_pods: Some(12),
            },
            log_level: "debug".into(),
            log_format: "text".into(),
        };
        s.problems = s.find_problems();
        s.ready = s.problems.is_empty();
        s
    }

    /// `UPDATE_GOLDEN=1` rewrites the file.
    #[test]
    fn the_screen_matches_its_golden_file() {
        let got = render(&example(), 1_000_000);
        let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/status/screen.txt");
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&golden, &got).unwrap();
        }
        assert_eq!(got, std::fs::read_to_string(&golden).unwrap(), "UPDATE_GOLDEN=1 to accept");
    }

    #[test]
    fn not_ready_names_each_reason() {
        let s = example();
        assert!(!s.ready);
        assert_eq!(
            s.problems,
            [
                "/host/etc/cni/net.d/ZZZ-kuma-cni-kubeconfig is stale",
                "installer degraded: not ready: cannot write the plugin's kubeconfig"
            ]
        );
        let mut fine = s.clone();
        fine.kubeconfig.state = "current".into();
        fine.installer.state = "ready".into();
        assert!(fine.find_problems().is_empty());
    }
}
