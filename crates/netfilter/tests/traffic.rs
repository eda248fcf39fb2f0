//! Real rules in real namespaces, checked with real traffic: where each connection or
//! datagram lands, and the original destination conntrack reports. Every test runs
//! for both iptables backends and the native nf_tables one.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use kuma::Config;
use netfilter::{BackendChoice, BackendKind, Options, apply, remove, verify};
use testkit::net::{
    Topology, accept_within, bind_udp, connect_tcp, listen_tcp, read_exact, recv_udp, require_root, send_udp,
};
use validator::original_destination;

const BACKENDS: [BackendKind; 3] = [BackendKind::Nft, BackendKind::Legacy, BackendKind::Native];
const IPTABLES: [BackendKind; 2] = [BackendKind::Nft, BackendKind::Legacy];
const SIDECAR: u32 = 5678;

fn config(pairs: &[(&str, &str)]) -> Config {
    let annotations: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    kuma::from_annotations(&annotations).unwrap()
}

fn options(kind: BackendKind) -> Options {
    Options {
        backend: BackendChoice::Forced(kind),
        lock_dir: std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("xtables-locks"),
        ..Options::default()
    }
}

fn sock(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

const WAIT: Duration = Duration::from_secs(2);
const NOT_THERE: Duration = Duration::from_millis(300);

/// A TCP connection from `from` (as `uid`) to `dest` must be accepted by `expected`
/// (and not by `other`), with `dest` as its original destination, and carry data.
fn assert_lands(
    from: &netns::NetNs,
    uid: Option<u32>,
    dest: SocketAddr,
    expected: &std::net::TcpListener,
    other: Option<&std::net::TcpListener>,
    what: &str,
) {
    let payload = format!("hello {dest}");
    let _client = connect_tcp(from, uid, dest, payload.as_bytes()).unwrap_or_else(|e| panic!("{what}: connect: {e}"));
    let mut conn =
        accept_within(expected, WAIT).unwrap_or_else(|| panic!("{what}: nothing arrived on the expected listener"));
    assert_eq!(read_exact(&mut conn, payload.len()), payload.as_bytes(), "{what}: payload");
    // Where conntrack does not track (the peer namespace has no rules), a connection
    // that was not redirected has no original destination but its local address.
    let seen = original_destination(&conn).or_else(|_| conn.local_addr()).unwrap();
    assert_eq!(seen, dest, "{what}: original destination");
    if let Some(other) = other {
        assert!(accept_within(other, NOT_THERE).is_none(), "{what}: a connection also arrived on the other listener");
    }
}

#[test]
fn outbound_inbound_and_dns_are_redirected_ipv4_and_ipv6() {
    if !require_root() {
        return;
    }
    for kind in BACKENDS {
        let topo = Topology::new("fwtr", true);
        let (pod, peer) = (topo.pod.open(), topo.peer.open());
        let cfg = config(&[("kuma.io/builtin-dns", "enabled")]);
        let report = apply(&pod, &cfg, &options(kind)).unwrap();
        assert_eq!(report.backend, kind);
        assert_eq!(report.families.len(), 2, "the pod has IPv6, so both families get rules");
        assert!(verify(&pod, &cfg, &options(kind)).unwrap().missing.is_empty());

        for v6 in [false, true] {
            let tag = format!("{}/{}", kind.as_str(), if v6 { "ipv6" } else { "ipv4" });
            let outbound = listen_tcp(&pod, v6, 15001);
            let inbound = listen_tcp(&pod, v6, 15006);
            let admin = listen_tcp(&pod, v6, 9901);
            let peer_app = listen_tcp(&peer, v6, 8080);
            let peer_admin = listen_tcp(&peer, v6, 9901);
            let far: IpAddr = if v6 { "2001:db8::1".parse().unwrap() } else { "192.0.2.1".parse().unwrap() };

            assert_lands(&pod, None, sock(far, 80), &outbound, None, &format!("{tag}: outbound to anywhere"));
            assert_lands(
                &pod,
                None,
                sock(topo.peer_addr(v6), 8080),
                &outbound,
                Some(&peer_app),
                &format!("{tag}: outbound to the peer"),
            );
            assert_lands(&peer, None, sock(topo.pod_addr(v6), 8080), &inbound, None, &format!("{tag}: inbound"));
            assert_lands(
                &peer,
                None,
                sock(topo.pod_addr(v6), 9901),
                &admin,
                Some(&inbound),
                &format!("{tag}: excluded inbound port"),
            );
            assert_lands(
                &pod,
                None,
                sock(topo.peer_addr(v6), 9901),
                &peer_admin,
                Some(&outbound),
                &format!("{tag}: excluded outbound port"),
            );
            assert_lands(
                &pod,
                Some(SIDECAR),
                sock(topo.peer_addr(v6), 8080),
                &peer_app,
                Some(&outbound),
                &format!("{tag}: sidecar TCP"),
            );

            let dns_proxy = bind_udp(&pod, v6, 15053);
            let peer_dns = bind_udp(&peer, v6, 53);
            send_udp(&pod, None, sock(topo.peer_addr(v6), 53), b"query-app").unwrap();
            assert_eq!(
                recv_udp(&dns_proxy).map(|m| m.0),
                Some(b"query-app".to_vec()),
                "{tag}: app DNS goes to the DNS proxy"
            );
            assert!(recv_udp(&peer_dns).is_none(), "{tag}: app DNS must not reach the server directly");
            send_udp(&pod, Some(SIDECAR), sock(topo.peer_addr(v6), 53), b"query-sidecar").unwrap();
            assert_eq!(
                recv_udp(&peer_dns).map(|m| m.0),
                Some(b"query-sidecar".to_vec()),
                "{tag}: sidecar DNS goes out"
            );
            assert!(recv_udp(&dns_proxy).is_none(), "{tag}: sidecar DNS must not loop to the proxy");
        }
    }
}

#[test]
fn exclusions_by_ip_uid_and_port_are_not_redirected() {
    if !require_root() {
        return;
    }
    for kind in BACKENDS {
        let topo = Topology::new("fwex", false);
        topo.peer.ip(&["addr", "add", "10.77.0.3/24", "dev", "eth0"]);
        let (pod, peer) = (topo.pod.open(), topo.peer.open());
        let cfg = config(&[
            ("traffic.kuma.io/exclude-outbound-ips", "10.77.0.3"),
            ("traffic.kuma.io/exclude-inbound-ips", "10.77.0.0/24"),
            ("traffic.kuma.io/exclude-outbound-ports-for-uids", "tcp:8080:1000;tcp:7000,7100-7200:1001-1010"),
            ("traffic.kuma.io/exclude-outbound-ports", "7000"),
        ]);
        let report = apply(&pod, &cfg, &options(kind)).unwrap();
        assert_eq!(report.families.len(), 1, "no IPv6 address in the pod: IPv4 only");
        let tag = kind.as_str();
        let outbound = listen_tcp(&pod, false, 15001);
        let inbound = listen_tcp(&pod, false, 15006);
        let pod_app = listen_tcp(&pod, false, 8080);
        let peer_app = listen_tcp(&peer, false, 8080);
        let peer_7000 = listen_tcp(&peer, false, 7000);
        let peer_7150 = listen_tcp(&peer, false, 7150);
        let peer_7201 = listen_tcp(&peer, false, 7201);
        let peer = &peer;

        // A UID range and a port range (the native backend: byteorder + range).
        assert_lands(
            &pod,
            Some(1005),
            "10.77.0.1:7150".parse().unwrap(),
            &peer_7150,
            Some(&outbound),
            &format!("{tag}: UID in the range, port in the range"),
        );
        assert_lands(
            &pod,
            Some(1011),
            "10.77.0.1:7150".parse().unwrap(),
            &outbound,
            Some(&peer_7150),
            &format!("{tag}: UID past the range"),
        );
        assert_lands(
            &pod,
            Some(1005),
            "10.77.0.1:7201".parse().unwrap(),
            &outbound,
            Some(&peer_7201),
            &format!("{tag}: the port past the port range (native: the interval's end in the set)"),
        );

        assert_lands(
            &pod,
            None,
            "10.77.0.3:8080".parse().unwrap(),
            &peer_app,
            Some(&outbound),
            &format!("{tag}: excluded outbound IP"),
        );
        assert_lands(
            &pod,
            Some(1000),
            "10.77.0.1:8080".parse().unwrap(),
            &peer_app,
            Some(&outbound),
            &format!("{tag}: excluded UID"),
        );
        assert_lands(
            &pod,
            Some(1001),
            "10.77.0.1:8080".parse().unwrap(),
            &outbound,
            Some(&peer_app),
            &format!("{tag}: other UID, or a port outside the UID's ports"),
        );
        assert_lands(
            &pod,
            None,
            "10.77.0.1:7000".parse().unwrap(),
            &peer_7000,
            Some(&outbound),
            &format!("{tag}: excluded outbound port"),
        );
        assert_lands(
            peer,
            None,
            "10.77.0.2:8080".parse().unwrap(),
            &pod_app,
            Some(&inbound),
            &format!("{tag}: excluded inbound source"),
        );
    }
}

/// Every chain and rule of the family, as the backend's own tool lists them (for the
/// native backend every nf_tables table of the family, ours and others').
fn rules_of(topo: &Topology, kind: BackendKind, v6: bool) -> Vec<String> {
    if kind == BackendKind::Native {
        let family = if v6 { "ip6" } else { "ip" };
        return topo
            .pod
            .exec("nft", &["list", "ruleset", family])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && *l != "}")
            .map(str::to_owned)
            .collect();
    }
    let tool = format!("{}-{}-save", if v6 { "ip6tables" } else { "iptables" }, kind.as_str());
    topo.pod
        .exec(&tool, &[])
        .lines()
        .filter(|l| l.starts_with("-A ") || (l.starts_with(':') && l.contains(" - ")))
        .map(str::to_owned)
        .collect()
}

