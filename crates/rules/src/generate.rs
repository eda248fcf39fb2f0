//! Kuma config -> the rule set of one address family. Pure: the facts about the pod's
//! network namespace (IPv6 present, nameservers) are inputs.

use std::net::IpAddr;

use ipnet::IpNet;

use kuma::{Config, IpFamilyMode, Protocol, Range16, TrafficFlow};

use crate::rule::{Match, Rule, Spec, Target, Uids, format_range};
use crate::{Family, RuleSet, Table, TableRules};

pub const INBOUND: &str = "KUMA_MESH_INBOUND";
pub const INBOUND_REDIRECT: &str = "KUMA_MESH_INBOUND_REDIRECT";
pub const OUTBOUND: &str = "KUMA_MESH_OUTBOUND";
pub const OUTBOUND_REDIRECT: &str = "KUMA_MESH_OUTBOUND_REDIRECT";

const DNS_PORT: u16 = 53;
const LOOPBACK: &str = "lo";
/// iptables' multiport match takes at most 15 ports, a range counting as two.
const MULTIPORT_SLOTS: usize = 15;

/// The families that get rules: IPv4 always, IPv6 in dual-stack mode when the pod's
/// namespace has an IPv6 address other than loopback.
pub fn families(cfg: &Config, has_ipv6: bool) -> Vec<Family> {
    match cfg.ip_family_mode {
        IpFamilyMode::DualStack if has_ipv6 => vec![Family::V4, Family::V6],
        _ => vec![Family::V4],
    }
}

/// The complete rule set of one family. `nameservers` are those of the resolv.conf the
/// config names (used only when DNS is redirected without `captureAll`).
pub fn generate(cfg: &Config, family: Family, nameservers: &[IpAddr]) -> RuleSet {
    let g = Generator::new(cfg, family, nameservers);
    let mut tables = vec![g.raw(), g.nat(), g.mangle()];
    tables.retain(|t| !t.rules.is_empty());
    RuleSet { family, tables }
}

struct Generator<'a> {
    cfg: &'a Config,
    family: Family,
    uid: Uids,
    /// Nameservers of this family; DNS rules are per server unless DNS capture is total.
    nameservers: Vec<IpNet>,
    dns: bool,
}

impl<'a> Generator<'a> {
    fn new(cfg: &'a Config, family: Family, nameservers: &[IpAddr]) -> Self {
        let nameservers: Vec<IpNet> =
            nameservers.iter().filter(|ip| family.contains(**ip)).map(|ip| IpNet::from(*ip)).collect();
        let dns = cfg.dns.enabled && (cfg.dns.capture_all || !nameservers.is_empty());
        Generator { cfg, family, uid: Uids::one(cfg.uid), nameservers, dns }
    }

    /// Adds the comment when comments are on.
    fn rule(&self, chain: &str, spec: Spec, comment: impl Into<String>) -> Rule {
        let mut spec = spec;
        if self.cfg.comments {
            // First among the matches, where Kuma puts it: saved rules then read alike.
            spec.matches.insert(0, Match::Comment(comment.into()));
        }
        Rule { chain: chain.to_owned(), insert_at: None, spec }
    }

    /// The DNS servers to match: one unset entry (any server) when capturing everything.
    fn dns_targets(&self) -> Vec<Option<IpNet>> {
        if self.cfg.dns.capture_all { vec![None] } else { self.nameservers.iter().copied().map(Some).collect() }
    }

