//! The generated rules against what Kuma v2.14.3's own plugin programmed
//! (`testenv/kuma-reference/cases`) or, read from its source, would program
//! (`testenv/kuma-derived/cases`), without root: for every case Kuma accepted, the
//! rules of each table must be Kuma's, in Kuma's order, once comment text is set aside.
//! The same cases run end to end, through the plugin in real namespaces, in
//! `crates/kong-mesh-cni/tests/kuma_differential.rs`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use rules::rule::COMMENT_PREFIX;
use rules::{families, generate};
use serde_norway::Value;

/// What the reference README says `@RESOLV@` holds.
const RESOLV: &str = "nameserver 10.96.0.10\nnameserver fd00:96::a\nnameserver 1.1.1.1\n\
                      search shop.svc.cluster.local svc.cluster.local\noptions ndots:5\n";

/// `(table, rule)` pairs of a saved listing, comment text replaced by `*`.
fn saved_rules(lines: &[Value]) -> Vec<(String, String)> {
    let mut table = String::new();
    let mut out = Vec::new();
    for line in lines.iter().filter_map(Value::as_str) {
        if let Some(name) = line.strip_prefix('*') {
            table = name.to_owned();
        } else if line.starts_with("-A ") {
            out.push((table.clone(), star_comments(line)));
        }
    }
    out
}

fn star_comments(line: &str) -> String {
    let marker = format!("--comment \"{COMMENT_PREFIX}");
    match line.find(&marker) {
        Some(at) => {
            let rest = &line[at + marker.len()..];
            let end = rest.find('"').map_or(rest.len(), |e| e + 1);
            format!("{}{marker}*\"{}", &line[..at], &rest[end..])
        }
        None => line.to_owned(),
    }
}

/// Where two rule listings part, or `None` when they are equal.
fn first_difference(kuma: &[(String, String)], ours: &[(String, String)]) -> Option<String> {
    let at = kuma.iter().zip(ours).position(|(a, b)| a != b).unwrap_or(kuma.len().min(ours.len()));
    let show = |v: &[(String, String)]| v.get(at).map_or("(nothing)".to_owned(), |(t, r)| format!("{t} {r}"));
    (kuma != ours).then(|| format!("rule {}: Kuma `{}`, ours `{}`", at + 1, show(kuma), show(ours)))
}

#[test]
fn generated_rules_are_kumas() {
    let testenv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testenv");
    let mut paths = Vec::new();
    // Recorded outcomes, then those derived from Kuma's source (see each README).
    for (dir, key, at_least) in [("kuma-reference", "kuma_v2.14.3", 38), ("kuma-derived", "kuma_v2.14.3_as_read", 6)] {
        let dir = testenv.join(dir).join("cases");
        let mut found: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| (e.unwrap().path(), key)).collect();
        found.sort();
        assert!(found.len() >= at_least, "the cases are missing from {}", dir.display());
        paths.extend(found);
    }
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mut differing = Vec::new();
    let mut compared = 0;
    for (path, key) in paths.iter().filter(|(p, _)| p.extension().is_some_and(|e| e == "json")) {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let doc: Value = serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let (case, kuma) = (&doc["case"], &doc[*key]);
        let excluded = case["namespace"].as_str() == Some("kube-system");
        if kuma["add"].as_str() != Some("ok") || excluded || case["no_pod"].as_bool() == Some(true) {
            continue;
        }
        let annotations: BTreeMap<String, String> =
            serde_norway::from_value(case["pod"]["metadata"]["annotations"].clone()).unwrap();
        let uses_resolv = annotations.values().any(|v| v.contains("@RESOLV@"));
        let cfg = match kuma::from_annotations(&annotations) {
            Ok(cfg) => cfg,
            Err(e) => {
                differing.push(format!("{name}: Kuma accepted, we refuse: {e}"));
                continue;
            }
        };
        let resolv = if uses_resolv { RESOLV } else { host_resolv.as_str() };
        let nameservers: Vec<IpAddr> = rules::dns::nameservers(resolv);
        let ipv6 = case["netns"]["ipv6"].as_bool().unwrap_or(true);
        for family in [rules::Family::V4, rules::Family::V6] {
            let key = if family == rules::Family::V4 { "iptables-save" } else { "ip6tables-save" };
            let want = saved_rules(kuma[key].as_sequence().map(Vec::as_slice).unwrap_or_default());
            let got: Vec<(String, String)> = if families(&cfg, ipv6).contains(&family) {
                let set = generate(&cfg, family, &nameservers);
                set.tables
                    .iter()
                    .flat_map(|t| t.rules.iter().map(|r| (t.table.as_str().to_owned(), star_comments(&r.saved_form()))))
                    .collect()
            } else {
                Vec::new()
            };
            let mut want_sorted = want.clone();
            want_sorted.sort_by(|a, b| a.0.cmp(&b.0));
            let mut got_sorted = got.clone();
            got_sorted.sort_by(|a, b| a.0.cmp(&b.0));
            if let Some(diff) = first_difference(&want_sorted, &got_sorted) {
                differing.push(format!("{name} {family}: {diff}"));
            }
        }
        compared += 1;
    }
    for d in &differing {
        println!("{d}");
    }
    assert!(compared >= 30, "only {compared} cases compared");
    assert!(differing.is_empty(), "{} differences from Kuma v2.14.3 (listed above)", differing.len());
}
