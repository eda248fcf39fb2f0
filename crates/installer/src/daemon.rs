//! The event loop: each batch of events goes through [`Machine::decide`], the checks
//! it calls for read the host dirs, decide with the pure planners, and write.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::Receiver;

use crate::api::Identity;
use crate::args::{Mode, Settings, Uninstall};
use crate::ebpf::EbpfMode;
use crate::health::{State, Status};
use crate::kubeconfig;
use crate::machine::{Checks, Event, Gate, Machine, Step};
use crate::plan::{self, Plan};
use crate::shutdown::{self, Verdict};
use crate::throttle::{Fight, Throttle};
use crate::{InstallError, fsio};

/// The question to the API server at SIGTERM: well inside the pod's grace period (10 s).
const SHUTDOWN_QUERY: std::time::Duration = std::time::Duration::from_secs(3);

/// Why a part is not in place: the state it puts the installer in, and the reason.
type Problem = (State, String);

pub struct Installer {
    s: Settings,
    machine: Machine,
    status: Arc<Status>,
    binary: Result<(), String>,
    /// Per bin dir, the binary as we last verified or wrote it: while it stays that
    /// file, a check is one stat.
    binary_ids: Vec<Option<fsio::FileId>>,
    kubeconfig: Result<(), String>,
    /// The file holding our entry (or our standalone conf) when in place.
    chain: Result<String, Problem>,
    /// The file our entry went into last: auto-detection may move on to another one,
    /// and then we leave this one as we found it.
    chained_file: Option<String>,
    ready: bool,
    /// eBPF mode: the node's programs, in place before the plugin is chained.
    ebpf: Option<EbpfMode>,
}

impl Installer {
    pub fn new(settings: Settings, status: Arc<Status>) -> Installer {
        let throttle = Throttle::new(settings.repair_limit, settings.repair_window);
        Installer {
            ebpf: settings.ebpf.clone().map(EbpfMode::new),
            binary_ids: vec![None; settings.bin_dirs.len()],
            s: settings,
            machine: Machine::new(throttle),
            status,
            binary: Err("not installed yet".into()),
            kubeconfig: Err("not written yet".into()),
            chain: Err((State::Starting, "starting".into())),
            chained_file: None,
            ready: false,
        }
    }

    /// Runs until `Shutdown` (then removes everything of ours), or, with `SLEEP=false`,
    /// until installed. Returns when `events` closes, leaving everything in place.
    pub async fn run(mut self, mut events: Receiver<Event>) -> Result<(), InstallError> {
        self.start();
        let mut batch = vec![Event::Backstop];
        loop {
            // Let the sources forward what they already have, so that one pass covers
            // a burst of events.
            tokio::task::yield_now().await;
            while let Ok(event) = events.try_recv() {
                batch.push(event);
            }
            let now = Instant::now();
            let step = self.machine.decide(&batch, now);
            tracing::debug!(events = ?batch, ?step, "woke up");
            match step {
                Step::Remove => return self.shutdown().await,
                Step::Check(checks) => self.check(checks, now),
            }
            batch.clear();
            if !self.s.sleep && self.ready {
                tracing::info!("installed; SLEEP=false, so exiting without watching");
                return Ok(());
            }
            let next = match self.machine.wake_at() {
                Some(at) => tokio::select! {
                    event = events.recv() => event,
                    () = tokio::time::sleep_until(at.into()) => Some(Event::Wake),
                },
                None => events.recv().await,
            };
            match next {
                Some(event) => batch.push(event),
                None => return Ok(()),
            }
        }
    }

    fn start(&mut self) {
        let _ = fs::remove_file(&self.s.ready_file);
        for dir in std::iter::once(&self.s.net_dir).chain(&self.s.bin_dirs) {
            match fsio::remove_stale_temps(dir) {
                Ok(0) => {}
                Ok(n) => tracing::info!(dir = %dir.display(), count = n, "removed temp files a previous run left"),
                Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot clean up temp files"),
            }
        }
        let target = match &self.s.mode {
            Mode::Chained { conf_name: Some(name) } => format!("chained into {name}"),
            Mode::Chained { conf_name: None } => "chained into the first valid .conf/.conflist".into(),
            Mode::Standalone { conf_name } => format!("standalone as {conf_name}"),
        };
        tracing::info!(
            mode = %target,
            net_dir = %self.s.net_dir.display(),
            bin_dirs = ?self.s.bin_dirs,
            plugin = %self.s.ours.binary,
            "installing the Kong Mesh CNI plugin"
        );
    }

