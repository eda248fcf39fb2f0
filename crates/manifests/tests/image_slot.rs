//! Our image in the image slot of Kuma's own chart: for each CNI DaemonSet that Kuma
//! v2.14.3's chart rendered (testenv/kuma-reference/chart/), the installer container is
//! run from our image's filesystem (scripts/image-build.sh, unpacked) exactly as that
//! DaemonSet declares it: its command and args (`sh -c -- "sleep N && exec /install-cni"`),
//! its env with the ConfigMap's `cni_network_config` (`type: kuma-cni`), its volume
//! mounts, a read-only root, and the service-account files the kubelet projects. Its
//! readiness probe is run the same way. Then a mesh pod's ADD through libcni, with the
//! configuration it left on the node, must get its redirect.
//!
//! The node: this test re-runs itself in a private mount namespace where /etc, /opt and
//! /var/lib are overlays on a tmpfs, so the DaemonSet's hostPath volumes
//! (/etc/cni/net.d, /opt/cni/bin, ...) are those very paths, and the plugin, invoked by
//! libcni from the host bin dir, reads the kubeconfig the installer wrote at the path it
//! named; all of it disappears with the namespace. The container gets its own mount and
//! network namespaces (Kuma's DaemonSet does not use the host network).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_norway::Value;
use testkit::{ApiServer, Attachment, CniRuntime, NamedNetns, Plugins, pod, policy_rule};

const NODE: &str = "KMC_IMAGE_SLOT_NODE";
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[test]
fn our_image_runs_in_the_slot_of_kumas_daemonset() {
    if testkit::skip_heavy("our image in Kuma's DaemonSet") || !testkit::net::require_root() {
        return;
    }
    if let Some(node) = std::env::var_os(NODE) {
        return on_the_node(Path::new(&node));
    }
    // Built out here: cargo and apt see the real machine.
    let layout = common::image().to_owned();
    let bin = testkit::bin_dir().to_owned();
    let node = tempfile::tempdir().unwrap();
    std::fs::create_dir(node.path().join("mnt")).unwrap();
    let script = r#"set -e
        mount -t tmpfs node "$KMC_IMAGE_SLOT_NODE"
        for d in etc opt var/lib; do
            mkdir -p "$KMC_IMAGE_SLOT_NODE/$d/upper" "$KMC_IMAGE_SLOT_NODE/$d/work"
            mount -t overlay node -o "lowerdir=/$d,upperdir=$KMC_IMAGE_SLOT_NODE/$d/upper,workdir=$KMC_IMAGE_SLOT_NODE/$d/work" "/$d"
        done
        exec "$0" "$@""#;
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c", script])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "our_image_runs_in_the_slot_of_kumas_daemonset", "--nocapture", "--test-threads=1"])
        .env(NODE, node.path().join("mnt"))
        .env("KMC_IMAGE", &layout)
        .env("KMC_TESTENV_BIN", &bin)
        .stdin(Stdio::null())
        .output()
        .expect("running unshare");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    assert!(out.status.success() && text.contains("1 passed"), "the run on the node failed");
}

/// The DaemonSet's installer container and the ConfigMaps of one rendered file.
struct Slot {
    file: String,
    container: Value,
    volumes: Vec<Value>,
    config_maps: BTreeMap<String, Value>,
}

fn slots() -> Vec<Slot> {
    let dir = testkit::repo_root().join("testenv/kuma-reference/chart");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let docs = common::objects_in_order(&text);
            let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").expect("a DaemonSet");
            let spec = &ds["spec"]["template"]["spec"];
            let container = spec["containers"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|c| c["name"] == "install-cni")
                .expect("the install-cni container")
                .clone();
            let config_maps = docs
                .iter()
                .filter(|d| d["kind"] == "ConfigMap")
                .map(|d| (d["metadata"]["name"].as_str().unwrap().to_owned(), d["data"].clone()))
                .collect();
            Slot {
                file: path.file_name().unwrap().to_string_lossy().into_owned(),
                container,
                volumes: spec["volumes"].as_sequence().cloned().unwrap_or_default(),
                config_maps,
            }
        })
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence().into_iter().flatten().map(|s| s.as_str().expect("a string").to_owned()).collect()
}

/// The container's env as the kubelet resolves it (configMapKeyRef from the ConfigMap).
fn resolve_env(slot: &Slot) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for e in slot.container["env"].as_sequence().into_iter().flatten() {
        let name = e["name"].as_str().unwrap().to_owned();
        let value = match (&e["value"], &e["valueFrom"]["configMapKeyRef"]) {
            (Value::String(v), _) => v.clone(),
            (_, r @ Value::Mapping(_)) => {
                let cm = &slot.config_maps[r["name"].as_str().unwrap()];
                cm[r["key"].as_str().unwrap()].as_str().expect("the ConfigMap has the key").to_owned()
            }
            other => panic!("{}: env {name}: {other:?} is not handled", slot.file),
        };
        env.push((name, value));
    }
    env
}

