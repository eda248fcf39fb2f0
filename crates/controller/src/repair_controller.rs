//! The repair controller at the edge: one watch over the pods that are not running,
//! without a cache (the pods needing repair are few, the pods many), one over the CNI
//! pods (since when each node has a Ready one), and the action, taken at most once per
//! pod UID, with an Event and a metric for each.

use std::collections::{HashMap, HashSet};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::leader::Leadership;
use crate::repair::{self, EVENT_REASON, REDIRECT_MISSING_LABEL};
use crate::status::{Part, Status};
use crate::{ControllerArgs, Error, RepairAction, bounded};

/// After a failed action (not a precondition), the pod is tried again after this.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// A pod is acted on this long after it was first seen needing repair and after its
/// node's CNI pod was seen Ready ([`repair::due`]).
const SETTLE: Duration = Duration::from_secs(2);

/// Runs until dropped (returns at once when the action is `off`).
pub async fn run(client: Client, args: &ControllerArgs, identity: String, leader: Leadership, status: Arc<Status>) {
    let action = match args.repair_action {
        RepairAction::Delete => Verb::Delete,
        RepairAction::Label => Verb::Label,
        RepairAction::Off => return,
    };
    // A pod whose validator failed has not finished its init containers, so it is not
    // Running (nor Succeeded): the server filters out the bulk of a cluster's pods. A
    // pod leaving this selection arrives as a Delete.
    let config = watcher::Config::default().any_semantic().fields("status.phase!=Running,status.phase!=Succeeded");
    let events = watcher(Api::<Pod>::all(client.clone()), config).default_backoff();
    let cni_config = watcher::Config::default()
        .any_semantic()
        .labels(&format!("app={}", args.cni_app))
        .fields(&format!("metadata.namespace={}", args.cni_namespace));
    let cni_events = watcher(Api::<Pod>::all(client.clone()), cni_config).default_backoff();
    let reporter = Reporter { controller: "kong-mesh-cni-controller".into(), instance: Some(identity) };
    let repairer = Repairer {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        action,
        leader,
        status,
        timeout: args.api_timeout,
        pending: HashMap::new(),
        done: HashSet::new(),
        relisted: None,
        retry_at: None,
        cni_ready: HashMap::new(),
    };
    repairer.run(events, cni_events).await;
}

struct Repairer {
    client: Client,
    recorder: Recorder,
    action: Verb,
    leader: Leadership,
    status: Arc<Status>,
    timeout: Duration,
    /// Pods needing repair, by UID, in the latest version seen, and when that was first seen.
    pending: HashMap<String, (Pod, Instant)>,
    /// UIDs acted on: never again, until the pod is gone.
    done: HashSet<String>,
    /// UIDs seen during a relist, to forget pods deleted while the watch was down.
    relisted: Option<HashSet<String>>,
    retry_at: Option<Instant>,
    /// Node -> (CNI pod UID, when it was first seen Ready).
    cni_ready: HashMap<String, (String, Instant)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verb {
    Delete,
    Label,
}

impl Verb {
    fn as_str(self) -> &'static str {
        match self {
            Verb::Delete => "delete",
            Verb::Label => "label",
        }
    }
}

enum Outcome {
    Done,
    /// The pod changed or went away since that version: the watch brings what follows.
    Stale,
}

impl Repairer {
    async fn run(
        mut self,
        events: impl Stream<Item = watcher::Result<watcher::Event<Pod>>>,
        cni_events: impl Stream<Item = watcher::Result<watcher::Event<Pod>>>,
    ) {
        let mut events = pin!(events);
        let mut cni_events = pin!(cni_events);
        let mut gained = pin!(self.leader.gained());
        loop {
            let retry_at = self.retry_at;
            let retry = async move {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = events.next() => match event {
                    Some(event) => self.observe(event),
                    None => return,
                },
                Some(event) = cni_events.next() => self.observe_cni(event),
                Some(()) = gained.next() => {}
                () = retry => self.retry_at = None,
            }
            if self.leader.is_leader() && !self.pending.is_empty() && self.retry_at.is_none() {
                self.act_on_pending().await;
            }
            // Pods not due yet wake the loop when they are (those on a node without a
            // Ready CNI pod wait for its event).
            let settling = self
                .pending
                .values()
                .filter_map(|(pod, seen)| Some((*seen).max(self.cni_ready_since(pod)?) + SETTLE))
                .filter(|at| *at > Instant::now())
                .min();
            if self.retry_at.is_none() {
                self.retry_at = settling;
            }
        }
    }

