use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The node cannot run the eBPF mode; every missing piece is named.
    /// The kernel's release is shown, never judged.
    #[error("the eBPF mode cannot run on this node (kernel {kernel}): {}", missing.join("; "))]
    Preflight { kernel: String, missing: Vec<String> },
    #[error("the eBPF programs are not loaded on this node (no {path}): is the installer running in eBPF mode?")]
    NotLoaded { path: PathBuf },
    /// A Kuma setting this mode cannot honour (the plugin fails ADD with code 7).
    #[error("the eBPF mode does not support {setting}")]
    Unsupported { setting: &'static str },
    #[error("{field}: the eBPF mode takes at most {max} entries")]
    TooMany { field: &'static str, max: usize },
    #[error("invalid container id {id:?}: it must be non-empty and contain no '/' or '.' (bpffs names)")]
    ContainerId { id: String },
    #[error("pod {id} is not registered as configured: {what}")]
    Mismatch { id: String, what: String },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("cannot load the eBPF programs: {0}")]
    Load(#[from] Box<aya::EbpfError>),
    /// The verifier refused a program although the node check passed; `why` names what
    /// the program needs.
    #[error("eBPF program {program}: {why}: {source}")]
    Refused { program: &'static str, why: String, source: Box<aya::programs::ProgramError> },
    #[error("eBPF program {program}: {source}")]
    Program { program: &'static str, source: Box<aya::programs::ProgramError> },
    #[error("eBPF map {map}: {source}")]
    Map { map: &'static str, source: Box<aya::maps::MapError> },
    #[error("cannot pin {path}: {source}")]
    Pin { path: PathBuf, source: Box<aya::pin::PinError> },
    #[error(transparent)]
    NetNs(#[from] netns::NetNsError),
}

impl EbpfError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| EbpfError::Io { what, path, source }
    }

    pub(crate) fn program(program: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> Self {
        move |source| EbpfError::Program { program, source: Box::new(source) }
    }

    pub(crate) fn map(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> Self {
        move |source| EbpfError::Map { map, source: Box::new(source) }
    }

    /// Whether the error is about the pod's configuration (CNI code 7, invalid network
    /// config) rather than about the node.
    pub fn is_config(&self) -> bool {
        matches!(self, EbpfError::Unsupported { .. } | EbpfError::TooMany { .. })
    }
}
