//! OCI image archives written by hand (no registry, no builder): one uncompressed layer
//! of files, an image config with an entrypoint, a manifest, and an index whose
//! `io.containerd.image.name` annotation gives the name `ctr images import` stores.

use std::path::Path;

use std::io::Write as _;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use super::NodeError;

/// One image: its full name (`domain/repo:tag`, which the CRI matches as written), the
/// files of its only layer (path in the image, file on the host; mode 0755) and its
/// entrypoint.
pub struct ImageSpec<'a> {
    pub name: &'a str,
    pub files: Vec<(&'a str, &'a Path)>,
    pub entrypoint: Vec<&'a str>,
}

/// coreutils' sha256sum: this crate is built without optimisation in tests, and a
/// layer holding a debug build of our binary is hundreds of MB.
fn sha256_hex(data: &[u8]) -> Result<String, NodeError> {
    let failed = |e: std::io::Error| NodeError::Command(format!("sha256sum: {e}"));
    let mut child = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().map_err(failed)?;
    child.stdin.take().expect("piped").write_all(data).map_err(failed)?;
    let out = child.wait_with_output().map_err(failed)?;
    let hex = String::from_utf8_lossy(&out.stdout).split(' ').next().unwrap_or_default().to_string();
    if !out.status.success() || hex.len() != 64 {
        return Err(NodeError::Command(format!("sha256sum failed: {}", out.status)));
    }
    Ok(hex)
}

fn layer(files: &[(&str, &Path)]) -> Result<Vec<u8>, NodeError> {
    let mut tar = tar::Builder::new(Vec::new());
    for (in_image, host) in files {
        let data = std::fs::read(host).map_err(|e| NodeError::io(host, e))?;
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o755);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, in_image.trim_start_matches('/'), data.as_slice())
            .map_err(|e| NodeError::io(host, e))?;
    }
    // The runtime mounts over these; an image without them still works, but runc then
    // creates them in the rootfs, which a read-only rootfs refuses.
    for dir in ["tmp", "proc", "sys", "dev", "etc", "var/run/secrets/kubernetes.io/serviceaccount"] {
        let mut header = tar::Header::new_gnu();
        header.set_size(0);
        header.set_mode(0o1777);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Directory);
        tar.append_data(&mut header, format!("{dir}/"), std::io::empty())
            .map_err(|e| NodeError::Setup(format!("building a layer: {e}")))?;
    }
    tar.into_inner().map_err(|e| NodeError::Setup(format!("building a layer: {e}")))
}

/// Writes one OCI archive holding every image in `images` to `path`.
pub fn write_archive(path: &Path, images: &[ImageSpec]) -> Result<(), NodeError> {
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut manifests = Vec::new();
    let mut add_blob = |data: Vec<u8>| -> Result<(String, usize), NodeError> {
        let digest = sha256_hex(&data)?;
        let size = data.len();
        if !blobs.iter().any(|(d, _)| *d == digest) {
            blobs.push((digest.clone(), data));
        }
        Ok((digest, size))
    };
    for image in images {
        let layer = layer(&image.files)?;
        let (layer_digest, layer_size) = add_blob(layer)?;
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Entrypoint": image.entrypoint, "Env": ["PATH=/"] },
            // Uncompressed layer: the diff ID is the layer's own digest.
            "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_digest}")] },
        });
        let (config_digest, config_size) = add_blob(serde_json::to_vec(&config).expect("JSON"))?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": format!("sha256:{config_digest}"), "size": config_size,
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": format!("sha256:{layer_digest}"), "size": layer_size,
            }],
        });
        let (manifest_digest, manifest_size) = add_blob(serde_json::to_vec(&manifest).expect("JSON"))?;
        manifests.push(json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"), "size": manifest_size,
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": { "io.containerd.image.name": image.name },
        }));
    }
    let index: Value =
        json!({ "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests });

    let file = std::fs::File::create(path).map_err(|e| NodeError::io(path, e))?;
    let mut tar = tar::Builder::new(file);
    let mut put = |name: &str, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        tar.append_data(&mut header, name, data).map_err(|e| NodeError::io(path, e))
    };
    put("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    put("index.json", &serde_json::to_vec(&index).expect("JSON"))?;
    for (digest, data) in &blobs {
        put(&format!("blobs/sha256/{digest}"), data)?;
    }
    tar.finish().map_err(|e| NodeError::io(path, e))
}
