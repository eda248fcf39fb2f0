//! The legacy per-key annotations (Kuma 2.x injects these by default).

use std::collections::BTreeMap;

use crate::error::ConfigError;
use crate::model::{Config, DEFAULT_APPLICATION_PROBE_PROXY_PORT, DEFAULT_ENVOY_ADMIN_PORT, IpFamilyMode, TrafficFlow};
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

/// The inbound port and exclusions, taken only when inbound is redirected, as Kuma
/// does (injector_linux.go, mapToConfig: all inbound settings sit under
/// `if cfg.Redirect.Inbound.Enabled`). For a gateway they only have to pass Kuma's
/// annotation checks (annotations_linux.go: a port list, an IP list, a single port) and
/// the flow keeps its defaults: `KUMA_MESH_INBOUND_REDIRECT` redirects to 15006 as
/// Kuma's does, whatever `kuma.io/transparent-proxying-inbound-port` says.
fn inbound(r: &Reader<'_>, flow: &mut TrafficFlow) -> Result<(), ConfigError> {
    // The application probe proxy listens beside the app: probes to it must not loop
    // through the inbound listener. 0 switches the proxy (and the exclusion) off.
    let probe_port = r
        .get(APPLICATION_PROBE_PROXY_PORT, "applicationProbeProxyPort", |t| match t.trim() {
            "0" => Ok(0),
            other => values::port(other),
        })?
        .unwrap_or(DEFAULT_APPLICATION_PROBE_PROXY_PORT);
    if !flow.enabled {
        r.get(INBOUND_PORT, "redirect.inbound.port", values::kuma_port_list)?;
        r.get(EXCLUDE_INBOUND_PORTS, "redirect.inbound.excludePorts", values::kuma_port_list)?;
        r.get(EXCLUDE_INBOUND_IPS, "redirect.inbound.excludePortsForIPs", values::ip_list)?;
        return Ok(());
    }
    if let Some(port) = r.get(INBOUND_PORT, "redirect.inbound.port", values::port)? {
        flow.port = port;
    }
    flow.exclude_ports = r
        .get(EXCLUDE_INBOUND_PORTS, "redirect.inbound.excludePorts", values::port_list)?
        .unwrap_or_else(|| vec![DEFAULT_ENVOY_ADMIN_PORT]);
    if probe_port != 0 && !flow.exclude_ports.contains(&probe_port) {
        flow.exclude_ports.push(probe_port);
    }
    if let Some(ips) = r.get(EXCLUDE_INBOUND_IPS, "redirect.inbound.excludePortsForIPs", values::ip_list)? {
        flow.exclude_ips = ips;
    }
    Ok(())
}

