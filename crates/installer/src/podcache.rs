//! The node agent's pod cache, pure: what the watch of this node's pods has told us,
//! and the answer to a plugin's lookup from it. The I/O is in [`crate::agent`].
//!
//! A pod is answered from the cache only when the answer is as good as a GET: while the
//! watch is connected (the cache is current), or, while it is not, when the runtime
//! gave the pod's UID and the cached pod has it (the object asked for is the one we
//! have; what the decision reads was fixed at admission).

use std::collections::HashMap;
use std::sync::Arc;

use cni::agent::Request;
use k8s_openapi::api::core::v1::Pod;

type Key = (String, String);

#[derive(Debug, Default)]
pub struct PodCache {
    pods: HashMap<Key, Arc<Pod>>,
    /// A (re)list in progress: its pods replace `pods` when it completes.
    listing: Option<HashMap<Key, Arc<Pod>>>,
    /// A complete list has been seen at least once.
    synced: bool,
    /// The watch delivered its last event without an error since.
    connected: bool,
}

/// What the cache says to a lookup now.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    Found(Arc<Pod>),
    /// Not there (or another UID), but the watch is current: its event may be on the
    /// way. The caller waits for a change, then asks again, or gives up with
    /// [`PodCache::give_up`].
    Pending,
    NotFound(String),
    NotSynced(String),
}

fn key(pod: &Pod) -> Option<Key> {
    Some((pod.metadata.namespace.clone()?, pod.metadata.name.clone()?))
}

impl PodCache {
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn connected(&self) -> bool {
        self.connected
    }

    /// A list starts (the watch's `Init`).
    pub fn list_started(&mut self) {
        self.listing = Some(HashMap::new());
    }

    /// A pod of the list in progress (`InitApply`); outside a list, an update.
    pub fn listed(&mut self, pod: Pod) {
        let Some(k) = key(&pod) else { return };
        match &mut self.listing {
            Some(listing) => {
                listing.insert(k, Arc::new(pod));
            }
            None => self.applied(pod),
        }
    }

    /// The list is complete (`InitDone`): it is the cache now (pods deleted while we
    /// were not watching are gone with it).
    pub fn list_done(&mut self) {
        if let Some(listing) = self.listing.take() {
            self.pods = listing;
        }
        self.synced = true;
        self.connected = true;
    }

    /// A pod was added or changed (`Apply`).
    pub fn applied(&mut self, pod: Pod) {
        let Some(k) = key(&pod) else { return };
        self.pods.insert(k, Arc::new(pod));
        self.connected = self.synced;
    }

    /// A pod was deleted (`Delete`). A newer pod of the same name stays.
    pub fn deleted(&mut self, pod: &Pod) {
        let Some(k) = key(pod) else { return };
        if self.pods.get(&k).is_some_and(|p| p.metadata.uid == pod.metadata.uid) {
            self.pods.remove(&k);
        }
        self.connected = self.synced;
    }

    /// The watch failed: until the next complete list the cache may be behind.
    pub fn disconnected(&mut self) {
        self.connected = false;
        self.listing = None;
    }

    pub fn lookup(&self, request: &Request) -> Lookup {
        if !self.synced {
            return Lookup::NotSynced("the agent has not listed this node's pods yet".into());
        }
        let cached = self.pods.get(&(request.namespace.clone(), request.name.clone()));
        match (cached, &request.uid) {
            (Some(pod), Some(uid)) if pod.metadata.uid.as_ref() == Some(uid) => Lookup::Found(pod.clone()),
            (Some(pod), None) if self.connected => Lookup::Found(pod.clone()),
            _ if self.connected => Lookup::Pending,
            (Some(_), None) => Lookup::NotSynced("the watch is down and the runtime gave no pod UID".into()),
            (Some(pod), Some(_)) => Lookup::NotSynced(format!(
                "the watch is down and the cached pod has UID {}",
                pod.metadata.uid.as_deref().unwrap_or("(none)")
            )),
            (None, _) => Lookup::NotSynced("the watch is down and the pod is not in the cache".into()),
        }
    }

