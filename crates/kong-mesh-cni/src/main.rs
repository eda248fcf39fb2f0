//! `kong-mesh-cni`: every role of the Kong Mesh CNI in one static binary. The
//! subcommands live in `cmd`; this file only tells the plugin from the CLI.

mod cmd;

use std::process::ExitCode;

fn main() -> ExitCode {
    // The container runtime calls us with CNI_COMMAND set (under whatever name the
    // binary was installed as, kong-mesh-cni or kuma-cni): we are the plugin.
    if std::env::var_os("CNI_COMMAND").is_some() {
        return cni::plugin::main();
    }
    cmd::main()
}
