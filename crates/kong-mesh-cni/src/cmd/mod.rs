//! Every subcommand's flags and exit codes; the work is done by the library crates.

mod controller;
mod install;
mod manifests;
mod rules;
mod status;
mod validate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kong-mesh-cni",
    version,
    about = "The Kong Mesh CNI: transparent-proxy redirect for mesh pods, programmed from the node"
)]
struct Cli {
    /// Log level: off, error, warn, info, debug or trace.
    #[arg(long, global = true, env = "CNI_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Log lines as text, or as one JSON object per line (the plugin's relayed lines too).
    #[arg(long, global = true, env = "CNI_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: ops::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show, apply, verify or remove the redirect rules of a pod.
    Rules(rules::RulesArgs),
    /// Prove from inside a pod that its traffic is redirected (the kuma-validation init
    /// container); exits 97 when it is not.
    Validate(validate::ValidateArgs),
    /// Install the plugin on this node and keep it chained until SIGTERM (the
    /// DaemonSet's container; also what the binary runs when invoked as `install-cni`).
    Install(Box<installer::InstallArgs>),
    /// Print the Kubernetes manifests (the Helm chart, rendered) for an environment
    /// preset: `kong-mesh-cni manifests --preset kind | kubectl apply -f -`.
    Manifests(manifests::ManifestsArgs),
    /// Run the control-plane controllers until SIGTERM: node taint until the CNI is
    /// ready, NetworkAttachmentDefinitions for Multus, repair of pods that raced the CNI.
    Controller(Box<::controller::ControllerArgs>),
    /// This node's CNI at a glance (run in the DaemonSet's container: `kubectl exec
    /// ds/kong-mesh-cni -- kong-mesh-cni status`); exits 1 when the node is not ready.
    Status(Box<status::StatusArgs>),
}

/// Parses the command line (as `install` when invoked as `install-cni`) and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse_from(installer::entrypoint_args(std::env::args_os()));
    // The installer's event loop must never wait for stderr (a stalled log collector);
    // the short commands' lines stay in order with their output.
    let _log_writer = match &cli.command {
        Command::Install(_) => Some(ops::init_logging_non_blocking(&cli.log_level, cli.log_format)),
        _ => {
            ops::init_logging(&cli.log_level, cli.log_format);
            None
        }
    };
    match cli.command {
        Command::Rules(args) => rules::run(args),
        Command::Validate(args) => validate::run(args),
        Command::Install(args) => install::run(*args, &cli.log_level, cli.log_format),
        Command::Manifests(args) => manifests::run(args),
        Command::Controller(args) => controller::run(*args),
        Command::Status(args) => status::run(*args),
    }
}

/// The long-running roles hold a watch, a listener and connections: allow them every
/// descriptor the process may have.
fn raise_fd_limit() {
    if let Err(e) = ops::raise_fd_limit() {
        tracing::warn!("cannot raise the open-files limit: {e}");
    }
}
