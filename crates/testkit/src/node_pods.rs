//! Pods for the node: plain ones and mesh pods shaped as Kong Mesh's injector makes them,
//! made of the `standin` tools image, and the waits and log reads the tests and the
//! demo do with them.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ContainerStatus, Event, Pod};
use kube::Client;
use kube::api::{Api, ListParams, LogParams, PostParams};
use serde_json::{Value, json};

use crate::node::{Node, NodeError, TOOLS_IMAGE};

/// The sidecar's UID (Kuma's default `kuma.io/sidecar-uid`).
pub const SIDECAR_UID: u32 = 5678;

/// A container of the tools image running `standin ARGS`.
pub fn container(name: &str, args: &[&str]) -> Value {
    json!({ "name": name, "image": TOOLS_IMAGE, "imagePullPolicy": "Never", "command": ["/standin"], "args": args })
}

/// A pod on `node` (pinned by its hostname label) labelled `app: NAME`.
pub fn plain_pod(name: &str, node: &Node, containers: Vec<Value>) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "labels": { "app": name } },
        "spec": { "nodeSelector": { "kubernetes.io/hostname": node.name }, "containers": containers,
                  "terminationGracePeriodSeconds": 1 },
    })
}

/// Where the `kuma-validation` init container finds our validator.
#[derive(Debug, Clone, Copy)]
pub struct Validator<'a> {
    pub image: &'a str,
    pub program: &'a str,
}

impl Validator<'_> {
    /// The binary given as [`crate::NodeOptions::kong_mesh_cni`], in the tools image.
    pub const TOOLS: Validator<'static> = Validator { image: TOOLS_IMAGE, program: "/kong-mesh-cni" };
}

impl<'a> Validator<'a> {
    /// Our own image (scripts/image-build.sh), as the installer runs it.
    pub fn image(image: &'a str) -> Validator<'a> {
        Validator { image, program: "/opt/cni/bin/kong-mesh-cni" }
    }
}

/// A pod as Kong Mesh's injector shapes it (annotations as in
/// testenv/kuma-reference/injected/pod-34.yaml, inbound on 15006): the `kuma-validation`
/// init container runs our validator as the sidecar's UID, `kuma-sidecar` is a stand-in
/// that answers on 15001/15006 as UID 5678, and the app dials `target`.
pub fn mesh_pod(name: &str, node: &Node, target: &str, validator: Validator) -> Value {
    let as_sidecar = json!({ "runAsUser": SIDECAR_UID, "runAsGroup": SIDECAR_UID, "allowPrivilegeEscalation": false,
                             "capabilities": { "drop": ["ALL"] }, "readOnlyRootFilesystem": true });
    let mut validation = container("kuma-validation", &[]);
    validation["image"] = json!(validator.image);
    validation["command"] = json!([validator.program]);
    // As the injector passes the pod's family (Kuma: --ip-family-mode=ipv4): on "auto"
    // the validator probes IPv6 too, since the pod's loopback has ::1.
    validation["args"] = json!(["validate", "--family", "ipv4"]);
    validation["securityContext"] = as_sidecar.clone();
    let mut sidecar = container("kuma-sidecar", &["sidecar", "15001", "15006"]);
    sidecar["securityContext"] = as_sidecar;
    let mut pod = plain_pod(name, node, vec![sidecar, container("app", &["dial", target])]);
    pod["spec"]["initContainers"] = json!([validation]);
    pod["metadata"]["labels"]["kuma.io/mesh"] = json!("default");
    pod["metadata"]["annotations"] = json!({
        "kuma.io/sidecar-injected": "true",
        "kuma.io/sidecar-uid": SIDECAR_UID.to_string(),
        "kuma.io/transparent-proxying": "enabled",
        "kuma.io/transparent-proxying-inbound-port": "15006",
        "kuma.io/transparent-proxying-outbound-port": "15001",
        "kuma.io/transparent-proxying-ip-family-mode": "ipv4",
        "kuma.io/envoy-admin-port": "9901",
        "kuma.io/application-probe-proxy-port": "0",
        "kuma.io/virtual-probes": "disabled",
        "kuma.io/init-first": "true",
    });
    pod
}

/// A Deployment of `replicas` copies of `pod` (its labels select them).
pub fn deployment(name: &str, pod: Value, replicas: i32) -> Value {
    let labels = pod["metadata"]["labels"].clone();
    let mut metadata = pod["metadata"].clone();
    metadata.as_object_mut().map(|m| m.remove("name"));
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": { "name": name },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": labels },
            "template": { "metadata": metadata, "spec": pod["spec"] },
        },
    })
}

/// The line a mesh pod's app logs when its connection to `target` landed on the
/// sidecar's outbound listener with `target` as its original destination.
pub fn redirected_line(target: &str) -> String {
    format!("dial {target} -> sidecar port=15001 uid={SIDECAR_UID} orig={target}")
}

