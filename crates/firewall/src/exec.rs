//! Running an iptables tool: bounded in time, with its user lookups kept local.
//!
//! The owner match makes iptables call getpwnam() on the UID text, which goes through
//! the node's nsswitch.conf: with LDAP, SSSD or systemd-userdb configured, that can
//! stall. The tool therefore runs in a private mount namespace whose
//! /etc/nsswitch.conf is a memory file saying `files`, so a lookup only reads
//! /etc/passwd. The host's mounts are never changed.

use std::ffi::CString;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

use crate::FirewallError;

const NSSWITCH: &str = "passwd: files\ngroup: files\nhosts: files\n";

/// The memory file holding our nsswitch.conf, created once per process.
fn nsswitch_memfd() -> Option<&'static OwnedFd> {
    static FD: OnceLock<Option<OwnedFd>> = OnceLock::new();
    FD.get_or_init(|| {
        // SAFETY: memfd_create with a static name; the result is checked before use.
        let fd = unsafe { libc::memfd_create(c"kong-mesh-cni-nsswitch".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            tracing::warn!(error = %io::Error::last_os_error(), "cannot create a memfd: iptables user lookups use the node's nsswitch.conf");
            return None;
        }
        // SAFETY: fd is fresh and owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut file = std::fs::File::from(fd.try_clone().ok()?);
        file.write_all(NSSWITCH.as_bytes()).ok()?;
        Some(fd)
    })
    .as_ref()
}

/// Makes the child see our nsswitch.conf. Prepared before the fork, because the
/// closure that runs between fork and exec must not allocate.
fn isolate_user_lookups(cmd: &mut Command) {
    let Some(fd) = nsswitch_memfd() else { return };
    if !Path::new("/etc/nsswitch.conf").exists() {
        return; // glibc's built-in default is already "files"
    }
    let source = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL");
    // SAFETY: only async-signal-safe syscalls run in the child, on data prepared here.
    // A failure leaves the child with the host's nsswitch.conf, which still works.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == 0
            {
                libc::mount(
                    source.as_ptr(),
                    c"/etc/nsswitch.conf".as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                );
            }
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
