//! The NAD controller at the edge. A supervisor watches the one CRD by name and runs the
//! namespace controller only while the CRD is established, so Multus installed (or
//! removed) after the controller started is handled without a restart. While it runs,
//! Multus's `NoNetworkFound` Events are watched too: a mesh pod in a namespace without
//! the label gets an Event of ours saying to label it (see [`nad::hint`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Namespace, NamespaceStatus};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, PostParams, Preconditions};
use kube::runtime::controller::{Action, Config, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::leader::Leadership;
use crate::nad::{self, Change};
use crate::status::{Part, Status};
use crate::{ControllerArgs, Error, bounded, drain_runs};

const CONCURRENCY: u16 = 8;
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// Multus repeats its Event on every retry of the kubelet: one hint per pod this often.
const HINT_EVERY: Duration = Duration::from_secs(60);
/// Multus Events older than this (listed after a restart of ours) get no hint.
const HINT_MAX_AGE: Duration = Duration::from_secs(300);

/// Runs until dropped; the namespace controller, when running, is stopped with it.
pub async fn run(client: Client, args: ControllerArgs, leader: Leadership, status: Arc<Status>) {
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    // By name: the grant is for this one CRD, and no other CRD's churn reaches us.
    let config = watcher::Config::default().fields(&format!("metadata.name={}", nad::CRD_NAME));
    let mut events = std::pin::pin!(watcher(crds, config).default_backoff());
    let mut running: Option<Running> = None;
    let mut listed = false;
    while let Some(event) = events.next().await {
        let established = match event {
            Ok(watcher::Event::Apply(crd) | watcher::Event::InitApply(crd)) => {
                listed = true;
                nad::established(&crd)
            }
            Ok(watcher::Event::Delete(_)) => false,
            Ok(watcher::Event::Init) => {
                listed = false;
                continue;
            }
            // A relist without the CRD means it is gone.
            Ok(watcher::Event::InitDone) => running.is_some() && listed,
            Err(e) => {
                status.report("nad", &Error::Watch(e));
                continue;
            }
        };
        match (established, running.is_some()) {
            (true, false) => {
                info!(crd = nad::CRD_NAME, "CRD established: managing NetworkAttachmentDefinitions");
                let task = namespaces(client.clone(), args.clone(), leader.clone(), status.clone());
                running = Some(Running(tokio::spawn(task)));
            }
            (false, true) => {
                info!(crd = nad::CRD_NAME, "CRD gone: no longer managing NetworkAttachmentDefinitions");
                running = None;
            }
            _ => {}
        }
        // Without the CRD there is nothing to wait for; with it, `namespaces` reports.
        if running.is_none() {
            status.synced(Part::Nad);
        }
    }
}

/// The namespace controller's task, stopped when this is dropped.
struct Running(JoinHandle<()>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Ctx {
    client: Client,
    resource: ApiResource,
    nad_name: String,
    ours: Store<DynamicObject>,
    /// True once both caches are complete (see the taint controller's `Ctx`).
    synced: watch::Receiver<bool>,
    leader: Leadership,
    status: Arc<Status>,
    timeout: Duration,
}

async fn namespaces(client: Client, args: ControllerArgs, leader: Leadership, status: Arc<Status>) {
    let resource = nad::resource();
    let (ns_reader, ns_writer) = reflector::store::<Namespace>();
    let ns_events = watcher(Api::<Namespace>::all(client.clone()), watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(trim_namespace)
        .reflect(ns_writer)
        .applied_objects();

    let nad_writer = Writer::new(resource.clone());
    let ours = nad_writer.as_reader();
    let nad_config = watcher::Config::default()
        .any_semantic()
        .labels(&format!("{}={}", nad::MANAGED_BY_LABEL, nad::MANAGED_BY))
        .fields(&format!("metadata.name={}", args.nad_name));
    let nad_events = watcher(Api::<DynamicObject>::all_with(client.clone(), &resource), nad_config)
        .default_backoff()
        .modify(|nad| nad.managed_fields_mut().clear())
        .reflect(nad_writer)
        .touched_objects();

    let (synced_tx, synced) = watch::channel(false);
    let ctx = Arc::new(Ctx {
        client,
        resource: resource.clone(),
        nad_name: args.nad_name.clone(),
        ours: ours.clone(),
        synced,
        leader: leader.clone(),
        status: status.clone(),
        timeout: args.api_timeout,
    });
    let synced = async {
        // Never fails: the writers live as long as the controller below. Polled in the
        // controller's task, so the single wake-up the stores give reaches it.
        let _ = futures::join!(ns_reader.wait_until_ready(), ours.wait_until_ready());
        synced_tx.send_replace(true);
        status.synced(Part::Nad);
    };
    let controller = Controller::for_stream(ns_events, ns_reader.clone())
        .watches_stream_with(nad_events, |nad| nad.namespace().map(|ns| ObjectRef::new(&ns)), resource)
        .reconcile_all_on(leader.gained())
        .with_config(Config::default().concurrency(CONCURRENCY))
        .run(reconcile, error_policy, ctx.clone());
    let controller = drain_runs(controller, &status, "nad");
    let reporter = Reporter { controller: "kong-mesh-cni-controller".into(), instance: Some(args.identity()) };
    let hints = hints(Recorder::new(ctx.client.clone(), reporter), ns_reader.clone(), ctx);
    futures::join!(synced, controller, hints);
}

/// Answers Multus's `NoNetworkFound` Events about our NAD with what to do (see
/// [`nad::hint`]), as the leader, on the pod they are about.
async fn hints(recorder: Recorder, namespaces: Store<Namespace>, ctx: Arc<Ctx>) {
    let config = watcher::Config::default().fields(&format!("reason={}", nad::MULTUS_NO_NETWORK));
    let events = watcher(Api::<CoreEvent>::all(ctx.client.clone()), config).default_backoff().applied_objects();
    let mut events = std::pin::pin!(events);
    let mut hinted: HashMap<String, Instant> = HashMap::new();
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                ctx.status.report("nad", &Error::Watch(e));
                continue;
            }
        };
        let pod = &event.involved_object;
        let (Some(uid), Some(ns)) = (pod.uid.as_deref(), pod.namespace.as_deref()) else { continue };
        let seen = event.last_timestamp.as_ref().map(|t| t.0).or(event.event_time.as_ref().map(|t| t.0));
        let stale = seen.is_none_or(|t| {
            k8s_openapi::jiff::Timestamp::now().duration_since(t).as_secs() > HINT_MAX_AGE.as_secs() as i64
        });
        if stale || !ctx.leader.is_leader() {
            continue;
        }
        let Some(namespace) = namespaces.get(&ObjectRef::new(ns)) else { continue };
        let Some(note) = nad::hint(event.message.as_deref().unwrap_or_default(), &ctx.nad_name, &namespace) else {
            continue;
        };
        let now = Instant::now();
        hinted.retain(|_, at| now.duration_since(*at) < HINT_EVERY);
        if hinted.insert(uid.to_owned(), now).is_some() {
            continue;
        }
        let ours = Event {
            type_: EventType::Warning,
            reason: nad::HINT_REASON.into(),
            note: Some(note),
            action: "Hint".into(),
            secondary: None,
        };
        let what = || format!("hint for pod {ns}/{}", pod.name.as_deref().unwrap_or_default());
        match bounded(ctx.timeout, what, recorder.publish(&ours, pod)).await {
            Ok(()) => ctx.status.event(true),
            Err(e) => {
                ctx.status.event(false);
                ctx.status.report("nad", &e);
                warn!(namespace = %ns, "the hint to label the namespace was not recorded");
            }
        }
    }
}

