//! Running an iptables tool: bounded in time, with its user lookups kept local.
//!
//! The owner match makes iptables call getpwnam() on the UID text, which goes through
//! the node's nsswitch.conf: with LDAP, SSSD or NIS configured, that can stall. On such
//! a node the tools run in a private mount namespace whose /etc/nsswitch.conf says
//! `files`, so a lookup only reads /etc/passwd. The namespace is made once per process
//! and each tool joins it; the host's mounts are never changed. Where the node's own
//! sources are local already (`files`, and `systemd`, which refuses a numeric name
//! without asking anyone) the namespace is skipped: it costs about a millisecond per
//! ADD.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::Duration;

use crate::FirewallError;

const NSSWITCH: &[u8] = b"passwd: files\ngroup: files\nhosts: files\n";

/// The private mount namespace, or `None` when it cannot be made (then the tools use
/// the node's nsswitch.conf, which still works, only without the guarantee).
fn lookup_namespace() -> Option<&'static OwnedFd> {
    static NS: OnceLock<Option<OwnedFd>> = OnceLock::new();
    NS.get_or_init(|| {
        let local = match std::fs::read_to_string("/etc/nsswitch.conf") {
            Ok(text) => lookups_stay_local(&text),
            // No file: glibc's built-in default, "files". Unreadable: isolate, to be safe.
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        };
        if local {
            return None;
        }
        make_lookup_namespace()
            .inspect_err(|e| tracing::warn!(error = %e, "cannot isolate iptables' user lookups; they use the node's nsswitch.conf"))
            .ok()
    })
    .as_ref()
}

/// Whether a lookup of a numeric user or group name stays on this machine under this
/// nsswitch.conf: every source of `passwd` and `group` is `files` or `systemd` (a
/// database without a line gets glibc's default, `files`).
fn lookups_stay_local(nsswitch: &str) -> bool {
    let lines = nsswitch.lines().filter_map(|l| l.split('#').next());
    let sources = lines.filter_map(|l| {
        let (db, sources) = l.split_once(':')?;
        ["passwd", "group"].contains(&db.trim()).then_some(sources)
    });
    sources.into_iter().all(|list| {
        // Action items such as [NOTFOUND=return] are not sources.
        let mut in_action = false;
        let names: String = list
            .chars()
            .map(|c| {
                match c {
                    '[' => in_action = true,
                    ']' => in_action = false,
                    _ => {}
                }
                if in_action || c == ']' { ' ' } else { c }
            })
            .collect();
        names.split_whitespace().all(|source| matches!(source, "files" | "systemd"))
    })
}

/// Sets the namespace up in the calling process's mount namespace (the forked helper
/// of [`make_lookup_namespace`] is the caller): a private copy of the mounts, our
/// nsswitch.conf written on a tmpfs briefly mounted over /tmp (files of internal
/// mounts such as memfds cannot be bind-mounted), bound over /etc/nsswitch.conf, and
/// the tmpfs detached again. Only syscalls on static data: it runs after a fork.
unsafe fn set_up_lookup_namespace() -> bool {
    let none = std::ptr::null();
    // SAFETY: plain syscalls on static, NUL-terminated data.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0
            || libc::mount(c"none".as_ptr(), c"/".as_ptr(), none, libc::MS_REC | libc::MS_PRIVATE, none.cast()) != 0
            || libc::mount(c"tmpfs".as_ptr(), c"/tmp".as_ptr(), c"tmpfs".as_ptr(), 0, c"size=64k".as_ptr().cast()) != 0
        {
            return false;
        }
        let file = c"/tmp/nsswitch.conf";
        let fd = libc::open(file.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
        let mut bound = false;
        if fd >= 0 {
            let written = libc::write(fd, NSSWITCH.as_ptr().cast(), NSSWITCH.len());
            libc::close(fd);
            bound = written == NSSWITCH.len() as isize
                && libc::mount(file.as_ptr(), c"/etc/nsswitch.conf".as_ptr(), none, libc::MS_BIND, none.cast()) == 0;
        }
        libc::umount2(c"/tmp".as_ptr(), libc::MNT_DETACH);
        bound
    }
}

