//! `/healthz`, `/readyz` and `/metrics` over HTTP/1.1 (hyper), for the kubelet's probes
//! and Prometheus. The listener must stay answerable whatever its clients do: each
//! connection has a deadline, the number of connections is capped (the oldest one makes
//! room for a new one, so a flood of idle connections cannot lock the probes out), and
//! accept errors (out of descriptors) are retried with a growing pause, not in a spin.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::Error;

/// What a role reports on the admin endpoints.
pub trait Report: Send + Sync + 'static {
    /// `/readyz`: `Err(why)` answers 503 with `why`.
    fn readiness(&self) -> Result<(), String>;
    /// `/healthz`: `Err(why)` answers 500 with `why`; alive by default, since the
    /// listener answering at all shows the process runs.
    fn liveness(&self) -> Result<(), String> {
        Ok(())
    }
    /// `/metrics`, in the text exposition format ([`crate::render`]).
    fn metrics(&self) -> String;
}

/// A loop shows it is alive by beating; `/healthz` fails once it has not for
/// `stale_after` (a stuck loop gets the container restarted).
#[derive(Debug)]
pub struct Heartbeat {
    start: Instant,
    /// Milliseconds after `start` of the last beat.
    last: AtomicU64,
    stale_after: Duration,
}

impl Heartbeat {
    pub fn new(stale_after: Duration) -> Heartbeat {
        Heartbeat { start: Instant::now(), last: AtomicU64::new(0), stale_after }
    }

    pub fn beat(&self) {
        self.last.store(self.millis(), Ordering::Relaxed);
    }

    /// `Err` once the last beat is older than `stale_after`.
    pub fn check(&self, what: &str) -> Result<(), String> {
        let silent = Duration::from_millis(self.millis().saturating_sub(self.last.load(Ordering::Relaxed)));
        match silent > self.stale_after {
            true => Err(format!("{what} stalled: no heartbeat for {}s", silent.as_secs())),
            false => Ok(()),
        }
    }

    fn millis(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// How the listener protects itself.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// A connection that has not been answered is closed after this long.
    pub connection_deadline: Duration,
    /// At most this many connections at once.
    pub max_connections: usize,
}

impl Default for ServeOptions {
    fn default() -> ServeOptions {
        ServeOptions { connection_deadline: Duration::from_secs(10), max_connections: 512 }
    }
}

/// Binds `port` on `address`, or on every address when `None`: IPv6 and IPv4 where
/// the kernel maps them, IPv4 alone on a node or pod without IPv6.
pub async fn bind(address: Option<IpAddr>, port: u16) -> Result<TcpListener, Error> {
    let listen = |addr: SocketAddr| async move {
        TcpListener::bind(addr).await.map_err(|source| Error::Listen { addr: addr.to_string(), source })
    };
    match address {
        Some(ip) => listen(SocketAddr::new(ip, port)).await,
        None => match listen(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)).await {
            Ok(listener) => Ok(listener),
            Err(_) => listen(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)).await,
        },
    }
}

/// The pause after the `failures`-th accept error in a row: 10ms doubling to 1s.
pub fn accept_backoff(failures: u32) -> Duration {
    Duration::from_millis(10u64 << failures.saturating_sub(1).min(7)).min(Duration::from_secs(1))
}

/// The open connections, oldest first, each with the means to close it.
#[derive(Default)]
struct Connections {
    next_id: u64,
    open: VecDeque<(u64, oneshot::Sender<()>)>,
}

impl Connections {
    /// Registers a new connection; closes the oldest first when `max` are open.
    fn admit(&mut self, max: usize) -> (u64, oneshot::Receiver<()>) {
        while self.open.len() >= max.max(1) {
            if let Some((_, close)) = self.open.pop_front() {
                let _ = close.send(());
            }
        }
        let (close, closed) = oneshot::channel();
        self.next_id += 1;
        self.open.push_back((self.next_id, close));
        (self.next_id, closed)
    }

    fn remove(&mut self, id: u64) {
        if let Some(at) = self.open.iter().position(|(i, _)| *i == id) {
            self.open.remove(at);
        }
    }
}

