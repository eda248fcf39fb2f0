//! The contract's facts about both annotation paths, and the error for each kind of
//! invalid value.

use std::collections::BTreeMap;
use std::time::Duration;

use kuma::*;

fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn legacy_defaults_with_only_the_injected_annotation() {
    let cfg = from_annotations(&annotations(&[("kuma.io/sidecar-injected", "true")])).unwrap();
    assert_eq!(cfg.uid, 5678);
    assert_eq!(cfg.inbound.port, 15006);
    assert_eq!(cfg.outbound.port, 15001);
    assert!(!cfg.dns.enabled, "DNS redirect is off on the legacy path by default");
    assert_eq!(cfg.inbound.exclude_ports, vec![9901, 9001]);
    assert_eq!(cfg.outbound.exclude_ports, vec![9901]);
    assert_eq!(cfg.ip_family_mode, IpFamilyMode::DualStack);
    assert!(cfg.inbound.enabled && cfg.outbound.enabled);
    assert!(cfg.comments);
}

#[test]
fn legacy_every_annotation() {
    let cfg = from_annotations(&annotations(&[
        (legacy::INBOUND_PORT, "16006"),
        (legacy::OUTBOUND_PORT, "16001"),
        (legacy::IP_FAMILY_MODE, "ipv4"),
        (legacy::BUILTIN_DNS, "enabled"),
        (legacy::BUILTIN_DNS_PORT, "16053"),
        (legacy::SIDECAR_UID, "1234"),
        (legacy::GATEWAY, "disabled"),
        (legacy::EXCLUDE_INBOUND_PORTS, "8080, 8081"),
        (legacy::EXCLUDE_OUTBOUND_PORTS, ""),
        (legacy::EXCLUDE_OUTBOUND_PORTS_FOR_UIDS, "tcp:22:1000;udp:53,5353:1001-1002"),
        (legacy::EXCLUDE_INBOUND_IPS, "10.0.0.1,fd00::/8"),
        (legacy::EXCLUDE_OUTBOUND_IPS, "192.168.0.0/16"),
        (legacy::DROP_INVALID_PACKETS, "true"),
        (legacy::IPTABLES_LOGS, "true"),
        (legacy::APPLICATION_PROBE_PROXY_PORT, "0"),
        (legacy::ENVOY_ADMIN_PORT, "9902"),
    ]))
    .unwrap();
    assert_eq!((cfg.inbound.port, cfg.outbound.port, cfg.dns.port, cfg.uid), (16006, 16001, 16053, 1234));
    assert_eq!(cfg.ip_family_mode, IpFamilyMode::Ipv4);
    assert!(cfg.dns.enabled && cfg.dns.capture_all && !cfg.dns.skip_conntrack_zone_split);
    assert!(cfg.inbound.enabled);
    assert_eq!(cfg.inbound.exclude_ports, vec![8080, 8081], "probe port 0 adds nothing");
    assert!(cfg.outbound.exclude_ports.is_empty(), "an empty annotation is an empty list");
    assert_eq!(cfg.outbound.exclude_ports_for_uids.len(), 2);
    assert_eq!(cfg.outbound.exclude_ports_for_uids[1].uids, Range16 { first: 1001, last: 1002 });
    assert_eq!(cfg.inbound.exclude_ips.len(), 2);
    assert_eq!(cfg.outbound.exclude_ips[0].to_string(), "192.168.0.0/16");
    assert!(cfg.drop_invalid_packets && cfg.log.enabled);
}

