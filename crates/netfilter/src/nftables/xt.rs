//! iptables-nft's own form of a rule set, written over netlink: the tables, chains and
//! rules `iptables-nft-restore` (1.8.9) writes for the same input, expression for
//! expression, so that `iptables-nft-save` (and everything else reading iptables-nft
//! state) cannot tell them apart, without a process per family. Learned from what the
//! tool sends (`strace -e sendmsg -X raw` decoded) and the kernel lists back
//! (`nft --debug=netlink list ruleset`):
//!
//! - a rule is: `-i`/`-o` (meta iifname/oifname, the name with its NUL), `-p` (meta
//!   l4proto), `-s`, `-d` (a byte-aligned prefix loads and compares only its bytes;
//!   another loads the address and masks it), then each `-m` in order: `tcp`/`udp`
//!   ports natively (transport header payload), `comment`, `multiport` and `owner` as
//!   xt compat `match` expressions carrying the extension's own struct; then a
//!   `counter`; then the verdict (`immediate`), or `REDIRECT` or `CT --zone` as an xt
//!   `target`;
//! - every rule carries the compat attribute (the `-p` protocol number, no flags);
//! - our chains are declared first, a built-in chain is created where a rule first
//!   goes into it (type, hook, priority and policy ACCEPT of iptables-nft's table).
//!
//! Only the shapes proven identical here are written (the test compares both tools'
//! output for every golden rule set); any other shape (`-j LOG`, `-j DROP`,
//! `-m conntrack`, `-I`, the mangle table) is named in an `Err` and the caller runs
//! `iptables-nft-restore` for that family.

use netlink_packet_core::{DefaultNla, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST};
use netlink_packet_netfilter::nftables::{
    ChainAttribute, ChainMessage, ExpressionAttribute, Hook, HookNumber, InetHookNumber, ListAttribute, MetaKey,
    NfTablesMessage, RuleAttribute, RuleMessage, TableAttribute, TableMessage, Verdict,
};
use netlink_packet_netfilter::none::ControlMessage;

use ipnet::IpNet;
use kuma::{Protocol, Range16};
use rules::rule::{COMMENT_PREFIX, Match, Target, Uids};
use rules::{Family, Rule, RuleSet, Table};

use super::wire::{self, Batch, NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER};

/// NF_ACCEPT: the built-in chains' policy.
const NF_ACCEPT: u32 = 1;
/// NFTA_RULE_COMPAT_PROTO / _FLAGS.
const NFTA_RULE_COMPAT_PROTO: u16 = 1;
const NFTA_RULE_COMPAT_FLAGS: u16 = 2;
/// NFTA_MATCH_* and NFTA_TARGET_* (the same numbers).
const NFTA_XT_NAME: u16 = 1;
const NFTA_XT_REV: u16 = 2;
const NFTA_XT_INFO: u16 = 3;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
/// XT_OWNER_UID of xt_owner.h; XT_MULTIPORT_DESTINATION of xt_multiport.h.
const XT_OWNER_UID: u8 = 1;
const XT_MULTIPORT_DESTINATION: u8 = 1;
/// XT_MULTI_PORTS: slots of xt_multiport_v1.
const MULTI_PORTS: usize = 15;
/// NF_NAT_RANGE_PROTO_SPECIFIED.
const NAT_PROTO_SPECIFIED: u32 = 2;
/// xt_comment_info's text buffer.
const COMMENT_SIZE: usize = 256;
/// struct xt_ct_target_info_v1 (CT revision 2) with its kernel pointer, aligned.
const CT_INFO_SIZE: usize = 72;

/// Extension structs go to the kernel padded to XT_ALIGN (8 on 64-bit).
fn xt_align(mut info: Vec<u8>) -> Vec<u8> {
    info.resize(info.len().next_multiple_of(8), 0);
    info
}

