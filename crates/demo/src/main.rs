//! `kmc-demo [--node] [BINARY]`: runs the node demo and prints its report. BINARY
//! defaults to the kong-mesh-cni built next to this program. Needs root.
//!
//! Without `--node`: the quick demo (a real API server, a node simulated in temporary
//! directories, pods attached through the reference CNI runtime). With `--node`: a
//! real node (kubelet, containerd, the control plane), our CNI installed from our chart
//! and image, pods started by the kubelet.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    if !testkit::net::require_root() {
        eprintln!("the demo creates network namespaces and bridges: run it as root");
        return ExitCode::FAILURE;
    }
    let mut args: Vec<_> = std::env::args_os().skip(1).collect();
    let real_node = args.first().is_some_and(|a| a == "--node");
    if real_node {
        args.remove(0);
    }
    let binary = args.first().map(PathBuf::from).unwrap_or_else(|| {
        let me = std::env::current_exe().expect("the demo's own path");
        me.with_file_name("kong-mesh-cni")
    });
    let report = if real_node {
        demo::real_node::run(&binary).map(|r| r.to_string())
    } else {
        demo::run(&binary).map(|r| r.to_string())
    };
    match report {
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