/// Serves the endpoints until the task is dropped.
pub async fn serve(listener: TcpListener, report: Arc<dyn Report>, options: ServeOptions) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /healthz, /readyz, /metrics");
    }
    let connections = Arc::new(Mutex::new(Connections::default()));
    let mut failures = 0u32;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => {
                failures = 0;
                conn
            }
            Err(error) => {
                // EMFILE, ENFILE, ENOBUFS...: retrying at once would spin; the pending
                // connection stays in the backlog meanwhile.
                failures = failures.saturating_add(1);
                let pause = accept_backoff(failures);
                match failures {
                    1 => warn!(%error, "accepting a connection failed; retrying with a pause"),
                    _ => debug!(%error, ?pause, failures, "accept failed again"),
                }
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let (id, closed) = lock(&connections).admit(options.max_connections);
        let (report, connections) = (report.clone(), connections.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = respond(req.method(), req.uri().path(), &*report);
                async move { Ok::<_, Infallible>(response) }
            });
            // One request per connection: probes and scrapes come seconds apart, and a
            // connection closed after its answer frees its slot at once.
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                result = tokio::time::timeout(options.connection_deadline, conn) => match result {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => debug!(%peer, %error, "connection failed"),
                    Err(_) => debug!(%peer, "connection closed after {:?}", options.connection_deadline),
                },
                _ = closed => debug!(%peer, "connection closed to make room for a newer one"),
            }
            lock(&connections).remove(id);
        });
    }
}

fn lock(connections: &Mutex<Connections>) -> std::sync::MutexGuard<'_, Connections> {
    connections.lock().unwrap_or_else(|e| e.into_inner())
}

const TEXT: &str = "text/plain; charset=utf-8";
const METRICS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The answer to one request: status, content type, body.
pub fn answer(method: &Method, path: &str, report: &dyn Report) -> (StatusCode, &'static str, String) {
    if method != Method::GET && method != Method::HEAD {
        return (StatusCode::METHOD_NOT_ALLOWED, TEXT, "only GET\n".into());
    }
    let probe = |result: Result<(), String>, ok: &str, failed: StatusCode| match result {
        Ok(()) => (StatusCode::OK, TEXT, format!("{ok}\n")),
        Err(why) => (failed, TEXT, format!("{why}\n")),
    };
    match path {
        "/healthz" => probe(report.liveness(), "ok", StatusCode::INTERNAL_SERVER_ERROR),
        "/readyz" => probe(report.readiness(), "ready", StatusCode::SERVICE_UNAVAILABLE),
        "/metrics" => (StatusCode::OK, METRICS, report.metrics()),
        _ => (StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
    }
}

fn respond(method: &Method, path: &str, report: &dyn Report) -> Response<Full<Bytes>> {
    let (code, content_type, body) = answer(method, path, report);
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Result<(), String>);

    impl Report for Fixed {
        fn readiness(&self) -> Result<(), String> {
            self.0.clone()
        }
        fn metrics(&self) -> String {
            "x_total 1\n".into()
        }
    }

    #[test]
    fn paths_and_methods() {
        let ready = Fixed(Ok(()));
        let waiting = Fixed(Err("waiting for the conflist".into()));
        assert_eq!(answer(&Method::GET, "/readyz", &ready).0, StatusCode::OK);
        let (code, _, body) = answer(&Method::GET, "/readyz", &waiting);
        assert_eq!((code, body.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "waiting for the conflist\n"));
        assert_eq!(answer(&Method::GET, "/healthz", &waiting).2, "ok\n");
        assert_eq!(answer(&Method::GET, "/metrics", &waiting).2, "x_total 1\n");
        assert_eq!(answer(&Method::GET, "/nope", &ready).0, StatusCode::NOT_FOUND);
        assert_eq!(answer(&Method::POST, "/healthz", &ready).0, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[test]
    fn heartbeat_goes_stale() {
        let beat = Heartbeat::new(Duration::from_millis(20));
        beat.beat();
        assert!(beat.check("loop").is_ok());
        std::thread::sleep(Duration::from_millis(40));
        assert!(beat.check("loop").unwrap_err().contains("loop stalled"));
        beat.beat();
        assert!(beat.check("loop").is_ok());
    }

    #[test]
    fn accept_backoff_grows_to_a_second() {
        let pauses: Vec<u64> = [1, 2, 3, 7, 8, 9, 50].map(|n| accept_backoff(n).as_millis() as u64).to_vec();
        assert_eq!(pauses, [10, 20, 40, 640, 1000, 1000, 1000]);
    }

    #[test]
    fn the_oldest_connection_makes_room() {
        let mut open = Connections::default();
        let (first, mut first_closed) = open.admit(2);
        let (_, mut second_closed) = open.admit(2);
        assert!(first_closed.try_recv().is_err() && second_closed.try_recv().is_err());
        open.admit(2);
        assert_eq!(first_closed.try_recv(), Ok(()));
        assert!(second_closed.try_recv().is_err());
        open.remove(first);
        assert_eq!(open.open.len(), 2);
    }
}
