//! In-place repair at the edge: watches the plugin's pending records (inotify on the run
//! dir's `pending/`, and a short retry tick while a record waits for the API server),
//! asks for each record's pod, decides with [`inplace::decide`], and programs the rules
//! into the pod's namespace the way ADD does (the same settings, the same `applied`
//! record for DEL; in eBPF mode, the same registration). Nothing here can stop the installer: trouble is logged and retried.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cni::plugin::pending::{self, Record};
use cni::plugin::{PluginConf, applied};
use cni::proto::NetConf;
use futures_util::StreamExt;
use inotify::{Inotify, WatchMask};
use netns::{NetNs, NetNsError};
use tokio::sync::mpsc;

use crate::api::{Identity, PodLookup};
use crate::events::{Events, Notice};
use crate::inplace::{self, Action};

/// While a record waits for the API server, it is asked again this often (the target is
/// the redirect in place within a second of the API being back).
const RETRY: Duration = Duration::from_millis(200);
/// Without events, the records are looked at this often anyway (a missed event, a run
/// dir that appears late).
const BACKSTOP: Duration = Duration::from_secs(10);
/// A record whose rules fail this many times in a row is dropped (the repair controller
/// then acts on the pod).
const MAX_FAILURES: u32 = 5;

/// Each call saying so on a repaired pod.
const MARK_TIMEOUT: Duration = Duration::from_secs(2);

/// Starts the agent on the current runtime: `lookup` answers for pods, `identity` says
/// on a pod that it was repaired, and so does an Event through `events`.
pub fn spawn(run_dir: PathBuf, lookup: PodLookup, identity: Identity, events: Option<Events>) {
    tokio::spawn(async move {
        let (tx, rx) = mpsc::channel(1);
        let watching = watch(&run_dir, tx);
        if !watching {
            tracing::info!(run_dir = %run_dir.display(), "cannot watch the plugin's pending records; looking every {BACKSTOP:?}");
        }
        Agent { run_dir, lookup, identity, events, failures: HashMap::new(), waiting: None }.run(rx).await;
    });
}

/// Sends on `tx` when a record may have arrived; false when the dir cannot be watched.
fn watch(run_dir: &Path, tx: mpsc::Sender<()>) -> bool {
    // Our dir: the chart mounts the run dir from the host. Not created when the run dir
    // itself is missing (then there is no plugin writing records either).
    let dir = pending::dir(run_dir);
    if run_dir.is_dir() && std::fs::create_dir_all(&dir).is_err() {
        return false;
    }
    let watched = Inotify::init().and_then(|inotify| {
        inotify.watches().add(&dir, WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::ONLYDIR)?;
        inotify.into_event_stream([0u8; 1024])
    });
    let Ok(mut stream) = watched else { return false };
    tokio::spawn(async move {
        while let Some(Ok(_)) = stream.next().await {
            let _ = tx.try_send(());
        }
    });
    true
}

struct Agent {
    run_dir: PathBuf,
    lookup: PodLookup,
    identity: Identity,
    events: Option<Events>,
    /// Failed rule programmings per record file.
    failures: HashMap<PathBuf, u32>,
    /// Since when the API server has not answered (logged once per outage).
    waiting: Option<String>,
}

/// Why programming a record's rules did not happen.
enum Failure {
    /// The attachment is gone (its namespace, or its record: DEL came meanwhile).
    Gone(String),
    /// Worth another try.
    Failed(String),
    /// The pod's namespace cannot be seen from here: a setting to fix, not a pod gone.
    Unreachable(String),
}

