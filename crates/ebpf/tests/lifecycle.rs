//! Loading, reloading and uninstalling on the real kernel.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{TestNode, connection_loop, pin_dir_entries, require_ebpf};
use ebpf::{EbpfError, Feature, Helper, Paths, Probes, ProgramKind};
use kuma::Config;
use testkit::net::{Topology, accept_within, listen_tcp};

#[test]
fn a_second_install_replaces_the_programs_without_a_gap() {
    if !require_ebpf() {
        return;
    }
    let node = TestNode::new();
    let topo = Topology::new("ebr", false);
    let pod = topo.pod.open();
    node.registry().register("c1", &pod, &Config::default(), &[topo.pod_addr(false)]).unwrap();
    let counted = connection_loop(&pod, &topo, || {
        for _ in 0..3 {
            let installed = ebpf::install(&node.paths).expect("reinstall");
            assert!(installed.replaced);
        }
    });
    eprintln!("{} connections during three reloads", counted.made);
    assert!(counted.made > 50, "the loop made only {} connections", counted.made);
    assert_eq!(counted.escaped, 0, "connections escaped the redirect during the reload");
    assert!(counted.redirected > 50);
    // The registration survived, and the pod's sk_lookup link runs the new program.
    node.registry().check("c1", &pod, &Config::default(), &[topo.pod_addr(false)]).unwrap();
    assert_eq!(ebpf::status(&node.paths).unwrap().registered_pods, 1);
}

#[test]
fn uninstall_detaches_and_leaves_nothing_in_bpffs() {
    if !require_ebpf() {
        return;
    }
    let node = TestNode::new();
    let topo = Topology::new("ebz", false);
    let pod = topo.pod.open();
    node.registry().register("c1", &pod, &Config::default(), &[topo.pod_addr(false)]).unwrap();
    let status = ebpf::status(&node.paths).unwrap();
    assert_eq!(status.attached.len(), 8, "{status:?}");
    ebpf::uninstall(&node.paths).unwrap();
    // The kernel's own iterators (maps.debug, progs.debug) have a dot, which bpffs
    // refuses in any name we could pin.
    let ours: Vec<String> = pin_dir_entries(&node.paths.bpffs).into_iter().filter(|n| !n.contains('.')).collect();
    assert_eq!(ours, Vec::<String>::new(), "left in bpffs");
    // Detached: the pod's connections go straight out.
    let outbound = listen_tcp(&pod, false, 15001);
    let direct = listen_tcp(&topo.peer.open(), false, 8080);
    let _c = common::connect(&pod, None, SocketAddr::new(topo.peer_addr(false), 8080), b"x").unwrap();
    assert!(accept_within(&direct, Duration::from_secs(2)).is_some());
    assert!(accept_within(&outbound, Duration::from_millis(50)).is_none());
    assert!(matches!(ebpf::Registry::open(&node.paths), Err(EbpfError::NotLoaded { .. })));
    ebpf::uninstall(&node.paths).expect("uninstall twice is fine");
}

#[test]
fn preflight_names_what_is_missing() {
    if !require_ebpf() {
        return;
    }
    let node = TestNode::bare();
    ebpf::preflight(&node.paths).expect("this node has everything");
    let tmp = std::env::temp_dir();
    let err = ebpf::install(&Paths { bpffs: tmp.clone(), cgroup: tmp.clone() }).unwrap_err().to_string();
    assert!(err.contains("no bpffs mounted at") && err.contains("no cgroup2 mounted at"), "{err}");
    assert!(err.contains(tmp.to_str().unwrap()), "{err}");
    assert!(!tmp.join(ebpf::PIN_DIR).exists(), "nothing half-loaded");
}

/// RHEL 9.6's kernel: 5.14 by its version, with BPF rebased far beyond. The release is
/// reported through the seam, every feature is asked of the real kernel.
const RHEL_9_6: &str = "5.14.0-570.el9_6.x86_64";

