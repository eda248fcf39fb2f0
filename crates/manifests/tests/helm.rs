//! The renderer against the real Helm: every preset and a set of overrides render to
//! the same objects in the same install order, failures fail in both with the same
//! message, `helm lint --strict` passes for every preset, every rendered object is
//! valid against the Kubernetes schemas (kubernetes-validate --strict), and an umbrella
//! chart that adds this one as `alias: kuma` takes `kuma.cni.*` values.

mod common;

use std::time::Instant;

use common::*;
use manifests::{Chart, Options, to_stream};

fn ours(preset: Option<&str>, set: &[&str]) -> Result<String, String> {
    let opts = Options {
        preset: preset.map(Into::into),
        set: set.iter().map(|s| s.to_string()).collect(),
        ..Options::default()
    };
    Chart::embedded().render(&opts).map(|m| to_stream(&m)).map_err(|e| e.to_string())
}

fn helm_args(set: &[&str]) -> Vec<String> {
    set.iter().flat_map(|s| ["--set".to_string(), s.to_string()]).collect()
}

fn presets() -> Vec<String> {
    Chart::embedded().presets().into_iter().map(|(n, _)| n).collect()
}

#[test]
fn the_thirteen_presets_are_there() {
    let want = [
        "aks",
        "aks-overlay",
        "calico",
        "cilium",
        "cilium-pre-1.14",
        "eks",
        "gke-calico",
        "gke-cilium",
        "gke-dataplane-v2",
        "k3d-flannel",
        "kind",
        "openshift-3.11",
        "openshift-4",
    ];
    let mut names = presets();
    names.sort();
    assert_eq!(names, want);
}

#[test]
fn every_preset_renders_as_helm_renders_it() {
    let Some(helm) = helm() else { return };
    let mut report = Vec::new();
    for preset in std::iter::once(None).chain(presets().iter().map(|p| Some(p.as_str()))) {
        let started = Instant::now();
        let mine = ours(preset, &[]).unwrap();
        let ours_time = started.elapsed();
        let started = Instant::now();
        let theirs = helm_template(helm, preset, &[]).unwrap();
        let helm_time = started.elapsed();
        assert_same_objects(&mine, &theirs, preset.unwrap_or("chart defaults"));
        report.push(format!(
            "{:<18} ours {:>8.2?}  helm template {:>8.2?}",
            preset.unwrap_or("(defaults)"),
            ours_time,
            helm_time
        ));
    }
    eprintln!("render time per preset:\n  {}", report.join("\n  "));
}

/// Overrides that exercise every branch of the templates.
const OVERRIDES: &[(&str, &[&str])] = &[
    ("kind", &["cni.logLevel=debug", "cni.onApiError=fail"]),
    (
        "kind",
        &[
            "cni.tolerations[0].key=dedicated",
            "cni.tolerations[0].operator=Exists",
            "cni.tolerations[0].effect=NoSchedule",
        ],
    ),
    ("eks", &["cni.excludeNamespaces={kube-system,monitoring,istio-system}"]),
    ("eks", &["cni.excludeNamespaces=null"]),
    ("calico", &["cni.delayStartupSeconds=5", "cni.taintController.enabled=false"]),
    ("cilium", &["cni.controller.repairAction=label", "cni.controller.replicas=2"]),
    ("cilium", &["cni.controller.repairAction=off"]),
    ("aks", &["cni.image.registry=", "cni.image.tag=1.2.3", "cni.image.pullPolicy=Always"]),
    ("aks", &["cni.image.registry=registry.example.com/mirror/", "cni.nodeSelector=null"]),
    ("gke-cilium", &["cni.containerSecurityContext.readOnlyRootFilesystem=false", "cni.podSecurityContext.fsGroup=0"]),
    ("openshift-4", &["cni.namespace=kong-mesh-system", "cni.resources.limits=null"]),
    ("kind", &["cni.confName=", "cni.controller.tolerations[0].operator=Exists"]),
    ("kind", &["cni.enabled=false"]),
    ("kind", &["experimental.ebpf.enabled=true"]),
    (
        "kind",
        &[
            "cni.metrics.podMonitor.enabled=true",
            "cni.metrics.podMonitor.labels.release=prometheus",
            "cni.metrics.dashboard.enabled=true",
        ],
    ),
    (
        "calico",
        &[
            "experimental.ebpf.enabled=true",
            "experimental.ebpf.bpffsPath=/run/bpf",
            "experimental.ebpf.cgroupPath=/sys/fs/cgroup/unified",
        ],
    ),
    (
        "k3d-flannel",
        &[
            "cni.controller.nodeSelector.pool=system",
            "cni.controller.resources.requests.cpu=10m",
            "cni.resources.requests.memory=64Mi",
        ],
    ),
];

