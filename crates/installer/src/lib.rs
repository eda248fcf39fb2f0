//! The Kong Mesh CNI installer (`kong-mesh-cni install`, the image's `/install-cni`):
//! copies the plugin binary to the host, writes the plugin's kubeconfig, chains the
//! plugin into the primary CNI's configuration (or writes a standalone conf for
//! Multus), keeps all of it in place from file watches, programs in place the redirect
//! of pods the plugin let through while the API server could not be asked, and removes
//! it all on SIGTERM when it is being uninstalled (not on a rolling update).
//!
//! Pure parts: [`template`], [`conflist`] and [`plan`] (what to write), [`kubeconfig`],
//! [`throttle`] and [`machine`] (what to do after which events), [`inplace`] (in-place
//! repair) and [`shutdown`] (what SIGTERM removes). I/O edges: [`fsio`], [`sources`]
//! (inotify, timers, signals), [`health`], the plugin's log relay ([`logsock`]), the
//! API calls ([`api`]), the repair agent, and the loop in [`daemon`]. With `NODE_NAME`
//! set it is also the node agent ([`agent`], deciding with [`podcache`]): the plugin's
//! pod lookups are answered from a watch of this node's pods.

pub mod agent;
pub mod api;
pub mod args;
pub mod conflist;
pub mod daemon;
mod ebpf;
mod error;
pub mod events;
pub mod fsio;
pub mod health;
pub mod inplace;
mod jsontext;
pub mod kubeconfig;
pub mod loglevel;
pub mod logsock;
pub mod machine;
pub mod plan;
pub mod podcache;
mod repair_agent;
pub mod requests;
mod rootsock;
pub mod shutdown;
mod sources;
pub mod status;
pub mod template;
pub mod throttle;

use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;

pub use args::{InstallArgs, Settings};
pub use daemon::Installer;
pub use error::InstallError;
use logsock::LogSocket;
pub use machine::Event;

/// The image's entrypoint name: invoked as this, the binary runs `install`.
const ENTRYPOINT: &str = "install-cni";

/// Command-line arguments with `install` inserted when the binary was invoked as
/// `install-cni` (the image's `/install-cni` is this binary under that name).
pub fn entrypoint_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut args: Vec<OsString> = args.into_iter().collect();
    if args.first().and_then(|a| Path::new(a).file_name()).is_some_and(|n| n == ENTRYPOINT) {
        args.insert(1, "install".into());
    }
    args
}

/// Each pod GET of the in-place repair (retried while the API server is away).
const REPAIR_LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// One thread is plenty for a loop that mostly sleeps, and keeps the resident memory
/// of a process that runs on every node small.
pub fn run(settings: Settings) -> Result<(), InstallError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(InstallError::runtime("starting the runtime"))?;
    runtime.block_on(async {
        // A loop that misses several backstop ticks is stuck.
        let stale_after = (settings.cfgcheck_interval * 5).max(std::time::Duration::from_secs(10));
        let mut status = health::Status::new(stale_after);
        if settings.ebpf.is_some() {
            status.register_ebpf();
        }
        let plugin_metrics = settings.sleep.then(|| status.register_plugin(&settings.run_dir));
        let agent_settings = settings.agent().filter(|_| settings.sleep);
        let cached = agent_settings.as_ref().map(|_| status.register_agent());
        let status = Arc::new(status);
        if settings.health_port != 0 {
            let listener = ops::bind(settings.health_address, settings.health_port).await?;
            tokio::spawn(ops::serve(listener, status.clone(), health::SERVE_OPTIONS));
        }
        // Every plugin line, unless a level file says otherwise: the plugin filters at its conf's level.
        let relay_level = loglevel::RelayLevel::new(ops::loglevel::Level::Trace);
        if settings.sleep {
            loglevel::start(
                settings.log_level_file.clone(),
                settings.log_level,
                settings.run_dir.clone(),
                relay_level.clone(),
            );
            loglevel::pass_format(&settings.run_dir, settings.log_format);
        }
        // Plugin logs matter only while we run; without the relay the plugin writes
        // them to a file on the host, so a failure here does not stop the install.
        let log_socket = match &settings.log_socket {
            Some(path) if settings.sleep => LogSocket::start(path, std::io::stderr(), relay_level, settings.log_format)
                .inspect_err(|e| tracing::warn!("{e}; plugin logs go to its file on the host"))
                .ok(),
            _ => None,
        };
        // Like the relay: without the agent the plugin asks the API server itself.
        let agent = match (agent_settings, cached) {
            (Some(agent), Some(cached)) => agent::Agent::start(agent, cached)
                .inspect_err(|e| tracing::warn!("{e}; the plugin asks the API server for every pod"))
                .ok(),
            _ => None,
        };
        // Events on pods, from the plugin's records and the in-place repairs.
        let events = match &settings.node_name {
            Some(node) if settings.sleep => Some(events::Events::start(api::Identity::new(&settings), node.clone())),
            _ => None,
        };
        let to_pods = events.clone();
        let on_record = move |record: cni::plugin::record::Record| {
            if let (Some(events), Some(notice)) = (&to_pods, events::Notice::of(&record)) {
                events.offer(notice);
            }
        };
        // Without it the plugin's records are dropped (and counted in the run dir).
        let records = match plugin_metrics {
            Some(metrics) => requests::Receiver::start(&settings.run_dir, metrics, on_record)
                .inspect_err(|e| tracing::warn!("{e}; the plugin's calls are not counted"))
                .ok(),
            None => None,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        sources::spawn(&settings, tx)?;
        if settings.sleep {
            let identity = api::Identity::new(&settings);
            let lookup = identity.clone().pod_lookup(REPAIR_LOOKUP_TIMEOUT);
            repair_agent::spawn(settings.run_dir.clone(), lookup, identity, events);
        }
        let result = Installer::new(settings, status).run(rx).await;
        if let Some(socket) = log_socket {
            socket.close();
        }
        if let Some(agent) = agent {
            agent.close();
        }
        if let Some(records) = records {
            records.close();
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_cni_name_runs_install() {
        let args = |v: &[&str]| entrypoint_args(v.iter().map(OsString::from));
        assert_eq!(args(&["/install-cni", "--sleep", "false"]), ["/install-cni", "install", "--sleep", "false"]);
        assert_eq!(args(&["install-cni"]), ["install-cni", "install"]);
        assert_eq!(args(&["/usr/bin/kong-mesh-cni", "rules"]), ["/usr/bin/kong-mesh-cni", "rules"]);
    }
}
