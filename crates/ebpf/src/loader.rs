//! Loading once per node: preflight, load, attach to the cgroup2 root, pin; replace
//! without a gap; uninstall.
//!
//! Layout under `<bpffs>/kong-mesh-cni/`: one pin per map (`kmc_pods`, ...), one link
//! pin per cgroup program (`<program>_link`), the sk_lookup program (`kmc_sk_lookup`)
//! that registration attaches to each pod's network namespace, and `pods/` with one link
//! pin per registered pod. Maps are reused by a second load, so registrations survive
//! an installer restart, and a second load swaps its programs into the pinned links
//! (BPF_LINK_UPDATE): the kernel replaces the program of an attached link atomically,
//! so no connection ever finds the cgroup without a redirect.

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use std::os::fd::AsFd;

use aya::programs::{Program, ProgramError};
use aya::{Ebpf, EbpfLoader};

use crate::features::{self, PROGRAMS, Probes};
use crate::sys::{self, AttachType};
use crate::{EbpfError, OBJECT};

/// Directory of our pins inside the bpffs.
pub const PIN_DIR: &str = "kong-mesh-cni";

pub(crate) const MAPS: [&str; 5] = ["kmc_pods", "kmc_addrs", "kmc_sockets", "kmc_pairs", "kmc_listeners"];
pub(crate) const CGROUP_PROGRAMS: [&str; 8] = [
    "kmc_connect4",
    "kmc_connect6",
    "kmc_sendmsg4",
    "kmc_sendmsg6",
    "kmc_recvmsg4",
    "kmc_recvmsg6",
    "kmc_sockops",
    "kmc_getsockopt",
];
pub(crate) const SK_LOOKUP: &str = "kmc_sk_lookup";
pub(crate) const PODS_DIR: &str = "pods";

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where the node's bpffs and cgroup2 are mounted (Kuma's `experimental.ebpf.bpffsPath`
/// and `cgroupPath`).
#[derive(Debug, Clone)]
pub struct Paths {
    pub bpffs: PathBuf,
    /// The cgroup the programs are attached to: the cgroup2 root on a node.
    pub cgroup: PathBuf,
}

impl Paths {
    pub fn pin_dir(&self) -> PathBuf {
        self.bpffs.join(PIN_DIR)
    }
}

/// What [`install`] did.
#[derive(Debug)]
pub struct Installed {
    /// Programs were already attached and have been replaced (an upgrade or restart).
    pub replaced: bool,
    /// The kernel's release, for the log.
    pub kernel: String,
}

fn fs_magic(path: &Path) -> Option<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type as i64)
}

/// Checks the kernel's features, cgroup2 and bpffs; the error names every piece that is
/// missing. Returns the kernel's release.
pub fn preflight(paths: &Paths) -> Result<String, EbpfError> {
    preflight_with(paths, &Probes::KERNEL)
}

/// [`preflight`] with the kernel's answers given by `probes`. The release is only shown:
/// vendor kernels carry features of much later upstream releases.
pub fn preflight_with(paths: &Paths, probes: &Probes) -> Result<String, EbpfError> {
    let kernel = (probes.release)().unwrap_or_else(|| "of unknown release".to_owned());
    let mut missing = features::missing(probes.feature);
    if fs_magic(&paths.cgroup) != Some(CGROUP2_SUPER_MAGIC) {
        missing.push(format!("no cgroup2 mounted at {} (cgroupPath)", paths.cgroup.display()));
    }
    if fs_magic(&paths.bpffs) != Some(BPF_FS_MAGIC) {
        missing.push(format!("no bpffs mounted at {} (bpffsPath)", paths.bpffs.display()));
    }
    if !missing.is_empty() {
        return Err(EbpfError::Preflight { kernel, missing });
    }
    tracing::debug!(kernel, "the kernel has every eBPF feature our programs need");
    Ok(kernel)
}

fn link_pin(dir: &Path, program: &str) -> PathBuf {
    dir.join(format!("{program}_link"))
}

fn load(program: &mut Program) -> Result<(), ProgramError> {
    match program {
        Program::CgroupSockAddr(p) => p.load(),
        Program::CgroupSockopt(p) => p.load(),
        Program::SockOps(p) => p.load(),
        _ => unreachable!("a cgroup program of bpf/redirect.c"),
    }
}

/// A failed load, named by what the program needs when the verifier refused it.
fn load_failed(program: &'static str) -> impl FnOnce(ProgramError) -> EbpfError {
    move |source| match &source {
        ProgramError::LoadError { verifier_log, .. } => EbpfError::Refused {
            program,
            why: features::refusal(program, &verifier_log.to_string()),
            source: Box::new(source),
        },
        _ => EbpfError::program(program)(source),
    }
}

/// Attaches a loaded cgroup program, or swaps it into the link already pinned at `pin`.
fn attach_or_update(program: &Program, name: &'static str, cgroup: &File, pin: &Path) -> Result<(), EbpfError> {
    let prog = match program {
        Program::CgroupSockAddr(p) => p.fd(),
        Program::CgroupSockopt(p) => p.fd(),
        Program::SockOps(p) => p.fd(),
        _ => unreachable!("{name} is a cgroup program of bpf/redirect.c"),
    };
    let attach = attach_type(name);
    let prog = prog.map_err(EbpfError::program(name))?.as_fd();
    match sys::obj_get(pin) {
        Ok(link) => sys::link_update(link.as_fd(), prog).map_err(EbpfError::io("cannot update the link", pin)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let link = sys::link_create(prog, cgroup.as_fd(), attach)
                .map_err(EbpfError::io("cannot attach to the cgroup", pin))?;
            sys::obj_pin(link.as_fd(), pin).map_err(EbpfError::io("cannot pin", pin))
        }
        Err(e) => Err(EbpfError::io("cannot open the pinned link", pin)(e)),
    }
}

