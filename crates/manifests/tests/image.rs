//! The image. scripts/image-build.sh builds it here (an OCI layout, no engine): its
//! entrypoint, user, files, labels and size are checked. deployments/Dockerfile cannot be
//! built here (no Docker engine): these checks keep it consistent with the repository,
//! with that script and with what the chart runs in the image.

mod common;

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
            // Without the health port the readiness probe is a command in the image.
            set: vec!["cni.delayStartupSeconds=3".into(), "cni.healthPort=0".into()],
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
    assert!(cargo_config.contains("target = \"x86_64-unknown-linux-gnu\""));
    assert!(
        joined.contains("amd64) triple=x86_64-unknown-linux-gnu")
            && joined.contains("arm64) triple=aarch64-unknown-linux-gnu")
    );
    assert!(joined.contains("--target \"$triple\"") && joined.contains("target/$triple/release/kong-mesh-cni"));
    assert!(joined.contains("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS=\"-C target-feature=+crt-static\""));
    assert!(joined.contains("/rootfs/opt/cni/bin/kong-mesh-cni"));
    assert!(joined.contains("ln -s /opt/cni/bin/kong-mesh-cni /rootfs/install-cni"));
    // `kubectl exec ds/kong-mesh-cni -- kong-mesh-cni status` finds it on the PATH.
    assert!(joined.contains("ln -s /opt/cni/bin/kong-mesh-cni /rootfs/usr/local/bin/kong-mesh-cni"));
    assert!(ins.iter().any(|i| i.starts_with("ENV PATH=/usr/local/bin:") || i.contains(":/usr/local/bin:")));
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
    // Kuma's DaemonSet runs `sh -c "sleep N && exec /install-cni"`.
    for cmd in [probe[0].as_str(), sleep[0].as_str(), "/bin/sh"] {
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

/// Whether an ELF file asks for a dynamic loader (a PT_INTERP program header).
fn has_interpreter(elf: &[u8]) -> bool {
    assert_eq!(&elf[..5], b"\x7fELF\x02", "a 64-bit ELF file");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count).any(|i| u32::from_le_bytes(elf[phoff + i * size..][..4].try_into().unwrap()) == 3)
}

#[test]
fn the_image_built_here_has_the_entrypoint_user_files_and_labels_the_charts_need() {
    if testkit::skip_heavy("the image build") {
        return;
    }
    let layout = common::image();
    let (manifest, config, layer) = common::image_parts(layout);
    assert_eq!(manifest["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!((config["os"].as_str(), config["architecture"].as_str()), (Some("linux"), Some("amd64")));
    let c = &config["config"];
    // The same as the Dockerfile's.
    let ins = instructions();
    let entrypoint: serde_json::Value =
        serde_json::from_str(ins.iter().find_map(|i| i.strip_prefix("ENTRYPOINT ")).unwrap()).unwrap();
    assert_eq!(c["Entrypoint"], entrypoint);
    assert_eq!(c["Entrypoint"], serde_json::json!(["/install-cni"]));
    let user = ins.iter().find_map(|i| i.strip_prefix("USER ")).unwrap();
    assert_eq!(c["User"], user);
    assert!(c["Env"][0].as_str().unwrap().split(':').any(|d| d == "/bin"), "sh is found on PATH");
    let workspace = toml_like::read(&root().join("Cargo.toml"));
    let labels = &c["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], workspace.version.as_str());
    assert_eq!(labels["org.opencontainers.image.title"], "kong-mesh-cni");
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
    assert!(labels["org.opencontainers.image.revision"].as_str().is_some_and(|r| r.len() == 40), "{labels}");

    // The files, exactly: `tar -tvz` lines as mode, owner, name and link target.
    let dir = tempfile::tempdir().unwrap();
    let tarball = dir.path().join("layer.tar.gz");
    std::fs::write(&tarball, &layer).unwrap();
    let out = std::process::Command::new("tar").args(["-tvz", "--numeric-owner", "-f"]).arg(&tarball).output().unwrap();
    assert!(out.status.success());
    let listing: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            format!("{} {} {}", f[0], f[1], f[5..].join(" "))
        })
        .collect();
    let want = [
        "drwxr-xr-x 0/0 ./",
        "drwxr-xr-x 0/0 ./bin/",
        "-rwxr-xr-x 0/0 ./bin/busybox",
        "lrwxrwxrwx 0/0 ./bin/cat -> busybox",
        "lrwxrwxrwx 0/0 ./bin/sh -> busybox",
        "lrwxrwxrwx 0/0 ./bin/sleep -> busybox",
        "lrwxrwxrwx 0/0 ./install-cni -> /opt/cni/bin/kong-mesh-cni",
        "drwxr-xr-x 0/0 ./opt/",
        "drwxr-xr-x 0/0 ./opt/cni/",
        "drwxr-xr-x 0/0 ./opt/cni/bin/",
        "-rwxr-xr-x 0/0 ./opt/cni/bin/kong-mesh-cni",
        "drwxrwxrwt 0/0 ./tmp/",
        "drwxr-xr-x 0/0 ./usr/",
        "drwxr-xr-x 0/0 ./usr/local/",
        "drwxr-xr-x 0/0 ./usr/local/bin/",
        "lrwxrwxrwx 0/0 ./usr/local/bin/kong-mesh-cni -> /opt/cni/bin/kong-mesh-cni",
    ];
    assert_eq!(listing, want);

    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    common::unpack_image(layout, &rootfs);
    for binary in ["bin/busybox", "opt/cni/bin/kong-mesh-cni"] {
        assert!(!has_interpreter(&std::fs::read(rootfs.join(binary)).unwrap()), "{binary} is static");
    }
    let binary = std::fs::metadata(rootfs.join("opt/cni/bin/kong-mesh-cni")).unwrap().len();
    let compressed = layer.len() as u64;
    eprintln!(
        "image: layer {:.1} MiB compressed, binary {:.1} MiB, busybox {:.1} MiB",
        compressed as f64 / 1048576.0,
        binary as f64 / 1048576.0,
        std::fs::metadata(rootfs.join("bin/busybox")).unwrap().len() as f64 / 1048576.0
    );
    // A release binary (the debug one is several times larger) in a small image.
    assert!(compressed < 30 << 20, "the image layer is {compressed} bytes");
    assert!(binary < 60 << 20, "the binary is {binary} bytes: not a release build?");
}
