//! The node agent: the installer watches the pods of its own node and answers the
//! plugin's lookups from that cache over a root-only unix socket in the plugin's run
//! dir ([`cni::agent`] is the protocol, [`crate::podcache`] the decisions). ADD then
//! needs no runtime, no TLS and no API request, and pods the agent knows are decided
//! while the API server is away.
//!
//! Nothing here may hurt the installer or a pod: the plugin falls back to its own GET
//! whenever the socket is missing or does not answer; each connection has a deadline
//! and a bounded request, and connections are capped, so a slow or hung client stalls
//! nobody; a watch that fails is re-listed with a backoff, and the cache keeps
//! answering what it can answer correctly meanwhile.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cni::agent::{Answer, MAX_REQUEST, Request, Status, WAIT, decision_view};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::watcher;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::time::{Instant, sleep, timeout_at};

use crate::InstallError;
use crate::podcache::{Lookup, PodCache};
use crate::rootsock::{self, RootSocket};

/// A plugin sends its request at once; one that has not within this is dropped. The
/// answer is written within the same deadline plus the wait for the pod.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// Concurrent lookups; more wait in the listen backlog (the plugin gives up on its own
/// deadline and asks the API server).
pub const MAX_CONNECTIONS: usize = 256;
/// The API server ends each watch after this; the watcher then resumes it.
const WATCH_TIMEOUT_SECS: u32 = 55;
/// A connection silent for longer than a whole watch is dead.
const READ_TIMEOUT: Duration = Duration::from_secs(WATCH_TIMEOUT_SECS as u64 + 15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Between watch attempts after an error.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));

/// Where and whose pods to watch, and with which identity.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub node_name: String,
    /// Watched one by one (the chart's `namespaceAllowList`: the installer may read
    /// pods there only); empty: every namespace in one watch.
    pub namespaces: Vec<String>,
    pub socket: PathBuf,
    pub identity: crate::api::Identity,
}

/// [`Shared::caches`]' key of the one watch of every namespace (no namespace is named "").
const ALL: &str = "";

/// A cache per watch, and a counter bumped on every change (lookups waiting for a pod
/// wake up).
struct Shared {
    /// By namespace, or one under [`ALL`].
    caches: BTreeMap<String, Mutex<PodCache>>,
    changed: tokio::sync::watch::Sender<u64>,
    /// The pods in all caches, on `/metrics` (and so in `status`).
    cached: Gauge,
}

impl Shared {
    fn new(namespaces: &[String], cached: Gauge) -> Shared {
        let keys = match namespaces {
            [] => vec![ALL.to_owned()],
            some => some.to_vec(),
        };
        let caches = keys.into_iter().map(|ns| (ns, Mutex::new(PodCache::default()))).collect();
        Shared { caches, changed: tokio::sync::watch::channel(0).0, cached }
    }

