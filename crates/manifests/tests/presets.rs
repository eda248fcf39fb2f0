//! What matters in the rendered manifests, per preset: the host paths, the conf name
//! and chained flag of DESIGN.md's table, a privileged installer, our taint tolerated,
//! least-privilege RBAC (the installer's, and exactly the controller crate's files),
//! and that the installer and the controller accept the settings the chart gives them
//! (every env var parsed by their real argument parsers).

use std::collections::BTreeMap;

use clap::{Args as _, CommandFactory as _};
use manifests::{Chart, Options, to_stream};
use serde_norway::Value;

const TABLE: &[(&str, &str, &str, &str, bool)] = &[
    ("eks", "/etc/cni/net.d", "/opt/cni/bin", "10-aws.conflist", true),
    ("aks", "/etc/cni/net.d", "/opt/cni/bin", "10-azure.conflist", true),
    ("aks-overlay", "/etc/cni/net.d", "/opt/cni/bin", "15-azure-swift-overlay.conflist", true),
    ("calico", "/etc/cni/net.d", "/opt/cni/bin", "10-calico.conflist", true),
    ("cilium", "/etc/cni/net.d", "/opt/cni/bin", "05-cilium.conflist", true),
    ("cilium-pre-1.14", "/etc/cni/net.d", "/opt/cni/bin", "05-cilium.conf", true),
    ("gke-cilium", "/etc/cni/net.d", "/home/kubernetes/bin", "05-cilium.conflist", true),
    ("gke-calico", "/etc/cni/net.d", "/home/kubernetes/bin", "10-calico.conflist", true),
    ("gke-dataplane-v2", "/etc/cni/net.d", "/home/kubernetes/bin", "10-gke-ptp.conflist", true),
    ("k3d-flannel", "/var/lib/rancher/k3s/agent/etc/cni/net.d", "/bin", "10-flannel.conflist", true),
    ("kind", "/etc/cni/net.d", "/opt/cni/bin", "10-kindnet.conflist", true),
    ("openshift-3.11", "/etc/cni/multus/net.d", "/var/lib/cni/bin", "kuma-cni.conf", false),
    ("openshift-4", "/etc/cni/multus/net.d", "/var/lib/cni/bin", "kuma-cni.conf", false),
];

struct Rendered {
    objects: BTreeMap<(String, String), Value>,
}

impl Rendered {
    fn new(preset: Option<&str>, set: &[&str]) -> Rendered {
        let opts = Options {
            preset: preset.map(Into::into),
            set: set.iter().map(|s| s.to_string()).collect(),
            ..Options::default()
        };
        let stream = to_stream(&Chart::embedded().render(&opts).unwrap());
        let mut objects = BTreeMap::new();
        for doc in serde_norway::Deserializer::from_str(&stream) {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap();
            let key = (v["kind"].as_str().unwrap().to_owned(), v["metadata"]["name"].as_str().unwrap().to_owned());
            objects.insert(key, v);
        }
        Rendered { objects }
    }
    fn get(&self, kind: &str, name: &str) -> &Value {
        self.objects.get(&(kind.into(), name.into())).unwrap_or_else(|| panic!("no {kind} {name}"))
    }
    fn daemonset(&self) -> &Value {
        self.get("DaemonSet", "kong-mesh-cni")
    }
    fn installer(&self) -> &Value {
        &self.daemonset()["spec"]["template"]["spec"]["containers"][0]
    }
    fn controller(&self) -> &Value {
        &self.get("Deployment", "kong-mesh-cni-controller")["spec"]["template"]["spec"]["containers"][0]
    }
    fn network_config(&self) -> String {
        self.get("ConfigMap", "kong-mesh-cni-config")["data"]["cni_network_config"].as_str().unwrap().to_owned()
    }
}

