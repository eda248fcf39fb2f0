//! `kong-mesh-cni controller`: its exit codes. The flags are [`controller::ControllerArgs`],
//! which the controller's tests and benchmark parse too.

use std::process::ExitCode;

use controller::ControllerArgs;

pub fn run(args: ControllerArgs) -> ExitCode {
    super::raise_fd_limit();
    match controller::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "controller stopped");
            ExitCode::FAILURE
        }
    }
}
