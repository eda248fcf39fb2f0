//! What the installer reports about itself: readiness (also as the ready file), and
//! `/healthz`, `/readyz`, `/metrics` over a minimal HTTP/1.1 listener. Each connection
//! is bounded in time; a slow or silent client is dropped.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The install state, one of these at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Starting,
    /// The primary CNI's configuration is not there yet.
    Waiting,
    /// The configuration the runtime uses cannot be chained into (invalid, foreign).
    Refused,
    /// The binary or the kubeconfig is not in place, or our entry is out (a repair is
    /// held back by the throttle).
    Degraded,
    Ready,
    Removing,
}

const STATES: [(State, &str); 6] = [
    (State::Starting, "starting"),
    (State::Waiting, "waiting"),
    (State::Refused, "refused"),
    (State::Degraded, "degraded"),
    (State::Ready, "ready"),
    (State::Removing, "removing"),
];

/// Shared between the event loop (writer) and the HTTP listener (reader).
#[derive(Debug)]
pub struct Status {
    state: Mutex<(State, String)>,
    repairs: AtomicU64,
    last_repair: AtomicU64,
    fighting: AtomicBool,
    heartbeat: AtomicU64,
}

impl Default for Status {
    fn default() -> Status {
        Status {
            state: Mutex::new((State::Starting, "starting".into())),
            repairs: AtomicU64::new(0),
            last_repair: AtomicU64::new(0),
            fighting: AtomicBool::new(false),
            heartbeat: AtomicU64::new(unix_now()),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Status {
    pub fn set(&self, state: State, detail: impl Into<String>) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (state, detail.into());
    }

    pub fn state(&self) -> (State, String) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn repaired(&self) {
        self.repairs.fetch_add(1, Ordering::Relaxed);
        self.last_repair.store(unix_now(), Ordering::Relaxed);
    }

    pub fn set_fighting(&self, fighting: bool) {
        self.fighting.store(fighting, Ordering::Relaxed);
    }

    /// The event loop is alive (it beats at least every `CFGCHECK_INTERVAL`).
    pub fn beat(&self) {
        self.heartbeat.store(unix_now(), Ordering::Relaxed);
    }

    /// Prometheus text exposition.
    pub fn metrics(&self) -> String {
        let (state, _) = self.state();
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(
                out,
                "# HELP kong_mesh_cni_installer_{name} {help}\n# TYPE kong_mesh_cni_installer_{name} {kind}"
            );
            for (labels, value) in samples {
                let _ = writeln!(out, "kong_mesh_cni_installer_{name}{labels} {value}");
            }
        };
        metric(
            "repairs_total",
            "counter",
            "Times our entry was put back after something else took it out.",
            &[("", self.repairs.load(Ordering::Relaxed))],
        );
        metric(
            "last_repair_timestamp_seconds",
            "gauge",
            "Unix time of the last repair (0: none yet).",
            &[("", self.last_repair.load(Ordering::Relaxed))],
        );
        metric(
            "ready",
            "gauge",
            "1 while the binary, the kubeconfig and our CNI configuration are in place.",
            &[("", (state == State::Ready) as u64)],
        );
        metric(
            "fighting",
            "gauge",
            "1 while repairs are spaced out because another agent keeps reverting our entry.",
            &[("", self.fighting.load(Ordering::Relaxed) as u64)],
        );
        let labels: Vec<(String, u64)> =
            STATES.iter().map(|(s, name)| (format!("{{state=\"{name}\"}}"), (*s == state) as u64)).collect();
        let samples: Vec<(&str, u64)> = labels.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        metric("state", "gauge", "Install state: 1 for the current one.", &samples);
        out
    }

    /// Status code and body for a request path.
    pub fn respond(&self, path: &str, stale_after: Duration) -> (u16, String) {
        let (state, detail) = self.state();
        match path {
            "/healthz" => {
                match unix_now().saturating_sub(self.heartbeat.load(Ordering::Relaxed)) > stale_after.as_secs() {
                    true => (500, "event loop stalled\n".into()),
                    false => (200, "ok\n".into()),
                }
            }
            "/readyz" if state == State::Ready => (200, "ready\n".into()),
            "/readyz" => (503, format!("not ready: {detail}\n")),
            "/metrics" => (200, self.metrics()),
            _ => (404, "not found\n".into()),
        }
    }
}

/// How long one connection may take, end to end.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves the endpoints until the process ends.
pub async fn serve(listener: TcpListener, status: std::sync::Arc<Status>, stale_after: Duration) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let status = status.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, handle(stream, &status, stale_after)).await;
        });
    }
}

async fn handle(mut stream: TcpStream, status: &Status, stale_after: Duration) -> std::io::Result<()> {
    let mut buf = [0u8; 1024];
    let mut len = 0;
    // Only the request line matters; read until it is complete.
    while !buf[..len].contains(&b'\n') && len < buf.len() {
        match stream.read(&mut buf[len..]).await? {
            0 => break,
            n => len += n,
        }
    }
    let line = String::from_utf8_lossy(&buf[..len]);
    let (code, body) = match line.split_whitespace().collect::<Vec<_>>()[..] {
        ["GET", path, ..] => status.respond(path, stale_after),
        _ => (405, "only GET\n".into()),
    };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_show_repairs_and_one_state() {
        let s = Status::default();
        s.repaired();
        s.set(State::Ready, "chained");
        let m = s.metrics();
        assert!(m.contains("kong_mesh_cni_installer_repairs_total 1\n"), "{m}");
        assert!(m.contains("kong_mesh_cni_installer_ready 1\n"));
        assert!(m.contains("kong_mesh_cni_installer_state{state=\"ready\"} 1\n"));
        assert!(m.contains("kong_mesh_cni_installer_state{state=\"waiting\"} 0\n"));
        assert!(!m.contains("kong_mesh_cni_installer_last_repair_timestamp_seconds 0\n"));
    }

    #[test]
    fn readyz_follows_state_and_healthz_the_heartbeat() {
        let s = Status::default();
        s.set(State::Waiting, "10-calico.conflist does not exist yet");
        assert_eq!(
            s.respond("/readyz", Duration::from_secs(10)),
            (503, "not ready: 10-calico.conflist does not exist yet\n".into())
        );
        assert_eq!(s.respond("/healthz", Duration::from_secs(10)).0, 200);
        s.heartbeat.store(0, Ordering::Relaxed);
        assert_eq!(s.respond("/healthz", Duration::from_secs(10)).0, 500);
        s.set(State::Ready, "");
        assert_eq!(s.respond("/readyz", Duration::from_secs(10)).0, 200);
        assert_eq!(s.respond("/nope", Duration::from_secs(10)).0, 404);
    }
}
