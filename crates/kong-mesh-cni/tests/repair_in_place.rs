//! In-place repair against a real API server and libcni: while the API server does not
//! answer, a mesh pod's ADD lets it through without its redirect and leaves a record;
//! once the API server is back, the installer (the node agent) programs the redirect
//! into that pod's still-running namespace, and the pod's validator passes, with no pod
//! deleted. Pods shaped exactly as Kong Mesh injects them are repaired the same way.

mod installer_host;
mod repair_node;

use std::path::Path;
use std::time::{Duration, Instant};

use installer_host::*;
use k8s_openapi::api::core::v1::Pod;
use kuma::pod::{SIDECAR_CONTAINER, SIDECAR_INJECTED, VALIDATION_CONTAINER};
use repair_node::{RepairNode, our_rules, records};
use serde_json::json;
use testkit::net::{NamedNetns, require_root};
use testkit::{Attachment, CniRuntime, Plugins, pod};

/// The target is the rules in place within a second of the API being back
/// (`cargo bench --bench repair_in_place` measures it); this bound only has to hold on a
/// loaded two-core machine.
const REPAIR_DEADLINE: Duration = Duration::from_secs(3);

/// Our validator inside the pod's namespace, as the sidecar's UID.
fn validate(ns: &NamedNetns) -> std::process::Output {
    std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "setpriv", "--reuid", "5678", "--regid", "5678", "--clear-groups"])
        .args([BINARY, "validate", "--timeout", "5s"])
        .env_remove("CNI_COMMAND")
        .output()
        .unwrap()
}