impl Agent {
    async fn run(mut self, mut wake: mpsc::Receiver<()>) {
        loop {
            let again = self.round().await;
            let wait = if again { RETRY } else { BACKSTOP };
            tokio::select! {
                _ = wake.recv() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One pass over the records; true when one waits to be tried again soon.
    async fn round(&mut self) -> bool {
        let mut again = false;
        for path in pending::list(&self.run_dir) {
            let record = match pending::read(&path) {
                Ok(record) => record,
                Err(e) => {
                    // Records are renamed into place whole: this is not one of ours.
                    tracing::warn!(record = %path.display(), error = %e, "dropping an unreadable in-place repair record");
                    self.forget(&path);
                    continue;
                }
            };
            let pod = format!("{}/{}", record.namespace, record.name);
            let answer = (self.lookup)(record.namespace.clone(), record.name.clone()).await;
            match inplace::decide(&record, answer) {
                Action::Retry(why) => {
                    if self.waiting.is_none() {
                        tracing::info!(pod = %pod, error = %why, "cannot see a pod that started without its redirect yet; asking again every {RETRY:?}");
                    }
                    self.waiting = Some(why);
                    // The API server is away: the other records wait for it too.
                    return true;
                }
                Action::Drop(why) => {
                    tracing::info!(pod = %pod, container = %record.container_id, "no in-place repair: {why}");
                    self.forget(&path);
                }
                Action::Program(cfg, annotations) => {
                    let (run_dir, at, rec) = (self.run_dir.clone(), path.clone(), record.clone());
                    let programmed =
                        tokio::task::spawn_blocking(move || program(&run_dir, &at, &rec, &cfg, &annotations))
                            .await
                            .unwrap_or_else(|e| Err(Failure::Failed(format!("the repair thread failed: {e}"))));
                    match programmed {
                        Ok(rules) => {
                            tracing::info!(pod = %pod, rules, "programmed the redirect in place: the pod started without it while the API server could not be asked");
                            self.forget(&path);
                            if let Some(events) = &self.events {
                                events.offer(Notice::repaired(&record.namespace, &record.name, record.uid.as_deref()));
                            }
                            let marked = self.identity.mark_repaired(
                                &record.namespace,
                                &record.name,
                                record.uid.as_deref(),
                                MARK_TIMEOUT,
                            );
                            if let Err(e) = marked.await {
                                tracing::warn!(pod = %pod, error = %e, "cannot say on the pod that its redirect was repaired in place; the repair controller may still restart it");
                            }
                        }
                        Err(Failure::Gone(why)) => {
                            tracing::info!(pod = %pod, "no in-place repair: {why}");
                            self.forget(&path);
                        }
                        Err(Failure::Unreachable(why)) => {
                            tracing::warn!(pod = %pod, "no in-place repair (the repair controller acts on the pod): {why}");
                            self.forget(&path);
                        }
                        Err(Failure::Failed(why)) => {
                            let failures = self.failures.entry(path.clone()).or_default();
                            *failures += 1;
                            if *failures >= MAX_FAILURES {
                                tracing::error!(pod = %pod, error = %why, "cannot program the redirect in place; giving up (the repair controller acts on the pod)");
                                self.forget(&path);
                            } else {
                                tracing::warn!(pod = %pod, error = %why, "cannot program the redirect in place; trying again");
                                again = true;
                            }
                        }
                    }
                }
            }
            if let Some(why) = self.waiting.take() {
                tracing::info!(after = %why, "the API server answers again");
            }
        }
        again
    }

    fn forget(&mut self, path: &Path) {
        self.failures.remove(path);
        let _ = std::fs::remove_file(path);
    }
}

/// ADD's work for the record's attachment, on this (blocking) thread: the rule count.
fn program(
    run_dir: &Path,
    path: &Path,
    record: &Record,
    cfg: &kuma::Config,
    annotations: &std::collections::BTreeMap<String, String>,
) -> Result<usize, Failure> {
    let conf = serde_json::to_vec(&record.conf).expect("a JSON value serializes");
    let mut plugin = NetConf::parse(&conf)
        .and_then(|conf| PluginConf::from_netconf(&conf))
        .map_err(|e| Failure::Gone(format!("the recorded plugin configuration does not read: {e}")))?;
    // The run dir as mounted here (the same dir the plugin uses).
    plugin.run_dir = run_dir.to_owned();
    let at = netns_path(&record.netns);
    let ns = match NetNs::open(&at) {
        Ok(ns) => ns,
        Err(e) if at.parent().is_some_and(|dir| !dir.is_dir()) => {
            return Err(Failure::Unreachable(format!(
                "the pod's network namespace is in {}, which is not mounted into this container ({e}); add that directory to the chart value cni.netnsDirs",
                at.parent().map(Path::display).expect("checked above")
            )));
        }
        Err(e @ (NetNsError::Open { .. } | NetNsError::NotNetwork { .. })) => {
            return Err(Failure::Gone(format!("the pod's sandbox is gone ({e})")));
        }
        Err(e) => return Err(Failure::Failed(e.to_string())),
    };
    // Held open now: a DEL from here on finds our `applied` record and removes the rules.
    if !path.exists() {
        return Err(Failure::Gone("the attachment was deleted meanwhile".into()));
    }
    if let Some(bpffs) = &plugin.ebpf_bpffs {
        // eBPF mode: ADD's registration, with the namespace's own addresses (a record
        // keeps no previous result). No rules: the count is 0.
        return cni::plugin::ebpf::add(bpffs, &record.container_id, &ns, cfg, None)
            .map(|()| 0)
            .map_err(|e| Failure::Failed(e.to_string()));
    }
    applied::remember(run_dir, &record.key(), annotations);
    netfilter::apply(&ns, cfg, &cni::plugin::rule_options(&plugin, record.ipv6))
        .map(|report| report.rules)
        .map_err(|e| Failure::Failed(e.to_string()))
}

/// The runtime names the namespace by its host path (CNI_NETNS, kept in the record); the
/// chart mounts the runtime's namespace dirs at the same paths (`cni.netnsDirs`), and
/// `/run/netns` is `/var/run/netns` on the host.
fn netns_path(recorded: &str) -> PathBuf {
    let path = PathBuf::from(recorded);
    if path.exists() {
        return path;
    }
    match recorded.strip_prefix("/run/netns/") {
        Some(name) => Path::new("/var/run/netns").join(name),
        None => path,
    }
}