/// An xt compat `match` or `target` expression.
fn xt(kind: &str, name: &str, rev: u32, info: Vec<u8>) -> ListAttribute<ExpressionAttribute> {
    let mut name = name.as_bytes().to_vec();
    name.push(0);
    wire::other(
        kind,
        vec![
            DefaultNla::new(NFTA_XT_NAME, name),
            wire::u32_be(NFTA_XT_REV, rev),
            DefaultNla::new(NFTA_XT_INFO, xt_align(info)),
        ],
    )
}

fn counter() -> ListAttribute<ExpressionAttribute> {
    let zero = || 0u64.to_be_bytes().to_vec();
    wire::other(
        "counter",
        vec![DefaultNla::new(NFTA_COUNTER_BYTES, zero()), DefaultNla::new(NFTA_COUNTER_PACKETS, zero())],
    )
}

/// The interface name as iptables compares it: the name and its NUL (no wildcard).
fn ifname(out: &mut Vec<ListAttribute<ExpressionAttribute>>, key: MetaKey, name: &str) -> Option<()> {
    if name.is_empty() || name.ends_with('+') || name.len() >= 16 {
        return None;
    }
    let mut bytes = name.as_bytes().to_vec();
    bytes.push(0);
    out.push(wire::load_meta(key));
    out.push(wire::cmp(false, bytes));
    Some(())
}

fn address(out: &mut Vec<ListAttribute<ExpressionAttribute>>, source: bool, net: &IpNet, negated: bool) -> Option<()> {
    let (offset, addr, mask) = match net {
        IpNet::V4(n) => (if source { 12 } else { 16 }, n.network().octets().to_vec(), n.netmask().octets().to_vec()),
        IpNet::V6(n) => (if source { 8 } else { 24 }, n.network().octets().to_vec(), n.netmask().octets().to_vec()),
    };
    let prefix = usize::from(net.prefix_len());
    if prefix == 0 {
        return None;
    }
    if prefix.is_multiple_of(8) {
        out.push(wire::load_payload(NFT_PAYLOAD_NETWORK_HEADER, offset, (prefix / 8) as u32));
        out.push(wire::cmp(negated, addr[..prefix / 8].to_vec()));
    } else {
        out.push(wire::load_payload(NFT_PAYLOAD_NETWORK_HEADER, offset, addr.len() as u32));
        out.push(wire::bitwise(addr.len() as u32, mask));
        out.push(wire::cmp(negated, addr));
    }
    Some(())
}

/// struct xt_multiport_v1: flags, count, ports[15], pflags[15] (1: this slot starts a
/// range ending in the next), invert.
fn multiport(ports: &[Range16]) -> Option<Vec<u8>> {
    let mut slots: Vec<(u16, u8)> = Vec::new();
    for r in ports {
        if r.first == r.last {
            slots.push((r.first, 0));
        } else {
            slots.extend([(r.first, 1), (r.last, 0)]);
        }
    }
    if slots.is_empty() || slots.len() > MULTI_PORTS {
        return None;
    }
    let mut info = vec![XT_MULTIPORT_DESTINATION, slots.len() as u8];
    for i in 0..MULTI_PORTS {
        info.extend_from_slice(&slots.get(i).map_or(0, |s| s.0).to_ne_bytes());
    }
    for i in 0..MULTI_PORTS {
        info.push(slots.get(i).map_or(0, |s| s.1));
    }
    info.push(0);
    Some(info)
}

/// struct xt_owner_match_info: uid_min, uid_max, gid_min, gid_max, match, invert.
fn owner(uids: Uids, negated: bool) -> Vec<u8> {
    let mut info = Vec::with_capacity(18);
    for v in [uids.first, uids.last, 0, 0] {
        info.extend_from_slice(&v.to_ne_bytes());
    }
    info.extend([XT_OWNER_UID, if negated { XT_OWNER_UID } else { 0 }]);
    info
}

