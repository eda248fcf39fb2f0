//! Integration-test environment: a real kube-apiserver + etcd (`k8s-testenv`) and the
//! reference CNI runtime (`cni-runtime`, libcni) with real reference plugins.
//!
//! The Go harnesses are built by `scripts/testenv-build.sh` into a cache dir (the first
//! build takes many minutes; afterwards it is instant). [`bin_dir`] finds them through
//! `KMC_TESTENV_BIN`, or else by running that script.
//!
//! - [`ApiServer::shared`]: one API server per test binary, dying with it.
//! - [`TestNamespace`], [`TestNode`], [`pod`]: objects that clean up after themselves.
//! - [`NamedNetns`], [`CniRuntime`], [`Attachment`]: CNI commands against a fresh netns.
//! - [`require_root`], [`skip_heavy`]: gatekeeping that never skips silently on CI.
//!
//! Use this crate only as a dev-dependency.

mod apiserver;
mod builders;
mod cluster;
mod cni;
pub mod net;
pub mod node;
pub mod node_chart;
mod node_image;
pub mod node_multus;
mod node_pki;
pub mod node_pods;
pub mod node_reboot;
mod node_state;
mod objects;
pub mod process;

pub use apiserver::{ApiServer, ProjectedServiceAccount};
pub use builders::{PodBuilder, mesh_pod, pod, policy_rule};
pub use cluster::{ClusterGrant, request_count};
pub use cni::{Attachment, CniError, CniRuntime, Plugins, test_subnet};
pub use net::{NamedNetns, require_root};
pub use node::{Node, NodeError, NodeOptions};
pub use objects::{TestNamespace, TestNode};

use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The repository root (this crate lives in `crates/testkit`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The bin dir holding `k8s-testenv`, `cni-runtime` and `plugins/` (upstream reference
/// plugins). Taken from `KMC_TESTENV_BIN`, else from `scripts/testenv-build.sh` (which
/// builds on first use: minutes; then instant). Panics if neither works.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| cached_build("KMC_TESTENV_BIN", "scripts/testenv-build.sh", "k8s-testenv"))
}

/// The bin dir of a cache-by-hash build script: `env` if set (it must hold `probe`),
/// else the last line of the script's stdout. Panics if neither works.
pub(crate) fn cached_build(env: &str, script: &str, probe: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(env) {
        let dir = PathBuf::from(dir);
        assert!(dir.join(probe).is_file(), "{env}={} has no {probe}: run {script}", dir.display());
        return dir;
    }
    let script = repo_root().join(script);
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default().trim();
    assert!(out.status.success() && !last.is_empty(), "{} failed ({}); stdout: {stdout}", script.display(), out.status);
    PathBuf::from(last)
}

/// [`skip_heavy`] for a test that also needs root (namespaces, mounts, a node): true
/// when it should return at once. Both refuse to skip under `CI`.
pub fn skip_privileged(what: &str) -> bool {
    skip_heavy(what) || !net::require_root()
}

/// True when the developer asked to skip tests that need the Go-built test environment
/// (`KMC_SKIP_TESTENV=1`, for a fast run without the first build). Panics if that is
/// asked under `CI`.
pub fn skip_heavy(what: &str) -> bool {
    if std::env::var_os("KMC_SKIP_TESTENV").is_none_or(|v| v.is_empty() || v == "0") {
        return false;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{what}: KMC_SKIP_TESTENV is set under CI: refusing to skip");
    }
    eprintln!("SKIPPED {what}: KMC_SKIP_TESTENV is set");
    true
}

/// 8 lowercase hex digits, unique within the process and random across processes:
/// valid in Kubernetes names, netns names and (with a 7-char prefix) link names.
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded randomly per process; the counter separates calls.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    format!("{:08x}", h.finish() as u32)
}

/// Runs a future to completion on a fresh thread with its own runtime. Used by guards'
/// `Drop`, which is synchronous and may run inside (or outside) any test runtime.
/// A client from the kubeconfig file at `kubeconfig` (panics: test setup).
pub(crate) async fn client_from(kubeconfig: &Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .unwrap_or_else(|e| panic!("reading {}: {e}", kubeconfig.display()));
    let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("loading {}: {e}", kubeconfig.display()));
    kube::Client::try_from(config).expect("building kube client")
}

pub(crate) fn block_on_thread<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let handle = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building cleanup runtime")
            .block_on(f());
    });
    if handle.join().is_err() {
        eprintln!("testenv: cleanup thread panicked");
    }
}
