//! The eBPF mode: the transparent-proxy redirect of mesh pods without iptables.
//!
//! Our programs (bpf/redirect.c, compiled from source by build.rs) are loaded once per
//! node by the installer ([`install`]) and attached to the cgroup2 root; their maps and
//! links are pinned under `<bpffs>/kong-mesh-cni/`, so they outlive the installer and a
//! second [`install`] replaces them without a moment unattached. The plugin then
//! [`Registry::register`]s each mesh pod by its network namespace: no iptables at all.
//! A pod not registered, and the host, are never touched.
//!
//! How each iptables behaviour is done:
//! - outbound TCP: `cgroup/connect4|6` rewrites the destination to the loopback outbound
//!   port before the connection exists (no conntrack, no NAT); the original destination
//!   is kept by socket cookie, and `sockops` (active established) re-keys it by the
//!   connection's 4-tuple, which `cgroup/getsockopt` finds from the accepted side to
//!   answer `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` exactly as the kernel would.
//! - DNS: `cgroup/sendmsg4|6` (and connect, for connected UDP) to the DNS port;
//!   `cgroup/recvmsg4|6` shows the answer as coming from the server asked.
//! - inbound: `sk_lookup`, attached to each registered pod's namespace, hands TCP for the
//!   pod's addresses to the inbound listener (put in a socket hash by `sockops` when it
//!   calls listen). Chosen over tc/DNAT because no packet is rewritten: the accepted
//!   socket's local address is the original destination, checksums and MTU are
//!   untouched, and it works for both families alike; getsockopt answers
//!   `SO_ORIGINAL_DST` with that local address. Without a listener yet the SYN is
//!   dropped (retried by the client), never delivered past the sidecar.
//! - Kuma's loopback paths: the sidecar's connections to the pod's own addresses go to
//!   the inbound port; connections from 127.0.0.6 / ::6 and applications' connections
//!   over loopback are left alone, as the iptables rules do.

pub mod abi;
mod error;
mod features;
mod loader;
mod registry;
mod sys;

pub use error::EbpfError;
pub use features::{Feature, Helper, MapKind, ProbeError, Probes, ProgramKind, kernel_release, probe};
pub use loader::{Installed, PIN_DIR, Paths, Status, install, preflight, preflight_with, status, uninstall};
pub use registry::{Registration, Registry, netns_addresses, netns_cookie};
pub use sys::AttachType;

/// The compiled programs, embedded in the binary.
pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect.o"));
