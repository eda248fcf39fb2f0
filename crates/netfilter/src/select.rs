//! Which backend to use, decided the same way on every call so that the choice cannot
//! flap: the pod namespace's own state first (rules already there must be managed
//! where they are), then the host's (our rules should live where kube-proxy's do), then
//! the documented default, iptables-nft.
//!
//! `auto` picks the native nf_tables backend when the pod namespace already holds our
//! native table, or when no iptables tools are installed at all (nodes such as Talos,
//! where every iptables-based CNI fails). It does not yet prefer it over installed
//! iptables tools: Kuma's contract is rules that `iptables-save` shows, which node
//! tooling and people debugging a pod rely on; `nftables` is one setting away and is
//! the fastest path (one netlink batch, no process).

use std::str::FromStr;

use rules::Family;

use crate::facts::NsFacts;
use crate::iptables::{ExecContext, Iptables};
use crate::nftables::Native;
use crate::{Backend, BackendKind, FirewallError};

/// The backend asked for: `auto` detects, the others force.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BackendChoice {
    #[default]
    Auto,
    Forced(BackendKind),
}

impl FromStr for BackendChoice {
    type Err = FirewallError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" | "auto" => Ok(BackendChoice::Auto),
            "nft" | "iptables-nft" => Ok(BackendChoice::Forced(BackendKind::Nft)),
            "legacy" | "iptables-legacy" => Ok(BackendChoice::Forced(BackendKind::Legacy)),
            "nftables" | "native" => Ok(BackendChoice::Forced(BackendKind::Native)),
            other => Err(FirewallError::BadChoice(other.to_owned())),
        }
    }
}

/// The backend to use and why, for the log.
pub(crate) struct Selection {
    pub backend: Box<dyn Backend>,
    pub reason: String,
}

/// The backend of a kind (for iptables: its tools found).
pub(crate) fn backend(kind: BackendKind) -> Result<Box<dyn Backend>, FirewallError> {
    Ok(match kind {
        BackendKind::Native => Box::new(Native),
        kind => Box::new(Iptables::discover(kind)?),
    })
}

fn chosen(backend: impl Backend + 'static, reason: impl Into<String>) -> Selection {
    Selection { backend: Box::new(backend), reason: reason.into() }
}

/// What the choice needs from outside the pod namespace, read before entering it: for
/// `auto`, the tools installed and what the host's state says. Made on a thread in the
/// host's namespace (the host's facts, and its saves when both kinds of tables are
/// there, are the host's only there), so that the pod's facts, the choice and the rules
/// then take one hop into the pod's namespace.
pub(crate) enum Prepared {
    Forced(BackendKind),
    Auto(Box<HostView>),
}

pub(crate) struct HostView {
    nft: Option<Iptables>,
    legacy: Option<Iptables>,
    /// The backend the host's state points to, and why.
    by_host: Option<(Iptables, String)>,
}

impl Prepared {
    pub(crate) fn new(choice: BackendChoice, ctx: &ExecContext) -> Self {
        let BackendChoice::Forced(kind) = choice else {
            let nft = Iptables::discover(BackendKind::Nft).ok();
            let legacy = Iptables::discover(BackendKind::Legacy).ok();
            let by_host = match (&nft, &legacy) {
                (Some(nft), Some(legacy)) => by_state(&NsFacts::read(), nft, legacy, ctx),
                _ => None,
            };
            return Prepared::Auto(Box::new(HostView { nft, legacy, by_host }));
        };
        Prepared::Forced(kind)
    }
}

/// Decides from the pod namespace's facts and, when they say nothing, the host's.
/// Runs on a thread in the pod's namespace (its saves, if any, are the pod's).
pub(crate) fn select(prepared: Prepared, pod: &NsFacts, ctx: &ExecContext) -> Result<Selection, FirewallError> {
    let (nft, legacy, by_host) = match prepared {
        Prepared::Forced(kind) => return Ok(Selection { backend: backend(kind)?, reason: "configured".into() }),
        Prepared::Auto(host) => (host.nft, host.legacy, host.by_host),
    };
    if pod.native.iter().any(|n| *n) {
        return Ok(chosen(Native, "the pod namespace has our nftables table"));
    }
    let (nft, legacy) = match (nft, legacy) {
        (Some(n), Some(l)) => (n, l),
        (Some(n), None) => return Ok(chosen(n, "only the nft tools are installed")),
        (None, Some(l)) => return Ok(chosen(l, "only the legacy tools are installed")),
        (None, None) => {
            return Ok(chosen(Native, "no iptables tools are installed: native nftables, which needs none"));
        }
    };
    if let Some((backend, why)) = by_state(pod, &nft, &legacy, ctx) {
        return Ok(chosen(backend, format!("the pod namespace {why}")));
    }
    if let Some((backend, why)) = by_host {
        return Ok(chosen(backend, format!("the host {why}")));
    }
    Ok(chosen(nft, "no iptables state on the host or in the pod: the default"))
}

fn by_state(facts: &NsFacts, nft: &Iptables, legacy: &Iptables, ctx: &ExecContext) -> Option<(Iptables, String)> {
    match (facts.any_nft(), facts.any_legacy()) {
        (true, false) => Some((nft.clone(), "has iptables-nft tables".into())),
        (false, true) => Some((legacy.clone(), "has iptables-legacy tables".into())),
        (false, false) => None,
        (true, true) => {
            // Both (a node mid-migration): the one holding more rules is the live one,
            // as kube's iptables wrappers decide. Rare, so the two saves are affordable.
            let count = |b: &Iptables| -> usize {
                [Family::V4, Family::V6]
                    .iter()
                    .filter_map(|f| b.save(*f, ctx).ok())
                    .map(|s| s.lines().filter(|l| l.starts_with("-A ")).count())
                    .sum()
            };
            let (n, l) = (count(nft), count(legacy));
            Some(if l > n {
                (legacy.clone(), format!("has more iptables-legacy rules ({l}) than iptables-nft rules ({n})"))
            } else {
                (nft.clone(), format!("has at least as many iptables-nft rules ({n}) as iptables-legacy rules ({l})"))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_backend_name() {
        for (text, want) in [
            ("", BackendChoice::Auto),
            ("auto", BackendChoice::Auto),
            ("nft", BackendChoice::Forced(BackendKind::Nft)),
            ("iptables-legacy", BackendChoice::Forced(BackendKind::Legacy)),
            ("nftables", BackendChoice::Forced(BackendKind::Native)),
        ] {
            assert_eq!(text.parse::<BackendChoice>().unwrap(), want, "{text:?}");
        }
        let err = "ipfw".parse::<BackendChoice>().unwrap_err().to_string();
        assert!(err.contains("\"ipfw\"") && err.contains("nftables"), "{err}");
    }
}
