//! The plugin's log lines. The plugin runs on the host, started by the container
//! runtime, where nobody reads its stderr; it connects to this socket (its conf's
//! `log_socket`, by default in a host dir the DaemonSet mounts) and writes formatted
//! lines, which are copied to our stderr: they show in `kubectl logs` of the DaemonSet
//! pod. The plugin falls back to a file on the host when nobody listens.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::InstallError;

/// A plugin invocation lasts seconds; a connection silent for this long is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longer lines are cut: a runaway writer must not grow our memory.
const MAX_LINE: u64 = 16 * 1024;

/// The bound socket; [`LogSocket::close`] removes its file if it is still ours.
pub struct LogSocket {
    path: PathBuf,
    inode: u64,
}

impl LogSocket {
    /// Binds `path`, replacing a socket a previous installer left (during a rollout
    /// the newest installer takes over: the plugin connects anew on every call), and
    /// relays every connection's lines to stderr until the process ends.
    pub fn start(path: &Path) -> Result<LogSocket, InstallError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(InstallError::io("creating the plugin log socket's dir", dir))?;
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(InstallError::io("listening for plugin logs on", path))?;
        let inode = std::fs::metadata(path).map_err(InstallError::io("reading", path))?.ino();
        tokio::spawn(async move {
            loop {
                if let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(relay(stream));
                }
            }
        });
        Ok(LogSocket { path: path.to_path_buf(), inode })
    }

    /// Removes the socket file, unless another installer has bound its own there since.
    pub fn close(self) {
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn relay(stream: UnixStream) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match tokio::time::timeout(IDLE_TIMEOUT, (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(_)) => {
                if line.last() != Some(&b'\n') {
                    line.push(b'\n');
                }
                // One write per line, so lines from concurrent plugin calls never interleave.
                let _ = std::io::stderr().lock().write_all(&line);
            }
        }
    }
}