/// Forks a helper that sets the namespace up and waits; keeps a handle on its
/// namespace (which outlives the helper), then lets it exit.
fn make_lookup_namespace() -> io::Result<OwnedFd> {
    let pipe = || -> io::Result<(OwnedFd, OwnedFd)> {
        let mut fds = [0; 2];
        // SAFETY: fds is valid for two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both are fresh descriptors owned by nothing else.
        Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
    };
    let (ready_r, ready_w) = pipe()?;
    let (hold_r, hold_w) = pipe()?;
    // SAFETY: the child runs only syscalls and _exit (no allocation, no locks).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: in the single-threaded child; see set_up_lookup_namespace. The child
        // closes its copies of the parent's ends, or it would wait on itself.
        unsafe {
            libc::close(ready_r.as_raw_fd());
            libc::close(hold_w.as_raw_fd());
            if set_up_lookup_namespace() {
                libc::write(ready_w.as_raw_fd(), b"1".as_ptr().cast(), 1);
                let mut byte = 0u8;
                libc::read(hold_r.as_raw_fd(), (&mut byte as *mut u8).cast(), 1);
            }
            libc::_exit(0);
        }
    }
    drop(ready_w);
    drop(hold_r);
    let ns = wait_ready(ready_r).and_then(|()| std::fs::File::open(format!("/proc/{pid}/ns/mnt")).map(OwnedFd::from));
    drop(hold_w); // the helper's read returns: it exits
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    ns
}

/// One byte means the helper is ready; end of file means it failed.
fn wait_ready(ready: OwnedFd) -> io::Result<()> {
    let mut byte = [0u8; 1];
    match io::Read::read(&mut std::fs::File::from(ready), &mut byte)? {
        1 => Ok(()),
        _ => Err(io::Error::other("the mount namespace could not be set up (is CAP_SYS_ADMIN missing?)")),
    }
}

/// Makes the child join the lookup namespace before it executes the tool.
fn isolate_user_lookups(cmd: &mut Command) {
    let Some(ns) = lookup_namespace() else { return };
    let fd = ns.as_raw_fd();
    // SAFETY: setns is a plain syscall; a failure leaves the child in the node's
    // namespace, which still works.
    unsafe {
        cmd.pre_exec(move || {
            libc::setns(fd, libc::CLONE_NEWNS);
            Ok(())
        });
    }
}

/// Runs `cmd` with `input` on stdin; kills it after `timeout`. A non-zero exit is an
/// error carrying the tool's stderr.
pub fn run(mut cmd: Command, input: &str, timeout: Duration) -> Result<Output, FirewallError> {
    let tool = format!("{} {}", cmd.get_program().to_string_lossy(), args_text(&cmd));
    isolate_user_lookups(&mut cmd);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| FirewallError::Spawn { tool: tool.clone(), source })?;
    let handle = ProcessHandle::new(child.id());
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let (tx, rx) = mpsc::channel();
    let input = input.to_owned();
    std::thread::Builder::new()
        .name("iptables-io".into())
        .spawn(move || {
            // A tool that exits early closes its end: that shows in its status, not here.
            let _ = stdin.write_all(input.as_bytes());
            drop(stdin);
            let _ = tx.send(child.wait_with_output());
        })
        .map_err(|source| FirewallError::Spawn { tool: tool.clone(), source })?;
    let output = match rx.recv_timeout(timeout) {
        Ok(result) => result.map_err(|source| FirewallError::Spawn { tool: tool.clone(), source })?,
        Err(_) => {
            handle.kill();
            let _ = rx.recv();
            return Err(FirewallError::Timeout { tool, after: timeout });
        }
    };
    if !output.status.success() {
        return Err(FirewallError::Failed {
            tool,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output)
}

/// A pidfd on the child, so that killing it on timeout cannot hit a recycled pid.
struct ProcessHandle(Option<OwnedFd>);

impl ProcessHandle {
    fn new(pid: u32) -> Self {
        // SAFETY: pidfd_open takes a pid and flags; the result is checked.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        // SAFETY: a non-negative result is a fresh descriptor owned by nothing else.
        ProcessHandle((fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    fn kill(&self) {
        if let Some(fd) = &self.0 {
            // SAFETY: signals the process the pidfd refers to; fails harmlessly if reaped.
            unsafe { libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), libc::SIGKILL, 0, 0) };
        }
    }
}

fn args_text(cmd: &Command) -> String {
    cmd.get_args().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::lookups_stay_local;

    #[test]
    fn only_files_and_systemd_count_as_local() {
        let debian = "# /etc/nsswitch.conf\n\npasswd:         files systemd\ngroup:          files systemd\nshadow: files\nhosts: files dns\nnetgroup: nis\n";
        assert!(lookups_stay_local(debian));
        assert!(lookups_stay_local("passwd: files\ngroup: files [NOTFOUND=return]\n"));
        assert!(lookups_stay_local("hosts: files dns\n"), "no passwd or group line: glibc's default, files");
        assert!(lookups_stay_local(""));
        for remote in [
            "passwd: files sss\ngroup: files\n",
            "passwd: files\ngroup: files ldap\n",
            "passwd: compat\ngroup: compat\n",
            "passwd:files [ SUCCESS=return ] nis\n",
            "passwd: files\npasswd: winbind\n",
        ] {
            assert!(!lookups_stay_local(remote), "{remote:?}");
        }
        assert!(lookups_stay_local("passwd: files # sss is off\ngroup: files\n"), "a comment is no source");
    }
}
