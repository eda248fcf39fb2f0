//! The plugin log socket against hostile or unlucky peers: a real socket, real
//! clients (root and, through setpriv, an unprivileged user), a real pipe for stderr.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use installer::logsock::LogSocket;

fn pipe() -> (std::fs::File, std::fs::File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fresh descriptors, owned from here on.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are not owned elsewhere.
    unsafe { (OwnedFd::from_raw_fd(fds[0]).into(), OwnedFd::from_raw_fd(fds[1]).into()) }
}

/// Items 10 and 11: stderr nobody reads must not stop the loop (lines are dropped and
/// counted); the socket is root-only whatever the umask; control characters are shown,
/// not passed on; each line names the writer's pid.
#[test]
fn a_stalled_stderr_never_blocks_and_lines_are_clean_and_attributed() {
    let dir = tempfile::tempdir().unwrap();
    // Anyone may reach the socket: only its own mode keeps others out.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("log.sock");
    let (mut read_end, write_end) = pipe();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // SAFETY: umask has no preconditions; restored right after the bind.
    let old = unsafe { libc::umask(0) };
    let socket = runtime
        .block_on(async {
            LogSocket::start(
                &path,
                write_end,
                installer::loglevel::RelayLevel::new(ops::loglevel::Level::Trace),
                ops::LogFormat::Text,
            )
        })
        .unwrap();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "not the umask's 0777");

    // An unprivileged user cannot connect.
    if testkit::net::require_root() {
        let script = format!("import socket; socket.socket(socket.AF_UNIX).connect({:?})", path.to_str().unwrap());
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", &script])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("PermissionError"), "{stderr}");
    }

    // 400 KB of lines while nobody reads the pipe (64 KiB): the loop keeps ticking.
    let writer_path = path.clone();
    let client = std::thread::spawn(move || {
        let mut c = UnixStream::connect(&writer_path).unwrap();
        c.write_all(b"evil \x1b[2J\x1b[31mred\rfake\n").unwrap();
        let line = format!("{}\n", "x".repeat(200));
        for _ in 0..2000 {
            c.write_all(line.as_bytes()).unwrap();
        }
    });
    let ticks = runtime.block_on(async {
        let mut ticks = 0;
        let mut interval = tokio::time::interval(Duration::from_millis(10));
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end {
            interval.tick().await;
            ticks += 1;
        }
        ticks
    });
    assert!(ticks > 100, "the loop stalled: {ticks} ticks of 10 ms in 2 s");
    client.join().unwrap();

    // Now someone reads: the first line is clean and attributed, and the drop is told.
    std::thread::spawn(move || {
        runtime.block_on(async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            socket.close();
        })
    });
    let mut c = UnixStream::connect(&path).unwrap();
    c.write_all(b"after\n").unwrap();
    drop(c);
    let mut text = Vec::new();
    let mut buf = [0u8; 65536];
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end && !String::from_utf8_lossy(&text).contains("dropped") {
        let n = read_end.read(&mut buf).unwrap();
        text.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&text);
    let first = text.lines().next().unwrap();
    let pid = std::process::id();
    assert_eq!(first, format!("[plugin pid={pid} uid=0] evil \\x1b[2J\\x1b[31mred\\x0dfake"));
    assert!(
        text.contains("plugin log lines dropped: stderr was not read"),
        "{}",
        &text[text.len().saturating_sub(300)..]
    );
}
