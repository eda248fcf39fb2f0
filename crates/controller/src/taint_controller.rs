//! The taint controller at the edge: caches of nodes, CNI pods and the CNI DaemonSet(s),
//! reconcile per node (from a node event, from an event of a CNI pod on it, on gaining
//! leadership, or of every node when a CNI DaemonSet changes), and the patch with
//! conflict retries.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec};
use k8s_openapi::api::core::v1::{Node, NodeSpec, Pod, PodSpec, PodStatus, PodTemplateSpec};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Config, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tracing::info;

use crate::leader::Leadership;
use crate::status::{Part, Status};
use crate::taint::{self, Change};
use crate::{ControllerArgs, Error, bounded, drain_runs};

/// Patches in flight at once: enough to keep up with a burst of new nodes, few enough
/// not to queue behind each other in the API server.
const CONCURRENCY: u16 = 16;
/// Fresh reads and retries after a conflict before giving the node back to the queue.
const ATTEMPTS: u32 = 5;
/// When a reconcile failed (timeouts, conflicts exhausted, a refusal), try again after this.
const RETRY_AFTER: Duration = Duration::from_secs(5);

struct Ctx {
    nodes: Api<Node>,
    cni_pods: Store<Pod>,
    /// The CNI DaemonSets (labelled like the CNI pods, in their namespace): which nodes
    /// they target.
    daemonsets: Store<DaemonSet>,
    /// True once both caches are complete. Reconcile tasks wait on this, not on
    /// `Store::wait_until_ready`, which wakes only one of several waiting tasks.
    synced: watch::Receiver<bool>,
    leader: Leadership,
    status: Arc<Status>,
    timeout: Duration,
}