/// As in Kuma: the admin port annotation is checked, but the default exclusions stay 9901.
#[test]
fn legacy_admin_port_leaves_the_default_exclusions() {
    for value in ["9902", "0", "9902,9903", ""] {
        let cfg = from_annotations(&annotations(&[(legacy::ENVOY_ADMIN_PORT, value)])).unwrap();
        assert_eq!(cfg.inbound.exclude_ports, vec![9901, 9001], "{value}");
        assert_eq!(cfg.outbound.exclude_ports, vec![9901], "{value}");
    }
    let cfg = from_annotations(&annotations(&[
        (legacy::ENVOY_ADMIN_PORT, "9902"),
        (legacy::EXCLUDE_INBOUND_PORTS, "9902"),
        (legacy::EXCLUDE_OUTBOUND_PORTS, "9902"),
    ]))
    .unwrap();
    assert_eq!((cfg.inbound.exclude_ports, cfg.outbound.exclude_ports), (vec![9902, 9001], vec![9902]));
    let err = from_annotations(&annotations(&[(legacy::ENVOY_ADMIN_PORT, "admin")])).unwrap_err();
    assert_eq!((err.annotation.as_str(), err.value.as_str()), (legacy::ENVOY_ADMIN_PORT, "admin"));
}

/// Kuma lowercases every boolean-like legacy annotation before reading it.
#[test]
fn legacy_booleans_in_any_letter_case() {
    let cfg = from_annotations(&annotations(&[
        (legacy::GATEWAY, "Enabled"),
        (legacy::BUILTIN_DNS, "TRUE"),
        (legacy::DROP_INVALID_PACKETS, "True"),
        (legacy::IPTABLES_LOGS, "eNaBlEd"),
    ]))
    .unwrap();
    assert!(!cfg.inbound.enabled && cfg.dns.enabled && cfg.drop_invalid_packets && cfg.log.enabled);
    let cfg = from_annotations(&annotations(&[
        (legacy::GATEWAY, "Disabled"),
        (legacy::BUILTIN_DNS, "FALSE"),
        (legacy::DROP_INVALID_PACKETS, "False"),
        (legacy::IPTABLES_LOGS, "DISABLED"),
    ]))
    .unwrap();
    assert!(cfg.inbound.enabled && !cfg.dns.enabled && !cfg.drop_invalid_packets && !cfg.log.enabled);
    assert!(!from_annotations(&annotations(&[(legacy::GATEWAY, "Provided")])).unwrap().inbound.enabled);
}

/// A user name is resolved from the node's /etc/passwd; one that is not there is refused.
#[test]
fn sidecar_user_names() {
    let root = from_annotations(&annotations(&[(legacy::SIDECAR_UID, "root")])).unwrap();
    assert_eq!(root.uid, 0, "root is in every /etc/passwd");
    assert_eq!(from_yaml("kumaDPUser: root").unwrap().uid, 0);
    let err = from_annotations(&annotations(&[(legacy::SIDECAR_UID, "kmc-no-such-user")])).unwrap_err();
    assert_eq!(err.annotation, legacy::SIDECAR_UID);
    assert!(err.reason.contains("/etc/passwd"), "{err}");
}

