//! Asking the node agent for the pod: plain blocking I/O on a unix socket, every step
//! bounded, no runtime and no TLS. Any trouble is a miss, and the plugin asks the API
//! server as it would without an agent.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use socket2::{Domain, SockAddr, Socket, Type};

use crate::agent::{Answer, MAX_ANSWER, Request, Status, WAIT};

/// The agent's own wait plus room for a loaded node; past it the API server is asked.
const ANSWER_TIMEOUT: Duration = Duration::from_millis(WAIT.as_millis() as u64 + 700);

#[derive(Debug)]
pub enum Asked {
    /// The pod, and whether the agent waited for its watch event.
    Found(Box<Pod>, bool),
    /// The agent answered, or stopped answering, without the pod: why, for the log.
    Miss(String),
    /// No agent listens at the socket (none runs, or the plugin sees another file
    /// system than the installer: a run dir that is not the host's).
    Unreachable(String),
}

pub fn pod(socket: &Path, namespace: &str, name: &str, uid: Option<&str>) -> Asked {
    let request = Request::new(namespace, name, uid);
    match answer(socket, &request, ANSWER_TIMEOUT) {
        Ok(Answer { status: Status::Found, pod: Some(pod), waited, .. }) => Asked::Found(pod, waited),
        Ok(answer) => Asked::Miss(format!("{:?}: {}", answer.status, answer.detail.unwrap_or_default())),
        Err(e @ AskError::Connect(_)) => Asked::Unreachable(format!("{}: {e}", socket.display())),
        Err(e @ AskError::Exchange(_)) => Asked::Miss(format!("{}: {e}", socket.display())),
        Err(e @ AskError::Protocol(_)) => Asked::Miss(e.to_string()),
    }
}

/// Why the agent gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// Nothing listens at the socket.
    #[error("{0}")]
    Connect(std::io::Error),
    /// It stopped answering, or answered too late.
    #[error("{0}")]
    Exchange(std::io::Error),
    /// Its answer does not read.
    #[error("{0}")]
    Protocol(#[from] crate::agent::ProtocolError),
}

/// The agent's answer to `request` at `socket`, within `timeout` once connected (the
/// plugin's lookups, and `kong-mesh-cni status`).
pub fn answer(socket: &Path, request: &Request, timeout: Duration) -> Result<Answer, AskError> {
    let stream = connect(socket).map_err(AskError::Connect)?;
    let line = exchange(&stream, request, timeout).map_err(AskError::Exchange)?;
    Ok(Answer::parse(&line, request)?)
}

/// Sends the request and reads the answer line, within `timeout` in all.
fn exchange(stream: &UnixStream, request: &Request, timeout: Duration) -> std::io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    stream.set_write_timeout(Some(timeout))?;
    let mut stream = stream;
    stream.write_all(&request.to_line())?;
    let mut answer = Vec::with_capacity(4096);
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(ErrorKind::TimedOut, format!("no answer within {timeout:?}")));
        }
        stream.set_read_timeout(Some(left))?;
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "the agent closed before a whole answer"));
        }
        answer.extend_from_slice(&buf[..n]);
        if let Some(end) = answer.iter().position(|&b| b == b'\n') {
            answer.truncate(end);
            return Ok(answer);
        }
        if answer.len() > MAX_ANSWER {
            return Err(std::io::Error::new(ErrorKind::InvalidData, format!("answer longer than {MAX_ANSWER} bytes")));
        }
    }
}

/// A unix-socket connect either completes at once or fails; non-blocking, a full
/// backlog (an agent that stopped accepting) fails too, instead of blocking ADD.
/// (socket2 sets close-on-exec: the iptables children do not inherit it.)
fn connect(path: &Path) -> std::io::Result<UnixStream> {
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.connect(&SockAddr::unix(path)?)?;
    socket.set_nonblocking(false)?;
    Ok(socket.into())
}
