//! What a node changed on the host, written to `<root>/state.json` before each change is
//! made, and the teardown that undoes all of it from that file alone: it works after a
//! clean run, after a failed bring-up, and after the process that brought the node up
//! was killed (`kmc-node down ROOT`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::NodeError;

/// Host paths the kubelet, containerd or libcni write to whatever their config says.
/// Each that did not exist before the node is removed by the teardown; of those that
/// did, only what names this node is.
pub const HOST_PATHS: [&str; 4] = ["/run/containerd", "/var/log/containers", "/var/lib/cni", "/usr/libexec/kubernetes"];

/// Sysctls the kubelet sets at start (`protectKernelDefaults: false`).
pub const SYSCTLS: [&str; 6] = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// iptables front ends whose tables the kubelet or we may add chains to.
pub const IPTABLES: [&str; 4] = ["iptables", "iptables-legacy", "ip6tables", "ip6tables-legacy"];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Process {
    pub name: String,
    pub pid: i32,
    /// Field 22 of /proc/PID/stat: tells our process from a later one with its PID.
    pub start_time: u64,
    /// How it was started, to start it again after [`crate::Node::stop`].
    #[serde(default)]
    pub program: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub root: PathBuf,
    pub id: String,
    /// Started in this order; stopped in the reverse one.
    pub processes: Vec<Process>,
    /// Links to delete (the node bridge, the pod bridge the bridge plugin creates).
    pub links: Vec<String>,
    /// Our own iptables chain (same name in nat and filter of `iptables`).
    pub chain: String,
    /// The cgroup (under every hierarchy) that is the kubelet's cgroupRoot.
    pub cgroup: String,
    /// /proc/sys path -> value before the node.
    pub sysctls: BTreeMap<String, String>,
    /// "front-end table" -> KUBE-* chains that existed before the node.
    pub kube_chains_before: BTreeMap<String, Vec<String>>,
    /// HOST_PATHS entries that existed before the node.
    pub host_paths_before: Vec<String>,
    /// The CNI network's name (libcni's cache files are named after it).
    pub network: String,
    /// What the node did to make the pods' netns dir a shared mount point, to undo.
    #[serde(default)]
    pub netns_dir: NetnsDirChange,
}

/// The runtime's netns dir ([`NETNS_DIR`]) is mounted into the DaemonSet pod with
/// HostToContainer propagation, which containerd refuses unless the mount holding it is
/// shared or a slave. `ip netns add` makes it a shared mount point the first time it
/// runs; a fresh host has none, so the node does the same and records what it did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetnsDirChange {
    /// It was a shared or slave mount point already.
    #[default]
    None,
    /// It was a private mount point: made shared (put back: private).
    MadeShared,
    /// It was no mount point: bound onto itself and made shared (put back: unmounted,
    /// and removed when `created`).
    Mounted { created: bool },
}

/// Where containerd and CRI-O keep pods' network namespaces (`/var/run` is `/run`).
pub const NETNS_DIR: &str = "/run/netns";

/// The propagation of the mount point at `path`: `Some("shared" | "slave" | "private")`,
/// or `None` when `path` is no mount point.
pub fn propagation(path: &Path) -> Option<&'static str> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // The last line for a path is the mount on top.
    let line = info.lines().rfind(|l| l.split(' ').nth(4).is_some_and(|m| Path::new(m) == path))?;
    let optional = line.split(" - ").next().unwrap_or_default().split(' ').skip(6);
    let tags: Vec<&str> = optional.collect();
    Some(if tags.iter().any(|t| t.starts_with("shared:")) {
        "shared"
    } else if tags.iter().any(|t| t.starts_with("master:")) {
        "slave"
    } else {
        "private"
    })
}

fn mount_call(source: Option<&Path>, target: &Path, flags: libc::c_ulong) -> Result<(), NodeError> {
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("no NUL in a path");
    let target_c = c(target);
    let source_c = source.map(c);
    let source_ptr = source_c.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call (or null).
    let rc = unsafe { libc::mount(source_ptr, target_c.as_ptr(), std::ptr::null(), flags, std::ptr::null()) };
    if rc == 0 { Ok(()) } else { Err(NodeError::io(target, std::io::Error::last_os_error())) }
}

/// What [`share_netns_dir`] will do to make [`NETNS_DIR`] a shared mount point.
pub fn netns_dir_change() -> NetnsDirChange {
    let dir = Path::new(NETNS_DIR);
    match propagation(dir) {
        Some("shared" | "slave") => NetnsDirChange::None,
        Some(_) => NetnsDirChange::MadeShared,
        None => NetnsDirChange::Mounted { created: !dir.exists() },
    }
}