#[test]
fn monitoring_is_off_by_default_and_scrapes_the_installer_when_on() {
    for (preset, ..) in TABLE {
        let r = Rendered::new(Some(preset), &[]);
        assert!(!r.objects.keys().any(|(kind, _)| kind == "PodMonitor"), "{preset}");
        assert!(!r.objects.contains_key(&("ConfigMap".into(), "kong-mesh-cni-dashboard".into())), "{preset}");
    }
    let r = Rendered::new(
        Some("kind"),
        &[
            "cni.metrics.podMonitor.enabled=true",
            "cni.metrics.podMonitor.labels.release=prometheus",
            "cni.metrics.dashboard.enabled=true",
        ],
    );
    let monitor = r.get("PodMonitor", "kong-mesh-cni");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    // It selects the DaemonSet's pods, in their namespace, on the installer's port.
    let pod_labels = &r.daemonset()["spec"]["template"]["metadata"]["labels"];
    for (k, v) in monitor["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(&pod_labels[k.as_str().unwrap()], v, "the pods carry {k:?}");
    }
    assert_eq!(monitor["spec"]["namespaceSelector"]["matchNames"][0], r.daemonset()["metadata"]["namespace"]);
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!((endpoint["path"].as_str(), endpoint["interval"].as_str()), (Some("/metrics"), Some("30s")));
    let port = r.installer()["ports"].as_sequence().unwrap().iter().find(|p| p["name"] == endpoint["port"]);
    assert_eq!(port.unwrap()["containerPort"], 9081, "the port it scrapes is the installer's health port");
    // The dashboard is the chart's file, whole.
    let dashboard = r.get("ConfigMap", "kong-mesh-cni-dashboard");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let file = include_str!("../../../deployments/charts/kong-mesh-cni/files/grafana/kong-mesh-cni.json");
    assert_eq!(dashboard["data"]["kong-mesh-cni.json"].as_str().unwrap(), file.trim_end());
    let json: serde_json::Value = serde_json::from_str(file).unwrap();
    let titles: Vec<&str> = json["panels"].as_array().unwrap().iter().filter_map(|p| p["title"].as_str()).collect();
    for want in [
        "Plugin calls by outcome",
        "ADD latency p50 / p99",
        "Passed through, by reason",
        "Failures by CNI code",
        "Repairs",
    ] {
        assert!(titles.contains(&want), "{want} in {titles:?}");
    }
}

fn env(container: &Value) -> BTreeMap<String, Value> {
    container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e.clone()))
        .collect()
}

fn env_value(container: &Value, name: &str) -> String {
    env(container).get(name).unwrap_or_else(|| panic!("no env {name}"))["value"]
        .as_str()
        .unwrap_or_else(|| panic!("{name} has no value"))
        .to_owned()
}

fn host_path(ds: &Value, volume: &str) -> String {
    let volumes = ds["spec"]["template"]["spec"]["volumes"].as_sequence().unwrap();
    let v = volumes.iter().find(|v| v["name"] == volume).unwrap_or_else(|| panic!("no volume {volume}"));
    v["hostPath"]["path"].as_str().unwrap().to_owned()
}

fn mount_path(container: &Value, volume: &str) -> String {
    let m = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume)
        .unwrap_or_else(|| panic!("no mount of {volume}"));
    m["mountPath"].as_str().unwrap().to_owned()
}

/// The rules of one of the chart's controller RBAC files (those the controller's tests
/// run the controller bound to).
fn rules_of(file: &str) -> Value {
    let chart = Chart::embedded();
    let v: Value = serde_norway::from_str(&chart.files()[&format!("files/controller-rbac/{file}")]).unwrap();
    v["rules"].clone()
}

