//! The taint controller's decisions (pure): whether a node's CNI pod is ready, whether
//! the node's `NodeReadiness:NoSchedule` taint must go or come, and the patch that does
//! exactly that and nothing else.

use k8s_openapi::api::core::v1::{Node, Pod, Taint};
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

/// What to change on `node`, given whether a CNI pod on it is ready.
pub fn decide(node: &Node, cni_ready: bool) -> Option<Change> {
    if node.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let tainted = node.spec.as_ref().and_then(|s| s.taints.as_ref()).is_some_and(|t| t.iter().any(is_ours));
    match (tainted, cni_ready) {
        (true, true) => Some(Change::Remove),
        (false, false) => Some(Change::Add),
        _ => None,
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
        assert_eq!(decide(&tainted, true), Some(Change::Remove));
        assert_eq!(decide(&tainted, false), None);
        assert_eq!(decide(&node(None), false), Some(Change::Add));
        assert_eq!(decide(&node(None), true), None);
    }

    #[test]
    fn only_key_and_effect_identify_our_taint() {
        let other_effect = node(Some(vec![taint(TAINT_KEY, "NoExecute")]));
        assert_eq!(decide(&other_effect, false), Some(Change::Add));
        let with_value = node(Some(vec![Taint { value: Some("true".into()), ..taint(TAINT_KEY, TAINT_EFFECT) }]));
        assert_eq!(decide(&with_value, true), Some(Change::Remove));
    }

    #[test]
    fn a_node_being_deleted_is_left_alone() {
        let mut n = node(None);
        n.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(decide(&n, false), None);
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
