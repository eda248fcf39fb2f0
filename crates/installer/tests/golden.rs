//! Golden tests of chaining into real-world CNI configurations and of removal.
//!
//! Each dir under `tests/golden/` is one node's net dir: `input/` as the primary CNI
//! wrote it, `merged/` after the installer chained in (auto-detecting the file, the
//! default template or the case's `template.json`), `removed/` after SIGTERM. Removal
//! must give back `input/` byte for byte. `UPDATE_GOLDEN=1` rewrites `merged/` and
//! `removed/` (then review the diff).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use installer::plan::{self, FileOp, Plan, Snapshot};
use installer::template::{DEFAULT_TEMPLATE, Ours};
use serde_json::Value;

const KUBECONFIG: &str = "/etc/cni/net.d/ZZZ-kuma-cni-kubeconfig";

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut cases: Vec<PathBuf> =
        fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    cases.sort();
    cases
}

fn read_dir(dir: &Path) -> Snapshot {
    let mut snap = Snapshot::new();
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let entry = entry.unwrap();
        snap.insert(entry.file_name().into_string().unwrap(), Ok(fs::read(entry.path()).unwrap()));
    }
    snap
}

fn apply(mut snap: Snapshot, ops: &[FileOp]) -> Snapshot {
    for op in ops {
        match op {
            FileOp::Write { name, content } => snap.insert(name.clone(), Ok(content.clone().into_bytes())),
            FileOp::Remove { name } => snap.remove(name),
        };
    }
    snap
}

/// Compares `actual` with the files in `dir`, or writes them there under UPDATE_GOLDEN.
fn check(dir: &Path, actual: &Snapshot) {
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).unwrap();
        for (name, content) in actual {
            fs::write(dir.join(name), content.as_ref().unwrap()).unwrap();
        }
        return;
    }
    let expected = read_dir(dir);
    let text = |s: &Snapshot| -> BTreeMap<String, String> {
        s.iter().map(|(n, c)| (n.clone(), String::from_utf8_lossy(c.as_ref().unwrap()).into_owned())).collect()
    };
    assert_eq!(text(actual), text(&expected), "{} differs (UPDATE_GOLDEN=1 rewrites it)", dir.display());
}

fn ours_for(case: &Path) -> Ours {
    let template = fs::read_to_string(case.join("template.json")).unwrap_or_else(|_| DEFAULT_TEMPLATE.to_string());
    Ours::render(&template, KUBECONFIG).unwrap()
}

#[test]
fn chaining_into_real_world_configurations_and_back() {
    let cases = cases();
    assert!(cases.len() >= 10, "golden cases are missing");
    for case in cases {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let ours = ours_for(&case);
        let input = read_dir(&case.join("input"));

        let Plan::Apply { file, ops, .. } = plan::chain(None, &input, &ours) else {
            panic!("{name}: expected a write into the input");
        };
        let merged = apply(input.clone(), &ops);
        check(&case.join("merged"), &merged);

        // What the runtime now reads: a conflist whose last plugin is ours.
        let list: Value = serde_json::from_slice(merged[&file].as_ref().unwrap()).unwrap();
        let plugins = list["plugins"].as_array().unwrap();
        assert_eq!(plugins.last().unwrap()["type"], ours.binary.as_str(), "{name}");
        assert_eq!(plugins.iter().filter(|p| ours.is_ours(p)).count(), 1, "{name}: ours appears once");
        assert!(file.ends_with(".conflist"), "{name}: runtimes read a .conf as one plugin");
        // Idempotent: a second pass, or a restarted installer, finds it in place.
        assert!(plan::chain(None, &merged, &ours).is_in_place(), "{name}");

        let removed = apply(merged.clone(), &plan::unchain(None, &merged, &ours));
        check(&case.join("removed"), &removed);
        let had_ours = input.values().any(|c| String::from_utf8_lossy(c.as_ref().unwrap()).contains("kuma-cni\""));
        if !had_ours {
            assert_eq!(removed, input, "{name}: removal gives back the input byte for byte");
        }
    }
}

#[test]
fn merged_keeps_every_other_field_and_plugin_as_json() {
    for case in cases() {
        let ours = ours_for(&case);
        let input = read_dir(&case.join("input"));
        let merged = read_dir(&case.join("merged"));
        for (name, content) in &input {
            let original: Value = serde_json::from_slice(content.as_ref().unwrap()).unwrap();
            let list_name = if name.ends_with(".conf") { format!("{name}list") } else { name.clone() };
            let Some(Ok(list)) = merged.get(&list_name) else { continue };
            let list: Value = serde_json::from_slice(list).unwrap();
            let others: Vec<&Value> = list["plugins"].as_array().unwrap().iter().filter(|p| !ours.is_ours(p)).collect();
            match name.ends_with(".conf") {
                true => {
                    assert_eq!(others, [&original], "{name}: the .conf is the first plugin, unchanged");
                    assert_eq!(list["cniVersion"], original["cniVersion"], "{name}");
                }
                false => {
                    let kept: Vec<&Value> =
                        original["plugins"].as_array().unwrap().iter().filter(|p| !ours.is_ours(p)).collect();
                    assert_eq!(others, kept, "{name}: plugins and their order");
                    let strip = |v: &Value| {
                        let mut v = v.clone();
                        v.as_object_mut().unwrap().remove("plugins");
                        v
                    };
                    assert_eq!(strip(&list), strip(&original), "{name}: top-level fields");
                }
            }
        }
    }
}
