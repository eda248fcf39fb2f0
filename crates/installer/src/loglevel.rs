//! The log level at run time, no pod restarted: the chart mounts its ConfigMap's
//! `logLevel` key as a file (a directory mount, so the kubelet's updates arrive); we
//! watch it and apply each new level to our own lines ([`ops::loglevel`]), to the
//! plugin-log relay ([`RelayLevel`], for calls already running), and to every later
//! plugin call through [`cni::plugin::logging::LEVEL_FILE`] in the run dir (not the
//! conflist: rewriting it would wake the primary CNI's watchers).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use inotify::{Inotify, WatchMask};
use ops::loglevel::{Level, LevelError};

use cni::plugin::logging::{FORMAT_FILE, LEVEL_FILE};

/// The file is re-read this often even without an inotify event (a missed event, a dir
/// that appeared later).
const BACKSTOP: Duration = Duration::from_secs(10);

/// The level plugin lines must have to be relayed, shared with the relay's tasks.
#[derive(Clone)]
pub struct RelayLevel(Arc<AtomicU8>);

impl RelayLevel {
    pub fn new(level: Level) -> RelayLevel {
        RelayLevel(Arc::new(AtomicU8::new(level as u8)))
    }

    pub fn get(&self) -> Level {
        Level::ALL[usize::from(self.0.load(Ordering::Relaxed)).min(Level::ALL.len() - 1)]
    }

    fn set(&self, level: Level) {
        self.0.store(level as u8, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LevelFileError {
    #[error("cannot read the log level file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the log level file {path} says {:?}: not one of off, error, warn, info, debug, trace", .source.value)]
    Bad {
        path: PathBuf,
        #[source]
        source: LevelError,
    },
}

/// Tells the plugin's later calls our log format: `json` in the run dir, nothing for text.
pub fn pass_format(run_dir: &Path, format: ops::LogFormat) {
    let passed = match format {
        ops::LogFormat::Json => std::fs::create_dir_all(run_dir)
            .and_then(|()| crate::fsio::ensure_file(run_dir, FORMAT_FILE, b"json\n", 0o644).map(drop)),
        ops::LogFormat::Text => std::fs::remove_file(run_dir.join(FORMAT_FILE))
            .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) }),
    };
    if let Err(e) = passed {
        tracing::warn!(path = %run_dir.join(FORMAT_FILE).display(), error = %e, "cannot pass the log format on to the plugin");
    }
}

/// What the file says: `Ok(None)` when there is no file (yet).
pub fn read(path: &Path) -> Result<Option<Level>, LevelFileError> {
    let mut text = String::new();
    match std::fs::File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LevelFileError::Read { path: path.to_owned(), source }),
        // A level is a word: the rest of a larger file is not read.
        Ok(file) => file
            .take(64)
            .read_to_string(&mut text)
            .map_err(|source| LevelFileError::Read { path: path.to_owned(), source })?,
    };
    text.parse().map(Some).map_err(|source| LevelFileError::Bad { path: path.to_owned(), source })
}

/// Where levels go.
struct Targets {
    relay: RelayLevel,
    run_dir: PathBuf,
}

impl Targets {
    fn apply(&self, level: Level) {
        ops::loglevel::set(level);
        self.relay.set(level);
        let written = std::fs::create_dir_all(&self.run_dir)
            .and_then(|()| crate::fsio::ensure_file(&self.run_dir, LEVEL_FILE, format!("{level}\n").as_bytes(), 0o644));
        match written {
            Ok(_) => {}
            Err(e) => tracing::warn!(
                path = %self.run_dir.join(LEVEL_FILE).display(),
                error = %e,
                "cannot pass the log level on to the plugin; its calls log at their conf's level"
            ),
        }
    }
}

/// Applies the file's level (or `initial` while there is none) and follows the file
/// until the process ends. Without a file to follow, the plugin keeps its conf's level:
/// a level file a previous installer left in the run dir is removed.
pub fn start(file: Option<PathBuf>, initial: Option<Level>, run_dir: PathBuf, relay: RelayLevel) {
    let Some(file) = file else {
        let _ = std::fs::remove_file(run_dir.join(LEVEL_FILE));
        return;
    };
    let targets = Targets { relay, run_dir };
    let mut current = initial.unwrap_or(Level::Info);
    let mut last = None;
    follow_once(&file, &targets, &mut current, &mut last, true);
    tokio::spawn(async move {
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
        // The kubelet updates a ConfigMap volume by renaming a new `..data` symlink into
        // the dir; a plain file is rewritten. Either is an event on the dir.
        let mask = WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE | WatchMask::DELETE;
        let mut events = Inotify::init()
            .and_then(|inotify| {
                inotify.watches().add(&dir, mask)?;
                inotify.into_event_stream([0u8; 1024])
            })
            .inspect_err(|e| {
                tracing::info!(dir = %dir.display(), error = %e, "cannot watch the log level file's dir; re-reading it every {BACKSTOP:?}")
            })
            .ok();
        let mut backstop = tokio::time::interval(BACKSTOP);
        loop {
            match events.as_mut() {
                Some(stream) => tokio::select! {
                    event = stream.next() => if event.is_none() { events = None },
                    _ = backstop.tick() => {}
                },
                None => {
                    backstop.tick().await;
                }
            }
            follow_once(&file, &targets, &mut current, &mut last, false);
        }
    });
}

/// Reads the file and applies a level that changed; logs a bad or unreadable file once
/// per distinct content, keeping the current level.
fn follow_once(file: &Path, targets: &Targets, current: &mut Level, last: &mut Option<String>, first: bool) {
    let read = read(file);
    let seen = format!("{read:?}");
    if last.as_deref() == Some(seen.as_str()) {
        return;
    }
    *last = Some(seen);
    match read {
        Ok(Some(level)) => {
            let old = std::mem::replace(current, level);
            let say = || match first {
                true => tracing::info!(file = %file.display(), %level, "log level from the file; following it"),
                false => tracing::info!(file = %file.display(), from = %old, to = %level, "log level changed"),
            };
            // Said at whichever of the two levels is the more verbose, so it shows if either shows info.
            if level < old && !first {
                say();
                targets.apply(level);
            } else {
                targets.apply(level);
                if first || level != old {
                    say();
                }
            }
        }
        Ok(None) => {
            if first {
                targets.apply(*current);
                tracing::info!(file = %file.display(), level = %current, "no log level file yet; following it once it appears");
            }
        }
        Err(e) => {
            if first {
                targets.apply(*current);
            }
            tracing::error!("{e}; keeping log level {current}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_read_as_users_write_it_and_bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logLevel");
        assert!(matches!(read(&path), Ok(None)));
        std::fs::write(&path, "Debug\n").unwrap();
        assert_eq!(read(&path).unwrap(), Some(Level::Debug));
        std::fs::write(&path, "verbose").unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()) && e.contains("\"verbose\""), "{e}");
    }

    #[test]
    fn the_relay_level_is_shared() {
        let relay = RelayLevel::new(Level::Info);
        let seen = relay.clone();
        relay.set(Level::Trace);
        assert_eq!(seen.get(), Level::Trace);
    }
}
