//! Embeds the chart (deployments/charts/kong-mesh-cni) so that `kong-mesh-cni
//! manifests` renders the very files Helm renders: one source of truth.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let chart =
        manifest_dir.join("../../deployments/charts/kong-mesh-cni").canonicalize().expect("the chart dir exists");
    println!("cargo:rerun-if-changed={}", chart.display());
    let mut files = Vec::new();
    walk(&chart, &chart, &mut files);
    files.sort();
    let mut out = String::from(
        "/// The chart's files: (path relative to the chart dir, content).\npub static FILES: &[(&str, &str)] = &[\n",
    );
    for (rel, abs) in files {
        println!("cargo:rerun-if-changed={}", abs.display());
        writeln!(out, "    ({rel:?}, include_str!({:?})),", abs.display().to_string()).unwrap();
    }
    out.push_str("];\n");
    let dest = PathBuf::from(std::env::var_os("OUT_DIR").unwrap()).join("chart_files.rs");
    std::fs::write(dest, out).unwrap();
}

fn walk(root: &Path, dir: &Path, files: &mut Vec<(String, PathBuf)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            println!("cargo:rerun-if-changed={}", path.display());
            walk(root, &path, files);
        } else {
            let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            // Editor leftovers are not part of the chart (.helmignore says the same).
            if rel.ends_with(".swp") || rel.ends_with(".orig") || rel.ends_with('~') {
                continue;
            }
            files.push((rel, path));
        }
    }
}