    fn check(&mut self, checks: Checks, now: Instant) {
        // Events held back by the throttle: nothing to look at, nothing changed.
        if checks == Checks::default() {
            return;
        }
        if checks.binary {
            self.check_binary();
        }
        if checks.kubeconfig {
            self.check_kubeconfig();
        }
        if let Some(ebpf) = &mut self.ebpf {
            ebpf.check(&self.status, now);
        }
        // Chained only once the programs are loaded: the plugin needs them for mesh pods.
        if checks.chain && self.ebpf.as_ref().is_none_or(|e| e.problem().is_none()) {
            self.check_chain(now);
        }
        if checks.chain {
            self.set_strays_aside();
        }
        self.status.beat();
        self.status.set_fighting(self.machine.fighting(now));
        self.update_readiness();
    }

    fn check_binary(&mut self) {
        let mut result = Ok(());
        for (dir, id) in self.s.bin_dirs.iter().zip(&mut self.binary_ids) {
            match fsio::ensure_binary(&self.s.binary_source, dir, &self.s.ours.binary, *id) {
                Ok((now, copied)) => {
                    if copied && id.is_some() {
                        tracing::warn!(path = %dir.join(&self.s.ours.binary).display(), "put the plugin binary back: something had deleted or replaced it");
                    } else if copied {
                        tracing::info!(path = %dir.join(&self.s.ours.binary).display(), "installed the plugin binary");
                    }
                    *id = Some(now);
                }
                Err(e) => {
                    *id = None;
                    result = Err(format!("cannot install the plugin binary in {}: {e}", dir.display()));
                }
            }
        }
        report_change(&self.binary, &result);
        self.binary = result;
    }

    fn check_kubeconfig(&mut self) {
        let result = self.write_kubeconfig();
        report_change(&self.kubeconfig, &result);
        self.kubeconfig = result;
    }

    fn write_kubeconfig(&self) -> Result<(), String> {
        let config = kubeconfig::from_files(&self.s.server, &self.s.ca_file, &self.s.token_file)?;
        let path = self.s.net_dir.join(&self.s.kubeconfig_name);
        match fsio::ensure_file(&self.s.net_dir, &self.s.kubeconfig_name, config.expose().as_bytes(), 0o600) {
            Ok(true) if self.kubeconfig.is_ok() => {
                tracing::info!(path = %path.display(), "rewrote the plugin's kubeconfig (token rotated, or the file changed)")
            }
            Ok(true) => {
                tracing::info!(path = %path.display(), server = %self.s.server, "wrote the plugin's kubeconfig")
            }
            Ok(false) => {}
            Err(e) => return Err(format!("cannot write the plugin's kubeconfig {}: {e}", path.display())),
        }
        Ok(())
    }

    fn check_chain(&mut self, now: Instant) {
        let snap = match fsio::snapshot(&self.s.net_dir, &self.s.host_net_dir, wanted_of(&self.s.mode)) {
            Ok(snap) => snap,
            Err(e) => {
                return self.set_chain(Err((
                    State::Waiting,
                    format!("cannot read the CNI net dir {}: {e}", self.s.net_dir.display()),
                )));
            }
        };
        let plan = plan_of(&self.s.mode, &snap, &self.s.ours);
        if let Plan::InPlace { file, .. } | Plan::Apply { file, .. } = &plan {
            self.leave_previous(file);
        }
        let gate = self.machine.gate(&plan, now);
        let path = |file: &str| self.s.net_dir.join(file).display().to_string();
        let result = match (plan, gate) {
            (Plan::InPlace { file, .. }, _) => {
                if self.chain.is_err() {
                    tracing::info!(path = %path(&file), "our plugin is in the CNI configuration");
                }
                Ok(file)
            }
            (Plan::Waiting { reason }, _) => Err((
                State::Waiting,
                format!("waiting for the primary CNI's configuration in {}: {reason}", self.s.net_dir.display()),
            )),
            (Plan::Refused { file, reason }, _) => {
                Err((State::Refused, format!("not touching {}: {reason}; will chain once it is fixed", path(&file))))
            }
            (Plan::Apply { file, .. }, Gate::Defer(at)) => Err((
                State::Degraded,
                format!(
                    "our entry is out of {}; the next repair is held back {:.1?}",
                    path(&file),
                    at.saturating_duration_since(now)
                ),
            )),
            (Plan::Apply { file, primary, ops }, Gate::Write { repair, fight }) => {
                let replan = |s: &plan::Snapshot| match plan_of(&self.s.mode, s, &self.s.ours) {
                    Plan::Apply { ops, .. } => ops,
                    _ => Vec::new(),
                };
                match write_plan(&self.s.net_dir, &self.s.host_net_dir, &ops, &snap, replan) {
                    Ok(()) => {
                        let primary = primary.join(", ");
                        if repair {
                            self.status.repaired();
                            tracing::info!(path = %path(&file), primary = %primary, "put our entry back: something had rewritten the file without it");
                        } else if primary.is_empty() {
                            tracing::info!(path = %path(&file), "wrote our own CNI configuration (not chained: Multus calls it)");
                        } else {
                            tracing::info!(path = %path(&file), primary = %primary, "chained our plugin into the CNI configuration");
                        }
                        if let Some(fight) = fight {
                            tracing::warn!("{}", fight_warning(&path(&file), &primary, fight));
                        }
                        self.chained_file = Some(file.clone());
                        Ok(file)
                    }
                    Err(e) => Err((State::Degraded, format!("cannot write {}: {e}", path(&file)))),
                }
            }
            (Plan::Apply { .. }, Gate::Idle) => unreachable!("an Apply plan is always written or deferred"),
        };
        self.set_chain(result);
    }

