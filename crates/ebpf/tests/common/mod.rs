//! A private node for each test: its own bpffs mount (so pins never clash with other
//! tests or sessions, and unmounting frees whatever a failed test left) and its own
//! threaded child cgroup holding the test's thread, where the programs are attached
//! instead of the root. Threads the test thread starts (netns::NetNs::run) inherit the
//! cgroup, so only the test's own sockets see the programs.

#![allow(dead_code)] // each test binary uses part of it

use std::ffi::CString;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use ebpf::Paths;
use netns::NetNs;
use testkit::net::{Topology, accept_within, listen_tcp};

/// Whether the eBPF tests may run: root, cgroup2 and bpf(2). Under CI anything missing
/// is a failure, never a skip.
pub fn require_ebpf() -> bool {
    if !testkit::net::require_root() {
        return false;
    }
    match testkit::net::cgroup2_mount() {
        Some(_) => true,
        None => {
            assert!(std::env::var_os("CI").is_none(), "CI is set but no cgroup2 is mounted: the eBPF tests cannot run");
            eprintln!("skipping: no cgroup2 mounted");
            false
        }
    }
}

fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// A threaded child of this process's cgroup2 cgroup, holding the calling thread.
pub struct TestCgroup {
    pub path: PathBuf,
    parent: PathBuf,
    tid: libc::pid_t,
}

impl TestCgroup {
    pub fn new() -> Self {
        let mount = testkit::net::cgroup2_mount().expect("cgroup2 is mounted");
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let own = own.lines().find_map(|l| l.strip_prefix("0::")).expect("a cgroup2 line in /proc/self/cgroup");
        let parent = mount.join(own.trim_start_matches('/'));
        let path = parent.join(testkit::net::unique_name("ebpf"));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
        let cg = TestCgroup { path, parent, tid: gettid() };
        std::fs::write(cg.path.join("cgroup.type"), "threaded").expect("make the test cgroup threaded");
        std::fs::write(cg.path.join("cgroup.threads"), cg.tid.to_string()).expect("move the test thread in");
        cg
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.parent.join("cgroup.threads"), self.tid.to_string());
        // Threads the test started may take a moment to exit.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove cgroup {}", self.path.display());
    }
}

/// A bpffs mounted on a fresh directory, unmounted (freeing every pin) on drop.
pub struct BpfFs {
    pub path: PathBuf,
}

impl BpfFs {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(testkit::net::unique_name("bpffs"));
        std::fs::create_dir(&path).unwrap();
        testkit::net::mount_bpffs(&path).unwrap_or_else(|e| panic!("mount a bpffs on {}: {e}", path.display()));
        BpfFs { path }
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let target = CString::new(self.path.to_str().unwrap()).unwrap();
        // SAFETY: umount2 with a path we mounted.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Programs attached to this test's own cgroup, pinned in its own bpffs.
pub struct TestNode {
    pub paths: Paths,
    // Dropped in this order: the cgroup (detaching everything), then the bpffs.
    pub cgroup: TestCgroup,
    pub bpffs: BpfFs,
}

impl TestNode {
    /// Installs the programs; the test thread is inside the cgroup from here on.
    pub fn new() -> Self {
        let node = Self::bare();
        ebpf::install(&node.paths).expect("install the eBPF programs");
        node
    }

    /// The cgroup and bpffs only.
    pub fn bare() -> Self {
        let bpffs = BpfFs::new();
        let cgroup = TestCgroup::new();
        let paths = Paths { bpffs: bpffs.path.clone(), cgroup: cgroup.path.clone() };
        TestNode { paths, cgroup, bpffs }
    }

    pub fn registry(&self) -> ebpf::Registry {
        ebpf::Registry::open(&self.paths).expect("open the registry")
    }
}

/// Runs `work` inside `ns` on a thread whose real UID (what bpf_get_current_uid_gid
/// reports) and filesystem UID (what the iptables owner match sees) are `uid`; the
/// thread keeps root's effective UID. The raw syscall changes only this thread.
pub fn as_uid<T: Send>(ns: &NetNs, uid: Option<u32>, work: impl FnOnce() -> T + Send) -> T {
    ns.run(|| {
        if let Some(uid) = uid {
            // SAFETY: setresuid/setfsuid on this short-lived thread only.
            unsafe {
                assert_eq!(libc::syscall(libc::SYS_setresuid, uid, -1i32, -1i32), 0, "setresuid");
                libc::setfsuid(uid);
            }
        }
        work()
    })
    .unwrap()
}

/// Connects (as `uid`) and sends `payload`.
pub fn connect(ns: &NetNs, uid: Option<u32>, dest: SocketAddr, payload: &[u8]) -> io::Result<std::net::TcpStream> {
    as_uid(ns, uid, || {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect_timeout(&dest, Duration::from_secs(2))?;
        s.write_all(payload)?;
        Ok(s)
    })
}

pub fn pin_dir_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// What a connection loop saw while something ran.
pub struct Counted<T> {
    /// Connections the pod made.
    pub made: usize,
    /// Those that landed on the outbound listener (port 15001 in the pod).
    pub redirected: usize,
    /// Those that reached the destination itself: escaped the redirect.
    pub escaped: usize,
    /// What the thing that ran returned.
    pub during: T,
}

/// Runs `during` while the pod of `topo` (opened as `pod`) connects to its peer's port
/// 8080 in a loop, from 200 ms before until 200 ms after, and counts where each
/// connection landed.
pub fn connection_loop<T>(pod: &NetNs, topo: &Topology, during: impl FnOnce() -> T) -> Counted<T> {
    let outbound = listen_tcp(pod, false, 15001);
    let direct = listen_tcp(&topo.peer.open(), false, 8080);
    let dest = SocketAddr::new(topo.peer_addr(false), 8080);
    let stop = AtomicBool::new(false);
    let (redirected, escaped) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let (made, during) = std::thread::scope(|scope| {
        // Drains both listeners while the loop connects.
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) || accept_within(&outbound, Duration::from_millis(100)).is_some() {
                while accept_within(&outbound, Duration::from_millis(1)).is_some() {
                    redirected.fetch_add(1, Ordering::Relaxed);
                }
                while accept_within(&direct, Duration::from_millis(1)).is_some() {
                    escaped.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let connector = scope.spawn(|| {
            pod.run(|| {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    std::net::TcpStream::connect_timeout(&dest, Duration::from_secs(2)).expect("connect");
                    n += 1;
                }
                n
            })
            .unwrap()
        });
        std::thread::sleep(Duration::from_millis(200));
        let during = during();
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        (connector.join().unwrap(), during)
    });
    while accept_within(&direct, Duration::from_millis(50)).is_some() {
        escaped.fetch_add(1, Ordering::Relaxed);
    }
    Counted { made, redirected: redirected.into_inner(), escaped: escaped.into_inner(), during }
}
