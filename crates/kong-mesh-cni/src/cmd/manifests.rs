//! `kong-mesh-cni manifests`: the chart's manifests for an environment preset, as
//! multi-document YAML on stdout (pipe it to `kubectl apply -f -`).

use std::path::PathBuf;
use std::process::ExitCode;

use manifests::{Chart, Error, Options, to_stream};

#[derive(clap::Args, Debug, Clone)]
#[command(about = "Print the CNI's Kubernetes manifests (the Helm chart, rendered) for an environment preset")]
pub struct ManifestsArgs {
    /// Environment preset: eks, aks, aks-overlay, calico, cilium, cilium-pre-1.14,
    /// gke-cilium, gke-calico, gke-dataplane-v2, k3d-flannel, kind, openshift-3.11,
    /// openshift-4 (--list-presets describes them). Without it: the chart's defaults
    /// (OpenShift with Multus).
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// Set a chart value with Helm's --set syntax (e.g. cni.logLevel=debug,
    /// cni.excludeNamespaces={kube-system,monitoring}); repeatable, applied after the
    /// preset and the values files.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Like --set, but every value stays a string.
    #[arg(long = "set-string", value_name = "KEY=VALUE")]
    pub set_string: Vec<String>,
    /// A values file applied after the preset (Helm's -f); repeatable.
    #[arg(short = 'f', long = "values", value_name = "FILE")]
    pub values: Vec<PathBuf>,
    /// Namespace of the DaemonSet, the controller and their service accounts (the
    /// chart's cni.namespace; default kube-system).
    #[arg(short = 'n', long, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// Release name, shown in the app.kubernetes.io/instance label.
    #[arg(long, default_value = "kong-mesh-cni")]
    pub release_name: String,
    /// List the presets with a line about each, and exit.
    #[arg(long)]
    pub list_presets: bool,
}

pub fn run(args: ManifestsArgs) -> ExitCode {
    let chart = Chart::embedded();
    if args.list_presets {
        for (name, summary) in chart.presets() {
            println!("{name:<18} {summary}");
        }
        return ExitCode::SUCCESS;
    }
    let mut values = Vec::new();
    for path in &args.values {
        match std::fs::read_to_string(path) {
            Ok(text) => values.push(text),
            Err(e) => {
                eprintln!("Error: reading values file {}: {e}", path.display());
                return ExitCode::from(2);
            }
        }
    }
    let opts = Options {
        release_name: args.release_name,
        namespace: args.namespace,
        preset: args.preset,
        values,
        set: args.set,
        set_string: args.set_string,
    };
    match chart.render(&opts) {
        Ok(manifests) => {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            // A closed pipe (`| head`) is not an error worth a message.
            let _ = out.write_all(to_stream(&manifests).as_bytes()).and_then(|()| out.flush());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("Error: {e}");
            match e {
                Error::Preset(..) | Error::Set(_) | Error::Values(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