/// A container: its root (our image, unpacked), its mounts (source on the node ->
/// path in the container), and how to run a command in it.
struct Container {
    root: tempfile::TempDir,
    mounts: Vec<(PathBuf, String)>,
    env: Vec<(String, String)>,
}

impl Container {
    /// `unshare` (own mount and network namespaces) + the mounts + a read-only root +
    /// `chroot`, then `argv` with exactly `env`.
    fn command(&self, argv: &[String]) -> Command {
        let root = self.root.path().display().to_string();
        // As a container runtime does: /proc and /dev are made, not part of the image.
        let mut script = format!("set -e\nmkdir -p {root}/proc {root}/dev\nmount --bind {root} {root}\n");
        script += &format!("mount -t proc proc {root}/proc\n");
        script += &format!("mount --rbind /dev {root}/dev\n");
        for (source, target) in &self.mounts {
            script += &format!("mount --bind {} {root}{target}\n", source.display());
        }
        script += &format!("mount -o remount,bind,ro {root}\nexec chroot {root} \"$@\"\n");
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--net", "--propagation", "private", "--", "/bin/sh", "-c", &script, "sh"]);
        cmd.args(argv).env_clear().envs(self.env.iter().cloned()).stdin(Stdio::null());
        cmd
    }
}

/// The installer's process; SIGTERM and a wait on drop (it takes its configuration out).
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child.kill().ok();
        self.child.wait().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.terminate();
        }
    }
}

