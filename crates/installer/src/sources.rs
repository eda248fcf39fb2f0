//! Where events come from in production: inotify on the net dir, the bin dirs and the
//! token's dir, the two backstop timers, and SIGTERM/SIGINT. Each source only sends an
//! [`Event`]; the loop decides what to do.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc::Sender;
use tokio::time::MissedTickBehavior;

use crate::args::Settings;
use crate::machine::Event;
use crate::{InstallError, conflist};

/// Net dir changes that can matter: a file written and closed, renamed in or out, or
/// deleted. Not IN_CREATE or IN_MODIFY: a file being written is read once it is closed,
/// not half-way.
fn net_dir_mask() -> WatchMask {
    WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::MOVED_FROM | WatchMask::DELETE | WatchMask::ONLYDIR
}

/// Our binary deleted, renamed over (another installer copying its own in its slot),
/// rewritten or chmod-ed; a directory put in its place and removed again.
fn bin_dir_mask() -> WatchMask {
    WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::DELETE
        | WatchMask::ATTRIB
        | WatchMask::ONLYDIR
}

/// A projected token is replaced by creating a new timestamped dir and renaming a new
/// `..data` symlink over the old one; a plain secret file is rewritten.
fn token_dir_mask() -> WatchMask {
    WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE | WatchMask::DELETE | WatchMask::ONLYDIR
}

/// Starts every source. Events that do not fit in the channel are dropped: a full
/// channel already holds events that will make the loop look at everything they could.
pub fn spawn(settings: &Settings, tx: Sender<Event>) -> Result<(), InstallError> {
    let inotify = Inotify::init().map_err(InstallError::runtime("starting inotify"))?;
    let stream = inotify.into_event_stream([0u8; 4096]).map_err(InstallError::runtime("starting inotify"))?;
    let relevant = Relevant { kubeconfig: settings.kubeconfig_name.clone(), binary: settings.ours.binary.clone() };
    let token_dir = settings.token_file.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
    let mut watches = stream.watches();
    let token_wd = match watches.add(&token_dir, token_dir_mask()) {
        Ok(wd) => Some(wd),
        Err(e) => {
            tracing::info!(dir = %token_dir.display(), error = %e, "cannot watch the token's dir; re-reading the token every REFRESH_SA_TOKEN_INTERVAL only");
            None
        }
    };
    // A bin dir that cannot be watched is still checked every CFGCHECK_INTERVAL.
    let mut bin_wds: Vec<(WatchDescriptor, PathBuf)> = Vec::new();
    for dir in &settings.bin_dirs {
        match watches.add(dir, bin_dir_mask()) {
            Ok(wd) => bin_wds.push((wd, dir.clone())),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the CNI bin dir; checking the plugin binary every CFGCHECK_INTERVAL only")
            }
        }
    }
    let net_dir = settings.net_dir.clone();
    let retry = settings.cfgcheck_interval;
    let events = tx.clone();
    tokio::spawn(async move {
        let mut stream = stream;
        let mut net_wd = arm(&mut watches, &net_dir, retry, &events).await;
        while let Some(Ok(ev)) = stream.next().await {
            if ev.mask.contains(EventMask::Q_OVERFLOW) {
                for event in [Event::NetDir, Event::Kubeconfig, Event::Token, Event::Binary] {
                    let _ = events.try_send(event);
                }
            } else if ev.wd == net_wd {
                if ev.mask.contains(EventMask::IGNORED) {
                    // The dir itself went away (or was unmounted): watch it again once it is back.
                    tracing::warn!(dir = %net_dir.display(), "the CNI net dir was removed; waiting for it to come back");
                    net_wd = arm(&mut watches, &net_dir, retry, &events).await;
                } else if let Some(event) = ev.name.as_deref().and_then(|n| relevant.event(n)) {
                    let _ = events.try_send(event);
                }
            } else if Some(&ev.wd) == token_wd.as_ref() {
                let _ = events.try_send(Event::Token);
            } else if let Some(i) = bin_wds.iter().position(|(wd, _)| *wd == ev.wd) {
                if ev.mask.contains(EventMask::IGNORED) {
                    // The bin dir itself went: the check says so (not ready); the
                    // backstop checks again until it is back.
                    let (_, dir) = bin_wds.swap_remove(i);
                    tracing::warn!(dir = %dir.display(), "the CNI bin dir was removed; checking the plugin binary every CFGCHECK_INTERVAL until it is back");
                    let _ = events.try_send(Event::Binary);
                } else if ev.name.as_deref().is_some_and(|n| relevant.is_binary(n)) {
                    let _ = events.try_send(Event::Binary);
                }
            }
        }
        tracing::error!("the inotify stream ended; relying on CFGCHECK_INTERVAL polling");
    });
    spawn_ticker(settings.cfgcheck_interval, Event::Backstop, tx.clone());
    spawn_ticker(settings.token_refresh_interval, Event::TokenTick, tx.clone());
    for kind in [SignalKind::terminate(), SignalKind::interrupt()] {
        let mut signals = signal(kind).map_err(InstallError::runtime("installing a signal handler"))?;
        let tx = tx.clone();
        tokio::spawn(async move {
            signals.recv().await;
            let _ = tx.send(Event::Shutdown).await;
        });
    }
    Ok(())
}

/// Watches the net dir, retrying every `retry` until it exists; then sends an event,
/// since whatever happened while it was not watched was missed.
async fn arm(watches: &mut Watches, dir: &Path, retry: Duration, events: &Sender<Event>) -> WatchDescriptor {
    let mut logged = false;
    loop {
        match watches.add(dir, net_dir_mask()) {
            Ok(wd) => {
                for event in [Event::NetDir, Event::Kubeconfig] {
                    let _ = events.try_send(event);
                }
                return wd;
            }
            Err(e) if !logged => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the CNI net dir yet; retrying");
                logged = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(retry).await;
    }
}

struct Relevant {
    kubeconfig: String,
    binary: String,
}

impl Relevant {
    /// The event for a name in the net dir: configuration files and our kubeconfig;
    /// not temp files (ours included) or anything else.
    fn event(&self, name: &OsStr) -> Option<Event> {
        match name.to_str()? {
            n if conflist::is_conf_name(n) => Some(Event::NetDir),
            n if n == self.kubeconfig => Some(Event::Kubeconfig),
            _ => None,
        }
    }

    /// Whether a name in a bin dir is our binary's (not its temp files, not other plugins).
    fn is_binary(&self, name: &OsStr) -> bool {
        name.to_str() == Some(self.binary.as_str())
    }
}

fn spawn_ticker(period: Duration, event: Event, tx: Sender<Event>) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let _ = tx.try_send(event);
        }
    });
}
