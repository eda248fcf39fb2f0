//! Namespaces and nodes created for a test, removed when the test is done with them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::{Container, Namespace, Node, Pod};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::{block_on_thread, client_from};

/// A namespace that is removed on drop: its pods are deleted at once (grace period 0,
/// no kubelet would confirm), then the namespace, whose `kubernetes` finalizer is
/// cleared by hand since no namespace controller runs.
pub struct TestNamespace {
    pub(crate) name: String,
    pub(crate) client: Client,
    pub(crate) kubeconfig: PathBuf,
}

impl TestNamespace {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The admin client this namespace was created with (same runtime as the test).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// An admin `Api` for namespaced kind `K` in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Creates the pod in this namespace (its `metadata.namespace` is overwritten).
    pub async fn create_pod(&self, mut pod: Pod) -> Pod {
        pod.metadata.namespace = Some(self.name.clone());
        let name = pod.metadata.name.clone().unwrap_or_default();
        self.api::<Pod>()
            .create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("creating pod {}/{name}: {e}", self.name))
    }

    /// Writes the status a kubelet would once the pod runs: phase Running, all
    /// containers running and ready, conditions True, and `pod_ip` if given.
    pub async fn set_pod_running(&self, name: &str, pod_ip: Option<&str>) -> Pod {
        let pods = self.api::<Pod>();
        let pod = pods.get(name).await.unwrap_or_else(|e| panic!("getting pod {name}: {e}"));
        let spec = pod.spec.unwrap_or_default();
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let running = |c: &Container| {
            json!({
                "name": c.name, "image": c.image, "imageID": "", "ready": true, "started": true,
                "restartCount": 0, "state": {"running": {"startedAt": now}},
            })
        };
        let conditions = ["PodScheduled", "Initialized", "ContainersReady", "Ready"]
            .map(|t| json!({"type": t, "status": "True", "lastTransitionTime": now}));
        let containers: Vec<Value> = spec.containers.iter().map(running).collect();
        let mut status = json!({
            "phase": "Running",
            "startTime": now,
            "conditions": conditions,
            "containerStatuses": containers,
        });
        if let Some(ip) = pod_ip {
            status["podIP"] = json!(ip);
            status["podIPs"] = json!([{ "ip": ip }]);
        }
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(json!({ "status": status })))
            .await
            .unwrap_or_else(|e| panic!("updating status of pod {}/{name}: {e}", self.name))
    }

    /// Creates Role `role` with these rules and binds it to ServiceAccount `sa` of this
    /// namespace (the SA itself is created by [`ApiServer::service_account_kubeconfig`]),
    /// and returns once the grant is in effect.
    pub async fn grant(&self, sa: &str, role: &str, rules: Vec<PolicyRule>) {
        let rules_copy = rules.clone();
        let meta = ObjectMeta { name: Some(role.to_string()), ..Default::default() };
        self.api::<Role>()
            .create(&PostParams::default(), &Role { metadata: meta.clone(), rules: Some(rules) })
            .await
            .unwrap_or_else(|e| panic!("creating Role {role}: {e}"));
        let binding = RoleBinding {
            metadata: meta,
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "Role".into(),
                name: role.into(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: sa.into(),
                namespace: Some(self.name.clone()),
                ..Default::default()
            }]),
        };
        self.api::<RoleBinding>()
            .create(&PostParams::default(), &binding)
            .await
            .unwrap_or_else(|e| panic!("creating RoleBinding {role}: {e}"));
        let user = format!("system:serviceaccount:{}:{sa}", self.name);
        wait_allowed(&self.client, &user, Some(&self.name), &rules_copy, role).await;
    }
}

/// Returns once a SubjectAccessReview says `user` may use the first verb of each rule
/// (in `namespace`, or cluster-wide): the RBAC authorizer reads through an informer, so
/// a new binding takes effect a moment later. Panics after 10 s.
pub(crate) async fn wait_allowed(
    client: &Client,
    user: &str,
    namespace: Option<&str>,
    rules: &[PolicyRule],
    what: &str,
) {
    let reviews = Api::<SubjectAccessReview>::all(client.clone());
    for rule in rules {
        let first = |v: &Option<Vec<String>>| v.as_ref().and_then(|v| v.first().cloned());
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.to_owned()),
                resource_attributes: Some(ResourceAttributes {
                    namespace: namespace.map(str::to_owned),
                    group: first(&rule.api_groups),
                    resource: first(&rule.resources),
                    verb: rule.verbs.first().cloned(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let allowed = reviews
                .create(&PostParams::default(), &review)
                .await
                .map(|r| r.status.is_some_and(|s| s.allowed))
                .unwrap_or(false);
            if allowed {
                break;
            }
            assert!(Instant::now() < deadline, "grant {what} to {user}: not effective after 10s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let (name, kubeconfig) = (self.name.clone(), self.kubeconfig.clone());
        block_on_thread(move || async move {
            let client = client_from(&kubeconfig).await;
            let now = DeleteParams { grace_period_seconds: Some(0), ..Default::default() };
            let pods = Api::<Pod>::namespaced(client.clone(), &name);
            if let Err(e) = pods.delete_collection(&now, &ListParams::default()).await {
                eprintln!("testenv: deleting pods of {name}: {e}");
            }
            let namespaces = Api::<Namespace>::all(client);
            if let Err(e) = namespaces.delete(&name, &DeleteParams::default()).await {
                eprintln!("testenv: deleting namespace {name}: {e}");
                return;
            }
            // Empty spec.finalizers through the finalize subresource: the namespace goes.
            let finalize = json!({"metadata": {"name": name}, "spec": {"finalizers": []}});
            if let Err(e) = namespaces.replace_subresource("finalize", &name, &PostParams::default(), &finalize).await
                && !matches!(&e, kube::Error::Api(s) if s.code == 404)
            {
                eprintln!("testenv: finalizing namespace {name}: {e}");
            }
        });
    }
}

/// A node object (no kubelet behind it), deleted on drop.
pub struct TestNode {
    pub(crate) name: String,
    pub(crate) client: Client,
    pub(crate) kubeconfig: PathBuf,
}

impl TestNode {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the node's Ready condition, as its kubelet would.
    pub async fn set_ready(&self, ready: bool) -> Node {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let status = if ready { "True" } else { "False" };
        let patch = json!({"status": {"conditions": [{
            "type": "Ready", "status": status, "reason": "KubeletReady", "message": "set by test",
            "lastHeartbeatTime": now, "lastTransitionTime": now,
        }]}});
        Api::<Node>::all(self.client.clone())
            .patch_status(&self.name, &PatchParams::default(), &Patch::Strategic(patch))
            .await
            .unwrap_or_else(|e| panic!("updating status of node {}: {e}", self.name))
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let (name, kubeconfig) = (self.name.clone(), self.kubeconfig.clone());
        block_on_thread(move || async move {
            let nodes = Api::<Node>::all(client_from(&kubeconfig).await);
            if let Err(e) = nodes.delete(&name, &DeleteParams::default()).await {
                eprintln!("testenv: deleting node {name}: {e}");
            }
        });
    }
}
