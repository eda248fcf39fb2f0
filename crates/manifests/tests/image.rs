//! deployments/Dockerfile cannot be built here (no Docker engine): these checks keep it
//! consistent with the repository and with what the chart runs in the image.

use std::path::{Path, PathBuf};

use manifests::{Chart, Options};
use serde_norway::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn instructions() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("deployments/Dockerfile")).unwrap();
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                if !current.trim().is_empty() {
                    out.push(std::mem::take(&mut current).split_whitespace().collect::<Vec<_>>().join(" "));
                }
                current.clear();
            }
        }
    }
    out
}

fn kind_manifests() -> Vec<Value> {
    let manifests = Chart::embedded()
        .render(&Options {
            preset: Some("kind".into()),
            set: vec!["cni.delayStartupSeconds=3".into()],
            ..Options::default()
        })
        .unwrap();
    manifests.iter().map(|m| serde_norway::from_str(&m.content).unwrap()).collect()
}

fn pod_spec<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    &objects.iter().find(|o| o["kind"] == kind).unwrap()["spec"]["template"]["spec"]
}

#[test]
fn the_header_says_it_is_not_built_here() {
    let text = std::fs::read_to_string(root().join("deployments/Dockerfile")).unwrap();
    assert!(text.contains("NOT BUILT BY THIS REPOSITORY'S CI") && text.contains("no Docker"), "say why it is untested");
}

#[test]
fn every_copied_path_exists_in_the_build_context() {
    let mut copies = 0;
    for ins in instructions().iter().filter(|i| i.starts_with("COPY ") && !i.contains("--from=")) {
        let words: Vec<&str> = ins.split(' ').skip(1).collect();
        for src in &words[..words.len() - 1] {
            assert!(
                root().join(src).exists(),
                "{ins}: {src} does not exist in the repository root (the build context)"
            );
            copies += 1;
        }
    }
    assert!(copies >= 4, "the build copies the workspace");
    // Every workspace member and the chart the binary embeds are in the context.
    let joined = instructions().join("\n");
    assert!(joined.contains("COPY crates crates") && joined.contains("COPY deployments/charts deployments/charts"));
}

#[test]
fn binary_path_entrypoint_and_commands_match_the_chart() {
    let ins = instructions();
    let joined = ins.join("\n");
    let from: Vec<&String> = ins.iter().filter(|i| i.starts_with("FROM ")).collect();
    assert_eq!(from.last().map(|s| s.as_str()), Some("FROM scratch"), "a minimal final image");
    // The build path is the target .cargo/config.toml pins (static linking).
    let cargo_config = std::fs::read_to_string(root().join(".cargo/config.toml")).unwrap();
    assert!(
        cargo_config.contains("target = \"x86_64-unknown-linux-gnu\"")
            && joined.contains("target/x86_64-unknown-linux-gnu/release/kong-mesh-cni")
    );
    assert!(joined.contains("/rootfs/opt/cni/bin/kong-mesh-cni"));
    assert!(joined.contains("ln -s /opt/cni/bin/kong-mesh-cni /rootfs/install-cni"));
    let entrypoint = ins.iter().find_map(|i| i.strip_prefix("ENTRYPOINT ")).expect("an ENTRYPOINT");
    let entrypoint: Vec<String> = serde_json::from_str(entrypoint).unwrap();

    let objects = kind_manifests();
    let ds = pod_spec(&objects, "DaemonSet");
    let installer: Vec<String> = serde_norway::from_value(ds["containers"][0]["command"].clone()).unwrap();
    assert_eq!(installer, entrypoint, "the DaemonSet runs the image's entrypoint");
    // Called by that name, the binary runs the installer.
    let argv = installer::entrypoint_args(installer.iter().map(Into::into));
    assert_eq!(argv[1], "install");
    let controller: Vec<String> =
        serde_norway::from_value(pod_spec(&objects, "Deployment")["containers"][0]["command"].clone()).unwrap();
    assert_eq!(controller[0], "/opt/cni/bin/kong-mesh-cni");
    // The other commands the chart runs in the image are there.
    let probe: Vec<String> =
        serde_norway::from_value(ds["containers"][0]["readinessProbe"]["exec"]["command"].clone()).unwrap();
    let sleep: Vec<String> = serde_norway::from_value(ds["initContainers"][0]["command"].clone()).unwrap();
    for cmd in [&probe[0], &sleep[0]] {
        let name = cmd.strip_prefix("/bin/").unwrap_or_else(|| panic!("{cmd} is not in /bin"));
        assert!(joined.contains(&format!("ln -s busybox /rootfs/bin/{name}")), "the image provides {cmd}");
    }
    // The ready file's dir exists in the image, and the controller's non-root user is set.
    assert!(joined.contains("mkdir -p -m 1777 /rootfs/tmp") && joined.contains("USER 65532:65532"));
}

#[test]
fn versions_agree() {
    let workspace: toml_like::Manifest = toml_like::read(&root().join("Cargo.toml"));
    let chart = Chart::embedded();
    let meta: Value = serde_norway::from_str(&chart.files()["Chart.yaml"]).unwrap();
    assert_eq!(
        meta["appVersion"],
        workspace.version.as_str(),
        "the image tag the chart defaults to is the binary's version"
    );
    let dockerfile = std::fs::read_to_string(root().join("deployments/Dockerfile")).unwrap();
    assert!(
        dockerfile.contains(&format!("ARG RUST_VERSION={}", workspace.rust_version)),
        "the build image's Rust is the workspace's rust-version"
    );
}

/// Just enough of Cargo.toml: [workspace.package] version and rust-version.
mod toml_like {
    pub struct Manifest {
        pub version: String,
        pub rust_version: String,
    }
    pub fn read(path: &std::path::Path) -> Manifest {
        let text = std::fs::read_to_string(path).unwrap();
        let section = text.split("[workspace.package]").nth(1).unwrap();
        let get = |key: &str| {
            section
                .lines()
                .find_map(|l| {
                    l.strip_prefix(key)
                        .and_then(|r| r.trim().strip_prefix('='))
                        .map(|v| v.trim().trim_matches('"').to_owned())
                })
                .unwrap()
        };
        Manifest { version: get("version"), rust_version: get("rust-version") }
    }
}
