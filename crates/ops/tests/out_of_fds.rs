//! The admin listener when the process is out of file descriptors (EMFILE on accept):
//! it pauses instead of spinning, and serves the waiting connection once descriptors
//! are free again. Alone in its test binary: it lowers this process's descriptor limit.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use testkit::process::{cpu_time, set_open_files_soft_limit};

struct Alive;

impl ops::Report for Alive {
    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }
    fn metrics(&self) -> String {
        String::new()
    }
}

fn request(stream: &mut TcpStream, path: &str) -> String {
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn accept_errors_pause_and_the_waiting_connection_is_served_after() {
    let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let listener = ops::bind(Some([127, 0, 0, 1].into()), 0).await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            ops::serve(listener, Arc::new(Alive), ops::ServeOptions::default()).await;
        });
    });
    let addr = rx.recv().unwrap();
    let open = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    set_open_files_soft_limit(open + 64);
    // Use up every descriptor but one, which the client's socket takes: the listener
    // then has none for accepting it.
    let mut fillers = Vec::new();
    while let Ok(f) = File::open("/dev/null") {
        fillers.push(f);
    }
    drop(fillers.pop());
    let mut waiting = TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_time();
    std::thread::sleep(Duration::from_secs(1));
    let cpu = cpu_time() - before;
    drop(fillers);
    set_open_files_soft_limit(open + 4096);
    assert!(cpu < Duration::from_millis(100), "{cpu:?} of CPU in one second of failing accepts");
    let answer = request(&mut waiting, "/healthz");
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok\n"), "{answer}");
}
