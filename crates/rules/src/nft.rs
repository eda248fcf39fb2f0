//! The rule sets as native nf_tables rules: one table of ours per family, whose chains
//! hook where the iptables tables do, holding the same rules in the same order. Pure
//! data, rendered the way `nft list table` prints it; the netfilter crate encodes it.

use std::fmt::{self, Write};

use ipnet::IpNet;

use kuma::{Protocol, Range16};

use crate::rule::{COMMENT_PREFIX, Match, Target, Uids};
use crate::{Family, RuleSet, Table as IptTable};

/// The name of our table in each family: deleting it removes everything of ours.
pub const TABLE: &str = "kuma_mesh";

/// A base chain's type, hook and priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    pub nat: bool,
    /// Netfilter hook number: 0 prerouting, 3 output.
    pub hook: u32,
    pub priority: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    /// Set for base chains; our jump targets have none.
    pub hook: Option<Hook>,
    pub rules: Vec<NftRule>,
}

/// One condition of a rule; the netfilter crate turns each into expressions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    L4proto(Protocol),
    Saddr(IpNet),
    Daddr {
        net: IpNet,
        negated: bool,
    },
    Iifname(String),
    Oifname(String),
    Sport(Protocol, u16),
    Dport {
        protocol: Protocol,
        ports: Range16,
        negated: bool,
    },
    /// The destination port in an anonymous constant set: at least two ranges, sorted,
    /// none overlapping or touching another (see [`port_set`]).
    DportIn {
        protocol: Protocol,
        ports: Vec<Range16>,
    },
    SkUid {
        uids: Uids,
        negated: bool,
    },
    CtStateInvalid,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Return,
    Drop,
    Jump(String),
    Redirect(u16),
    CtZone(u16),
    Log { prefix: String, level: u8 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftRule {
    pub conds: Vec<Cond>,
    pub action: Action,
    /// The whole comment, `kuma/mesh/transparent/proxy/...`, kept as the rule's userdata.
    pub comment: Option<String>,
}

/// Our table of one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftTable {
    pub family: Family,
    pub chains: Vec<Chain>,
}

const PREROUTING: u32 = 0;
const OUTPUT: u32 = 3;
const PRIORITY_RAW: i32 = -300;
const PRIORITY_MANGLE: i32 = -150;
const PRIORITY_DSTNAT: i32 = -100;

/// The base chain standing for an iptables built-in chain, named `<table>_<chain>`.
fn base_chain(table: IptTable, chain: &str, inserted: bool) -> Option<(String, Hook)> {
    let hook = match chain {
        "PREROUTING" => PREROUTING,
        "OUTPUT" => OUTPUT,
        _ => return None,
    };
    let (nat, priority) = match table {
        IptTable::Raw => (false, PRIORITY_RAW),
        IptTable::Mangle => (false, PRIORITY_MANGLE),
        // Rules that iptables would insert at the top run before other NAT chains of
        // the same hook: one step earlier than iptables' nat table.
        IptTable::Nat => (true, if inserted { PRIORITY_DSTNAT - 1 } else { PRIORITY_DSTNAT }),
    };
    Some((format!("{}_{}", table.as_str(), chain.to_lowercase()), Hook { nat, hook, priority }))
}

/// The native form of a rule set: same chains, same rules, same order, so the same
/// rule count. A multiport match becomes a port test against an anonymous set.
pub fn translate(set: &RuleSet) -> NftTable {
    fn chain_of(chains: &mut Vec<Chain>, name: String, hook: Option<Hook>) -> &mut Chain {
        let i = match chains.iter().position(|c| c.name == name) {
            Some(i) => i,
            None => {
                chains.push(Chain { name, hook, rules: Vec::new() });
                chains.len() - 1
            }
        };
        &mut chains[i]
    }
    let mut chains: Vec<Chain> = Vec::new();
    for t in &set.tables {
        for name in &t.chains {
            chain_of(&mut chains, name.clone(), None);
        }
        for rule in &t.rules {
            let chain = match base_chain(t.table, &rule.chain, rule.insert_at.is_some()) {
                Some((name, hook)) => chain_of(&mut chains, name, Some(hook)),
                None => chain_of(&mut chains, rule.chain.clone(), None),
            };
            chain.rules.push(translate_rule(&rule.spec));
        }
    }
    // Base chains first (in hook order, as the kernel runs them), then ours by name.
    chains.sort_by_key(|c| match c.hook {
        Some(h) => (0, h.hook, h.priority, String::new()),
        None => (1, 0, 0, c.name.clone()),
    });
    NftTable { family: set.family, chains }
}

