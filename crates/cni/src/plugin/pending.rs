//! Pods let through without a redirect because the API server could not be asked
//! (`on_api_error: pass-through`): ADD leaves a record of the attachment in the run dir,
//! and the node agent (the installer) programs the redirect into the pod's namespace once
//! it can see the pod, then removes the record. DEL removes it too. Writing one never
//! fails the ADD: a record that cannot be written only means the pod waits for the repair
//! controller instead.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::applied::{Key, safe};

/// The records' dir under the plugin's run dir.
pub const DIR: &str = "pending";
/// At most this many records: a node cut off from the API while pods keep coming must
/// not fill its tmpfs. Past it, pods still start (and the repair controller acts).
pub const MAX_RECORDS: usize = 1024;
/// A record is our conf (bounded by the stdin limit) and a few names.
const MAX_RECORD_BYTES: u64 = crate::proto::conf::MAX_STDIN as u64 + 4096;
/// Separates the key's parts in a file name; never in a [`safe`] name.
const SEP: char = '~';

/// One attachment that started without its redirect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub namespace: String,
    pub name: String,
    /// `K8S_POD_UID` when the runtime passed it: a pod recreated under the same name is
    /// another pod.
    pub uid: Option<String>,
    /// The pod's network namespace, as the runtime named it.
    pub netns: String,
    pub container_id: String,
    pub ifname: String,
    /// The network (conflist) name: with container id and ifname, the `applied` key.
    pub network: String,
    /// The previous plugin's result gave the pod an IPv6 address.
    pub ipv6: bool,
    /// Our plugin's configuration as the runtime passed it, without `prevResult`: the
    /// agent programs the rules with the very settings ADD would have used.
    pub conf: Value,
    /// When ADD let the pod through (seconds since the epoch).
    pub since: u64,
}

impl Record {
    pub fn key(&self) -> Key<'_> {
        Key { network: &self.network, container_id: &self.container_id, ifname: &self.ifname }
    }
}

pub fn dir(run_dir: &Path) -> PathBuf {
    run_dir.join(DIR)
}

fn file_name(at: &Key) -> Option<String> {
    (safe(at.network) && safe(at.container_id) && safe(at.ifname))
        .then(|| format!("{}{SEP}{}{SEP}{}.json", at.network, at.container_id, at.ifname))
        .filter(|n| n.len() <= 255)
}

/// The key a record's file name stands for, if it is one of ours.
fn parse_name(name: &str) -> Option<(&str, &str, &str)> {
    let mut parts = name.strip_suffix(".json")?.split(SEP);
    let key = (parts.next()?, parts.next()?, parts.next()?);
    parts.next().is_none().then_some(key)
}

/// The time now, for [`Record::since`].
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

/// Writes the record atomically (a torn file is never read); logs and gives up on any
/// problem.
pub fn write(run_dir: &Path, record: &Record) {
    let Some(name) = file_name(&record.key()) else {
        return tracing::warn!("the attachment's names cannot make a record's file name; no in-place repair for it");
    };
    let dir = dir(run_dir);
    let path = dir.join(&name);
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        let count = std::fs::read_dir(&dir)?.take(MAX_RECORDS + 1).count();
        if count >= MAX_RECORDS && !path.exists() {
            return Err(std::io::Error::other(format!("{count} records are waiting already")));
        }
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(record).expect("a record serializes"))?;
        std::fs::rename(&tmp, &path)
    };
    match write() {
        Ok(()) => {
            tracing::info!(record = %path.display(), "left a record for the node agent to program the redirect in place")
        }
        Err(e) => tracing::warn!(record = %path.display(), error = %e, "cannot leave a record for in-place repair"),
    }
}

pub fn remove(run_dir: &Path, at: &Key) {
    if let Some(name) = file_name(at) {
        let _ = std::fs::remove_file(dir(run_dir).join(name));
    }
}

/// A record file, if it reads as one.
pub fn read(path: &Path) -> Result<Record, String> {
    let text = netns::hostfile::read_regular_text(path, MAX_RECORD_BYTES).map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The record files now in the dir (not the temp files being written), sorted.
pub fn list(run_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir(run_dir)) else { return Vec::new() };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_str().and_then(parse_name).is_some())
        .map(|e| e.path())
        .take(MAX_RECORDS)
        .collect();
    paths.sort();
    paths
}

/// GC: drops the network's records of attachments not in `cni.dev/valid-attachments`.
pub fn gc(run_dir: &Path, network: &str, conf: &Value) {
    let Some(valid) = conf.get("cni.dev/valid-attachments").and_then(Value::as_array) else { return };
    let valid = |container: &str, ifname: &str| {
        valid.iter().any(|a| {
            a.get("containerID").and_then(Value::as_str) == Some(container)
                && a.get("ifname").and_then(Value::as_str) == Some(ifname)
        })
    };
    for path in list(run_dir) {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Some((net, container, ifname)) = parse_name(name)
            && net == network
            && !valid(container, ifname)
        {
            tracing::debug!(record = %name, "GC: dropping the in-place repair record of a gone attachment");
            let _ = std::fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(container: &str) -> Record {
        Record {
            namespace: "shop".into(),
            name: "web".into(),
            uid: Some("0b6e7e5c-uid".into()),
            netns: "/var/run/netns/cni-1".into(),
            container_id: container.into(),
            ifname: "eth0".into(),
            network: "k8s-pod-network".into(),
            ipv6: true,
            conf: serde_json::json!({"type": "kong-mesh-cni", "run_dir": "/run/x"}),
            since: 1_800_000_000,
        }
    }

    #[test]
    fn written_listed_read_removed_and_collected() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        assert!(list(run).is_empty());
        write(run, &record("abc"));
        write(run, &record("def"));
        let paths = list(run);
        assert_eq!(paths.len(), 2, "{paths:?}");
        assert_eq!(read(&paths[0]).unwrap(), record("abc"));
        remove(run, &record("abc").key());
        assert_eq!(list(run).len(), 1);

        // Names that are not plain never become paths.
        write(run, &record("../escape"));
        assert_eq!(list(run).len(), 1);

        let valid = serde_json::json!({"cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]});
        write(run, &record("keep"));
        gc(run, "other-network", &valid);
        assert_eq!(list(run).len(), 2, "another network's records stay");
        gc(run, "k8s-pod-network", &serde_json::json!({}));
        assert_eq!(list(run).len(), 2, "no list: nothing dropped");
        gc(run, "k8s-pod-network", &valid);
        let left: Vec<Record> = list(run).iter().map(|p| read(p).unwrap()).collect();
        assert_eq!(left.iter().map(|r| r.container_id.as_str()).collect::<Vec<_>>(), ["keep"]);
    }

    #[test]
    fn bounded() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        std::fs::create_dir_all(super::dir(run)).unwrap();
        for i in 0..MAX_RECORDS {
            std::fs::write(super::dir(run).join(format!("n~c{i}~eth0.json")), "{}").unwrap();
        }
        write(run, &record("one-more"));
        assert!(!super::dir(run).join("k8s-pod-network~one-more~eth0.json").exists());
    }
}
