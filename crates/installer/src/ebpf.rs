//! eBPF mode on the installer's side: the programs loaded for the node before the
//! plugin is chained, kept attached, and unloaded only on a real uninstall.
//!
//! Every start loads them: a restart or a DaemonSet upgrade adopts the pinned maps (so
//! every registration) and swaps its programs into the pinned links, which the kernel
//! does atomically, so there is no moment without a redirect. A later check that
//! finds a link gone loads them again.

use std::time::{Duration, Instant};

use ebpf::Paths;

use crate::InstallError;
use crate::health::Status;

/// A failed load is tried again no sooner than this (a verifier rejection would
/// otherwise cost a full load at every backstop tick).
const RETRY_AFTER: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct EbpfMode {
    paths: Paths,
    /// Why the programs are not in place.
    state: Result<(), String>,
    last_failure: Option<Instant>,
    /// The last failure to sweep the registrations of gone pods, logged once.
    sweep_failure: Option<String>,
}

impl EbpfMode {
    pub fn new(paths: Paths) -> EbpfMode {
        EbpfMode {
            paths,
            state: Err("the eBPF programs are not loaded yet".into()),
            last_failure: None,
            sweep_failure: None,
        }
    }

    /// Why the plugin may not be chained yet (`None`: the programs are in place).
    pub fn problem(&self) -> Option<&str> {
        self.state.as_ref().err().map(String::as_str)
    }

    /// Loads the programs at the first check and whenever one is found detached,
    /// unregisters pods whose namespace went without a DEL, and shows the registered
    /// pods in the metrics.
    pub fn check(&mut self, status: &Status, now: Instant) {
        let pinned = ebpf::status(&self.paths).ok();
        let due = match (&self.state, self.last_failure) {
            (Ok(()), _) => !pinned.as_ref().is_some_and(ebpf::Status::complete),
            (Err(_), None) => true,
            (Err(_), Some(failed)) => now.duration_since(failed) >= RETRY_AFTER,
        };
        if due {
            self.load(status, now);
        }
        if self.state.is_ok() {
            self.sweep();
        }
        if let Ok(s) = ebpf::status(&self.paths) {
            status.set_ebpf_pods(s.registered_pods);
        }
    }

    fn load(&mut self, status: &Status, now: Instant) {
        if self.state.is_ok() {
            tracing::warn!(dir = %self.paths.pin_dir().display(), "an eBPF program was detached from outside: loading them again");
        }
        let first = !self.paths.pin_dir().exists();
        match ebpf::install(&self.paths) {
            Ok(installed) => {
                let how = if installed.replaced {
                    "adopted the pinned maps and links of a previous run and swapped in our programs"
                } else {
                    "loaded and attached"
                };
                tracing::info!(
                    bpffs = %self.paths.bpffs.display(),
                    cgroup = %self.paths.cgroup.display(),
                    kernel = %installed.kernel,
                    "eBPF programs {how}"
                );
                self.state = Ok(());
                self.last_failure = None;
            }
            Err(e) => {
                status.ebpf_load_failed();
                // A first load that failed midway leaves nothing behind; a failed
                // upgrade keeps the programs already attached (and their redirect).
                if first && let Err(cleanup) = ebpf::uninstall(&self.paths) {
                    tracing::warn!(error = %cleanup, "cannot remove what the failed eBPF load left");
                }
                let why = format!("eBPF mode: {e}");
                if self.problem() != Some(why.as_str()) {
                    tracing::error!("{why}");
                }
                self.state = Err(why);
                self.last_failure = Some(now);
            }
        }
    }

    fn sweep(&mut self) {
        let failure = ebpf::Registry::open(&self.paths).and_then(|mut r| r.sweep()).err().map(|e| e.to_string());
        if let Some(why) = &failure
            && self.sweep_failure.as_ref() != Some(why)
        {
            tracing::warn!(error = %why, "cannot unregister the pods whose network namespace is gone");
        }
        self.sweep_failure = failure;
    }

    /// Uninstall: detaches and unpins everything of ours from the bpffs.
    pub fn unload(&self) -> Result<(), InstallError> {
        ebpf::uninstall(&self.paths)?;
        tracing::info!(dir = %self.paths.pin_dir().display(), "eBPF programs detached and unpinned");
        Ok(())
    }
}
