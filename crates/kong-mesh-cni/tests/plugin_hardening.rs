//! What a pod, a configuration or a runtime can hand the plugin that must not hurt the
//! node: host files named by a pod, special files where files are expected, names that
//! are not names, requests that cannot be built, and fields DEL cannot read. The real
//! binary, a real API server, real namespaces; each case bounded in time so that a
//! hang fails the test instead of stalling it.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testkit::net::NamedNetns;
use testkit::{ApiServer, TestNamespace, policy_rule};

const BIN: &str = env!("CARGO_BIN_EXE_kong-mesh-cni");

struct Fixture {
    ns: TestNamespace,
    kubeconfig: std::path::PathBuf,
    scratch: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let api = ApiServer::shared();
    let ns = api.namespace("kmc-harden").await;
    let kubeconfig = api.service_account_kubeconfig(ns.name(), "kong-mesh-cni").await;
    ns.grant("kong-mesh-cni", "kong-mesh-cni-plugin", vec![policy_rule(&[""], &["pods"], &["get"])]).await;
    Fixture { ns, kubeconfig, scratch: tempfile::tempdir().unwrap() }
}

async fn mesh_pod(ns: &TestNamespace, name: &str, annotations: &[(&str, &str)]) {
    let mut p = testkit::mesh_pod(name);
    for (k, v) in annotations {
        p = p.annotation(k, v);
    }
    ns.create_pod(p.build()).await;
}

fn conf(f: &Fixture, extra: Value) -> Value {
    let mut c = json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "kong-mesh-cni",
        "log_level": "debug",
        "log_file": f.scratch.path().join("cni.log"), "log_socket": f.scratch.path().join("none.sock"),
        "run_dir": f.scratch.path().join("run"),
        "kubernetes": {"kubeconfig": f.kubeconfig},
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.1.2.3/24"}]},
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

struct Answer {
    out: Value,
    code: Option<i32>,
    took: Duration,
}

/// Runs the binary as a runtime does; kills it (and fails) after `limit`.
fn invoke(command: &str, netns: &str, args: &str, stdin: &Value, limit: Duration) -> Answer {
    let mut child = Command::new(BIN)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "harden-0123")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .env("CNI_PATH", "/nonexistent")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.to_string().as_bytes()).unwrap();
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command} {args} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed();
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let out = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() };
    Answer { out, code: output.status.code(), took }
}

fn mkfifo(path: &Path) {
    assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
}

fn saved_rules(ns: &NamedNetns) -> String {
    ["iptables-nft-save", "iptables-legacy-save", "ip6tables-nft-save", "ip6tables-legacy-save"]
        .iter()
        .map(|t| ns.exec(t, &[]))
        .collect()
}

const LIMIT: Duration = Duration::from_secs(20);

