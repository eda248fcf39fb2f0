//! Programs transparent-proxy rule sets into a pod's network namespace.
//!
//! A backend offers two primitives, both run inside the target namespace: one atomic
//! `restore` transaction per family, and `save`. The operations (`apply`, `verify`,
//! `remove`) are built on them and on the pure functions of `rules`, so every
//! backend gets the same idempotence and the same "touch only ours" guarantee.

mod error;
mod exec;
mod facts;
mod iptables;
mod netlink;
mod ops;
mod select;

use rules::Family;

pub use error::FirewallError;
pub use facts::NsFacts;
pub use iptables::{ExecContext, Iptables};
pub use netlink::add_ipv6_host_address;
pub use ops::{ApplyReport, Options, RemoveReport, VerifyReport, apply, plan, remove, verify};
pub use select::{BackendChoice, Selection, select};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    Nft,
    Legacy,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Nft => "nft",
            BackendKind::Legacy => "legacy",
        }
    }
}

/// A firewall backend. `restore` and `save` run in the calling thread's network
/// namespace (callers enter the pod's through `netns::NetNs::run`).
pub trait Backend: Send + Sync {
    fn kind(&self) -> BackendKind;
    /// Whether the namespace described by `facts` has tables of this backend that our
    /// rules could be in; when not, a plain install needs no `save` first.
    fn has_tables(&self, facts: &NsFacts, family: Family) -> bool;
    /// Applies `payload` (iptables-restore syntax, `--noflush`) as one transaction.
    fn restore(&self, family: Family, payload: &str, ctx: &ExecContext) -> Result<(), FirewallError>;
    /// The current rules of the family, as iptables-save prints them.
    fn save(&self, family: Family, ctx: &ExecContext) -> Result<String, FirewallError>;
}
