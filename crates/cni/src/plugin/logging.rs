//! Where the plugin's log lines go. The plugin runs on the host, started by the
//! runtime, where nobody reads its stderr. Lines are sent as datagrams to the socket
//! the installer listens on, which prints them to its own stderr, so they show in
//! `kubectl logs` of the DaemonSet pod; no process is searched for by name, so two
//! installers (a rollout) cannot confuse it. When no installer listens, lines go to a
//! small rotating file on the host. Nothing here can fail or block the command.
//!
//! A stream socket rather than datagrams: the kernel queues only a few datagrams per
//! socket (net.unix.max_dgram_qlen, 10 by default), while a stream buffers hundreds of
//! KiB, so a burst of lines still reaches the installer in order.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;

/// The file is rotated (to `<file>.1`) past this size: at most twice this on disk.
const MAX_FILE_BYTES: u64 = 1 << 20;

struct Sink {
    socket: Option<UnixStream>,
    file: PathBuf,
}

impl Sink {
    /// The sink, and why the socket could not be used (its lines then go to the file).
    fn new(socket_path: &Path, file: &Path) -> (Self, Option<io::Error>) {
        // Never wait for a slow or stuck installer: a full buffer means the file.
        let (socket, error) = match UnixStream::connect(socket_path).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(e)),
        };
        (Sink { socket, file: file.to_owned() }, error)
    }

    fn write_line(&self, line: &[u8]) {
        if let Some(mut socket) = self.socket.as_ref() {
            // A partial write would garble the stream; a line goes whole or to the file.
            if matches!(socket.write(line), Ok(n) if n == line.len()) {
                return;
            }
        }
        let _ = self.append_to_file(line);
    }

    fn append_to_file(&self, line: &[u8]) -> io::Result<()> {
        if let Some(dir) = self.file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if std::fs::metadata(&self.file).is_ok_and(|m| m.len() > MAX_FILE_BYTES) {
            let mut rotated = self.file.clone().into_os_string();
            rotated.push(".1");
            std::fs::rename(&self.file, rotated)?;
        }
        // The path comes from the configuration: a FIFO or a device there must not block us.
        netns::hostfile::open_regular(&self.file, OpenOptions::new().create(true).append(true))
            .map_err(io::Error::other)?
            .write_all(line)
    }
}

/// One event's formatted line, written through to the sink.
struct LineWriter(Arc<Sink>);

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_line(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Clone)]
struct MakeLineWriter(Arc<Sink>);

impl<'a> MakeWriter<'a> for MakeLineWriter {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> LineWriter {
        LineWriter(self.0.clone())
    }
}

/// The file in the run dir where the installer keeps the node's current log level (its
/// ConfigMap's), so a level changed at run time reaches the next call without a
/// conflist rewrite (which would wake the primary CNI's watchers).
pub const LEVEL_FILE: &str = "log-level";
/// Likewise the installer's log format, `json`, when it is not text.
pub const FORMAT_FILE: &str = "log-format";

/// What the installer left in `run_dir/name` (a level, a format), if anything: a few
/// bytes, read once per call.
pub fn setting_in(run_dir: &Path, name: &str) -> Option<String> {
    use std::io::Read;
    let file = netns::hostfile::open_regular(&run_dir.join(name), OpenOptions::new().read(true)).ok()?;
    let mut text = String::new();
    // A level is one short word: a larger file is not one the installer wrote.
    file.take(16).read_to_string(&mut text).ok()?;
    Some(text.trim().to_owned()).filter(|t| !t.is_empty())
}

/// The crates under the plugin whose lines it logs at the configured level; the
/// libraries under them (HTTP, TLS) only their warnings.
const OURS: [&str; 4] = ["cni::plugin", "netfilter", "ebpf", "kuma"];

/// `level` is off, error, warn, info, debug or trace (unknown: info); `json`: one JSON
/// object per line, as the installer writes its own.
pub fn init(level: &str, json: bool, socket: &Path, file: &Path) {
    let level = match level {
        "off" => LevelFilter::OFF,
        "error" => LevelFilter::ERROR,
        "warn" => LevelFilter::WARN,
        "debug" => LevelFilter::DEBUG,
        "trace" => LevelFilter::TRACE,
        _ => LevelFilter::INFO,
    };
    // Targets, not EnvFilter: nothing to parse at run time, in a process started per pod.
    let filter = Targets::new().with_default(level.min(LevelFilter::WARN)).with_targets(OURS.map(|t| (t, level)));
    let (sink, unreachable) = Sink::new(socket, file);
    let writer = MakeLineWriter(Arc::new(sink));
    // fmt's own maximum is info by default: without ours, `debug` would never get through.
    let builder =
        tracing_subscriber::fmt().with_max_level(level).with_writer(writer).with_ansi(false).with_target(false);
    let _ = match json {
        true => builder.json().flatten_event(true).finish().with(filter).try_init(),
        false => builder.finish().with(filter).try_init(),
    };
    // In the file, first: a plugin whose lines never reach `kubectl logs` says where
    // it looked (a run dir that is not the host's shows here).
    if let Some(e) = unreachable {
        tracing::warn!(socket = %socket.display(), error = %e, "cannot reach the installer's log socket; logging to this file");
    }
}
