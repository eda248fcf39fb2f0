//! The redirect on the real kernel: real namespaces, real connections, the original
//! destination read back the way Envoy and our validator read it.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::{TestNode, connect, require_ebpf};
use kuma::Config;
use testkit::net::{Topology, accept_within, listen_tcp, read_exact};

const WAIT: Duration = Duration::from_secs(2);

fn pod_addrs(topo: &Topology) -> Vec<IpAddr> {
    vec![topo.pod_addr(false), topo.pod_addr(true)]
}

#[test]
fn outbound_tcp_goes_to_the_outbound_listener_with_its_original_destination() {
    if !require_ebpf() {
        return;
    }
    let node = TestNode::new();
    let topo = Topology::new("ebo", true);
    let pod = topo.pod.open();
    node.registry().register("c1", &pod, &Config::default(), &pod_addrs(&topo)).unwrap();
    for v6 in [false, true] {
        let outbound = listen_tcp(&pod, v6, 15001);
        let dest = SocketAddr::new(topo.peer_addr(v6), 8080);
        let _client = connect(&pod, None, dest, b"hello").unwrap();
        let mut accepted = accept_within(&outbound, WAIT).unwrap_or_else(|| panic!("not redirected (v6 {v6})"));
        assert_eq!(read_exact(&mut accepted, 5), b"hello");
        assert_eq!(validator::original_destination(&accepted).unwrap(), dest, "v6 {v6}");
    }
}

/// Connects to `dest` from the pod and tells where the connection arrived: on the
/// outbound listener (with its original destination) or directly.
fn arrives(
    pod: &netns::NetNs,
    uid: Option<u32>,
    dest: SocketAddr,
    redirected_to: &std::net::TcpListener,
    direct: &std::net::TcpListener,
) -> Arrival {
    let _client = connect(pod, uid, dest, b"x").unwrap_or_else(|e| panic!("connect to {dest}: {e}"));
    let start = std::time::Instant::now();
    while start.elapsed() < WAIT {
        if let Some(s) = accept_within(redirected_to, Duration::from_millis(20)) {
            return Arrival::Redirected(validator::original_destination(&s).ok());
        }
        if accept_within(direct, Duration::from_millis(20)).is_some() {
            return Arrival::Direct;
        }
    }
    panic!("the connection to {dest} arrived nowhere");
}

#[derive(Debug, PartialEq)]
enum Arrival {
    Redirected(Option<SocketAddr>),
    Direct,
}

const SIDECAR: u32 = 5678;

#[test]
fn sidecar_uid_and_every_exclusion_kind_bypass_the_redirect_in_both_families() {
    if !require_ebpf() {
        return;
    }
    let node = TestNode::new();
    let topo = Topology::new("ebx", true);
    let pod = topo.pod.open();
    let peer = topo.peer.open();
    let mut cfg = Config::default();
    cfg.outbound.exclude_ports = vec![9901];
    cfg.outbound.exclude_ips = vec!["10.77.0.1/32".parse().unwrap(), "fd00:77::1/128".parse().unwrap()];
    cfg.outbound.exclude_ports_for_uids = vec![kuma::UidPortExclusion {
        protocols: vec![kuma::Protocol::Tcp],
        ports: vec![kuma::Range16 { first: 8080, last: 8081 }],
        uids: kuma::Range16 { first: 1000, last: 1001 },
    }];
    node.registry().register("c1", &pod, &cfg, &pod_addrs(&topo)).unwrap();
    // A second peer address, not excluded, reached through the same veth.
    topo.peer.ip(&["addr", "add", "10.77.0.9/24", "dev", "eth0"]);
    topo.peer.ip(&["addr", "add", "fd00:77::9/64", "dev", "eth0", "nodad"]);
    for v6 in [false, true] {
        let other: IpAddr = if v6 { "fd00:77::9".parse().unwrap() } else { "10.77.0.9".parse().unwrap() };
        let outbound = listen_tcp(&pod, v6, 15001);
        let direct_8080 = listen_tcp(&peer, v6, 8080);
        let direct_9901 = listen_tcp(&peer, v6, 9901);
        let to = |ip: IpAddr, port| SocketAddr::new(ip, port);
        let expect = |uid, dest: SocketAddr, direct, want: Arrival| {
            assert_eq!(arrives(&pod, uid, dest, &outbound, direct), want, "uid {uid:?} to {dest}");
        };
        let redirected = |dest| Arrival::Redirected(Some(dest));
        expect(None, to(other, 8080), &direct_8080, redirected(to(other, 8080)));
        expect(Some(SIDECAR), to(other, 8080), &direct_8080, Arrival::Direct);
        expect(None, to(other, 9901), &direct_9901, Arrival::Direct);
        expect(None, to(topo.peer_addr(v6), 8080), &direct_8080, Arrival::Direct);
        expect(Some(1001), to(other, 8080), &direct_8080, Arrival::Direct);
        expect(Some(1002), to(other, 8080), &direct_8080, redirected(to(other, 8080)));
        expect(Some(1000), to(other, 9901), &direct_9901, Arrival::Direct);
    }
}

