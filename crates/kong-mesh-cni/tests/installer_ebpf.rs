//! The installer in eBPF mode, the real binary against temporary host dirs, a private
//! bpffs and this test's own cgroup: it refuses a node that cannot run the mode and
//! names why, loads the programs before chaining the plugin, a second installer adopts
//! them without a moment unredirected, and uninstall leaves nothing in the bpffs.

mod installer_host;

#[path = "../../ebpf/tests/common/mod.rs"]
mod ebpf_node;

use std::time::Duration;

use ebpf_node::{TestNode, connection_loop, pin_dir_entries, require_ebpf};
use installer_host::*;
use testkit::net::Topology;

const PLUGIN: &str = "kong-mesh-cni";
const STARTUP: Duration = Duration::from_secs(30);

fn ebpf_env<'a>(node: &'a TestNode, health_port: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("KMC_EBPF", "true"),
        ("KMC_EBPF_BPFFS_PATH", node.paths.bpffs.to_str().unwrap()),
        ("KMC_EBPF_CGROUP_PATH", node.paths.cgroup.to_str().unwrap()),
        ("KMC_HEALTH_PORT", health_port),
        ("KMC_HEALTH_ADDRESS", "127.0.0.1"),
        ("CNI_CONF_NAME", "10-calico.conflist"),
        ("CFGCHECK_INTERVAL", "200ms"),
    ]
}

/// Nothing of ours in a bpffs (the kernel's own iterators have a dot in their names,
/// which bpffs refuses in anything we could pin).
fn ours_in(bpffs: &std::path::Path) -> Vec<String> {
    pin_dir_entries(bpffs).into_iter().filter(|n| !n.contains('.')).collect()
}

#[test]
fn a_node_without_bpffs_is_refused_by_name_and_nothing_is_loaded_or_chained() {
    if !require_ebpf() {
        return;
    }
    let node = TestNode::bare();
    let host = Host::new();
    let conflist = host.net_file("10-calico.conflist");
    std::fs::write(&conflist, CALICO).unwrap();
    let not_bpffs = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let mut env = ebpf_env(&node, &port);
    env[1].1 = not_bpffs.path().to_str().unwrap();
    let installer = Installer::start(&host, &env);
    let named = format!("no bpffs mounted at {} (bpffsPath)", not_bpffs.path().display());
    let get = |path: &str| http_get(port.parse().unwrap(), path);
    let refused = wait_for(STARTUP, || get("/readyz").is_some_and(|(code, body)| code == 503 && body.contains(&named)));
    assert!(refused.is_some(), "readiness names what is missing; log:\n{}", installer.log());
    assert!(installer.log().contains(&named), "the log names it too:\n{}", installer.log());
    let metrics = get("/metrics").unwrap().1;
    let errors = metrics.lines().find_map(|l| l.strip_prefix("kong_mesh_cni_installer_ebpf_load_errors_total "));
    assert!(errors.is_some_and(|n| n.parse::<u64>().unwrap() >= 1), "{metrics}");
    assert!(metrics.contains("kong_mesh_cni_installer_state{state=\"refused\"} 1\n"), "{metrics}");
    assert_eq!(std::fs::read_to_string(&conflist).unwrap(), CALICO, "not chained");
    assert!(!host.ready.exists());
    assert_eq!(pin_dir_entries(not_bpffs.path()), Vec::<String>::new(), "nothing half-loaded");
    assert_eq!(ours_in(&node.paths.bpffs), Vec::<String>::new());
}

#[test]
fn loads_once_a_second_installer_adopts_without_a_gap_and_uninstall_leaves_nothing() {
    if !require_ebpf() {
        return;
    }
    let node = TestNode::bare();
    let host = Host::new();
    let conflist = host.net_file("10-calico.conflist");
    std::fs::write(&conflist, CALICO).unwrap();
    let port = free_port().to_string();
    let env = ebpf_env(&node, &port);
    let mut first = Installer::start(&host, &env);
    assert!(wait_for(STARTUP, || host.ready.exists()).is_some(), "not ready; log:\n{}", first.log());
    assert!(chained(&conflist, PLUGIN));
    let ours = json(&conflist).unwrap()["plugins"][3].clone();
    assert_eq!(ours["ebpf"]["bpffs_path"], node.paths.bpffs.to_str().unwrap(), "{ours}");
    assert!(ebpf::status(&node.paths).unwrap().complete());
    assert!(first.log().contains("eBPF programs loaded and attached"), "{}", first.log());

    // A pod registered as the plugin does; the metrics count it.
    let topo = Topology::new("eir", false);
    let pod = topo.pod.open();
    let addrs = [topo.pod_addr(false)];
    node.registry().register("c1", &pod, &kuma::Config::default(), &addrs).unwrap();
    let get = |path: &str| http_get(port.parse().unwrap(), path);
    let counted =
        || get("/metrics").is_some_and(|(_, m)| m.contains("kong_mesh_cni_installer_ebpf_registered_pods 1\n"));
    assert!(wait_for(Duration::from_secs(5), counted).is_some(), "{:?}", get("/metrics"));

    // A pod whose namespace goes without a DEL: the installer unregisters it.
    {
        let gone = testkit::NamedNetns::new("eig");
        node.registry()
            .register("gone", &gone.open(), &kuma::Config::default(), &["10.98.0.9".parse().unwrap()])
            .unwrap();
    }
    let swept = "unregistered pods whose network namespace is gone";
    assert!(wait_for(Duration::from_secs(10), || first.log().contains(swept)).is_some(), "{}", first.log());
    assert!(wait_for(Duration::from_secs(5), counted).is_some(), "{:?}", get("/metrics"));

    // A connection loop while the installer dies and another one starts: every
    // connection is redirected.
    let seen = connection_loop(&pod, &topo, || {
        // A crash or an upgrade: the old installer is gone without removing anything.
        first.signal(libc::SIGKILL);
        first.wait(Duration::from_secs(5)).expect("killed");
        // Its SIGTERM below is an uninstall (no DaemonSet to ask about here).
        let second = Installer::start(&host, &[&env[..], &[UNINSTALL]].concat());
        let adopted = wait_for(STARTUP, || second.log().contains("adopted the pinned maps and links"));
        assert!(adopted.is_some(), "the second installer adopts; log:\n{}", second.log());
        assert!(wait_for(STARTUP, || host.ready.exists()).is_some(), "ready again; log:\n{}", second.log());
        second
    });
    let mut second = seen.during;
    assert_eq!(seen.escaped, 0, "connections escaped the redirect across the restart");
    assert!(seen.redirected > 20, "only {} connections", seen.redirected);
    node.registry().check("c1", &pod, &kuma::Config::default(), &addrs).expect("the registration survived");

    // Uninstall: unchained, then nothing of ours left in the bpffs.
    let status = second.terminate();
    assert!(status.success(), "{status}; log:\n{}", second.log());
    assert_eq!(std::fs::read_to_string(&conflist).unwrap(), CALICO);
    assert_eq!(ours_in(&node.paths.bpffs), Vec::<String>::new(), "left in bpffs");
    assert!(second.log().contains("eBPF programs detached and unpinned"), "{}", second.log());
}
