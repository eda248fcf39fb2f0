//! Kubernetes Events on pods, sent by the node agent (never on the plugin's path): an
//! ADD that failed, a mesh pod let through because the API server could not be asked,
//! and the in-place repair of such a pod later. As the kubelet's: the same pod and
//! reason within [`WINDOW`] counts up one Event (a patch of its count) instead of
//! making another, and a token bucket bounds the node's calls. Every call is bounded;
//! a notice the API server could not take (it is away) is tried again for a while.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use cni::plugin::record::{Outcome, PodRef, Reason, Record};
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::api::Identity;

/// The Events' component (`source.component`, `reportingComponent`).
pub const COMPONENT: &str = "kong-mesh-cni";
pub const REASON_FAILED: &str = "MeshRedirectFailed";
pub const REASON_SKIPPED: &str = "MeshRedirectSkipped";
pub const REASON_REPAIRED: &str = "MeshRedirectRepaired";

/// The same pod and reason within this counts up one Event.
pub const WINDOW: Duration = Duration::from_secs(10 * 60);
/// Calls at once, then one more per [`REFILL`].
const BURST: u32 = 25;
const REFILL: Duration = Duration::from_secs(2);
/// Pods and reasons remembered for counting up; the oldest is forgotten past this.
const REMEMBERED: usize = 1024;
/// Notices waiting to be sent; more are dropped (and logged).
const QUEUE: usize = 256;
/// Each call's bound.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// A notice the API server could not take is tried again until it is this old.
const GIVE_UP_AFTER: Duration = Duration::from_secs(5 * 60);
const RETRY: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(10));

/// Something to say on a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub pod: PodRef,
    pub reason: &'static str,
    /// `Warning` or `Normal`.
    pub kind: &'static str,
    pub message: String,
}

impl Notice {
    /// What a plugin call's record has to say on its pod, if anything.
    pub fn of(record: &Record) -> Option<Notice> {
        if record.command != "ADD" {
            return None;
        }
        let pod = record.pod.clone()?;
        match (record.outcome, record.reason) {
            (Outcome::Failed, _) => Some(Notice {
                pod,
                reason: REASON_FAILED,
                kind: "Warning",
                message: format!(
                    "the CNI ADD failed with code {}: {}",
                    record.code.unwrap_or_default(),
                    record.message.as_deref().unwrap_or("(no message)")
                ),
            }),
            (Outcome::PassedThrough, Some(Reason::ApiUnavailable)) => Some(Notice {
                pod,
                reason: REASON_SKIPPED,
                kind: "Warning",
                message: "started without the transparent-proxy redirect: the API server could not be asked what the pod is (on_api_error: pass-through); the node agent programs it in place when the API server is back".into(),
            }),
            _ => None,
        }
    }

    /// The pod's redirect was programmed in place after it started without it.
    pub fn repaired(namespace: &str, name: &str, uid: Option<&str>) -> Notice {
        Notice {
            pod: PodRef { namespace: namespace.into(), name: name.into(), uid: uid.map(str::to_owned) },
            reason: REASON_REPAIRED,
            kind: "Normal",
            message: "the transparent-proxy redirect was programmed in place; the pod started without it while the API server could not be asked".into(),
        }
    }
}

/// What to do with a notice now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A new Event of this name, count 1.
    Create { name: String },
    /// The Event of this name now counts `count`.
    Patch { name: String, count: i32 },
    /// Over the rate: a repeat is counted into its Event's next patch; a new one is lost.
    Drop,
}

#[derive(Debug)]
struct Counted {
    name: String,
    count: i32,
    first: Instant,
}