#[test]
fn every_preset_has_its_paths_conf_name_and_mode() {
    for (preset, net_dir, bin_dir, conf, chained) in TABLE {
        let r = Rendered::new(Some(preset), &[]);
        let (ds, installer) = (r.daemonset(), r.installer());
        assert_eq!(host_path(ds, "cni-net-dir"), *net_dir, "{preset}");
        assert_eq!(host_path(ds, "cni-bin-dir"), *bin_dir, "{preset}");
        assert_eq!(env_value(installer, "CNI_NET_DIR"), *net_dir, "{preset}: the host path written into our conf");
        assert_eq!(env_value(installer, "CNI_CONF_NAME"), *conf, "{preset}");
        assert_eq!(env_value(installer, "CHAINED_CNI_PLUGIN"), chained.to_string(), "{preset}");
        assert_eq!(env_value(installer, "MOUNTED_CNI_NET_DIR"), mount_path(installer, "cni-net-dir"), "{preset}");
        assert_eq!(env_value(installer, "MOUNTED_CNI_BIN_DIR"), mount_path(installer, "cni-bin-dir"), "{preset}");
        assert_eq!(
            installer["securityContext"]["privileged"],
            Value::Bool(true),
            "{preset}: the installer writes host dirs as root"
        );
        let conf: serde_json::Value = serde_json::from_str(&r.network_config()).unwrap();
        assert_eq!(conf["kubernetes"]["cni_bin_dir"], *bin_dir, "{preset}");
    }
}

#[test]
fn the_daemonset_runs_everywhere_including_nodes_waiting_for_it() {
    for (preset, ..) in TABLE {
        let r = Rendered::new(Some(preset), &["cni.tolerations[0].key=dedicated,cni.tolerations[0].operator=Exists"]);
        let spec = &r.daemonset()["spec"]["template"]["spec"];
        let tolerations = spec["tolerations"].as_sequence().unwrap();
        let has = |key: Option<&str>, effect: Option<&str>| {
            tolerations.iter().any(|t| {
                t["operator"] == "Exists"
                    && t.get("key").and_then(Value::as_str) == key
                    && t.get("effect").and_then(Value::as_str) == effect
            })
        };
        assert!(has(Some("NodeReadiness"), Some("NoSchedule")), "{preset}: our taint");
        assert!(
            has(None, Some("NoSchedule")) && has(None, Some("NoExecute")),
            "{preset}: every NoSchedule/NoExecute taint"
        );
        assert!(has(Some("dedicated"), None), "{preset}: user tolerations are added");
        assert_eq!(spec["priorityClassName"], "system-node-critical");
        assert_eq!(spec["hostNetwork"], Value::Bool(true));
        assert_eq!(spec["serviceAccountName"], "kong-mesh-cni");
        let installer = r.installer();
        assert_eq!(installer["command"], serde_norway::from_str::<Value>("[/install-cni]").unwrap());
        // Readiness is the installer's /readyz on its declared host port; the ready file
        // it mirrors is on a mount that a read-only root allows.
        assert_eq!(installer["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(installer["readinessProbe"]["httpGet"]["port"], "health");
        let port = &installer["ports"][0];
        assert_eq!(
            (&port["name"], &port["containerPort"], &port["hostPort"]),
            (&"health".into(), &9081.into(), &9081.into())
        );
        assert_eq!(env_value(installer, "KMC_HEALTH_PORT"), "9081");
        assert_eq!(mount_path(installer, "tmp"), "/tmp");
        // The controller must run on tainted nodes to untaint them.
        let ctl = &r.get("Deployment", "kong-mesh-cni-controller")["spec"]["template"]["spec"]["tolerations"];
        assert!(
            ctl.as_sequence().unwrap().iter().any(|t| t["key"] == "NodeReadiness" && t["effect"] == "NoSchedule"),
            "{preset}"
        );
    }
}

#[test]
fn the_plugin_log_socket_is_shared_with_the_host() {
    // The default, and cni.runDir moving it all (a node whose /run is not the place).
    for (set, expected) in [(None, "/run/kong-mesh-cni"), (Some("cni.runDir=/var/lib/kmc/run/"), "/var/lib/kmc/run")] {
        let r = Rendered::new(Some("kind"), set.as_slice());
        let conf: serde_json::Value = serde_json::from_str(&r.network_config()).unwrap();
        let socket = env_value(r.installer(), "KMC_LOG_SOCKET");
        assert_eq!(
            conf["log_socket"],
            socket.as_str(),
            "the plugin (on the host) and the installer (in the pod) name one socket"
        );
        let run_dir = host_path(r.daemonset(), "cni-run-dir");
        assert_eq!(run_dir, expected, "{set:?}");
        assert_eq!(conf["run_dir"], expected, "the plugin's locks and records in the same dir: {set:?}");
        assert_eq!(mount_path(r.installer(), "cni-run-dir"), run_dir, "same path inside and outside");
        assert_eq!(socket, format!("{run_dir}/log.sock"));
    }
}

fn mount<'a>(container: &'a Value, volume: &str) -> &'a Value {
    let mounts = container["volumeMounts"].as_sequence().unwrap();
    mounts.iter().find(|m| m["name"] == volume).unwrap_or_else(|| panic!("no mount of {volume}"))
}

