//! `kong-mesh-cni install` (the image's `/install-cni`): its exit codes. The flags are
//! [`installer::InstallArgs`], which the installer's own tests parse too.

use std::process::ExitCode;

use installer::{InstallArgs, InstallError, Settings};

/// Exit code for settings the installer cannot work with (a flag or variable names it).
const EXIT_BAD_SETTING: u8 = 2;

/// `log_level`: CNI_LOG_LEVEL (the global flag), where a level file, if any, starts from;
/// `log_format`: CNI_LOG_FORMAT, passed on to the plugin and the relay.
pub fn run(args: InstallArgs, log_level: &str, log_format: ops::LogFormat) -> ExitCode {
    super::raise_fd_limit();
    match Settings::from_args(args)
        .map(|s| Settings { log_level: log_level.parse().ok(), log_format, ..s })
        .and_then(installer::run)
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            match e {
                InstallError::Setting(_) | InstallError::Template(_) => ExitCode::from(EXIT_BAD_SETTING),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