/// Rules of others, in the backend's own terms: a chain and rules in nat and raw.
fn add_others_rules(topo: &Topology, kind: BackendKind) {
    if kind == BackendKind::Native {
        for family in ["ip", "ip6"] {
            let script = format!(
                "add table {family} others\n\
                 add chain {family} others out {{ type nat hook output priority -100; }}\n\
                 add chain {family} others mine\n\
                 add rule {family} others out tcp dport 4444 jump mine\n\
                 add chain {family} others raw {{ type filter hook output priority -300; }}\n\
                 add rule {family} others raw udp dport 5555 accept\n"
            );
            topo.pod.exec("sh", &["-c", &format!("printf '{script}' | nft -f -")]);
        }
        return;
    }
    for tool in ["iptables", "ip6tables"] {
        let tool = format!("{tool}-{}", kind.as_str());
        topo.pod.exec(&tool, &["-t", "nat", "-N", "OTHERS"]);
        topo.pod.exec(&tool, &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "4444", "-j", "OTHERS"]);
        topo.pod.exec(&tool, &["-t", "raw", "-A", "OUTPUT", "-p", "udp", "--dport", "5555", "-j", "ACCEPT"]);
    }
}

#[test]
fn apply_twice_leaves_one_copy_and_remove_restores_the_rest() {
    if !require_root() {
        return;
    }
    for kind in BACKENDS {
        let topo = Topology::new("fwid", true);
        let pod = topo.pod.open();
        add_others_rules(&topo, kind);
        let before = [rules_of(&topo, kind, false), rules_of(&topo, kind, true)];

        let cfg = config(&[("kuma.io/builtin-dns", "enabled"), ("traffic.kuma.io/drop-invalid-packets", "true")]);
        let first = apply(&pod, &cfg, &options(kind)).unwrap();
        // The native backend has a table of its own: others' tables are no merge.
        assert_eq!(first.replaced_existing, kind != BackendKind::Native, "{kind:?}: the merge path");
        let second = apply(&pod, &cfg, &options(kind)).unwrap();
        assert!(second.replaced_existing);
        for (i, v6) in [false, true].into_iter().enumerate() {
            let after = rules_of(&topo, kind, v6);
            let ours = after.iter().filter(|l| l.contains("kuma/mesh/transparent/proxy/")).count();
            assert_eq!(ours, first.rules / 2, "{kind:?} v6={v6}: one copy of each rule:\n{}", after.join("\n"));
            for line in &before[i] {
                assert!(after.contains(line), "{kind:?}: others' rule {line} survived apply");
            }
        }
        assert!(verify(&pod, &cfg, &options(kind)).unwrap().missing.is_empty());

        let removed = remove(&pod, Some(&cfg), &options(kind)).unwrap();
        assert_eq!(removed.removed.len(), 2, "{removed:?}");
        assert_eq!(rules_of(&topo, kind, false), before[0], "{kind:?}: IPv4 is back to exactly the others' rules");
        assert_eq!(rules_of(&topo, kind, true), before[1], "{kind:?}: IPv6 is back to exactly the others' rules");
        let again = remove(&pod, Some(&cfg), &options(kind)).unwrap();
        assert!(again.removed.is_empty(), "a second remove finds nothing");
    }
}

