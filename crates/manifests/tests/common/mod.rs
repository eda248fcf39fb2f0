//! Test helpers: the real Helm CLI (built by scripts/helm-build.sh), kubernetes-validate
//! (PyPI), and comparison of rendered manifests as parsed YAML documents.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

pub fn chart_dir() -> PathBuf {
    repo_root().join("deployments/charts/kong-mesh-cni")
}

/// The Helm binary: `KMC_HELM`, else scripts/helm-build.sh (builds it on first use).
/// None (after saying so) when the developer skips heavy tests with KMC_SKIP_TESTENV.
pub fn helm() -> Option<&'static Path> {
    if testkit::skip_heavy("the real Helm CLI") {
        return None;
    }
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    Some(HELM.get_or_init(|| {
        if let Some(path) = std::env::var_os("KMC_HELM") {
            return PathBuf::from(path);
        }
        let script = repo_root().join("scripts/helm-build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .expect("running scripts/helm-build.sh");
        assert!(out.status.success(), "{} failed", script.display());
        PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().expect("a path").trim())
    }))
}

/// Runs helm with isolated config/cache dirs (nothing read from or written to $HOME).
pub fn helm_cmd(helm: &Path, args: &[&str]) -> Output {
    // In the target dir: a static TempDir is never dropped, so it would stay in /tmp.
    let home = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("helm-home");
    Command::new(helm)
        .args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env_remove("KUBECONFIG")
        .output()
        .expect("running helm")
}

/// `helm template kong-mesh-cni <chart> [-f preset] args...`: stdout, or the error text.
pub fn helm_template(helm: &Path, preset: Option<&str>, args: &[&str]) -> Result<String, String> {
    let chart = chart_dir();
    let preset_file = preset.map(|p| chart.join(format!("presets/{p}.yaml")).display().to_string());
    let mut argv = vec!["template", "kong-mesh-cni", chart.to_str().unwrap()];
    if let Some(f) = &preset_file {
        argv.extend(["-f", f.as_str()]);
    }
    argv.extend_from_slice(args);
    let out = helm_cmd(helm, &argv);
    match out.status.success() {
        true => Ok(String::from_utf8(out.stdout).unwrap()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

/// The objects of a multi-document stream keyed by kind/namespace/name (their order in
/// a stream carries no meaning beyond Helm's install order, checked separately).
pub fn objects(stream: &str) -> BTreeMap<String, serde_norway::Value> {
    let mut out = BTreeMap::new();
    for doc in serde_norway::Deserializer::from_str(stream) {
        let v = <serde_norway::Value as serde::Deserialize>::deserialize(doc).expect("valid YAML");
        if v.is_null() {
            continue;
        }
        let s = |path: &[&str]| {
            let mut cur = &v;
            for p in path {
                cur = cur.get(p).unwrap_or(&serde_norway::Value::Null);
            }
            cur.as_str().unwrap_or_default().to_owned()
        };
        let key = format!("{}/{}/{}", s(&["kind"]), s(&["metadata", "namespace"]), s(&["metadata", "name"]));
        assert!(out.insert(key.clone(), v).is_none(), "{key} appears twice");
    }
    out
}

/// The kinds in stream order.
pub fn kinds(stream: &str) -> Vec<String> {
    objects_in_order(stream).into_iter().map(|v| v["kind"].as_str().unwrap_or_default().to_owned()).collect()
}

pub fn objects_in_order(stream: &str) -> Vec<serde_norway::Value> {
    serde_norway::Deserializer::from_str(stream)
        .map(|d| <serde_norway::Value as serde::Deserialize>::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// Asserts two streams hold the same objects, naming the first difference.
pub fn assert_same_objects(ours: &str, helm: &str, what: &str) {
    let (a, b) = (objects(ours), objects(helm));
    let (ka, kb): (Vec<_>, Vec<_>) = (a.keys().collect(), b.keys().collect());
    assert_eq!(ka, kb, "{what}: different objects");
    for (k, v) in &a {
        if v != &b[k] {
            panic!(
                "{what}: {k} differs\n--- ours\n{}\n--- helm\n{}",
                serde_norway::to_string(v).unwrap(),
                serde_norway::to_string(&b[k]).unwrap()
            );
        }
    }
    assert_eq!(kinds(ours), kinds(helm), "{what}: install order differs");
}

/// kubernetes-validate: `KMC_KUBERNETES_VALIDATE`, else on PATH, else in .ci/run's
/// venv (~/.cache/kong-mesh-cni/ci-venv). None (after saying
/// so) outside CI when it is not installed; under CI its absence fails the test.
pub fn kubernetes_validate() -> Option<PathBuf> {
    // .ci/run installs it into this venv.
    let venv = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|c| c.join("kong-mesh-cni/ci-venv/bin/kubernetes-validate"));
    let found = std::env::var_os("KMC_KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths).map(|d| d.join("kubernetes-validate")).find(|p| p.is_file())
            })
        })
        .or_else(|| venv.filter(|p| p.is_file()));
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "kubernetes-validate is not installed (.ci/run installs requirements-ci.txt into ~/.cache/kong-mesh-cni/ci-venv)"
        );
        eprintln!(
            "SKIPPED: kubernetes-validate not found (pip install -r requirements-ci.txt, or set KMC_KUBERNETES_VALIDATE)"
        );
    }
    found
}

/// The image's OCI layout: `KMC_IMAGE` (a layout dir), else built once by
/// scripts/image-build.sh (which builds the release binary; cargo reuses it).
pub fn image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        if let Some(dir) = std::env::var_os("KMC_IMAGE") {
            return PathBuf::from(dir);
        }
        let script = repo_root().join("scripts/image-build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .expect("running scripts/image-build.sh");
        assert!(out.status.success(), "{} failed", script.display());
        PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().expect("a path").trim())
    })
}

/// A blob of the layout by digest (`sha256:...`), checked against its digest.
pub fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").unwrap_or_else(|| panic!("{digest}: not sha256"));
    let data = std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap_or_else(|e| panic!("blob {digest}: {e}"));
    let actual: String =
        ring::digest::digest(&ring::digest::SHA256, &data).as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(actual, hex, "blob {digest} does not match its digest");
    data
}

/// The layout's only manifest, its config and its layer (compressed), as JSON / bytes.
pub fn image_parts(layout: &Path) -> (serde_json::Value, serde_json::Value, Vec<u8>) {
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"].as_array().map(Vec::len), Some(1), "one image in the layout");
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(layout, index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&blob(layout, manifest["config"]["digest"].as_str().unwrap())).unwrap();
    assert_eq!(manifest["layers"].as_array().map(Vec::len), Some(1), "one layer");
    let layer = blob(layout, manifest["layers"][0]["digest"].as_str().unwrap());
    (manifest, config, layer)
}

/// Unpacks the image's filesystem into `dest` (as a container runtime would).
pub fn unpack_image(layout: &Path, dest: &Path) {
    let (_, _, layer) = image_parts(layout);
    let file = dest.with_extension("layer.tar.gz");
    std::fs::write(&file, layer).unwrap();
    let out = Command::new("tar").arg("-xzf").arg(&file).arg("-C").arg(dest).output().expect("running tar");
    std::fs::remove_file(&file).unwrap();
    assert!(out.status.success(), "tar: {}", String::from_utf8_lossy(&out.stderr));
}