fn translate_rule(spec: &crate::Spec) -> NftRule {
    let mut conds = Vec::new();
    if let Some(net) = spec.source {
        conds.push(Cond::Saddr(net));
    }
    if let Some((net, negated)) = spec.destination {
        conds.push(Cond::Daddr { net, negated });
    }
    if let Some(name) = &spec.in_interface {
        conds.push(Cond::Iifname(name.clone()));
    }
    if let Some(name) = &spec.out_interface {
        conds.push(Cond::Oifname(name.clone()));
    }
    if let Some(p) = spec.protocol {
        conds.push(Cond::L4proto(p));
    }
    let mut comment = None;
    for m in &spec.matches {
        match m {
            Match::Port { protocol, sport, dport, not_dport } => {
                if let Some(p) = sport {
                    conds.push(Cond::Sport(*protocol, *p));
                }
                if let Some(p) = dport {
                    conds.push(Cond::Dport { protocol: *protocol, ports: Range16::single(*p), negated: *not_dport });
                }
            }
            Match::Multiport(ports) => {
                let protocol = spec.protocol.unwrap_or(Protocol::Tcp);
                match port_set(ports).as_slice() {
                    [one] => conds.push(Cond::Dport { protocol, ports: *one, negated: false }),
                    set => conds.push(Cond::DportIn { protocol, ports: set.to_vec() }),
                }
            }
            Match::Owner { uids, negated } => conds.push(Cond::SkUid { uids: *uids, negated: *negated }),
            Match::CtStateInvalid => conds.push(Cond::CtStateInvalid),
            Match::Comment(text) => comment = Some(format!("{COMMENT_PREFIX}{text}")),
        }
    }
    let action = match spec.target.clone() {
        Some(Target::Return) | None => Action::Return,
        Some(Target::Drop) => Action::Drop,
        Some(Target::Chain(name)) => Action::Jump(name),
        Some(Target::Redirect(port)) => Action::Redirect(port),
        Some(Target::CtZone(zone)) => Action::CtZone(zone),
        Some(Target::Log { prefix, level }) => Action::Log { prefix, level },
    };
    NftRule { conds, action, comment }
}

/// Port ranges as an interval set holds them, and as `nft` merges an anonymous set:
/// sorted, overlapping or adjacent ranges joined (the kernel refuses overlapping
/// intervals; the ports matched are the same).
pub fn port_set(ports: &[Range16]) -> Vec<Range16> {
    let mut sorted = ports.to_vec();
    sorted.sort();
    let mut out: Vec<Range16> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match out.last_mut() {
            Some(prev) if u32::from(r.first) <= u32::from(prev.last) + 1 => prev.last = prev.last.max(r.last),
            _ => out.push(r),
        }
    }
    out
}

/// The nf_tables family of our table: `ip` or `ip6`.
pub fn family_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

impl NftTable {
    pub fn family_name(&self) -> &'static str {
        family_name(self.family)
    }

    pub fn rule_count(&self) -> usize {
        self.chains.iter().map(|c| c.rules.len()).sum()
    }
}

fn hook_name(hook: u32) -> &'static str {
    if hook == PREROUTING { "prerouting" } else { "output" }
}

/// nft names a priority only where the name is defined for the hook (`dstnat` is a
/// prerouting name; a NAT output chain prints the number).
fn priority_name(hook: Hook) -> String {
    match (hook.priority, hook.nat) {
        (PRIORITY_RAW, false) => "raw".into(),
        (PRIORITY_MANGLE, false) => "mangle".into(),
        (p, true) if hook.hook == PREROUTING && p <= PRIORITY_DSTNAT && p > PRIORITY_MANGLE => {
            if p == PRIORITY_DSTNAT {
                "dstnat".into()
            } else {
                format!("dstnat - {}", PRIORITY_DSTNAT - p)
            }
        }
        (p, _) => p.to_string(),
    }
}

fn addr_field(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "ip",
        IpNet::V6(_) => "ip6",
    }
}

/// nft prints host prefixes as plain addresses.
fn net_text(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() { net.addr().to_string() } else { net.to_string() }
}

fn neg(negated: bool) -> &'static str {
    if negated { "!= " } else { "" }
}