    fn observe(&mut self, event: watcher::Result<watcher::Event<Pod>>) {
        match event {
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                let uid = pod.uid().unwrap_or_default();
                if let Some(seen) = &mut self.relisted {
                    seen.insert(uid.clone());
                }
                if !self.done.contains(&uid) && repair::needs_repair(&pod).is_some() {
                    let seen = self.pending.get(&uid).map_or_else(Instant::now, |(_, seen)| *seen);
                    self.pending.insert(uid, (pod, seen));
                } else {
                    self.pending.remove(&uid);
                }
            }
            Ok(watcher::Event::Delete(pod)) => {
                let uid = pod.uid().unwrap_or_default();
                self.pending.remove(&uid);
                self.done.remove(&uid);
            }
            Ok(watcher::Event::Init) => self.relisted = Some(HashSet::new()),
            Ok(watcher::Event::InitDone) => {
                if let Some(seen) = self.relisted.take() {
                    self.done.retain(|uid| seen.contains(uid));
                    self.pending.retain(|uid, _| seen.contains(uid));
                }
                self.status.synced(Part::Repair);
            }
            Err(e) => self.status.report("repair", &Error::Watch(e)),
        }
    }

    /// A CNI pod's event: since when its node has a Ready one. Watch errors are the
    /// backoff's to retry; meanwhile what is known stays.
    fn observe_cni(&mut self, event: watcher::Result<watcher::Event<Pod>>) {
        let pod = match event {
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => pod,
            Ok(watcher::Event::Delete(pod)) => {
                let uid = pod.uid().unwrap_or_default();
                self.cni_ready.retain(|_, (ready, _)| *ready != uid);
                return;
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => return,
            Err(e) => return self.status.report("repair", &Error::Watch(e)),
        };
        let (uid, Some(node)) = (pod.uid().unwrap_or_default(), crate::taint::pod_node(&pod)) else { return };
        if crate::taint::cni_pod_ready(&pod) {
            self.cni_ready.entry(node.to_owned()).or_insert_with(|| (uid, Instant::now()));
        } else if self.cni_ready.get(node).is_some_and(|(ready, _)| *ready == uid) {
            self.cni_ready.remove(node);
        }
    }

    fn cni_ready_since(&self, pod: &Pod) -> Option<Instant> {
        self.cni_ready.get(crate::taint::pod_node(pod)?).map(|(_, since)| *since)
    }

    async fn act_on_pending(&mut self) {
        let uids: Vec<String> = self.pending.keys().cloned().collect();
        for uid in uids {
            // Leadership can lapse during the previous action: ask before each.
            if !self.leader.is_leader() {
                return;
            }
            let Some((pod, seen)) = self.pending.get(&uid).cloned() else { continue };
            if !repair::due(seen, self.cni_ready_since(&pod), Instant::now(), SETTLE) {
                continue;
            }
            match self.act(&pod).await {
                Ok(Outcome::Done) => {
                    self.pending.remove(&uid);
                    self.done.insert(uid);
                    self.status.repaired(self.action.as_str());
                    self.record(&pod).await;
                }
                Ok(Outcome::Stale) => {
                    self.pending.remove(&uid);
                }
                Err(e) => {
                    self.status.report("repair", &e);
                    self.retry_at = Some(Instant::now() + RETRY_AFTER);
                }
            }
        }
    }

    async fn act(&self, pod: &Pod) -> Result<Outcome, Error> {
        let (namespace, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
        let api = Api::<Pod>::namespaced(self.client.clone(), &namespace);
        let what = || format!("{} pod {namespace}/{name}", self.action.as_str());
        let result = match self.action {
            // Both preconditions: a pod recreated under this name, or one that changed
            // since we decided, is not deleted on the strength of an old version.
            Verb::Delete => {
                let preconditions = Preconditions { uid: pod.uid(), resource_version: pod.resource_version() };
                let params = DeleteParams { preconditions: Some(preconditions), ..Default::default() };
                bounded(self.timeout, what, api.delete(&name, &params)).await.map(drop)
            }
            Verb::Label => {
                // The resourceVersion in a patch is a precondition too (409 when stale).
                let patch = json!({"metadata": {"resourceVersion": pod.resource_version(), "labels": {REDIRECT_MISSING_LABEL: "true"}}});
                bounded(self.timeout, what, api.patch(&name, &PatchParams::default(), &Patch::Merge(patch)))
                    .await
                    .map(drop)
            }
        };
        match result {
            Ok(()) => {
                info!(pod = %format!("{namespace}/{name}"), action = self.action.as_str(), "repaired a pod whose traffic is not redirected");
                Ok(Outcome::Done)
            }
            Err(e) if e.is_status(409) => {
                self.status.conflict("repair");
                Ok(Outcome::Stale)
            }
            Err(e) if e.is_status(404) => Ok(Outcome::Stale),
            Err(e) => Err(e),
        }
    }

    async fn record(&self, pod: &Pod) {
        let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).unwrap_or("its node");
        let (action, done) = match self.action {
            Verb::Delete => ("Delete", "deleted so that its owner recreates it".to_owned()),
            Verb::Label => ("Label", format!("labelled {REDIRECT_MISSING_LABEL}=true")),
        };
        let code = repair::needs_repair(pod).unwrap_or(kuma::pod::VALIDATOR_EXIT_NOT_REDIRECTED);
        let note = format!(
            "init container {} exited {code}: the pod's traffic is not redirected (it started before the CNI was ready on {node}); {done}",
            kuma::pod::VALIDATION_CONTAINER,
        );
        let event = Event {
            type_: EventType::Warning,
            reason: EVENT_REASON.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        let what = || format!("event for pod {}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
        match bounded(self.timeout, what, self.recorder.publish(&event, &pod.object_ref(&()))).await {
            Ok(()) => self.status.event(true),
            Err(e) => {
                self.status.event(false);
                self.status.report("repair", &e);
                warn!("the pod was repaired, but its Event was not recorded");
            }
        }
    }
}