/// A pod (a recreated one of the same name is another) and a reason.
type Key = (String, String, Option<String>, &'static str);

fn key_of(notice: &Notice) -> Key {
    (notice.pod.namespace.clone(), notice.pod.name.clone(), notice.pod.uid.clone(), notice.reason)
}

/// Which notices become which calls: the counting up and the rate. Pure but for the
/// clock it is given.
#[derive(Debug)]
pub struct Dedup {
    counted: HashMap<Key, Counted>,
    tokens: u32,
    refilled: Instant,
}

impl Dedup {
    pub fn new(now: Instant) -> Dedup {
        Dedup { counted: HashMap::new(), tokens: BURST, refilled: now }
    }

    pub fn decide(&mut self, notice: &Notice, now: Instant, unique: u128) -> Action {
        let earned = u32::try_from(now.duration_since(self.refilled).as_millis() / REFILL.as_millis()).unwrap_or(BURST);
        self.tokens = BURST.min(self.tokens.saturating_add(earned));
        // A full bucket earns nothing more; a partial one keeps its time towards the next.
        self.refilled = if self.tokens == BURST { now } else { self.refilled + REFILL * earned };
        let key = key_of(notice);
        let current = self.counted.get(&key).is_some_and(|c| now.duration_since(c.first) < WINDOW);
        let have_token = self.tokens > 0;
        if have_token {
            self.tokens -= 1;
        }
        match (current, have_token) {
            (true, true) => {
                let c = self.counted.get_mut(&key).expect("current");
                c.count += 1;
                Action::Patch { name: c.name.clone(), count: c.count }
            }
            (true, false) => {
                self.counted.get_mut(&key).expect("current").count += 1;
                Action::Drop
            }
            (false, false) => Action::Drop,
            (false, true) => {
                if self.counted.len() >= REMEMBERED {
                    self.forget_oldest(now);
                }
                // As the kubelet names them: unique per pod, sortable by time.
                let name = format!("{}.{unique:x}", notice.pod.name);
                self.counted.insert(key, Counted { name: name.clone(), count: 1, first: now });
                Action::Create { name }
            }
        }
    }

    /// The Event is gone from the server (expired): the next notice makes a new one.
    fn lost(&mut self, notice: &Notice) {
        self.counted.remove(&key_of(notice));
    }

    fn forget_oldest(&mut self, now: Instant) {
        self.counted.retain(|_, c| now.duration_since(c.first) < WINDOW);
        if self.counted.len() >= REMEMBERED
            && let Some(oldest) = self.counted.iter().min_by_key(|(_, c)| c.first).map(|(k, _)| k.clone())
        {
            self.counted.remove(&oldest);
        }
    }
}

/// The handle notices are offered to; cloning it is cheap.
#[derive(Debug, Clone)]
pub struct Events(mpsc::Sender<Notice>);

impl Events {
    /// Starts the sender on the current runtime, as `node`'s agent with `identity`.
    pub fn start(identity: Identity, node: String) -> Events {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(send_all(rx, identity, node));
        Events(tx)
    }

    /// Never waits: a full queue drops the notice.
    pub fn offer(&self, notice: Notice) {
        if let Err(mpsc::error::TrySendError::Full(n)) = self.0.try_send(notice) {
            tracing::debug!(pod = %format!("{}/{}", n.pod.namespace, n.pod.name), reason = n.reason, "too many pod events queued; dropping one");
        }
    }
}

async fn send_all(mut rx: mpsc::Receiver<Notice>, identity: Identity, node: String) {
    let mut dedup = Dedup::new(Instant::now());
    // Notices with the call decided for them once, and since when they wait.
    let mut waiting: VecDeque<(Notice, Option<Action>, Instant)> = VecDeque::new();
    let mut backoff = RETRY.0;
    loop {
        if waiting.is_empty() {
            let Some(notice) = rx.recv().await else { return };
            waiting.push_back((notice, None, Instant::now()));
        }
        while waiting.len() < QUEUE
            && let Ok(notice) = rx.try_recv()
        {
            waiting.push_back((notice, None, Instant::now()));
        }
        let Some((notice, decided, since)) = waiting.pop_front() else { continue };
        let action = decided.unwrap_or_else(|| {
            let unique = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            dedup.decide(&notice, Instant::now(), unique)
        });
        let pod = format!("{}/{}", notice.pod.namespace, notice.pod.name);
        let result = match &action {
            Action::Drop => {
                tracing::debug!(pod = %pod, reason = notice.reason, "pod events over their rate; counted, not sent");
                continue;
            }
            Action::Create { name } => create(&identity, &node, &notice, name).await,
            Action::Patch { name, count } => patch(&identity, &notice, name, *count).await,
        };
        match result {
            Ok(()) => {
                backoff = RETRY.0;
                tracing::debug!(pod = %pod, reason = notice.reason, "pod event sent");
            }
            // Expired meanwhile: it starts over.
            Err(Failure::Status(404, _)) if matches!(action, Action::Patch { .. }) => {
                dedup.lost(&notice);
                waiting.push_front((notice, None, since));
            }
            Err(Failure::Status(code, why)) => {
                tracing::warn!(pod = %pod, reason = notice.reason, code, error = %why, "the API server refused a pod event");
            }
            Err(Failure::Unavailable(why)) if since.elapsed() < GIVE_UP_AFTER => {
                tracing::debug!(pod = %pod, reason = notice.reason, error = %why, retry_in = ?backoff, "cannot send a pod event yet");
                waiting.push_front((notice, Some(action), since));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY.1);
            }
            Err(Failure::Unavailable(why)) => {
                tracing::warn!(pod = %pod, reason = notice.reason, error = %why, "giving up on a pod event");
            }
        }
    }
}

