//! The node demo: a real API server, a simulated node in temporary directories, our
//! installer chaining the plugin into a real primary CNI configuration, pods created
//! through the API and attached through the reference CNI runtime, real traffic, the
//! installer repairing a rewritten conflist, and a clean removal. [`run`] returns a
//! [`Report`] whose fields the tests assert and whose `Display` is what people read.

mod node;
pub mod real_node;
mod report;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use testkit::net::{NamedNetns, accept_within, connect_tcp, listen_tcp, read_exact};
use testkit::{ApiServer, Attachment, CniRuntime, Plugins, pod, policy_rule};

use node::{ApiAccess, Node, PRIMARY, wait_for};
pub use report::{Attached, Report};

const NAMESPACE_PREFIX: &str = "shop";
const SUBNET: &str = "198.19.250.0/24";
/// A Service-like address: nothing in the demo answers there.
const SERVICE: &str = "10.96.0.10:80";
const SIDECAR_UID: &str = "5678";

/// Runs the whole demo with `binary` (the kong-mesh-cni release or test build), the
/// plugin configured with `iptables_backend` when given (else its default, `auto`).
pub fn run(binary: &Path, iptables_backend: Option<&str>) -> Result<Report> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let started = Instant::now();
    let api = ApiServer::shared();
    let api_server_up = started.elapsed();
    let ns = rt.block_on(api.namespace(NAMESPACE_PREFIX));
    let creds = tempfile::tempdir()?;
    let sa = rt.block_on(async {
        let sa = api.project_service_account(ns.name(), "kong-mesh-cni", creds.path()).await;
        // The DaemonSet's RBAC: the plugin reads pods, nothing else.
        ns.grant("kong-mesh-cni", "kong-mesh-cni", vec![policy_rule(&[""], &["pods"], &["get"])]).await;
        sa
    });

    let bridge = format!("kmcd-{}", testkit::unique_suffix());
    let mut node = Node::new(&bridge, SUBNET)?;
    let original_primary = std::fs::read(node.primary())?;
    let access = ApiAccess {
        host: sa.host.clone(),
        port: sa.port.clone(),
        ca_file: sa.ca_file.clone(),
        token_file: sa.token_file.clone(),
    };
    let installer_ready = node.start_installer(binary, &access, iptables_backend)?;
    let chained = node.primary_conf()?["plugins"]
        .as_array()
        .map(|p| p.iter().map(|x| x["type"].as_str().unwrap_or("?").to_owned()).collect())
        .unwrap_or_default();

    rt.block_on(async {
        let annotated = |name: &str| testkit::mesh_pod(name);
        ns.create_pod(annotated("web").annotation("kuma.io/builtin-dns", "enabled").build()).await;
        ns.create_pod(pod("plain").build()).await;
        ns.create_pod(annotated("broken").annotation("traffic.kuma.io/exclude-inbound-ports", "80,http").build()).await;
    });
    // The runtime loads the node's net dir as kubelet/containerd do: what the installer wrote.
    let cni = CniRuntime::net_dir(&node.net_dir(), vec![node.bin_dir(), Plugins::Upstream.dir()]);
    let (web_ns, plain_ns, broken_ns) = (NamedNetns::new("dweb"), NamedNetns::new("dplain"), NamedNetns::new("dbrk"));
    let web = Attachment::new(&web_ns, ns.name(), "web");
    let plain = Attachment::new(&plain_ns, ns.name(), "plain");
    let broken = Attachment::new(&broken_ns, ns.name(), "broken");

    let web_attached = attach(&cni, &web, &web_ns)?;
    let plain_attached = attach(&cni, &plain, &plain_ns)?;
    let t = Instant::now();
    let broken_add = match cni.add(&broken) {
        Ok(result) => anyhow::bail!("ADD of the pod with a bad annotation succeeded: {result}"),
        Err(e) => (e.code, format!("{} {}", e.msg, e.details).trim().to_owned(), t.elapsed()),
    };

    let validator = validate(binary, &web_ns)?;
    let (web_net, plain_net) = (web_ns.open(), plain_ns.open());
    let outbound_listener = listen_tcp(&web_net, false, 15001);
    let inbound_listener = listen_tcp(&web_net, false, 15006);
    let service: SocketAddr = SERVICE.parse()?;
    let outbound = (service, land(&web_net, service, &outbound_listener)?);
    let web_addr: SocketAddr =
        format!("{}:8080", web_attached.address.split('/').next().unwrap_or_default()).parse()?;
    let inbound = (web_addr, land(&plain_net, web_addr, &inbound_listener)?);

    // The primary CNI rewrites its file the way most do: a new file renamed over it.
    let temp = node.net_dir().join(".primary-rewrite.tmp");
    std::fs::write(&temp, &original_primary)?;
    std::fs::rename(&temp, node.primary())?;
    let rewritten = Instant::now();
    wait_for(Duration::from_secs(10), || node.primary_conf().is_ok_and(|c| is_chained(&c)))
        .context("our entry did not come back")?;
    let repaired_after = rewritten.elapsed();

    for a in [&web, &plain, &broken] {
        cni.del(a).with_context(|| format!("DEL of {}", a.pod_name))?;
    }
    let web_rules_after_del = saved_rules(&web_ns);
    node.stop_installer()?;
    Ok(Report {
        iptables_backend: iptables_backend.unwrap_or("auto (default)").to_owned(),
        api_server_up,
        node_dir: node.dir.path().to_owned(),
        installer_ready,
        chained,
        web: web_attached,
        plain: plain_attached,
        broken: broken_add,
        validator,
        outbound,
        inbound,
        repaired_after,
        web_rules_after_del,
        restored_exactly: std::fs::read(node.primary())? == original_primary,
        leftovers: std::fs::read_dir(node.net_dir())?
            .chain(std::fs::read_dir(node.bin_dir())?)
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|name| name != PRIMARY)
            .collect(),
        relayed_log_lines: node.installer_log().lines().filter(|l| l.contains("cni{")).map(str::to_owned).collect(),
    })
}

