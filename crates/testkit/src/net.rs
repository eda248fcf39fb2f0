//! Real network topologies for tests: named namespaces removed on drop (also when the
//! test fails), a "pod" joined to a "peer" by a veth pair with IPv4 and IPv6, and
//! sockets opened inside them, optionally as another user.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use netns::NetNs;

/// Whether privileged tests may run. Root: yes. Not root: a loud failure when `CI` is
/// set (CI is root, so this is a broken setup, not a reason to skip), else a skip.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "CI is set but this privileged test is not running as root");
    eprintln!("skipping: this test needs root");
    false
}

/// Runs a command and panics with its output when it fails.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Where cgroup2 is mounted (`/sys/fs/cgroup/unified` on this hybrid host).
pub fn cgroup2_mount() -> Option<std::path::PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split_whitespace().nth(4)?;
        (right.split_whitespace().next() == Some("cgroup2")).then(|| std::path::PathBuf::from(mount_point))
    })
}

/// Mounts a fresh bpffs on the directory `path`, as a shared mount: a container that
/// mounts it with Bidirectional propagation (the eBPF DaemonSet) needs one.
pub fn mount_bpffs(path: &std::path::Path) -> io::Result<()> {
    let target = c_path(path)?;
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    make_shared(&target)
}

/// Bind-mounts the directory `from` on `to`, as a shared mount (see [`mount_bpffs`]).
pub fn bind_shared(from: &std::path::Path, to: &std::path::Path) -> io::Result<()> {
    let (source, target) = (c_path(from)?, c_path(to)?);
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let rc =
        unsafe { libc::mount(source.as_ptr(), target.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    make_shared(&target)
}

fn c_path(path: &std::path::Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)
}

fn make_shared(target: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: mount(2) changing the propagation of a mount point we just made.
    let rc =
        unsafe { libc::mount(std::ptr::null(), target.as_ptr(), std::ptr::null(), libc::MS_SHARED, std::ptr::null()) };
    match rc {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// A unique, short name: `kmc-<tag>-<pid>-<n>`.
pub fn unique_name(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("kmc-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A namespace under /var/run/netns, deleted on drop.
pub struct NamedNetns {
    pub name: String,
}

impl NamedNetns {
    pub fn new(tag: &str) -> Self {
        let name = unique_name(tag);
        sh("ip", &["netns", "add", &name]);
        let ns = NamedNetns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    pub fn open(&self) -> NetNs {
        NetNs::open(self.path()).expect("open the test namespace")
    }

    /// `ip -n NAME ...`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// Runs a program inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        sh("ip", &full)
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A pod namespace and a peer namespace joined by veth (`eth0` on both sides), the
/// peer being the pod's default gateway for both families.
pub struct Topology {
    pub pod: NamedNetns,
    pub peer: NamedNetns,
    pub ipv6: bool,
}

impl Topology {
    pub const POD_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    pub const PEER_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    pub const POD_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 2);
    pub const PEER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 1);

    /// Builds the topology; with `ipv6` false the pod has no IPv6 address at all
    /// (not even link-local).
    pub fn new(tag: &str, ipv6: bool) -> Self {
        let pod = NamedNetns::new(tag);
        let peer = NamedNetns::new(&format!("{tag}p"));
        if !ipv6 {
            pod.exec("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]);
        }
        sh(
            "ip",
            &["-n", &pod.name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &peer.name],
        );
        for (ns, v4, v6) in [(&pod, Self::POD_V4, Self::POD_V6), (&peer, Self::PEER_V4, Self::PEER_V6)] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
            if ipv6 {
                ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]);
            }
            ns.ip(&["link", "set", "eth0", "up"]);
        }
        pod.ip(&["route", "add", "default", "via", &Self::PEER_V4.to_string()]);
        if ipv6 {
            pod.ip(&["-6", "route", "add", "default", "via", &Self::PEER_V6.to_string()]);
        }
        Topology { pod, peer, ipv6 }
    }

    pub fn pod_addr(&self, v6: bool) -> IpAddr {
        if v6 { Self::POD_V6.into() } else { Self::POD_V4.into() }
    }

    pub fn peer_addr(&self, v6: bool) -> IpAddr {
        if v6 { Self::PEER_V6.into() } else { Self::PEER_V4.into() }
    }
}

fn any(v6: bool, port: u16) -> SocketAddr {
    if v6 { (Ipv6Addr::UNSPECIFIED, port).into() } else { (Ipv4Addr::UNSPECIFIED, port).into() }
}

/// A TCP listener on the wildcard address inside `ns` (IPv6 listeners are v6-only).
pub fn listen_tcp(ns: &NetNs, v6: bool, port: u16) -> TcpListener {
    ns.run(|| {
        let l = TcpListener::bind(any(v6, port)).unwrap_or_else(|e| panic!("listen on port {port}: {e}"));
        l.set_nonblocking(true).unwrap();
        l
    })
    .unwrap()
}

pub fn bind_udp(ns: &NetNs, v6: bool, port: u16) -> UdpSocket {
    ns.run(|| {
        let s = UdpSocket::bind(any(v6, port)).unwrap_or_else(|e| panic!("bind UDP port {port}: {e}"));
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        s
    })
    .unwrap()
}

/// Runs `work` inside `ns` with the thread's filesystem UID set to `uid`: sockets
/// created there are owned by `uid`, which is what the iptables owner match sees.
fn as_user<T: Send>(ns: &NetNs, uid: Option<u32>, work: impl FnOnce() -> T + Send) -> T {
    ns.run(|| {
        if let Some(uid) = uid {
            // SAFETY: setfsuid changes only this (short-lived) thread's filesystem UID.
            unsafe { libc::setfsuid(uid) };
        }
        work()
    })
    .unwrap()
}

/// Connects from inside `ns` as `uid` (root when `None`) and sends `payload`.
pub fn connect_tcp(ns: &NetNs, uid: Option<u32>, dest: SocketAddr, payload: &[u8]) -> io::Result<TcpStream> {
    as_user(ns, uid, || {
        let mut s = TcpStream::connect_timeout(&dest, Duration::from_secs(2))?;
        s.write_all(payload)?;
        Ok(s)
    })
}

pub fn send_udp(ns: &NetNs, uid: Option<u32>, dest: SocketAddr, payload: &[u8]) -> io::Result<()> {
    as_user(ns, uid, || {
        let s = UdpSocket::bind(any(dest.is_ipv6(), 0))?;
        s.send_to(payload, dest).map(drop)
    })
}

/// Accepts one connection within `timeout`, or `None`.
pub fn accept_within(listener: &TcpListener, timeout: Duration) -> Option<TcpStream> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return Some(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => panic!("accept: {e}"),
        }
    }
    None
}

/// Reads exactly `len` bytes (with a timeout).
pub fn read_exact(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = vec![0; len];
    stream.read_exact(&mut buf).expect("read the payload");
    buf
}

pub fn recv_udp(socket: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 1500];
    socket.recv_from(&mut buf).ok().map(|(n, from)| (buf[..n].to_vec(), from))
}
