//! Builders for the objects tests create.

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::api::rbac::v1::PolicyRule;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Starts a pod description: `pod("app").annotation(k, v).container("kuma-sidecar").build()`.
pub fn pod(name: &str) -> PodBuilder {
    PodBuilder {
        pod: Pod { metadata: ObjectMeta { name: Some(name.into()), ..Default::default() }, ..Default::default() },
    }
}

/// A pod as Kuma's injector leaves it for the CNI: the app, the `kuma-sidecar` container
/// and the injected annotation; more annotations can follow.
pub fn mesh_pod(name: &str) -> PodBuilder {
    pod(name).container("app").container("kuma-sidecar").annotation("kuma.io/sidecar-injected", "true")
}

/// Builds a [`Pod`]; with no container given, it gets one named `app`.
pub struct PodBuilder {
    pod: Pod,
}

impl PodBuilder {
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.pod.metadata.annotations.get_or_insert_default().insert(key.into(), value.into());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.pod.metadata.labels.get_or_insert_default().insert(key.into(), value.into());
        self
    }

    pub fn container(mut self, name: &str) -> Self {
        self.spec().containers.push(test_container(name));
        self
    }

    pub fn init_container(mut self, name: &str) -> Self {
        self.spec().init_containers.get_or_insert_default().push(test_container(name));
        self
    }

    /// Binds the pod to a node, as the scheduler would.
    pub fn node_name(mut self, node: &str) -> Self {
        self.spec().node_name = Some(node.into());
        self
    }

    pub fn build(mut self) -> Pod {
        if self.spec().containers.is_empty() {
            self.spec().containers.push(test_container("app"));
        }
        self.pod
    }

    fn spec(&mut self) -> &mut PodSpec {
        self.pod.spec.get_or_insert_default()
    }
}

fn test_container(name: &str) -> Container {
    // Never pulled: no kubelet runs.
    Container { name: name.into(), image: Some("kmc-test/none:0".into()), ..Default::default() }
}

/// A [`PolicyRule`]: `policy_rule(&[""], &["pods"], &["get"])`.
pub fn policy_rule(api_groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let strings = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect());
    PolicyRule {
        api_groups: strings(api_groups),
        resources: strings(resources),
        verbs: verbs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}
