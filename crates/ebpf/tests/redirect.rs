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
