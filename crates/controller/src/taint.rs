//! The taint controller's decisions (pure): whether a node's CNI pod is ready, whether
//! the CNI DaemonSet targets the node at all, whether the node's `NodeReadiness:NoSchedule`
//! taint must go or come, and the patch that does exactly that and nothing else.

use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, PodSpec, Taint, Toleration};
use serde_json::{Value, json};

/// The taint (Kuma's contract). Its value is empty; key and effect identify it, so a
/// node registered with `NodeReadiness=anything:NoSchedule` counts as tainted.
pub const TAINT_KEY: &str = "NodeReadiness";
pub const TAINT_EFFECT: &str = "NoSchedule";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Add,
    Remove,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Add => "add",
            Change::Remove => "remove",
        }
    }
}

pub fn is_ours(taint: &Taint) -> bool {
    taint.key == TAINT_KEY && taint.effect == TAINT_EFFECT
}

/// A CNI pod serves its node when it runs and is Ready. One being deleted does not:
/// the installer takes the plugin out of the chain when it stops.
pub fn cni_pod_ready(pod: &Pod) -> bool {
    if pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let Some(status) = &pod.status else { return false };
    status.phase.as_deref() == Some("Running")
        && status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True")
}

/// The node a pod is scheduled on, if any.
pub fn pod_node(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref().filter(|n| !n.is_empty())
}

/// What to change on `node`, given whether a CNI pod on it is ready and whether the CNI
/// DaemonSet targets it. A node the DaemonSet never runs on will never have a CNI pod:
/// it is not tainted, and loses our taint if it was registered with it.
pub fn decide(node: &Node, cni_ready: bool, targeted: bool) -> Option<Change> {
    if node.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let tainted = node_taints(node).iter().any(is_ours);
    match (tainted, cni_ready, targeted) {
        (true, true, _) | (true, false, false) => Some(Change::Remove),
        (false, false, true) => Some(Change::Add),
        _ => None,
    }
}

/// Taints the DaemonSet controller tolerates on its own for every DaemonSet pod (node
/// lifecycle conditions): they never keep a DaemonSet pod off a node.
const DAEMONSET_TOLERATED: &[&str] = &[
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
    "node.kubernetes.io/disk-pressure",
    "node.kubernetes.io/memory-pressure",
    "node.kubernetes.io/pid-pressure",
    "node.kubernetes.io/unschedulable",
    "node.kubernetes.io/network-unavailable",
];

/// Whether a pod with this spec (the CNI DaemonSet's template) is placed on `node`, as
/// the scheduler decides it: its nodeSelector, the required terms of its node affinity,
/// and its tolerations against the node's NoSchedule/NoExecute taints (our own taint
/// and the lifecycle taints the DaemonSet controller tolerates set aside). The OS is a
/// label (`kubernetes.io/os`), so it is the nodeSelector's or the affinity's business.
pub fn targets(pod: &PodSpec, node: &Node) -> bool {
    let empty = Default::default();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let selected = pod.node_selector.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let required = pod
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| n.required_during_scheduling_ignored_during_execution.as_ref());
    let affine = required.is_none_or(|r| r.node_selector_terms.iter().any(|t| term_matches(t, node)));
    let tolerations = pod.tolerations.as_deref().unwrap_or_default();
    let tolerated = node_taints(node)
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .filter(|t| !is_ours(t) && !DAEMONSET_TOLERATED.contains(&t.key.as_str()))
        .all(|t| tolerations.iter().any(|tol| tolerates(tol, t)));
    selected && affine && tolerated
}

/// Whether any of the CNI DaemonSets targets `node`. None known (not installed yet, or
/// not readable): every node is, as in Kuma's controller.
pub fn targeted_by_any<'a>(daemonsets: impl IntoIterator<Item = &'a PodSpec>, node: &Node) -> bool {
    let mut known = false;
    for pod in daemonsets {
        if targets(pod, node) {
            return true;
        }
        known = true;
    }
    !known
}

fn node_taints(node: &Node) -> &[Taint] {
    node.spec.as_ref().and_then(|s| s.taints.as_deref()).unwrap_or_default()
}

