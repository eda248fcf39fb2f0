//! The bpf(2) commands aya does not offer for every program type we use, or offers
//! only after probing the kernel's features (a dozen loads, in every plugin process):
//! BPF_LINK_CREATE on a cgroup or namespace, a netns link's info, BPF_LINK_UPDATE (the atomic program swap of an
//! attached link), BPF_LINK_DETACH and BPF_OBJ_PIN/BPF_OBJ_GET of a link; and the
//! probes for what aya 0.14 does not probe (a program of a given attach type, links).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `enum bpf_attach_type` values of linux/bpf.h: how each program of bpf/redirect.c
/// is loaded and attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachType {
    SockOps = 3,
    Inet4Connect = 10,
    Inet6Connect = 11,
    Udp4Sendmsg = 14,
    Udp6Sendmsg = 15,
    Udp4Recvmsg = 19,
    Udp6Recvmsg = 20,
    Getsockopt = 21,
    SkLookup = 36,
}

impl AttachType {
    /// Its `enum bpf_prog_type` value.
    fn prog_type(self) -> u32 {
        match self {
            AttachType::SockOps => 13,
            AttachType::Getsockopt => 25,
            AttachType::SkLookup => 30,
            _ => 18, // BPF_PROG_TYPE_CGROUP_SOCK_ADDR
        }
    }
}

/// `union bpf_attr`, as words: every command we use fits in its first 32 bytes, and the
/// kernel wants the rest zero.
type Attr = [u32; 38];

/// `attr` is mutable: some commands write back into it (the info length).
fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, fully initialised bpf_attr of the size we pass.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of::<Attr>()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this new descriptor to us.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Attaches `prog` to `target` (a cgroup, or a network namespace for sk_lookup) with a
/// BPF link (multi-attach by nature).
pub fn link_create(prog: BorrowedFd<'_>, target: BorrowedFd<'_>, attach: AttachType) -> io::Result<OwnedFd> {
    link_create_raw(prog, target.as_raw_fd() as u32, attach)
}

fn link_create_raw(prog: BorrowedFd<'_>, target: u32, attach: AttachType) -> io::Result<OwnedFd> {
    let mut attr: Attr = [0; 38];
    attr[0] = prog.as_raw_fd() as u32;
    attr[1] = target;
    attr[2] = attach as u32;
    bpf(BPF_LINK_CREATE, &mut attr).map(owned)
}

/// A descriptor number no process can hold: probes pass it where the kernel looks a
/// descriptor up only once it knows the operation.
const INVALID_FD: u32 = u32::MAX;

/// Loads `r0 = 1; exit` as a program of `attach`'s type and attach type: a value every
/// one of our hooks accepts, though the probes never attach it.
pub fn load_trivial(attach: AttachType) -> io::Result<OwnedFd> {
    // mov64 r0, 1 (BPF_ALU64 | BPF_MOV | BPF_K); exit (BPF_JMP | BPF_EXIT)
    let insns: [u64; 2] = [0xb7 | (1 << 32), 0x95];
    let license = c"GPL";
    let mut attr: Attr = [0; 38];
    attr[0] = attach.prog_type();
    attr[1] = insns.len() as u32;
    let ptr = insns.as_ptr() as u64;
    (attr[2], attr[3]) = (ptr as u32, (ptr >> 32) as u32);
    let ptr = license.as_ptr() as u64;
    (attr[4], attr[5]) = (ptr as u32, (ptr >> 32) as u32);
    attr[17] = attach as u32; // expected_attach_type
    bpf(BPF_PROG_LOAD, &mut attr).map(owned)
}

/// BPF_LINK_CREATE of `prog` to a descriptor that is never valid: EBADF when the kernel
/// can link this attach type, EINVAL when it cannot.
pub fn link_create_invalid_target(prog: &OwnedFd, attach: AttachType) -> io::Result<OwnedFd> {
    link_create_raw(prog.as_fd(), INVALID_FD, attach)
}

/// BPF_LINK_UPDATE (or BPF_LINK_DETACH) of a link descriptor that is never valid: EBADF
/// when the kernel knows the command, EINVAL when it does not.
pub fn link_command_invalid_link(update: bool) -> io::Result<()> {
    let mut attr: Attr = [0; 38];
    attr[0] = INVALID_FD; // link_fd
    if update {
        attr[1] = INVALID_FD; // new_prog_fd; BPF_LINK_DETACH wants every field after link_fd zero
    }
    bpf(if update { BPF_LINK_UPDATE } else { BPF_LINK_DETACH }, &mut attr).map(drop)
}

/// Swaps the program of an attached link in one step: no moment without either.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr: Attr = [0; 38];
    attr[0] = link.as_raw_fd() as u32;
    attr[1] = prog.as_raw_fd() as u32;
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    let mut attr: Attr = [0; 38];
    let ptr = path.as_ptr() as u64;
    attr[0] = ptr as u32;
    attr[1] = (ptr >> 32) as u32;
    attr[2] = fd.as_raw_fd() as u32;
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr: Attr = [0; 38];
    let ptr = path.as_ptr() as u64;
    attr[0] = ptr as u32;
    attr[1] = (ptr >> 32) as u32;
    bpf(BPF_OBJ_GET, &mut attr).map(owned)
}

/// Detaches a link at once. Dropping its last pin detaches it too, but later, from a
/// kernel work queue; uninstall and unregister must be done when they return.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr: Attr = [0; 38];
    attr[0] = link.as_raw_fd() as u32;
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// `BPF_LINK_TYPE_NETNS` of linux/bpf.h: the kind of link sk_lookup attaches with.
const LINK_TYPE_NETNS: u32 = 5;

/// The inode of the network namespace a netns link is attached to: 0 once that
/// namespace is gone (the kernel detaches its links then); `None` for another kind.
pub fn netns_link_ino(link: BorrowedFd<'_>) -> io::Result<Option<u32>> {
    // struct bpf_link_info: type, id, prog_id, then the union (8-byte aligned) whose
    // netns member starts with netns_ino.
    let mut info = [0u32; 8];
    let mut attr: Attr = [0; 38];
    attr[0] = link.as_raw_fd() as u32;
    attr[1] = size_of_val(&info) as u32;
    let ptr = info.as_mut_ptr() as u64;
    attr[2] = ptr as u32;
    attr[3] = (ptr >> 32) as u32;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok((info[0] == LINK_TYPE_NETNS).then_some(info[4]))
}

/// `SO_NETNS_COOKIE` from asm-generic/socket.h (kernel 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The network namespace cookie of `sock`, a socket of that namespace.
fn netns_cookie_of(sock: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The cookie of this thread's network namespace, through a socket that needs no
/// address (a Unix one): ENOPROTOOPT where the kernel lacks SO_NETNS_COOKIE.
pub fn netns_cookie_of_new_socket() -> io::Result<u64> {
    let (sock, _) = std::os::unix::net::UnixDatagram::pair()?;
    netns_cookie_of(sock.as_fd())
}

/// Detaches the link pinned at `pin` and removes the pin.
pub fn detach_and_unpin(pin: &Path) -> io::Result<()> {
    link_detach(obj_get(pin)?.as_fd())?;
    std::fs::remove_file(pin)
}