#[test]
fn verify_names_a_deleted_rule() {
    if !require_root() {
        return;
    }
    for kind in BACKENDS {
        let topo = Topology::new("fwvf", false);
        let pod = topo.pod.open();
        let cfg = Config::default();
        apply(&pod, &cfg, &options(kind)).unwrap();
        let victim = rules_of(&topo, kind, false).into_iter().find(|l| l.contains("localhost not redirected")).unwrap();
        // Through a shell, so the quoted comment stays one argument.
        if kind == BackendKind::Native {
            // With nft, by handle; the rule is listed without it.
            let listing = topo.pod.exec("nft", &["-a", "list", "chain", "ip", "kuma_mesh", "KUMA_MESH_OUTBOUND"]);
            let line = listing.lines().find(|l| l.contains("localhost not redirected")).unwrap();
            let handle = line.rsplit("# handle ").next().unwrap().trim();
            topo.pod.exec("nft", &["delete", "rule", "ip", "kuma_mesh", "KUMA_MESH_OUTBOUND", "handle", handle]);
            let report = verify(&pod, &cfg, &options(kind)).unwrap();
            assert_eq!(report.missing, vec![format!("ipv4: rule ip kuma_mesh KUMA_MESH_OUTBOUND {victim}")]);
            continue;
        }
        let delete = format!("iptables-{} -t nat {}", kind.as_str(), victim.replacen("-A ", "-D ", 1));
        topo.pod.exec("sh", &["-c", &delete]);
        let report = verify(&pod, &cfg, &options(kind)).unwrap();
        assert_eq!(report.missing, vec![format!("ipv4: -t nat {victim}")], "{kind:?}");
    }
}