fn is_chained(conf: &Value) -> bool {
    conf["plugins"].as_array().is_some_and(|p| p.last().is_some_and(|x| x["type"] == "kong-mesh-cni"))
}

fn attach(cni: &CniRuntime, a: &Attachment, netns: &NamedNetns) -> Result<Attached> {
    let t = Instant::now();
    let result = cni.add(a).map_err(|e| anyhow::anyhow!("ADD of {}: {e}", a.pod_name))?;
    let took = t.elapsed();
    let address = result["ips"][0]["address"].as_str().context("an address in the result")?.to_owned();
    let rules = saved_rules(netns);
    let rules = rules.lines().filter(|l| l.starts_with("-A") || l.starts_with("nft rule")).count();
    Ok(Attached { add: took, address, rules })
}

/// Every chain and rule of ours in the namespace: from both iptables backends and both
/// families (`-A ...`, `:KUMA...`), and from our native tables (`nft chain ...`,
/// `nft rule ...`).
fn saved_rules(netns: &NamedNetns) -> String {
    let iptables = ["iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"]
        .iter()
        .map(|tool| netns.exec(tool, &[]))
        .collect::<String>();
    let saved = iptables.lines().filter(|l| l.starts_with("-A") || l.starts_with(":KUMA")).map(|l| format!("{l}\n"));
    saved.chain(native_rules(&netns.exec("nft", &["list", "ruleset"]))).collect()
}

/// The chains and rules of our `kuma_mesh` tables in an `nft list ruleset` listing.
fn native_rules(listing: &str) -> Vec<String> {
    let (mut table, mut chain) = (None, "");
    let mut out = Vec::new();
    for line in listing.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["table", family, "kuma_mesh", "{"] => table = Some(*family),
            ["table", ..] => table = None,
            ["chain", name, "{"] => {
                chain = name;
                if let Some(family) = table {
                    out.push(format!("nft chain {family} {chain}\n"));
                }
            }
            ["}"] | [] | ["type", ..] => {}
            _ => {
                if let Some(family) = table {
                    out.push(format!("nft rule {family} {chain} {}\n", line.trim()));
                }
            }
        }
    }
    out
}

/// The validator as the injector runs it: in the pod, as the sidecar's UID.
fn validate(binary: &Path, netns: &NamedNetns) -> Result<String> {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &netns.name,
            "setpriv",
            "--reuid",
            SIDECAR_UID,
            "--regid",
            SIDECAR_UID,
            "--clear-groups",
        ])
        .arg(binary)
        .args(["validate", "--timeout", "5s"])
        .env_remove("CNI_COMMAND")
        .output()?;
    ensure!(out.status.success(), "the validator failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A connection from `from` to `dest` must arrive on `listener`; returns its original
/// destination.
fn land(from: &netns::NetNs, dest: SocketAddr, listener: &std::net::TcpListener) -> Result<SocketAddr> {
    let payload = format!("GET / HTTP/1.1\r\nHost: {dest}\r\n\r\n");
    let _client = connect_tcp(from, None, dest, payload.as_bytes())?;
    let mut conn = accept_within(listener, Duration::from_secs(3))
        .with_context(|| format!("the connection to {dest} did not arrive"))?;
    ensure!(read_exact(&mut conn, payload.len()) == payload.as_bytes(), "the request arrived changed");
    Ok(validator::original_destination(&conn)?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn native_rules_are_read_from_our_tables_only() {
        let listing = "table ip nat {\n\tchain OUTPUT {\n\t\ttype nat hook output priority -100; policy accept;\n\t\tcounter\n\t}\n}\n\
                       table ip6 kuma_mesh {\n\tchain nat_output {\n\t\ttype nat hook output priority -100; policy accept;\n\
                       \t\tmeta l4proto tcp jump KUMA_MESH_OUTBOUND comment \"x\"\n\t}\n\n\tchain KUMA_MESH_OUTBOUND {\n\t}\n}\n";
        assert_eq!(
            super::native_rules(listing),
            [
                "nft chain ip6 nat_output\n",
                "nft rule ip6 nat_output meta l4proto tcp jump KUMA_MESH_OUTBOUND comment \"x\"\n",
                "nft chain ip6 KUMA_MESH_OUTBOUND\n",
            ]
        );
    }
}