/// The pod Kong Mesh's injector writes (testenv/kuma-reference/injected/pod-34.yaml):
/// `kuma-validation` runs Kuma's own validator; inbound port 15055, IPv4 only.
fn injected_pod() -> Pod {
    let path = testkit::repo_root().join("testenv/kuma-reference/injected/pod-34.yaml");
    serde_norway::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[test]
fn a_pod_let_through_while_the_api_was_away_is_repaired_in_place() {
    if testkit::skip_privileged("in-place repair") {
        return;
    }
    // The chart's rules: get pods, and patch them to say they were repaired.
    let node = RepairNode::new(&["get", "patch"]);
    let mesh = pod("web")
        .annotation(SIDECAR_INJECTED, "true")
        .init_container(VALIDATION_CONTAINER)
        .container("app")
        .container(SIDECAR_CONTAINER)
        .build();
    let (web_ns, web_at) = node.attach(&node.create_pod(mesh), "inpl-web");
    let (kuma_ns, kuma_at) = node.attach(&node.create_pod(injected_pod()), "inpl-kuma");
    let (cni, installer) = (&node.cni, &node.installer);

    // The API server stops answering: both pods start, without a redirect, with records.
    let resume = node.pause();
    for a in [&web_at, &kuma_at] {
        cni.add(a).unwrap_or_else(|e| panic!("ADD of {} while the API is away: {e:?}", a.pod_name));
    }
    assert_eq!(our_rules(&web_ns), "", "no redirect yet");
    assert_eq!(our_rules(&kuma_ns), "");
    assert_eq!(node.pending().len(), 2, "{:?}", node.pending());
    let failed = validate(&web_ns);
    assert_eq!(failed.status.code(), Some(kuma::pod::VALIDATOR_EXIT_NOT_REDIRECTED), "the validator sees it");
    // The agent keeps asking meanwhile, and keeps the records.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(node.pending().len(), 2);

    // Back: the redirect appears in both namespaces.
    let back = Instant::now();
    drop(resume);
    let in_place = || our_rules(&web_ns).contains("KUMA_MESH_OUTBOUND") && our_rules(&kuma_ns).contains("15055");
    let took = wait_for(Duration::from_secs(10), in_place);
    let took = took.unwrap_or_else(|| panic!("not repaired in place; log:\n{}", installer.log()));
    eprintln!("in-place repair: rules in both pods {:?} after the API server was back", back.elapsed());
    assert!(took <= REPAIR_DEADLINE, "took {took:?}; log:\n{}", installer.log());
    assert!(wait_for(Duration::from_secs(2), || node.pending().is_empty()).is_some(), "records left");
    let log = installer.log();
    assert_eq!(log.matches("programmed the redirect in place").count(), 2, "{log}");

    // The pod's validator now passes (it would on its next restart), and nothing was deleted.
    let passed = validate(&web_ns);
    let text = String::from_utf8_lossy(&passed.stdout);
    assert!(passed.status.success(), "{text}{}", String::from_utf8_lossy(&passed.stderr));
    assert!(text.contains("redirected to 127.0.0.1:15006"), "{text}");
    // Kuma's injected pod: its inbound port is 15055 and it is IPv4 only.
    let kuma_rules = our_rules(&kuma_ns);
    assert!(kuma_rules.contains("--to-ports 15055") && !kuma_rules.contains("::6"), "{kuma_rules}");
    node.runtime.block_on(async {
        for name in ["web", "busybox"] {
            let pod = node.ns.api::<Pod>().get(name).await.unwrap();
            assert!(pod.metadata.deletion_timestamp.is_none(), "{name} deleted");
            // Said on the pod, for the repair controller to leave it be.
            let annotations = pod.metadata.annotations.unwrap_or_default();
            let at = annotations.get(kuma::pod::REDIRECT_REPAIRED_AT).unwrap_or_else(|| panic!("{name}: not marked"));
            assert!(at.parse::<k8s_openapi::jiff::Timestamp>().is_ok(), "{at}");
        }
    });

    // DEL cleans up what the agent programmed, from its `applied` record.
    for (netns, a) in [(&web_ns, &web_at), (&kuma_ns, &kuma_at)] {
        cni.del(a).unwrap();
        assert_eq!(our_rules(netns), "", "DEL left rules in {}", a.pod_name);
    }
    assert!(records(&node.run_dir.join("applied/k8s-pod-network")).is_empty());
}

/// A pod's namespace where containerd keeps it with `netns_mounts_under_state_dir`: an
/// nsfs bind mount in its state dir, not under /var/run/netns. Unmounted on drop.
struct StateDirNetns {
    path: std::path::PathBuf,
}

impl StateDirNetns {
    fn new(ns: &NamedNetns, state_dir: &Path) -> StateDirNetns {
        std::fs::create_dir_all(state_dir).unwrap();
        let path = state_dir.join(format!("cni-{}", testkit::unique_suffix()));
        std::fs::File::create(&path).unwrap();
        let kept = StateDirNetns { path };
        testkit::net::sh("mount", &["--bind", &ns.path(), &kept.path.to_string_lossy()]);
        kept
    }
}

impl Drop for StateDirNetns {
    fn drop(&mut self) {
        let path = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: umount2 with a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_file(&self.path);
    }
}

#[test]
fn a_namespace_outside_var_run_netns_is_repaired_where_the_runtime_keeps_it() {
    if testkit::skip_privileged("in-place repair") {
        return;
    }
    let node = RepairNode::new(&["get", "patch"]);
    let mesh = pod("state")
        .annotation(SIDECAR_INJECTED, "true")
        .init_container(VALIDATION_CONTAINER)
        .container("app")
        .container(SIDECAR_CONTAINER)
        .build();
    let (netns, mut a) = node.attach(&node.create_pod(mesh), "inpl-state");
    let state = node.host.root.path().join("containerd/state/io.containerd.grpc.v1.cri/netns");
    let kept = StateDirNetns::new(&netns, &state);
    // The runtime names this path, and only this one, to the plugin.
    a.netns = kept.path.clone();

    let resume = node.pause();
    node.cni.add(&a).unwrap_or_else(|e| panic!("ADD while the API is away: {e:?}"));
    assert_eq!(our_rules(&netns), "", "no redirect yet");
    let pending = node.pending();
    assert_eq!(pending.len(), 1, "{pending:?}");
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(&pending[0]).unwrap()).unwrap();
    assert_eq!(record["netns"], json!(kept.path), "the record keeps CNI_NETNS as the runtime passed it");

    let back = Instant::now();
    drop(resume);
    let took = wait_for(Duration::from_secs(10), || our_rules(&netns).contains("KUMA_MESH_OUTBOUND"));
    let took = took.unwrap_or_else(|| panic!("not repaired in place; log:\n{}", node.installer.log()));
    eprintln!(
        "in-place repair (netns in the runtime's state dir): rules {:?} after the API server was back",
        back.elapsed()
    );
    assert!(took <= REPAIR_DEADLINE, "took {took:?}; log:\n{}", node.installer.log());
    let passed = validate(&netns);
    assert!(passed.status.success(), "{}", String::from_utf8_lossy(&passed.stdout));

    // DEL, through the same path, removes what the agent programmed.
    node.cni.del(&a).unwrap();
    assert_eq!(our_rules(&netns), "", "DEL left rules");
    drop(kept);
}

