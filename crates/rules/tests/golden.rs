//! Golden files of the generated rules: each case under `golden/` is a YAML file with
//! the pod's `annotations`, whether the namespace has IPv6 (`ipv6`) and the resolv.conf
//! `nameservers`. Beside it, per family: the iptables-restore payload (`.rules`) and the
//! native nf_tables form as `nft list table` prints it (`.nft`; that the kernel lists
//! exactly this is checked by the netfilter crate's tests/native.rs).
//! `UPDATE_GOLDEN=1 cargo test -p rules` rewrites them after an intended change (review
//! the diff).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use rules::{Family, RuleSet, families, generate, nft, restore};

/// Every case rendered by `render` (one family's rule set at a time) against its
/// golden file with extension `ext`.
fn check_goldens(ext: &str, render: impl Fn(Family, &RuleSet) -> String) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 10, "the golden cases are missing from {}", dir.display());
    let mut failures = Vec::new();
    for case_path in cases {
        let case: serde_norway::Value = serde_norway::from_str(&std::fs::read_to_string(&case_path).unwrap()).unwrap();
        let annotations: BTreeMap<String, String> =
            serde_norway::from_value(case["annotations"].clone()).expect("annotations map");
        let ipv6 = case["ipv6"].as_bool().unwrap_or(false);
        let nameservers: Vec<IpAddr> = case["nameservers"]
            .as_sequence()
            .map(|s| s.iter().map(|v| v.as_str().unwrap().parse().unwrap()).collect())
            .unwrap_or_default();
        let cfg = kuma::from_annotations(&annotations).expect("valid config");
        let got: String = families(&cfg, ipv6)
            .into_iter()
            .map(|family| render(family, &generate(&cfg, family, &nameservers)))
            .collect();
        let golden = case_path.with_extension(ext);
        if update {
            std::fs::write(&golden, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_default();
        if got != want {
            failures.push(format!("{}:\n--- want\n{want}\n+++ got\n{got}", golden.display()));
        }
    }
    assert!(failures.is_empty(), "golden mismatch (UPDATE_GOLDEN=1 to accept):\n{}", failures.join("\n"));
}

#[test]
fn golden_rule_sets() {
    check_goldens("rules", |family, set| {
        format!("# {family}: {} rules\n{}", set.rule_count(), restore::install_payload(set))
    });
}

#[test]
fn golden_nft_tables() {
    check_goldens("nft", |family, set| {
        let table = nft::translate(set);
        // One native rule per iptables rule: MAX_RULES bounds both backends alike.
        assert_eq!(table.rule_count(), set.rule_count(), "{family}: native and iptables rule counts differ");
        format!("# {family}: {} rules\n{table}", table.rule_count())
    });
}