fn on_the_node(node: &Path) {
    let layout = common::image();
    let server = ApiServer::shared();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ns = rt.block_on(server.namespace("kmc-slot"));
    let creds = tempfile::tempdir_in(node).unwrap();
    let projected = rt.block_on(server.project_service_account(ns.name(), "kong-mesh-cni", creds.path()));
    rt.block_on(ns.grant("kong-mesh-cni", "pod-reader", vec![policy_rule(&[""], &["pods"], &["get"])]));
    let mesh_pod = pod("app").annotation("kuma.io/sidecar-injected", "true").container("app").container("kuma-sidecar");
    rt.block_on(ns.create_pod(mesh_pod.build()));
    let image_env: Vec<(String, String)> = common::image_parts(layout).1["config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).unwrap())
        .collect();

    let mut ran = 0;
    for slot in slots() {
        let command = strings(&slot.container["command"]);
        let args = strings(&slot.container["args"]);
        if command.is_empty() && args.first().is_some_and(|a| a == "/app/mbctl") {
            // Kuma's eBPF mode runs another image (merbridge) in this slot: not ours to
            // fill. Our eBPF mode runs in our own image (see the chart tests).
            let image = slot.container["image"].as_str().unwrap();
            assert!(image.contains("/merbridge:"), "{}: {image}", slot.file);
            eprintln!("{}: the eBPF slot ({image}), not an image slot of this CNI", slot.file);
            continue;
        }
        eprintln!("{}: {command:?} {args:?}", slot.file);
        assert_eq!(command, ["sh", "-c", "--"], "{}", slot.file);
        run_slot(&slot, [command, args].concat(), &image_env, &projected, ns.name(), layout, node);
        ran += 1;
    }
    assert_eq!(ran, 3, "kind, eks and multus-default are image slots of ours");
}

fn run_slot(
    slot: &Slot,
    argv: Vec<String>,
    image_env: &[(String, String)],
    projected: &testkit::ProjectedServiceAccount,
    namespace: &str,
    layout: &Path,
    node: &Path,
) {
    let what = &slot.file;
    let env = resolve_env(slot);
    let get = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default();
    let root = tempfile::tempdir_in(node).unwrap();
    common::unpack_image(layout, root.path());

    // Mounts: hostPath volumes are the node's paths; emptyDirs fresh dirs.
    let mut mounts = Vec::new();
    let mut scratch = Vec::new();
    let mut host_path_of = BTreeMap::new();
    for m in slot.container["volumeMounts"].as_sequence().unwrap() {
        let name = m["name"].as_str().unwrap();
        let target = m["mountPath"].as_str().unwrap().to_owned();
        let volume = slot.volumes.iter().find(|v| v["name"] == name).expect("the mount's volume");
        let source = match (volume["hostPath"]["path"].as_str(), volume.get("emptyDir")) {
            (Some(path), _) => {
                std::fs::create_dir_all(path).unwrap();
                host_path_of.insert(target.clone(), PathBuf::from(path));
                PathBuf::from(path)
            }
            (None, Some(_)) => {
                let dir = tempfile::tempdir_in(node).unwrap();
                let path = dir.path().to_owned();
                scratch.push(dir);
                path
            }
            _ => panic!("{what}: volume {name} is neither hostPath nor emptyDir"),
        };
        std::fs::create_dir_all(root.path().join(target.trim_start_matches('/'))).unwrap();
        mounts.push((source, target));
    }
    // What the kubelet adds: the service account's files and the API server's address.
    std::fs::create_dir_all(root.path().join(SA_DIR.trim_start_matches('/'))).unwrap();
    mounts.push((projected.token_file.parent().unwrap().to_owned(), SA_DIR.to_owned()));
    let mut full_env = image_env.to_vec();
    full_env.extend(env.iter().cloned());
    full_env.push(("KUBERNETES_SERVICE_HOST".into(), projected.host.clone()));
    full_env.push(("KUBERNETES_SERVICE_PORT".into(), projected.port.clone()));
    // No DaemonSet of the slot exists in this API server to ask about at SIGTERM: the
    // removal checked below is asked for as an uninstall.
    full_env.push(("KMC_UNINSTALL_ON_SIGTERM".into(), "always".into()));
    let container = Container { root, mounts, env: full_env };

    let net_dir = host_path_of["/host/etc/cni/net.d"].clone();
    let bin_dir = host_path_of["/host/opt/cni/bin"].clone();
    assert_eq!(net_dir, Path::new(&get("CNI_NET_DIR")), "{what}: CNI_NET_DIR is the net dir's host path");
    let chained = get("CHAINED_CNI_PLUGIN") == "true";
    let conf_name = get("CNI_CONF_NAME");
    // The node's primary CNI: the reference bridge chain, under the name the chart expects.
    let primary = CniRuntime::bridge(Plugins::Upstream);
    if chained {
        std::fs::write(net_dir.join(&conf_name), serde_json::to_vec_pretty(&primary.conflist()).unwrap()).unwrap();
    }

    let log = node.join(format!("{what}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let child =
        container.command(&argv).stdout(out.try_clone().unwrap()).stderr(out).spawn().expect("starting the container");
    let mut installer = Running { child, log };

    // The DaemonSet's readiness probe, run in the container the same way.
    let probe = strings(&slot.container["readinessProbe"]["exec"]["command"]);
    assert_eq!(probe, ["cat", "/tmp/ready"], "{what}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if container.command(&probe).stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap().success() {
            break;
        }
        if Instant::now() > deadline || installer.child.try_wait().unwrap().is_some() {
            panic!("{what}: not ready; installer log:\n{}", installer.log());
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // Installed under the type their ConfigMap names.
    let template: serde_json::Value = serde_json::from_str(&get("CNI_NETWORK_CONFIG")).unwrap();
    assert_eq!(template["type"], "kuma-cni", "{what}");
    assert!(bin_dir.join("kuma-cni").is_file(), "{what}: the plugin is in the bin dir");

    // A mesh pod's ADD through libcni, from what the installer left in the net dir.
    let netns = NamedNetns::new("slot");
    let ours = CniRuntime::net_dir(&net_dir, vec![bin_dir.clone(), Plugins::Upstream.dir()]);
    let pod = Attachment::new(&netns, namespace, "app");
    let extra = Attachment { ifname: "net1".into(), ..pod.clone() };
    if chained {
        let list: serde_json::Value =
            serde_json::from_slice(&std::fs::read(net_dir.join(&conf_name)).unwrap()).unwrap();
        assert_eq!(list["plugins"].as_array().unwrap().last().unwrap()["type"], "kuma-cni", "{what}: chained last");
        ours.add(&pod).unwrap_or_else(|e| panic!("{what}: ADD: {e}\ninstaller log:\n{}", installer.log()));
    } else {
        // Multus: the primary network first, then ours as the pod's extra attachment.
        assert!(net_dir.join(&conf_name).is_file(), "{what}: our own {conf_name}");
        primary.add(&pod).expect("the primary network");
        ours.add(&extra).unwrap_or_else(|e| panic!("{what}: ADD: {e}\ninstaller log:\n{}", installer.log()));
    }
    // Whichever backend the plugin chose.
    let save = |program: &str| {
        let out = Command::new("ip").args(["netns", "exec", &netns.name, program, "-t", "nat"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let rules = save("iptables-nft-save") + &save("iptables-legacy-save");
    assert!(
        rules.contains("-j KUMA_MESH_OUTBOUND_REDIRECT") && rules.contains("--to-ports 15001"),
        "{what}: the mesh pod has no redirect:\n{rules}"
    );

    // DEL while the configuration is still there (the pod goes before the CNI).
    match chained {
        true => ours.del(&pod).unwrap_or_else(|e| panic!("{what}: DEL: {e}")),
        false => {
            ours.del(&extra).unwrap_or_else(|e| panic!("{what}: DEL: {e}"));
            primary.del(&pod).expect("the primary network's DEL");
        }
    }
    let status = installer.terminate();
    assert!(status.success(), "{what}: installer exit {status}:\n{}", installer.log());
    if chained {
        let list: serde_json::Value =
            serde_json::from_slice(&std::fs::read(net_dir.join(&conf_name)).unwrap()).unwrap();
        assert_eq!(list, primary.conflist(), "{what}: SIGTERM restored the primary's conflist");
    }
    if chained {
        std::fs::remove_file(net_dir.join(&conf_name)).unwrap();
    }
    eprintln!("{what}: ready, ADD redirected, removed on SIGTERM");
}
