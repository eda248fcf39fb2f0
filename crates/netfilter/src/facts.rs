//! Cheap facts about the network namespace of the calling thread: no process is run.

use std::collections::BTreeSet;

use rules::Family;

use crate::netlink;

/// NFPROTO_IPV4 / NFPROTO_IPV6: the nf_tables families iptables-nft uses.
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// The tables iptables creates; other nf_tables tables (firewalld, native nft) are not
/// iptables state.
const IPTABLES_TABLES: [&str; 5] = ["filter", "nat", "mangle", "raw", "security"];
/// The tables our rules live in.
pub const OUR_TABLES: [&str; 3] = ["raw", "nat", "mangle"];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NsFacts {
    /// IPv6 is enabled in the namespace ([`netns::ipv6_enabled`]): in dual-stack mode
    /// the pod gets IPv6 rules, whether or not its addresses have appeared yet.
    pub has_ipv6: bool,
    /// Legacy (x_tables) tables instantiated, per family.
    pub legacy: [BTreeSet<String>; 2],
    /// iptables-nft tables, per family.
    pub nft: [BTreeSet<String>; 2],
    /// Our native table (`kuma_mesh`), per family.
    pub native: [bool; 2],
}

pub fn index(family: Family) -> usize {
    match family {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

impl NsFacts {
    /// Reads the facts of the calling thread's namespace.
    pub fn read() -> Self {
        let mut facts = NsFacts { has_ipv6: netns::ipv6_enabled(), ..Default::default() };
        for (i, file) in ["ip_tables_names", "ip6_tables_names"].iter().enumerate() {
            // Absent when the x_tables module is not loaded: then there are no tables.
            let names = std::fs::read_to_string(format!("/proc/thread-self/net/{file}")).unwrap_or_default();
            facts.legacy[i] = names.lines().map(str::to_owned).collect();
        }
        match netlink::nft_tables() {
            Ok(tables) => {
                for (family, name) in tables {
                    let i = match family {
                        NFPROTO_IPV4 => 0,
                        NFPROTO_IPV6 => 1,
                        _ => continue,
                    };
                    if name == rules::nft::TABLE {
                        facts.native[i] = true;
                    } else if IPTABLES_TABLES.contains(&name.as_str()) {
                        facts.nft[i].insert(name);
                    }
                }
            }
            Err(error) => tracing::debug!(%error, "cannot list nf_tables tables; assuming none"),
        }
        facts
    }

    pub fn any_legacy(&self) -> bool {
        self.legacy.iter().any(|t| !t.is_empty())
    }

    pub fn any_nft(&self) -> bool {
        self.nft.iter().any(|t| !t.is_empty())
    }
}
