//! `kong-mesh-cni rules` as people and scripts use it: the real binary, real files and,
//! for --apply/--verify/--remove, real namespaces.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use testkit::net::{NamedNetns, require_root};

const BIN: &str = env!("CARGO_BIN_EXE_kong-mesh-cni");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn run(args: &[&str], run_dir: &Path) -> Output {
    Command::new(BIN).args(args).env("KMC_RUN_DIR", run_dir).env_remove("CNI_COMMAND").output().unwrap()
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

fn check_golden(name: &str, got: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(got, want, "golden {} differs (UPDATE_GOLDEN=1 to accept)", path.display());
}

/// The pod fixture with extra annotations, written to a temp file.
fn pod_with(dir: &Path, extra: &[(&str, &str)]) -> PathBuf {
    let mut text = std::fs::read_to_string(fixture("mesh-pod.yaml")).unwrap();
    for (k, v) in extra {
        let kept: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with(&format!("{k}:"))).collect();
        text = kept.join("\n").replacen("  annotations:\n", &format!("  annotations:\n    {k}: {v:?}\n"), 1);
    }
    let path = dir.join(format!("pod-{}.yaml", extra.len()));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn prints_the_decision_and_payloads_deterministically() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(&["rules", "--pod", fixture("mesh-pod.yaml").to_str().unwrap()], tmp.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    check_golden("rules-mesh-pod.txt", &text(&out.stdout));
    let again = run(&["rules", "--pod", fixture("mesh-pod.yaml").to_str().unwrap()], tmp.path());
    assert_eq!(out.stdout, again.stdout, "the output is deterministic");

    // The same pod as JSON (what `kubectl get pod -o json` prints) gives the same output.
    let yaml: serde_json::Value = {
        let text = std::fs::read_to_string(fixture("mesh-pod.yaml")).unwrap();
        let pod: k8s_openapi::api::core::v1::Pod = serde_norway::from_str(&text).unwrap();
        serde_json::to_value(pod).unwrap()
    };
    let json_path = tmp.path().join("pod.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&yaml).unwrap()).unwrap();
    let from_json = run(&["rules", "--pod", json_path.to_str().unwrap()], tmp.path());
    assert_eq!(text(&from_json.stdout), text(&out.stdout));

    let v4_only = run(&["rules", "--pod", fixture("mesh-pod.yaml").to_str().unwrap(), "--ipv6=false"], tmp.path());
    assert!(!text(&v4_only.stdout).contains("# ipv6"));
}

#[test]
fn a_pod_that_is_not_ours_passes_through() {
    let tmp = tempfile::tempdir().unwrap();
    let text_in =
        std::fs::read_to_string(fixture("mesh-pod.yaml")).unwrap().replace("name: kuma-sidecar", "name: other");
    let path = tmp.path().join("plain.yaml");
    std::fs::write(&path, text_in).unwrap();
    let out = run(&["rules", "--pod", path.to_str().unwrap()], tmp.path());
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "pod shop/web-7d4b9c: pass through (the pod has no kuma-sidecar container)\n");
}

#[test]
fn unreadable_input_is_a_named_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(&["rules", "--pod", "/nonexistent/pod.yaml"], tmp.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/pod.yaml"), "{}", text(&out.stderr));
    let garbage = tmp.path().join("garbage.yaml");
    std::fs::write(&garbage, "spec: [this is not, a pod").unwrap();
    let out = run(&["rules", "--pod", garbage.to_str().unwrap()], tmp.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("is not a Pod object"), "{}", text(&out.stderr));
}

fn saved_rules(ns: &NamedNetns) -> String {
    let mut all = String::new();
    for tool in ["iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"] {
        all.push_str(&ns.exec(tool, &[]));
    }
    all.lines().filter(|l| l.starts_with("-A") || l.starts_with(':')).collect::<Vec<_>>().join("\n")
}

/// Every invalid value: exit 2, the message names annotation, field and value, and the
/// namespace is left exactly as it was (nothing half-applied).
#[test]
fn invalid_annotations_fail_without_touching_the_namespace() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ns = NamedNetns::new("clibad");
    let cases: &[(&str, &str, &str)] = &[
        ("kuma.io/transparent-proxying-inbound-port", "0", "redirect.inbound.port"),
        ("kuma.io/transparent-proxying-outbound-port", "65536", "redirect.outbound.port"),
        ("traffic.kuma.io/exclude-inbound-ports", "80,http", "redirect.inbound.excludePorts"),
        ("traffic.kuma.io/exclude-outbound-ips", "10.0.0.0/40", "redirect.outbound.excludePortsForIPs"),
        ("traffic.kuma.io/exclude-outbound-ports-for-uids", "tcp:80:9-1", "redirect.outbound.excludePortsForUIDs"),
        ("kuma.io/sidecar-uid", "kuma-dp", "kumaDPUser"),
        ("traffic.kuma.io/transparent-proxy-config", "redirect: {inbound: [", "(document)"),
    ];
    for (annotation, value, field) in cases {
        let pod = pod_with(tmp.path(), &[(annotation, value)]);
        for action in ["--apply", "--verify", "--remove"] {
            let out = run(&["rules", "--pod", pod.to_str().unwrap(), "--netns", &ns.path(), action], tmp.path());
            assert_eq!(out.status.code(), Some(2), "{annotation}={value} {action}");
            let err = text(&out.stderr);
            assert!(err.contains(annotation) && err.contains(field) && err.contains(value), "{err}");
        }
    }
    let many: String = (1..=10_000).map(|p| p.to_string()).collect::<Vec<_>>().join(",");
    let pod = pod_with(tmp.path(), &[("traffic.kuma.io/exclude-outbound-ports", &many)]);
    let out = run(&["rules", "--pod", pod.to_str().unwrap(), "--netns", &ns.path(), "--apply"], tmp.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("10000 entries"), "{}", text(&out.stderr));
    assert_eq!(saved_rules(&ns), "", "the namespace was touched");
}

