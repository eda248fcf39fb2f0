//! The native backend: our rules as nf_tables tables of our own (`table ip kuma_mesh`,
//! `table ip6 kuma_mesh`) with native expressions only, programmed over netlink from
//! the pod namespace's thread. No process runs, so no NSS lookup and no x_tables.
//! apply is one batch (the kernel commits it whole or not at all) that deletes our old
//! tables and creates the new ones; remove is one batch deleting them.

mod wire;
pub(crate) mod xt;

use std::collections::HashMap;
use std::io;

use netlink_packet_netfilter::nftables::{ChainAttribute, ChainMessage, NfTablesMessage, RuleAttribute, RuleMessage};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner};
use netlink_sys::protocols::NETLINK_NETFILTER;
use rules::nft::{NftTable, TABLE, family_name, translate};
use rules::{Family, RuleSet};

use crate::netlink::{Conn, NlError, netfilter_message};
use crate::ops::{Applied, Env};
use crate::{Backend, BackendKind, FirewallError};

#[derive(Debug, Clone, Copy)]
pub struct Native;

fn netlink_error(what: String, e: NlError) -> FirewallError {
    FirewallError::Netlink { what, error: e.to_string() }
}

/// One transaction: delete our tables of `delete`, create `create`.
fn commit(delete: &[Family], create: &[NftTable]) -> Result<(), FirewallError> {
    send(wire::batch(delete, create))
}

/// Sends one batch; a refusal names the refused message.
fn send(batch: wire::Batch) -> Result<(), FirewallError> {
    let mut conn = Conn::open(NETLINK_NETFILTER)
        .map_err(|e| FirewallError::Netlink { what: "open a netfilter netlink socket".into(), error: e.to_string() })?;
    let wire::Batch { messages, what } = batch;
    conn.transact(messages).map_err(|e| match e {
        NlError::Refused(ref r) => {
            netlink_error(what.get(r.index).cloned().unwrap_or_else(|| format!("message {}", r.index)), e)
        }
        e => netlink_error("nf_tables batch".into(), e),
    })
}

/// Writes `sets` in iptables-nft's own form (see [`xt`]) into the calling thread's
/// namespace, which has no iptables-nft table of their families, in one transaction.
/// `Ok(Err(shape))`: nothing was written, a rule has a shape not written that way.
pub(crate) fn write_iptables_nft(sets: &[&RuleSet]) -> Result<Result<(), String>, FirewallError> {
    match xt::batch(sets) {
        Ok(batch) => send(batch).map(Ok),
        Err(shape) => Ok(Err(shape)),
    }
}

/// A rule of ours as the kernel lists it: chain, canonical expressions, comment.
type Listed = (String, String, Option<String>);

/// Our table of `family` as the kernel has it: chain names and rules (their sets by
/// content).
fn list(family: Family) -> Result<(Vec<String>, Vec<Listed>), FirewallError> {
    let fail = |e: NlError| netlink_error(format!("list table {} {TABLE}", family_name(family)), e);
    let mut conn = Conn::open(NETLINK_NETFILTER).map_err(|e| fail(e.into()))?;
    let nfproto = wire::nfproto(family);
    let chains_req = netfilter_message(
        nfproto,
        NfTablesMessage::GetChain(ChainMessage { attributes: vec![ChainAttribute::Table(TABLE.into())] }),
    );
    let mut chains = Vec::new();
    for m in conn.dump(chains_req).map_err(fail)? {
        if let NetfilterMessageInner::NfTables(NfTablesMessage::NewChain(c)) = m.inner {
            let table = c.attributes.iter().any(|a| matches!(a, ChainAttribute::Table(t) if t == TABLE));
            let name = c.attributes.into_iter().find_map(|a| match a {
                ChainAttribute::Name(n) => Some(n),
                _ => None,
            });
            if let (true, Some(name)) = (table, name) {
                chains.push(name);
            }
        }
    }
    let mut sets: HashMap<String, String> = HashMap::new();
    for m in conn.dump(wire::get_sets(family)).map_err(fail)? {
        let NetfilterMessageInner::NfTables(NfTablesMessage::NewSet(s)) = m.inner else { continue };
        let Some((name, flags, key_len)) = wire::set_of(s) else { continue };
        let mut keys = Vec::new();
        for m in conn.dump(wire::get_elements(family, &name)).map_err(fail)? {
            if let NetfilterMessageInner::NfTables(NfTablesMessage::NewSetElement(e)) = m.inner {
                keys.extend(wire::keys_of(e));
            }
        }
        sets.insert(name, wire::set_canonical(flags, key_len, keys));
    }
    let by_name = |name: &str, _: Option<u32>| sets.get(name).cloned();
    let rules = dump_rules(&mut conn, nfproto, Some(TABLE))
        .map_err(fail)?
        .into_iter()
        .filter_map(|r| {
            let (mut chain, mut canon, mut comment) = (None, String::new(), None);
            for a in r.attributes {
                match a {
                    RuleAttribute::Chain(c) => chain = Some(c),
                    RuleAttribute::Expressions(list) => canon = wire::canonical(&wire::list_bytes(&list), &by_name).0,
                    RuleAttribute::UserData(d) => comment = wire::userdata_comment(&d),
                    _ => {}
                }
            }
            Some((chain?, canon, comment))
        })
        .collect();
    Ok((chains, rules))
}