#[test]
fn ebpf_mode_mounts_the_bpffs_and_cgroup2_of_the_node_bidirectionally() {
    for (preset, set, bpffs, cgroup) in [
        ("kind", &["experimental.ebpf.enabled=true"][..], "/sys/fs/bpf", "/sys/fs/cgroup"),
        (
            "calico",
            &[
                "experimental.ebpf.enabled=true,experimental.ebpf.bpffsPath=/run/bpf,experimental.ebpf.cgroupPath=/sys/fs/cgroup/unified",
            ][..],
            "/run/bpf",
            "/sys/fs/cgroup/unified",
        ),
    ] {
        let r = Rendered::new(Some(preset), set);
        let (ds, installer) = (r.daemonset(), r.installer());
        assert_eq!(env_value(installer, "KMC_EBPF"), "true", "{preset}");
        assert_eq!(env_value(installer, "KMC_EBPF_BPFFS_PATH"), bpffs, "{preset}");
        assert_eq!(env_value(installer, "KMC_EBPF_CGROUP_PATH"), cgroup, "{preset}");
        for (volume, path) in [("bpffs", bpffs), ("cgroup", cgroup)] {
            // The same path inside: the plugin on the host opens the pins the installer names.
            assert_eq!(host_path(ds, volume), path, "{preset}");
            assert_eq!(mount_path(installer, volume), path, "{preset}");
            assert_eq!(mount(installer, volume)["mountPropagation"], "Bidirectional", "{preset} {volume}");
        }
        assert_eq!(installer["securityContext"]["privileged"], Value::Bool(true), "{preset}");
    }
    let iptables = Rendered::new(Some("kind"), &[]);
    assert!(!env(iptables.installer()).contains_key("KMC_EBPF"), "iptables mode by default");
    let volumes = iptables.daemonset()["spec"]["template"]["spec"]["volumes"].as_sequence().unwrap().clone();
    assert!(volumes.iter().all(|v| v["name"] != "bpffs" && v["name"] != "cgroup"), "no host BPF mounts by default");
}

#[test]
fn in_place_repair_and_the_sigterm_question_have_what_they_need() {
    let r = Rendered::new(Some("kind"), &[]);
    // The pods' namespaces at the path the runtime names them by, new ones included.
    // containerd and CRI-O by default, and containerd with netns_mounts_under_state_dir.
    let dirs = ["/var/run/netns", "/run/containerd/io.containerd.grpc.v1.cri/netns"];
    for (i, dir) in dirs.iter().enumerate() {
        let name = format!("netns-dir-{i}");
        assert_eq!(host_path(r.daemonset(), &name), *dir);
        assert_eq!(mount_path(r.installer(), &name), *dir);
        let mounts = r.installer()["volumeMounts"].as_sequence().unwrap().clone();
        let mount = mounts.iter().find(|m| m["name"] == name.as_str()).unwrap();
        assert_eq!(mount["mountPropagation"], "HostToContainer");
    }
    // Another runtime's state dir instead (k3s).
    let k3s = "/run/k3s/containerd/io.containerd.grpc.v1.cri/netns";
    let r = Rendered::new(Some("kind"), &[&format!("cni.netnsDirs={{{k3s}}}")]);
    assert_eq!(mount_path(r.installer(), "netns-dir-0"), k3s);
    assert_eq!(host_path(r.daemonset(), "netns-dir-0"), k3s);
    // The DaemonSet it asks about at SIGTERM is this one.
    assert_eq!(env_value(r.installer(), "KMC_DAEMONSET_NAME"), r.daemonset()["metadata"]["name"].as_str().unwrap());
    let namespace = &env(r.installer())["KMC_DAEMONSET_NAMESPACE"];
    assert_eq!(namespace["valueFrom"]["fieldRef"]["fieldPath"], "metadata.namespace");
}