/// Makes [`NETNS_DIR`] a shared mount point as `ip netns add` does: the `change` that
/// [`netns_dir_change`] planned (recorded by the caller first).
pub fn share_netns_dir(change: NetnsDirChange) -> Result<(), NodeError> {
    let dir = Path::new(NETNS_DIR);
    match change {
        NetnsDirChange::None => Ok(()),
        NetnsDirChange::MadeShared => mount_call(None, dir, libc::MS_SHARED),
        NetnsDirChange::Mounted { .. } => {
            std::fs::create_dir_all(dir).map_err(|e| NodeError::io(dir, e))?;
            mount_call(Some(dir), dir, libc::MS_BIND)?;
            mount_call(None, dir, libc::MS_SHARED)
        }
    }
}

/// Puts [`NETNS_DIR`] back as [`share_netns_dir`] found it. A namespace another program
/// made under it meanwhile keeps it mounted (unmounting would hide that namespace).
fn restore_netns_dir(change: NetnsDirChange) -> Result<(), String> {
    let dir = Path::new(NETNS_DIR);
    let in_use = || !mounts_under(dir).iter().all(|m| m == dir);
    match change {
        NetnsDirChange::None => Ok(()),
        NetnsDirChange::MadeShared => mount_call(None, dir, libc::MS_PRIVATE).map_err(|e| e.to_string()),
        NetnsDirChange::Mounted { .. } if in_use() => {
            eprintln!("node: {NETNS_DIR} stays a shared mount point: namespaces were made under it meanwhile");
            Ok(())
        }
        NetnsDirChange::Mounted { created } => {
            let c = std::ffi::CString::new(NETNS_DIR).expect("no NUL");
            // Not mounted: the node was stopped between recording and mounting.
            // SAFETY: umount2(2) with a NUL-terminated path.
            if propagation(dir).is_some() && unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
                return Err(format!("unmounting {NETNS_DIR}: {}", std::io::Error::last_os_error()));
            }
            if created && std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none()) {
                std::fs::remove_dir(dir).map_err(|e| format!("removing {NETNS_DIR}: {e}"))?;
            }
            Ok(())
        }
    }
}

impl State {
    pub fn path(root: &Path) -> PathBuf {
        root.join("state.json")
    }

    pub fn load(root: &Path) -> Result<State, NodeError> {
        let path = State::path(root);
        let text = std::fs::read_to_string(&path).map_err(|e| NodeError::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| NodeError::Setup(format!("{}: {e}", path.display())))
    }

    /// Written atomically: a teardown after a kill never reads half a file.
    pub fn save(&self) -> Result<(), NodeError> {
        let path = State::path(&self.root);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).expect("JSON")).map_err(|e| NodeError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| NodeError::io(&path, e))
    }

    /// Records what the host looks like before anything is changed.
    pub fn snapshot_host(&mut self) {
        for key in SYSCTLS {
            if let Ok(value) = std::fs::read_to_string(Path::new("/proc/sys").join(key)) {
                self.sysctls.insert(key.to_string(), value.trim().to_string());
            }
        }
        for (key, chains) in iptables_chains() {
            self.kube_chains_before.insert(key, chains.into_iter().filter(|c| c.starts_with("KUBE-")).collect());
        }
        self.host_paths_before = HOST_PATHS.iter().filter(|p| Path::new(p).exists()).map(|p| p.to_string()).collect();
    }
}

/// Field 22 of /proc/PID/stat (when the process started), or None when there is no
/// such process or it is a zombie (our children are reaped by nobody until we exit).
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let mut fields = stat[stat.rfind(')')? + 2..].split(' ');
    if fields.next()? == "Z" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

pub fn alive(p: &Process) -> bool {
    start_time(p.pid) == Some(p.start_time)
}

pub fn kill(pid: i32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, signal) };
}

pub fn wait_gone(procs: &[Process], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !procs.iter().any(alive) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    !procs.iter().any(alive)
}

/// "front-end table" -> chain names, for each front end present on this host.
pub fn iptables_chains() -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for front in IPTABLES {
        let Ok(o) = Command::new(format!("{front}-save")).output() else { continue };
        let mut table = String::new();
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t.to_string();
            } else if let Some(chain) = line.strip_prefix(':') {
                let name = chain.split(' ').next().unwrap_or_default().to_string();
                out.entry(format!("{front} {table}")).or_insert_with(Vec::new).push(name);
            }
        }
    }
    out
}

/// Every mount point under `root`, deepest first.
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(root))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    mounts.dedup();
    mounts
}

/// Mount points of every cgroup hierarchy (v1 controllers and the v2 one).
pub fn cgroup_mounts() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter(|l| l.contains(" - cgroup ") || l.contains(" - cgroup2 "))
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .collect()
}