/// Every pod's app connection lands on its sidecar with `target` as its original
/// destination (the line the app logs each second); panics naming the pod otherwise.
pub async fn assert_redirected(client: &Client, pods: &[Pod], target: &str) {
    for pod in pods {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let line = log_line(client, "default", name, "app", &["->", "sidecar"], Duration::from_secs(20)).await;
        let line = line.unwrap_or_else(|e| panic!("Ready mesh pod {name} without its redirect: {e}"));
        assert_eq!(line, redirected_line(target), "{name}");
    }
}

/// The exit code of the pod's `kuma-validation` init container, once it terminated.
pub fn validation_exit(pod: &Pod) -> Option<i32> {
    let status = validation_status(pod)?;
    status.state.as_ref()?.terminated.as_ref().map(|t| t.exit_code)
}

fn validation_status(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerStatus> {
    pod.status.as_ref()?.init_container_statuses.as_ref()?.iter().find(|s| s.name == "kuma-validation")
}

/// The pod's `kuma-validation` init container ran and exited 0; panics otherwise.
pub fn assert_validator_passed(pod: &Pod) {
    let validation = validation_status(pod).expect("the validation init container ran");
    assert_eq!(validation_exit(pod), Some(0), "the validator passed: {validation:?}");
}

/// The end of the CNI pod's and the validators' logs, from the node's disk: what a
/// failure to get a pod Ready is told with.
pub fn cni_logs(node: &Node) -> String {
    let install = tail(&container_logs(node, "install-cni"), 40);
    format!("--- install-cni\n{install}--- kuma-validation\n{}", tail(&container_logs(node, "kuma-validation"), 20))
}

pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub fn pod_ip(pod: &Pod) -> String {
    pod.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default()
}

/// Why the pods of `namespace` that `params` selects are not Ready, in a few lines a
/// person can act on: each pod's phase, its containers' states and its last events;
/// then where the node's full logs were saved (the node's own dir goes with its
/// teardown).
pub async fn why_not_ready(client: &Client, node: &Node, namespace: &str, params: &ListParams) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let mut out = String::new();
    match pods.list(params).await {
        Ok(list) if list.items.is_empty() => out.push_str(&format!("no pod in {namespace} matches {params:?}\n")),
        Ok(list) => {
            for pod in list.items {
                let name = pod.metadata.name.clone().unwrap_or_default();
                let status = pod.status.clone().unwrap_or_default();
                out.push_str(&format!("pod {namespace}/{name}: {}\n", status.phase.as_deref().unwrap_or("no phase")));
                let containers =
                    status.init_container_statuses.iter().flatten().chain(status.container_statuses.iter().flatten());
                for c in containers {
                    out.push_str(&format!("  container {}: {}\n", c.name, container_state(c)));
                }
                let about = ListParams::default().fields(&format!("involvedObject.name={name}"));
                let mut list = events.list(&about).await.map(|l| l.items).unwrap_or_default();
                list.sort_by_key(|e| e.last_timestamp.clone().map(|t| t.0));
                for e in &list[list.len().saturating_sub(5)..] {
                    let (reason, note) = (e.reason.as_deref().unwrap_or("-"), e.message.as_deref().unwrap_or(""));
                    out.push_str(&format!("  event {} {reason}: {}\n", e.type_.as_deref().unwrap_or("-"), note.trim()));
                }
            }
        }
        Err(e) => out.push_str(&format!("listing pods in {namespace}: {e}\n")),
    }
    out.push_str(&format!("the node's full logs (kubelet, containerd, control plane): {}\n", node.save_logs()));
    out
}

fn container_state(c: &ContainerStatus) -> String {
    let state = c.state.clone().unwrap_or_default();
    if let Some(w) = state.waiting {
        format!("waiting: {} {}", w.reason.unwrap_or_default(), w.message.unwrap_or_default()).trim_end().to_string()
    } else if let Some(t) = state.terminated {
        format!("terminated: {} exit {} {}", t.reason.unwrap_or_default(), t.exit_code, t.message.unwrap_or_default())
            .trim_end()
            .to_string()
    } else if c.ready {
        "running, ready".into()
    } else {
        format!("running, not ready (restarts {})", c.restart_count)
    }
}

