//! Programs transparent-proxy rule sets into a pod's network namespace.
//!
//! The operations (`apply`, `verify`, `remove`) choose a [`Backend`] and hand it the
//! rule sets of `rules`: the iptables backends (nft and legacy: one atomic `*-restore`
//! transaction per family, `*-save` to read back) or the native one (nf_tables over
//! netlink: one batch per pod, our own tables). Each keeps the same idempotence and the
//! same "touch only ours" guarantee.

mod error;
mod exec;
mod facts;
mod iptables;
mod netlink;
mod nftables;
mod ops;
mod select;

use rules::{Family, RuleSet};

use crate::ops::{Applied, Env};

pub use error::FirewallError;
pub use facts::NsFacts;
pub use iptables::{ExecContext, Iptables};
pub use netlink::add_ipv6_host_address;
pub use nftables::expression_names;
pub use ops::{ApplyReport, Options, RemoveReport, VerifyReport, apply, plan, remove, verify};
pub use select::BackendChoice;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    Nft,
    Legacy,
    /// nf_tables over netlink, no iptables at all.
    Native,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Nft => "nft",
            BackendKind::Legacy => "legacy",
            BackendKind::Native => "nftables",
        }
    }

    /// The backend's name for people: `iptables-nft`, `iptables-legacy`, `nftables`.
    pub fn label(self) -> String {
        match self {
            BackendKind::Native => "nftables".into(),
            k => format!("iptables-{}", k.as_str()),
        }
    }
}

/// A firewall backend. `apply` runs on a thread already in the pod's namespace (the
/// hot path: one hop per ADD); the others enter it themselves (through `env.ns`), so a
/// backend decides how many namespace hops and transactions they need.
pub(crate) trait Backend: Send + Sync {
    fn kind(&self) -> BackendKind;
    /// Installs `sets`, replacing ours and leaving others' rules alone, in the calling
    /// thread's namespace.
    fn apply(&self, env: &Env<'_>, sets: &[RuleSet]) -> Result<Applied, FirewallError>;
    /// Each expected chain or rule that is absent, prefixed with its family.
    fn missing(&self, env: &Env<'_>, sets: &[RuleSet]) -> Result<Vec<String>, FirewallError>;
    /// Removes everything of ours (`expected`, when known, also recognises our rules that
    /// carry no comment). Returns the families where something was removed.
    fn remove(&self, env: &Env<'_>, expected: &[RuleSet]) -> Result<Vec<Family>, FirewallError>;
}