    /// The answer once the wait for a pending lookup is over.
    pub fn give_up(&self, request: &Request) -> Lookup {
        match self.lookup(request) {
            Lookup::Pending => match self.pods.get(&(request.namespace.clone(), request.name.clone())) {
                Some(pod) => Lookup::NotFound(format!(
                    "the cached pod has UID {}, not {}",
                    pod.metadata.uid.as_deref().unwrap_or("(none)"),
                    request.uid.as_deref().unwrap_or("(none)")
                )),
                None => Lookup::NotFound(format!("not on this node's watch within {:?}", cni::agent::WAIT)),
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, uid: &str) -> Pod {
        let mut p = Pod::default();
        p.metadata.namespace = Some(ns.into());
        p.metadata.name = Some(name.into());
        p.metadata.uid = Some(uid.into());
        p
    }

    fn ask(cache: &PodCache, name: &str, uid: Option<&str>) -> Lookup {
        cache.lookup(&Request::new("shop", name, uid))
    }

    fn found_uid(l: &Lookup) -> Option<&str> {
        match l {
            Lookup::Found(p) => p.metadata.uid.as_deref(),
            _ => None,
        }
    }

    fn synced_with(pods: &[Pod]) -> PodCache {
        let mut cache = PodCache::default();
        cache.list_started();
        for p in pods {
            cache.listed(p.clone());
        }
        cache.list_done();
        cache
    }

    #[test]
    fn nothing_is_answered_before_the_first_complete_list() {
        let mut cache = PodCache::default();
        cache.list_started();
        cache.listed(pod("shop", "web", "u1"));
        assert!(matches!(ask(&cache, "web", Some("u1")), Lookup::NotSynced(_)));
        cache.list_done();
        assert_eq!(found_uid(&ask(&cache, "web", Some("u1"))), Some("u1"));
        assert_eq!(found_uid(&ask(&cache, "web", None)), Some("u1"));
    }

    #[test]
    fn a_missing_pod_or_another_uid_waits_while_connected_then_is_not_found() {
        let mut cache = synced_with(&[pod("shop", "web", "old")]);
        let recreated = Request::new("shop", "web", Some("new"));
        assert_eq!(cache.lookup(&recreated), Lookup::Pending);
        assert!(matches!(cache.give_up(&recreated), Lookup::NotFound(why) if why.contains("UID old, not new")));
        let unknown = Request::new("shop", "db", None);
        assert_eq!(cache.lookup(&unknown), Lookup::Pending);
        assert!(matches!(cache.give_up(&unknown), Lookup::NotFound(_)));
        // The recreated pod's event lands: the same question now finds it.
        cache.applied(pod("shop", "web", "new"));
        assert_eq!(found_uid(&cache.lookup(&recreated)), Some("new"));
        assert_eq!(found_uid(&cache.give_up(&recreated)), Some("new"));
    }

    #[test]
    fn while_the_watch_is_down_only_a_uid_match_is_answered_and_nothing_waits() {
        let mut cache = synced_with(&[pod("shop", "web", "u1")]);
        cache.disconnected();
        assert_eq!(found_uid(&ask(&cache, "web", Some("u1"))), Some("u1"));
        for (name, uid) in [("web", None), ("web", Some("u2")), ("db", Some("u3"))] {
            assert!(matches!(ask(&cache, name, uid), Lookup::NotSynced(_)), "{name} {uid:?}");
            assert!(matches!(cache.give_up(&Request::new("shop", name, uid)), Lookup::NotSynced(_)));
        }
    }

    #[test]
    fn a_relist_replaces_the_cache_and_reconnects() {
        let mut cache = synced_with(&[pod("shop", "web", "u1"), pod("shop", "gone", "u2")]);
        cache.disconnected();
        cache.list_started();
        cache.listed(pod("shop", "web", "u1"));
        cache.listed(pod("shop", "new", "u3"));
        // Until the list completes, the old content answers (a UID match only: still down).
        assert_eq!(found_uid(&ask(&cache, "gone", Some("u2"))), Some("u2"));
        assert!(matches!(ask(&cache, "new", Some("u3")), Lookup::NotSynced(_)));
        cache.list_done();
        assert!(cache.connected());
        assert_eq!(cache.len(), 2);
        assert_eq!(ask(&cache, "gone", Some("u2")), Lookup::Pending);
        assert_eq!(found_uid(&ask(&cache, "new", Some("u3"))), Some("u3"));
    }

    #[test]
    fn a_delete_of_an_older_pod_keeps_the_newer_one() {
        let mut cache = synced_with(&[]);
        cache.applied(pod("shop", "web", "old"));
        cache.applied(pod("shop", "web", "new"));
        cache.deleted(&pod("shop", "web", "old"));
        assert_eq!(found_uid(&ask(&cache, "web", None)), Some("new"));
        cache.deleted(&pod("shop", "web", "new"));
        assert!(cache.is_empty());
        // Objects without a name or namespace are not kept.
        cache.applied(Pod::default());
        assert!(cache.is_empty());
    }
}
