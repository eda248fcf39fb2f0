//! `kmc-demo [BINARY]`: runs the node demo and prints its report. BINARY defaults to
//! the kong-mesh-cni built next to this program. Needs root.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    if !testkit::net::require_root() {
        eprintln!("the demo creates network namespaces and bridges: run it as root");
        return ExitCode::FAILURE;
    }
    let binary = std::env::args_os().nth(1).map(PathBuf::from).unwrap_or_else(|| {
        let me = std::env::current_exe().expect("the demo's own path");
        me.with_file_name("kong-mesh-cni")
    });
    match demo::run(&binary) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
