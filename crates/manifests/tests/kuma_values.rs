//! A Kuma / Kong Mesh user's values: every key of Kuma's `cni.*` (and the `global.*`,
//! `skipRBAC`, `namespaceAllowList`, `experimental.ebpf.*` its CNI templates read) is
//! accepted with the same meaning, by real Helm and by our renderer alike; any other key
//! is refused by values.schema.json with a message naming it, with the same lines in both.

mod common;

use std::collections::BTreeSet;

use common::*;
use manifests::{Chart, Options, to_stream};
use serde_norway::Value;

const KUMA_VALUES: &str = include_str!("fixtures/kuma-2.14.3-cni-values.yaml");

fn ours(values: &[&str], set: &[&str]) -> Result<String, String> {
    let opts = Options {
        values: values.iter().map(|v| v.to_string()).collect(),
        set: set.iter().map(|s| s.to_string()).collect(),
        ..Options::default()
    };
    Chart::embedded().render(&opts).map(|m| to_stream(&m)).map_err(|e| e.to_string())
}

/// `helm template` with these values files (written to a temp dir) and --set args.
fn theirs(helm: &std::path::Path, values: &[&str], set: &[&str]) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let mut args = Vec::new();
    for (i, v) in values.iter().enumerate() {
        let path = dir.path().join(format!("values-{i}.yaml"));
        std::fs::write(&path, v).unwrap();
        args.extend(["-f".to_string(), path.display().to_string()]);
    }
    for s in set {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    helm_template(helm, None, &args)
}

/// Every key path of a YAML mapping (`a.b.c`), maps descended, lists and scalars leaves.
fn key_paths(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let Value::Mapping(m) = v {
        for (k, v) in m {
            let path = format!("{prefix}{}", k.as_str().unwrap());
            out.insert(path.clone());
            key_paths(v, &format!("{path}."), out);
        }
    }
}

/// Key paths the schema declares (properties only; free-form maps end there).
fn schema_paths(s: &serde_json::Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let Some(props) = s.get("properties").and_then(serde_json::Value::as_object) {
        for (k, sub) in props {
            let path = format!("{prefix}{k}");
            out.insert(path.clone());
            schema_paths(sub, &format!("{path}."), out);
        }
    }
}

fn free_form(schema: &serde_json::Value, path: &str) -> bool {
    let mut cur = schema;
    for part in path.split('.') {
        match cur.get("properties").and_then(|p| p.get(part)) {
            Some(next) => cur = next,
            None => return cur.get("additionalProperties") != Some(&serde_json::Value::Bool(false)),
        }
    }
    true
}

#[test]
fn every_kuma_key_is_one_of_ours() {
    let chart = Chart::embedded();
    let schema: serde_json::Value = serde_json::from_str(&chart.files()["values.schema.json"]).unwrap();
    let defaults: Value = serde_norway::from_str(&chart.files()["values.yaml"]).unwrap();
    let (mut kuma, mut declared, mut ours) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    key_paths(&serde_norway::from_str(KUMA_VALUES).unwrap(), "", &mut kuma);
    schema_paths(&schema, "", &mut declared);
    key_paths(&defaults, "", &mut ours);
    for key in &kuma {
        // Values under free-form objects (nodeSelector, resources, ...) are the user's.
        let parent = key.rsplit_once('.').map(|(p, _)| p).unwrap_or_default();
        if !parent.is_empty() && free_form(&schema, parent) && !declared.contains(key) {
            continue;
        }
        assert!(declared.contains(key), "Kuma's {key} is not declared in values.schema.json");
        assert!(ours.contains(key), "Kuma's {key} has no default in values.yaml");
    }
    // And every default of ours is declared (the schema does not refuse our own values).
    for key in &ours {
        let parent = key.rsplit_once('.').map(|(p, _)| p).unwrap_or_default();
        assert!(
            declared.contains(key) || free_form(&schema, parent),
            "values.yaml's {key} is not declared in values.schema.json"
        );
    }
}

