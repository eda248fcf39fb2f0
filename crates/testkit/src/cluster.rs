//! Cluster-wide test fixtures: a ClusterRole bound to a service account (for identities
//! that watch across namespaces, as the node agent does), removed on drop, and the API
//! server's own request counters, to prove which requests a component made.

use std::path::PathBuf;

use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};

use crate::objects::wait_allowed;
use crate::{ApiServer, block_on_thread, client_from, unique_suffix};

/// ClusterRole and ClusterRoleBinding `kmc-test-xxxxxxxx` granting `rules` to
/// ServiceAccount `namespace/sa`; both deleted on drop.
pub struct ClusterGrant {
    name: String,
    kubeconfig: PathBuf,
}

impl ClusterGrant {
    /// Creates the grant and returns once it is in effect.
    pub async fn new(api: &ApiServer, namespace: &str, sa: &str, rules: Vec<PolicyRule>) -> ClusterGrant {
        let client = &api.client().await;
        let name = format!("kmc-test-{}", unique_suffix());
        let meta = ObjectMeta { name: Some(name.clone()), ..Default::default() };
        Api::<ClusterRole>::all(client.clone())
            .create(
                &PostParams::default(),
                &ClusterRole { metadata: meta.clone(), rules: Some(rules.clone()), ..Default::default() },
            )
            .await
            .unwrap_or_else(|e| panic!("creating ClusterRole {name}: {e}"));
        let grant = ClusterGrant { name: name.clone(), kubeconfig: api.kubeconfig_path().to_owned() };
        let binding = ClusterRoleBinding {
            metadata: meta,
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "ClusterRole".into(),
                name: name.clone(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: sa.into(),
                namespace: Some(namespace.into()),
                ..Default::default()
            }]),
        };
        Api::<ClusterRoleBinding>::all(client.clone())
            .create(&PostParams::default(), &binding)
            .await
            .unwrap_or_else(|e| panic!("creating ClusterRoleBinding {name}: {e}"));
        wait_allowed(client, &format!("system:serviceaccount:{namespace}:{sa}"), None, &rules, &name).await;
        grant
    }
}

impl Drop for ClusterGrant {
    fn drop(&mut self) {
        let (name, kubeconfig) = (self.name.clone(), self.kubeconfig.clone());
        block_on_thread(move || async move {
            // A client of this thread's runtime: the test's may be blocked on this drop.
            let client = client_from(&kubeconfig).await;
            let gone = DeleteParams::default();
            if let Err(e) = Api::<ClusterRoleBinding>::all(client.clone()).delete(&name, &gone).await {
                eprintln!("testenv: deleting ClusterRoleBinding {name}: {e}");
            }
            if let Err(e) = Api::<ClusterRole>::all(client).delete(&name, &gone).await {
                eprintln!("testenv: deleting ClusterRole {name}: {e}");
            }
        });
    }
}

/// How many requests the API server has served with this verb (`GET`, `LIST`, `WATCH`,
/// ...) on this resource (core group, the object itself, not a subresource), summed
/// over response codes, as its `apiserver_request_total` counter says.
pub async fn request_count(admin: &Client, verb: &str, resource: &str) -> u64 {
    let request = http::Request::get("/metrics").body(Vec::new()).expect("a GET request builds");
    let text = admin.request_text(request).await.unwrap_or_else(|e| panic!("reading /metrics: {e}"));
    count_requests(&text, verb, resource)
}

fn count_requests(metrics: &str, verb: &str, resource: &str) -> u64 {
    let wanted = [
        format!("verb=\"{verb}\""),
        format!("resource=\"{resource}\""),
        "group=\"\"".to_owned(),
        "subresource=\"\"".to_owned(),
    ];
    metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| wanted.iter().all(|w| l.contains(w.as_str())))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_only_the_verb_and_resource_asked_for() {
        let metrics = r#"# TYPE apiserver_request_total counter
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="pods",scope="resource",subresource="",verb="GET",version="v1"} 7
apiserver_request_total{code="404",component="apiserver",dry_run="",group="",resource="pods",scope="resource",subresource="",verb="GET",version="v1"} 2
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="pods",scope="resource",subresource="status",verb="GET",version="v1"} 5
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="pods",scope="cluster",subresource="",verb="LIST",version="v1"} 3
apiserver_request_total{code="200",component="apiserver",dry_run="",group="apps",resource="pods",scope="resource",subresource="",verb="GET",version="v1"} 11
"#;
        assert_eq!(super::count_requests(metrics, "GET", "pods"), 9);
        assert_eq!(super::count_requests(metrics, "LIST", "pods"), 3);
    }
}
