//! `kong-mesh-cni status`: the node's CNI at a glance, from inside the DaemonSet's
//! container (`kubectl exec ds/kong-mesh-cni -- kong-mesh-cni status`). It reads the
//! installer's own variables, so it looks where the installer looks.

use std::process::ExitCode;

use clap::{Args, ValueEnum};
use installer::{InstallArgs, Settings};

/// The node is not ready (the output names why).
const EXIT_NOT_READY: u8 = 1;
/// The installer's variables do not make sense (as `install` would say).
const EXIT_BAD_SETTING: u8 = 2;

#[derive(Args)]
pub struct StatusArgs {
    /// text: one screen for a person; json: the same, for scripts.
    #[arg(long, short, value_enum, default_value = "text")]
    output: Output,
    /// The installer's settings (its variables, as in the DaemonSet's container).
    #[command(flatten)]
    install: InstallArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

pub fn run(args: StatusArgs) -> ExitCode {
    let settings = match Settings::from_args(args.install) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("cannot tell where the installer works: {e}");
            return ExitCode::from(EXIT_BAD_SETTING);
        }
    };
    let status = installer::status::gather(&settings);
    match args.output {
        Output::Text => print!("{}", installer::status::render(&status, installer::status::now_unix())),
        Output::Json => println!("{}", serde_json::to_string_pretty(&status).unwrap_or_default()),
    }
    match status.ready {
        true => ExitCode::SUCCESS,
        false => ExitCode::from(EXIT_NOT_READY),
    }
}