/// A term matches when all of its requirements do; a term with none matches nothing.
fn term_matches(term: &NodeSelectorTerm, node: &Node) -> bool {
    let empty = Default::default();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let exprs = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    let name = node.metadata.name.as_deref();
    exprs.iter().all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
        && fields.iter().all(|r| r.key == "metadata.name" && requirement_matches(r, name))
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let number = |v: &str| v.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => match (value.and_then(number), values.first().and_then(|v| number(v))) {
            (Some(v), Some(bound)) => (r.operator == "Gt" && v > bound) || (r.operator == "Lt" && v < bound),
            _ => false,
        },
        _ => false,
    }
}

/// Kubernetes' toleration matching: an empty key with Exists tolerates every key; an
/// empty effect every effect; Equal (the default operator) compares the value.
fn tolerates(tol: &Toleration, taint: &Taint) -> bool {
    let key = tol.key.as_deref().unwrap_or_default();
    let effect = tol.effect.as_deref().unwrap_or_default();
    if !effect.is_empty() && effect != taint.effect {
        return false;
    }
    match tol.operator.as_deref().unwrap_or("Equal") {
        "Exists" => key.is_empty() || key == taint.key,
        "Equal" => {
            key == taint.key && tol.value.as_deref().unwrap_or_default() == taint.value.as_deref().unwrap_or_default()
        }
        _ => false,
    }
}

/// A JSON patch applying `change` to this version of `node`. Its first operation tests
/// `metadata.resourceVersion`: if the node changed since (another taint, a label, our
/// own earlier write not yet in the cache), the API server rejects the whole patch
/// (422) and writes nothing, so the indices below never hit someone else's taint.
pub fn patch(node: &Node, change: Change) -> json_patch::Patch {
    let version = node.metadata.resource_version.clone().unwrap_or_default();
    let mut ops = vec![json!({"op": "test", "path": "/metadata/resourceVersion", "value": version})];
    let taints = node.spec.as_ref().and_then(|s| s.taints.as_deref());
    match (change, taints) {
        (Change::Add, None) => {
            ops.push(json!({"op": "add", "path": "/spec/taints", "value": [our_taint()]}));
        }
        (Change::Add, Some(_)) => {
            ops.push(json!({"op": "add", "path": "/spec/taints/-", "value": our_taint()}));
        }
        (Change::Remove, taints) => {
            // Highest index first, so that each removal leaves the next index valid.
            let ours = taints.unwrap_or_default().iter().enumerate().filter(|(_, t)| is_ours(t)).map(|(i, _)| i);
            let mut indices: Vec<usize> = ours.collect();
            indices.reverse();
            ops.extend(indices.into_iter().map(|i| json!({"op": "remove", "path": format!("/spec/taints/{i}")})));
        }
    }
    serde_json::from_value(Value::Array(ops)).expect("these operations are valid JSON patch")
}

