//! A named network namespace (`ip netns`), deleted on drop.

use std::path::PathBuf;
use std::process::{Command, Output};

use crate::unique_suffix;

/// Network namespace `kmc-test-xxxxxxxx`, made with `ip netns add` and deleted on drop
/// (also when the test panics), which also destroys every interface inside it (and so
/// the host end of any veth pair). Needs root: check [`crate::need_root`] first.
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn new() -> NetNs {
        let name = format!("kmc-test-{}", unique_suffix());
        run_ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        // Bring up lo, as a container runtime does (the loopback plugin would too).
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The path a runtime passes as CNI_NETNS.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS...`: its stdout; panics on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run_ip(&full)
    }

    /// `ip netns exec NAME CMD...`: runs a command inside the namespace.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {} {cmd:?}: {e}", self.name))
    }
}

impl Default for NetNs {
    fn default() -> Self {
        NetNs::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "testenv: ip netns delete {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("testenv: ip netns delete {}: {e}", self.name),
        }
    }
}

pub(crate) fn run_ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip {args:?}: {e} (is iproute2 installed?)"));
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