    /// The cache that holds `namespace`'s pods, if any watch covers it.
    fn cache(&self, namespace: &str) -> Option<MutexGuard<'_, PodCache>> {
        let cache = self.caches.get(namespace).or_else(|| self.caches.get(ALL))?;
        // The cache holds no invariant a panicked writer could break halfway.
        Some(cache.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Changes the cache of the watch `key`.
    fn update(&self, key: &str, change: impl FnOnce(&mut PodCache)) {
        if let Some(cache) = self.caches.get(key) {
            change(&mut cache.lock().unwrap_or_else(|e| e.into_inner()));
        }
        let pods: usize = self.caches.values().map(|c| c.lock().unwrap_or_else(|e| e.into_inner()).len()).sum();
        self.cached.set(i64::try_from(pods).unwrap_or(i64::MAX));
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The bound socket; [`Agent::close`] removes its file if it is still ours.
pub struct Agent(RootSocket);

impl Agent {
    /// Binds the socket and starts the watch and the server on the current runtime;
    /// `cached` follows the number of pods in its cache.
    pub fn start(settings: AgentSettings, cached: Gauge) -> Result<Agent, InstallError> {
        let (socket, listener) = RootSocket::bind(&settings.socket)?;
        let shared = Arc::new(Shared::new(&settings.namespaces, cached));
        tracing::info!(node = %settings.node_name, namespaces = ?settings.namespaces, socket = %settings.socket.display(), "node agent: answering pod lookups from a watch of this node's pods");
        let served = shared.clone();
        tokio::spawn(rootsock::serve(listener, MAX_CONNECTIONS, "node agent socket", move |stream, _| {
            answer(stream, served.clone())
        }));
        tokio::spawn(watch(settings, shared));
        Ok(Agent(socket))
    }

    pub fn close(self) {
        self.0.close();
    }
}

/// Keeps the caches current, forever: after any error a watch starts over with a list,
/// which also tells when the API server is back.
async fn watch(settings: AgentSettings, shared: Arc<Shared>) {
    let mut backoff = BACKOFF.0;
    let mut last_error = String::new();
    let client = loop {
        match settings.identity.client(CONNECT_TIMEOUT, READ_TIMEOUT).await {
            Ok(client) => break client,
            Err(e) => {
                for key in shared.caches.keys() {
                    failed(&shared, key, &mut last_error, e.clone());
                }
            }
        }
        sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF.1);
    };
    let selector = format!("spec.nodeName={}", settings.node_name);
    let node = settings.node_name.as_str();
    let watches = shared.caches.keys().map(|key| watch_one(&client, &selector, key, node, &shared));
    futures_util::future::join_all(watches).await;
}

/// One watch: the namespace `key`'s pods of this node, or every namespace's ([`ALL`]).
async fn watch_one(client: &kube::Client, selector: &str, key: &str, node: &str, shared: &Shared) {
    let mut backoff = BACKOFF.0;
    let mut last_error = String::new();
    loop {
        let api = match key {
            ALL => Api::<Pod>::all(client.clone()),
            namespace => Api::<Pod>::namespaced(client.clone(), namespace),
        };
        let config = watcher::Config::default().fields(selector).timeout(WATCH_TIMEOUT_SECS);
        let mut events = watcher(api, config).boxed();
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => {
                    let was_connected = shared.cache(key).is_some_and(|c| c.connected());
                    shared.update(key, |cache| apply(cache, event));
                    if let Some(cache) = shared.cache(key)
                        && cache.connected()
                        && !was_connected
                    {
                        tracing::info!(
                            pods = cache.len(),
                            node,
                            namespace = scope(key),
                            "node agent: watching this node's pods"
                        );
                        last_error.clear();
                        backoff = BACKOFF.0;
                    }
                }
                Err(e) => {
                    failed(shared, key, &mut last_error, e.to_string());
                    break;
                }
            }
        }
        sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

/// The watch `key` as the log names it.
fn scope(key: &str) -> &str {
    if key == ALL { "all" } else { key }
}

/// Marks the cache of watch `key` behind; logs an error once, not on every retry.
fn failed(shared: &Shared, key: &str, last_error: &mut String, error: String) {
    shared.update(key, PodCache::disconnected);
    if error != *last_error {
        tracing::warn!(%error, namespace = scope(key), "node agent: the watch of this node's pods failed; lookups it cannot answer go to the API server");
        *last_error = error;
    }
}

fn apply(cache: &mut PodCache, event: watcher::Event<Pod>) {
    match event {
        watcher::Event::Init => cache.list_started(),
        watcher::Event::InitApply(pod) => cache.listed(decision_view(&pod)),
        watcher::Event::InitDone => cache.list_done(),
        watcher::Event::Apply(pod) => cache.applied(decision_view(&pod)),
        watcher::Event::Delete(pod) => cache.deleted(&pod),
    }
}

async fn answer(stream: UnixStream, shared: Arc<Shared>) {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    // One byte past the limit tells an oversized request from one at the limit.
    let mut limited = (&mut reader).take(MAX_REQUEST as u64 + 1);
    let reply = match timeout_at(deadline, limited.read_until(b'\n', &mut line)).await {
        Ok(Ok(_)) => match Request::parse(line.strip_suffix(b"\n").unwrap_or(&line)) {
            Ok(request) => lookup(&shared, &request).await,
            Err(e) => Answer::not(Status::Refused, e.to_string()),
        },
        Ok(Err(_)) | Err(_) => return,
    };
    let _ = timeout_at(deadline + WAIT, reader.get_mut().write_all(&reply.to_line())).await;
}

/// The cache's answer, waiting up to [`WAIT`] for a pod whose watch event may be on
/// its way (the runtime can call ADD as soon as the pod is bound to this node).
async fn lookup(shared: &Shared, request: &Request) -> Answer {
    let deadline = Instant::now() + WAIT;
    let mut changes = shared.changed.subscribe();
    let unwatched =
        || Lookup::NotSynced(format!("namespace {} is not watched (namespaceAllowList)", request.namespace));
    let mut waited = false;
    let found = loop {
        changes.mark_unchanged();
        match shared.cache(&request.namespace).map(|c| c.lookup(request)) {
            Some(Lookup::Pending) => waited = true,
            other => break other.unwrap_or_else(unwatched),
        }
        if !matches!(timeout_at(deadline, changes.changed()).await, Ok(Ok(()))) {
            break shared.cache(&request.namespace).map_or_else(unwatched, |c| c.give_up(request));
        }
    };
    match found {
        Lookup::Found(pod) => Answer { waited, ..Answer::found(Pod::clone(&pod)) },
        Lookup::NotFound(why) => Answer::not(Status::NotFound, why),
        Lookup::NotSynced(why) => Answer::not(Status::NotSynced, why),
        // give_up never leaves it pending.
        Lookup::Pending => Answer::not(Status::NotFound, "not found"),
    }
}
