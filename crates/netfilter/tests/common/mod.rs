//! What the netfilter tests share.

use std::collections::BTreeMap;
use std::path::Path;

use kuma::Config;

/// Every golden case of the rules crate, as (name, config).
pub fn golden_configs() -> Vec<(String, Config, bool)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules/tests/golden");
    let mut out = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    paths.sort();
    for path in paths.into_iter().filter(|p| p.extension().is_some_and(|e| e == "yaml")) {
        let case: serde_norway::Value = serde_norway::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let annotations: BTreeMap<String, String> = serde_norway::from_value(case["annotations"].clone()).unwrap();
        let ipv6 = case["ipv6"].as_bool().unwrap_or(false);
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        out.push((name, kuma::from_annotations(&annotations).unwrap(), ipv6));
    }
    assert!(out.len() >= 10, "golden cases missing from {}", dir.display());
    out
}