#[test]
fn a_5_14_vendor_kernel_with_the_features_passes_the_check() {
    if !require_ebpf() {
        return;
    }
    let node = TestNode::bare();
    let probes = Probes { release: || Some(RHEL_9_6.to_owned()), feature: ebpf::probe };
    let start = std::time::Instant::now();
    let kernel = ebpf::preflight_with(&node.paths, &probes).expect("a kernel with every feature passes");
    eprintln!("every feature probed in {:?}", start.elapsed());
    assert_eq!(kernel, RHEL_9_6);
    // The probes can say no: sk_lookup programs may not update a socket hash.
    let never = Feature::Helper(ProgramKind::SkLookup, Helper::SockHashUpdate);
    assert!(!ebpf::probe(never).unwrap(), "{never} is not allowed to sk_lookup programs");
}

#[test]
fn a_kernel_missing_one_feature_is_refused_by_its_name() {
    if !require_ebpf() {
        return;
    }
    let node = TestNode::bare();
    // The real kernel answers for everything but the one feature RHEL 9's 5.14.0 would
    // lack without the BPF rebase.
    let probes = Probes {
        release: || Some(RHEL_9_6.to_owned()),
        feature: |f| match f {
            Feature::Helper(ProgramKind::SockOps, Helper::GetNetnsCookie) => Ok(false),
            f => ebpf::probe(f),
        },
    };
    let err = ebpf::preflight_with(&node.paths, &probes).unwrap_err();
    let EbpfError::Preflight { kernel, missing } = &err else { panic!("not a preflight refusal: {err}") };
    assert_eq!(kernel, RHEL_9_6);
    assert_eq!(missing, &["the kernel lacks bpf_get_netns_cookie for sock_ops programs (upstream 5.15)"]);
    assert_eq!(
        err.to_string(),
        format!(
            "the eBPF mode cannot run on this node (kernel {RHEL_9_6}): the kernel lacks bpf_get_netns_cookie for sock_ops programs (upstream 5.15)"
        )
    );
}

fn validator_settings(timeout: Duration) -> validator::Settings {
    validator::Settings {
        outbound_port: 15001,
        inbound_port: 15006,
        sidecar_uid: 5678,
        probe_ipv4: "10.255.255.254".parse().unwrap(),
        probe_ipv6: "fd00:6b6d:6300::fe".parse().unwrap(),
        timeout,
        family: validator::FamilyChoice::Auto,
    }
}

#[test]
fn the_validator_passes_unchanged_and_fails_once_the_programs_are_detached() {
    if !require_ebpf() {
        return;
    }
    let node = TestNode::new();
    let topo = Topology::new("ebval", true);
    let pod = topo.pod.open();
    node.registry().register("c1", &pod, &Config::default(), &[topo.pod_addr(false), topo.pod_addr(true)]).unwrap();
    let validated = pod.run(|| validator::validate(&validator_settings(Duration::from_secs(5)))).unwrap().unwrap();
    assert_eq!(validated.len(), 2, "both families validated: {validated:?}");
    ebpf::uninstall(&node.paths).unwrap();
    let err = pod.run(|| validator::validate(&validator_settings(Duration::from_millis(600)))).unwrap().unwrap_err();
    assert!(err.to_string().contains("not redirected"), "{err}");
}

#[test]
fn a_pod_whose_namespace_is_gone_is_swept_and_a_live_one_kept() {
    if !require_ebpf() {
        return;
    }
    let node = TestNode::new();
    let topo = Topology::new("ebs", false);
    let live = topo.pod.open();
    let mut registry = node.registry();
    let live_addr = [topo.pod_addr(false)];
    registry.register("live", &live, &Config::default(), &live_addr).unwrap();
    {
        // A pod whose DEL never comes: its namespace goes with no fd of ours left open.
        let netns = testkit::NamedNetns::new("ebg");
        registry.register("gone", &netns.open(), &Config::default(), &["10.98.0.9".parse().unwrap()]).unwrap();
    }
    assert_eq!(ebpf::status(&node.paths).unwrap().registered_pods, 2);
    // The kernel tears a namespace down asynchronously: the gone pod goes in the first
    // sweep or a later one, the live one in none.
    let mut swept = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while swept.is_empty() && std::time::Instant::now() < deadline {
        swept = registry.sweep().unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(swept, ["gone"], "the gone pod swept, the live one not");
    assert_eq!(ebpf::status(&node.paths).unwrap().registered_pods, 1);
    registry.check("live", &live, &Config::default(), &live_addr).expect("the live pod is as registered");
    assert!(!registry.unregister("gone").unwrap(), "nothing of the gone pod is left");
}