fn dump_rules(conn: &mut Conn, nfproto: u8, table: Option<&str>) -> Result<Vec<RuleMessage>, NlError> {
    let attributes = table.map(|t| vec![RuleAttribute::Table(t.into())]).unwrap_or_default();
    let req: NetfilterMessage = netfilter_message(nfproto, NfTablesMessage::GetRule(RuleMessage { attributes }));
    Ok(conn
        .dump(req)?
        .into_iter()
        .filter_map(|m| match m.inner {
            NetfilterMessageInner::NfTables(NfTablesMessage::NewRule(r)) => Some(r),
            _ => None,
        })
        .collect())
}

/// The expression names of every nf_tables rule of the calling thread's namespace, in
/// every table and family (ours and others'), for checks such as "no xt compat".
pub fn expression_names() -> io::Result<Vec<String>> {
    let mut conn = Conn::open(NETLINK_NETFILTER)?;
    let mut names = Vec::new();
    for r in dump_rules(&mut conn, 0, None)? {
        for a in r.attributes {
            if let RuleAttribute::Expressions(list) = a {
                names.extend(wire::canonical(&wire::list_bytes(&list), &|_, _| None).1);
            }
        }
    }
    Ok(names)
}

/// What the rule sets become in nf_tables, one table per family.
pub fn tables(sets: &[RuleSet]) -> Vec<NftTable> {
    sets.iter().map(translate).collect()
}

fn ours(env: &Env<'_>) -> Vec<Family> {
    [Family::V4, Family::V6].into_iter().filter(|f| env.facts.native[crate::facts::index(*f)]).collect()
}

impl Backend for Native {
    fn kind(&self) -> BackendKind {
        BackendKind::Native
    }

    fn apply(&self, env: &Env<'_>, sets: &[RuleSet]) -> Result<Applied, FirewallError> {
        let create = tables(sets);
        let delete = ours(env);
        if sets.iter().any(|s| s.family == Family::V6) {
            crate::ops::add_passthrough_address()?;
        }
        commit(&delete, &create)?;
        Ok(Applied { replaced_existing: !delete.is_empty(), notes: Vec::new() })
    }

    fn missing(&self, env: &Env<'_>, sets: &[RuleSet]) -> Result<Vec<String>, FirewallError> {
        let mut missing = Vec::new();
        for table in tables(sets) {
            let family = table.family;
            let (chains, rules) = if env.facts.native[crate::facts::index(family)] {
                env.ns.run(|| list(family))??
            } else {
                Default::default()
            };
            let mut present: HashMap<Listed, usize> = HashMap::new();
            for rule in rules {
                *present.entry(rule).or_default() += 1;
            }
            let fam = table.family_name();
            for chain in &table.chains {
                if !chains.contains(&chain.name) {
                    missing.push(format!("{family}: chain {fam} {TABLE} {}", chain.name));
                }
                for rule in &chain.rules {
                    match present.get_mut(&(
                        chain.name.clone(),
                        wire::rule_canonical(family, rule),
                        rule.comment.clone(),
                    )) {
                        Some(n) if *n > 0 => *n -= 1,
                        _ => missing.push(format!("{family}: rule {fam} {TABLE} {} {rule}", chain.name)),
                    }
                }
            }
        }
        Ok(missing)
    }