#[derive(Debug)]
enum Failure {
    Status(u16, String),
    Unavailable(String),
}

async fn bounded<T>(call: impl Future<Output = Result<T, kube::Error>>) -> Result<T, Failure> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(kube::Error::Api(s))) if s.code < 500 && s.code != 429 => Err(Failure::Status(s.code, s.message)),
        Ok(Err(e)) => Err(Failure::Unavailable(e.to_string())),
        Err(_) => Err(Failure::Unavailable(format!("no answer within {CALL_TIMEOUT:?}"))),
    }
}

async fn events_api(identity: &Identity, namespace: &str) -> Result<Api<Event>, Failure> {
    let client = identity.client(CALL_TIMEOUT, CALL_TIMEOUT).await.map_err(Failure::Unavailable)?;
    Ok(Api::namespaced(client, namespace))
}

async fn create(identity: &Identity, node: &str, notice: &Notice, name: &str) -> Result<(), Failure> {
    let api = events_api(identity, &notice.pod.namespace).await?;
    bounded(api.create(&PostParams::default(), &event(notice, name, node, Timestamp::now()))).await.map(drop)
}

async fn patch(identity: &Identity, notice: &Notice, name: &str, count: i32) -> Result<(), Failure> {
    let api = events_api(identity, &notice.pod.namespace).await?;
    let body = serde_json::json!({"count": count, "lastTimestamp": Time(Timestamp::now()), "message": notice.message});
    bounded(api.patch(name, &PatchParams::default(), &Patch::Merge(body))).await.map(drop)
}

