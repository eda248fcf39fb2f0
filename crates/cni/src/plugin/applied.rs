//! What ADD programmed, remembered in the run dir until DEL: the annotations the pod's
//! config was built from, per network and attachment. Rules without our comment
//! (`comments.disabled: true`) can only be told from others' by regenerating them, and
//! at DEL the pod object may be gone. Everything here is best effort: a missing or
//! unreadable record only means DEL falls back to what it recognises by itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kuma::Config;

/// A record bigger than this is not read back (annotations are at most 256 KiB).
const MAX_RECORD_BYTES: u64 = 1 << 20;

/// Which attachment a record is for.
pub struct Key<'a> {
    pub network: &'a str,
    pub container_id: &'a str,
    pub ifname: &'a str,
}

/// Only plain names become path components.
pub(super) fn safe(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && !s.starts_with('.')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Records live per network: GC speaks for one network's attachments only.
fn network_dir(run_dir: &Path, network: &str) -> Option<PathBuf> {
    safe(network).then(|| run_dir.join("applied").join(network))
}

fn record_name(container_id: &str, ifname: &str) -> Option<String> {
    (safe(container_id) && safe(ifname)).then(|| format!("{container_id}_{ifname}.json"))
}

fn record_path(run_dir: &Path, at: &Key) -> Option<PathBuf> {
    Some(network_dir(run_dir, at.network)?.join(record_name(at.container_id, at.ifname)?))
}

/// Writes the record (atomically: a torn file is never read back).
pub fn remember(run_dir: &Path, at: &Key, annotations: &BTreeMap<String, String>) {
    let Some(path) = record_path(run_dir, at) else { return };
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(path.parent().expect("a record has a parent dir"))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(annotations).expect("a string map serializes"))?;
        std::fs::rename(&tmp, &path)
    };
    if let Err(e) = write() {
        tracing::warn!(path = %path.display(), error = %e, "cannot remember the applied config; DEL will still remove every rule it recognises");
    }
}

/// The config ADD applied, if it was remembered and still reads as a config.
pub fn recall(run_dir: &Path, at: &Key) -> Option<Config> {
    use std::io::Read;
    let path = record_path(run_dir, at)?;
    let mut bytes = Vec::new();
    std::fs::File::open(&path).ok()?.take(MAX_RECORD_BYTES).read_to_end(&mut bytes).ok()?;
    let annotations: BTreeMap<String, String> = serde_json::from_slice(&bytes).ok()?;
    kuma::from_annotations(&annotations)
        .map_err(|e| tracing::warn!(path = %path.display(), error = %e, "the remembered config no longer reads"))
        .ok()
}

pub fn forget(run_dir: &Path, at: &Key) {
    if let Some(path) = record_path(run_dir, at) {
        let _ = std::fs::remove_file(path);
    }
}

/// GC: drops the network's records of attachments not in `cni.dev/valid-attachments`
/// (DEL never came for them). Without that list nothing is dropped.
pub fn gc(run_dir: &Path, network: &str, conf: &serde_json::Value) {
    let Some(valid) = conf.get("cni.dev/valid-attachments").and_then(|v| v.as_array()) else { return };
    let keep: Vec<String> =
        valid.iter().filter_map(|a| record_name(a.get("containerID")?.as_str()?, a.get("ifname")?.as_str()?)).collect();
    let Some(dir) = network_dir(run_dir, network) else { return };
    let Ok(entries) = std::fs::read_dir(&dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !keep.contains(&name) {
            tracing::debug!(record = %name, "GC: dropping the record of a gone attachment");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Cleanup(PathBuf);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn remembered_until_forgotten_or_collected() {
        let dir = std::env::temp_dir().join(format!("kmc-applied-{}", std::process::id()));
        let _cleanup = Cleanup(dir.clone());
        let annotations: BTreeMap<String, String> = [(
            kuma::TRANSPARENT_PROXY_CONFIG.to_owned(),
            "comments: {disabled: true}\nredirect: {inbound: {port: 15106}}".to_owned(),
        )]
        .into();
        let key = |c, i| Key { network: "k8s-pod-network", container_id: c, ifname: i };
        assert!(recall(&dir, &key("abc", "eth0")).is_none());
        remember(&dir, &key("abc", "eth0"), &annotations);
        let cfg = recall(&dir, &key("abc", "eth0")).expect("recalled");
        assert!(!cfg.comments && cfg.inbound.port == 15106);
        assert!(recall(&dir, &key("abc", "eth1")).is_none(), "keyed by interface too");
        let other_network = Key { network: "other", container_id: "abc", ifname: "eth0" };
        assert!(recall(&dir, &other_network).is_none(), "and by network");
        forget(&dir, &key("abc", "eth0"));
        assert!(recall(&dir, &key("abc", "eth0")).is_none());
        // Names that are not plain never become paths.
        remember(&dir, &key("../escape", "eth0"), &annotations);
        assert!(!dir.join("applied/escape_eth0.json").exists() && recall(&dir, &key("../escape", "eth0")).is_none());

        // GC keeps the valid attachments' records, and looks at this network's only.
        for c in ["keep", "gone"] {
            remember(&dir, &key(c, "eth0"), &annotations);
        }
        remember(&dir, &other_network, &annotations);
        gc(&dir, "k8s-pod-network", &serde_json::json!({}));
        assert!(recall(&dir, &key("gone", "eth0")).is_some(), "no list: nothing dropped");
        let valid = serde_json::json!({"cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]});
        gc(&dir, "k8s-pod-network", &valid);
        assert!(recall(&dir, &key("keep", "eth0")).is_some());
        assert!(recall(&dir, &key("gone", "eth0")).is_none());
        assert!(recall(&dir, &other_network).is_some(), "another network's records are not collected");
    }
}