#[test]
fn the_installer_accepts_what_the_chart_gives_it() {
    let flags: BTreeMap<String, String> = installer::InstallArgs::command()
        .get_arguments()
        .filter_map(|a| Some((a.get_env()?.to_str()?.to_owned(), a.get_long()?.to_owned())))
        .collect();
    let ebpf: &[&str] = &["experimental.ebpf.enabled=true"];
    let cases = TABLE.iter().map(|(p, ..)| (*p, &[][..])).chain([("", &[][..]), ("kind", ebpf)]);
    for (preset, set) in cases {
        let r = Rendered::new(Some(preset).filter(|p| !p.is_empty()), set);
        let mut argv = vec!["install".to_string(), "--kubernetes-service-host".into(), "10.96.0.1".into()];
        for (name, entry) in env(r.installer()) {
            // The binary's global --log-level and --log-format read CNI_LOG_LEVEL and
            // CNI_LOG_FORMAT; every other variable must be one of the installer's.
            if name == "CNI_LOG_LEVEL" || name == "CNI_LOG_FORMAT" {
                continue;
            }
            let long = flags.get(&name).unwrap_or_else(|| panic!("{preset}: the installer has no variable {name}"));
            let value = match (entry["value"].as_str(), entry["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
                (Some(v), _) => v.to_owned(),
                (None, Some("spec.nodeName")) => "node-1".to_owned(),
                (None, _) => r.network_config(),
            };
            argv.extend([format!("--{long}"), value]);
        }
        let args =
            <installer::InstallArgs as clap::Parser>::try_parse_from(&argv).unwrap_or_else(|e| panic!("{preset}: {e}"));
        let settings = installer::Settings::from_args(args)
            .unwrap_or_else(|e| panic!("{preset}: the installer refuses the chart's settings: {e}"));
        assert_eq!(settings.ours.binary, "kong-mesh-cni", "{preset}: the binary's name on the host");
        assert_eq!(
            settings.ours.conf["kubernetes"]["kubeconfig"],
            format!("{}/ZZZ-kuma-cni-kubeconfig", env_value(r.installer(), "CNI_NET_DIR"))
        );
        assert_eq!(
            settings.ours.conf["name"], "kuma-cni",
            "Kuma's injector annotates mesh pods with networks: kuma-cni"
        );
        assert_eq!(settings.ours.conf["kubernetes"]["exclude_namespaces"], serde_json::json!(["kube-system"]));
        let agent = settings.agent().unwrap_or_else(|| panic!("{preset}: the installer is the node agent"));
        assert_eq!(agent.node_name, "node-1", "{preset}");
        let bpffs = settings.ebpf.as_ref().map(|p| p.bpffs.to_str().unwrap().to_owned());
        assert_eq!(bpffs, (!set.is_empty()).then(|| "/sys/fs/bpf".to_owned()), "{preset} {set:?}");
        assert_eq!(settings.ours.conf.get("ebpf").map(|e| e["bpffs_path"].clone()), bpffs.map(Into::into));
    }
}

#[test]
fn the_node_agent_knows_its_node_and_listens_where_the_plugin_looks() {
    let r = Rendered::new(Some("kind"), &[]);
    let node = &env(r.installer())["NODE_NAME"];
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName", "from the downward API");
    let conf: serde_json::Value = serde_json::from_str(&r.network_config()).unwrap();
    // The plugin looks in its run_dir (default /run/kong-mesh-cni), on the host.
    let run_dir = conf["run_dir"].as_str().unwrap_or("/run/kong-mesh-cni");
    assert_eq!(host_path(r.daemonset(), "cni-run-dir"), run_dir);
    assert_eq!(mount_path(r.installer(), "cni-run-dir"), run_dir, "same path inside and outside");
}

#[test]
fn the_controller_accepts_what_the_chart_gives_it() {
    let command = controller::ControllerArgs::augment_args(clap::Command::new("controller"));
    let flags: BTreeMap<String, String> = command
        .get_arguments()
        .filter_map(|a| Some((a.get_env()?.to_str()?.to_owned(), a.get_long()?.to_owned())))
        .collect();
    for (set, taint, repair) in [
        (&[][..], true, "delete"),
        (&["cni.taintController.enabled=false", "cni.controller.repairAction=label"][..], false, "label"),
    ] {
        let r = Rendered::new(Some("kind"), set);
        let ctl = r.controller();
        assert_eq!(
            ctl["command"],
            serde_norway::from_str::<Value>("[/opt/cni/bin/kong-mesh-cni, controller]").unwrap()
        );
        let mut argv = Vec::new();
        for (name, entry) in env(ctl) {
            if name == "CNI_LOG_LEVEL" || name == "CNI_LOG_FORMAT" {
                continue;
            }
            let long = flags.get(&name).unwrap_or_else(|| panic!("the controller has no variable {name}"));
            let value = entry["value"].as_str().unwrap_or("from-the-downward-api").to_owned();
            argv.extend([format!("--{long}"), value]);
        }
        let args = controller::ControllerArgs::from_flags(&argv).unwrap_or_else(|e| panic!("{set:?}: {e}"));
        args.validate().unwrap();
        assert_eq!(args.taint_enabled, taint, "{set:?}");
        assert_eq!(args.repair_action.as_str(), repair);
        assert_eq!(args.cni_app, "kong-mesh-cni");
        assert_eq!(args.nad_name, "kuma-cni", "the NAD must carry the name mesh pods ask Multus for");
        // The DaemonSet's pods carry the label the taint logic looks for.
        assert_eq!(r.daemonset()["spec"]["template"]["metadata"]["labels"]["app"], args.cni_app.as_str());
        assert_eq!(args.cni_namespace, r.daemonset()["metadata"]["namespace"].as_str().unwrap());
        // The Lease it uses is the one its Role names.
        let role = r.get("Role", "kong-mesh-cni-controller-leader-election");
        assert!(
            role["rules"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|rule| rule["resourceNames"][0] == args.lease_name.as_str())
        );
    }
}

#[test]
fn rbac_is_least_privilege_and_the_controllers_own() {
    for (preset, ..) in TABLE {
        let r = Rendered::new(Some(preset), &[]);
        // The plugin gets one pod at a time; the node agent lists and watches pods,
        // marks the pods it repaired in place, says on pods what happened (Events,
        // counted up by patch), and reads its own DaemonSet only.
        let installer = r.get("ClusterRole", "kong-mesh-cni");
        assert_eq!(
            installer["rules"],
            serde_norway::from_str::<Value>(
                r#"[{apiGroups: [""], resources: [pods], verbs: [get, list, watch, patch]},
                    {apiGroups: [""], resources: [events], verbs: [create, patch]}]"#
            )
            .unwrap()
        );
        assert_eq!(
            r.get("Role", "kong-mesh-cni-daemonset")["rules"],
            serde_norway::from_str::<Value>(
                "[{apiGroups: [apps], resources: [daemonsets], resourceNames: [kong-mesh-cni], verbs: [get]}]"
            )
            .unwrap()
        );
        assert_eq!(r.get("RoleBinding", "kong-mesh-cni-daemonset")["roleRef"]["name"], "kong-mesh-cni-daemonset");
        let binding = r.get("ClusterRoleBinding", "kong-mesh-cni");
        assert_eq!(binding["subjects"][0]["name"], "kong-mesh-cni");
        assert_eq!(r.get("ClusterRole", "kong-mesh-cni-controller")["rules"], rules_of("clusterrole.yaml"), "{preset}");
        assert_eq!(
            r.get("ClusterRole", "kong-mesh-cni-controller-repair-delete")["rules"],
            rules_of("clusterrole-repair-delete.yaml")
        );
        assert_eq!(
            r.get("Role", "kong-mesh-cni-controller-leader-election")["rules"],
            rules_of("role-leader-election.yaml")
        );
        for (kind, name) in [
            ("ClusterRoleBinding", "kong-mesh-cni-controller"),
            ("ClusterRoleBinding", "kong-mesh-cni-controller-repair-delete"),
            ("RoleBinding", "kong-mesh-cni-controller-leader-election"),
        ] {
            let b = r.get(kind, name);
            assert_eq!(b["roleRef"]["name"], name);
            assert_eq!(
                b["subjects"],
                serde_norway::from_str::<Value>(
                    "[{kind: ServiceAccount, name: kong-mesh-cni-controller, namespace: kube-system}]"
                )
                .unwrap()
            );
        }
        let roles: Vec<&str> = r
            .objects
            .keys()
            .filter(|(k, _)| k.contains("Role") && !k.ends_with("Binding"))
            .map(|(_, n)| n.as_str())
            .collect();
        assert_eq!(
            roles,
            [
                "kong-mesh-cni",
                "kong-mesh-cni-controller",
                "kong-mesh-cni-controller-repair-delete",
                "kong-mesh-cni-controller-leader-election",
                "kong-mesh-cni-daemonset"
            ],
            "{preset}: no other grant"
        );
    }
    // The repair grant follows the repair action.
    let label = Rendered::new(Some("kind"), &["cni.controller.repairAction=label"]);
    assert_eq!(
        label.get("ClusterRole", "kong-mesh-cni-controller-repair-label")["rules"],
        rules_of("clusterrole-repair-label.yaml")
    );
    assert!(!label.objects.contains_key(&("ClusterRole".into(), "kong-mesh-cni-controller-repair-delete".into())));
    let off = Rendered::new(Some("kind"), &["cni.controller.repairAction=off"]);
    assert!(!off.objects.keys().any(|(_, n)| n.contains("repair")), "no repair, no pod delete/patch grant");
}

