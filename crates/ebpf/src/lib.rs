//! The eBPF mode: the transparent-proxy redirect of mesh pods without iptables.
//!
//! Our programs (bpf/redirect.c, compiled from source by build.rs) are loaded once per
//! node by the installer ([`install`]) and attached to the cgroup2 root; their maps and
//! links are pinned under `<bpffs>/kong-mesh-cni/`, so they outlive the installer and a
//! second [`install`] replaces them without a moment unattached. The plugin then
//! [`Registry::register`]s each mesh pod by its network namespace: no iptables at all.
//! A pod not registered, and the host, are never touched.

pub mod abi;
mod error;
mod loader;
mod registry;
mod sys;

pub use error::EbpfError;
pub use loader::{
    Installed, MIN_KERNEL, PIN_DIR, Paths, Status, install, kernel_version, preflight, status, uninstall,
};
pub use registry::{Registration, Registry, netns_cookie};

/// The compiled programs, embedded in the binary.
pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect.o"));