#[test]
fn auto_detection_follows_the_namespace_then_the_host() {
    if !require_root() {
        return;
    }
    for kind in IPTABLES {
        let topo = Topology::new("fwsel", false);
        topo.pod.exec(&format!("iptables-{}", kind.as_str()), &["-t", "filter", "-N", "SOMEONE"]);
        let auto = Options { backend: BackendChoice::Auto, ..options(kind) };
        let report = apply(&topo.pod.open(), &Config::default(), &auto).unwrap();
        assert_eq!(report.backend, kind, "the pod namespace's existing tables decide: {}", report.backend_reason);
        assert!(report.backend_reason.contains("pod namespace"), "{}", report.backend_reason);
    }
}

/// A pod namespace with both kinds of tables: its own rules are counted (in it, not in
/// the host's namespace, where the counting saves once ran), and the kind holding more
/// of them is chosen.
#[test]
fn auto_detection_counts_the_pod_namespaces_rules_when_both_kinds_are_there() {
    if !require_root() {
        return;
    }
    let topo = Topology::new("fwboth", false);
    for (tool, chains) in [("iptables-legacy", ["L1", "L2", "L3"].as_slice()), ("iptables-nft", ["N1"].as_slice())] {
        for chain in chains {
            topo.pod.exec(tool, &["-t", "filter", "-N", chain]);
            topo.pod.exec(tool, &["-t", "filter", "-A", "INPUT", "-j", chain]);
        }
    }
    let auto = Options { backend: BackendChoice::Auto, ..options(BackendKind::Nft) };
    let report = apply(&topo.pod.open(), &Config::default(), &auto).unwrap();
    assert_eq!(report.backend, BackendKind::Legacy, "{}", report.backend_reason);
    assert_eq!(
        report.backend_reason,
        "the pod namespace has more iptables-legacy rules (3) than iptables-nft rules (1)"
    );
}
