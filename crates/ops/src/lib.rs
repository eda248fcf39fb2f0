//! What every long-running role of the binary shares (the installer and the controller):
//! the admin endpoints `/healthz`, `/readyz` and `/metrics` ([`admin`]), one metrics
//! [`Registry`] type, logging set-up (blocking, or through a bounded queue that drops
//! and counts rather than stall its caller), the shutdown signals, the one duration
//! syntax of our flags, and the file-descriptor limit.

pub mod admin;
pub mod loglevel;

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

pub use admin::{Heartbeat, Report, ServeOptions, bind, serve};
/// The one metrics registry type: each role registers its metrics in its own.
pub use prometheus_client::registry::Registry;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listening for /healthz, /readyz and /metrics on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// The metrics of `registry` in the text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail; a metric that cannot encode is a bug caught by tests.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}

/// How log lines are written: `text` for people, `json` (one object per line) for log
/// collectors (`CNI_LOG_FORMAT`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Logs go to stderr (stdout carries command output), one line per event.
/// `off|error|warn|info|debug|trace` or a filter directive; an unknown level falls
/// back to info rather than failing the command over its logging.
pub fn init_logging(level: &str, format: LogFormat) {
    init_with(level, format, std::io::stderr);
}

/// Log lines queued for stderr by [`init_logging_non_blocking`]; past this they are
/// dropped and counted.
const LOG_QUEUE_LINES: usize = 4096;

/// The count of log lines dropped because stderr was not read fast enough.
static LOG_DROPS: OnceLock<ErrorCounter> = OnceLock::new();

/// Writes out the queued log lines when dropped (at exit; waits at most a second).
#[must_use = "dropping it stops the log writer"]
pub struct LogGuard {
    _writer: WorkerGuard,
}

/// [`init_logging`] for a long-running role whose loop must never wait for its log:
/// stderr is written by a thread of its own through a bounded queue, and a line that
/// does not fit (stderr is a pipe nobody reads: a stalled log collector) is dropped and
/// counted ([`register_log_metrics`]) instead of stopping the caller.
pub fn init_logging_non_blocking(level: &str, format: LogFormat) -> LogGuard {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let _ = LOG_DROPS.set(writer.error_counter());
    init_with(level, format, writer);
    LogGuard { _writer: guard }
}

fn init_with<W>(level: &str, format: LogFormat, writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = loglevel::filter(level);
    // Colours only for a person at a terminal: `kubectl logs` shows escape codes raw.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    // The filter can be swapped at run time (loglevel::set): the installer follows a ConfigMap.
    macro_rules! init {
        ($builder:expr) => {{
            let builder = $builder.with_filter_reloading();
            let handle = builder.reload_handle();
            if builder.try_init().is_ok() {
                loglevel::install(Box::new(move |filter| handle.reload(filter).is_ok()));
            }
        }};
    }
    match format {
        LogFormat::Text => init!(builder),
        // The event's fields at the top level, beside timestamp and level.
        LogFormat::Json => init!(builder.json().flatten_event(true).with_ansi(false)),
    }
}

/// Log lines dropped so far because stderr was not read (0 with blocking logging).
pub fn dropped_log_lines() -> u64 {
    LOG_DROPS.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Shows [`dropped_log_lines`] as `<prefix>_log_lines_dropped_total` in `registry`.
pub fn register_log_metrics(registry: &mut Registry) {
    registry.register_collector(Box::new(LogDrops));
}

#[derive(Debug)]
struct LogDrops;

impl Collector for LogDrops {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counter = ConstCounter::new(dropped_log_lines());
        let metric = encoder.encode_descriptor(
            "log_lines_dropped",
            "Log lines dropped because stderr was not read fast enough (a stalled log collector).",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric)
    }
}

/// Resolves on the first SIGTERM or SIGINT. Without signal handlers (which only fails
/// when the runtime has no signal driver) it never resolves: the process then stops
/// only when killed.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot listen for SIGTERM/SIGINT; stopping only when killed");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
}

/// The duration syntax of every flag: a bare number is whole seconds (the Go
/// installer's variables are), otherwise humantime's (`500ms`, `2m`, `1h 30m`).
pub fn duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text).map_err(|e| format!("{text:?} is not a duration such as 10, 500ms or 2m: {e}"))
}

/// Raises the soft limit on open files to the hard one and returns it: an admin port
/// or a watch must not fail for want of descriptors the process is allowed anyway.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own; no other memory is touched.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit only reads the struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_seconds_or_units() {
        assert_eq!(duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(duration(" 250ms "), Ok(Duration::from_millis(250)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "x", "-1", "5 parsecs", "1.5.5s"] {
            let e = duration(bad).unwrap_err();
            assert!(e.contains(&format!("{:?}", bad.trim())), "{e}");
        }
    }

    #[test]
    fn dropped_log_lines_are_a_counter_under_the_registry_prefix() {
        let mut registry = Registry::with_prefix("kong_mesh_cni_installer");
        register_log_metrics(&mut registry);
        let text = render(&registry);
        assert!(text.contains("# TYPE kong_mesh_cni_installer_log_lines_dropped counter\n"), "{text}");
        assert!(text.contains("\nkong_mesh_cni_installer_log_lines_dropped_total 0\n"), "{text}");
    }

    #[test]
    fn fd_limit_is_raised_to_the_hard_limit() {
        let hard = raise_fd_limit().unwrap();
        let mut now = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: as in raise_fd_limit.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) }, 0);
        assert_eq!((now.rlim_cur, now.rlim_max), (hard, hard));
    }
}
