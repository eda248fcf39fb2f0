//! What the demo saw, for people (`Display`) and for the tests (the fields).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A pod attached through the runtime.
#[derive(Debug, Default, Clone)]
pub struct Attached {
    pub add: Duration,
    pub address: String,
    /// Rules found in its namespace afterwards.
    pub rules: usize,
}

#[derive(Debug, Clone)]
pub struct Report {
    /// The plugin's `iptables_backend` setting.
    pub iptables_backend: String,
    pub api_server_up: Duration,
    pub node_dir: PathBuf,
    pub installer_ready: Duration,
    /// Plugin types of the primary conflist once the installer is ready.
    pub chained: Vec<String>,
    pub web: Attached,
    pub plain: Attached,
    /// The bad pod's ADD: error code, message, time.
    pub broken: (Option<u32>, String, Duration),
    pub validator: String,
    /// (requested, original destination seen by the stand-in sidecar).
    pub outbound: (SocketAddr, SocketAddr),
    pub inbound: (SocketAddr, SocketAddr),
    pub repaired_after: Duration,
    pub web_rules_after_del: String,
    pub restored_exactly: bool,
    /// Files left in the node's net and bin dirs after removal (the primary's excepted).
    pub leftovers: Vec<String>,
    pub relayed_log_lines: Vec<String>,
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kong-mesh-cni node demo")?;
        writeln!(
            f,
            "  API server (kube-apiserver + etcd, loopback)   up in {:.1} s",
            self.api_server_up.as_secs_f64()
        )?;
        writeln!(f, "  node                                           {}", self.node_dir.display())?;
        writeln!(f, "  installer ready (binary, kubeconfig, chain)    in {}", ms(self.installer_ready))?;
        writeln!(f, "  primary conflist now chains                    {}", self.chained.join(" -> "))?;
        writeln!(f, "  plugin's iptables_backend                      {}", self.iptables_backend)?;
        writeln!(f, "pods, created through the API, ADD through libcni from the node's net dir")?;
        writeln!(f, "  web     mesh      ADD {:>9}  {}  {} rules", ms(self.web.add), self.web.address, self.web.rules)?;
        for line in self.validator.lines() {
            writeln!(f, "          validator as UID 5678: {line}")?;
        }
        writeln!(
            f,
            "          app -> {} landed on the stand-in sidecar :15001, original destination {}",
            self.outbound.0, self.outbound.1
        )?;
        writeln!(f, "          plain -> {} landed on :15006, original destination {}", self.inbound.0, self.inbound.1)?;
        writeln!(
            f,
            "  plain   non-mesh  ADD {:>9}  {}  {} rules (untouched)",
            ms(self.plain.add),
            self.plain.address,
            self.plain.rules
        )?;
        let code = self.broken.0.map_or("none".to_owned(), |c| c.to_string());
        writeln!(f, "  broken  mesh      ADD failed in {} with CNI error {code}:", ms(self.broken.2))?;
        writeln!(f, "          {}", self.broken.1)?;
        writeln!(f, "repair")?;
        writeln!(
            f,
            "  the primary CNI renamed a new copy of its file over ours: our entry was back after {}",
            ms(self.repaired_after)
        )?;
        writeln!(f, "removal")?;
        writeln!(f, "  DEL left {} rules in the mesh pod's namespace", self.web_rules_after_del.lines().count())?;
        writeln!(
            f,
            "  SIGTERM: primary conflist {}; left in the node's dirs: {}",
            if self.restored_exactly { "restored byte for byte" } else { "NOT restored" },
            if self.leftovers.is_empty() { "nothing".to_owned() } else { self.leftovers.join(", ") }
        )?;
        writeln!(
            f,
            "  plugin log lines relayed to the installer's stderr (kubectl logs): {}",
            self.relayed_log_lines.len()
        )?;
        if let Some(line) = self.relayed_log_lines.iter().find(|l| l.contains("redirect programmed")) {
            writeln!(f, "    e.g. {}", line.trim())?;
        }
        Ok(())
    }
}