#[test]
fn records_of_pods_recreated_gone_or_not_ours_are_dropped() {
    if testkit::skip_privileged("in-place repair") {
        return;
    }
    let node = RepairNode::new(&["get"]);
    let mesh =
        |name: &str| pod(name).annotation(SIDECAR_INJECTED, "true").container("app").container(SIDECAR_CONTAINER);
    let pods = [mesh("recreated").build(), mesh("gone").build(), pod("plain").container("app").build()];
    let attached: Vec<(NamedNetns, Attachment)> =
        pods.into_iter().map(|p| node.attach(&node.create_pod(p), "inpl-drop")).collect();

    // Before ADD: "recreated" is deleted and created again under its name, "gone" deleted.
    // The runtime still calls ADD for the sandboxes of the pods it knew.
    node.runtime.block_on(async {
        let pods = node.ns.api::<Pod>();
        let now = kube::api::DeleteParams { grace_period_seconds: Some(0), ..Default::default() };
        for name in ["recreated", "gone"] {
            pods.delete(name, &now).await.unwrap();
        }
        let again = pod("recreated").annotation(SIDECAR_INJECTED, "true").container("app").container(SIDECAR_CONTAINER);
        node.ns.create_pod(again.build()).await;
    });
    let resume = node.pause();
    for (_, a) in &attached {
        node.cni.add(a).unwrap();
    }
    assert_eq!(node.pending().len(), 3);
    drop(resume);
    let installer = &node.installer;
    assert!(wait_for(Duration::from_secs(10), || node.pending().is_empty()).is_some(), "{}", installer.log());
    for (netns, _) in &attached {
        assert_eq!(our_rules(netns), "", "nothing programmed for a pod that is not the one ADD saw");
    }
    let log = installer.log();
    for why in ["was recreated under its name", "the pod no longer exists", "not ours to redirect"] {
        assert!(log.contains(why), "{why}:\n{log}");
    }
    for (_, a) in &attached {
        node.cni.del(a).unwrap();
    }
}

#[test]
fn the_record_says_what_add_saw_and_del_removes_it() {
    if !require_root() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let run_dir = scratch.path().join("run");
    let mut cni = CniRuntime::bridge(Plugins::Upstream);
    cni.prepend_plugin_dir(Path::new(BINARY).parent().unwrap());
    // No kubeconfig yet (the installer has not written it): the API cannot be asked.
    let ours = json!({
        "type": "kong-mesh-cni", "run_dir": run_dir, "log_file": scratch.path().join("cni.log"),
        "log_socket": scratch.path().join("log.sock"),
        "kubernetes": {"kubeconfig": scratch.path().join("not-written-yet")},
    });
    cni.append_plugin(ours);
    let netns = NamedNetns::new("inpl-rec");
    let a = Attachment::new(&netns, "shop", "web");
    cni.add(&a).expect("the pod starts");

    let found = records(&run_dir.join("pending"));
    assert_eq!(found.len(), 1, "{found:?}");
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(&found[0]).unwrap()).unwrap();
    assert_eq!(
        (&record["namespace"], &record["name"], &record["uid"], &record["container_id"], &record["ifname"]),
        (&json!("shop"), &json!("web"), &json!(a.pod_uid), &json!(a.container_id), &json!("eth0"))
    );
    assert_eq!(record["netns"], json!(a.netns));
    assert_eq!(record["network"], cni.conflist()["name"]);
    assert_eq!(record["conf"]["type"], "kong-mesh-cni");
    assert!(record["conf"].get("prevResult").is_none(), "the previous result is not kept");

    cni.del(&a).unwrap();
    assert!(records(&run_dir.join("pending")).is_empty(), "DEL removes it");
}