#[test]
fn yaml_over_defaults() {
    let yaml = r#"
kumaDPUser: "5679"
ipFamilyMode: ipv4
dropInvalidPackets: true
redirect:
  inbound:
    port: 15106
    excludePorts: [9901, "9001"]
    excludePortsForIPs: "10.0.0.0/8, 172.16.0.1"
    insertRedirectInsteadOfAppend: true
  outbound:
    excludePorts: "9901,9902"
    includePorts: 443
    excludePortsForUIDs: ["tcp:80:100", "udp:*:200-300"]
  dns:
    enabled: true
    port: 15153
    captureAll: false
    skipConntrackZoneSplit: true
    resolvConfigPath: /tmp/resolv.conf
  vnet:
    networks: ["docker0:172.17.0.0/16", "br0:fd00::/64"]
log: {enabled: true, level: 4}
wait: 10
waitInterval: 1000
retry: {maxRetries: 2, sleepBetweenRetries: 500ms}
comments: {disabled: true}
cniMode: true
someFutureKey: {nested: 1}
"#;
    let cfg = from_yaml(yaml).unwrap();
    assert_eq!(cfg.uid, 5679);
    assert_eq!(cfg.ip_family_mode, IpFamilyMode::Ipv4);
    assert!(cfg.drop_invalid_packets);
    assert_eq!(cfg.inbound.port, 15106);
    assert_eq!(cfg.inbound.exclude_ports, vec![9901, 9001]);
    assert_eq!(cfg.inbound.exclude_ips.len(), 2);
    assert!(cfg.inbound.insert_redirect_instead_of_append);
    assert_eq!(cfg.outbound.port, 15001, "unset fields keep their defaults");
    assert_eq!(cfg.outbound.exclude_ports, vec![9901, 9902]);
    assert_eq!(cfg.outbound.include_ports, vec![443]);
    assert_eq!(cfg.outbound.exclude_ports_for_uids.len(), 2);
    assert!(cfg.dns.enabled && !cfg.dns.capture_all && cfg.dns.skip_conntrack_zone_split);
    assert_eq!(cfg.dns.port, 15153);
    assert_eq!(cfg.dns.resolv_conf_path, "/tmp/resolv.conf");
    assert_eq!(cfg.vnet.len(), 2);
    assert_eq!(cfg.vnet[1].interface, "br0");
    assert_eq!((cfg.log.enabled, cfg.log.level), (true, 4));
    assert_eq!((cfg.wait, cfg.wait_interval), (10, 1000));
    assert_eq!(cfg.retry.max_retries, 2);
    assert_eq!(cfg.retry.sleep_between_retries, Duration::from_millis(500));
    assert!(!cfg.comments);
}

#[test]
fn yaml_wins_over_legacy_annotations() {
    let cfg = from_annotations(&annotations(&[
        (TRANSPARENT_PROXY_CONFIG, "redirect: {inbound: {port: 15106}}"),
        (legacy::INBOUND_PORT, "not-even-a-port"),
        (legacy::GATEWAY, "enabled"),
    ]))
    .unwrap();
    assert_eq!(cfg.inbound.port, 15106);
    assert!(cfg.inbound.enabled, "kuma.io/gateway is read only on the legacy path");
    assert!(cfg.inbound.exclude_ports.is_empty(), "the YAML path has no implicit exclusions");
}

#[test]
fn empty_yaml_is_the_defaults() {
    assert_eq!(from_yaml("").unwrap(), Config::default());
    assert_eq!(from_yaml("{}").unwrap(), Config::default());
}

/// Each invalid value names the annotation, the field and the value.
#[test]
fn invalid_values_are_named() {
    let cases: &[(&str, &str, &str, &str)] = &[
        (legacy::INBOUND_PORT, "0", "redirect.inbound.port", "0"),
        (legacy::OUTBOUND_PORT, "65536", "redirect.outbound.port", "65536"),
        (legacy::BUILTIN_DNS_PORT, "dns", "redirect.dns.port", "dns"),
        (legacy::IP_FAMILY_MODE, "ipv6", "ipFamilyMode", "ipv6"),
        (legacy::SIDECAR_UID, "kuma-dp", "kumaDPUser", "kuma-dp"),
        (legacy::EXCLUDE_INBOUND_PORTS, "80,x", "redirect.inbound.excludePorts", "80,x"),
        (legacy::EXCLUDE_OUTBOUND_PORTS_FOR_UIDS, "tcp:80:1,2", "redirect.outbound.excludePortsForUIDs", "tcp:80:1,2"),
        (legacy::EXCLUDE_OUTBOUND_PORTS_FOR_UIDS, "tcp:80:5-1", "redirect.outbound.excludePortsForUIDs", "tcp:80:5-1"),
        (legacy::EXCLUDE_INBOUND_IPS, "10.0.0.0/33", "redirect.inbound.excludePortsForIPs", "10.0.0.0/33"),
        (legacy::EXCLUDE_OUTBOUND_IPS, "not-an-ip", "redirect.outbound.excludePortsForIPs", "not-an-ip"),
        (legacy::DROP_INVALID_PACKETS, "maybe", "dropInvalidPackets", "maybe"),
        (legacy::IPTABLES_LOGS, "2", "log.enabled", "2"),
        (legacy::GATEWAY, "sometimes", "redirect.inbound.enabled", "sometimes"),
        (legacy::BUILTIN_DNS, "on", "redirect.dns.enabled", "on"),
    ];
    for (annotation, value, field, shown) in cases {
        let err = from_annotations(&annotations(&[(annotation, value)])).unwrap_err();
        assert_eq!(err.annotation, *annotation, "{err}");
        assert_eq!(err.field, *field, "{err}");
        assert_eq!(err.value, *shown, "{err}");
        let text = err.to_string();
        assert!(text.contains(annotation) && text.contains(field) && text.contains(shown), "{text}");
    }
}

