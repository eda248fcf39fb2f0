//! A node reboot, as far as one node on a shared machine can have one: everything a
//! reboot drops goes, everything on disk stays, and the runtime and the kubelet start
//! again. The control plane (etcd, the API server, the controller-manager, the
//! scheduler) stands for other machines and keeps running.
//!
//! Dropped: the kubelet and containerd, every container and shim, every mount under the
//! node's root (rootfs overlays, the pods' network namespaces, projected volumes,
//! shm), what lives in `/run` (containerd's state dir and runc's root, our run dir with
//! the agent's and the log relay's sockets and the pending in-place repair records),
//! the pods' cgroups, the pod bridge, and the kube-proxy part of the host's iptables
//! (the `kubernetes` Service's DNAT) with the kubelet's `KUBE-*` chains.
//! Kept: the CNI net and bin dirs (our conflist entry, binary and kubeconfig),
//! containerd's root (images, metadata), the kubelet's root dir, host-local's leases.

use std::path::Path;
use std::time::Duration;

use crate::node::{Node, NodeError};
use crate::node_state::{cgroup_mounts, iptables_chains, mounts_under, processes_naming, remove_cgroup, remove_chains};

/// When the `kubernetes` Service's address leads to the API server again after a reboot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceRoute {
    /// Before the runtime starts, as on a node whose kube-proxy comes up first.
    AtBoot,
    /// Only when the caller calls [`Node::route_service`]: until then nothing on the node
    /// (our plugin, our installer, pods) reaches the API server, as before kube-proxy ran.
    Later,
}

impl Node {
    /// Reboots the node: see the module doc. `while_down` runs when everything is
    /// stopped and dropped and before anything starts (to spoil a token, say).
    pub async fn reboot(&mut self, route: ServiceRoute, while_down: impl FnOnce(&Node)) -> Result<(), NodeError> {
        self.stop("kubelet")?;
        self.stop("containerd")?;
        // The shims and containers: every process naming our root but the control
        // plane's, then every process in the pods' cgroups (the cgroups go with them; the
        // kubelet makes them again).
        let control_plane: Vec<i32> = self.state.processes.iter().map(|p| p.pid).collect();
        for pid in processes_naming(&self.root).into_iter().filter(|pid| !control_plane.contains(pid)) {
            crate::node_state::kill(pid, libc::SIGKILL);
        }
        for mount in cgroup_mounts() {
            let dir = mount.join(&self.name);
            if dir.exists() {
                remove_cgroup(&dir).map_err(NodeError::Setup)?;
            }
        }
        self.make_cgroups()?;
        for _ in 0..5 {
            for m in mounts_under(&self.root) {
                let c = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()).expect("no NUL in a path");
                // SAFETY: umount2(2) with a NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let left = mounts_under(&self.root);
        if !left.is_empty() {
            return Err(NodeError::Setup(format!("reboot: mounts left: {left:?}")));
        }
        for dir in ["containerd/state", "containerd/runc", "run"] {
            let dir = self.root.join(dir);
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|e| NodeError::io(&dir, e))?;
            }
        }
        let pod_bridge = &self.state.links[1];
        if Path::new("/sys/class/net").join(pod_bridge).exists() {
            crate::node::run("ip", &["link", "del", pod_bridge])?;
        }
        self.unroute_service()?;
        for (key, chains) in iptables_chains() {
            let (front, table) = key.split_once(' ').expect("key is 'front table'");
            let before = self.state.kube_chains_before.get(&key).cloned().unwrap_or_default();
            let doomed: Vec<String> =
                chains.into_iter().filter(|c| c.starts_with("KUBE-") && !before.contains(c)).collect();
            remove_chains(front, table, &doomed).map_err(NodeError::Setup)?;
        }

        self.share_runtime_netns_dir()?;
        while_down(self);
        if route == ServiceRoute::AtBoot {
            self.route_service()?;
        }
        self.start("containerd")?;
        let sock = self.root.join("containerd/containerd.sock");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !sock.exists() {
            if std::time::Instant::now() > deadline {
                return Err(NodeError::Timeout("containerd's socket after the reboot".into()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.start("kubelet")
    }
}