    fn raw(&self) -> TableRules {
        let mut rules = Vec::new();
        if self.dns && !self.cfg.dns.skip_conntrack_zone_split {
            for ns in self.dns_targets() {
                let spec = Spec::new().sport(Protocol::Udp, DNS_PORT).jump(Target::CtZone(1));
                let spec = match ns {
                    Some(ns) => spec.source(ns),
                    None => spec,
                };
                rules.push(self.rule("PREROUTING", spec, "dns: responses from nameservers in conntrack zone 1"));
            }
            rules.push(self.rule(
                "OUTPUT",
                Spec::new().dport(Protocol::Udp, DNS_PORT).uid(self.uid).jump(Target::CtZone(1)),
                "dns: queries of the sidecar in conntrack zone 1",
            ));
            rules.push(self.rule(
                "OUTPUT",
                Spec::new().sport(Protocol::Udp, self.cfg.dns.port).uid(self.uid).jump(Target::CtZone(2)),
                "dns: answers of the DNS proxy in conntrack zone 2",
            ));
            for ns in self.dns_targets() {
                let spec = Spec::new().dport(Protocol::Udp, DNS_PORT).jump(Target::CtZone(2));
                let spec = match ns {
                    Some(ns) => spec.destination(ns),
                    None => spec,
                };
                rules.push(self.rule("OUTPUT", spec, "dns: queries of applications in conntrack zone 2"));
            }
        }
        TableRules { table: Table::Raw, chains: vec![], rules }
    }

    fn mangle(&self) -> TableRules {
        let mut rules = Vec::new();
        if self.cfg.drop_invalid_packets {
            rules.push(self.rule(
                "PREROUTING",
                Spec::new().matching(Match::CtStateInvalid).jump(Target::Drop),
                "drop packets conntrack finds invalid",
            ));
        }
        TableRules { table: Table::Mangle, chains: vec![], rules }
    }

    fn nat(&self) -> TableRules {
        let mut rules = Vec::new();
        rules.extend(self.prerouting());
        rules.extend(self.output());
        rules.extend(self.inbound_chain());
        rules.push(self.rule(
            INBOUND_REDIRECT,
            Spec::new().protocol(Protocol::Tcp).jump(Target::Redirect(self.cfg.inbound.port)),
            "to the inbound listener",
        ));
        rules.extend(self.outbound_chain());
        rules.push(self.rule(
            OUTBOUND_REDIRECT,
            Spec::new().protocol(Protocol::Tcp).jump(Target::Redirect(self.cfg.outbound.port)),
            "to the outbound listener",
        ));
        let chains = [INBOUND, INBOUND_REDIRECT, OUTBOUND, OUTBOUND_REDIRECT].map(String::from).to_vec();
        TableRules { table: Table::Nat, chains, rules }
    }

    fn log_rule(&self, chain: &str, prefix: &str) -> Option<Rule> {
        self.cfg.log.enabled.then(|| {
            let target = Target::Log { prefix: prefix.to_owned(), level: self.cfg.log.level };
            self.rule(chain, Spec::new().jump(target), format!("log {} packets", chain.to_lowercase()))
        })
    }

    /// Rules of a built-in chain are inserted at the top, in order, when the flow asks
    /// for it, so that they run before rules others may have put there.
    fn positioned(rules: Vec<Rule>, flow: &TrafficFlow) -> Vec<Rule> {
        if !flow.insert_redirect_instead_of_append {
            return rules;
        }
        rules.into_iter().zip(1..).map(|(rule, n)| Rule { insert_at: Some(n), ..rule }).collect()
    }

    fn prerouting(&self) -> Vec<Rule> {
        let mut rules: Vec<Rule> = Vec::new();
        // One network per interface (the last one given wins), in order of first mention.
        let mut vnets: Vec<(&str, IpNet)> = Vec::new();
        for net in self.cfg.vnet.iter().filter(|n| self.family.contains(n.cidr.addr())) {
            match vnets.iter_mut().find(|(iface, _)| *iface == net.interface) {
                Some(entry) => entry.1 = net.cidr,
                None => vnets.push((&net.interface, net.cidr)),
            }
        }
        for (iface, cidr) in vnets {
            rules.push(
                self.rule(
                    "PREROUTING",
                    Spec::new()
                        .in_interface(iface)
                        .dport(Protocol::Udp, DNS_PORT)
                        .jump(Target::Redirect(self.cfg.dns.port)),
                    format!("vnet {iface}: DNS to the DNS proxy"),
                ),
            );
            rules.push(
                self.rule(
                    "PREROUTING",
                    Spec::new()
                        .not_destination(cidr)
                        .in_interface(iface)
                        .protocol(Protocol::Tcp)
                        .jump(Target::Redirect(self.cfg.outbound.port)),
                    format!("vnet {iface}: TCP leaving {cidr} to the outbound listener"),
                ),
            );
        }
        let with_vnet = !rules.is_empty();
        rules.push(self.rule(
            "PREROUTING",
            Spec::new().protocol(Protocol::Tcp).jump(Target::Chain(INBOUND.into())),
            "inbound TCP to KUMA_MESH_INBOUND",
        ));
        // Kuma logs first, except with virtual networks of this family: then after the
        // redirects and the inbound jump, so that only what they let through is logged.
        if let Some(log) = self.log_rule("PREROUTING", "PREROUTING:") {
            if with_vnet { rules.push(log) } else { rules.insert(0, log) }
        }
        Self::positioned(rules, &self.cfg.inbound)
    }

