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

#[test]
fn dns_over_udp_goes_to_the_dns_proxy_and_answers_show_the_server() {
    if !require_ebpf() {
        return;
    }
    let node = TestNode::new();
    let topo = Topology::new("ebd", true);
    let pod = topo.pod.open();
    let peer = topo.peer.open();
    let mut cfg = Config::default();
    cfg.dns.enabled = true;
    node.registry().register("c1", &pod, &cfg, &pod_addrs(&topo)).unwrap();
    for v6 in [false, true] {
        let proxy = testkit::net::bind_udp(&pod, v6, 15053);
        let server = testkit::net::bind_udp(&peer, v6, 53);
        let dns = SocketAddr::new(topo.peer_addr(v6), 53);
        // The application's query reaches the proxy; the answer seems to come from the server.
        let answer = common::as_uid(&pod, None, || {
            let any: SocketAddr = if v6 { "[::]:0".parse().unwrap() } else { "0.0.0.0:0".parse().unwrap() };
            let s = std::net::UdpSocket::bind(any).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            s.send_to(b"query", dns).unwrap();
            let (query, from) = testkit::net::recv_udp(&proxy).expect("the query reaches the DNS proxy");
            assert_eq!(query, b"query");
            proxy.send_to(b"answer", from).unwrap();
            let mut buf = [0; 64];
            let (n, source) = s.recv_from(&mut buf).expect("the answer");
            (buf[..n].to_vec(), source)
        });
        assert_eq!(answer, (b"answer".to_vec(), dns), "v6 {v6}");
        assert!(testkit::net::recv_udp(&server).is_none(), "the server saw the application's query");
        // The sidecar's own queries go to the server.
        common::as_uid(&pod, Some(SIDECAR), || {
            let any: SocketAddr = if v6 { "[::]:0".parse().unwrap() } else { "0.0.0.0:0".parse().unwrap() };
            std::net::UdpSocket::bind(any).unwrap().send_to(b"upstream", dns).unwrap();
        });
        assert_eq!(testkit::net::recv_udp(&server).map(|(q, _)| q), Some(b"upstream".to_vec()));
        assert!(testkit::net::recv_udp(&proxy).is_none());
    }
}

#[test]
fn dns_is_left_alone_when_builtin_dns_is_off() {
    if !require_ebpf() {
        return;
    }
    let node = TestNode::new();
    let topo = Topology::new("ebn", false);
    let pod = topo.pod.open();
    node.registry().register("c1", &pod, &Config::default(), &[topo.pod_addr(false)]).unwrap();
    let proxy = testkit::net::bind_udp(&pod, false, 15053);
    let server = testkit::net::bind_udp(&topo.peer.open(), false, 53);
    testkit::net::send_udp(&pod, None, SocketAddr::new(topo.peer_addr(false), 53), b"q").unwrap();
    assert!(testkit::net::recv_udp(&server).is_some());
    assert!(testkit::net::recv_udp(&proxy).is_none());
}

#[test]
fn inbound_tcp_goes_to_the_inbound_listener_with_its_original_destination() {
    if !require_ebpf() {
        return;
    }
    let node = TestNode::new();
    let topo = Topology::new("ebin", true);
    let pod = topo.pod.open();
    let peer = topo.peer.open();
    let mut cfg = Config::default();
    cfg.inbound.exclude_ports = vec![9901];
    cfg.inbound.exclude_ips = vec!["10.77.0.9/32".parse().unwrap()];
    node.registry().register("c1", &pod, &cfg, &pod_addrs(&topo)).unwrap();
    topo.peer.ip(&["addr", "add", "10.77.0.9/24", "dev", "eth0"]);
    for v6 in [false, true] {
        // The sidecar starts listening after ADD, as Envoy does.
        let inbound = listen_tcp(&pod, v6, 15006);
        let app = listen_tcp(&pod, v6, 8080);
        let admin = listen_tcp(&pod, v6, 9901);
        let dest = SocketAddr::new(topo.pod_addr(v6), 8080);
        let from_peer =
            |dest: SocketAddr| common::as_uid(&peer, None, || std::net::TcpStream::connect_timeout(&dest, WAIT));
        let _c = from_peer(dest).unwrap();
        let s = accept_within(&inbound, WAIT).unwrap_or_else(|| panic!("inbound not redirected (v6 {v6})"));
        assert_eq!(validator::original_destination(&s).unwrap(), dest);
        assert_eq!(s.local_addr().unwrap(), dest, "the destination stays visible");
        assert!(accept_within(&app, Duration::from_millis(50)).is_none());
        // Excluded port: straight to the application.
        let _c = from_peer(SocketAddr::new(topo.pod_addr(v6), 9901)).unwrap();
        assert!(accept_within(&admin, WAIT).is_some(), "excluded inbound port redirected (v6 {v6})");
        assert!(accept_within(&inbound, Duration::from_millis(50)).is_none());
        if !v6 {
            // Excluded source: straight to the application.
            let _c = common::as_uid(&peer, None, || {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                s.bind(&SocketAddr::from(([10, 77, 0, 9], 0)).into()).unwrap();
                s.connect_timeout(&dest.into(), WAIT).unwrap();
                s
            });
            assert!(accept_within(&app, WAIT).is_some(), "excluded inbound source redirected");
            let _c = common::as_uid(&peer, None, || {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                s.bind(&SocketAddr::from(([10, 77, 0, 1], 0)).into()).unwrap();
                s.connect_timeout(&dest.into(), WAIT).unwrap();
                s
            });
            assert!(accept_within(&inbound, WAIT).is_some(), "a source not excluded is redirected");
        }
    }
}

#[test]
fn the_loopback_paths_of_kuma_sidecar_to_self_inbound_and_passthrough() {
    if !require_ebpf() {
        return;
    }
    let node = TestNode::new();
    let topo = Topology::new("ebl", true);
    let pod = topo.pod.open();
    node.registry().register("c1", &pod, &Config::default(), &pod_addrs(&topo)).unwrap();
    for v6 in [false, true] {
        let inbound = listen_tcp(&pod, v6, 15006);
        let outbound = listen_tcp(&pod, v6, 15001);
        let app = listen_tcp(&pod, v6, 8080);
        let dest = SocketAddr::new(topo.pod_addr(v6), 8080);
        // The sidecar to the pod's own address: to the inbound listener.
        let _c = connect(&pod, Some(SIDECAR), dest, b"s").unwrap();
        let s = accept_within(&inbound, WAIT).unwrap_or_else(|| panic!("sidecar to self not redirected (v6 {v6})"));
        assert_eq!(validator::original_destination(&s).unwrap(), dest);
        // The sidecar forwarding inbound traffic from the passthrough address: straight in.
        let passthrough: IpAddr = if v6 { "::6".parse().unwrap() } else { "127.0.0.6".parse().unwrap() };
        let _c = common::as_uid(&pod, Some(SIDECAR), || {
            let domain = if v6 { socket2::Domain::IPV6 } else { socket2::Domain::IPV4 };
            let s = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
            s.bind(&SocketAddr::new(passthrough, 0).into()).unwrap();
            s.connect_timeout(&dest.into(), WAIT).unwrap();
            s
        });
        assert!(accept_within(&app, WAIT).is_some(), "passthrough redirected (v6 {v6})");
        // An application to its own pod address: not redirected.
        let _c = connect(&pod, None, dest, b"a").unwrap();
        assert!(accept_within(&app, WAIT).is_some(), "application to self redirected (v6 {v6})");
        assert!(accept_within(&inbound, Duration::from_millis(50)).is_none());
        assert!(accept_within(&outbound, Duration::from_millis(50)).is_none());
    }
}
