//! The admin listener under a flood of idle connections and out of file descriptors:
//! it stays idle (no spinning) and `/healthz` keeps answering.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use testkit::process::cpu_time;

struct Alive;

impl ops::Report for Alive {
    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }
    fn metrics(&self) -> String {
        String::new()
    }
}

/// Starts the listener on a loopback port of its own, on its own runtime thread.
fn start(options: ops::ServeOptions) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let listener = ops::bind(Some([127, 0, 0, 1].into()), 0).await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            ops::serve(listener, Arc::new(Alive), options).await;
        });
    });
    rx.recv().unwrap()
}

fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// CPU this process spends over one second in which the test itself does nothing.
fn idle_cpu() -> Duration {
    let before = cpu_time();
    std::thread::sleep(Duration::from_secs(1));
    cpu_time() - before
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn two_thousand_idle_connections_neither_spin_nor_lock_the_probes_out() {
    ops::raise_fd_limit().unwrap();
    let options = ops::ServeOptions { connection_deadline: Duration::from_secs(30), max_connections: 256 };
    let addr = start(options);
    let fds_before = open_fds();
    let idle: Vec<TcpStream> = (0..2000).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // The listener accepted them all (oldest closed to stay at the cap).
    std::thread::sleep(Duration::from_millis(500));
    let cpu = idle_cpu();
    assert!(cpu < Duration::from_millis(100), "{cpu:?} of CPU in one idle second with 2000 idle connections");
    let started = Instant::now();
    let answer = get(addr, "/healthz").unwrap();
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok\n"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(1), "/healthz took {:?}", started.elapsed());
    // Ours: the 2000 client sockets; the listener's: at most the cap.
    let held = open_fds() - fds_before - idle.len();
    assert!(held <= options.max_connections + 8, "the listener holds {held} descriptors");
    drop(idle);
}

#[test]
fn each_answer_closes_its_connection() {
    let addr = start(ops::ServeOptions::default());
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // No `Connection: close` asked for: the answer ends the connection anyway.
    write!(stream, "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let started = Instant::now();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.ends_with("ready\n") && started.elapsed() < Duration::from_secs(1), "{answer}");
}

#[test]
fn connections_past_the_deadline_are_closed() {
    let addr = start(ops::ServeOptions { connection_deadline: Duration::from_millis(200), max_connections: 16 });
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    // Nothing sent: the server closes at the deadline (read returns 0).
    assert_eq!(stream.read(&mut [0u8; 16]).unwrap(), 0);
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert!(get(addr, "/readyz").unwrap().ends_with("ready\n"));
}
