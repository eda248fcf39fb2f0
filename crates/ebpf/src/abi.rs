//! The data the programs read, laid out exactly as in bpf/redirect.c, and the pure
//! translation of a Kuma configuration into it. A setting the eBPF mode cannot honour is
//! an error naming it, before anything is written.

use std::net::IpAddr;

use ipnet::IpNet;
use kuma::{Config, IpFamilyMode, Protocol, TrafficFlow};

use crate::EbpfError;

pub const MAX_CIDRS: usize = 32;
pub const MAX_UID_RULES: usize = 16;
pub const MAX_UID_PORT_RANGES: usize = 8;
const PORT_BITMAP_BYTES: usize = 8192;

pub const POD_IPV4: u8 = 1;
pub const POD_IPV6: u8 = 2;
pub const POD_DNS: u8 = 4;
const PROTO_TCP: u8 = 1;
const PROTO_UDP: u8 = 2;
pub const AF_INET: u32 = libc::AF_INET as u32;
pub const AF_INET6: u32 = libc::AF_INET6 as u32;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cidr {
    pub addr: [u32; 4],
    pub mask: [u32; 4],
    pub family: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UidRule {
    pub uid_first: u32,
    pub uid_last: u32,
    pub protocols: u8,
    pub nports: u8,
    pub pad: u16,
    pub ports: [PortRange; MAX_UID_PORT_RANGES],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub port: u16,
    pub enabled: u8,
    pub has_include: u8,
    pub ncidrs: u8,
    pub nuids: u8,
    pub pad: u16,
    pub cidrs: [Cidr; MAX_CIDRS],
    pub uids: [UidRule; MAX_UID_RULES],
    pub exclude: [u8; PORT_BITMAP_BYTES],
    pub include: [u8; PORT_BITMAP_BYTES],
}

/// One registered pod: the value of the `kmc_pods` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pod {
    pub uid: u32,
    pub dns_port: u16,
    pub flags: u8,
    pub pad: u8,
    pub inbound: Flow,
    pub outbound: Flow,
}

const _: () = assert!(size_of::<Pod>() == 36504, "must match struct pod in bpf/redirect.c");

/// A registered pod's address: the key of the `kmc_addrs` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddrKey {
    pub family: u32,
    pub addr: [u32; 4],
}

// SAFETY: plain #[repr(C)] data without padding holes the kernel would read.
unsafe impl aya::Pod for Pod {}
// SAFETY: as above.
unsafe impl aya::Pod for AddrKey {}

impl AddrKey {
    pub fn new(ip: IpAddr) -> Self {
        let (family, addr) = words(ip);
        AddrKey { family, addr }
    }
}

/// An address as the programs hold it: network-order words, IPv4 in the first.
fn words(ip: IpAddr) -> (u32, [u32; 4]) {
    match ip {
        IpAddr::V4(v4) => (AF_INET, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (AF_INET6, [w(0), w(4), w(8), w(12)])
        }
    }
}

fn cidr(net: &IpNet) -> Cidr {
    let (family, addr) = words(net.network());
    let (_, mask) = words(net.netmask());
    Cidr { addr, mask, family }
}

fn set_port(bitmap: &mut [u8; PORT_BITMAP_BYTES], port: u16) {
    bitmap[usize::from(port >> 3)] |= 1 << (port & 7);
}

fn unsupported(setting: &'static str) -> EbpfError {
    EbpfError::Unsupported { setting }
}