    /// Another configuration file of our network (one we did not write) goes out of use,
    /// renamed, not deleted: see [`plan::strays`].
    fn set_strays_aside(&self) {
        let dir = &self.s.net_dir;
        let (owned, standalone) = match &self.s.mode {
            Mode::Standalone { conf_name } => (Some(conf_name.as_str()), true),
            Mode::Chained { .. } => (self.chain.as_ref().ok().map(String::as_str), false),
        };
        let Ok(snap) = fsio::snapshot(dir, &self.s.host_net_dir, None) else { return };
        for name in plan::strays(owned, standalone, &snap, &self.s.ours) {
            match fsio::set_aside(dir, &name, plan::SET_ASIDE_SUFFIX) {
                Ok(aside) => tracing::warn!(
                    path = %dir.join(&name).display(),
                    renamed_to = %aside,
                    "set aside a stale configuration of our network that we did not write (Kuma's Go installer leaves one when killed): runtimes and Multus would use it instead of ours"
                ),
                // Gone meanwhile: nothing to set aside.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %dir.join(&name).display(), error = %e, "cannot set aside a stale configuration of our network")
                }
            }
        }
    }

    /// Auto-detection moved to another file: take our entry out of the one we used.
    fn leave_previous(&mut self, file: &str) {
        let Some(previous) = self.chained_file.take_if(|p| p.as_str() != file) else {
            return;
        };
        let replan = |s: &plan::Snapshot| plan::unchain(Some(&previous), s, &self.s.ours);
        let (dir, host_dir) = (&self.s.net_dir, &self.s.host_net_dir);
        let left = fsio::snapshot(dir, host_dir, plan::wanted(Some(&previous)))
            .and_then(|snap| write_plan(dir, host_dir, &replan(&snap), &snap, replan));
        match left {
            Ok(()) => {
                tracing::info!(from = %previous, to = %file, "the CNI configuration in use changed; took our entry out of the previous one")
            }
            Err(e) => {
                tracing::warn!(from = %previous, error = %e, "the CNI configuration in use changed, but our entry could not be taken out of the previous one")
            }
        }
    }

    fn set_chain(&mut self, result: Result<String, Problem>) {
        if let Err((state, why)) = &result
            && self.chain.as_ref().err().is_none_or(|(_, old)| old != why)
        {
            match state {
                State::Refused => tracing::warn!("{why}"),
                State::Degraded => tracing::debug!("{why}"),
                _ => tracing::info!("{why}"),
            }
        }
        self.chain = result;
    }

    fn update_readiness(&mut self) {
        let ebpf = self.ebpf.as_ref().and_then(EbpfMode::problem);
        let (state, detail) = match (&self.binary, &self.kubeconfig, &self.chain) {
            _ if let Some(why) = ebpf => (State::Refused, why.to_owned()),
            (Err(why), _, _) | (_, Err(why), _) => (State::Degraded, why.clone()),
            (_, _, Err((state, why))) => (*state, why.clone()),
            (Ok(()), Ok(()), Ok(file)) => (State::Ready, format!("chained in {file}")),
        };
        self.status.set(state, detail.clone());
        let ready = state == State::Ready;
        if ready == self.ready {
            return;
        }
        self.ready = ready;
        let path = &self.s.ready_file;
        let written = match ready {
            true => fs::write(path, "ready\n"),
            false => fs::remove_file(path)
                .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) }),
        };
        match (ready, written) {
            (true, Ok(())) => {
                tracing::info!(ready_file = %path.display(), "ready: binary, kubeconfig and CNI configuration in place")
            }
            (false, Ok(())) => tracing::info!(reason = %detail, "not ready"),
            (_, Err(e)) => tracing::error!(ready_file = %path.display(), error = %e, "cannot update the ready file"),
        }
    }

    /// SIGTERM: on an uninstall everything goes ([`Installer::remove`]); otherwise only
    /// readiness, and the next pod adopts what is on the node.
    async fn shutdown(&mut self) -> Result<(), InstallError> {
        let (namespace, name) = &self.s.daemonset;
        let verdict = match (self.s.uninstall, namespace) {
            (Uninstall::Always, _) => Verdict::Uninstall("KMC_UNINSTALL_ON_SIGTERM=always".into()),
            (Uninstall::Never, _) => Verdict::Keep("KMC_UNINSTALL_ON_SIGTERM=never".into()),
            (Uninstall::Auto, None) => Verdict::Keep(format!(
                "cannot tell whether DaemonSet {name} is being removed: its namespace is unknown (KMC_DAEMONSET_NAMESPACE, or the service account's namespace file); keeping the chain entry"
            )),
            (Uninstall::Auto, Some(namespace)) => {
                let answer = Identity::new(&self.s).daemonset(namespace, name, SHUTDOWN_QUERY).await;
                shutdown::decide(namespace, name, answer)
            }
        };
        match verdict {
            Verdict::Uninstall(why) => {
                tracing::info!(reason = %why, "shutting down: an uninstall");
                self.remove()
            }
            Verdict::Keep(why) => {
                self.status.set(State::Removing, "leaving the plugin in place");
                tracing::info!(reason = %why, "shutting down: leaving the plugin, its kubeconfig and our chain entry in place");
                fs::remove_file(&self.s.ready_file)
                    .or_else(not_found_ok)
                    .map_err(InstallError::io("removing", &self.s.ready_file))
            }
        }
    }

    /// The uninstall: readiness off first, then our entry out of the chain (the original
    /// `.conf` back), then the kubeconfig and the binary.
    fn remove(&mut self) -> Result<(), InstallError> {
        self.status.set(State::Removing, "removing");
        tracing::info!("shutting down: removing the plugin from this node");
        let mut first_error = None;
        let mut note = |r: Result<(), InstallError>| {
            if let Err(e) = r {
                tracing::error!("{e}");
                first_error.get_or_insert(e);
            }
        };
        note(
            fs::remove_file(&self.s.ready_file)
                .or_else(not_found_ok)
                .map_err(InstallError::io("removing", &self.s.ready_file)),
        );
        let unchained = self.remove_chain();
        if unchained.is_err() {
            // A conflist still naming us with the binary gone fails every pod's ADD.
            tracing::error!("our entry could not be taken out: keeping the plugin binary and its kubeconfig");
            note(unchained);
            return Err(first_error.expect("just noted"));
        }
        if let Some(ebpf) = &self.ebpf {
            note(ebpf.unload());
        }
        note(
            fsio::remove(&self.s.net_dir, &self.s.kubeconfig_name)
                .map_err(InstallError::io("removing", self.s.net_dir.join(&self.s.kubeconfig_name))),
        );
        for dir in &self.s.bin_dirs {
            note(
                fsio::remove(dir, &self.s.ours.binary)
                    .map_err(InstallError::io("removing", dir.join(&self.s.ours.binary))),
            );
        }
        match first_error {
            None => {
                tracing::info!("removed");
                Ok(())
            }
            Some(e) => Err(e),
        }
    }

    fn remove_chain(&self) -> Result<(), InstallError> {
        let dir = &self.s.net_dir;
        let (name, wanted) = match &self.s.mode {
            Mode::Chained { conf_name } => {
                let name = self.chained_file.as_deref().or(conf_name.as_deref());
                (name.map(str::to_string), plan::wanted(name))
            }
            Mode::Standalone { conf_name } => (Some(conf_name.clone()), plan::wanted(Some(conf_name))),
        };
        let replan = |snap: &plan::Snapshot| match &self.s.mode {
            Mode::Chained { .. } => plan::unchain(name.as_deref(), snap, &self.s.ours),
            Mode::Standalone { conf_name } => plan::standalone_removal(conf_name, snap, &self.s.ours),
        };
        let snap = fsio::snapshot(dir, &self.s.host_net_dir, wanted).map_err(InstallError::io("reading", dir))?;
        let ops = replan(&snap);
        write_plan(dir, &self.s.host_net_dir, &ops, &snap, replan)
            .map_err(InstallError::io("restoring the CNI configuration in", dir))?;
        if !ops.is_empty() {
            tracing::info!(file = name.as_deref().unwrap_or("(auto-detected)"), changes = ?ops_summary(&ops), "took our plugin out of the CNI configuration");
        }
        Ok(())
    }
}

