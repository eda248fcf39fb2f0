//! The validated transparent-proxy configuration of one pod.
//!
//! Every value here has already been checked: ports are 1..=65535, lists are bounded,
//! UIDs and CIDRs parsed. Rule generation can therefore not fail on its input.

use std::time::Duration;

use ipnet::IpNet;

/// The UID the sidecar (kuma-dp) runs as, unless configured otherwise.
pub const DEFAULT_UID: u32 = 5678;
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
pub const DEFAULT_DNS_PORT: u16 = 15053;
/// Envoy's admin port, excluded from both redirects on the legacy path (Kuma's default
/// exclusion, which `kuma.io/envoy-admin-port` does not move).
pub const DEFAULT_ENVOY_ADMIN_PORT: u16 = 9901;
pub const DEFAULT_APPLICATION_PROBE_PROXY_PORT: u16 = 9001;
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";
/// syslog "debug", the level Kuma logs iptables matches at by default.
pub const DEFAULT_LOG_LEVEL: u8 = 7;

/// Which address families get rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpFamilyMode {
    /// IPv4, and IPv6 too when the pod has an IPv6 address.
    DualStack,
    Ipv4,
}

impl IpFamilyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamilyMode::DualStack => "dualstack",
            IpFamilyMode::Ipv4 => "ipv4",
        }
    }
}

/// Transport protocols an exclusion applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// An inclusive range of 16-bit values (ports or UIDs); `first == last` for one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Range16 {
    pub first: u16,
    pub last: u16,
}

impl Range16 {
    pub fn single(value: u16) -> Self {
        Range16 { first: value, last: value }
    }
}

/// One `[protocol:][ports:]uids` entry: traffic from these UIDs to these ports is not
/// redirected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidPortExclusion {
    /// At least one protocol; both when the entry said `*` or nothing.
    pub protocols: Vec<Protocol>,
    /// Empty means every port.
    pub ports: Vec<Range16>,
    pub uids: Range16,
}

/// One direction of traffic (inbound or outbound).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficFlow {
    pub enabled: bool,
    pub port: u16,
    pub exclude_ports: Vec<u16>,
    /// When not empty, only these ports are redirected and `exclude_ports` is ignored.
    pub include_ports: Vec<u16>,
    pub exclude_ports_for_uids: Vec<UidPortExclusion>,
    /// Inbound: source addresses not redirected. Outbound: destinations not redirected.
    pub exclude_ips: Vec<IpNet>,
    pub insert_redirect_instead_of_append: bool,
}

impl TrafficFlow {
    fn with_port(port: u16) -> Self {
        TrafficFlow {
            enabled: true,
            port,
            exclude_ports: Vec::new(),
            include_ports: Vec::new(),
            exclude_ports_for_uids: Vec::new(),
            exclude_ips: Vec::new(),
            insert_redirect_instead_of_append: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dns {
    pub enabled: bool,
    pub port: u16,
    /// Redirect DNS to any server; otherwise only to the nameservers of `resolv_conf_path`.
    pub capture_all: bool,
    pub skip_conntrack_zone_split: bool,
    pub resolv_conf_path: String,
}

/// A virtual network (e.g. a docker bridge inside the pod): traffic arriving on the
/// interface and not addressed to the network is sent to the outbound listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VnetNetwork {
    pub interface: String,
    pub cidr: IpNet,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    pub enabled: bool,
    /// syslog level 0..=7 given to the LOG target.
    pub level: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    pub max_retries: u32,
    pub sleep_between_retries: Duration,
}

/// The complete configuration the rules are generated from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The sidecar's UID (a user name is resolved from the node's /etc/passwd file).
    pub uid: u32,
    pub ip_family_mode: IpFamilyMode,
    pub drop_invalid_packets: bool,
    pub inbound: TrafficFlow,
    pub outbound: TrafficFlow,
    pub dns: Dns,
    pub vnet: Vec<VnetNetwork>,
    pub log: Log,
    /// Seconds iptables waits for the xtables lock.
    pub wait: u32,
    /// Microseconds between attempts to take the xtables lock (0: iptables' default).
    pub wait_interval: u32,
    pub retry: Retry,
    pub comments: bool,
    pub cni_mode: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            uid: DEFAULT_UID,
            ip_family_mode: IpFamilyMode::DualStack,
            drop_invalid_packets: false,
            inbound: TrafficFlow::with_port(DEFAULT_INBOUND_PORT),
            outbound: TrafficFlow::with_port(DEFAULT_OUTBOUND_PORT),
            dns: Dns {
                enabled: false,
                port: DEFAULT_DNS_PORT,
                capture_all: true,
                skip_conntrack_zone_split: false,
                resolv_conf_path: DEFAULT_RESOLV_CONF.to_owned(),
            },
            vnet: Vec::new(),
            log: Log { enabled: false, level: DEFAULT_LOG_LEVEL },
            wait: 5,
            wait_interval: 0,
            retry: Retry { max_retries: 4, sleep_between_retries: Duration::from_secs(2) },
            comments: true,
            cni_mode: true,
        }
    }
}