    fn output(&self) -> Vec<Rule> {
        let out = &self.cfg.outbound;
        let mut rules: Vec<Rule> = self.log_rule("OUTPUT", "OUTPUT:").into_iter().collect();
        for excl in &out.exclude_ports_for_uids {
            for protocol in &excl.protocols {
                // No ports means every port, which Kuma matches as the range 1:65535.
                let all = [Range16 { first: 1, last: u16::MAX }];
                let ports = if excl.ports.is_empty() { &all[..] } else { &excl.ports[..] };
                for group in multiport_groups(ports) {
                    let ports_text = if excl.ports.is_empty() {
                        "all ports".to_owned()
                    } else {
                        format!("ports {}", group.iter().map(|r| format_range(*r, '-')).collect::<Vec<_>>().join(","))
                    };
                    let spec = Spec::new().protocol(*protocol).matching(Match::Multiport(group));
                    rules.push(self.rule(
                        "OUTPUT",
                        spec.uid(excl.uids).jump(Target::Return),
                        format!(
                            "{} from UID {} to {ports_text} not redirected",
                            protocol.as_str(),
                            Uids::from(excl.uids)
                        ),
                    ));
                }
            }
        }
        for net in out.exclude_ips.iter().filter(|n| self.family.contains(n.addr())) {
            rules.push(self.rule(
                "OUTPUT",
                Spec::new().destination(*net).jump(Target::Return),
                format!("outbound to {net} not redirected"),
            ));
        }
        if self.dns {
            rules.push(self.rule(
                "OUTPUT",
                Spec::new().dport(Protocol::Udp, DNS_PORT).uid(self.uid).jump(Target::Return),
                "dns: queries of the sidecar go out unchanged",
            ));
            for ns in self.dns_targets() {
                let spec = Spec::new().dport(Protocol::Udp, DNS_PORT).jump(Target::Redirect(self.cfg.dns.port));
                let (spec, text) = match ns {
                    Some(ns) => (spec.destination(ns), format!("dns: queries to {} to the DNS proxy", ns.addr())),
                    None => (spec, "dns: queries to the DNS proxy".to_owned()),
                };
                rules.push(self.rule("OUTPUT", spec, text));
            }
            rules.push(self.rule(
                "OUTPUT",
                Spec::new().dport(Protocol::Tcp, DNS_PORT).not_uid(self.uid).jump(Target::Return),
                "dns: TCP queries of applications not redirected",
            ));
        }
        rules.push(self.rule(
            "OUTPUT",
            Spec::new().protocol(Protocol::Tcp).jump(Target::Chain(OUTBOUND.into())),
            "outbound TCP to KUMA_MESH_OUTBOUND",
        ));
        Self::positioned(rules, out)
    }

