//! The level of this process's own log lines, changeable while it runs: the installer
//! follows a mounted ConfigMap key so that debug logging needs no pod restart.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

/// A log level as users write it (`kubectl edit configmap`, `CNI_LOG_LEVEL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a log level: off, error, warn, info, debug or trace")]
pub struct LevelError {
    pub value: String,
}

impl Level {
    pub const ALL: [Level; 6] = [Level::Off, Level::Error, Level::Warn, Level::Info, Level::Debug, Level::Trace];

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Off => "off",
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        }
    }
}

impl FromStr for Level {
    type Err = LevelError;

    /// Surrounding whitespace (a ConfigMap value often ends in a newline) and case are ignored.
    fn from_str(text: &str) -> Result<Level, LevelError> {
        let word = text.trim().to_ascii_lowercase();
        Level::ALL.into_iter().find(|l| l.as_str() == word).ok_or_else(|| LevelError { value: text.trim().to_owned() })
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

type Reload = Box<dyn Fn(EnvFilter) -> bool + Send + Sync>;

static RELOAD: OnceLock<Reload> = OnceLock::new();

/// Called once by the logging set-up with a way to swap its filter.
pub(crate) fn install(reload: Reload) {
    let _ = RELOAD.set(reload);
}

/// Makes `level` this process's level from now on. False when logging was not set up
/// through [`crate::init_logging`] (a test's own subscriber), so nothing changed.
pub fn set(level: Level) -> bool {
    RELOAD.get().is_some_and(|reload| reload(filter(level.as_str())))
}

/// kube's HTTP layer logs each failed request at error ("failed with error ..."): a
/// line per retry while the API server is away, which our own warnings say once.
const KUBE_HTTP_QUIET: &str = "kube_client::client::builder=off";

/// The filter for `level` (a level, or EnvFilter directives; unparsable means info).
/// Up to info, kube's HTTP layer is silenced; at debug and trace it is heard.
pub(crate) fn filter(level: &str) -> EnvFilter {
    let quiet = matches!(level.parse(), Ok(Level::Off | Level::Error | Level::Warn | Level::Info));
    let directives = if quiet { format!("{},{KUBE_HTTP_QUIET}", level.trim()) } else { level.to_owned() };
    EnvFilter::try_new(directives).unwrap_or_else(|_| EnvFilter::new(format!("info,{KUBE_HTTP_QUIET}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubes_http_failures_are_quiet_up_to_info_only() {
        for (level, quiet) in
            [("info", true), ("WARN\n", true), ("debug", false), ("trace", false), ("kmc=notalevel", true)]
        {
            let text = filter(level).to_string();
            assert_eq!(text.contains(KUBE_HTTP_QUIET), quiet, "{level:?}: {text}");
        }
    }

    #[test]
    fn levels_parse_as_users_write_them() {
        assert_eq!("debug\n".parse(), Ok(Level::Debug));
        assert_eq!(" WARN ".parse(), Ok(Level::Warn));
        for level in Level::ALL {
            assert_eq!(level.as_str().parse(), Ok(level));
        }
        assert_eq!("verbose\n".parse::<Level>(), Err(LevelError { value: "verbose".into() }));
        assert_eq!("".parse::<Level>(), Err(LevelError { value: String::new() }));
    }
}
