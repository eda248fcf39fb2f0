//! Item 7 (log socket half): out of descriptors, the log socket's accept fails for every
//! queued connection; the loop must back off rather than spin at 100% CPU. Its own test
//! binary: it lowers this process's descriptor limit.

use std::process::{Command, Stdio};
use std::time::Duration;

use installer::logsock::LogSocket;

fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

#[test]
fn out_of_descriptors_the_accept_loop_backs_off() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.sock");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let socket = runtime.block_on(async { LogSocket::start(&path, std::io::sink()) }).unwrap();
    // 50 clients that connect and stay (a flood, or plugins of a pod burst).
    let script = format!(
        "import socket, time\nc = []\nfor _ in range(50):\n  s = socket.socket(socket.AF_UNIX); s.connect({:?}); c.append(s)\nprint('up', flush=True)\ntime.sleep(6)\n",
        path.to_str().unwrap()
    );
    let mut clients = Command::new("/usr/bin/python3").args(["-c", &script]).stdout(Stdio::piped()).spawn().unwrap();
    let mut up = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(clients.stdout.take().unwrap()), &mut up).unwrap();
    assert_eq!(up.trim(), "up");
    // No descriptor left for an accepted connection.
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the struct given.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
    let lowered = libc::rlimit { rlim_cur: open_fds(), rlim_max: limit.rlim_max };
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
    let before = cpu_time();
    runtime.block_on(async { tokio::time::sleep(Duration::from_secs(3)).await });
    let used = cpu_time() - before;
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    // With descriptors back, the queued connections are served.
    runtime.block_on(async { tokio::time::sleep(Duration::from_secs(3)).await });
    let _ = clients.kill();
    let _ = clients.wait();
    socket.close();
    assert!(used < Duration::from_millis(500), "the accept loop used {used:?} of CPU in 3 s without descriptors");
}
