//! Logs go to stderr (stdout carries command output), as plain text lines.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// `off|error|warn|info|debug|trace`; an unknown level falls back to info rather than
/// failing the command over its logging.
pub fn init(level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal: `kubectl logs` shows escape codes raw.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}