#[test]
fn kuma_values_render_as_helm_renders_them_with_the_same_meaning() {
    let Some(helm) = helm() else { return };
    let cases: &[(&str, &[&str])] = &[
        ("Kuma's defaults", &[]),
        (
            "every Kuma key set",
            &[
                "cni.podAnnotations.prometheus\\.io/scrape=true",
                "cni.podAnnotations.team=mesh",
                "cni.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=mesh",
                "cni.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
                "cni.image.imagePullPolicy=Always",
                "global.image.registry=registry.example.com/kong",
                "global.image.tag=9.9.9",
                "global.imagePullSecrets={pull-a,pull-b}",
                "namespaceAllowList={shop,billing}",
                "cni.experimental.imageEbpf.tag=0.9.0",
                "experimental.ebpf.bpffsPath=/run/bpf",
                "experimental.ebpf.cgroupPath=/sys/fs/cgroup/unified",
                "experimental.ebpf.tcAttachIface=eth1",
                "experimental.ebpf.instanceIPEnvVarName=POD_IP",
                "cni.tolerations[0].key=dedicated",
                "cni.tolerations[0].operator=Exists",
            ],
        ),
        ("skipRBAC", &["skipRBAC=true"]),
        ("cni.image.tag over global", &["global.image.tag=9.9.9", "cni.image.tag=1.0.0", "cni.image.registry=r.io"]),
        ("health port moved", &["cni.healthPort=19081"]),
        ("no health port", &["cni.healthPort=0"]),
    ];
    for (what, set) in cases {
        let mine = ours(&[KUMA_VALUES], set).unwrap_or_else(|e| panic!("{what}: ours: {e}"));
        let helm = theirs(helm, &[KUMA_VALUES], set).unwrap_or_else(|e| panic!("{what}: helm: {e}"));
        assert_same_objects(&mine, &helm, what);
    }
}

fn get<'a>(objects: &'a std::collections::BTreeMap<String, Value>, key: &str) -> &'a Value {
    objects.get(key).unwrap_or_else(|| panic!("no {key} in {:?}", objects.keys().collect::<Vec<_>>()))
}

#[test]
fn kuma_keys_mean_what_they_mean_in_kumas_chart() {
    let set = |s: &[&str]| objects(&ours(&[KUMA_VALUES], s).unwrap());
    let o = set(&[
        "cni.podAnnotations.team=mesh",
        "cni.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=mesh",
        "cni.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
        "cni.image.imagePullPolicy=Never",
        "global.image.registry=registry.example.com/kong",
        "global.image.tag=9.9.9",
        "global.imagePullSecrets={pull-a}",
        "namespaceAllowList={shop,billing}",
    ]);
    let ds = get(&o, "DaemonSet/kube-system/kong-mesh-cni");
    let pod = &ds["spec"]["template"];
    assert_eq!(pod["metadata"]["annotations"]["team"], "mesh");
    let terms = &pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"];
    assert_eq!(terms["nodeSelectorTerms"][0]["matchExpressions"][0]["key"], "mesh");
    assert_eq!(pod["spec"]["restartPolicy"], "Always");
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["image"], "registry.example.com/kong/kong-mesh-cni:9.9.9", "global.image.* are the fallbacks");
    assert_eq!(c["imagePullPolicy"], "Never", "Kuma's imagePullPolicy wins over our pullPolicy");
    let ctl = get(&o, "Deployment/kube-system/kong-mesh-cni-controller");
    assert_eq!(ctl["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"], "Never");
    for sa in ["kong-mesh-cni", "kong-mesh-cni-controller"] {
        let sa = get(&o, &format!("ServiceAccount/kube-system/{sa}"));
        assert_eq!(sa["imagePullSecrets"][0]["name"], "pull-a");
    }
    // namespaceAllowList: the plugin reads pods in those namespaces only.
    assert!(!o.contains_key("ClusterRoleBinding//kong-mesh-cni"));
    for ns in ["shop", "billing"] {
        let rb = get(&o, &format!("RoleBinding/{ns}/kong-mesh-cni"));
        assert_eq!(rb["roleRef"]["kind"], "ClusterRole");
        assert_eq!(rb["subjects"][0]["namespace"], "kube-system");
    }
    // ...and its node agent watches those, told by the DaemonSet.
    let c = &get(&o, "DaemonSet/kube-system/kong-mesh-cni")["spec"]["template"]["spec"]["containers"][0];
    let env = c["env"].as_sequence().unwrap();
    let agent_ns = env.iter().find(|e| e["name"] == "KMC_AGENT_NAMESPACES").expect("KMC_AGENT_NAMESPACES");
    assert_eq!(agent_ns["value"], "shop,billing");
    // skipRBAC: no role or binding at all; the service accounts stay.
    let o = set(&["skipRBAC=true"]);
    assert!(o.keys().all(|k| !k.contains("Role")), "{:?}", o.keys().collect::<Vec<_>>());
    assert!(o.contains_key("ServiceAccount/kube-system/kong-mesh-cni"));
    // The defaults: memory-only limits, the health port declared and probed.
    let o = set(&[]);
    let c = &get(&o, "DaemonSet/kube-system/kong-mesh-cni")["spec"]["template"]["spec"]["containers"][0];
    assert!(c["resources"]["limits"].get("cpu").is_none(), "no CPU limit: {:?}", c["resources"]);
    assert_eq!(c["resources"]["limits"]["memory"], "100Mi");
    assert_eq!(c["image"], "docker.io/kumahq/kong-mesh-cni:0.1.0", "Kuma's global.image.registry applies");
    let o = objects(&ours(&[], &["cni.healthPort=19081"]).unwrap());
    let c = &get(&o, "DaemonSet/kube-system/kong-mesh-cni")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["ports"][0]["hostPort"], 19081);
    assert_eq!(c["image"], "docker.io/kong/kong-mesh-cni:0.1.0");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let o = objects(&ours(&[], &["cni.healthPort=0"]).unwrap());
    let c = &get(&o, "DaemonSet/kube-system/kong-mesh-cni")["spec"]["template"]["spec"]["containers"][0];
    assert!(c.get("ports").is_none());
    assert_eq!(c["readinessProbe"]["exec"]["command"][1], "/tmp/ready", "without the listener: the ready file");
}