/// The files of the net dir the mode's plan reads (`None`: every conf).
pub(crate) fn wanted_of(mode: &Mode) -> Option<Vec<String>> {
    match mode {
        Mode::Chained { conf_name } => plan::wanted(conf_name.as_deref()),
        Mode::Standalone { conf_name } => plan::wanted(Some(conf_name)),
    }
}

/// What the mode wants done with the net dir as `snap` shows it.
pub(crate) fn plan_of(mode: &Mode, snap: &plan::Snapshot, ours: &crate::template::Ours) -> Plan {
    match mode {
        Mode::Chained { conf_name } => plan::chain(conf_name.as_deref(), snap, ours),
        Mode::Standalone { conf_name } => plan::standalone(conf_name, snap, ours),
    }
}

/// Applies `ops`, made by `replan` from `snap`; a file another agent rewrote meanwhile
/// gets `replan`'s edit of its new content instead (see [`fsio::apply`]), or is left as
/// they wrote it when that needs none.
fn write_plan(
    dir: &Path,
    host_dir: &Path,
    ops: &[plan::FileOp],
    snap: &plan::Snapshot,
    replan: impl Fn(&plan::Snapshot) -> Vec<plan::FileOp>,
) -> std::io::Result<()> {
    fsio::apply(dir, host_dir, ops, snap, |name, theirs| {
        let mut now = snap.clone();
        now.insert(name.to_string(), Ok(theirs.to_vec()));
        replan(&now).into_iter().find_map(|op| match op {
            plan::FileOp::Write { name: n, content } if n == name => Some(content.into_bytes()),
            _ => None,
        })
    })
}