fn our_taint() -> Value {
    json!({"key": TAINT_KEY, "effect": TAINT_EFFECT})
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSpec, PodCondition, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn taint(key: &str, effect: &str) -> Taint {
        Taint { key: key.into(), effect: effect.into(), ..Default::default() }
    }

    fn node(taints: Option<Vec<Taint>>) -> Node {
        Node {
            metadata: ObjectMeta { name: Some("n1".into()), resource_version: Some("42".into()), ..Default::default() },
            spec: Some(NodeSpec { taints, ..Default::default() }),
            ..Default::default()
        }
    }

    fn cni_pod(phase: &str, ready: &str) -> Pod {
        Pod {
            spec: Some(PodSpec { node_name: Some("n1".into()), ..Default::default() }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn patch_json(node: &Node, change: Change) -> Value {
        serde_json::to_value(patch(node, change)).unwrap()
    }

    #[test]
    fn the_four_cases_of_the_contract() {
        let tainted = node(Some(vec![taint(TAINT_KEY, TAINT_EFFECT)]));
        assert_eq!(decide(&tainted, true, true), Some(Change::Remove));
        assert_eq!(decide(&tainted, false, true), None);
        assert_eq!(decide(&node(None), false, true), Some(Change::Add));
        assert_eq!(decide(&node(None), true, true), None);
    }

    #[test]
    fn a_node_the_daemonset_never_runs_on_is_never_left_tainted() {
        let tainted = node(Some(vec![taint(TAINT_KEY, TAINT_EFFECT)]));
        assert_eq!(decide(&tainted, false, false), Some(Change::Remove));
        assert_eq!(decide(&node(None), false, false), None);
    }

    #[test]
    fn only_key_and_effect_identify_our_taint() {
        let other_effect = node(Some(vec![taint(TAINT_KEY, "NoExecute")]));
        assert_eq!(decide(&other_effect, false, true), Some(Change::Add));
        let with_value = node(Some(vec![Taint { value: Some("true".into()), ..taint(TAINT_KEY, TAINT_EFFECT) }]));
        assert_eq!(decide(&with_value, true, true), Some(Change::Remove));
    }

    #[test]
    fn a_node_being_deleted_is_left_alone() {
        let mut n = node(None);
        n.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(decide(&n, false, true), None);
    }

    fn labelled(labels: &[(&str, &str)], taints: Vec<Taint>) -> Node {
        let mut n = node(Some(taints));
        n.metadata.labels = Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        n
    }

    fn spec(yaml: &str) -> PodSpec {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn targeting_follows_node_selector_affinity_and_tolerations() {
        let linux = labelled(&[("kubernetes.io/os", "linux"), ("pool", "mesh"), ("cores", "8")], vec![]);
        let windows = labelled(&[("kubernetes.io/os", "windows")], vec![]);
        let by_os = spec("containers: []\nnodeSelector: {kubernetes.io/os: linux}");
        assert!(targets(&by_os, &linux) && !targets(&by_os, &windows));

        let affinity = |exprs: &str| {
            spec(&format!(
                "containers: []\naffinity: {{nodeAffinity: {{requiredDuringSchedulingIgnoredDuringExecution: {{nodeSelectorTerms: [{exprs}]}}}}}}"
            ))
        };
        assert!(targets(&affinity("{matchExpressions: [{key: pool, operator: In, values: [mesh, edge]}]}"), &linux));
        assert!(!targets(&affinity("{matchExpressions: [{key: pool, operator: NotIn, values: [mesh]}]}"), &linux));
        assert!(targets(&affinity("{matchExpressions: [{key: pool, operator: NotIn, values: [mesh]}]}"), &windows));
        assert!(!targets(&affinity("{matchExpressions: [{key: gpu, operator: Exists}]}"), &linux));
        assert!(targets(&affinity("{matchExpressions: [{key: gpu, operator: DoesNotExist}]}"), &linux));
        assert!(targets(&affinity("{matchExpressions: [{key: cores, operator: Gt, values: ['4']}]}"), &linux));
        assert!(!targets(&affinity("{matchExpressions: [{key: cores, operator: Lt, values: ['4']}]}"), &linux));
        assert!(targets(&affinity("{matchFields: [{key: metadata.name, operator: In, values: [n1]}]}"), &linux));
        // Terms are ORed; an empty term matches nothing.
        assert!(targets(
            &affinity(
                "{matchExpressions: [{key: gpu, operator: Exists}]}, {matchExpressions: [{key: pool, operator: Exists}]}"
            ),
            &linux
        ));
        assert!(!targets(&affinity("{}"), &linux));

        let dedicated = Taint { value: Some("db".into()), ..taint("dedicated", "NoSchedule") };
        let node_with = |t: Taint| labelled(&[("kubernetes.io/os", "linux")], vec![t]);
        let plain = spec("containers: []");
        assert!(!targets(&plain, &node_with(dedicated.clone())));
        assert!(
            targets(&plain, &node_with(taint("soft", "PreferNoSchedule"))),
            "PreferNoSchedule never keeps a pod off"
        );
        assert!(targets(&plain, &node_with(taint(TAINT_KEY, TAINT_EFFECT))), "our own taint is set aside");
        assert!(targets(&plain, &node_with(taint("node.kubernetes.io/not-ready", "NoExecute"))));
        let tolerating = |t: &str| spec(&format!("containers: []\ntolerations: [{t}]"));
        assert!(targets(&tolerating("{key: dedicated, operator: Equal, value: db}"), &node_with(dedicated.clone())));
        assert!(!targets(&tolerating("{key: dedicated, value: web}"), &node_with(dedicated.clone())));
        assert!(targets(&tolerating("{operator: Exists, effect: NoSchedule}"), &node_with(dedicated.clone())));
        assert!(!targets(&tolerating("{operator: Exists, effect: NoExecute}"), &node_with(dedicated.clone())));
        assert!(targets(&tolerating("{key: dedicated, operator: Exists}"), &node_with(dedicated)));
    }

    #[test]
    fn no_daemonset_known_means_every_node() {
        let windows = labelled(&[("kubernetes.io/os", "windows")], vec![]);
        assert!(targeted_by_any([], &windows));
        let by_os = spec("containers: []\nnodeSelector: {kubernetes.io/os: linux}");
        let any = spec("containers: []");
        assert!(!targeted_by_any([&by_os], &windows));
        assert!(targeted_by_any([&by_os, &any], &windows));
    }

    #[test]
    fn a_cni_pod_must_be_running_ready_and_not_deleted() {
        assert!(cni_pod_ready(&cni_pod("Running", "True")));
        assert!(!cni_pod_ready(&cni_pod("Running", "False")));
        assert!(!cni_pod_ready(&cni_pod("Pending", "True")));
        assert!(!cni_pod_ready(&Pod::default()));
        let mut deleting = cni_pod("Running", "True");
        deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert!(!cni_pod_ready(&deleting));
        assert_eq!(pod_node(&deleting), Some("n1"));
        assert_eq!(pod_node(&Pod::default()), None);
    }

    #[test]
    fn adding_creates_the_list_or_appends_to_it() {
        let rv = json!({"op": "test", "path": "/metadata/resourceVersion", "value": "42"});
        assert_eq!(
            patch_json(&node(None), Change::Add),
            json!([rv, {"op": "add", "path": "/spec/taints", "value": [{"key": "NodeReadiness", "effect": "NoSchedule"}]}])
        );
        let others = node(Some(vec![taint("node.kubernetes.io/not-ready", "NoSchedule")]));
        assert_eq!(
            patch_json(&others, Change::Add),
            json!([rv, {"op": "add", "path": "/spec/taints/-", "value": {"key": "NodeReadiness", "effect": "NoSchedule"}}])
        );
    }

    #[test]
    fn removing_takes_every_copy_of_ours_and_nothing_else() {
        let n = node(Some(vec![
            taint(TAINT_KEY, TAINT_EFFECT),
            taint("dedicated", "NoSchedule"),
            taint(TAINT_KEY, TAINT_EFFECT),
            taint(TAINT_KEY, "NoExecute"),
        ]));
        let ops = patch_json(&n, Change::Remove);
        assert_eq!(
            ops,
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "42"},
                {"op": "remove", "path": "/spec/taints/2"},
                {"op": "remove", "path": "/spec/taints/0"},
            ])
        );
        // Applied to that version, the other taints stay in their order; applied to
        // another version, nothing is.
        let mut doc = serde_json::to_value(&n).unwrap();
        let mut newer = doc.clone();
        newer["metadata"]["resourceVersion"] = json!("43");
        assert!(json_patch::patch(&mut newer, &patch(&n, Change::Remove)).is_err());
        json_patch::patch(&mut doc, &patch(&n, Change::Remove)).unwrap();
        let left: Vec<(String, String)> = doc["spec"]["taints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["key"].as_str().unwrap().into(), t["effect"].as_str().unwrap().into()))
            .collect();
        assert_eq!(left, [("dedicated".into(), "NoSchedule".into()), (TAINT_KEY.into(), "NoExecute".into())]);
    }
}
