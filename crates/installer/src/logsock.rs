//! The plugin's log lines. The plugin runs on the host, started by the container
//! runtime, where nobody reads its stderr; it connects to this socket (its conf's
//! `log_socket`, by default in a host dir the DaemonSet mounts) and writes formatted
//! lines, which are copied to our stderr: they show in `kubectl logs` of the DaemonSet
//! pod. The plugin falls back to a file on the host when nobody listens.
//!
//! Nothing here may hurt the installer: only root may connect, connections are capped
//! and accept errors back off ([`crate::rootsock`]); lines are stripped of control
//! characters and prefixed with the writer's pid and uid; and
//! stderr is written by its own thread through a bounded queue, so a stalled stderr
//! drops (and counts) plugin lines instead of stopping the event loop.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::UnixStream;

use ops::loglevel::Level;

use crate::InstallError;
use crate::loglevel::RelayLevel;
use crate::rootsock::{self, RootSocket};

/// A plugin invocation lasts seconds; a connection silent for this long is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longer lines are cut: a runaway writer must not grow our memory.
const MAX_LINE: u64 = 16 * 1024;
/// Concurrent plugin connections; more wait in the listen backlog (and, once that is
/// full, the plugin's non-blocking connect fails and it writes to its file).
pub const MAX_CONNECTIONS: usize = 128;
/// Lines queued for stderr; past this they are dropped and counted.
const QUEUE_LINES: usize = 1024;

/// The bound socket; [`LogSocket::close`] removes its file if it is still ours.
pub struct LogSocket(RootSocket);

impl LogSocket {
    /// Binds `path` and relays every connection's lines to `out` (stderr in the
    /// installer) until the process ends; lines more verbose than `level` are dropped
    /// (a call started before the level was lowered still logs at the old one).
    /// In `json` format every relayed line is a JSON object.
    pub fn start(
        path: &Path,
        out: impl Write + Send + 'static,
        level: RelayLevel,
        format: ops::LogFormat,
    ) -> Result<LogSocket, InstallError> {
        let (socket, listener) = RootSocket::bind(path)?;
        let queue = Queue::start(out);
        tokio::spawn(rootsock::serve(listener, MAX_CONNECTIONS, "plugin log socket", move |stream, pid| {
            relay(stream, pid, queue.clone(), level.clone(), format)
        }));
        Ok(LogSocket(socket))
    }

    pub fn close(self) {
        self.0.close();
    }
}

/// Lines for the writer thread, and how many did not fit.
#[derive(Clone)]
struct Queue {
    lines: SyncSender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
}