/// Builds the configuration from the legacy annotations over the legacy defaults.
pub fn from_legacy_annotations(annotations: &BTreeMap<String, String>) -> Result<Config, ConfigError> {
    let r = Reader(annotations);
    let mut cfg = Config::default();

    if let Some(port) = r.get(OUTBOUND_PORT, "redirect.outbound.port", values::port)? {
        cfg.outbound.port = port;
    }
    if let Some(mode) = r.get(IP_FAMILY_MODE, "ipFamilyMode", legacy_ip_family_mode)? {
        cfg.ip_family_mode = mode;
    }
    if let Some(uid) = r.get(SIDECAR_UID, "kumaDPUser", values::uid)? {
        cfg.uid = uid;
    }
    cfg.inbound.enabled = !r.get(GATEWAY, "redirect.inbound.enabled", gateway)?.unwrap_or(false);

    // Kuma (injector_linux.go, mapToConfig) takes the builtin DNS port only when DNS is
    // redirected, and then always captures all DNS with the conntrack zone split; when
    // it is not, the port only has to pass its annotation check (annotations_linux.go).
    cfg.dns.enabled = r.get(BUILTIN_DNS, "redirect.dns.enabled", values::boolean)?.unwrap_or(false);
    if cfg.dns.enabled {
        cfg.dns.capture_all = true;
        cfg.dns.skip_conntrack_zone_split = false;
        if let Some(port) = r.get(BUILTIN_DNS_PORT, "redirect.dns.port", values::port)? {
            cfg.dns.port = port;
        }
    } else {
        r.get(BUILTIN_DNS_PORT, "redirect.dns.port", values::kuma_port_list)?;
    }

    // Kuma checks the admin port's syntax and fails ADD on a bad one, but its exclusions
    // stay at 9901 whatever it says: only the exclude-*-ports annotations move them.
    r.get(ENVOY_ADMIN_PORT, "envoyAdminPort", values::kuma_port_list)?;
    cfg.outbound.exclude_ports = r
        .get(EXCLUDE_OUTBOUND_PORTS, "redirect.outbound.excludePorts", values::port_list)?
        .unwrap_or_else(|| vec![DEFAULT_ENVOY_ADMIN_PORT]);
    inbound(&r, &mut cfg.inbound)?;

    if let Some(list) = r.get(EXCLUDE_OUTBOUND_PORTS_FOR_UIDS, "redirect.outbound.excludePortsForUIDs", |t| {
        values::uid_port_exclusions(t.split(';'))
    })? {
        cfg.outbound.exclude_ports_for_uids = list;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn read(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        from_legacy_annotations(&pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    const INBOUND_SETTINGS: [(&str, &str); 4] = [
        (INBOUND_PORT, "15016"),
        (EXCLUDE_INBOUND_PORTS, "7070"),
        (EXCLUDE_INBOUND_IPS, "172.16.0.0/12"),
        (APPLICATION_PROBE_PROXY_PORT, "9500"),
    ];

    /// Kuma v2.14.3, injector_linux.go, mapToConfig: `Inbound.Enabled = !isGateway`,
    /// and the port and exclusions only under `if cfg.Redirect.Inbound.Enabled`.
    #[test]
    fn a_gateway_takes_no_inbound_settings() {
        let app = read(&INBOUND_SETTINGS).unwrap();
        assert_eq!((app.inbound.port, app.inbound.exclude_ports.as_slice()), (15016, &[7070, 9500][..]));
        assert_eq!(app.inbound.exclude_ips.len(), 1);

        for gateway in ["enabled", "true", "Enabled", "provided"] {
            let mut pairs = INBOUND_SETTINGS.to_vec();
            pairs.push((GATEWAY, gateway));
            pairs.push((OUTBOUND_PORT, "15011"));
            let cfg = read(&pairs).unwrap();
            let want = TrafficFlow { enabled: false, ..Config::default().inbound };
            assert_eq!(cfg.inbound, want, "{gateway}: the inbound flow keeps its defaults (redirect to 15006)");
            assert_eq!(cfg.outbound.port, 15011, "{gateway}: outbound settings are taken all the same");
        }
    }

    /// For a gateway Kuma still runs its annotation checks (annotations_linux.go,
    /// NewIntermediateConfig): what fails them fails ADD; what passes them is unread,
    /// even where mapToConfig would refuse it for an application pod.
    #[test]
    fn a_gateway_checks_inbound_values_as_kuma_does() {
        for (annotation, value) in [(INBOUND_PORT, "0"), (INBOUND_PORT, "15016,15017"), (INBOUND_PORT, "")] {
            assert!(read(&[(GATEWAY, "enabled"), (annotation, value)]).is_ok(), "{annotation}: {value:?}");
            assert!(read(&[(annotation, value)]).is_err(), "{annotation}: {value:?} without a gateway");
        }
        assert!(read(&[(GATEWAY, "enabled"), (EXCLUDE_INBOUND_PORTS, "0, 7070")]).is_ok());
        for (annotation, value) in [
            (INBOUND_PORT, "http"),
            (INBOUND_PORT, "70000"),
            (EXCLUDE_INBOUND_PORTS, "80,x"),
            (EXCLUDE_INBOUND_IPS, "10.0.0.0/33"),
            (APPLICATION_PROBE_PROXY_PORT, "70000"),
        ] {
            let err = read(&[(GATEWAY, "enabled"), (annotation, value)]).unwrap_err();
            assert_eq!((err.annotation.as_str(), err.value.as_str()), (annotation, value));
        }
    }

    /// Kuma v2.14.3, injector_linux.go, mapToConfig: the DNS port (and capture-all)
    /// only under `if cfg.Redirect.DNS.Enabled`.
    #[test]
    fn the_dns_port_only_when_dns_is_redirected() {
        let cfg = read(&[(BUILTIN_DNS, "true"), (BUILTIN_DNS_PORT, "15054")]).unwrap();
        assert!(cfg.dns.enabled && cfg.dns.capture_all && !cfg.dns.skip_conntrack_zone_split);
        assert_eq!(cfg.dns.port, 15054);
        assert_eq!(read(&[(BUILTIN_DNS_PORT, "15054")]).unwrap().dns, Config::default().dns);
        // Kuma's annotation check passes these; only its mapToConfig refuses them.
        for port in ["0", "15054,15055", ""] {
            let cfg = read(&[(BUILTIN_DNS, "false"), (BUILTIN_DNS_PORT, port)]).unwrap();
            assert_eq!(cfg.dns, Config::default().dns, "{port:?}");
            assert!(read(&[(BUILTIN_DNS, "true"), (BUILTIN_DNS_PORT, port)]).is_err(), "{port:?}");
        }
        let err = read(&[(BUILTIN_DNS_PORT, "dns")]).unwrap_err();
        assert_eq!((err.annotation.as_str(), err.field.as_str()), (BUILTIN_DNS_PORT, "redirect.dns.port"));
    }
}
