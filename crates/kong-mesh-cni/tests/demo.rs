//! The README's main job, run as a test: the node demo end to end, with its report's
//! checks asserted (not just "it ran"); once with the plugin's default backend, once
//! with the native nf_tables one (one after the other: each brings up a node).

use demo::real_node::Mode;
use testkit::node::ClusterNetwork;

/// One demo at a time: the real node's start takes most of both cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn the_node_demo_shows_every_behaviour() {
    if testkit::skip_privileged("the node demo") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for backend in [None, Some("nftables")] {
        let report = demo::run(std::path::Path::new(env!("CARGO_BIN_EXE_kong-mesh-cni")), backend)
            .unwrap_or_else(|e| panic!("the demo runs with backend {backend:?}: {e:#}"));
        println!("{report}");
        every_behaviour(&report);
        if let Some(backend) = backend {
            let programmed = report.relayed_log_lines.iter().find(|l| l.contains("redirect programmed")).unwrap();
            assert!(programmed.contains(&format!("backend=\"{backend}\"")), "{programmed}");
        }
    }
}

fn every_behaviour(report: &demo::Report) {
    assert_eq!(report.chained.last().map(String::as_str), Some("kong-mesh-cni"), "chained last: {:?}", report.chained);
    assert_eq!(report.chained.len(), 3, "bridge, portmap, ours: {:?}", report.chained);

    // The mesh pod: address from bridge, rules from us, validator passes, traffic lands
    // on the stand-in sidecar with the original destination intact.
    assert!(report.web.address.starts_with("198.19.250."), "{}", report.web.address);
    assert!(report.web.rules > 10, "{} rules", report.web.rules);
    assert!(report.validator.contains("ipv4: redirected to 127.0.0.1:15006"), "{}", report.validator);
    assert_eq!(report.outbound.1, report.outbound.0, "outbound original destination");
    assert_eq!(report.outbound.0.to_string(), "10.96.0.10:80");
    assert_eq!(report.inbound.1, report.inbound.0, "inbound original destination");

    // The plain pod: an address, and not one rule.
    assert!(report.plain.address.starts_with("198.19.250."));
    assert_eq!(report.plain.rules, 0, "the non-mesh pod is untouched");

    // The pod with a bad annotation: a clear CNI error.
    assert_eq!(report.broken.0, Some(7));
    assert!(
        report.broken.1.contains("traffic.kuma.io/exclude-inbound-ports") && report.broken.1.contains("80,http"),
        "{}",
        report.broken.1
    );

    // Repair from the file watch, then a clean removal.
    assert!(report.repaired_after < std::time::Duration::from_secs(2), "repair took {:?}", report.repaired_after);
    assert_eq!(report.web_rules_after_del, "", "DEL removed the rules");
    assert!(report.restored_exactly, "SIGTERM restored the primary conflist byte for byte");
    assert!(report.leftovers.is_empty(), "left behind: {:?}", report.leftovers);
    assert!(
        report.relayed_log_lines.iter().any(|l| l.contains("redirect programmed")),
        "{:?}",
        report.relayed_log_lines
    );
}

/// The README's main job on a real node (`scripts/demo.sh --node`), run as a test: the
/// same code, its report's checks asserted, on a host as a user has it (no shared
/// /run/netns mount point: the node establishes it, and puts it back).
#[test]
fn the_real_node_demo_installs_from_the_chart_redirects_the_mesh_pod_and_leaves_the_host_as_it_was() {
    if testkit::skip_privileged("the real-node demo") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let this = "the_real_node_demo_installs_from_the_chart_redirects_the_mesh_pod_and_leaves_the_host_as_it_was";
    if !testkit::node::as_on_a_fresh_host(this) {
        return;
    }
    let netns_dir = std::path::Path::new(testkit::node::NETNS_DIR);
    assert_eq!(testkit::node::propagation(netns_dir), None, "no netns mount point before the node");
    let report = real_node_demo(Mode::Chained, ClusterNetwork::Bridge);

    assert!(report.tainted_at_start, "the node waits for its CNI");
    assert_eq!(report.chained, ["bridge", "portmap", "kong-mesh-cni"]);
    assert!(report.apply_to_cni_ready <= report.apply_to_untainted, "untainted only once the CNI pod is Ready");
    assert!(
        report.plugin_lines.iter().any(|l| l.contains("default/plain") && l.contains("pass through")),
        "{:#?}",
        report.plugin_lines
    );
    assert!(report.restored_exactly, "deleting the release restored the primary conflist byte for byte");
    assert_eq!(report.net_dir_after, ["10-kmc-bridge.conflist"]);
    pods_redirected_and_host_as_before(&report);
    assert_eq!(testkit::node::propagation(netns_dir), None, "the netns dir put back as it was");
}