fn not_found_ok(e: std::io::Error) -> std::io::Result<()> {
    match e.kind() {
        std::io::ErrorKind::NotFound => Ok(()),
        _ => Err(e),
    }
}

fn ops_summary(ops: &[plan::FileOp]) -> Vec<String> {
    ops.iter()
        .map(|op| match op {
            plan::FileOp::Write { name, .. } => format!("wrote {name}"),
            plan::FileOp::Remove { name } => format!("removed {name}"),
        })
        .collect()
}

/// Logs a part going out of place (or failing differently than before).
fn report_change(old: &Result<(), String>, new: &Result<(), String>) {
    if let Err(why) = new
        && old.as_ref().err() != Some(why)
    {
        tracing::warn!("{why}");
    }
}

/// The warning when something keeps reverting us: the file, who is in it, what to do.
pub fn fight_warning(path: &str, primary: &str, fight: Fight) -> String {
    let name = Path::new(path).file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    let hint = match name.contains("cilium") || primary.contains("cilium") {
        true => {
            "Cilium removes other plugins from its configuration unless it is told not to: set the Helm value cni.exclusive=false (cni-exclusive: \"false\" in the cilium-config ConfigMap)."
        }
        false => {
            "Find the agent that rewrites this file (usually the primary CNI's node agent) and configure it to keep chained plugins."
        }
    };
    format!(
        "{path} keeps losing our entry: {} repairs in the last {:?}. Another agent is rewriting it (plugins in the file: {}). Repairs are now spaced {:?} apart. {hint}",
        fight.repairs,
        fight.window,
        if primary.is_empty() { "none" } else { primary },
        fight.spacing
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn fight_warning_names_the_file_and_the_cilium_fix() {
        let fight = Fight { repairs: 11, window: Duration::from_secs(30), spacing: Duration::from_secs(3) };
        let w = fight_warning("/host/etc/cni/net.d/05-cilium.conflist", "cilium-cni", fight);
        assert!(
            w.contains("05-cilium.conflist") && w.contains("cilium-cni") && w.contains("cni.exclusive=false"),
            "{w}"
        );
        let w = fight_warning("/host/etc/cni/net.d/10-azure.conflist", "azure-vnet, portmap", fight);
        assert!(w.contains("azure-vnet, portmap") && !w.contains("exclusive"), "{w}");
    }
}
