//! The plugin in eBPF mode as a container runtime drives it: the reference libcni
//! runtime and real reference plugins with ours last, pods in a real API server, our
//! programs loaded into a private bpffs and attached to this test's own cgroup (which
//! holds the test thread and the probes it starts), and real traffic whose original
//! destination is read back as Envoy reads it. No iptables rule is ever written.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use testkit::net::{NamedNetns, accept_within, connect_tcp, listen_tcp, read_exact};
use testkit::{Attachment, CniRuntime, Plugins, TestNamespace, pod, skip_heavy};
use validator::original_destination;

mod support;
use support::{BIN, fixture, our_entry, saved_rules};

#[path = "../../ebpf/tests/common/mod.rs"]
mod ebpf_node;
use ebpf_node::{TestNode, require_ebpf};

const WAIT: Duration = Duration::from_secs(2);

fn skip(what: &str) -> bool {
    skip_heavy(what) || !require_ebpf()
}

/// The bridge chain with our entry in eBPF mode, pointed at the test node's bpffs.
fn ebpf_chain(kubeconfig: &Path, scratch: &Path, node: &TestNode) -> CniRuntime {
    let mut rt = CniRuntime::bridge(Plugins::Upstream);
    rt.prepend_plugin_dir(Path::new(BIN).parent().unwrap());
    rt.append_plugin(our_entry(kubeconfig, scratch, json!({"ebpf": {"bpffs_path": node.paths.bpffs}})));
    rt
}

async fn mesh_pod(ns: &TestNamespace, name: &str, extra: &[(&str, &str)]) {
    let mut p = testkit::mesh_pod(name);
    for (k, v) in extra {
        p = p.annotation(k, v);
    }
    ns.create_pod(p.build()).await;
}