async fn reconcile(namespace: Arc<Namespace>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if !ctx.leader.is_leader() {
        return Ok(Action::await_change());
    }
    // Decide only on a complete view of our NADs, or one would be created twice.
    let _ = ctx.synced.clone().wait_for(|synced| *synced).await;
    let ns = namespace.name_any();
    let ours = ctx.ours.get(&ObjectRef::new_with(&ctx.nad_name, ctx.resource.clone()).within(&ns));
    let Some(change) = nad::decide(&namespace, ours.is_some()) else {
        return Ok(Action::await_change());
    };
    if !ctx.leader.is_leader() {
        return Ok(Action::await_change());
    }
    let api = Api::<DynamicObject>::namespaced_with(ctx.client.clone(), &ns, &ctx.resource);
    let what = || format!("{} NetworkAttachmentDefinition {ns}/{}", change.as_str(), ctx.nad_name);
    let done = match change {
        Change::Create => {
            bounded(ctx.timeout, what, api.create(&PostParams::default(), &nad::new_nad(&ctx.nad_name, &ns)))
                .await
                .map(|_| true)
        }
        Change::Delete => {
            // Precondition: exactly the NAD we saw, not one someone made in its place.
            let preconditions = Preconditions { uid: ours.and_then(|o| o.uid()), resource_version: None };
            let params = DeleteParams { preconditions: Some(preconditions), ..Default::default() };
            bounded(ctx.timeout, what, api.delete(&ctx.nad_name, &params)).await.map(|_| true)
        }
    };
    match done {
        Ok(_) => {
            ctx.status.nad_changed(change.as_str());
            info!(namespace = %ns, name = %ctx.nad_name, change = change.as_str(), "NetworkAttachmentDefinition");
        }
        // Created by someone else (not ours, so left alone), already gone, or replaced
        // by another since we saw it: the cache catches up and the watch brings us back.
        Err(e) if e.is_status(409) || (change == Change::Delete && e.is_status(404)) => {}
        Err(e) => return Err(e),
    }
    Ok(Action::await_change())
}

fn error_policy(_ns: Arc<Namespace>, error: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.status.report("nad", error);
    Action::requeue(RETRY_AFTER)
}

/// Keeps the labels, the deletion mark and the phase.
fn trim_namespace(ns: &mut Namespace) {
    ns.metadata.managed_fields = None;
    ns.metadata.annotations = None;
    ns.spec = None;
    let phase = ns.status.take().and_then(|s| s.phase);
    ns.status = Some(NamespaceStatus { phase, ..Default::default() });
}