/// REDIRECT's range: nf_nat_ipv4_multi_range_compat (one range) for IPv4, nf_nat_range
/// for IPv6; only the port is set.
fn redirect(family: Family, port: u16) -> Vec<u8> {
    let port = port.to_be_bytes();
    let mut info = Vec::new();
    if family == Family::V4 {
        info.extend_from_slice(&1u32.to_ne_bytes());
    }
    info.extend_from_slice(&NAT_PROTO_SPECIFIED.to_ne_bytes());
    let addresses = match family {
        Family::V4 => 8,
        Family::V6 => 32,
    };
    info.resize(info.len() + addresses, 0);
    info.extend_from_slice(&port);
    info.extend_from_slice(&port);
    info
}

/// struct xt_ct_target_info_v1: flags, zone (host order), then events, helper and
/// timeout names and the kernel's pointer, all zero.
fn ct_zone(zone: u16) -> Vec<u8> {
    let mut info = vec![0, 0];
    info.extend_from_slice(&zone.to_ne_bytes());
    info.resize(CT_INFO_SIZE, 0);
    info
}

/// The expressions of a rule in iptables-nft's order, or `None` for a shape not written
/// here.
fn expressions(family: Family, rule: &Rule) -> Option<Vec<ListAttribute<ExpressionAttribute>>> {
    if rule.insert_at.is_some() {
        return None;
    }
    let spec = &rule.spec;
    let mut out = Vec::new();
    if let Some(name) = &spec.in_interface {
        ifname(&mut out, MetaKey::Iifname, name)?;
    }
    if let Some(name) = &spec.out_interface {
        ifname(&mut out, MetaKey::Oifname, name)?;
    }
    if let Some(p) = spec.protocol {
        out.push(wire::load_meta(MetaKey::L4Proto));
        out.push(wire::cmp(false, vec![wire::proto_number(p)]));
    }
    if let Some(net) = &spec.source {
        address(&mut out, true, net, false)?;
    }
    if let Some((net, negated)) = &spec.destination {
        address(&mut out, false, net, *negated)?;
    }
    for m in &spec.matches {
        match m {
            Match::Port { protocol, sport, dport, not_dport: false } if spec.protocol == Some(*protocol) => {
                let (offset, port) = match (sport, dport) {
                    (Some(p), None) => (0, p),
                    (None, Some(p)) => (2, p),
                    _ => return None,
                };
                out.push(wire::load_payload(NFT_PAYLOAD_TRANSPORT_HEADER, offset, 2));
                out.push(wire::cmp(false, port.to_be_bytes().to_vec()));
            }
            Match::Comment(text) => {
                let mut info = format!("{COMMENT_PREFIX}{text}").into_bytes();
                if info.len() >= COMMENT_SIZE {
                    return None;
                }
                info.resize(COMMENT_SIZE, 0);
                out.push(xt("match", "comment", 0, info));
            }
            Match::Multiport(ports) if spec.protocol.is_some() => {
                out.push(xt("match", "multiport", 1, multiport(ports)?))
            }
            Match::Owner { uids, negated } => out.push(xt("match", "owner", 1, owner(*uids, *negated))),
            _ => return None,
        }
    }
    out.push(counter());
    out.push(match spec.target.as_ref()? {
        Target::Return => wire::verdict(Verdict::Return, None),
        Target::Chain(chain) => wire::verdict(Verdict::Jump, Some(chain)),
        Target::Redirect(port) if spec.protocol.is_some() => xt("target", "REDIRECT", 0, redirect(family, *port)),
        Target::CtZone(zone) => xt("target", "CT", 2, ct_zone(*zone)),
        _ => return None,
    });
    Some(out)
}

fn proto_number(p: Option<Protocol>) -> u32 {
    p.map_or(0, |p| u32::from(wire::proto_number(p)))
}

