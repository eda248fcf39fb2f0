//! Network namespaces, entered only through [`NetNs::run`].
//!
//! A namespace switch belongs to the calling thread, and children spawned from that
//! thread inherit it. So work for a pod runs on a fresh thread that enters the pod's
//! namespace, runs the closure and ends: no thread ever returns to a pool, or to the
//! caller, in a foreign namespace, whatever the closure does (including `?`).

pub mod hostfile;

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is not a network namespace")]
    NotNetwork { path: PathBuf },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter { path: PathBuf, source: io::Error },
    #[error("cannot start a thread for network namespace {path}: {source}")]
    Thread { path: PathBuf, source: io::Error },
}

/// An open handle on a network namespace: it stays valid (and the namespace alive)
/// while held, even if its path is unmounted meanwhile.
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

/// `NS_GET_NSTYPE` from linux/nsfs.h: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

impl NetNs {
    /// Opens the namespace at `path` (a bind mount such as /var/run/netns/NAME, or
    /// /proc/PID/ns/net) and checks that it is a network namespace.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NetNsError> {
        let path = path.as_ref().to_path_buf();
        // Non-blocking: the path comes from the runtime, and a FIFO there must not hang us.
        let file = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&path)
            .map_err(|source| NetNsError::Open { path: path.clone(), source })?;
        // SAFETY: the ioctl takes no argument and only reads the descriptor's namespace type.
        let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
        if kind != libc::CLONE_NEWNET {
            return Err(NetNsError::NotNetwork { path });
        }
        Ok(NetNs { file, path })
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Self, NetNsError> {
        Self::open("/proc/thread-self/ns/net")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace's inode number: equal for two handles on the same namespace.
    pub fn inode(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.ino())
    }

    /// Runs `work` on a new thread inside this namespace and returns its result. The
    /// thread ends with `work`; a panic in `work` is propagated to the caller.
    pub fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T, NetNsError> {
        let mut results = self.run_each(vec![work])?;
        Ok(results.pop().expect("one result per work"))
    }

    /// Runs each of `works` at the same time, each on a new thread of its own inside
    /// this namespace, and returns their results in order: one thread per work, where
    /// [`NetNs::run`] inside threads of the caller's would start two.
    pub fn run_each<T: Send, F: FnOnce() -> T + Send>(&self, works: Vec<F>) -> Result<Vec<T>, NetNsError> {
        std::thread::scope(|scope| {
            let mut handles = Vec::with_capacity(works.len());
            for work in works {
                let handle = std::thread::Builder::new()
                    .name("netns".into())
                    .spawn_scoped(scope, || {
                        // SAFETY: setns with a namespace fd affects only this thread,
                        // which exits when `work` returns.
                        if unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                            return Err(NetNsError::Enter {
                                path: self.path.clone(),
                                source: io::Error::last_os_error(),
                            });
                        }
                        Ok(work())
                    })
                    .map_err(|source| NetNsError::Thread { path: self.path.clone(), source })?;
                handles.push(handle);
            }
            handles.into_iter().map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
        })
    }
}

/// The namespace's descriptor, for calls that take a namespace by fd (a BPF link).
impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Whether IPv6 is enabled in the calling thread's network namespace (`/proc/sys/net`
/// shows the namespace of the thread that opens it). This, not the addresses present,
/// says whether the namespace can carry IPv6: its link-local address appears only once
/// an interface is up, which may be after the CNI ADD. Absent (IPv6 off at boot): false.
pub fn ipv6_enabled() -> bool {
    hostfile::read_regular_text(Path::new("/proc/sys/net/ipv6/conf/all/disable_ipv6"), 16)
        .is_ok_and(|v| v.trim() == "0")
}
