//! The installer's errors. They are reported in one place ([`crate::run`]); the event
//! loop turns the ones a later event can cure into "not ready" instead.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A setting (flag or environment variable) is unusable; the message names it.
    #[error("invalid setting: {0}")]
    Setting(String),
    /// `CNI_NETWORK_CONFIG` does not render to a single plugin configuration.
    #[error("CNI_NETWORK_CONFIG: {0}")]
    Template(String),
    /// A file operation failed. Messages name paths, never file contents: the
    /// kubeconfig holds a token.
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The admin endpoints' listener.
    #[error(transparent)]
    Listen(#[from] ops::Error),
    /// Loading, attaching or removing the eBPF programs.
    #[error(transparent)]
    Ebpf(#[from] ebpf::EbpfError),
    /// The tokio runtime, a watch or a signal handler.
    #[error("{what}: {source}")]
    Runtime {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

impl InstallError {
    pub fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> InstallError {
        let path = path.into();
        move |source| InstallError::Io { what, path, source }
    }

    pub fn runtime(what: &'static str) -> impl FnOnce(io::Error) -> InstallError {
        move |source| InstallError::Runtime { what, source }
    }
}
