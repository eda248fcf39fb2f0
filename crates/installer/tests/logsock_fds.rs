//! Item 7 (log socket half): out of descriptors, the log socket's accept fails for every
//! queued connection; the loop must back off rather than spin at 100% CPU. Its own test
//! binary: it lowers this process's descriptor limit.

use std::process::{Command, Stdio};
use std::time::Duration;

use installer::logsock::LogSocket;
use testkit::process::{cpu_time, set_open_files_soft_limit};

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

#[test]
fn out_of_descriptors_the_accept_loop_backs_off() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.sock");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let socket = runtime
        .block_on(async {
            LogSocket::start(
                &path,
                std::io::sink(),
                installer::loglevel::RelayLevel::new(ops::loglevel::Level::Trace),
                ops::LogFormat::Text,
            )
        })
        .unwrap();
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
    let previous = set_open_files_soft_limit(open_fds());
    let before = cpu_time();
    runtime.block_on(async { tokio::time::sleep(Duration::from_secs(3)).await });
    let used = cpu_time() - before;
    set_open_files_soft_limit(previous);
    // With descriptors back, the queued connections are served.
    runtime.block_on(async { tokio::time::sleep(Duration::from_secs(3)).await });
    let _ = clients.kill();
    let _ = clients.wait();
    socket.close();
    assert!(used < Duration::from_millis(500), "the accept loop used {used:?} of CPU in 3 s without descriptors");
}