impl fmt::Display for NftRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut words: Vec<String> = Vec::new();
        for (i, c) in self.conds.iter().enumerate() {
            let text = match c {
                // nft leaves out a protocol test that a port test right after implies.
                Cond::L4proto(p) => {
                    let implied = self
                        .conds
                        .get(i + 1)
                        .is_some_and(|n| matches!(n, Cond::Sport(q, _) | Cond::Dport { protocol: q, .. } | Cond::DportIn { protocol: q, .. } if q == p));
                    if implied {
                        continue;
                    }
                    format!("meta l4proto {}", p.as_str())
                }
                Cond::Saddr(net) => format!("{} saddr {}", addr_field(net), net_text(net)),
                Cond::Daddr { net, negated } => {
                    format!("{} daddr {}{}", addr_field(net), neg(*negated), net_text(net))
                }
                Cond::Iifname(n) => format!("iifname \"{n}\""),
                Cond::Oifname(n) => format!("oifname \"{n}\""),
                Cond::Sport(p, port) => format!("{} sport {port}", p.as_str()),
                Cond::Dport { protocol, ports, negated } => {
                    let r = crate::rule::format_range(*ports, '-');
                    format!("{} dport {}{r}", protocol.as_str(), neg(*negated))
                }
                Cond::DportIn { protocol, ports } => {
                    let list: Vec<String> = ports.iter().map(|r| crate::rule::format_range(*r, '-')).collect();
                    format!("{} dport {{ {} }}", protocol.as_str(), list.join(", "))
                }
                Cond::SkUid { uids, negated } => format!("meta skuid {}{uids}", neg(*negated)),
                Cond::CtStateInvalid => "ct state invalid".into(),
            };
            words.push(text);
        }
        words.push(match &self.action {
            Action::Return => "return".into(),
            Action::Drop => "drop".into(),
            Action::Jump(c) => format!("jump {c}"),
            Action::Redirect(p) => format!("redirect to :{p}"),
            Action::CtZone(z) => format!("ct zone set {z}"),
            Action::Log { prefix, level } => {
                let mut s = format!("log prefix \"{prefix}\"");
                if *level != 4 {
                    write!(s, " level {}", level_name(*level))?;
                }
                s
            }
        });
        if let Some(c) = &self.comment {
            words.push(format!("comment \"{c}\""));
        }
        f.write_str(&words.join(" "))
    }
}

fn level_name(level: u8) -> &'static str {
    ["emerg", "alert", "crit", "err", "warn", "notice", "info", "debug"].get(level as usize).copied().unwrap_or("warn")
}

impl fmt::Display for NftTable {
    /// As `nft list table` prints it (without handles).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "table {} {TABLE} {{", self.family_name())?;
        for (i, c) in self.chains.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            writeln!(f, "\tchain {} {{", c.name)?;
            if let Some(h) = c.hook {
                let kind = if h.nat { "nat" } else { "filter" };
                writeln!(
                    f,
                    "\t\ttype {kind} hook {} priority {}; policy accept;",
                    hook_name(h.hook),
                    priority_name(h)
                )?;
            }
            for r in &c.rules {
                writeln!(f, "\t\t{r}")?;
            }
            writeln!(f, "\t}}")?;
        }
        writeln!(f, "}}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(first: u16, last: u16) -> Range16 {
        Range16 { first, last }
    }

    #[test]
    fn port_sets_are_sorted_and_joined_as_nft_joins_them() {
        assert_eq!(port_set(&[r(443, 443), r(80, 80)]), [r(80, 80), r(443, 443)]);
        // Overlapping, adjacent, duplicate.
        assert_eq!(port_set(&[r(17, 18), r(16, 16), r(1, 1), r(2, 2), r(2, 2)]), [r(1, 2), r(16, 18)]);
        assert_eq!(port_set(&[r(100, 200), r(150, 160), r(201, 65535)]), [r(100, 65535)]);
        assert_eq!(port_set(&[r(0, 0), r(65535, 65535)]), [r(0, 0), r(65535, 65535)]);
    }

    #[test]
    fn a_multiport_match_is_one_rule_with_a_set_and_one_port_no_set() {
        use crate::rule::{Match, Spec, Target};
        let rule = |ports: Vec<Range16>| {
            translate_rule(
                &Spec::new()
                    .protocol(Protocol::Udp)
                    .matching(Match::Multiport(ports))
                    .uid(Uids::one(7))
                    .jump(Target::Return),
            )
            .to_string()
        };
        assert_eq!(
            rule(vec![r(5353, 5353), r(53, 53), r(1000, 2000)]),
            "udp dport { 53, 1000-2000, 5353 } meta skuid 7 return"
        );
        assert_eq!(rule(vec![r(53, 53), r(54, 60)]), "udp dport 53-60 meta skuid 7 return");
    }
}