/// Item 1: `redirect.dns.resolvConfigPath` names a host file; only the files the plugin
/// configuration allows are read, and only if they are small regular files.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_cannot_make_the_plugin_read_host_files() {
    if testkit::skip_privileged("resolvConfigPath") {
        return;
    }
    let f = fixture().await;
    let fifo = f.scratch.path().join("resolv.fifo");
    mkfifo(&fifo);
    let big = f.scratch.path().join("big.conf");
    std::fs::write(&big, "nameserver 10.0.0.1\n".repeat(10_000)).unwrap();
    let custom = f.scratch.path().join("resolv.conf");
    std::fs::write(&custom, "nameserver 10.77.0.53\n").unwrap();
    let allowed = json!({"dns_resolv_conf_paths": ["/etc/resolv.conf", fifo, big, custom]});
    let netns = NamedNetns::new("hdns");
    let cases: [(&str, &Path, bool, &str); 5] = [
        ("zero", Path::new("/dev/zero"), true, "character device"),
        ("shadow", Path::new("/etc/shadow"), false, "not one of the files the node allows"),
        ("dotdot", Path::new("/etc/../etc/resolv.conf"), false, "not one of the files the node allows"),
        ("fifo", &fifo, true, "FIFO, not a regular file"),
        ("big", &big, true, "larger than 65536 bytes"),
    ];
    for (name, path, allow, why) in cases {
        let yaml = format!(
            "redirect:\n  dns:\n    enabled: true\n    captureAll: false\n    resolvConfigPath: {}\n",
            path.display()
        );
        mesh_pod(&f.ns, name, &[("traffic.kuma.io/transparent-proxy-config", &yaml)]).await;
        let mut extra = json!({});
        if allow {
            extra = allowed.clone();
            extra["dns_resolv_conf_paths"].as_array_mut().unwrap().push(json!(path));
        }
        let args = format!("K8S_POD_NAMESPACE={};K8S_POD_NAME={name}", f.ns.name());
        let a = invoke("ADD", &netns.path(), &args, &conf(&f, extra), LIMIT);
        assert_eq!(a.code, Some(1), "{name}: {}", a.out);
        assert_eq!(a.out["code"], 7, "{name}: {}", a.out);
        let text = a.out.to_string();
        assert!(text.contains("traffic.kuma.io/transparent-proxy-config"), "{name}: {text}");
        assert!(text.contains("resolvConfigPath") && text.contains(&path.display().to_string()), "{name}: {text}");
        assert!(text.contains(why), "{name}: {text}");
        assert!(a.took < Duration::from_secs(5), "{name}: took {:?}", a.took);
        assert_eq!(saved_rules(&netns).matches("KUMA").count(), 0, "{name}: nothing half-applied");
    }
    // An allowed small regular file is read: its nameserver is in the rules.
    let yaml = format!(
        "redirect:\n  dns:\n    enabled: true\n    captureAll: false\n    resolvConfigPath: {}\n",
        custom.display()
    );
    mesh_pod(&f.ns, "custom", &[("traffic.kuma.io/transparent-proxy-config", &yaml)]).await;
    let args = format!("K8S_POD_NAMESPACE={};K8S_POD_NAME=custom", f.ns.name());
    let a = invoke("ADD", &netns.path(), &args, &conf(&f, allowed.clone()), LIMIT);
    assert_eq!(a.code, Some(0), "{}", a.out);
    assert!(saved_rules(&netns).contains("10.77.0.53"), "the allowed file's nameserver is used");
    assert_eq!(invoke("DEL", &netns.path(), &args, &conf(&f, allowed), LIMIT).code, Some(0));
}

/// Item 8: DEL succeeds, and removes our rules, whatever our fields say.
#[tokio::test(flavor = "multi_thread")]
async fn del_succeeds_with_invalid_fields_of_ours() {
    if testkit::skip_privileged("DEL with invalid fields") {
        return;
    }
    let f = fixture().await;
    mesh_pod(&f.ns, "web", &[]).await;
    let netns = NamedNetns::new("hdel");
    let args = format!("K8S_POD_NAMESPACE={};K8S_POD_NAME=web", f.ns.name());
    assert_eq!(invoke("ADD", &netns.path(), &args, &conf(&f, json!({})), LIMIT).code, Some(0));
    assert!(saved_rules(&netns).contains("KUMA_MESH_OUTBOUND"));
    for bad in [
        json!({"iptables_backend": "bogus"}),
        json!({"on_api_error": "maybe"}),
        json!({"kubernetes": {"lookup_timeout_ms": 0}}),
        json!({"dns_resolv_conf_paths": "relative"}),
    ] {
        let a = invoke("DEL", &netns.path(), &args, &conf(&f, bad.clone()), LIMIT);
        assert_eq!((a.code, &a.out), (Some(0), &Value::Null), "DEL with {bad}");
    }
    assert!(!saved_rules(&netns).contains("KUMA_MESH"), "the first DEL removed our rules with the defaults");
    // ADD still refuses them.
    let a = invoke("ADD", &netns.path(), &args, &conf(&f, json!({"iptables_backend": "bogus"})), LIMIT);
    assert_eq!(a.out["code"], 7, "{}", a.out);
}