/// The `- at '...': ...` lines of a schema failure, nesting and order set aside
/// (Helm groups some under "validation failed" and orders lines, and the names within
/// "additional properties" lines, as a Go map iterates: differently from run to run).
fn failure_lines(text: &str) -> BTreeSet<String> {
    let sorted_names = |line: &str| match line.split_once(": additional properties ") {
        Some((at, rest)) => {
            let names = rest.strip_suffix(" not allowed").unwrap_or(rest);
            let mut names: Vec<&str> = names.split(", ").collect();
            names.sort_unstable();
            format!("{at}: additional properties {} not allowed", names.join(", "))
        }
        None => line.to_owned(),
    };
    text.lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("- "))
        .filter(|l| l.starts_with("at '") && !l.ends_with("': validation failed"))
        .map(sorted_names)
        .collect()
}

#[test]
fn unknown_and_misspelt_keys_are_refused_naming_them_in_both() {
    let Some(helm) = helm() else { return };
    let cases: &[(&[&str], &[&str])] = &[
        (&["cni.podAnnotation.a=b"], &["at '/cni': additional properties 'podAnnotation' not allowed"]),
        (&["cni.image.pullpolicy=Always"], &["at '/cni/image': additional properties 'pullpolicy' not allowed"]),
        (&["cni.taintControler.enabled=false"], &["at '/cni': additional properties 'taintControler' not allowed"]),
        (&["experimental.ebpf.enable=true"], &["at '/experimental/ebpf': additional properties 'enable' not allowed"]),
        (
            &["skipRbac=true", "namespaceAllowlist={a}"],
            &["at '': additional properties 'namespaceAllowlist', 'skipRbac' not allowed"],
        ),
        (&["cni.restartPolicy=OnFailure"], &["at '/cni/restartPolicy': value must be 'Always'"]),
        (&["cni.healthPort=70000"], &["at '/cni/healthPort': maximum: got 70,000, want 65,535"]),
        (
            &["cni.image.imagePullPolicy=Sometimes"],
            &["at '/cni/image/imagePullPolicy': value must be one of '', 'Always', 'IfNotPresent', 'Never', <nil>"],
        ),
        (
            &["cni.enabled=3", "cni.nodeSelector.pool=4", "global.imagePullSecrets[0].name=x"],
            &[
                "at '/cni/enabled': got number, want boolean",
                "at '/cni/nodeSelector/pool': got number, want string",
                "at '/global/imagePullSecrets/0': got object, want string",
            ],
        ),
    ];
    for (set, want) in cases {
        let mine = ours(&[], set).expect_err("ours must refuse");
        let helm = theirs(helm, &[], set).expect_err("helm must refuse");
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(failure_lines(&mine), want, "ours {set:?}:\n{mine}");
        assert_eq!(failure_lines(&helm), want, "helm {set:?}:\n{helm}");
        assert!(mine.starts_with("values don't meet the specifications of the schema(s)"), "{mine}");
    }
    // helm lint names the key too.
    let chart = chart_dir();
    let out = helm_cmd(helm, &["lint", chart.to_str().unwrap(), "--set", "cni.podAnnotation.a=b"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("additional properties 'podAnnotation' not allowed"), "{text}");
}

#[test]
fn the_go_cnis_image_is_refused_in_both() {
    let Some(helm) = helm() else { return };
    for repo in ["kuma-cni", "kumahq/kuma-cni"] {
        let set = format!("cni.image.repository={repo}");
        let mine = ours(&[], &[&set]).expect_err("ours must refuse");
        let helm = theirs(helm, &[], &[&set]).expect_err("helm must refuse");
        let tail = |s: &str| s.split_once("): ").and_then(|(_, m)| m.lines().next()).map(|m| m.trim().to_owned());
        assert!(mine.contains("is the image of Kuma's Go CNI"), "{mine}");
        assert_eq!(tail(&mine), tail(&helm));
    }
    // A repository that merely contains the name is not refused.
    assert!(ours(&[], &["cni.image.repository=kuma-cni-rs"]).is_ok());
}
