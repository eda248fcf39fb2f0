//! The plugin in eBPF mode: a mesh pod gets no iptables rules; ADD registers it (its
//! network namespace cookie, addresses and configuration) with the programs the
//! installer loaded, DEL unregisters it, CHECK compares the registration with what ADD
//! would write.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ebpf::{EbpfError, Paths, Registry};
use kuma::Config;
use netns::NetNs;
use serde_json::Value;

use crate::proto::{CniError, code};

/// What a failure is to the runtime. A setting the mode cannot honour is the pod's
/// configuration (code 7, the setting named); programs that are not loaded or a
/// registration that differs are what CHECK reports as missing rules.
pub fn error(doing: Doing, e: EbpfError) -> CniError {
    let details = e.to_string();
    match (&e, doing) {
        (e, _) if e.is_config() => CniError::new(
            code::INVALID_CONFIG,
            "the eBPF mode cannot honour the pod's transparent-proxy configuration",
            details,
        ),
        (EbpfError::NotLoaded { .. } | EbpfError::Mismatch { .. }, Doing::Check) => {
            CniError::new(code::RULES_MISSING, "the pod's eBPF redirect is missing", details)
        }
        (_, Doing::Check) => CniError::new(code::RULES_FAILED, "cannot read the pod's eBPF registration", details),
        (_, Doing::Add) => CniError::new(code::RULES_FAILED, "cannot register the pod for the eBPF redirect", details),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Doing {
    Add,
    Check,
}

/// The pod's addresses as the previous plugin's result gives them (`ips[].address`,
/// CIDR notation).
pub fn prev_addresses(prev_result: Option<&Value>) -> Result<Vec<IpAddr>, CniError> {
    let ips = prev_result.and_then(|r| r.get("ips")).and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    ips.iter()
        .map(|ip| {
            let text = ip.get("address").and_then(Value::as_str).unwrap_or_default();
            text.split('/').next().unwrap_or_default().parse().map_err(|_| {
                crate::proto::conf::invalid(format!("prevResult ips[].address {text:?} is not an address in CIDR form"))
            })
        })
        .collect()
}

fn paths(bpffs: &Path) -> Paths {
    // Registration works on the pins only; the cgroup is the installer's business.
    Paths { bpffs: bpffs.to_owned(), cgroup: PathBuf::new() }
}

/// The addresses to register: the previous result's, else the namespace's own.
fn addresses(ns: &NetNs, prev_result: Option<&Value>, doing: Doing) -> Result<Vec<IpAddr>, CniError> {
    let from_prev = prev_addresses(prev_result)?;
    if !from_prev.is_empty() {
        return Ok(from_prev);
    }
    ebpf::netns_addresses(ns).map_err(|e| error(doing, e))
}

pub fn add(bpffs: &Path, id: &str, ns: &NetNs, cfg: &Config, prev_result: Option<&Value>) -> Result<(), CniError> {
    // The configuration first: an unsupported setting is named even on a node whose
    // programs are not loaded.
    ebpf::abi::pod(cfg, &[]).map_err(|e| error(Doing::Add, e))?;
    let addresses = addresses(ns, prev_result, Doing::Add)?;
    let mut registry = Registry::open(&paths(bpffs)).map_err(|e| error(Doing::Add, e))?;
    let registration = registry.register(id, ns, cfg, &addresses).map_err(|e| error(Doing::Add, e))?;
    tracing::info!(
        netns_cookie = registration.netns_cookie,
        addresses = ?registration.addresses,
        ipv6 = registration.ipv6,
        "redirect registered (eBPF)"
    );
    Ok(())
}

pub fn check(bpffs: &Path, id: &str, ns: &NetNs, cfg: &Config, prev_result: Option<&Value>) -> Result<(), CniError> {
    let addresses = addresses(ns, prev_result, Doing::Check)?;
    let registry = Registry::open(&paths(bpffs)).map_err(|e| error(Doing::Check, e))?;
    registry.check(id, ns, cfg, &addresses).map_err(|e| error(Doing::Check, e))
}

/// Never fails (DEL): programs that are gone took every registration with them.
pub fn del(bpffs: &Path, id: &str) {
    let unregistered = Registry::open(&paths(bpffs)).and_then(|mut r| r.unregister(id));
    match unregistered {
        Ok(true) => tracing::info!("redirect unregistered (eBPF)"),
        Ok(false) | Err(EbpfError::NotLoaded { .. }) => {}
        Err(e) => tracing::warn!(error = %e, "could not unregister the pod from the eBPF redirect"),
    }
}

/// GC: the registrations of pods whose namespace is gone (the attachments GC lists are
/// per network, while the registry is the node's, so only what is surely gone goes).
pub fn gc(bpffs: &Path) {
    match Registry::open(&paths(bpffs)).and_then(|mut r| r.sweep()) {
        Ok(_) | Err(EbpfError::NotLoaded { .. }) => {}
        Err(e) => tracing::warn!(error = %e, "GC: could not sweep the eBPF registrations"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn addresses_come_from_the_previous_result() {
        let prev = json!({"ips": [{"address": "10.1.2.3/24"}, {"address": "fd00::3/64", "interface": 0}]});
        let got = prev_addresses(Some(&prev)).unwrap();
        assert_eq!(got, ["10.1.2.3".parse::<IpAddr>().unwrap(), "fd00::3".parse().unwrap()]);
        assert!(prev_addresses(None).unwrap().is_empty());
        assert!(prev_addresses(Some(&json!({"cniVersion": "1.0.0"}))).unwrap().is_empty());
        let err = prev_addresses(Some(&json!({"ips": [{"address": "ten/8"}]}))).unwrap_err();
        assert_eq!(err.code, code::INVALID_CONFIG);
        assert!(err.details.contains("\"ten/8\""), "{err}");
    }

    #[test]
    fn an_unsupported_setting_is_code_7_naming_it() {
        let e = error(Doing::Add, EbpfError::Unsupported { setting: "redirect.vnet.networks" });
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.details.contains("redirect.vnet.networks"), "{e}");
        let e = error(Doing::Check, EbpfError::TooMany { field: "traffic.kuma.io/exclude-outbound-ips", max: 32 });
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.details.contains("exclude-outbound-ips"), "{e}");
    }

    #[test]
    fn check_reports_a_missing_registration_like_missing_rules() {
        let not_loaded = || EbpfError::NotLoaded { path: "/sys/fs/bpf/kong-mesh-cni".into() };
        assert_eq!(error(Doing::Check, not_loaded()).code, code::RULES_MISSING);
        let mismatch = EbpfError::Mismatch { id: "c1".into(), what: "no sk_lookup link pinned".into() };
        let e = error(Doing::Check, mismatch);
        assert_eq!(e.code, code::RULES_MISSING);
        assert!(e.details.contains("no sk_lookup link pinned"), "{e}");
        assert_eq!(error(Doing::Add, not_loaded()).code, code::RULES_FAILED);
    }
}
