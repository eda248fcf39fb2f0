//! `kong-mesh-cni manifests` (the binary) prints what `helm template` (the real Helm,
//! built by scripts/helm-build.sh) prints for every preset, with `--set`, `-f` and
//! `--namespace`; refusals exit non-zero with the chart's message and print nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

const BIN: &str = env!("CARGO_BIN_EXE_kong-mesh-cni");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn chart_dir() -> PathBuf {
    repo().join("deployments/charts/kong-mesh-cni")
}

fn cli(args: &[&str]) -> Output {
    Command::new(BIN).arg("manifests").args(args).env_remove("CNI_COMMAND").output().unwrap()
}

fn helm() -> Option<&'static Path> {
    if testkit::skip_heavy("the real Helm CLI") {
        return None;
    }
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    Some(HELM.get_or_init(|| {
        if let Some(p) = std::env::var_os("KMC_HELM") {
            return p.into();
        }
        let out = Command::new("bash")
            .arg(repo().join("scripts/helm-build.sh"))
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(out.status.success(), "scripts/helm-build.sh failed");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().unwrap().trim())
    }))
}

fn helm_template(helm: &Path, args: &[&str]) -> String {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(helm)
        .args(["template", "kong-mesh-cni", chart_dir().to_str().unwrap()])
        .args(args)
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .unwrap();
    assert!(out.status.success(), "helm template {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Documents in order, parsed (comments and formatting are not compared).
fn docs(stream: &str) -> Vec<serde_norway::Value> {
    let mut docs = vec![String::new()];
    for line in stream.lines() {
        if line == "---" {
            docs.push(String::new());
        } else {
            docs.last_mut().unwrap().push_str(&format!("{line}\n"));
        }
    }
    docs.iter().map(|d| serde_norway::from_str::<serde_norway::Value>(d).unwrap()).filter(|v| !v.is_null()).collect()
}

fn key(v: &serde_norway::Value) -> String {
    let s = |v: &serde_norway::Value| v.as_str().unwrap_or_default().to_owned();
    format!("{}/{}/{}", s(&v["kind"]), s(&v["metadata"]["namespace"]), s(&v["metadata"]["name"]))
}

/// Same objects; same kinds in the same (install) order. Objects of one kind may come
/// in any order: Helm's order among them carries no meaning.
fn assert_same(cli_out: &str, helm_out: &str, what: &str) {
    let (a, b) = (docs(cli_out), docs(helm_out));
    let kinds = |d: &[serde_norway::Value]| {
        d.iter().map(|v| v["kind"].as_str().unwrap_or_default().to_owned()).collect::<Vec<_>>()
    };
    assert_eq!(kinds(&a), kinds(&b), "{what}: kinds or their order differ");
    let by_key = |d: Vec<serde_norway::Value>| d.into_iter().map(|v| (key(&v), v)).collect::<BTreeMap<_, _>>();
    let (a, b) = (by_key(a), by_key(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}: objects differ");
    for (k, v) in &a {
        assert!(
            v == &b[k],
            "{what}: {k} differs\nkong-mesh-cni manifests:\n{}\nhelm template:\n{}",
            serde_norway::to_string(v).unwrap(),
            serde_norway::to_string(&b[k]).unwrap()
        );
    }
}

fn presets() -> Vec<String> {
    let out = cli(&["--list-presets"]);
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().lines().map(|l| l.split_whitespace().next().unwrap().to_owned()).collect()
}

fn stdout_ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_preset_prints_what_helm_template_prints() {
    let Some(helm) = helm() else { return };
    let names = presets();
    assert_eq!(names.len(), 13, "{names:?}");
    for preset in &names {
        let file = chart_dir().join(format!("presets/{preset}.yaml"));
        let ours = stdout_ok(cli(&["--preset", preset]), preset);
        assert_same(&ours, &helm_template(helm, &["-f", file.to_str().unwrap()]), preset);
    }
    assert_same(&stdout_ok(cli(&[]), "defaults"), &helm_template(helm, &[]), "no preset: the chart's defaults");
}

#[test]
fn set_values_files_and_namespace_match_helm() {
    let Some(helm) = helm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("mine.yaml");
    std::fs::write(
        &values,
        "cni:\n  logLevel: debug\n  tolerations:\n    - key: gpu\n      operator: Exists\n      effect: NoSchedule\n",
    )
    .unwrap();
    let preset = |p: &str| chart_dir().join(format!("presets/{p}.yaml")).display().to_string();
    let cases: Vec<(Vec<String>, Vec<String>)> = vec![
        (
            vec![
                "--preset".into(),
                "cilium".into(),
                "--set".into(),
                "cni.taintController.enabled=false,cni.excludeNamespaces={kube-system,monitoring}".into(),
            ],
            vec![
                "-f".into(),
                preset("cilium"),
                "--set".into(),
                "cni.taintController.enabled=false,cni.excludeNamespaces={kube-system,monitoring}".into(),
            ],
        ),
        (
            vec![
                "--preset".into(),
                "eks".into(),
                "-f".into(),
                values.display().to_string(),
                "--set".into(),
                "cni.delayStartupSeconds=10".into(),
            ],
            vec![
                "-f".into(),
                preset("eks"),
                "-f".into(),
                values.display().to_string(),
                "--set".into(),
                "cni.delayStartupSeconds=10".into(),
            ],
        ),
        (
            vec![
                "--preset".into(),
                "openshift-4".into(),
                "--namespace".into(),
                "kong-mesh-cni".into(),
                "--set-string".into(),
                "cni.image.tag=2.9.1".into(),
            ],
            vec![
                "-f".into(),
                preset("openshift-4"),
                "--namespace".into(),
                "kong-mesh-cni".into(),
                "--set-string".into(),
                "cni.namespace=kong-mesh-cni,cni.image.tag=2.9.1".into(),
            ],
        ),
        (
            vec![
                "--preset".into(),
                "kind".into(),
                "--release-name".into(),
                "cni".into(),
                "--set".into(),
                "cni.controller.repairAction=off".into(),
            ],
            vec!["-f".into(), preset("kind"), "--set".into(), "cni.controller.repairAction=off".into()],
        ),
    ];
    for (ours_args, helm_args) in &cases {
        let ours_args: Vec<&str> = ours_args.iter().map(String::as_str).collect();
        let helm_args: Vec<&str> = helm_args.iter().map(String::as_str).collect();
        let mut ours = stdout_ok(cli(&ours_args), &format!("{ours_args:?}"));
        if ours_args.contains(&"--release-name") {
            // Helm's release name was kong-mesh-cni: the only difference is that label.
            assert!(ours.contains("app.kubernetes.io/instance: cni\n"));
            ours = ours.replace("app.kubernetes.io/instance: cni\n", "app.kubernetes.io/instance: kong-mesh-cni\n");
        }
        assert_same(&ours, &helm_template(helm, &helm_args), &format!("{ours_args:?}"));
    }
}

#[test]
fn the_cli_prints_the_library_rendering_in_helms_format() {
    let out = stdout_ok(cli(&["--preset", "kind"]), "kind");
    let opts = manifests::Options { preset: Some("kind".into()), ..manifests::Options::default() };
    assert_eq!(out, manifests::to_stream(&manifests::Chart::embedded().render(&opts).unwrap()));
    assert!(out.starts_with("---\n# Source: kong-mesh-cni/templates/"));
}

#[test]
fn refusals_exit_non_zero_with_the_reason_and_print_nothing() {
    let cases: &[(&[&str], u8, &str)] = &[
        (&["--preset", "minikube"], 2, "unknown preset \"minikube\" (presets: aks, aks-overlay,"),
        (&["--preset", "kind", "--set", "cni.logLevel"], 2, "has no value"),
        (&["--preset", "kind", "-f", "/nonexistent/values.yaml"], 2, "/nonexistent/values.yaml"),
        (
            &[
                "--preset",
                "kind",
                "--set",
                "experimental.ebpf.enabled=true,cni.containerSecurityContext.privileged=false",
            ],
            1,
            "experimental.ebpf.enabled=true needs cni.containerSecurityContext.privileged=true",
        ),
        (&["--preset", "kind", "--set", "cni.confName=kindnet"], 1, "must name the primary CNI's .conf or .conflist"),
    ];
    for (args, code, want) in cases {
        let out = cli(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(i32::from(*code)), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}: nothing half-rendered on stdout");
    }
}