impl Queue {
    fn start(mut out: impl Write + Send + 'static) -> Queue {
        let (lines, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(QUEUE_LINES);
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = dropped.clone();
        std::thread::Builder::new()
            .name("plugin-logs".into())
            .spawn(move || {
                for line in rx {
                    let lost = counter.swap(0, Ordering::Relaxed);
                    if lost > 0 {
                        let _ = writeln!(out, "[kong-mesh-cni] {lost} plugin log lines dropped: stderr was not read");
                    }
                    // One write per line, so lines from concurrent plugin calls never interleave.
                    let _ = out.write_all(&line);
                }
            })
            .expect("starting the plugin log writer thread");
        Queue { lines, dropped }
    }

    fn push(&self, line: Vec<u8>) {
        if let Err(TrySendError::Full(_)) = self.lines.try_send(line) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The line as printed: who wrote it, then its text with control characters (ANSI
/// escapes, carriage returns) shown as `\xNN` rather than passed to the terminal.
fn clean_line(client: &str, raw: &[u8]) -> Vec<u8> {
    let text = raw.strip_suffix(b"\n").unwrap_or(raw);
    let mut out = Vec::with_capacity(client.len() + text.len() + 2);
    out.extend_from_slice(client.as_bytes());
    for &b in text {
        match b {
            b'\t' => out.push(b),
            0..0x20 | 0x7f => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            _ => out.push(b),
        }
    }
    out.push(b'\n');
    out
}

/// Who wrote the lines. In a DaemonSet pod the plugin's pid (the host's) has no number
/// in our pid namespace, and the kernel says 0: then there is none to show.
fn prefix(pid: i32) -> String {
    match pid {
        0 => "[plugin uid=0] ".to_owned(),
        pid => format!("[plugin pid={pid} uid=0] "),
    }
}

/// The level of a plugin line, as its formatter wrote it (text: the word after the
/// timestamp; JSON: the `level` field); `None` for a line that shows none.
fn line_level(line: &[u8]) -> Option<Level> {
    let text = std::str::from_utf8(line.get(..line.len().min(256))?).ok()?;
    let word = match text.trim_start().strip_prefix('{') {
        Some(_) => text.split_once("\"level\":\"")?.1.split('"').next()?,
        None => text.split_whitespace().nth(1)?,
    };
    [Level::Error, Level::Warn, Level::Info, Level::Debug, Level::Trace]
        .into_iter()
        .find(|l| l.as_str().eq_ignore_ascii_case(word))
}

/// JSON format: the plugin's own object with who wrote it added in front; a line that is
/// not an object (an older plugin's text) becomes the message of one, so that every
/// line a log collector reads parses.
fn json_line(pid: i32, raw: &[u8]) -> Vec<u8> {
    let text = raw.trim_ascii();
    let who = match pid {
        0 => r#"{"source":"plugin","#.to_owned(),
        pid => format!(r#"{{"source":"plugin","pid":{pid},"#),
    };
    let mut out = who.into_bytes();
    match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(text) {
        // Its bytes as written after the opening brace: fields and their order kept.
        Ok(object) if !object.is_empty() => out.extend_from_slice(&text[1..]),
        _ => {
            let message = serde_json::Value::from(String::from_utf8_lossy(text));
            out.extend_from_slice(format!(r#""message":{message}}}"#).as_bytes());
        }
    }
    out.push(b'\n');
    out
}

async fn relay(stream: UnixStream, pid: i32, queue: Queue, level: RelayLevel, format: ops::LogFormat) {
    let client = prefix(pid);
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match tokio::time::timeout(IDLE_TIMEOUT, (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(_)) if line_level(&line).is_some_and(|l| l > level.get()) => {}
            Ok(Ok(_)) if format == ops::LogFormat::Json => queue.push(json_line(pid, &line)),
            Ok(Ok(_)) => queue.push(clean_line(&client, &line)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_the_kernel_could_not_map_is_not_shown() {
        assert_eq!(prefix(7), "[plugin pid=7 uid=0] ");
        assert_eq!(prefix(0), "[plugin uid=0] ");
    }

    #[test]
    fn a_lines_level_is_read_from_text_and_json() {
        let text = b"2026-12-07T22:41:43.123456Z DEBUG cni{cmd=ADD pod=a/b}: done took=3ms\n";
        assert_eq!(line_level(text), Some(Level::Debug));
        assert_eq!(line_level(b"2026-12-07T22:41:43.123456Z  WARN cni: slow\n"), Some(Level::Warn));
        let json = br#"{"timestamp":"2026-12-07T22:41:43Z","level":"TRACE","fields":{"message":"x"}}"#;
        assert_eq!(line_level(json), Some(Level::Trace));
        assert_eq!(line_level(b"no level here\n"), None);
        assert_eq!(line_level(b""), None);
    }

    #[test]
    fn json_lines_say_who_wrote_them_and_always_parse() {
        let parsed = |line: Vec<u8>| serde_json::from_slice::<serde_json::Value>(&line).unwrap();
        let line = json_line(7, b"{\"timestamp\":\"t\",\"level\":\"DEBUG\",\"message\":\"done\"}\n");
        assert_eq!(
            parsed(line),
            serde_json::json!({"source": "plugin", "pid": 7, "timestamp": "t", "level": "DEBUG", "message": "done"})
        );
        let line = json_line(0, b"2026-12-07T22:00:00Z  INFO an older plugin's \x1b[31mtext\n");
        assert_eq!(parsed(line)["message"], "2026-12-07T22:00:00Z  INFO an older plugin's \u{1b}[31mtext");
        for raw in [&b"{}"[..], b"{\"unclosed\": ", b"[1,2]", b""] {
            parsed(json_line(3, raw));
        }
    }

    #[test]
    fn control_characters_are_shown_not_passed_on() {
        let got = clean_line("[plugin pid=7] ", b"ok\t\x1b[31mred\x1b[0m\rfake line\n");
        assert_eq!(String::from_utf8(got).unwrap(), "[plugin pid=7] ok\t\\x1b[31mred\\x1b[0m\\x0dfake line\n");
        assert_eq!(clean_line("", b"no newline"), b"no newline\n");
    }
}
