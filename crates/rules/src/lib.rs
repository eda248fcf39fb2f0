//! Transparent-proxy redirect rules as data.
//!
//! `generate` turns a validated Kuma config into the rule set of one address family;
//! `restore` renders rule sets as `iptables-restore` input and compares them with
//! `iptables-save` output. Nothing here touches the system.

#![forbid(unsafe_code)]

pub mod dns;
mod generate;
pub mod nft;
pub mod restore;
pub mod rule;

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// Rules per family at most: lists are capped one by one, but nested lists multiply
/// (port-for-UID entries by protocols by port groups), and a pod must not make us
/// program (or hold) hundreds of thousands of rules.
pub const MAX_RULES: usize = 20_000;

pub use generate::{
    INBOUND, INBOUND_REDIRECT, OUTBOUND, OUTBOUND_REDIRECT, families, generate, uid_exclusion_rule_count,
};
pub use rule::{Rule, Spec};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn contains(self, ip: IpAddr) -> bool {
        matches!((self, ip), (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_)))
    }

    /// (localhost, the inbound passthrough source address) of this family.
    pub fn loopback_addresses(self) -> (IpNet, IpNet) {
        let parse = |s: &str| s.parse::<IpNet>().expect("constant CIDR");
        match self {
            Family::V4 => (parse("127.0.0.1/32"), parse("127.0.0.6/32")),
            Family::V6 => (parse("::1/128"), parse("::6/128")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Raw,
    Nat,
    Mangle,
}

impl Table {
    pub fn as_str(self) -> &'static str {
        match self {
            Table::Raw => "raw",
            Table::Nat => "nat",
            Table::Mangle => "mangle",
        }
    }
}

/// Our rules in one table: the chains we own (created by us) and the rules, in order,
/// both in our chains and in the table's built-in chains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRules {
    pub table: Table,
    pub chains: Vec<String>,
    pub rules: Vec<Rule>,
}

/// Every rule of one address family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    pub family: Family,
    pub tables: Vec<TableRules>,
}

impl RuleSet {
    pub fn rule_count(&self) -> usize {
        self.tables.iter().map(|t| t.rules.len()).sum()
    }
}