fn flow(f: &TrafficFlow, direction: &'static str) -> Result<Flow, EbpfError> {
    let mut out = Flow {
        port: f.port,
        enabled: u8::from(f.enabled),
        has_include: u8::from(!f.include_ports.is_empty()),
        ncidrs: 0,
        nuids: 0,
        pad: 0,
        cidrs: [Cidr::default(); MAX_CIDRS],
        uids: [UidRule::default(); MAX_UID_RULES],
        exclude: [0; PORT_BITMAP_BYTES],
        include: [0; PORT_BITMAP_BYTES],
    };
    for p in &f.exclude_ports {
        set_port(&mut out.exclude, *p);
    }
    for p in &f.include_ports {
        set_port(&mut out.include, *p);
    }
    if f.exclude_ips.len() > MAX_CIDRS {
        return Err(EbpfError::TooMany { field: excluded_ips_field(direction), max: MAX_CIDRS });
    }
    for (slot, net) in out.cidrs.iter_mut().zip(&f.exclude_ips) {
        *slot = cidr(net);
    }
    out.ncidrs = f.exclude_ips.len() as u8;
    if f.exclude_ports_for_uids.len() > MAX_UID_RULES {
        return Err(EbpfError::TooMany {
            field: "traffic.kuma.io/exclude-outbound-ports-for-uids",
            max: MAX_UID_RULES,
        });
    }
    for (slot, rule) in out.uids.iter_mut().zip(&f.exclude_ports_for_uids) {
        if rule.ports.len() > MAX_UID_PORT_RANGES {
            return Err(EbpfError::TooMany {
                field: "traffic.kuma.io/exclude-outbound-ports-for-uids (port ranges of one entry)",
                max: MAX_UID_PORT_RANGES,
            });
        }
        let mut ports = [PortRange::default(); MAX_UID_PORT_RANGES];
        for (p, r) in ports.iter_mut().zip(&rule.ports) {
            *p = PortRange { first: r.first, last: r.last };
        }
        let protocols = rule.protocols.iter().fold(0, |acc, p| {
            acc | match p {
                Protocol::Tcp => PROTO_TCP,
                Protocol::Udp => PROTO_UDP,
            }
        });
        *slot = UidRule {
            uid_first: rule.uids.first.into(),
            uid_last: rule.uids.last.into(),
            protocols,
            nports: rule.ports.len() as u8,
            pad: 0,
            ports,
        };
    }
    out.nuids = f.exclude_ports_for_uids.len() as u8;
    Ok(out)
}

fn excluded_ips_field(direction: &str) -> &'static str {
    if direction == "inbound" { "traffic.kuma.io/exclude-inbound-ips" } else { "traffic.kuma.io/exclude-outbound-ips" }
}