/// The Event as the kubelet writes its own (core/v1, with a count).
pub fn event(notice: &Notice, name: &str, node: &str, now: Timestamp) -> Event {
    Event {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(notice.pod.namespace.clone()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(notice.pod.namespace.clone()),
            name: Some(notice.pod.name.clone()),
            uid: notice.pod.uid.clone(),
            ..ObjectReference::default()
        },
        reason: Some(notice.reason.into()),
        message: Some(notice.message.clone()),
        type_: Some(notice.kind.into()),
        count: Some(1),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        source: Some(EventSource { component: Some(COMPONENT.into()), host: Some(node.into()) }),
        reporting_component: Some(COMPONENT.into()),
        reporting_instance: Some(node.into()),
        ..Event::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cni::plugin::record::Seen;
    use cni::proto::CniError;

    fn notice(name: &str, reason: &'static str) -> Notice {
        Notice {
            pod: PodRef { namespace: "shop".into(), name: name.into(), uid: None },
            reason,
            kind: "Warning",
            message: "m".into(),
        }
    }

    #[test]
    fn records_say_failures_and_pods_let_through() {
        let pod = Some(PodRef { namespace: "shop".into(), name: "web".into(), uid: Some("u".into()) });
        let seen = Seen { pod: pod.clone(), ..Seen::default() };
        let ms = Duration::from_millis(1);
        let failed = Record::of("ADD", &seen, Err(&CniError::new(7, "invalid annotation", "80,eighty")), ms);
        let n = Notice::of(&failed).unwrap();
        assert_eq!((n.reason, n.kind), (REASON_FAILED, "Warning"));
        assert!(n.message.contains("code 7: invalid annotation: 80,eighty"), "{}", n.message);
        let skipped = Seen { pass: Some(Reason::ApiUnavailable), ..seen.clone() };
        assert_eq!(Notice::of(&Record::of("ADD", &skipped, Ok(()), ms)).unwrap().reason, REASON_SKIPPED);
        // Nothing to say: a plain pod, a DEL, a call without a pod.
        let plain = Seen { pass: Some(Reason::NoSidecar), ..seen.clone() };
        assert_eq!(Notice::of(&Record::of("ADD", &plain, Ok(()), ms)), None);
        assert_eq!(Notice::of(&Record::of("DEL", &seen, Err(&CniError::new(7, "x", "y")), ms)), None);
        assert_eq!(Notice::of(&Record::of("ADD", &Seen::default(), Err(&CniError::new(7, "x", "y")), ms)), None);
    }

    #[test]
    fn repeats_count_up_within_the_window() {
        let t0 = Instant::now();
        let mut d = Dedup::new(t0);
        let bad = notice("bad", REASON_FAILED);
        assert_eq!(d.decide(&bad, t0, 0xab), Action::Create { name: "bad.ab".into() });
        assert_eq!(d.decide(&bad, t0, 0xac), Action::Patch { name: "bad.ab".into(), count: 2 });
        // A pod of the same name, recreated, is another pod.
        let recreated = Notice { pod: PodRef { uid: Some("u-2".into()), ..bad.pod.clone() }, ..bad.clone() };
        assert_eq!(d.decide(&recreated, t0, 0xaf), Action::Create { name: "bad.af".into() });
        // Another reason of the same pod is another Event.
        assert_eq!(d.decide(&notice("bad", REASON_SKIPPED), t0, 0xad), Action::Create { name: "bad.ad".into() });
        // After the window, a new Event.
        assert_eq!(d.decide(&bad, t0 + WINDOW, 0xae), Action::Create { name: "bad.ae".into() });
    }

    #[test]
    fn the_rate_is_bounded_and_repeats_are_still_counted() {
        let t0 = Instant::now();
        let mut d = Dedup::new(t0);
        for i in 0..BURST {
            assert!(matches!(d.decide(&notice(&format!("p{i}"), REASON_FAILED), t0, i.into()), Action::Create { .. }));
        }
        assert_eq!(d.decide(&notice("late", REASON_FAILED), t0, 99), Action::Drop);
        assert_eq!(d.decide(&notice("p0", REASON_FAILED), t0, 100), Action::Drop, "over the rate");
        // One token later, the repeat's patch carries both.
        assert_eq!(
            d.decide(&notice("p0", REASON_FAILED), t0 + REFILL, 101),
            Action::Patch { name: "p0.0".into(), count: 3 }
        );
        assert_eq!(d.decide(&notice("p1", REASON_FAILED), t0 + REFILL, 102), Action::Drop);
    }

    #[test]
    fn the_event_names_the_pod() {
        let n = Notice::repaired("shop", "web", Some("u-1"));
        let e = event(&n, "web.1", "node-1", Timestamp::UNIX_EPOCH);
        assert_eq!(e.involved_object.uid.as_deref(), Some("u-1"));
        assert_eq!(
            (e.reason.as_deref(), e.type_.as_deref(), e.count),
            (Some(REASON_REPAIRED), Some("Normal"), Some(1))
        );
        assert_eq!(e.source.unwrap().host.as_deref(), Some("node-1"));
    }
}
