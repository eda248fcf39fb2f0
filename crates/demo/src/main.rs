//! `kmc-demo [--node [--multus] [--network N] | --iptables-backend B] [BINARY]`: runs the node demo and prints its
//! report. BINARY defaults to the kong-mesh-cni built next to this program. Needs root.
//!
//! Without `--node`: the quick demo (a real API server, a node simulated in temporary
//! directories, pods attached through the reference CNI runtime). With `--node`: a
//! real node (kubelet, containerd, the control plane), our CNI installed from our chart
//! and image, pods started by the kubelet; `--multus` puts thin Multus in front and uses
//! the chart's defaults (not chained), as on OpenShift.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use testkit::node::ClusterNetwork;

/// Runs the node demo and prints its report (needs root).
#[derive(Parser)]
struct Args {
    /// The real node instead of the simulated one.
    #[arg(long, conflicts_with = "iptables_backend")]
    node: bool,
    /// With --node: the chart's default mode behind thin Multus instead of chained.
    #[arg(long, requires = "node")]
    multus: bool,
    /// With --node: the node's cluster network.
    #[arg(long, requires = "node", value_enum, default_value_t = Network::Bridge)]
    network: Network,
    /// The quick demo's plugin iptables_backend: auto, nft, legacy or nftables (the
    /// native nf_tables backend); unset, the plugin's default (auto).
    #[arg(long, env = "KMC_IPTABLES_BACKEND")]
    iptables_backend: Option<String>,
    /// The kong-mesh-cni binary; defaults to the one built next to this program.
    binary: Option<PathBuf>,
}

/// The node's cluster network (testkit's [`ClusterNetwork`]).
#[derive(Clone, Copy, clap::ValueEnum)]
enum Network {
    /// bridge + host-local + portmap.
    Bridge,
    /// kind's kindnet: ptp + host-local + portmap.
    Kindnet,
    /// K3D's Flannel: flanneld (host-gw) and the flannel plugin delegating to bridge.
    Flannel,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !testkit::net::require_root() {
        eprintln!("the demo creates network namespaces and bridges: run it as root");
        return ExitCode::FAILURE;
    }
    let binary = args.binary.unwrap_or_else(|| {
        let me = std::env::current_exe().expect("the demo's own path");
        me.with_file_name("kong-mesh-cni")
    });
    let report = match args.node {
        true => {
            let mode = if args.multus { demo::real_node::Mode::Multus } else { demo::real_node::Mode::Chained };
            let network = match args.network {
                Network::Bridge => ClusterNetwork::Bridge,
                Network::Kindnet => ClusterNetwork::Kindnet,
                Network::Flannel => ClusterNetwork::Flannel,
            };
            demo::real_node::run(&binary, mode, network).map(|r| r.to_string())
        }
        false => demo::run(&binary, args.iptables_backend.as_deref()).map(|r| r.to_string()),
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