/// Creates `pod` in `default` and waits until it is Ready (within `timeout`); returns it
/// and how long that took. A failure says why ([`why_not_ready`]), then `more()`.
pub async fn run_pod(
    client: &Client,
    node: &Node,
    pod: Value,
    timeout: Duration,
    more: &dyn Fn() -> String,
) -> Result<(Pod, Duration), NodeError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(pod).map_err(|e| NodeError::Setup(format!("not a Pod: {e}")))?;
    let name = pod.metadata.name.clone().unwrap_or_default();
    let start = Instant::now();
    pods.create(&PostParams::default(), &pod)
        .await
        .map_err(|e| NodeError::Command(format!("creating pod {name}: {e}")))?;
    loop {
        let got = pods.get(&name).await.map_err(|e| NodeError::Command(format!("getting pod {name}: {e}")))?;
        if pod_ready(&got) {
            return Ok((got, start.elapsed()));
        }
        if start.elapsed() > timeout {
            let this = ListParams::default().fields(&format!("metadata.name={name}"));
            return Err(NodeError::Timeout(format!(
                "pod {name} not Ready within {timeout:?}\n{}{}",
                why_not_ready(client, node, "default", &this).await,
                more()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The last `n` lines of `log`.
pub fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n") + "\n"
}

/// Waits until the log of `namespace/pod`'s `container` (through the API server and the
/// kubelet, as `kubectl logs`) has a line containing every one of `needles`; returns
/// that line.
pub async fn log_line(
    client: &Client,
    namespace: &str,
    pod: &str,
    container: &str,
    needles: &[&str],
    timeout: Duration,
) -> Result<String, NodeError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let params = LogParams { container: Some(container.into()), ..Default::default() };
    let start = Instant::now();
    loop {
        let log = pods.logs(pod, &params).await.unwrap_or_else(|e| format!("(logs: {e})"));
        if let Some(line) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return Ok(line.to_string());
        }
        if start.elapsed() > timeout {
            return Err(NodeError::Timeout(format!(
                "{namespace}/{pod}/{container}: no line with {needles:?} within {timeout:?}; log:\n{}",
                tail(&log, 20)
            )));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Every log file the kubelet keeps for containers named `name`, from the node's disk.
pub fn container_logs(node: &Node, name: &str) -> String {
    let mut out = String::new();
    for pod in std::fs::read_dir(&node.pod_logs_dir).into_iter().flatten().flatten() {
        for file in std::fs::read_dir(pod.path().join(name)).into_iter().flatten().flatten() {
            out += &std::fs::read_to_string(file.path()).unwrap_or_default();
        }
    }
    out
}

/// PIDs of the sandbox (pause) processes of the pod with UID `uid` on `node`.
pub fn sandbox_pids(node: &Node, uid: &str) -> Vec<i32> {
    pod_pids(node, Some(uid), b"/standin\0pause\0")
}

/// PIDs of the processes in `node`'s pods running `program` (their command line's
/// first word): a container's main process, to kill as the kernel's OOM killer would.
pub fn container_pids(node: &Node, program: &str) -> Vec<i32> {
    pod_pids(node, None, format!("{program}\0").as_bytes())
}

/// What the network namespace of `pid` (a pod's sandbox) holds of nftables and of
/// legacy iptables.
pub fn rules_in(pid: i32) -> (String, String) {
    let target = pid.to_string();
    let nft = crate::net::sh("nsenter", &["-t", &target, "-n", "nft", "list", "ruleset"]);
    let legacy = crate::net::sh("nsenter", &["-t", &target, "-n", "iptables-legacy-save"]);
    (nft, legacy)
}

/// Waits up to `within` for the CNI plugin at `binary` to be run, and returns as it
/// starts: true then, with its call (a few ms) in flight. An fanotify mark for exec
/// opens of the binary, set before waiting: polling /proc for the process misses a
/// call that short. Blocking.
pub fn plugin_starts(binary: &std::path::Path, within: Duration) -> std::io::Result<bool> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let path = std::ffi::CString::new(binary.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: fanotify_init(2) takes flags only; the result is checked.
    let fd = unsafe { libc::fanotify_init(libc::FAN_CLASS_NOTIF | libc::FAN_CLOEXEC, libc::O_RDONLY as u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a valid descriptor and a NUL-terminated path.
    let rc = unsafe {
        libc::fanotify_mark(fd.as_raw_fd(), libc::FAN_MARK_ADD, libc::FAN_OPEN_EXEC, libc::AT_FDCWD, path.as_ptr())
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut poll = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let timeout = i32::try_from(within.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut poll, 1, timeout) };
    if ready < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if ready == 0 {
        return Ok(false);
    }
    // Each event carries a descriptor of the binary: read them to close them.
    let mut buf = [0u8; 4096];
    // SAFETY: buf is valid for its length.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    let size = std::mem::size_of::<libc::fanotify_event_metadata>();
    let mut at = 0;
    while n > 0 && at + size <= n as usize {
        // SAFETY: the kernel wrote whole events; read_unaligned copes with the offset.
        let event: libc::fanotify_event_metadata = unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
        if event.fd >= 0 {
            // SAFETY: the event's descriptor is ours to close.
            drop(unsafe { OwnedFd::from_raw_fd(event.fd) });
        }
        at += (event.event_len as usize).max(size);
    }
    Ok(true)
}

/// Processes in the cgroups of `node`'s pods (of the pod with UID `uid` only, if given)
/// whose command line starts with `cmdline` (NUL-separated words, as in /proc).
fn pod_pids(node: &Node, uid: Option<&str>, cmdline: &[u8]) -> Vec<i32> {
    let cgroup = format!("/{}/", node.name);
    let pod = uid.map(|uid| format!("pod{uid}"));
    let ours = |groups: &str| {
        groups.lines().any(|l| l.contains(&cgroup) && pod.as_ref().is_none_or(|p| l.contains(p.as_str())))
    };
    pids(|pid| ours(&std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default()), cmdline)
}

/// The processes `keep` keeps whose command line starts with `cmdline`.
fn pids(keep: impl Fn(i32) -> bool, cmdline: &[u8]) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default().starts_with(cmdline) && keep(pid)
        })
        .collect()
}