#[test]
fn apply_verify_remove_round_trip() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ns = NamedNetns::new("cliarv");
    let pod = fixture("mesh-pod.yaml");
    let pod = pod.to_str().unwrap();
    let act = |action: &str| {
        run(&["rules", "--pod", pod, "--netns", &ns.path(), action, "--iptables-backend", "legacy"], tmp.path())
    };

    let out = act("--apply");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("with iptables-legacy"), "{}", text(&out.stdout));
    assert!(act("--verify").status.success());

    ns.exec("iptables-legacy", &["-t", "nat", "-F", "KUMA_MESH_INBOUND_REDIRECT"]);
    let out = act("--verify");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("missing ipv4: -t nat -A KUMA_MESH_INBOUND_REDIRECT -p tcp"),
        "{}",
        text(&out.stdout)
    );

    let out = act("--remove");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!saved_rules(&ns).contains("KUMA") && !saved_rules(&ns).contains("kuma/"), "{}", saved_rules(&ns));
    assert!(
        std::fs::read_dir(tmp.path()).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".lock"))
    );
}

#[test]
fn a_pass_through_pod_leaves_the_namespace_alone() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ns = NamedNetns::new("clipass");
    let text_in = std::fs::read_to_string(fixture("mesh-pod.yaml")).unwrap().replace("\"true\"", "\"false\"");
    let path = tmp.path().join("not-injected.yaml");
    std::fs::write(&path, text_in).unwrap();
    let out = run(&["rules", "--pod", path.to_str().unwrap(), "--netns", &ns.path(), "--apply"], tmp.path());
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("pass through"), "{}", text(&out.stdout));
    assert_eq!(saved_rules(&ns), "");
}

#[test]
fn prints_the_native_tables_as_nft_lists_them_and_acts_with_them() {
    let tmp = tempfile::tempdir().unwrap();
    let pod = fixture("mesh-pod.yaml");
    let args = ["rules", "--pod", pod.to_str().unwrap(), "--iptables-backend", "nftables"];
    let out = run(&args, tmp.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    check_golden("rules-mesh-pod.nft.txt", &text(&out.stdout));
    assert_eq!(run(&args, tmp.path()).stdout, out.stdout, "the output is deterministic");
    if !require_root() {
        return;
    }
    let ns = NamedNetns::new("clnf");
    let path = ns.path();
    let act = |action: &str| run(&[&args[..], &["--netns", &path, action]].concat(), tmp.path());
    let applied = act("--apply");
    assert!(applied.status.success(), "{}", text(&applied.stderr));
    assert!(text(&applied.stdout).contains("with nftables"), "{}", text(&applied.stdout));
    assert!(act("--verify").status.success());
    ns.exec("nft", &["flush", "chain", "ip", "kuma_mesh", "KUMA_MESH_INBOUND_REDIRECT"]);
    let verified = act("--verify");
    assert_eq!(verified.status.code(), Some(1));
    assert!(text(&verified.stdout).contains("missing ipv4: rule ip kuma_mesh KUMA_MESH_INBOUND_REDIRECT"));
    let removed = act("--remove");
    assert!(text(&removed.stdout).contains("ipv4 (nftables)"), "{}", text(&removed.stdout));
    assert!(!ns.exec("nft", &["list", "tables"]).contains("kuma_mesh"));
}
