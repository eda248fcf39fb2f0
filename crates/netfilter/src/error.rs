use std::io;
use std::path::PathBuf;
use std::time::Duration;

use rules::Family;

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error(transparent)]
    NetNs(#[from] netns::NetNsError),
    #[error("no {backend} tools for {family} found (looked for {wanted} in {searched})")]
    NoTools { backend: &'static str, family: Family, wanted: String, searched: String },
    #[error("cannot run {tool}: {source}")]
    Spawn { tool: String, source: io::Error },
    #[error("{tool} failed ({status}): {stderr}")]
    Failed { tool: String, status: String, stderr: String },
    #[error("{tool} did not finish within {after:?} and was killed")]
    Timeout { tool: String, after: Duration },
    #[error("redirect.dns.resolvConfigPath {path:?} cannot be used: {reason}")]
    ResolvConf { path: PathBuf, reason: String },
    #[error("the configuration yields {count} {family} rules; at most {} are allowed", rules::MAX_RULES)]
    TooManyRules { family: Family, count: usize },
    #[error("cannot add ::6/128 to lo for the IPv6 inbound passthrough: {0}")]
    LoopbackAddress(io::Error),
    #[error("nf_tables: cannot {what}: {error}")]
    Netlink { what: String, error: String },
    #[error("invalid iptables backend {0:?}: expected auto, nft, legacy or nftables")]
    BadChoice(String),
}