    fn inbound_chain(&self) -> Vec<Rule> {
        let inb = &self.cfg.inbound;
        if !inb.enabled {
            return vec![self.rule(
                INBOUND,
                Spec::new().protocol(Protocol::Tcp).jump(Target::Return),
                "inbound redirect disabled",
            )];
        }
        let mut rules = Vec::new();
        for net in inb.exclude_ips.iter().filter(|n| self.family.contains(n.addr())) {
            rules.push(self.rule(
                INBOUND,
                Spec::new().source(*net).jump(Target::Return),
                format!("inbound from {net} not redirected"),
            ));
        }
        let to_redirect = || Target::Chain(INBOUND_REDIRECT.into());
        if !inb.include_ports.is_empty() {
            for port in &inb.include_ports {
                rules.push(self.rule(
                    INBOUND,
                    Spec::new().dport(Protocol::Tcp, *port).jump(to_redirect()),
                    format!("inbound port {port} redirected"),
                ));
            }
        } else {
            for port in &inb.exclude_ports {
                rules.push(self.rule(
                    INBOUND,
                    Spec::new().dport(Protocol::Tcp, *port).jump(Target::Return),
                    format!("inbound port {port} not redirected"),
                ));
            }
            rules.push(self.rule(
                INBOUND,
                Spec::new().protocol(Protocol::Tcp).jump(to_redirect()),
                "inbound TCP redirected",
            ));
        }
        rules
    }

    fn outbound_chain(&self) -> Vec<Rule> {
        let out = &self.cfg.outbound;
        if !out.enabled {
            return vec![self.rule(
                OUTBOUND,
                Spec::new().protocol(Protocol::Tcp).jump(Target::Return),
                "outbound redirect disabled",
            )];
        }
        let (localhost, passthrough) = self.family.loopback_addresses();
        let mut rules = Vec::new();
        if out.include_ports.is_empty() {
            for port in &out.exclude_ports {
                rules.push(self.rule(
                    OUTBOUND,
                    Spec::new().dport(Protocol::Tcp, *port).jump(Target::Return),
                    format!("outbound port {port} not redirected"),
                ));
            }
        }
        rules.push(self.rule(
            OUTBOUND,
            Spec::new().source(passthrough).out_interface(LOOPBACK).jump(Target::Return),
            format!("inbound passthrough from {} not redirected", passthrough.addr()),
        ));
        rules.push(
            self.rule(
                OUTBOUND,
                Spec::new()
                    .not_destination(localhost)
                    .out_interface(LOOPBACK)
                    .protocol(Protocol::Tcp)
                    .uid(self.uid)
                    .jump(Target::Chain(INBOUND_REDIRECT.into())),
                "sidecar to a local non-loopback address: to the inbound listener",
            ),
        );
        rules.push(self.rule(
            OUTBOUND,
            Spec::new().out_interface(LOOPBACK).protocol(Protocol::Tcp).not_uid(self.uid).jump(Target::Return),
            "applications over loopback not redirected",
        ));
        rules.push(self.rule(
            OUTBOUND,
            Spec::new().uid(self.uid).jump(Target::Return),
            "sidecar traffic not redirected",
        ));
        rules.push(self.rule(
            OUTBOUND,
            Spec::new().destination(localhost).jump(Target::Return),
            "localhost not redirected",
        ));
        let to_redirect = || Target::Chain(OUTBOUND_REDIRECT.into());
        if out.include_ports.is_empty() {
            rules.push(self.rule(OUTBOUND, Spec::new().jump(to_redirect()), "outbound TCP redirected"));
        } else {
            for port in &out.include_ports {
                rules.push(self.rule(
                    OUTBOUND,
                    Spec::new().dport(Protocol::Tcp, *port).jump(to_redirect()),
                    format!("outbound port {port} redirected"),
                ));
            }
        }
        rules
    }
}

/// Splits port ranges into groups that fit one multiport match.
/// How many rules the port-for-UID exclusions yield, counted without building them: their
/// lists multiply (entries times port groups), so an oversized config is refused before
/// its rules take memory.
pub fn uid_exclusion_rule_count(cfg: &Config) -> usize {
    let flow = &cfg.outbound;
    flow.exclude_ports_for_uids.iter().map(|e| e.protocols.len() * multiport_groups(&e.ports).len().max(1)).sum()
}

fn multiport_groups(ports: &[Range16]) -> Vec<Vec<Range16>> {
    let mut groups: Vec<Vec<Range16>> = Vec::new();
    let mut slots = 0;
    for r in ports {
        let need = if r.first == r.last { 1 } else { 2 };
        if groups.is_empty() || slots + need > MULTIPORT_SLOTS {
            groups.push(Vec::new());
            slots = 0;
        }
        groups.last_mut().expect("a group was just pushed").push(*r);
        slots += need;
    }
    groups
}