#[test]
fn include_ports_redirect_only_those_ports() {
    if !require_ebpf() {
        return;
    }
    let node = TestNode::new();
    let topo = Topology::new("ebi", false);
    let pod = topo.pod.open();
    let peer = topo.peer.open();
    let mut cfg = Config::default();
    cfg.outbound.include_ports = vec![8081];
    cfg.outbound.exclude_ports = vec![8081]; // ignored: include ports win
    node.registry().register("c1", &pod, &cfg, &[topo.pod_addr(false)]).unwrap();
    let outbound = listen_tcp(&pod, false, 15001);
    let (p8080, p8081) = (listen_tcp(&peer, false, 8080), listen_tcp(&peer, false, 8081));
    let peer_at = |port| SocketAddr::new(topo.peer_addr(false), port);
    assert_eq!(arrives(&pod, None, peer_at(8080), &outbound, &p8080), Arrival::Direct);
    assert_eq!(arrives(&pod, None, peer_at(8081), &outbound, &p8081), Arrival::Redirected(Some(peer_at(8081))));
}

#[test]
fn an_unregistered_namespace_and_an_unregistered_pod_are_untouched() {
    if !require_ebpf() {
        return;
    }
    let node = TestNode::new();
    let topo = Topology::new("ebu", true);
    let other = Topology::new("ebv", true);
    let (pod, other_pod) = (topo.pod.open(), other.pod.open());
    let mut registry = node.registry();
    registry.register("c1", &pod, &Config::default(), &pod_addrs(&topo)).unwrap();
    for v6 in [false, true] {
        let outbound = listen_tcp(&other_pod, v6, 15001);
        let direct = listen_tcp(&other.peer.open(), v6, 8080);
        let dest = SocketAddr::new(other.peer_addr(v6), 8080);
        assert_eq!(arrives(&other_pod, None, dest, &outbound, &direct), Arrival::Direct);
    }
    // Unregistered (DEL): the pod's own connections go straight out again.
    registry.check("c1", &pod, &Config::default(), &pod_addrs(&topo)).unwrap();
    assert!(registry.unregister("c1").unwrap());
    assert!(!registry.unregister("c1").unwrap(), "DEL twice is fine");
    let err = registry.check("c1", &pod, &Config::default(), &pod_addrs(&topo)).unwrap_err();
    assert!(err.to_string().contains("c1"), "{err}");
    let outbound = listen_tcp(&pod, false, 15001);
    let direct = listen_tcp(&topo.peer.open(), false, 8080);
    let dest = SocketAddr::new(topo.peer_addr(false), 8080);
    assert_eq!(arrives(&pod, None, dest, &outbound, &direct), Arrival::Direct);
}

#[test]
fn check_names_a_configuration_that_differs() {
    if !require_ebpf() {
        return;
    }
    let node = TestNode::new();
    let topo = Topology::new("ebc", false);
    let pod = topo.pod.open();
    let mut registry = node.registry();
    registry.register("c1", &pod, &Config::default(), &[topo.pod_addr(false)]).unwrap();
    let mut other = Config::default();
    other.outbound.port = 15002;
    let err = registry.check("c1", &pod, &other, &[topo.pod_addr(false)]).unwrap_err().to_string();
    assert!(err.contains("configuration"), "{err}");
    let unsupported = Config { drop_invalid_packets: true, ..Config::default() };
    let err = registry.register("c2", &pod, &unsupported, &[]).unwrap_err();
    assert!(err.is_config() && err.to_string().contains("drop-invalid-packets"), "{err}");
}