/// Runs the taint controller until dropped.
pub async fn run(client: Client, args: &ControllerArgs, leader: Leadership, status: Arc<Status>) {
    let (node_reader, node_writer) = reflector::store();
    let nodes = Api::<Node>::all(client.clone());
    let node_events = watcher(nodes.clone(), watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(trim_node)
        .reflect(node_writer)
        .applied_objects();

    let (pod_reader, pod_writer) = reflector::store();
    let pod_config = watcher::Config::default()
        .any_semantic()
        .labels(&format!("app={}", args.cni_app))
        .fields(&format!("metadata.namespace={}", args.cni_namespace));
    let pod_events = watcher(Api::<Pod>::all(client.clone()), pod_config)
        .default_backoff()
        .modify(trim_pod)
        .reflect(pod_writer)
        .touched_objects();

    // Read from the DaemonSet itself: its nodeSelector, affinity and tolerations.
    let (ds_reader, ds_writer) = reflector::store();
    let ds_config = watcher::Config::default().any_semantic().labels(&format!("app={}", args.cni_app));
    let ds_changes = watcher(Api::<DaemonSet>::namespaced(client, &args.cni_namespace), ds_config)
        .default_backoff()
        .modify(trim_daemonset)
        .reflect(ds_writer)
        .touched_objects()
        .map(|_| ());

    let (synced_tx, synced) = watch::channel(false);
    let ctx = Arc::new(Ctx {
        nodes,
        cni_pods: pod_reader.clone(),
        daemonsets: ds_reader.clone(),
        synced,
        leader: leader.clone(),
        status: status.clone(),
        timeout: args.api_timeout,
    });
    let synced = async {
        // Never fails: the writers live as long as the controller below. Polled in the
        // controller's task, so the single wake-up the stores give reaches it.
        let _ =
            futures::join!(node_reader.wait_until_ready(), pod_reader.wait_until_ready(), ds_reader.wait_until_ready());
        synced_tx.send_replace(true);
        status.synced(Part::Taint);
    };
    let controller = Controller::for_stream(node_events, node_reader.clone())
        .watches_stream(pod_events, |pod| taint::pod_node(&pod).map(ObjectRef::new))
        .reconcile_all_on(leader.gained())
        .reconcile_all_on(ds_changes)
        .with_config(Config::default().concurrency(CONCURRENCY))
        .run(reconcile, error_policy, ctx);
    let controller = drain_runs(controller, &status, "taint");
    futures::join!(synced, controller);
}

async fn reconcile(node: Arc<Node>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if !ctx.leader.is_leader() {
        return Ok(Action::await_change());
    }
    // Deciding before every CNI pod is known would taint nodes whose CNI is ready.
    let _ = ctx.synced.clone().wait_for(|synced| *synced).await;
    let name = node.name_any();
    let mut node = node;
    for _ in 0..ATTEMPTS {
        let cni_ready =
            ctx.cni_pods.find(|p| taint::pod_node(p) == Some(name.as_str()) && taint::cni_pod_ready(p)).is_some();
        let daemonsets = ctx.daemonsets.state();
        let specs = daemonsets.iter().filter_map(|d| d.spec.template.spec.as_ref());
        let targeted = taint::targeted_by_any(specs, &node);
        let Some(change) = taint::decide(&node, cni_ready, targeted) else {
            return Ok(Action::await_change());
        };
        if !ctx.leader.is_leader() {
            return Ok(Action::await_change());
        }
        let patch = Patch::Json::<()>(taint::patch(&node, change));
        let what = || format!("{} taint {} on node {name}", change.as_str(), taint::TAINT_KEY);
        match bounded(ctx.timeout, what, ctx.nodes.patch(&name, &PatchParams::default(), &patch)).await {
            Ok(_) => {
                ctx.status.taint_changed(change.as_str());
                let done = match (change, targeted) {
                    (Change::Add, _) => "tainted: no Ready CNI pod on it",
                    (Change::Remove, true) => "untainted: its CNI pod is Ready",
                    (Change::Remove, false) => "untainted: the CNI DaemonSet does not run on it",
                };
                info!(node = %name, taint = taint::TAINT_KEY, "{done}");
                return Ok(Action::await_change());
            }
            // The resourceVersion test failed (422), or the write lost a race (409):
            // decide again on a fresh read.
            Err(e) if e.is_status(422) || e.is_status(409) => {
                ctx.status.conflict("taint");
                let what = || format!("get node {name}");
                match bounded(ctx.timeout, what, ctx.nodes.get_opt(&name)).await? {
                    Some(mut fresh) => {
                        trim_node(&mut fresh);
                        node = Arc::new(fresh);
                    }
                    None => return Ok(Action::await_change()),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(Error::Conflicts { what: format!("taint of node {name}"), attempts: ATTEMPTS })
}

fn error_policy(_node: Arc<Node>, error: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.status.report("taint", error);
    Action::requeue(RETRY_AFTER)
}

/// Keeps what the decision reads (metadata without annotations and managed fields, the
/// taints): real nodes carry large annotations and image lists in their status.
fn trim_node(node: &mut Node) {
    node.metadata.managed_fields = None;
    node.metadata.annotations = None;
    node.status = None;
    node.spec = Some(NodeSpec { taints: node.spec.take().and_then(|s| s.taints), ..Default::default() });
}

/// Keeps what decides placement: the template's nodeSelector, affinity and tolerations.
fn trim_daemonset(ds: &mut DaemonSet) {
    ds.metadata.managed_fields = None;
    ds.metadata.annotations = None;
    ds.status = None;
    let pod = std::mem::take(&mut ds.spec).template.spec.unwrap_or_default();
    let pod = PodSpec {
        node_selector: pod.node_selector,
        affinity: pod.affinity,
        tolerations: pod.tolerations,
        ..Default::default()
    };
    let template = PodTemplateSpec { spec: Some(pod), ..Default::default() };
    ds.spec = DaemonSetSpec { template, ..Default::default() };
}

/// Keeps the node name, the phase and the conditions.
fn trim_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    pod.spec = Some(PodSpec { node_name: pod.spec.take().and_then(|s| s.node_name), ..Default::default() });
    let status = pod.status.take().unwrap_or_default();
    pod.status = Some(PodStatus { phase: status.phase, conditions: status.conditions, ..Default::default() });
}

/// Reconcile against a mocked API (tower-test): the conflicts a concurrent writer causes
/// and a patch that never returns, on cue.
#[cfg(test)]
mod tests {
    use http::{Method, Request, Response};
    use k8s_openapi::api::core::v1::{PodCondition, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::client::Body;
    use serde_json::{Value, json};
    use tower_test::mock::{self, Handle, SendResponse};

    use super::*;

    type Mock = Handle<Request<Body>, Response<Body>>;

    fn node(version: &str, taints: &[&str]) -> Node {
        let taints =
            taints.iter().map(|k| Taint { key: (*k).into(), effect: "NoSchedule".into(), ..Default::default() });
        Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                resource_version: Some(version.into()),
                ..Default::default()
            },
            spec: Some(NodeSpec { taints: Some(taints.collect()), ..Default::default() }),
            status: None,
        }
    }

    /// A leader whose caches hold a Ready CNI pod on `n1`, no DaemonSet (so every node is
    /// targeted), and whose API is the mock.
    fn ctx() -> (Arc<Ctx>, Arc<Status>, Mock) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let (cni_pods, mut pods) = reflector::store();
        let condition = PodCondition { type_: "Ready".into(), status: "True".into(), ..Default::default() };
        pods.apply_watcher_event(&watcher::Event::Apply(Pod {
            metadata: ObjectMeta { name: Some("cni-x".into()), ..Default::default() },
            spec: Some(PodSpec { node_name: Some("n1".into()), ..Default::default() }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                conditions: Some(vec![condition]),
                ..Default::default()
            }),
        }));
        let (daemonsets, _) = reflector::store();
        let (_, synced) = watch::channel(true);
        let status = Arc::new(Status::new(&[]));
        let ctx = Ctx {
            nodes: Api::all(client),
            cni_pods,
            daemonsets,
            synced,
            leader: Leadership::held(),
            status: status.clone(),
            timeout: Duration::from_secs(5),
        };
        (Arc::new(ctx), status, handle)
    }

    async fn next(api: &mut Mock) -> (Method, Value, SendResponse<Response<Body>>) {
        let (request, send) = api.next_request().await.expect("another call");
        let (parts, body) = request.into_parts();
        let body = body.collect_bytes().await.expect("a request body");
        let body = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).expect("JSON") };
        assert!(parts.uri.path().ends_with("/api/v1/nodes/n1"), "{}", parts.uri);
        (parts.method, body, send)
    }

    fn answer(send: SendResponse<Response<Body>>, code: u16, body: &impl k8s_openapi::serde::Serialize) {
        let response = Response::builder().status(code).body(Body::from(serde_json::to_vec(body).expect("JSON")));
        send.send_response(response.expect("a response"));
    }

    fn refusal(code: u16) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "message": "changed"})
    }

    fn metric(status: &Status, line: &str) -> bool {
        status.render().lines().any(|l| l == line)
    }

    #[tokio::test]
    async fn a_node_changed_under_the_patch_is_decided_again_on_a_fresh_read() {
        let (ctx, status, mut api) = ctx();
        let reconcile = tokio::spawn(reconcile(Arc::new(node("1", &[taint::TAINT_KEY])), ctx));

        let (method, body, send) = next(&mut api).await;
        assert_eq!(method, Method::PATCH);
        assert_eq!(body[0], json!({"op": "test", "path": "/metadata/resourceVersion", "value": "1"}));
        assert_eq!(body[1], json!({"op": "remove", "path": "/spec/taints/0"}));
        answer(send, 422, &refusal(422));
        // Someone added a taint in front of ours meanwhile: the fresh read moves our index.
        let (method, _, send) = next(&mut api).await;
        assert_eq!(method, Method::GET);
        answer(send, 200, &node("2", &["other.example/x", taint::TAINT_KEY]));
        let (_, body, send) = next(&mut api).await;
        assert_eq!(body[0]["value"], "2");
        assert_eq!(body[1], json!({"op": "remove", "path": "/spec/taints/1"}), "{body}");
        answer(send, 200, &node("3", &["other.example/x"]));

        reconcile.await.expect("joins").expect("reconciled");
        assert!(
            metric(&status, "kong_mesh_cni_controller_conflicts_total{controller=\"taint\"} 1"),
            "{}",
            status.render()
        );
        assert!(metric(&status, "kong_mesh_cni_controller_taint_changes_total{change=\"remove\"} 1"));
    }

    #[tokio::test]
    async fn endless_conflicts_give_the_node_back_to_the_queue() {
        let (ctx, status, mut api) = ctx();
        let reconcile = tokio::spawn(reconcile(Arc::new(node("1", &[taint::TAINT_KEY])), ctx));
        for version in 2..=(1 + ATTEMPTS) {
            let (_, _, send) = next(&mut api).await;
            answer(send, 409, &refusal(409));
            let (_, _, send) = next(&mut api).await;
            answer(send, 200, &node(&version.to_string(), &[taint::TAINT_KEY]));
        }
        let error = reconcile.await.expect("joins").expect_err("gives up");
        assert!(matches!(error, Error::Conflicts { attempts: ATTEMPTS, .. }), "{error}");
        assert_eq!(error.kind(), "conflicts");
        assert!(metric(
            &status,
            &format!("kong_mesh_cni_controller_conflicts_total{{controller=\"taint\"}} {ATTEMPTS}")
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_patch_that_never_returns_is_cut_off() {
        let (ctx, status, mut api) = ctx();
        let started = tokio::time::Instant::now();
        let reconcile = tokio::spawn(reconcile(Arc::new(node("1", &[taint::TAINT_KEY])), ctx.clone()));
        let (_, _, hung) = next(&mut api).await;
        let error = reconcile.await.expect("joins").expect_err("times out");
        assert!(matches!(error, Error::Timeout { .. }), "{error}");
        assert_eq!(started.elapsed(), Duration::from_secs(5), "cut off at the call bound");
        // The controller's error policy counts it and retries later.
        let action = error_policy(Arc::new(node("1", &[])), &error, ctx);
        assert_eq!(action, Action::requeue(RETRY_AFTER));
        assert!(metric(&status, "kong_mesh_cni_controller_errors_total{controller=\"taint\",kind=\"timeout\"} 1"));
        drop(hung);
    }
}