#[test]
fn overrides_render_as_helm_renders_them() {
    let Some(helm) = helm() else { return };
    for (preset, set) in OVERRIDES {
        let what = format!("{preset} {set:?}");
        let args = helm_args(set);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let theirs = helm_template(helm, Some(preset), &args).unwrap_or_else(|e| panic!("{what}: helm: {e}"));
        let mine = ours(Some(preset), set).unwrap_or_else(|e| panic!("{what}: ours: {e}"));
        assert_same_objects(&mine, &theirs, &what);
    }
    // --set-string and the namespace as Helm's release namespace too.
    let theirs = helm_template(
        helm,
        Some("kind"),
        &["--namespace", "mesh-cni", "--set-string", "cni.namespace=mesh-cni,cni.logLevel=debug"],
    )
    .unwrap();
    let opts = Options {
        preset: Some("kind".into()),
        namespace: Some("mesh-cni".into()),
        set_string: vec!["cni.logLevel=debug".into()],
        ..Options::default()
    };
    assert_same_objects(&to_stream(&Chart::embedded().render(&opts).unwrap()), &theirs, "--namespace");
}

#[test]
fn refusals_are_the_same_in_both() {
    let Some(helm) = helm() else { return };
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "kind",
            &["experimental.ebpf.enabled=true", "cni.containerSecurityContext.privileged=false"],
            "needs cni.containerSecurityContext.privileged=true",
        ),
        ("kind", &["cni.confName=10-kindnet.json"], "must name the primary CNI's .conf or .conflist"),
        ("kind", &["cni.controller.repairAction=restart"], "must be delete, label or off"),
        ("kind", &["cni.netDir="], "cni.netDir is required"),
        ("kind", &["cni.onApiError=passthrough"], "must be pass-through or fail"),
        ("kind", &["cni.logLevel=verbose"], "must be off, info or debug"),
        ("kind", &["cni.image.repository="], "cni.image.repository is required"),
        ("kind", &["cni.metrics.podMonitor.enabled=true", "cni.healthPort=0"], "needs cni.healthPort"),
    ];
    for (preset, set, want) in cases {
        let args = helm_args(set);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let theirs = helm_template(helm, Some(preset), &args).expect_err("helm must refuse");
        let mine = ours(Some(preset), set).expect_err("ours must refuse");
        assert!(theirs.contains(want), "helm {set:?}: {theirs}");
        assert!(mine.contains(want), "ours {set:?}: {mine}");
        // The same message after Helm's "execution error at (file:line:col): ".
        let tail = |s: &str| {
            s.lines().find(|l| l.contains(want)).and_then(|l| l.split_once("): ")).map(|(_, m)| m.trim().to_owned())
        };
        assert_eq!(tail(&mine), tail(&theirs), "{set:?}");
    }
}