/// Item 12: a FIFO, a device or a huge file where the namespace, the kubeconfig or the
/// log file should be: an answer at once, never a hang or unbounded memory.
#[tokio::test(flavor = "multi_thread")]
async fn special_files_never_hang_the_plugin() {
    if testkit::skip_privileged("special files") {
        return;
    }
    let f = fixture().await;
    mesh_pod(&f.ns, "web", &[]).await;
    let args = format!("K8S_POD_NAMESPACE={};K8S_POD_NAME=web", f.ns.name());
    let fifo = f.scratch.path().join("fifo");
    mkfifo(&fifo);
    let fifo_str = fifo.to_str().unwrap();
    let netns = NamedNetns::new("hfifo");
    let quick = Duration::from_secs(5);

    // CNI_NETNS a FIFO: ADD fails naming it; DEL succeeds.
    let a = invoke("ADD", fifo_str, &args, &conf(&f, json!({})), LIMIT);
    assert_eq!(a.code, Some(1), "{}", a.out);
    assert!(a.out["details"].as_str().unwrap().contains("is not a network namespace"), "{}", a.out);
    assert!(a.took < quick, "took {:?}", a.took);
    assert_eq!(invoke("DEL", fifo_str, &args, &conf(&f, json!({})), LIMIT).code, Some(0));

    // The kubeconfig a FIFO or /dev/zero: refused at once, named (on_api_error: fail shows it).
    for (kubeconfig, why) in [(fifo_str, "FIFO"), ("/dev/zero", "character device")] {
        let c = conf(&f, json!({"on_api_error": "fail", "kubernetes": {"kubeconfig": kubeconfig}}));
        let a = invoke("ADD", &netns.path(), &args, &c, LIMIT);
        assert_eq!(a.out["code"], 11, "{}", a.out);
        assert!(a.out["details"].as_str().unwrap().contains(why), "{}", a.out);
        assert!(a.took < quick, "{kubeconfig}: took {:?}", a.took);
        let s = invoke("STATUS", "", "", &c, LIMIT);
        assert_eq!(s.out["code"], 50, "{}", s.out);
    }

    // The log file a FIFO (and no socket): ADD succeeds, the line is dropped.
    let a = invoke("ADD", &netns.path(), &args, &conf(&f, json!({"log_file": fifo})), LIMIT);
    assert_eq!(a.code, Some(0), "{}", a.out);
    assert!(a.took < quick, "took {:?}", a.took);
    assert_eq!(invoke("DEL", &netns.path(), &args, &conf(&f, json!({"log_file": fifo})), LIMIT).code, Some(0));
}

/// Item 13: a pod name that is not a name is refused before it reaches a URL; the pod
/// `web` that `web?watch=true` would have resolved to is not intercepted.
#[tokio::test(flavor = "multi_thread")]
async fn pod_names_are_validated_before_the_lookup() {
    if testkit::skip_privileged("pod names") {
        return;
    }
    let f = fixture().await;
    mesh_pod(&f.ns, "web", &[]).await;
    let netns = NamedNetns::new("hname");
    for (key, args) in [
        ("K8S_POD_NAME", format!("K8S_POD_NAMESPACE={};K8S_POD_NAME=web?watch=true", f.ns.name())),
        ("K8S_POD_NAME", format!("K8S_POD_NAMESPACE={};K8S_POD_NAME=web/status", f.ns.name())),
        ("K8S_POD_NAME", format!("K8S_POD_NAMESPACE={};K8S_POD_NAME=Web", f.ns.name())),
        ("K8S_POD_NAMESPACE", format!("K8S_POD_NAMESPACE={}/pods/web#;K8S_POD_NAME=x", f.ns.name())),
    ] {
        let a = invoke("ADD", &netns.path(), &args, &conf(&f, json!({})), LIMIT);
        assert_eq!(a.out["code"], 4, "{args}: {}", a.out);
        assert!(a.out["details"].as_str().unwrap().contains(key), "{}", a.out);
        assert!(!saved_rules(&netns).contains("KUMA"), "{args}: not intercepted");
    }
}

/// Item 14: a request that cannot be built fails at once instead of being retried for
/// the whole lookup budget.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_cannot_be_built_fails_at_once() {
    if testkit::skip_privileged("unbuildable request") {
        return;
    }
    let f = fixture().await;
    mesh_pod(&f.ns, "web", &[]).await;
    let mut kubeconfig: Value = serde_json::from_slice(&std::fs::read(&f.kubeconfig).unwrap()).unwrap();
    kubeconfig["clusters"][0]["cluster"]["server"] = json!("https://bad host name:6443");
    let broken = f.scratch.path().join("broken-kubeconfig");
    std::fs::write(&broken, kubeconfig.to_string()).unwrap();
    let c = conf(&f, json!({"on_api_error": "fail", "kubernetes": {"kubeconfig": broken, "lookup_timeout_ms": 10000}}));
    let netns = NamedNetns::new("hbuild");
    let args = format!("K8S_POD_NAMESPACE={};K8S_POD_NAME=web", f.ns.name());
    let a = invoke("ADD", &netns.path(), &args, &c, LIMIT);
    assert_eq!(a.out["code"], 11, "{}", a.out);
    // The old code retried until the 10 s budget ran out, logging each retry.
    assert!(a.took < Duration::from_secs(5), "failed after {:?}, not at once: {}", a.took, a.out);
    let log = std::fs::read_to_string(f.scratch.path().join("cni.log")).unwrap();
    assert!(!log.contains("retrying"), "{log}");
}
