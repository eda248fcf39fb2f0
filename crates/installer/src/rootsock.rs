//! The unix sockets the plugin reaches the installer on (its log lines, its pod
//! lookups), one way for both: root only (the mode is set, not left to the umask, and
//! each peer's credentials are checked), connections capped, accept errors (out of
//! descriptors) backed off instead of spun, and the file removed on close only while
//! it is still ours.

use std::future::Future;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixDatagram, UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::InstallError;

const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));

/// A bound socket; [`RootSocket::close`] removes its file if it is still ours.
pub struct RootSocket {
    path: PathBuf,
    inode: u64,
}

impl RootSocket {
    /// Binds `path`, replacing a socket a previous installer left (during a rollout the
    /// newest installer takes over: the plugin connects anew on every call).
    pub fn bind(path: &Path) -> Result<(RootSocket, UnixListener), InstallError> {
        RootSocket::bind_with(path, |p| UnixListener::bind(p))
    }

    /// [`RootSocket::bind`] for datagrams (the plugin's records). A datagram carries no
    /// credentials to check: the file's mode keeps everyone but root from sending.
    pub fn bind_datagram(path: &Path) -> Result<(RootSocket, UnixDatagram), InstallError> {
        RootSocket::bind_with(path, |p| UnixDatagram::bind(p))
    }

    fn bind_with<S>(
        path: &Path,
        bind: impl FnOnce(&Path) -> std::io::Result<S>,
    ) -> Result<(RootSocket, S), InstallError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(InstallError::io("creating the dir of a socket", dir))?;
        }
        let _ = std::fs::remove_file(path);
        let socket = bind(path).map_err(InstallError::io("listening on", path))?;
        // Root only, whatever the umask; a connection in between is refused by its credentials.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(InstallError::io("setting the mode of", path))?;
        let inode = std::fs::metadata(path).map_err(InstallError::io("reading", path))?.ino();
        Ok((RootSocket { path: path.to_path_buf(), inode }, socket))
    }

    /// Removes the socket file, unless another installer has bound its own there since.
    pub fn close(self) {
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Serves `listener` until the process ends, at most `max` connections at once (more
/// wait in the listen backlog). Each connection from root goes to `handle` with the
/// peer's pid; others are refused and logged.
pub async fn serve<F, Fut>(listener: UnixListener, max: usize, what: &'static str, handle: F)
where
    F: Fn(UnixStream, i32) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max));
    let mut backoff = ACCEPT_BACKOFF.0;
    loop {
        let permit = slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        match listener.accept().await {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF.0;
                let Some(pid) = root_peer(&stream, what) else { continue };
                let served = handle(stream, pid);
                tokio::spawn(async move {
                    served.await;
                    drop(permit);
                });
            }
            Err(e) => {
                // EMFILE and friends: the connection stays queued; retrying at once spins.
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot accept a connection to the {what}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
            }
        }
    }
}

/// The peer's pid (0 when the kernel cannot say) if it is root.
fn root_peer(stream: &UnixStream, what: &str) -> Option<i32> {
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == 0 => Some(cred.pid().unwrap_or(0)),
        Ok(cred) => {
            tracing::warn!(
                uid = cred.uid(),
                pid = cred.pid(),
                "refused a connection to the {what} from a non-root user"
            );
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell who connected to the {what}");
            None
        }
    }
}
