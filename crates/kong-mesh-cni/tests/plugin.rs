//! The plugin as a container runtime drives it: the reference libcni runtime, a chain
//! of real reference plugins with ours last, pods in a real API server read through a
//! service account that may only `get` pods, and real traffic in the pod's namespace.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testkit::net::{NamedNetns, accept_within, connect_tcp, listen_tcp, read_exact};
use testkit::{ApiServer, Attachment, CniRuntime, Plugins, TestNamespace, pod};
use validator::original_destination;

mod support;
use support::{BIN, fixture, our_entry, saved_rules};

/// A runtime whose conflist is the reference chain followed by our entry.
fn chain(plugins: Plugins, entry: Value) -> CniRuntime {
    let mut rt = CniRuntime::bridge(plugins);
    rt.prepend_plugin_dir(Path::new(BIN).parent().unwrap());
    rt.append_plugin(entry);
    rt
}

async fn mesh_pod(ns: &TestNamespace, name: &str, extra: &[(&str, &str)]) {
    let mut p = testkit::mesh_pod(name);
    for (k, v) in extra {
        p = p.annotation(k, v);
    }
    ns.create_pod(p.build()).await;
}

fn rt_ip(ns: &NamedNetns) -> String {
    let text = ns.ip(&["-4", "-o", "addr", "show", "dev", "eth0"]);
    text.split_whitespace().skip_while(|w| *w != "inet").nth(1).unwrap().split('/').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mesh_pod_gets_its_address_from_bridge_and_its_redirect_from_us() {
    if testkit::skip_privileged("mesh pod through libcni") {
        return;
    }
    let f = fixture().await;
    mesh_pod(&f.ns, "web", &[]).await;
    f.ns.create_pod(pod("client").build()).await;
    let rt = chain(Plugins::Upstream, our_entry(&f.kubeconfig, f.scratch.path(), json!({})));
    let (web_ns, client_ns) = (NamedNetns::new("plw"), NamedNetns::new("plc"));
    let web = Attachment::new(&web_ns, f.ns.name(), "web");
    let client = Attachment::new(&client_ns, f.ns.name(), "client");

    let result = rt.add(&web).expect("ADD of the mesh pod");
    let web_ip = result["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_owned();
    assert!(web_ns.ip(&["-4", "addr", "show", "dev", "eth0"]).contains(&web_ip), "bridge gave the address");
    rt.add(&client).expect("ADD of a plain pod");
    assert_eq!(saved_rules(&client_ns), "", "the plain pod is untouched");

    // Outbound from the app lands on the sidecar's outbound listener (any address the
    // pod can route to: the bridge network has no default route).
    let (pod_ns, peer_ns) = (web_ns.open(), client_ns.open());
    let outbound = listen_tcp(&pod_ns, false, 15001);
    let client_ip = rt_ip(&client_ns);
    let dest = format!("{client_ip}:443").parse().unwrap();
    let _c = connect_tcp(&pod_ns, None, dest, b"out").unwrap();
    let mut conn = accept_within(&outbound, Duration::from_secs(2)).expect("outbound redirected");
    assert_eq!(read_exact(&mut conn, 3), b"out");
    assert_eq!(original_destination(&conn).unwrap(), dest);
    // Inbound from the other pod lands on the inbound listener.
    let inbound = listen_tcp(&pod_ns, false, 15006);
    let dest = format!("{web_ip}:8080").parse().unwrap();
    let _c = connect_tcp(&peer_ns, None, dest, b"in").unwrap();
    let mut conn = accept_within(&inbound, Duration::from_secs(2)).expect("inbound redirected");
    assert_eq!(read_exact(&mut conn, 2), b"in");
    assert_eq!(original_destination(&conn).unwrap(), dest);

    // The bridge plugin's own CHECK compares the bridge's MAC, which changes while a
    // second pod is attached: CHECK the mesh pod alone.
    rt.del(&client).expect("DEL of the plain pod");
    rt.check(&web).expect("CHECK passes with every rule in place");
    web_ns.exec("sh", &["-c", "iptables-nft -t nat -F KUMA_MESH_OUTBOUND_REDIRECT 2>/dev/null; iptables-legacy -t nat -F KUMA_MESH_OUTBOUND_REDIRECT 2>/dev/null; true"]);
    let err = rt.check(&web).unwrap_err();
    assert_eq!(err.code, Some(101), "{err}");
    assert!(err.details.contains("-A KUMA_MESH_OUTBOUND_REDIRECT -p tcp"), "the missing rule is named: {err}");

    rt.del(&web).expect("DEL");
    assert_eq!(saved_rules(&web_ns), "", "DEL removed every rule of ours");
    rt.del(&web).expect("a second DEL succeeds");

    let log = std::fs::read_to_string(f.scratch.path().join("cni.log")).unwrap();
    let add_line = log.lines().find(|l| l.contains("redirect programmed")).expect("ADD logged");
    assert!(
        add_line.contains(&format!("pod={}/web", f.ns.name())) && add_line.contains(&web.container_id),
        "{add_line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_that_are_not_ours_pass_through_untouched() {
    if testkit::skip_privileged("pass-through pods") {
        return;
    }
    let f = fixture().await;
    f.ns.create_pod(pod("plain").build()).await;
    f.ns.create_pod(
        pod("with-init")
            .init_container("kuma-init")
            .container("app")
            .container("kuma-sidecar")
            .annotation("kuma.io/sidecar-injected", "true")
            .build(),
    )
    .await;
    f.ns.create_pod(pod("not-injected").container("app").container("kuma-sidecar").build()).await;
    // The excluded namespace is not readable by our identity and has no pod at all:
    // passing it proves no API call is made.
    let entry = our_entry(
        &f.kubeconfig,
        f.scratch.path(),
        json!({"on_api_error": "fail", "kubernetes": {"kubeconfig": f.kubeconfig, "exclude_namespaces": ["kmc-excluded"]}}),
    );
    let rt = chain(Plugins::Upstream, entry);
    for (namespace, name) in
        [(f.ns.name(), "plain"), (f.ns.name(), "with-init"), (f.ns.name(), "not-injected"), ("kmc-excluded", "x")]
    {
        let netns = NamedNetns::new("plp");
        let a = Attachment::new(&netns, namespace, name);
        let result = rt.add(&a).unwrap_or_else(|e| panic!("ADD {namespace}/{name}: {e}"));
        assert_eq!(result["cniVersion"], "1.1.0");
        assert!(result["ips"][0]["address"].is_string(), "{result}");
        assert_eq!(saved_rules(&netns), "", "{namespace}/{name} is untouched");
        rt.del(&a).unwrap();
    }
    let log = std::fs::read_to_string(f.scratch.path().join("cni.log")).unwrap();
    for reason in
        ["no kuma-sidecar container", "kuma-init init container", "is absent", "namespace kmc-excluded is excluded"]
    {
        assert!(log.contains(reason), "the log says why ({reason}):\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_annotation_fails_add_with_code_7() {
    if testkit::skip_privileged("invalid annotation") {
        return;
    }
    let f = fixture().await;
    mesh_pod(&f.ns, "bad", &[("traffic.kuma.io/exclude-outbound-ports", "80,eighty")]).await;
    let rt = chain(Plugins::Upstream, our_entry(&f.kubeconfig, f.scratch.path(), json!({})));
    let netns = NamedNetns::new("plbad");
    let a = Attachment::new(&netns, f.ns.name(), "bad");
    let err = rt.add(&a).unwrap_err();
    assert_eq!(err.code, Some(7), "{err}");
    assert!(
        err.details.contains("traffic.kuma.io/exclude-outbound-ports") && err.details.contains("80,eighty"),
        "{err}"
    );
    assert_eq!(saved_rules(&netns), "");
    rt.del(&a).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn every_spec_version_round_trips() {
    if testkit::skip_privileged("spec versions") {
        return;
    }
    let f = fixture().await;
    mesh_pod(&f.ns, "versions", &[]).await;
    for (plugins, version) in [
        (Plugins::Debian, "0.3.0"),
        (Plugins::Debian, "0.3.1"),
        (Plugins::Debian, "0.4.0"),
        (Plugins::Debian, "1.0.0"),
        (Plugins::Upstream, "1.1.0"),
    ] {
        let rt = chain(plugins, our_entry(&f.kubeconfig, f.scratch.path(), json!({})));
        let mut conflist = rt.conflist();
        conflist["cniVersion"] = json!(version);
        rt.set_conflist(&conflist);
        let netns = NamedNetns::new("plv");
        let a = Attachment::new(&netns, f.ns.name(), "versions");
        let result = rt.add(&a).unwrap_or_else(|e| panic!("{version}: {e}"));
        assert_eq!(result["cniVersion"], version);
        let ip = &result["ips"][0];
        assert!(ip["address"].is_string(), "{version}: {result}");
        assert_eq!(
            ip.get("version").is_some(),
            version.starts_with('0'),
            "{version}: ips[].version per format: {result}"
        );
        assert!(saved_rules(&netns).contains("KUMA_MESH_OUTBOUND"), "{version}: rules applied");
        if version != "0.3.0" && version != "0.3.1" {
            rt.check(&a).unwrap_or_else(|e| panic!("{version} CHECK: {e}")); // CHECK exists since 0.4.0
        }
        rt.del(&a).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn standalone_like_multus_without_prev_result() {
    if testkit::skip_privileged("standalone") {
        return;
    }
    let f = fixture().await;
    mesh_pod(&f.ns, "solo", &[]).await;
    let mut entry = our_entry(&f.kubeconfig, f.scratch.path(), json!({}));
    entry["cniVersion"] = json!("1.0.0");
    let mut rt =
        CniRuntime::custom(vec![], |_| json!({"cniVersion": "1.0.0", "name": "kong-mesh-cni", "plugins": [entry]}));
    rt.prepend_plugin_dir(Path::new(BIN).parent().unwrap());
    let netns = NamedNetns::new("plsolo");
    let a = Attachment::new(&netns, f.ns.name(), "solo");
    let result = rt.add(&a).unwrap();
    assert_eq!(result["cniVersion"], "1.0.0");
    assert!(result.get("ips").is_none() && result.get("interfaces").is_none(), "an empty result: {result}");
    assert!(saved_rules(&netns).contains("KUMA_MESH_INBOUND"));
    // No installer listens (as for a plugin whose run dir is not the installer's, e.g.
    // inside a thick multus-daemon without chrootDir): its own log says so.
    let log = std::fs::read_to_string(f.scratch.path().join("cni.log")).unwrap();
    assert!(log.contains("WARN") && log.contains("cannot reach the installer's log socket"), "{log}");
    assert!(log.contains("cannot reach the node agent") && log.contains("agent.sock"), "{log}");
    rt.del(&a).unwrap();
    assert_eq!(saved_rules(&netns), "");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_and_gc() {
    if testkit::skip_privileged("status and gc") {
        return;
    }
    let f = fixture().await;
    let rt = chain(Plugins::Upstream, our_entry(&f.kubeconfig, f.scratch.path(), json!({})));
    rt.status().expect("STATUS: ready with a working kubeconfig");
    rt.gc(&[]).expect("GC succeeds");

    // STATUS answers from local state: without a kubeconfig, ADD lets pods start
    // (on_api_error: pass-through), so the network is ready; with `fail` it is not.
    let missing = f.scratch.path().join("no-such-kubeconfig");
    let rt = chain(Plugins::Upstream, our_entry(&missing, f.scratch.path(), json!({})));
    rt.status().expect("ADD survives a missing kubeconfig, so STATUS does");
    let strict = json!({"on_api_error": "fail"});
    let rt = chain(Plugins::Upstream, our_entry(&missing, f.scratch.path(), strict));
    let err = rt.status().unwrap_err();
    assert_eq!(err.code, Some(50), "{err}");
    assert!(err.details.contains("no-such-kubeconfig"), "{err}");
}

/// The API server stops: the plugin answers within its deadline, as configured.
#[tokio::test(flavor = "multi_thread")]
async fn api_server_down() {
    if testkit::skip_privileged("API server down") {
        return;
    }
    let private = ApiServer::start(&[]);
    let ns = private.namespace("kmc-down").await;
    mesh_pod(&ns, "web", &[]).await;
    let kubeconfig = private.service_account_kubeconfig(ns.name(), "kong-mesh-cni").await;
    let name = ns.name().to_owned();
    std::mem::forget(ns); // its server is about to go; nothing to clean up there
    drop(private);
    let scratch = tempfile::tempdir().unwrap();
    let timeout = json!({"kubernetes": {"kubeconfig": kubeconfig, "lookup_timeout_ms": 2000}});

    let rt = chain(Plugins::Upstream, our_entry(&kubeconfig, scratch.path(), timeout.clone()));
    let netns = NamedNetns::new("pldown");
    let a = Attachment::new(&netns, &name, "web");
    let start = Instant::now();
    let result = rt.add(&a).expect("default policy: the pod starts");
    let took = start.elapsed();
    assert!(result["ips"][0]["address"].is_string());
    assert!(took < Duration::from_secs(4), "ADD took {took:?}");
    assert_eq!(saved_rules(&netns), "", "nothing known about the pod: nothing applied");
    rt.del(&a).unwrap();
    // STATUS makes no API call: an outage does not mark the node's network not ready.
    let start = Instant::now();
    rt.status().expect("STATUS is ready while the API server is down");
    assert!(start.elapsed() < Duration::from_secs(2), "STATUS took {:?}", start.elapsed());

    let mut fail = timeout;
    fail["on_api_error"] = json!("fail");
    let rt = chain(Plugins::Upstream, our_entry(&kubeconfig, scratch.path(), fail));
    let a = Attachment::new(&netns, &name, "web");
    let start = Instant::now();
    let err = rt.add(&a).unwrap_err();
    assert_eq!(err.code, Some(11), "{err}");
    assert!(start.elapsed() < Duration::from_secs(4), "ADD took {:?}", start.elapsed());
    rt.del(&a).unwrap();
}

/// A namespace our identity may not read (the chart's namespaceAllowList, or RBAC
/// missing): asking again could not help, so the pod starts at once and leaves no record
/// for in-place repair (the installer reads with the same identity, and would ask every
/// 200 ms for as long as the pod lives).
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_our_identity_may_not_read_passes_through_without_a_repair_record() {
    if testkit::skip_privileged("a pod the plugin may not read") {
        return;
    }
    let f = fixture().await;
    let elsewhere = ApiServer::shared().namespace("kmc-elsewhere").await;
    mesh_pod(&elsewhere, "web", &[]).await;
    let rt = chain(Plugins::Upstream, our_entry(&f.kubeconfig, f.scratch.path(), json!({})));
    let netns = NamedNetns::new("plforb");
    let a = Attachment::new(&netns, elsewhere.name(), "web");
    let start = Instant::now();
    rt.add(&a).expect("the pod starts");
    assert!(start.elapsed() < Duration::from_secs(2), "ADD took {:?}: a 403 was retried", start.elapsed());
    assert_eq!(saved_rules(&netns), "");
    let pending = f.scratch.path().join("run/pending");
    let records = std::fs::read_dir(&pending).map(|d| d.count()).unwrap_or(0);
    assert_eq!(records, 0, "no repair record in {}", pending.display());
    let log = std::fs::read_to_string(f.scratch.path().join("cni.log")).unwrap();
    assert!(
        log.contains("WARN") && log.contains("does not let us read this pod") && log.contains("forbidden"),
        "{log}"
    );
    rt.del(&a).unwrap();

    let fail = json!({"on_api_error": "fail"});
    let rt = chain(Plugins::Upstream, our_entry(&f.kubeconfig, f.scratch.path(), fail));
    let err = rt.add(&a).unwrap_err();
    assert_eq!(err.code, Some(11), "on_api_error: fail still fails: {err}");
    rt.del(&a).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_reach_the_installer_socket_and_a_broken_log_never_fails_add() {
    if testkit::skip_privileged("logging") {
        return;
    }
    let f = fixture().await;
    mesh_pod(&f.ns, "logged", &[]).await;
    let socket_path = f.scratch.path().join("log.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket_path).unwrap();
    let rt = chain(Plugins::Upstream, our_entry(&f.kubeconfig, f.scratch.path(), json!({})));
    let netns = NamedNetns::new("pllog");
    let a = Attachment::new(&netns, f.ns.name(), "logged");
    // The plugin connects during ADD; read its stream to the end on a thread.
    let reader = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut conn, &mut text).unwrap();
        text
    });
    rt.add(&a).unwrap();
    let text = reader.join().unwrap();
    let programmed = text.lines().find(|l| l.contains("redirect programmed")).unwrap_or_else(|| panic!("{text}"));
    assert!(programmed.contains(&format!("pod={}/logged", f.ns.name())) && programmed.contains(&a.container_id));
    assert!(!f.scratch.path().join("cni.log").exists(), "with a listener, nothing goes to the file");
    rt.del(&a).unwrap();

    // Neither the socket nor the file can be written: ADD still succeeds.
    let broken = json!({"log_socket": "/proc/kmc/none.sock", "log_file": "/proc/kmc/none.log"});
    let rt = chain(Plugins::Upstream, our_entry(&f.kubeconfig, f.scratch.path(), broken));
    let a = Attachment::new(&netns, f.ns.name(), "logged");
    rt.add(&a).expect("ADD despite broken logging");
    assert!(saved_rules(&netns).contains("KUMA_MESH"));
    rt.del(&a).unwrap();
}

/// Installed as `kuma-cni` (the Go implementation's name), it works the same.
#[tokio::test(flavor = "multi_thread")]
async fn installed_as_kuma_cni() {
    if testkit::skip_privileged("kuma-cni name") {
        return;
    }
    let f = fixture().await;
    mesh_pod(&f.ns, "renamed", &[]).await;
    let bin_dir = tempfile::tempdir().unwrap();
    std::fs::copy(BIN, bin_dir.path().join("kuma-cni")).unwrap();
    let mut entry = our_entry(&f.kubeconfig, f.scratch.path(), json!({}));
    entry["type"] = json!("kuma-cni");
    entry["name"] = json!("kuma-cni");
    let mut rt = chain(Plugins::Upstream, entry);
    rt.prepend_plugin_dir(bin_dir.path());
    let netns = NamedNetns::new("plkuma");
    let a = Attachment::new(&netns, f.ns.name(), "renamed");
    rt.add(&a).unwrap();
    assert!(saved_rules(&netns).contains("KUMA_MESH_OUTBOUND"));
    rt.del(&a).unwrap();
}

/// The binary alone, as a runtime runs it: environment and stdin in, stdout and exit
/// code out.
fn invoke(command: &str, args: &str, stdin: &[u8]) -> (serde_json::Value, Option<i32>, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(BIN)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "direct-0123")
        .env("CNI_NETNS", "/var/run/netns/kmc-does-not-matter")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .env("CNI_PATH", "/nonexistent")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin_pipe = child.stdin.take().unwrap();
    let input = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin_pipe.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let value = if stdout.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout}"))
    };
    (value, out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A pass-through returns the previous result unchanged, unknown fields and number
/// precision included, in every spec version.
#[tokio::test(flavor = "multi_thread")]
async fn pass_through_returns_the_previous_result_unchanged() {
    if testkit::skip_privileged("prevResult identity") {
        return;
    }
    let f = fixture().await;
    f.ns.create_pod(pod("plain").build()).await;
    for version in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let mut ip = json!({"address": "10.1.2.3/24", "gateway": "10.1.2.1", "interface": 1});
        if version.starts_with('0') {
            ip["version"] = json!("4");
        }
        let prev = json!({
            "cniVersion": version,
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x", "mac": "0a:58:0a:01:02:03"}],
            "ips": [ip],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.2.1"}],
            "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]},
            "x-vendor": {"ratio": 0.30000000000000004, "big": 123456789012345678901234567890u128.to_string()},
        });
        let conf = json!({
            "cniVersion": version, "name": "k8s-pod-network", "type": "kong-mesh-cni",
            "log_file": f.scratch.path().join("direct.log"), "log_socket": f.scratch.path().join("none.sock"),
            "kubernetes": {"kubeconfig": f.kubeconfig, "exclude_namespaces": ["kube-system"]},
            "prevResult": prev,
        });
        for args in [
            format!("K8S_POD_NAMESPACE={};K8S_POD_NAME=plain", f.ns.name()),
            "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns".to_owned(),
        ] {
            let (out, code, stderr) = invoke("ADD", &args, conf.to_string().as_bytes());
            assert_eq!(code, Some(0), "{version} {args}: {out} {stderr}");
            assert_eq!(out, prev, "{version} {args}: the previous result, unchanged");
        }
    }
}

/// Broken input gets the spec's error JSON and a non-zero exit, never a panic.
#[test]
fn malformed_stdin_is_a_decode_or_config_error() {
    let big = vec![b'{'; 10 << 20];
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        ("not JSON", b"hello".to_vec(), 6),
        ("truncated", br#"{"cniVersion":"1.0.0","type":"kong-mesh-cni","kubernetes":{"#.to_vec(), 6),
        ("10 MB", big, 6),
        (
            "wrong types",
            br#"{"cniVersion":"1.0.0","type":"kong-mesh-cni","kubernetes":{"exclude_namespaces":"kube-system"}}"#
                .to_vec(),
            7,
        ),
        ("prevResult not an object", br#"{"cniVersion":"1.0.0","type":"kong-mesh-cni","prevResult":[1]}"#.to_vec(), 7),
        (
            "unknown on_api_error",
            br#"{"cniVersion":"1.0.0","type":"kong-mesh-cni","on_api_error":"maybe"}"#.to_vec(),
            7,
        ),
        ("bad version", br#"{"cniVersion":"9.9.9","type":"kong-mesh-cni"}"#.to_vec(), 1),
    ];
    for (what, stdin, want) in cases {
        let (out, code, stderr) = invoke("ADD", "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b", &stdin);
        assert_eq!(code, Some(1), "{what}: {out} {stderr}");
        assert_eq!(out["code"], want, "{what}: {out}");
        assert!(out["msg"].is_string() && out["details"].is_string(), "{what}: {out}");
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    }
    let (out, code, _) = invoke("VERSION", "", b"");
    assert_eq!(code, Some(0));
    assert_eq!(out["supportedVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));
}

/// Our plugin behind a wrapper that hides every iptables/nft binary (bind-mounting
/// /dev/null over each, in a private mount namespace) and empties PATH: a node with no
/// iptables at all, as Talos is.
fn without_iptables(dir: &Path) -> PathBuf {
    let wrapper_dir = dir.join("no-iptables");
    std::fs::create_dir_all(&wrapper_dir).unwrap();
    let script = format!(
        "#!/bin/sh\nexec unshare --mount --propagation private sh -c '\
         for f in /usr/sbin/*tables* /usr/sbin/nft /sbin/*tables* /sbin/nft /usr/bin/*tables* /usr/bin/nft; do \
         [ -e \"$f\" ] && mount --bind /dev/null \"$f\"; done; PATH=/nonexistent exec \"$0\" \"$@\"' {BIN} \"$@\"\n"
    );
    let wrapper = wrapper_dir.join("kong-mesh-cni");
    std::fs::write(&wrapper, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    wrapper_dir
}

#[tokio::test(flavor = "multi_thread")]
async fn the_native_backend_needs_no_iptables_binary() {
    if testkit::skip_privileged("native backend through libcni") {
        return;
    }
    let f = fixture().await;
    mesh_pod(&f.ns, "web", &[]).await;
    let entry = our_entry(&f.kubeconfig, f.scratch.path(), json!({"iptables_backend": "nftables"}));
    let mut rt = chain(Plugins::Upstream, entry);
    let wrapper_dir = without_iptables(f.scratch.path());
    rt.prepend_plugin_dir(&wrapper_dir);
    // The hiding works: behind the same wrapper, iptables cannot run.
    let probe = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "sed 's|exec \"$0\" \"$@\"|iptables-nft-save; /usr/sbin/iptables-nft-save|' {0}/kong-mesh-cni > {0}/probe && sh {0}/probe",
            wrapper_dir.display()
        ))
        .output()
        .unwrap();
    assert!(!probe.status.success(), "iptables still runs behind the wrapper");

    let web_ns = NamedNetns::new("plnf");
    let web = Attachment::new(&web_ns, f.ns.name(), "web");
    rt.add(&web).expect("ADD with the native backend and no iptables anywhere");
    let pod_ns = web_ns.open();
    let outbound = listen_tcp(&pod_ns, false, 15001);
    // An address the pod can route to (the bridge network has no default route).
    let ip = rt_ip(&web_ns);
    let dest = format!("{}.250:443", ip.rsplit_once('.').unwrap().0).parse().unwrap();
    let _c = connect_tcp(&pod_ns, None, dest, b"out");
    let mut conn = accept_within(&outbound, Duration::from_secs(2)).expect("outbound redirected");
    assert_eq!(read_exact(&mut conn, 3), b"out");
    assert_eq!(original_destination(&conn).unwrap(), dest);
    assert_eq!(saved_rules(&web_ns), "", "no iptables rule of ours: the rules are native");

    rt.check(&web).expect("CHECK passes with every rule in place");
    web_ns.exec("nft", &["flush", "chain", "ip", "kuma_mesh", "KUMA_MESH_OUTBOUND_REDIRECT"]);
    let err = rt.check(&web).unwrap_err();
    assert_eq!(err.code, Some(101), "{err}");
    assert!(err.details.contains("KUMA_MESH_OUTBOUND_REDIRECT meta l4proto tcp redirect to :15001"), "{err}");

    rt.del(&web).expect("DEL");
    assert!(!web_ns.exec("nft", &["list", "tables"]).contains("kuma_mesh"), "DEL deleted our tables");
    let log = std::fs::read_to_string(f.scratch.path().join("cni.log")).unwrap();
    let add_line = log.lines().find(|l| l.contains("redirect programmed")).expect("ADD logged");
    assert!(add_line.contains("nftables"), "{add_line}");
}