/// The map value for a pod with this configuration and these addresses (IPv6 is
/// redirected in dual-stack mode when the pod has an IPv6 address, as in iptables mode).
pub fn pod(cfg: &Config, addresses: &[IpAddr]) -> Result<Box<Pod>, EbpfError> {
    // Settings that only mean something to iptables/conntrack are not listed here:
    // the lock wait/retry, comments, rule insertion order and the conntrack zone split
    // (the eBPF redirect makes no conntrack entries to split).
    if !cfg.vnet.is_empty() {
        return Err(unsupported("redirect.vnet.networks"));
    }
    if cfg.drop_invalid_packets {
        return Err(unsupported("dropInvalidPackets (traffic.kuma.io/drop-invalid-packets)"));
    }
    if cfg.log.enabled {
        return Err(unsupported("log.enabled (traffic.kuma.io/iptables-logs)"));
    }
    if cfg.dns.enabled && !cfg.dns.capture_all {
        return Err(unsupported("redirect.dns.captureAll: false"));
    }
    if !cfg.inbound.exclude_ports_for_uids.is_empty() {
        return Err(unsupported("redirect.inbound.excludePortsForUIDs"));
    }
    let ipv6 = cfg.ip_family_mode == IpFamilyMode::DualStack && addresses.iter().any(IpAddr::is_ipv6);
    let mut flags = POD_IPV4;
    if ipv6 {
        flags |= POD_IPV6;
    }
    if cfg.dns.enabled {
        flags |= POD_DNS;
    }
    Ok(Box::new(Pod {
        uid: cfg.uid,
        dns_port: cfg.dns.port,
        flags,
        pad: 0,
        inbound: flow(&cfg.inbound, "inbound")?,
        outbound: flow(&cfg.outbound, "outbound")?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_translate_to_the_iptables_meaning() {
        let cfg = Config::default();
        let pod = pod(&cfg, &["10.0.0.2".parse().unwrap()]).unwrap();
        assert_eq!(pod.flags, POD_IPV4);
        assert_eq!((pod.uid, pod.inbound.port, pod.outbound.port), (5678, 15006, 15001));
        assert_eq!(pod.outbound.has_include, 0);
    }

    #[test]
    fn ports_cidrs_and_uid_rules_land_in_the_value() {
        let mut cfg = Config::default();
        cfg.outbound.exclude_ports = vec![9901, 0xffff];
        cfg.outbound.exclude_ips = vec!["10.1.0.0/16".parse().unwrap(), "fd00::/8".parse().unwrap()];
        cfg.dns.enabled = true;
        let pod = pod(&cfg, &["10.0.0.2".parse().unwrap(), "fd00::2".parse().unwrap()]).unwrap();
        assert_eq!(pod.flags, POD_IPV4 | POD_IPV6 | POD_DNS);
        assert_eq!(pod.outbound.exclude[9901 >> 3], 1 << (9901 & 7));
        assert_eq!(pod.outbound.exclude[8191], 0x80);
        assert_eq!(pod.outbound.ncidrs, 2);
        let c = pod.outbound.cidrs[0];
        assert_eq!(
            (c.family, c.addr[0].to_ne_bytes(), c.mask[0].to_ne_bytes()),
            (AF_INET, [10, 1, 0, 0], [255, 255, 0, 0])
        );
        assert_eq!(pod.outbound.cidrs[1].family, AF_INET6);
    }

    #[test]
    fn ipv4_mode_never_redirects_ipv6() {
        let cfg = Config { ip_family_mode: IpFamilyMode::Ipv4, ..Config::default() };
        assert_eq!(pod(&cfg, &["fd00::2".parse().unwrap()]).unwrap().flags, POD_IPV4);
    }

    #[test]
    fn each_setting_the_mode_cannot_honour_is_refused_by_its_name() {
        fn uid_rule(ports: usize) -> kuma::UidPortExclusion {
            kuma::UidPortExclusion {
                protocols: vec![Protocol::Tcp],
                ports: vec![kuma::Range16 { first: 80, last: 81 }; ports],
                uids: kuma::Range16::single(1000),
            }
        }
        type Setting = fn(&mut Config);
        let cases: [(&str, Setting); 9] = [
            ("redirect.vnet.networks", |c| {
                c.vnet = vec![kuma::VnetNetwork { interface: "docker0".into(), cidr: "172.17.0.0/16".parse().unwrap() }]
            }),
            ("traffic.kuma.io/drop-invalid-packets", |c| c.drop_invalid_packets = true),
            ("traffic.kuma.io/iptables-logs", |c| c.log.enabled = true),
            ("redirect.dns.captureAll: false", |c| {
                c.dns.enabled = true;
                c.dns.capture_all = false;
            }),
            ("redirect.inbound.excludePortsForUIDs", |c| c.inbound.exclude_ports_for_uids = vec![uid_rule(1)]),
            ("traffic.kuma.io/exclude-inbound-ips", |c| {
                c.inbound.exclude_ips = vec!["10.0.0.0/8".parse().unwrap(); MAX_CIDRS + 1]
            }),
            ("traffic.kuma.io/exclude-outbound-ips", |c| {
                c.outbound.exclude_ips = vec!["fd00::/8".parse().unwrap(); MAX_CIDRS + 1]
            }),
            ("traffic.kuma.io/exclude-outbound-ports-for-uids: the eBPF mode takes at most 16", |c| {
                c.outbound.exclude_ports_for_uids = vec![uid_rule(1); MAX_UID_RULES + 1]
            }),
            ("(port ranges of one entry): the eBPF mode takes at most 8", |c| {
                c.outbound.exclude_ports_for_uids = vec![uid_rule(MAX_UID_PORT_RANGES + 1)]
            }),
        ];
        for (named, set) in cases {
            let mut cfg = Config::default();
            set(&mut cfg);
            let err = pod(&cfg, &[]).expect_err(named);
            assert!(err.is_config(), "{named}: {err}");
            assert!(err.to_string().contains(named), "{named}: {err}");
        }
        // At the limits, and the settings that only mean something to iptables, pass.
        let mut cfg = Config { comments: false, wait: 5, ..Config::default() };
        cfg.dns.enabled = true;
        cfg.dns.skip_conntrack_zone_split = true;
        cfg.outbound.insert_redirect_instead_of_append = true;
        cfg.outbound.exclude_ips = vec!["10.0.0.0/8".parse().unwrap(); MAX_CIDRS];
        cfg.outbound.exclude_ports_for_uids = vec![uid_rule(MAX_UID_PORT_RANGES); MAX_UID_RULES];
        let p = pod(&cfg, &[]).unwrap();
        assert_eq!((p.outbound.ncidrs, p.outbound.nuids), (MAX_CIDRS as u8, MAX_UID_RULES as u8));
        assert_eq!(p.outbound.uids[0].nports, MAX_UID_PORT_RANGES as u8);
    }
}