fn address(result: &Value) -> std::net::IpAddr {
    result["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().parse().unwrap()
}

fn registered(node: &TestNode) -> usize {
    ebpf::status(&node.paths).expect("programs loaded").registered_pods
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mesh_pod_is_redirected_without_iptables_and_a_plain_pod_is_untouched() {
    if skip("mesh pod through libcni in eBPF mode") {
        return;
    }
    let f = fixture().await;
    mesh_pod(&f.ns, "web", &[]).await;
    f.ns.create_pod(pod("client").build()).await;
    // From here on this thread, and every probe thread it starts, is in the test cgroup.
    let node = TestNode::new();
    let rt = ebpf_chain(&f.kubeconfig, f.scratch.path(), &node);
    let (web_ns, client_ns) = (NamedNetns::new("pew"), NamedNetns::new("pec"));
    let web = Attachment::new(&web_ns, f.ns.name(), "web");
    let client = Attachment::new(&client_ns, f.ns.name(), "client");
    let web_ip = address(&rt.add(&web).expect("ADD of the mesh pod"));
    let client_ip = address(&rt.add(&client).expect("ADD of a plain pod"));
    assert_eq!(saved_rules(&web_ns), "", "no iptables rule in eBPF mode");
    assert_eq!(registered(&node), 1, "only the mesh pod is registered");

    let (pod_ns, peer_ns) = (web_ns.open(), client_ns.open());
    // Outbound from the app lands on the sidecar's outbound listener.
    let outbound = listen_tcp(&pod_ns, false, 15001);
    let dest = SocketAddr::new(client_ip, 443);
    let _c = connect_tcp(&pod_ns, None, dest, b"out").unwrap();
    let mut conn = accept_within(&outbound, WAIT).expect("outbound redirected");
    assert_eq!(read_exact(&mut conn, 3), b"out");
    assert_eq!(original_destination(&conn).unwrap(), dest);
    // Inbound from the other pod lands on the inbound listener.
    let inbound = listen_tcp(&pod_ns, false, 15006);
    let dest = SocketAddr::new(web_ip, 8080);
    let _c = connect_tcp(&peer_ns, None, dest, b"in").unwrap();
    let mut conn = accept_within(&inbound, WAIT).expect("inbound redirected");
    assert_eq!(read_exact(&mut conn, 2), b"in");
    assert_eq!(original_destination(&conn).unwrap(), dest);
    // The plain pod's own connections go where they were sent.
    let peer_outbound = listen_tcp(&peer_ns, false, 15001);
    let direct = listen_tcp(&peer_ns, false, 8443);
    let _c = connect_tcp(&peer_ns, None, SocketAddr::new(client_ip, 8443), b"x").unwrap();
    assert!(accept_within(&direct, WAIT).is_some(), "the plain pod's connection arrived where it was sent");
    assert!(accept_within(&peer_outbound, Duration::from_millis(100)).is_none(), "the plain pod is not redirected");

    rt.del(&client).expect("DEL of the plain pod");
    rt.check(&web).expect("CHECK passes while registered");
    rt.del(&web).expect("DEL");
    assert_eq!(registered(&node), 0, "DEL unregistered the pod");
    rt.del(&web).expect("a second DEL succeeds");

    let log = std::fs::read_to_string(f.scratch.path().join("cni.log")).unwrap();
    let line = log.lines().find(|l| l.contains("redirect registered (eBPF)")).expect("ADD logged");
    assert!(line.contains(&format!("pod={}/web", f.ns.name())) && line.contains(&web.container_id), "{line}");
    assert!(log.contains("redirect unregistered (eBPF)"), "DEL logged:\n{log}");
    // The eBPF crate's own lines are in the plugin's log too, at the configured level
    // (debug here; at info the plugin's lines above say it).
    assert!(log.contains("pod registered for the eBPF redirect"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_fails_once_the_programs_are_detached_and_del_still_succeeds() {
    if skip("CHECK in eBPF mode") {
        return;
    }
    let f = fixture().await;
    mesh_pod(&f.ns, "web", &[]).await;
    let node = TestNode::new();
    let rt = ebpf_chain(&f.kubeconfig, f.scratch.path(), &node);
    let web_ns = NamedNetns::new("pek");
    let web = Attachment::new(&web_ns, f.ns.name(), "web");
    rt.add(&web).expect("ADD");
    rt.check(&web).expect("CHECK while registered");
    ebpf::uninstall(&node.paths).expect("uninstall");
    let err = rt.check(&web).unwrap_err();
    assert_eq!(err.code, Some(101), "{err:?}");
    assert!(err.details.contains("not loaded"), "{err:?}");
    rt.del(&web).expect("DEL never fails");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_setting_the_ebpf_mode_cannot_honour_fails_add_with_code_7_naming_it() {
    if skip("unsupported setting in eBPF mode") {
        return;
    }
    let f = fixture().await;
    mesh_pod(&f.ns, "strict", &[("traffic.kuma.io/drop-invalid-packets", "true")]).await;
    mesh_pod(
        &f.ns,
        "vnet",
        &[(
            "traffic.kuma.io/transparent-proxy-config",
            "redirect:\n  vnet:\n    networks: [\"docker0:172.17.0.0/16\"]\n",
        )],
    )
    .await;
    let node = TestNode::new();
    let rt = ebpf_chain(&f.kubeconfig, f.scratch.path(), &node);
    for (name, setting) in [("strict", "traffic.kuma.io/drop-invalid-packets"), ("vnet", "redirect.vnet.networks")] {
        let netns = NamedNetns::new("peu");
        let a = Attachment::new(&netns, f.ns.name(), name);
        let err = rt.add(&a).unwrap_err();
        assert_eq!(err.code, Some(7), "{name}: {err:?}");
        assert!(err.details.contains(setting), "{name}: the setting is named: {err:?}");
        assert_eq!(registered(&node), 0, "{name}: nothing registered");
        let _ = rt.del(&a);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn standalone_like_multus_registers_the_namespaces_own_addresses_in_both_families() {
    if skip("standalone in eBPF mode") {
        return;
    }
    let f = fixture().await;
    mesh_pod(&f.ns, "solo", &[]).await;
    let node = TestNode::new();
    let mut entry = our_entry(&f.kubeconfig, f.scratch.path(), json!({"ebpf": {"bpffs_path": node.paths.bpffs}}));
    entry["cniVersion"] = json!("1.0.0");
    let mut rt =
        CniRuntime::custom(vec![], |_| json!({"cniVersion": "1.0.0", "name": "kong-mesh-cni", "plugins": [entry]}));
    rt.prepend_plugin_dir(Path::new(BIN).parent().unwrap());
    // Addressed by someone else (no prevResult): the plugin reads the namespace's own.
    let topo = testkit::net::Topology::new("pes", true);
    let a = Attachment::new(&topo.pod, f.ns.name(), "solo");
    rt.add(&a).expect("ADD without a previous result");
    let (pod_ns, peer_ns) = (topo.pod.open(), topo.peer.open());
    for v6 in [false, true] {
        let inbound = listen_tcp(&pod_ns, v6, 15006);
        let dest = SocketAddr::new(topo.pod_addr(v6), 8080);
        let _c = connect_tcp(&peer_ns, None, dest, b"in").unwrap();
        let conn = accept_within(&inbound, WAIT).unwrap_or_else(|| panic!("inbound to {dest} redirected"));
        assert_eq!(original_destination(&conn).unwrap(), dest);
    }
    rt.check(&a).expect("CHECK with the namespace's addresses");
    rt.del(&a).unwrap();
    assert_eq!(registered(&node), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_unregisters_a_pod_whose_namespace_went_without_a_del() {
    if skip("GC in eBPF mode") {
        return;
    }
    let f = fixture().await;
    mesh_pod(&f.ns, "web", &[]).await;
    let node = TestNode::new();
    let rt = ebpf_chain(&f.kubeconfig, f.scratch.path(), &node);
    let kept_ns = NamedNetns::new("pgk");
    let kept = Attachment::new(&kept_ns, f.ns.name(), "web");
    rt.add(&kept).expect("ADD");
    // A runtime that lost its state: its pod's namespace goes, and no DEL ever comes.
    let lost = ebpf_chain(&f.kubeconfig, f.scratch.path(), &node);
    {
        let gone_ns = NamedNetns::new("pgg");
        lost.add(&Attachment::new(&gone_ns, f.ns.name(), "web")).expect("ADD");
    }
    assert_eq!(registered(&node), 2);
    // The kernel tears the namespace down asynchronously; GC collects it once it has.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while registered(&node) == 2 && std::time::Instant::now() < deadline {
        rt.gc(&[&kept]).expect("GC");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(registered(&node), 1, "the gone pod is unregistered");
    rt.check(&kept).expect("the live pod keeps its registration");
    let log = std::fs::read_to_string(f.scratch.path().join("cni.log")).unwrap();
    assert!(log.contains("unregistered pods whose network namespace is gone"), "{log}");
}