/// A built-in chain of iptables-nft's tables: (hook, priority, chain type).
fn builtin(table: Table, chain: &str) -> Option<(InetHookNumber, i32, &'static str)> {
    match (table, chain) {
        (Table::Nat, "PREROUTING") => Some((InetHookNumber::PreRouting, -100, "nat")),
        (Table::Nat, "INPUT") => Some((InetHookNumber::LocalIn, 100, "nat")),
        (Table::Nat, "OUTPUT") => Some((InetHookNumber::LocalOut, -100, "nat")),
        (Table::Nat, "POSTROUTING") => Some((InetHookNumber::PostRouting, 100, "nat")),
        (Table::Raw, "PREROUTING") => Some((InetHookNumber::PreRouting, -300, "filter")),
        (Table::Raw, "OUTPUT") => Some((InetHookNumber::LocalOut, -300, "filter")),
        _ => None,
    }
}

/// The batch that writes `sets` into a namespace without iptables-nft tables of their
/// families, as iptables-nft-restore would (one family's messages after the other's:
/// one transaction where the tool makes one per family, to the same end); the first
/// shape not written here otherwise (then the tool runs), for the log.
pub(crate) fn batch(sets: &[&RuleSet]) -> Result<Batch, String> {
    let mut out = Batch { messages: Vec::new(), what: Vec::new() };
    out.push(NLM_F_REQUEST, wire::control(ControlMessage::BatchBegin), "batch begin".into());
    for set in sets {
        family_messages(&mut out, set)?;
    }
    out.push(NLM_F_REQUEST, wire::control(ControlMessage::BatchEnd), "batch end".into());
    Ok(out)
}

/// The messages of one family's rules (the tool's one transaction).
fn family_messages(out: &mut Batch, set: &RuleSet) -> Result<(), String> {
    let family = set.family;
    let ack = NLM_F_REQUEST | NLM_F_ACK;
    for t in &set.tables {
        if t.table == Table::Mangle {
            return Err("a rule in the mangle table".into());
        }
        let table = t.table.as_str();
        let tm = TableMessage { attributes: vec![TableAttribute::Name(table.into())] };
        out.push(ack | NLM_F_CREATE, wire::msg(family, NfTablesMessage::NewTable(tm)), format!("add table {table}"));
        let mut created: Vec<&str> = Vec::new();
        for chain in &t.chains {
            let attributes = vec![ChainAttribute::Table(table.into()), ChainAttribute::Name(chain.clone())];
            let m = wire::msg(family, NfTablesMessage::NewChain(ChainMessage { attributes }));
            out.push(ack | NLM_F_EXCL, m, format!("add chain {table} {chain}"));
            created.push(chain);
        }
        for rule in &t.rules {
            let chain = rule.chain.as_str();
            if !created.contains(&chain) {
                let Some((hook, priority, kind)) = builtin(t.table, chain) else {
                    return Err(format!("a rule in chain {chain}, neither ours nor built in"));
                };
                let attributes = vec![
                    ChainAttribute::Table(table.into()),
                    ChainAttribute::Name(chain.into()),
                    ChainAttribute::Hook(vec![Hook::Number(HookNumber::Inet(hook)), Hook::Priority(priority as u32)]),
                    ChainAttribute::Policy(NF_ACCEPT),
                    ChainAttribute::Type(kind.into()),
                ];
                let m = wire::msg(family, NfTablesMessage::NewChain(ChainMessage { attributes }));
                out.push(ack | NLM_F_CREATE, m, format!("add chain {table} {chain}"));
                created.push(chain);
            }
            let Some(expressions) = expressions(family, rule) else {
                return Err(format!("rule shape {}", rule.restore_line()));
            };
            let compat = vec![
                wire::u32_be(NFTA_RULE_COMPAT_PROTO, proto_number(rule.spec.protocol)),
                wire::u32_be(NFTA_RULE_COMPAT_FLAGS, 0),
            ];
            let attributes = vec![
                RuleAttribute::Table(table.into()),
                RuleAttribute::Chain(chain.into()),
                RuleAttribute::Expressions(expressions),
                RuleAttribute::Compat(compat),
            ];
            let m = wire::msg(family, NfTablesMessage::NewRule(RuleMessage { attributes }));
            out.push(ack | NLM_F_CREATE | NLM_F_APPEND, m, format!("add rule {table} {}", rule.restore_line()));
        }
    }
    Ok(())
}
