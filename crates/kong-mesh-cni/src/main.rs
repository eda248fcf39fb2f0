//! `kong-mesh-cni`: every role of the Kong Mesh CNI in one static binary. Each
//! subcommand lives in its own module or crate; this file only dispatches.

mod rules_cmd;

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show, apply, verify or remove the redirect rules of a pod.
    Rules(rules_cmd::RulesArgs),
    /// Prove from inside a pod that its traffic is redirected (the kuma-validation init
    /// container); exits 97 when it is not.
    Validate(validator::ValidateArgs),
    /// Install the plugin on this node and keep it chained until SIGTERM (the
    /// DaemonSet's container; also what the binary runs when invoked as `install-cni`).
    Install(Box<installer::InstallArgs>),
    /// Print the Kubernetes manifests (the Helm chart, rendered) for an environment
    /// preset: `kong-mesh-cni manifests --preset kind | kubectl apply -f -`.
    Manifests(manifests::ManifestsArgs),
    /// Run the control-plane controllers until SIGTERM: node taint until the CNI is
    /// ready, NetworkAttachmentDefinitions for Multus, repair of pods that raced the CNI.
    Controller(controller::ControllerArgs),
}

fn main() -> ExitCode {
    // The container runtime calls us with CNI_COMMAND set (under whatever name the
    // binary was installed as, kong-mesh-cni or kuma-cni): we are the plugin.
    if std::env::var_os("CNI_COMMAND").is_some() {
        return cni::plugin::main();
    }
    let cli = Cli::parse_from(installer::entrypoint_args(std::env::args_os()));
    ops::init_logging(&cli.log_level);
    match cli.command {
        Command::Rules(args) => rules_cmd::run(args),
        Command::Validate(args) => validator::run(args),
        Command::Install(args) => installer::run(*args),
        Command::Manifests(args) => manifests::run(args),
        Command::Controller(args) => controller::run(args),
    }
}
