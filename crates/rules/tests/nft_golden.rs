//! Golden files of the native nf_tables form of every golden case (`golden/*.nft`,
//! beside the iptables `.rules`), as `nft list table` prints it; that the kernel lists
//! exactly this is checked by the netfilter crate's tests/native.rs.
//! `UPDATE_GOLDEN=1 cargo test -p rules` rewrites them after an intended change.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use rules::{families, generate, nft};

fn render(case: &serde_norway::Value) -> String {
    let annotations: BTreeMap<String, String> =
        serde_norway::from_value(case["annotations"].clone()).expect("annotations map");
    let ipv6 = case["ipv6"].as_bool().unwrap_or(false);
    let nameservers: Vec<IpAddr> = case["nameservers"]
        .as_sequence()
        .map(|s| s.iter().map(|v| v.as_str().unwrap().parse().unwrap()).collect())
        .unwrap_or_default();
    let cfg = kuma::from_annotations(&annotations).expect("valid config");
    let mut out = String::new();
    for family in families(&cfg, ipv6) {
        let table = nft::translate(&generate(&cfg, family, &nameservers));
        out.push_str(&format!("# {family}: {} rules\n{table}", table.rule_count()));
    }
    out
}

#[test]
fn golden_nft_tables() {
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
        let got = render(&case);
        let golden = case_path.with_extension("nft");
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