#[test]
fn namespace_moves_every_namespaced_object() {
    let opts = Options { preset: Some("kind".into()), namespace: Some("mesh-cni".into()), ..Options::default() };
    let manifests = Chart::embedded().render(&opts).unwrap();
    for m in &manifests {
        let v: Value = serde_norway::from_str(&m.content).unwrap();
        let cluster_scoped = m.kind.starts_with("Cluster");
        assert_eq!(v["metadata"].get("namespace").is_none(), cluster_scoped, "{} {}", m.kind, m.name);
        if !cluster_scoped {
            assert_eq!(v["metadata"]["namespace"], "mesh-cni", "{} {}", m.kind, m.name);
        }
        for subject in v.get("subjects").and_then(Value::as_sequence).into_iter().flatten() {
            assert_eq!(subject["namespace"], "mesh-cni");
        }
    }
}

#[test]
fn switches_and_refusals() {
    let disabled =
        Chart::embedded().render(&Options { set: vec!["cni.enabled=false".into()], ..Options::default() }).unwrap();
    assert!(disabled.is_empty(), "cni.enabled=false renders nothing");
    let taint_off = Rendered::new(Some("eks"), &["cni.taintController.enabled=false"]);
    assert_eq!(env_value(taint_off.controller(), "KUMA_RUNTIME_KUBERNETES_NODE_TAINT_CONTROLLER_ENABLED"), "false");
    assert_eq!(
        env_value(
            Rendered::new(Some("eks"), &[]).controller(),
            "KUMA_RUNTIME_KUBERNETES_NODE_TAINT_CONTROLLER_ENABLED"
        ),
        "true"
    );
    let delayed = Rendered::new(Some("kind"), &["cni.delayStartupSeconds=7"]);
    let init = &delayed.daemonset()["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(init["command"], serde_norway::from_str::<Value>("[/bin/sleep, '7']").unwrap());
    assert!(Rendered::new(Some("kind"), &[]).daemonset()["spec"]["template"]["spec"].get("initContainers").is_none());
    let err = Chart::embedded()
        .render(&Options {
            set: vec!["experimental.ebpf.enabled=true,cni.containerSecurityContext.privileged=false".into()],
            ..Options::default()
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("experimental.ebpf.enabled=true needs cni.containerSecurityContext.privileged=true"), "{err}");
    let debug = Rendered::new(Some("kind"), &["cni.logLevel=debug"]);
    let conf: serde_json::Value = serde_json::from_str(&debug.network_config()).unwrap();
    assert_eq!(conf["log_level"], "debug");
    assert_eq!(env_value(debug.installer(), "CNI_LOG_LEVEL"), "debug");
    // A changed conf rolls the DaemonSet's pods (CNI_NETWORK_CONFIG is read at start).
    let sum = |r: &Rendered| r.daemonset()["spec"]["template"]["metadata"]["annotations"]["checksum/config"].clone();
    assert_ne!(sum(&debug), sum(&Rendered::new(Some("kind"), &[])));
}

#[test]
fn the_log_level_is_a_configmap_key_the_installer_follows_without_a_restart() {
    for (set, level) in [(&[][..], "info"), (&["cni.logLevel=debug"][..], "debug")] {
        let r = Rendered::new(Some("kind"), set);
        let config = r.get("ConfigMap", "kong-mesh-cni-config");
        assert_eq!(config["data"]["logLevel"], level, "cni.logLevel is where it starts: {set:?}");
        let file = env_value(r.installer(), "KMC_LOG_LEVEL_FILE");
        let (dir, name) = file.rsplit_once('/').unwrap();
        let mounted = mount(r.installer(), "config");
        assert_eq!(mounted["mountPath"], dir);
        assert_eq!(mounted["readOnly"], true);
        // A subPath mount would pin the file the pod started with: no update would arrive.
        assert!(mounted.get("subPath").is_none(), "{mounted:?}");
        let volumes = r.daemonset()["spec"]["template"]["spec"]["volumes"].as_sequence().unwrap();
        let volume = volumes.iter().find(|v| v["name"] == "config").expect("the config volume");
        assert_eq!(volume["configMap"]["name"], "kong-mesh-cni-config");
        let items = volume["configMap"]["items"].as_sequence().unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!((&items[0]["key"], &items[0]["path"]), (&"logLevel".into(), &name.into()));
    }
}

#[test]
fn the_log_format_reaches_the_installer_and_the_controller() {
    for (set, format) in [(&[][..], "text"), (&["cni.logFormat=json"][..], "json")] {
        let r = Rendered::new(Some("kind"), set);
        assert_eq!(env_value(r.installer(), "CNI_LOG_FORMAT"), format);
        assert_eq!(env_value(r.controller(), "CNI_LOG_FORMAT"), format);
    }
    let err = Chart::embedded()
        .render(&Options { set: vec!["cni.logFormat=yaml".into()], ..Options::default() })
        .unwrap_err()
        .to_string();
    assert!(err.contains("/cni/logFormat") && err.contains("'text', 'json'"), "{err}");
}
