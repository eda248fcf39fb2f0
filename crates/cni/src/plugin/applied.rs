//! What ADD programmed, remembered in the run dir until DEL: the annotations the pod's
//! config was built from, keyed by container and interface. Rules without our comment
//! (`comments.disabled: true`) can only be told from others' by regenerating them, and
//! at DEL the pod object may be gone. Everything here is best effort: a missing or
//! unreadable record only means DEL falls back to what it recognises by itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kuma::Config;

/// A record bigger than this is not read back (annotations are at most 256 KiB).
const MAX_RECORD_BYTES: u64 = 1 << 20;

fn record_path(run_dir: &Path, container_id: &str, ifname: &str) -> Option<PathBuf> {
    let safe = |s: &str| {
        !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    (safe(container_id) && safe(ifname) && !container_id.starts_with('.'))
        .then(|| run_dir.join("applied").join(format!("{container_id}_{ifname}.json")))
}

/// Writes the record (atomically: a torn file is never read back).
pub fn remember(run_dir: &Path, container_id: &str, ifname: &str, annotations: &BTreeMap<String, String>) {
    let Some(path) = record_path(run_dir, container_id, ifname) else { return };
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
pub fn recall(run_dir: &Path, container_id: &str, ifname: &str) -> Option<Config> {
    use std::io::Read;
    let path = record_path(run_dir, container_id, ifname)?;
    let mut bytes = Vec::new();
    std::fs::File::open(&path).ok()?.take(MAX_RECORD_BYTES).read_to_end(&mut bytes).ok()?;
    let annotations: BTreeMap<String, String> = serde_json::from_slice(&bytes).ok()?;
    kuma::from_annotations(&annotations)
        .map_err(|e| tracing::warn!(path = %path.display(), error = %e, "the remembered config no longer reads"))
        .ok()
}

pub fn forget(run_dir: &Path, container_id: &str, ifname: &str) {
    if let Some(path) = record_path(run_dir, container_id, ifname) {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_until_forgotten() {
        let dir = std::env::temp_dir().join(format!("kmc-applied-{}", std::process::id()));
        struct Cleanup<'a>(&'a Path);
        impl Drop for Cleanup<'_> {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(self.0);
            }
        }
        let _cleanup = Cleanup(&dir);
        let annotations: BTreeMap<String, String> = [(
            kuma::TRANSPARENT_PROXY_CONFIG.to_owned(),
            "comments: {disabled: true}\nredirect: {inbound: {port: 15106}}".to_owned(),
        )]
        .into();
        assert!(recall(dir.as_path(), "abc", "eth0").is_none());
        remember(dir.as_path(), "abc", "eth0", &annotations);
        let cfg = recall(dir.as_path(), "abc", "eth0").expect("recalled");
        assert!(!cfg.comments && cfg.inbound.port == 15106);
        assert!(recall(dir.as_path(), "abc", "eth1").is_none(), "keyed by interface too");
        forget(dir.as_path(), "abc", "eth0");
        assert!(recall(dir.as_path(), "abc", "eth0").is_none());
        // Container IDs that are not plain names never become paths.
        remember(dir.as_path(), "../escape", "eth0", &annotations);
        assert!(
            !dir.as_path().join("escape_eth0.json").exists() && recall(dir.as_path(), "../escape", "eth0").is_none()
        );
    }
}