/// `scripts/demo.sh --node --multus`, run as a test: the chart's default mode (not
/// chained) behind thin Multus, as on OpenShift. node_multus asserts more of it (thick
/// Multus, DEL, the missing NAD); this checks what the demo's report says.
#[test]
fn the_real_node_demo_behind_multus_uses_the_charts_defaults() {
    if testkit::skip_privileged("the real-node demo behind Multus") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let report = real_node_demo(Mode::Multus, ClusterNetwork::Bridge);

    assert_eq!(report.chained, ["bridge", "portmap"], "the cluster network is not chained into");
    assert_eq!(report.standalone_conf.as_deref(), Some("kuma-cni.conf"));
    assert!(report.label_to_nad.is_some(), "our controller made the NAD");
    assert!(report.restored_exactly, "Multus's conf unchanged and ours removed by the release's deletion");
    pods_redirected_and_host_as_before(&report);
}

/// `scripts/demo.sh --node --network flannel`, run as a test: K3D's cluster network on
/// the real node (flanneld v0.28 leasing the node's podCIDR through the API server, its
/// host-gw backend, the flannel plugin delegating to bridge), our plugin chained into
/// `10-flannel.conflist` as the k3d-flannel preset names it.
#[test]
fn the_real_node_demo_on_k3ds_flannel_chains_into_its_conflist() {
    if testkit::skip_privileged("the real-node demo on Flannel") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let report = real_node_demo(Mode::Chained, ClusterNetwork::Flannel);

    let (cidr, backend) = report.flannel_lease.clone().expect("flanneld's lease");
    assert_eq!(backend, "host-gw", "flanneld announced its backend on the node");
    let pod_ip = report.target.split(':').next().unwrap_or_default();
    let prefix = cidr.trim_end_matches("0/24");
    assert!(!cidr.is_empty() && pod_ip.starts_with(prefix), "pod {pod_ip} from flannel's lease {cidr}");
    assert_eq!(report.chained, ["flannel", "portmap", "bandwidth", "kong-mesh-cni"]);
    assert!(report.restored_exactly, "deleting the release restored 10-flannel.conflist byte for byte");
    assert_eq!(report.net_dir_after, ["10-flannel.conflist"]);
    pods_redirected_and_host_as_before(&report);
}

/// The real-node demo in `mode` on `network`, its report printed.
fn real_node_demo(mode: Mode, network: ClusterNetwork) -> demo::real_node::Report {
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_kong-mesh-cni"));
    let report = demo::real_node::run(binary, mode, network).expect("the demo runs");
    println!("{report}");
    report
}

/// What every real-node demo shows, whatever its mode and network: the validator
/// passed, the mesh app's connection landed on the sidecar with its original
/// destination, the plain pod is untouched, the plugin's line for the mesh pod is in
/// `kubectl logs`, and nothing of the node is left on the host.
fn pods_redirected_and_host_as_before(report: &demo::real_node::Report) {
    assert_eq!(report.validator_exit, Some(0), "the validator passed as the mesh pod's init container");
    assert_eq!(report.mesh_line, format!("dial {0} -> sidecar port=15001 uid=5678 orig={0}", report.target));
    assert_eq!(report.plain_line, format!("dial {} -> serve port=8080", report.target), "the plain pod is untouched");
    assert!(
        report.plugin_lines.iter().any(|l| l.contains("default/mesh") && l.contains("redirect programmed")),
        "{:#?}",
        report.plugin_lines
    );
    assert!(report.leftovers.is_empty(), "left behind: {:?}", report.leftovers);
    assert_eq!(report.host_changes, Vec::<String>::new(), "sysctls, iptables chains and host paths as before the node");
}
