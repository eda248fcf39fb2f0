//! `kong-mesh-cni rules`: the decision and rules for a pod object, and acting on a
//! namespace with them, for people debugging a node and for scripts.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{ArgAction, Args};
use k8s_openapi::api::core::v1::Pod;
use kuma::Config;
use kuma::pod::Decision;
use netfilter::{BackendChoice, BackendKind, NsFacts, Options};
use netns::NetNs;

/// Exit codes: the contract for scripts.
const EXIT_FAILED: u8 = 1;
const EXIT_INVALID_INPUT: u8 = 2;

#[derive(Args)]
pub struct RulesArgs {
    /// The Pod object, as `kubectl get pod -o yaml` (or `-o json`) prints it.
    #[arg(long, value_name = "FILE")]
    pod: PathBuf,
    /// The pod's network namespace (such as /var/run/netns/NAME) to act on.
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// Program the rules into --netns (replacing ours if present).
    #[arg(long, requires = "netns", conflicts_with_all = ["verify", "remove"])]
    apply: bool,
    /// Check that every rule is present in --netns; exit 1 and list what is missing if not.
    #[arg(long, requires = "netns", conflicts_with = "remove")]
    verify: bool,
    /// Remove every chain and rule of ours from --netns.
    #[arg(long, requires = "netns")]
    remove: bool,
    /// Firewall backend: auto, nft, legacy (iptables) or nftables (native, over netlink).
    #[arg(long, env = "KMC_IPTABLES_BACKEND", default_value = "auto")]
    iptables_backend: String,
    /// Directory for per-namespace xtables lock files (legacy backend).
    #[arg(long, env = "KMC_RUN_DIR", default_value = "/run/kong-mesh-cni")]
    run_dir: PathBuf,
    /// Without --netns: show the IPv6 rules too, as for a pod with an IPv6 address.
    #[arg(long, action = ArgAction::Set, default_value_t = true, value_name = "BOOL")]
    ipv6: bool,
}

/// A failure, with the exit code it maps to.
struct Failure(u8, String);

pub fn run(args: RulesArgs) -> ExitCode {
    match execute(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, message)) => {
            eprintln!("error: {message}");
            ExitCode::from(code)
        }
    }
}

fn invalid(message: impl Into<String>) -> Failure {
    Failure(EXIT_INVALID_INPUT, message.into())
}

fn failed(message: impl ToString) -> Failure {
    Failure(EXIT_FAILED, message.to_string())
}

fn read_pod(path: &Path) -> Result<Pod, Failure> {
    let text =
        std::fs::read_to_string(path).map_err(|e| invalid(format!("cannot read pod file {}: {e}", path.display())))?;
    // JSON is YAML too, so one parser reads both.
    serde_norway::from_str(&text).map_err(|e| invalid(format!("pod file {} is not a Pod object: {e}", path.display())))
}

fn execute(args: &RulesArgs) -> Result<(), Failure> {
    let backend: BackendChoice =
        args.iptables_backend.parse().map_err(|e: netfilter::FirewallError| invalid(e.to_string()))?;
    let pod = read_pod(&args.pod)?;
    let meta = &pod.metadata;
    let name = format!("{}/{}", meta.namespace.as_deref().unwrap_or("-"), meta.name.as_deref().unwrap_or("-"));
    let decision = kuma::pod::decide(&pod).map_err(|e| invalid(format!("pod {name}: {e}")))?;
    let cfg = match decision {
        Decision::PassThrough(reason) => {
            println!("pod {name}: pass through ({reason})");
            return Ok(());
        }
        Decision::Intercept(cfg) => cfg,
    };
    println!("pod {name}: intercept");
    let ns = match &args.netns {
        None => return print_plan(&cfg, &NsFacts { has_ipv6: args.ipv6, ..Default::default() }, backend),
        Some(path) => NetNs::open(path).map_err(|e| invalid(e.to_string()))?,
    };
    let opts = Options { backend, lock_dir: args.run_dir.clone(), ..Options::default() };
    if args.apply {
        let r = netfilter::apply(&ns, &cfg, &opts).map_err(failed)?;
        let families: Vec<&str> = r.families.iter().map(|f| f.as_str()).collect();
        println!(
            "applied {} rules ({}) with {} ({})",
            r.rules,
            families.join(", "),
            r.backend.label(),
            r.backend_reason
        );
    } else if args.verify {
        let r = netfilter::verify(&ns, &cfg, &opts).map_err(failed)?;
        if !r.missing.is_empty() {
            for line in &r.missing {
                println!("missing {line}");
            }
            return Err(failed(format!("{} expected rules are missing from {}", r.missing.len(), ns.path().display())));
        }
        println!("all rules present ({})", r.backend.label());
    } else if args.remove {
        let r = netfilter::remove(&ns, Some(&cfg), &opts).map_err(failed)?;
        let what: Vec<String> = r.removed.iter().map(|(b, f)| format!("{f} ({})", b.label())).collect();
        match what.is_empty() {
            true => println!("nothing of ours was there"),
            false => println!("removed our rules: {}", what.join(", ")),
        }
    } else {
        let facts = ns.run(NsFacts::read).map_err(|e| failed(e.to_string()))?;
        return print_plan(&cfg, &facts, backend);
    }
    Ok(())
}

/// The rules as iptables-restore input, or for the native backend as `nft list table`
/// prints our tables.
fn print_plan(cfg: &Config, facts: &NsFacts, backend: BackendChoice) -> Result<(), Failure> {
    for set in netfilter::plan(cfg, facts, &Options::default()).map_err(failed)? {
        if backend == BackendChoice::Forced(BackendKind::Native) {
            let table = rules::nft::translate(&set);
            println!("# {}: {} rules", set.family, table.rule_count());
            print!("{table}");
            continue;
        }
        println!("# {}: {} rules", set.family, set.rule_count());
        print!("{}", rules::restore::install_payload(&set));
    }
    Ok(())
}