fn attach_type(name: &str) -> AttachType {
    PROGRAMS.iter().find(|(n, _)| *n == name).map(|(_, a)| *a).expect("every program of bpf/redirect.c is in PROGRAMS")
}

/// Pins at a temporary name and renames over `path`: the old object (if any) is
/// released only once the new one is in place.
fn replace_pin(path: &Path, pin: impl FnOnce(&Path) -> Result<(), EbpfError>) -> Result<(), EbpfError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push("_new"); // bpffs refuses names with a dot
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp); // left by an install that died midway
    pin(&tmp)?;
    std::fs::rename(&tmp, path).map_err(EbpfError::io("cannot rename the pin", path))
}

/// Loads the programs and attaches them to `paths.cgroup`, reusing the pinned maps (and
/// so every registration) of a previous load and replacing its links without a gap.
pub fn install(paths: &Paths) -> Result<Installed, EbpfError> {
    let kernel = preflight(paths)?;
    let dir = paths.pin_dir();
    std::fs::create_dir_all(dir.join(PODS_DIR)).map_err(EbpfError::io("cannot create", &dir))?;
    let replaced = CGROUP_PROGRAMS.iter().any(|p| link_pin(&dir, p).exists());
    let map_pins: Vec<(&str, PathBuf)> = MAPS.iter().map(|m| (*m, dir.join(m))).collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &map_pins {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf: Ebpf = loader.load(OBJECT).map_err(|e| EbpfError::Load(Box::new(e)))?;
    let cgroup = File::open(&paths.cgroup).map_err(EbpfError::io("cannot open the cgroup", &paths.cgroup))?;
    for name in CGROUP_PROGRAMS {
        let program = ebpf.program_mut(name).expect("bpf/redirect.c defines every program we attach");
        load(program).map_err(load_failed(name))?;
        attach_or_update(program, name, &cgroup, &link_pin(&dir, name))?;
    }
    let sk_lookup: &mut aya::programs::SkLookup = ebpf
        .program_mut(SK_LOOKUP)
        .expect("bpf/redirect.c defines the sk_lookup program")
        .try_into()
        .map_err(EbpfError::program(SK_LOOKUP))?;
    sk_lookup.load().map_err(load_failed(SK_LOOKUP))?;
    replace_pin(&dir.join(SK_LOOKUP), |tmp| {
        sk_lookup.pin(tmp).map_err(|source| EbpfError::Pin { path: tmp.into(), source: Box::new(source) })
    })?;
    // Pods registered before keep their sk_lookup link; it now runs the new program.
    let prog = sk_lookup.fd().map_err(EbpfError::program(SK_LOOKUP))?.as_fd();
    let pods = dir.join(PODS_DIR);
    for entry in std::fs::read_dir(&pods).map_err(EbpfError::io("cannot list", &pods))?.filter_map(Result::ok) {
        let pin = entry.path();
        let link = sys::obj_get(&pin).map_err(EbpfError::io("cannot open the pinned link", &pin))?;
        sys::link_update(link.as_fd(), prog).map_err(EbpfError::io("cannot update the link", &pin))?;
    }
    tracing::info!(dir = %dir.display(), cgroup = %paths.cgroup.display(), replaced, "eBPF programs attached");
    Ok(Installed { replaced, kernel })
}

/// What is pinned on the node.
#[derive(Debug, PartialEq, Eq)]
pub struct Status {
    /// Cgroup programs whose link is pinned (attached).
    pub attached: Vec<String>,
    pub registered_pods: usize,
}

impl Status {
    /// Every cgroup program is attached.
    pub fn complete(&self) -> bool {
        self.attached.len() == CGROUP_PROGRAMS.len()
    }
}

pub fn status(paths: &Paths) -> Result<Status, EbpfError> {
    let dir = paths.pin_dir();
    if !dir.exists() {
        return Err(EbpfError::NotLoaded { path: dir });
    }
    let attached = CGROUP_PROGRAMS.iter().filter(|p| link_pin(&dir, p).exists()).map(|p| p.to_string()).collect();
    let pods = dir.join(PODS_DIR);
    let registered_pods =
        std::fs::read_dir(&pods).map_err(EbpfError::io("cannot list", &pods))?.filter_map(Result::ok).count();
    Ok(Status { attached, registered_pods })
}

/// Detaches and unpins everything of ours (uninstall, never upgrade): links are
/// detached at once, then every pin removed; maps go once no program holds them.
pub fn uninstall(paths: &Paths) -> Result<(), EbpfError> {
    let dir = paths.pin_dir();
    if !dir.exists() {
        return Ok(());
    }
    let pods = dir.join(PODS_DIR);
    let pod_pins = std::fs::read_dir(&pods).into_iter().flatten().filter_map(Result::ok).map(|e| e.path());
    for pin in CGROUP_PROGRAMS.iter().map(|p| link_pin(&dir, p)).chain(pod_pins) {
        match sys::detach_and_unpin(&pin) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(EbpfError::io("cannot detach and unpin", pin)(e));
            }
            _ => {}
        }
    }
    std::fs::remove_dir_all(&dir).map_err(EbpfError::io("cannot remove", &dir))?;
    tracing::info!(dir = %dir.display(), "eBPF programs detached and unpinned");
    Ok(())
}
