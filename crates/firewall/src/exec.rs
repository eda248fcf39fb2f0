//! Running an iptables tool: bounded in time, with its user lookups kept local.
//!
//! The owner match makes iptables call getpwnam() on the UID text, which goes through
//! the node's nsswitch.conf: with LDAP, SSSD or systemd-userdb configured, that can
//! stall. The tool therefore runs in a private mount namespace whose
//! /etc/nsswitch.conf says `files`, so a lookup only reads /etc/passwd. The host's
//! mounts are never changed.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::FirewallError;

const NSSWITCH: &[u8] = b"passwd: files\ngroup: files\nhosts: files\n";

/// Makes the child see our nsswitch.conf. Runs between fork and exec, so it uses only
/// syscalls on static data (no allocation). The file is written on a tmpfs briefly
/// mounted over /tmp (files on internal mounts such as memfds cannot be bind-mounted),
/// bind-mounted over /etc/nsswitch.conf, and the tmpfs is detached again. Any failure
/// leaves the child with the node's nsswitch.conf, which still works.
fn isolate_user_lookups(cmd: &mut Command) {
    if !Path::new("/etc/nsswitch.conf").exists() {
        return; // glibc's built-in default is already "files"
    }
    // SAFETY: only async-signal-safe syscalls on static data run in the child.
    unsafe {
        cmd.pre_exec(|| {
            let none = std::ptr::null();
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(c"none".as_ptr(), c"/".as_ptr(), none, libc::MS_REC | libc::MS_PRIVATE, none.cast()) != 0
                || libc::mount(c"tmpfs".as_ptr(), c"/tmp".as_ptr(), c"tmpfs".as_ptr(), 0, c"size=64k".as_ptr().cast()) != 0
            {
                return Ok(());
            }
            let file = c"/tmp/nsswitch.conf";
            let fd = libc::open(file.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
            if fd >= 0 {
                let written = libc::write(fd, NSSWITCH.as_ptr().cast(), NSSWITCH.len());
                libc::close(fd);
                if written == NSSWITCH.len() as isize {
                    libc::mount(file.as_ptr(), c"/etc/nsswitch.conf".as_ptr(), none, libc::MS_BIND, none.cast());
                }
            }
            libc::umount2(c"/tmp".as_ptr(), libc::MNT_DETACH);
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