#[test]
fn invalid_yaml_values_are_named() {
    let cases: &[(&str, &str, &str)] = &[
        ("redirect: {inbound: {port: 0}}", "redirect.inbound.port", "0"),
        ("redirect: {outbound: {port: 70000}}", "redirect.outbound.port", "70000"),
        ("redirect: {outbound: {excludePorts: [80, eighty]}}", "redirect.outbound.excludePorts[1]", "eighty"),
        ("redirect: {dns: {enabled: perhaps}}", "redirect.dns.enabled", "perhaps"),
        (
            "redirect: {inbound: {excludePortsForIPs: [300.1.1.1]}}",
            "redirect.inbound.excludePortsForIPs[0]",
            "300.1.1.1",
        ),
        (
            "redirect: {outbound: {excludePortsForUIDs: ['tcp:80:*']}}",
            "redirect.outbound.excludePortsForUIDs[0]",
            "tcp:80:*",
        ),
        ("redirect: {vnet: {networks: ['docker0']}}", "redirect.vnet.networks[0]", "docker0"),
        ("redirect: {vnet: {networks: ['docker0:300.0.0.0/8']}}", "redirect.vnet.networks[0]", "docker0:300.0.0.0/8"),
        ("kumaDPUser: kuma-dp", "kumaDPUser", "kuma-dp"),
        ("ipFamilyMode: ipv5", "ipFamilyMode", "ipv5"),
        ("log: {level: 9}", "log.level", "9"),
        ("retry: {sleepBetweenRetries: soon}", "retry.sleepBetweenRetries", "soon"),
        ("redirect: [1, 2]", "redirect", "- 1\n- 2"),
        ("redirect: {inbound: {port: [1]}}", "redirect.inbound.port", "- 1"),
    ];
    for (yaml, field, value) in cases {
        let err = from_yaml(yaml).unwrap_err();
        assert_eq!(err.annotation, TRANSPARENT_PROXY_CONFIG, "{err}");
        assert_eq!(err.field, *field, "{yaml}: {err}");
        assert_eq!(err.value, *value, "{yaml}: {err}");
    }
}

#[test]
fn malformed_and_oversized_yaml() {
    let err = from_yaml("redirect: {inbound: [").unwrap_err();
    assert_eq!(err.field, "(document)");
    assert!(err.reason.contains("malformed YAML"), "{err}");

    let ports = (1..=10_000).map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
    let err = from_yaml(&format!("redirect: {{outbound: {{excludePorts: [{ports}]}}}}")).unwrap_err();
    assert_eq!(err.field, "redirect.outbound.excludePorts");
    assert!(err.reason.contains("10000 entries"), "{err}");
    assert!(err.value.len() < 200, "a huge value is shortened in the message");

    let err = from_annotations(&annotations(&[(legacy::EXCLUDE_OUTBOUND_PORTS, &ports.replace(' ', ""))])).unwrap_err();
    assert_eq!(err.annotation, legacy::EXCLUDE_OUTBOUND_PORTS);
    assert!(err.reason.contains("10000 entries"), "{err}");
}
