//! The legacy per-key annotations (Kuma 2.x injects these by default).

use std::collections::BTreeMap;

use crate::error::ConfigError;
use crate::model::{Config, DEFAULT_APPLICATION_PROBE_PROXY_PORT, DEFAULT_ENVOY_ADMIN_PORT, IpFamilyMode};
use crate::values;

pub const INBOUND_PORT: &str = "kuma.io/transparent-proxying-inbound-port";
pub const OUTBOUND_PORT: &str = "kuma.io/transparent-proxying-outbound-port";
pub const IP_FAMILY_MODE: &str = "kuma.io/transparent-proxying-ip-family-mode";
pub const BUILTIN_DNS: &str = "kuma.io/builtin-dns";
pub const BUILTIN_DNS_PORT: &str = "kuma.io/builtin-dns-port";
pub const SIDECAR_UID: &str = "kuma.io/sidecar-uid";
pub const GATEWAY: &str = "kuma.io/gateway";
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.kuma.io/exclude-inbound-ports";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.kuma.io/exclude-outbound-ports";
pub const EXCLUDE_OUTBOUND_PORTS_FOR_UIDS: &str = "traffic.kuma.io/exclude-outbound-ports-for-uids";
pub const EXCLUDE_INBOUND_IPS: &str = "traffic.kuma.io/exclude-inbound-ips";
pub const EXCLUDE_OUTBOUND_IPS: &str = "traffic.kuma.io/exclude-outbound-ips";
pub const DROP_INVALID_PACKETS: &str = "traffic.kuma.io/drop-invalid-packets";
pub const IPTABLES_LOGS: &str = "traffic.kuma.io/iptables-logs";
pub const APPLICATION_PROBE_PROXY_PORT: &str = "kuma.io/application-probe-proxy-port";
pub const ENVOY_ADMIN_PORT: &str = "kuma.io/envoy-admin-port";

/// Reads one annotation, if present, through `parse`, naming annotation and field on error.
struct Reader<'a>(&'a BTreeMap<String, String>);

impl Reader<'_> {
    fn get<T>(
        &self,
        annotation: &str,
        field: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        match self.0.get(annotation) {
            None => Ok(None),
            Some(text) => parse(text).map(Some).map_err(|reason| ConfigError::new(annotation, field, text, reason)),
        }
    }
}

fn legacy_ip_family_mode(text: &str) -> Result<IpFamilyMode, String> {
    match text.trim() {
        "dualstack" => Ok(IpFamilyMode::DualStack),
        "ipv4" => Ok(IpFamilyMode::Ipv4),
        _ => Err("expected dualstack or ipv4".into()),
    }
}

/// `enabled` (or `true`) marks a delegated gateway, `provided` a built-in one: both
/// receive traffic on their own listeners, so inbound is not redirected. Kuma refuses
/// `provided`; taking it is unambiguous.
fn gateway(text: &str) -> Result<bool, String> {
    if text.trim().eq_ignore_ascii_case("provided") {
        return Ok(true);
    }
    values::boolean(text).map_err(|_| "expected enabled, disabled, true, false or provided".to_string())
}

/// Builds the configuration from the legacy annotations over the legacy defaults.
pub fn from_legacy_annotations(annotations: &BTreeMap<String, String>) -> Result<Config, ConfigError> {
    let r = Reader(annotations);
    let mut cfg = Config::default();

    if let Some(port) = r.get(INBOUND_PORT, "redirect.inbound.port", values::port)? {
        cfg.inbound.port = port;
    }
    if let Some(port) = r.get(OUTBOUND_PORT, "redirect.outbound.port", values::port)? {
        cfg.outbound.port = port;
    }
    if let Some(mode) = r.get(IP_FAMILY_MODE, "ipFamilyMode", legacy_ip_family_mode)? {
        cfg.ip_family_mode = mode;
    }
    if let Some(uid) = r.get(SIDECAR_UID, "kumaDPUser", values::uid)? {
        cfg.uid = uid;
    }
    if r.get(GATEWAY, "redirect.inbound.enabled", gateway)?.unwrap_or(false) {
        cfg.inbound.enabled = false;
    }
    // Builtin DNS on the legacy path always captures all DNS with the conntrack zone split.
    cfg.dns.enabled = r.get(BUILTIN_DNS, "redirect.dns.enabled", values::boolean)?.unwrap_or(false);
    cfg.dns.capture_all = true;
    cfg.dns.skip_conntrack_zone_split = false;
    if let Some(port) = r.get(BUILTIN_DNS_PORT, "redirect.dns.port", values::port)? {
        cfg.dns.port = port;
    }

    // Kuma checks the admin port's syntax and fails ADD on a bad one, but its exclusions
    // stay at 9901 whatever it says: only the exclude-*-ports annotations move them.
    r.get(ENVOY_ADMIN_PORT, "envoyAdminPort", values::kuma_port_list)?;
    let default_exclusions = || vec![DEFAULT_ENVOY_ADMIN_PORT];
    cfg.inbound.exclude_ports = r
        .get(EXCLUDE_INBOUND_PORTS, "redirect.inbound.excludePorts", values::port_list)?
        .unwrap_or_else(default_exclusions);
    cfg.outbound.exclude_ports = r
        .get(EXCLUDE_OUTBOUND_PORTS, "redirect.outbound.excludePorts", values::port_list)?
        .unwrap_or_else(default_exclusions);
    // The application probe proxy listens beside the app: probes to it must not loop
    // through the inbound listener. 0 switches the proxy (and the exclusion) off.
    let probe_port = r
        .get(APPLICATION_PROBE_PROXY_PORT, "applicationProbeProxyPort", |t| match t.trim() {
            "0" => Ok(0),
            other => values::port(other),
        })?
        .unwrap_or(DEFAULT_APPLICATION_PROBE_PROXY_PORT);
    if probe_port != 0 && !cfg.inbound.exclude_ports.contains(&probe_port) {
        cfg.inbound.exclude_ports.push(probe_port);
    }

    if let Some(list) = r.get(EXCLUDE_OUTBOUND_PORTS_FOR_UIDS, "redirect.outbound.excludePortsForUIDs", |t| {
        values::uid_port_exclusions(t.split(';'))
    })? {
        cfg.outbound.exclude_ports_for_uids = list;
    }
    if let Some(ips) = r.get(EXCLUDE_INBOUND_IPS, "redirect.inbound.excludePortsForIPs", values::ip_list)? {
        cfg.inbound.exclude_ips = ips;
    }
    if let Some(ips) = r.get(EXCLUDE_OUTBOUND_IPS, "redirect.outbound.excludePortsForIPs", values::ip_list)? {
        cfg.outbound.exclude_ips = ips;
    }
    if let Some(drop) = r.get(DROP_INVALID_PACKETS, "dropInvalidPackets", values::boolean)? {
        cfg.drop_invalid_packets = drop;
    }
    if let Some(logs) = r.get(IPTABLES_LOGS, "log.enabled", values::boolean)? {
        cfg.log.enabled = logs;
    }
    Ok(cfg)
}