    fn remove(&self, env: &Env<'_>, _expected: &[RuleSet]) -> Result<Vec<Family>, FirewallError> {
        let delete = ours(env);
        if !delete.is_empty() {
            env.ns.run(|| commit(&delete, &[]))??;
        }
        Ok(delete)
    }
}

#[cfg(test)]
mod tests {
    use rules::nft::{Action, Chain, Hook, NftRule};
    use testkit::net::{NamedNetns, require_root};

    use super::*;

    /// A real refusal (a jump to a chain that does not exist: no config produces one):
    /// the error names the refused message, and nothing of the batch is committed.
    #[test]
    fn a_refused_message_is_named_and_nothing_is_committed() {
        if !require_root() {
            return;
        }
        let named = NamedNetns::new("nfrf");
        let ns = named.open();
        let rule = |action| NftRule { conds: vec![], action, comment: None };
        let table = NftTable {
            family: Family::V4,
            chains: vec![Chain {
                name: "nat_output".into(),
                hook: Some(Hook { nat: true, hook: 3, priority: -100 }),
                rules: vec![rule(Action::Return), rule(Action::Jump("NOPE".into())), rule(Action::Return)],
            }],
        };
        let err = ns.run(|| commit(&[], std::slice::from_ref(&table))).unwrap().unwrap_err().to_string();
        assert!(err.contains("cannot add rule ip kuma_mesh nat_output jump NOPE:"), "{err}");
        assert!(err.contains("No such file or directory"), "{err}");
        let tables = ns.run(crate::netlink::nft_tables).unwrap().unwrap();
        assert!(tables.is_empty(), "the batch was committed in part: {tables:?}");
        // The same batch without the bad rule goes in whole.
        let mut good = table;
        good.chains[0].rules.remove(1);
        ns.run(|| commit(&[], &[good])).unwrap().unwrap();
        assert_eq!(ns.run(crate::netlink::nft_tables).unwrap().unwrap(), vec![(2, TABLE.to_owned())]);
    }

    /// A set the kernel refuses (overlapping intervals: `port_set` joins them, so no
    /// config yields one): the error names the element message and its set, and
    /// nothing is committed. The same set, joined, goes in.
    #[test]
    fn a_refused_set_is_named_and_nothing_is_committed() {
        if !require_root() {
            return;
        }
        use kuma::{Protocol, Range16};
        use rules::nft::Cond;
        let named = NamedNetns::new("nfrs");
        let ns = named.open();
        let table = |ports: Vec<Range16>| NftTable {
            family: Family::V4,
            chains: vec![Chain {
                name: "nat_output".into(),
                hook: Some(Hook { nat: true, hook: 3, priority: -100 }),
                rules: vec![NftRule {
                    conds: vec![Cond::L4proto(Protocol::Tcp), Cond::DportIn { protocol: Protocol::Tcp, ports }],
                    action: Action::Return,
                    comment: None,
                }],
            }],
        };
        let overlapping = vec![Range16 { first: 1, last: 10 }, Range16 { first: 5, last: 20 }];
        let err = ns.run(|| commit(&[], &[table(overlapping.clone())])).unwrap().unwrap_err().to_string();
        assert!(err.contains("cannot add elements to set ip kuma_mesh { 1-10, 5-20 }:"), "{err}");
        assert!(ns.run(crate::netlink::nft_tables).unwrap().unwrap().is_empty(), "committed in part");
        ns.run(|| commit(&[], &[table(rules::nft::port_set(&overlapping))])).unwrap().unwrap();
        assert_eq!(ns.run(crate::netlink::nft_tables).unwrap().unwrap(), vec![(2, TABLE.to_owned())]);
    }
}