#[test]
fn helm_lint_passes_strictly_for_every_preset() {
    let Some(helm) = helm() else { return };
    let chart = chart_dir();
    let out = helm_cmd(helm, &["lint", "--strict", chart.to_str().unwrap()]);
    assert!(out.status.success(), "helm lint (defaults):\n{}", String::from_utf8_lossy(&out.stdout));
    for preset in presets() {
        let file = chart.join(format!("presets/{preset}.yaml"));
        let out = helm_cmd(helm, &["lint", "--strict", chart.to_str().unwrap(), "-f", file.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "helm lint {preset}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_rendered_object_is_valid_against_the_kubernetes_schemas() {
    let Some(validate) = kubernetes_validate() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for preset in presets() {
        let path = dir.path().join(format!("{preset}.yaml"));
        std::fs::write(&path, ours(Some(&preset), &[]).unwrap()).unwrap();
        files.push(path);
    }
    for (i, (preset, set)) in OVERRIDES.iter().enumerate() {
        let path = dir.path().join(format!("override-{i}.yaml"));
        std::fs::write(&path, ours(Some(preset), set).unwrap()).unwrap();
        files.push(path);
    }
    let out = std::process::Command::new(&validate)
        .args(["--strict", "--quiet"])
        .args(&files)
        .output()
        .expect("running kubernetes-validate");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kubernetes-validate --strict failed:\n{text}");
    // It must really have looked at them: one verdict per object when not --quiet.
    let out = std::process::Command::new(&validate).arg("--strict").arg(&files[0]).output().unwrap();
    let passed = String::from_utf8_lossy(&out.stdout).matches("passed for resource").count();
    let objects = objects(&std::fs::read_to_string(&files[0]).unwrap()).len();
    assert_eq!(passed, objects, "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn an_umbrella_chart_maps_kuma_cni_values_onto_ours() {
    let Some(helm) = helm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let umbrella = dir.path().join("umbrella");
    std::fs::create_dir_all(&umbrella).unwrap();
    std::fs::write(
        umbrella.join("Chart.yaml"),
        format!(
            "apiVersion: v2\nname: umbrella\nversion: 0.0.1\ndependencies:\n  - name: kong-mesh-cni\n    version: \"0.1.0\"\n    repository: \"file://{}\"\n    alias: kuma\n    condition: kuma.cni.enabled\n",
            chart_dir().display()
        ),
    )
    .unwrap();
    std::fs::write(umbrella.join("values.yaml"), "kuma:\n  cni:\n    enabled: true\n").unwrap();
    let out = helm_cmd(helm, &["dependency", "build", umbrella.to_str().unwrap()]);
    assert!(out.status.success(), "helm dependency build: {}", String::from_utf8_lossy(&out.stderr));
    let template = |set: &[&str]| {
        let mut argv = vec!["template", "kong-mesh-cni", umbrella.to_str().unwrap()];
        argv.extend_from_slice(set);
        let out = helm_cmd(helm, &argv);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let via_umbrella = template(&[
        "--set",
        "kuma.cni.chained=true,kuma.cni.netDir=/etc/cni/net.d,kuma.cni.binDir=/opt/cni/bin,kuma.cni.confName=10-calico.conflist",
    ]);
    let direct = ours(
        None,
        &["cni.chained=true,cni.netDir=/etc/cni/net.d,cni.binDir=/opt/cni/bin,cni.confName=10-calico.conflist"],
    )
    .unwrap();
    assert_same_objects(&direct, &via_umbrella, "umbrella kuma.cni.*");
    assert!(
        objects(&template(&["--set", "kuma.cni.enabled=false"])).is_empty(),
        "kuma.cni.enabled=false installs nothing"
    );
    let ebpf = template(&["--set", "kuma.experimental.ebpf.enabled=true"]);
    assert_same_objects(
        &ours(None, &["experimental.ebpf.enabled=true"]).unwrap(),
        &ebpf,
        "umbrella kuma.experimental.ebpf.enabled",
    );
    assert!(ebpf.contains("KMC_EBPF"), "kuma.experimental.ebpf.enabled reaches the chart");
}
