//! The native nf_tables backend in real namespaces: the kernel accepts every rule set
//! we generate and lists it back exactly as we render it, only native expressions are
//! used, and a namespace holding our iptables rules of an older version is cleaned of
//! them when the native backend takes over. (Traffic through native rules is checked
//! by traffic.rs, with the iptables backends.)

use std::collections::BTreeMap;

use kuma::Config;
use netfilter::{BackendChoice, BackendKind, NsFacts, Options, apply, expression_names, plan, remove, verify};
use rules::nft::translate;
use testkit::net::{NamedNetns, Topology, require_root};

mod common;
use common::golden_configs;

fn options(backend: BackendChoice) -> Options {
    Options {
        backend,
        lock_dir: std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("xtables-locks"),
        ..Options::default()
    }
}

fn native() -> Options {
    options(BackendChoice::Forced(BackendKind::Native))
}

fn config(pairs: &[(&str, &str)]) -> Config {
    let annotations: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    kuma::from_annotations(&annotations).unwrap()
}

#[test]
fn the_kernel_lists_every_golden_rule_set_as_we_render_it() {
    if !require_root() {
        return;
    }
    let mut failures = Vec::new();
    for (name, cfg, ipv6) in golden_configs() {
        let topo = Topology::new("nfgd", ipv6);
        let pod = topo.pod.open();
        let report = apply(&pod, &cfg, &native()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(report.backend, BackendKind::Native);
        let facts = pod.run(NsFacts::read).unwrap();
        for set in plan(&cfg, &facts, &Options::default()).unwrap() {
            let table = translate(&set);
            let listed = topo.pod.exec("nft", &["list", "table", table.family_name(), "kuma_mesh"]);
            if listed != table.to_string() {
                failures.push(format!("{name} {}:\n--- rendered\n{table}+++ nft lists\n{listed}", set.family));
            }
        }
        let missing = verify(&pod, &cfg, &native()).unwrap().missing;
        assert!(missing.is_empty(), "{name}: verify after apply: {missing:#?}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every feature at once: conntrack zones, invalid drop, logging, UID and port ranges.
fn rich_config() -> Config {
    config(&[
        ("kuma.io/builtin-dns", "enabled"),
        ("traffic.kuma.io/drop-invalid-packets", "true"),
        ("traffic.kuma.io/iptables-logs", "true"),
        ("traffic.kuma.io/exclude-outbound-ports-for-uids", "tcp:7000,7100-7200:1000-1010"),
        ("traffic.kuma.io/exclude-outbound-ips", "10.0.0.0/8"),
    ])
}

#[test]
fn only_native_expressions_are_used() {
    if !require_root() {
        return;
    }
    let topo = Topology::new("nfxt", true);
    let pod = topo.pod.open();
    apply(&pod, &rich_config(), &native()).unwrap();
    let names = pod.run(expression_names).unwrap().unwrap();
    let wanted =
        ["ct", "redir", "log", "range", "byteorder", "bitwise", "payload", "meta", "cmp", "immediate", "lookup"];
    for wanted in wanted {
        assert!(names.iter().any(|n| n == wanted), "expected a {wanted} expression among {names:?}");
    }
    assert!(!names.iter().any(|n| n == "match" || n == "target"), "xt compat expression in {names:?}");

    // The check can fail: iptables-nft's owner and comment matches are xt compat.
    let other = Topology::new("nfxi", false);
    let ns = other.pod.open();
    apply(&ns, &rich_config(), &options(BackendChoice::Forced(BackendKind::Nft))).unwrap();
    let names = ns.run(expression_names).unwrap().unwrap();
    assert!(names.iter().any(|n| n == "match"), "iptables-nft uses xt matches: {names:?}");
}

fn our_iptables_rules(ns: &NamedNetns, kind: &str) -> Vec<String> {
    ["iptables", "ip6tables"]
        .iter()
        .flat_map(|t| ns.exec(&format!("{t}-{kind}-save"), &[]).lines().map(str::to_owned).collect::<Vec<_>>())
        .filter(|l| l.contains("KUMA_MESH") || l.contains("kuma/mesh/transparent/proxy/"))
        .collect()
}

#[test]
fn the_native_backend_takes_over_from_our_older_iptables_rules() {
    if !require_root() {
        return;
    }
    for kind in [BackendKind::Nft, BackendKind::Legacy] {
        let topo = Topology::new("nfto", true);
        let pod = topo.pod.open();
        let cfg = rich_config();
        let tool = format!("iptables-{}", kind.as_str());
        topo.pod.exec(&tool, &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "4444", "-j", "ACCEPT"]);
        apply(&pod, &cfg, &options(BackendChoice::Forced(kind))).unwrap();
        assert!(!our_iptables_rules(&topo.pod, kind.as_str()).is_empty());

        let report = apply(&pod, &cfg, &native()).unwrap();
        assert_eq!(report.backend, BackendKind::Native);
        assert_eq!(our_iptables_rules(&topo.pod, kind.as_str()), Vec::<String>::new(), "{kind:?}: old rules left");
        let others = topo.pod.exec(&format!("{tool}-save"), &["-t", "nat"]);
        assert!(others.contains("--dport 4444 -j ACCEPT"), "{kind:?}: others' rule went too:\n{others}");
        let missing = verify(&pod, &cfg, &native()).unwrap().missing;
        assert!(missing.is_empty(), "{missing:#?}");

        // From now on auto stays with the native table, and remove finds it.
        let auto = options(BackendChoice::Auto);
        let again = apply(&pod, &cfg, &auto).unwrap();
        assert_eq!(again.backend, BackendKind::Native, "{}", again.backend_reason);
        assert!(again.replaced_existing, "our table was there and is replaced");
        let removed = remove(&pod, None, &auto).unwrap();
        assert_eq!(
            removed.removed,
            vec![(BackendKind::Native, rules::Family::V4), (BackendKind::Native, rules::Family::V6)]
        );
        assert_eq!(topo.pod.exec("nft", &["list", "tables"]).lines().filter(|l| l.contains("kuma_mesh")).count(), 0);
    }
}

#[test]
fn verify_lists_a_changed_rule_and_a_missing_chain() {
    if !require_root() {
        return;
    }
    let topo = Topology::new("nfvf", false);
    let pod = topo.pod.open();
    let cfg = Config::default();
    apply(&pod, &cfg, &native()).unwrap();
    // Same comment, other port: the rule counts as missing.
    let listing = topo.pod.exec("nft", &["-a", "list", "chain", "ip", "kuma_mesh", "KUMA_MESH_OUTBOUND_REDIRECT"]);
    let handle =
        listing.lines().find(|l| l.contains("redirect to")).unwrap().rsplit("# handle ").next().unwrap().trim();
    let replaced = format!(
        "replace rule ip kuma_mesh KUMA_MESH_OUTBOUND_REDIRECT handle {handle} meta l4proto tcp redirect to :15999 \
         comment \"kuma/mesh/transparent/proxy/to the outbound listener\""
    );
    topo.pod.exec("sh", &["-c", &format!("nft '{}'", replaced.replace('\'', ""))]);
    let missing = verify(&pod, &cfg, &native()).unwrap().missing;
    assert_eq!(
        missing,
        vec![
            "ipv4: rule ip kuma_mesh KUMA_MESH_OUTBOUND_REDIRECT meta l4proto tcp redirect to :15001 \
             comment \"kuma/mesh/transparent/proxy/to the outbound listener\""
        ]
    );
    // A chain can only go once nothing jumps to it.
    topo.pod.exec("nft", &["flush", "chain", "ip", "kuma_mesh", "nat_prerouting"]);
    topo.pod.exec("nft", &["flush", "chain", "ip", "kuma_mesh", "KUMA_MESH_INBOUND"]);
    topo.pod.exec("nft", &["delete", "chain", "ip", "kuma_mesh", "KUMA_MESH_INBOUND"]);
    let missing = verify(&pod, &cfg, &native()).unwrap().missing;
    assert!(missing.iter().any(|m| m == "ipv4: chain ip kuma_mesh KUMA_MESH_INBOUND"), "{missing:?}");
    // Applying again repairs everything, in one transaction.
    apply(&pod, &cfg, &native()).unwrap();
    assert!(verify(&pod, &cfg, &native()).unwrap().missing.is_empty());
}

/// A port list is one rule looking up an anonymous set; verify compares the set's
/// elements. The kernel refuses to change an anonymous set in place, so the tamperer
/// replaces the rule with one whose set lacks a port.
#[test]
fn verify_lists_a_port_set_missing_an_element() {
    if !require_root() {
        return;
    }
    let topo = Topology::new("nfst", false);
    let pod = topo.pod.open();
    let cfg = config(&[("traffic.kuma.io/exclude-outbound-ports-for-uids", "tcp:7000,7100-7200:1001-1010")]);
    apply(&pod, &cfg, &native()).unwrap();
    assert!(verify(&pod, &cfg, &native()).unwrap().missing.is_empty());
    let listing = topo.pod.exec("nft", &["-a", "list", "chain", "ip", "kuma_mesh", "nat_output"]);
    let line = listing.lines().find(|l| l.contains("dport {")).unwrap_or_else(|| panic!("no set in\n{listing}"));
    let (rule, handle) = line.trim().rsplit_once(" # handle ").unwrap();
    assert!(rule.starts_with("tcp dport { 7000, 7100-7200 } meta skuid 1001-1010 return comment"), "{rule}");

    // The kernel names the first anonymous set of a new table __set0.
    let refused = std::process::Command::new("ip")
        .args(["netns", "exec", &topo.pod.name, "nft", "delete", "element", "ip", "kuma_mesh", "__set0", "{ 7000 }"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("Operation not supported"), "{stderr}");

    let tampered = rule.replace("{ 7000, 7100-7200 }", "{ 7100-7200 }");
    topo.pod.exec("nft", &["replace", "rule", "ip", "kuma_mesh", "nat_output", "handle", handle, &tampered]);
    let missing = verify(&pod, &cfg, &native()).unwrap().missing;
    assert_eq!(missing, vec![format!("ipv4: rule ip kuma_mesh nat_output {rule}")]);
    apply(&pod, &cfg, &native()).unwrap();
    assert!(verify(&pod, &cfg, &native()).unwrap().missing.is_empty());
}
