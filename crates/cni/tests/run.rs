//! `cni::plugin::run` driven directly (environment and stdin in, stdout and exit code
//! out): the answers that need no API server and no network namespace.

use cni::proto::code;
use serde_json::{Value, json};

/// A scratch dir for the plugin's log file; the log socket named there does not exist.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new() -> Scratch {
        Scratch(tempfile::tempdir().unwrap())
    }

    /// Our conf as the installer writes it, chained after a bridge plugin's result.
    /// `on_api_error: fail` and a kubeconfig that does not exist: any pod lookup fails.
    fn conf(&self, extra: Value) -> Vec<u8> {
        let dir = self.0.path();
        let mut conf = json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "kuma-cni",
            "log_file": dir.join("cni.log"),
            "log_socket": dir.join("no.sock"),
            "run_dir": dir,
            "on_api_error": "fail",
            "kubernetes": {"kubeconfig": dir.join("missing-kubeconfig"), "exclude_namespaces": ["kube-system"]},
            "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": [{"address": "10.0.0.5/24", "interface": 0}]}
        });
        for (k, v) in extra.as_object().unwrap() {
            conf[k] = v.clone();
        }
        serde_json::to_vec(&conf).unwrap()
    }
}

fn run(vars: &[(&str, &str)], stdin: &[u8]) -> (Value, u8) {
    let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let out = cni::plugin::run(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()), stdin);
    let stdout = if out.stdout.is_empty() { Value::Null } else { serde_json::from_str(&out.stdout).unwrap() };
    (stdout, out.exit_code)
}

fn add_env<'a>(namespace: &'a str, netns: &'a str) -> Vec<(&'static str, String)> {
    vec![
        ("CNI_COMMAND", "ADD".into()),
        ("CNI_CONTAINERID", "c0ffee".into()),
        ("CNI_NETNS", netns.into()),
        ("CNI_IFNAME", "eth0".into()),
        ("CNI_ARGS", format!("K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=web-0")),
    ]
}

fn refs<'a>(vars: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    vars.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[test]
fn version_needs_no_configuration() {
    let (out, code) = run(&[("CNI_COMMAND", "VERSION")], b"");
    assert_eq!(code, 0);
    let supported: Vec<&str> =
        out["supportedVersions"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(supported.contains(&"0.3.1") && supported.contains(&"1.1.0"), "{out}");
}

#[test]
fn a_bad_configuration_is_a_cni_error_naming_it() {
    let vars = add_env("shop", "/proc/self/ns/net");
    let (out, code) = run(&refs(&vars), b"{not json");
    assert_eq!(code, 1);
    assert_eq!(out["code"], code::DECODE, "{out}");
    let s = Scratch::new();
    let (out, code) = run(&refs(&vars), &s.conf(json!({"on_api_error": "sometimes"})));
    assert_eq!(code, 1);
    assert_eq!(out["code"], code::INVALID_CONFIG, "{out}");
    assert!(out["details"].as_str().unwrap().contains("on_api_error"), "{out}");
    // The error is written in the caller's version.
    assert_eq!(out["cniVersion"], "1.0.0");
}

#[test]
fn excluded_namespaces_pass_through_without_a_lookup() {
    let s = Scratch::new();
    // A lookup would fail (no kubeconfig, on_api_error: fail); the namespace is excluded first.
    let (out, code) = run(&refs(&add_env("kube-system", "/nonexistent/netns")), &s.conf(json!({})));
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["ips"][0]["address"], "10.0.0.5/24", "the previous result is passed on: {out}");
    // The same pod elsewhere does need the lookup, which fails as configured.
    let (out, code) = run(&refs(&add_env("shop", "/nonexistent/netns")), &s.conf(json!({})));
    assert_eq!((code, out["code"].as_u64()), (1, Some(u64::from(code::TRY_AGAIN_LATER))), "{out}");
}

#[test]
fn del_never_fails_over_the_namespace() {
    let s = Scratch::new();
    let file = s.0.path().join("not-a-netns");
    std::fs::write(&file, "").unwrap();
    for netns in ["", "/nonexistent/netns", file.to_str().unwrap()] {
        let vars =
            [("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "c0ffee"), ("CNI_IFNAME", "eth0"), ("CNI_NETNS", netns)];
        let (out, code) = run(&vars, &s.conf(json!({})));
        assert_eq!((code, out), (0, Value::Null), "DEL with CNI_NETNS={netns:?}");
    }
}
