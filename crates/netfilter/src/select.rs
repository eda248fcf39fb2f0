//! Which iptables backend to use, decided the same way on every call so that the
//! choice cannot flap: the pod namespace's own state first (rules already there must be
//! managed where they are), then the host's (our rules should live where kube-proxy's
//! do), then the documented default, nft.

use std::str::FromStr;

use rules::Family;

use crate::facts::NsFacts;
use crate::iptables::{ExecContext, Iptables};
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
            other => Err(FirewallError::BadChoice(other.to_owned())),
        }
    }
}

/// The backend to use and why, for the log.
pub struct Selection {
    pub backend: Iptables,
    pub reason: String,
}

/// Decides from the pod namespace's facts and, when they say nothing, the host's
/// (read lazily: most pod namespaces are fresh, so the host decides).
pub fn select(
    choice: BackendChoice,
    pod: &NsFacts,
    host: impl FnOnce() -> NsFacts,
    ctx: &ExecContext,
) -> Result<Selection, FirewallError> {
    if let BackendChoice::Forced(kind) = choice {
        return Ok(Selection { backend: Iptables::discover(kind)?, reason: "configured".into() });
    }
    let nft = Iptables::discover(BackendKind::Nft);
    let legacy = Iptables::discover(BackendKind::Legacy);
    let (nft, legacy) = match (nft, legacy) {
        (Ok(n), Ok(l)) => (n, l),
        (Ok(n), Err(_)) => return Ok(Selection { backend: n, reason: "only the nft tools are installed".into() }),
        (Err(_), Ok(l)) => return Ok(Selection { backend: l, reason: "only the legacy tools are installed".into() }),
        (Err(e), Err(_)) => return Err(e),
    };
    if let Some((backend, why)) = by_state(pod, &nft, &legacy, ctx) {
        return Ok(Selection { backend, reason: format!("the pod namespace {why}") });
    }
    let host = host();
    if let Some((backend, why)) = by_state(&host, &nft, &legacy, ctx) {
        return Ok(Selection { backend, reason: format!("the host {why}") });
    }
    Ok(Selection { backend: nft, reason: "no iptables state on the host or in the pod: the default".into() })
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