/// Processes whose command line names `root` (the shims: containerd starts them with
/// its socket path, and they outlive containerd).
pub(crate) fn processes_naming(root: &Path) -> Vec<i32> {
    let needle = root.to_string_lossy().into_owned();
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Kills everything in the cgroup subtree `dir` and removes it, deepest first.
pub(crate) fn remove_cgroup(dir: &Path) -> Result<(), String> {
    let mut dirs = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&d) {
            stack.extend(entries.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()).map(|e| e.path()));
        }
        dirs.push(d);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for d in dirs.iter().rev() {
        loop {
            for pid in std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default().lines() {
                if let Ok(pid) = pid.trim().parse() {
                    kill(pid, libc::SIGKILL);
                }
            }
            match std::fs::remove_dir(d) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() > deadline => return Err(format!("removing {}: {e}", d.display())),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    Ok(())
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program).args(args).output().map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Removes the chains `doomed` from one table of one front end, with every rule that
/// jumps to them, in one `*-restore --noflush` (the saved rules keep their quoting).
pub(crate) fn remove_chains(front: &str, table: &str, doomed: &[String]) -> Result<(), String> {
    if doomed.is_empty() {
        return Ok(());
    }
    let out =
        Command::new(format!("{front}-save")).args(["-t", table]).output().map_err(|e| format!("{front}-save: {e}"))?;
    let mut script = format!("*{table}\n");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(rule) = line.strip_prefix("-A ") else { continue };
        let chain = rule.split(' ').next().unwrap_or_default();
        let target = rule.split(' ').skip_while(|w| *w != "-j" && *w != "-g").nth(1).unwrap_or_default();
        if !doomed.iter().any(|d| d == chain) && doomed.iter().any(|d| d == target) {
            script.push_str(&format!("-D {rule}\n"));
        }
    }
    for chain in doomed {
        script.push_str(&format!("-F {chain}\n"));
    }
    for chain in doomed {
        script.push_str(&format!("-X {chain}\n"));
    }
    script.push_str("COMMIT\n");
    let mut child = Command::new(format!("{front}-restore"))
        .arg("--noflush")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{front}-restore: {e}"))?;
    use std::io::Write;
    child.stdin.take().expect("stdin").write_all(script.as_bytes()).map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{front}-restore ({table}): {}\n{script}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Undoes everything `state` records, in the order that lets each step succeed. Goes on
/// past a failing step and reports every failure at the end.
pub fn teardown(state: &State) -> Result<(), NodeError> {
    let mut failures = Vec::new();

    // 1. Our processes, last started first: the kubelet before containerd, so nothing
    //    restarts what we stop.
    for p in state.processes.iter().rev() {
        if alive(p) {
            kill(p.pid, libc::SIGTERM);
            if !wait_gone(std::slice::from_ref(p), Duration::from_secs(10)) {
                kill(p.pid, libc::SIGKILL);
                wait_gone(std::slice::from_ref(p), Duration::from_secs(5));
            }
        }
    }
    // 2. The shims (and anything else started with our paths).
    for pid in processes_naming(&state.root) {
        kill(pid, libc::SIGKILL);
    }
    // 3. The containers: every process in our cgroups, then the cgroups.
    if !state.cgroup.is_empty() {
        for mount in cgroup_mounts() {
            let dir = mount.join(&state.cgroup);
            if dir.exists()
                && let Err(e) = remove_cgroup(&dir)
            {
                failures.push(e);
            }
        }
    }
    // 4. Mounts (rootfs overlays, netns binds, shm, volumes, the kubelet's rshared bind).
    let mut left = mounts_under(&state.root);
    for _ in 0..5 {
        for m in &left {
            let c = std::ffi::CString::new(m.to_string_lossy().as_bytes()).expect("no NUL in a path");
            // SAFETY: c is a valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        left = mounts_under(&state.root);
        if left.is_empty() {
            break;
        }
    }
    if !left.is_empty() {
        failures.push(format!("mounts left: {left:?}"));
    }
    // 5. iptables: our chain, and KUBE-* chains the kubelet added.
    for (key, chains) in iptables_chains() {
        let (front, table) = key.split_once(' ').expect("key is 'front table'");
        let before = state.kube_chains_before.get(&key).cloned().unwrap_or_default();
        let doomed: Vec<String> = chains
            .into_iter()
            .filter(|c| {
                (c.starts_with("KUBE-") && !before.contains(c)) || (!state.chain.is_empty() && *c == state.chain)
            })
            .collect();
        if let Err(e) = remove_chains(front, table, &doomed) {
            failures.push(e);
        }
    }
    // 6. Links (veths went with their netns).
    for link in &state.links {
        if Path::new("/sys/class/net").join(link).exists()
            && let Err(e) = run("ip", &["link", "del", link])
        {
            failures.push(e);
        }
    }
    // 7. Sysctls.
    for (key, value) in &state.sysctls {
        let path = Path::new("/proc/sys").join(key);
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() != value)
            && let Err(e) = std::fs::write(&path, value)
        {
            failures.push(format!("restoring {}: {e}", path.display()));
        }
    }
    // 8. Host paths.
    for path in HOST_PATHS {
        let p = Path::new(path);
        if !state.host_paths_before.iter().any(|b| b == path) {
            if p.exists()
                && let Err(e) = std::fs::remove_dir_all(p)
            {
                failures.push(format!("removing {path}: {e}"));
            }
        } else if path == "/var/lib/cni" && !state.network.is_empty() {
            // libcni's result cache: results/<network>-<container>-<ifname>.
            for entry in std::fs::read_dir(p.join("results")).into_iter().flatten().flatten() {
                if entry.file_name().to_string_lossy().starts_with(&format!("{}-", state.network)) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        } else if path == "/var/log/containers" {
            for entry in std::fs::read_dir(p).into_iter().flatten().flatten() {
                if std::fs::read_link(entry.path()).is_ok_and(|t| t.starts_with(&state.root)) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
    // 9. The netns dir's mount.
    if let Err(e) = restore_netns_dir(state.netns_dir) {
        failures.push(e);
    }
    // 10. Our files.
    if failures.is_empty()
        && state.root.exists()
        && let Err(e) = std::fs::remove_dir_all(&state.root)
    {
        failures.push(format!("removing {}: {e}", state.root.display()));
    }
    if failures.is_empty() { Ok(()) } else { Err(NodeError::Teardown(failures.join("\n"))) }
}

/// What a node may change on the host, read the same way before and after it.
#[derive(Debug, PartialEq)]
pub struct HostView {
    sysctls: BTreeMap<String, String>,
    kube_chains: Vec<String>,
    paths: Vec<(String, bool)>,
    netns_dir: Option<&'static str>,
}

impl HostView {
    pub fn now() -> HostView {
        let sysctls = SYSCTLS
            .iter()
            .map(|k| (k.to_string(), std::fs::read_to_string(Path::new("/proc/sys").join(k)).unwrap_or_default()))
            .collect();
        let kube_chains = iptables_chains()
            .into_iter()
            .flat_map(|(key, chains)| chains.into_iter().map(move |c| format!("{key} {c}")))
            .filter(|c| c.contains(" KUBE-") || c.contains(" KMC-NODE-"))
            .collect();
        let paths = HOST_PATHS.iter().map(|p| (p.to_string(), Path::new(p).exists())).collect();
        HostView { sysctls, kube_chains, paths, netns_dir: propagation(Path::new(NETNS_DIR)) }
    }

    /// What differs in `self` from `before`, a line each (empty when nothing does).
    pub fn changes_since(&self, before: &HostView) -> Vec<String> {
        let mut out = Vec::new();
        for (key, value) in &self.sysctls {
            let was = before.sysctls.get(key).map(String::as_str).unwrap_or_default();
            if was != value {
                out.push(format!("sysctl {key}: {} -> {}", was.trim(), value.trim()));
            }
        }
        out.extend(self.kube_chains.iter().filter(|c| !before.kube_chains.contains(c)).map(|c| format!("added {c}")));
        out.extend(before.kube_chains.iter().filter(|c| !self.kube_chains.contains(c)).map(|c| format!("removed {c}")));
        for (path, exists) in &self.paths {
            if !before.paths.contains(&(path.clone(), *exists)) {
                out.push(format!("{path}: {}", if *exists { "created" } else { "removed" }));
            }
        }
        if self.netns_dir != before.netns_dir {
            out.push(format!("{NETNS_DIR} propagation: {:?} -> {:?}", before.netns_dir, self.netns_dir));
        }
        out
    }
}

/// What is left on the host of the node `name` whose root was `root` (empty after a
/// complete teardown): its files, mounts, cgroups, links and processes.
pub fn leftovers(root: &Path, name: &str) -> Vec<String> {
    let mut left = Vec::new();
    if root.exists() {
        left.push(format!("{}", root.display()));
    }
    left.extend(mounts_under(root).iter().map(|m| format!("mount {}", m.display())));
    for mount in cgroup_mounts() {
        if mount.join(name).exists() {
            left.push(format!("cgroup {}", mount.join(name).display()));
        }
    }
    let id = name.trim_start_matches("kmc-node-");
    for link in [format!("kmcn{id}"), format!("kmcp{id}")] {
        if Path::new("/sys/class/net").join(&link).exists() {
            left.push(format!("link {link}"));
        }
    }
    left.extend(processes_naming(root).iter().map(|pid| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        format!("process {pid}: {}", String::from_utf8_lossy(&cmdline).replace('\0', " "))
    }));
    left
}
