//! The CNI plugin. [`run`] takes the environment and stdin and returns what to print
//! and the exit code, so tests drive it directly; `main` only does the process I/O.
//!
//! What is not ours is never blocked by our trouble: pods in excluded namespaces pass
//! without an API call, DEL never fails, a logging failure is ignored, and when the API
//! server cannot say what a pod is, `on_api_error` decides (default: let it start).

pub mod applied;
pub mod ask;
mod conf;
pub mod ebpf;
pub mod logging;
mod lookup;
pub mod pending;
pub mod record;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::proto::result::{pass_on, version_info};
use crate::proto::{CniError, Command, Env, NetConf, code};
use kuma::Config;
use kuma::pod::Decision;
use netfilter::Options;
use netns::{NetNs, NetNsError};
use serde_json::Value;

pub use conf::{DEFAULT_RUN_DIR, OnApiError, PluginConf};
use lookup::Lookup;

/// Retries of a failed rule transaction stop starting after this long.
const APPLY_BUDGET: Duration = Duration::from_secs(15);

/// What the process prints on stdout, and its exit code.
pub struct Outcome {
    pub stdout: String,
    pub exit_code: u8,
    /// For the node agent, once the runtime has the answer: the run dir and the record.
    pub record: Option<(PathBuf, record::Record)>,
}

/// What a call learnt on its way, for its record.
#[derive(Default)]
struct Trail {
    command: Option<&'static str>,
    run_dir: Option<PathBuf>,
    seen: record::Seen,
}

/// The process: stdin in, the outcome out.
pub fn main() -> ExitCode {
    let mut stdin = Vec::new();
    // One byte past the limit is enough to refuse an oversized configuration.
    let _ = std::io::stdin().take(crate::proto::conf::MAX_STDIN as u64 + 1).read_to_end(&mut stdin);
    let outcome = run(|k| std::env::var(k).ok(), &stdin);
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(outcome.stdout.as_bytes());
    let _ = out.flush();
    drop(out);
    // After the answer: a non-blocking datagram, never waited for.
    if let Some((run_dir, record)) = &outcome.record {
        record::send(run_dir, record);
    }
    ExitCode::from(outcome.exit_code)
}

pub fn run(var: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    let started = Instant::now();
    let mut trail = Trail::default();
    let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handle(&var, stdin, &mut trail)))
        .unwrap_or_else(|_| {
            Err((CniError::new(code::INTERNAL, "internal error", "the plugin panicked; see its log"), None))
        });
    // VERSION, and calls without a CNI_COMMAND, are not counted.
    let record = |result: Result<(), &CniError>| {
        let command = trail.command?;
        let run_dir = trail.run_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR));
        Some((run_dir, record::Record::of(command, &trail.seen, result, started.elapsed())))
    };
    match answer {
        Ok(Some(value)) => Outcome { stdout: value.to_string(), exit_code: 0, record: record(Ok(())) },
        Ok(None) => Outcome { stdout: String::new(), exit_code: 0, record: record(Ok(())) },
        Err((error, version)) => {
            tracing::error!(code = error.code, "{error}");
            let version = version.unwrap_or_else(|| crate::proto::version::LATEST.to_owned());
            Outcome { stdout: error.to_json(&version), exit_code: 1, record: record(Err(&error)) }
        }
    }
}

type Answer = Result<Option<Value>, (CniError, Option<String>)>;

fn handle(var: &impl Fn(&str) -> Option<String>, stdin: &[u8], trail: &mut Trail) -> Answer {
    let env = Env::from_vars(var).map_err(|e| (e, None))?;
    if env.command == Command::Version {
        return Ok(Some(version_info()));
    }
    trail.command = Some(env.command.as_str());
    let (namespace, name) = (env.arg("K8S_POD_NAMESPACE"), env.arg("K8S_POD_NAME"));
    trail.seen.pod = (!namespace.is_empty() && !name.is_empty()).then(|| record::PodRef {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        uid: Some(env.arg("K8S_POD_UID")).filter(|u| !u.is_empty()).map(str::to_owned),
    });
    let conf = NetConf::parse(stdin).map_err(|e| (e, None))?;
    let version = Some(conf.cni_version.clone());
    // DEL never fails: with fields of ours it cannot read, it removes with the defaults.
    let (plugin, conf_error) = match PluginConf::from_netconf(&conf) {
        Ok(plugin) => (plugin, None),
        Err(e) if env.command == Command::Del => (PluginConf::default(), Some(e)),
        Err(e) => return Err((e, version)),
    };
    trail.run_dir = Some(plugin.run_dir.clone());
    // The installer's file follows its ConfigMap at run time; the conf's level is the default.
    let level = var("CNI_LOG_LEVEL")
        .or_else(|| logging::setting_in(&plugin.run_dir, logging::LEVEL_FILE))
        .unwrap_or_else(|| plugin.log_level.clone());
    let format = var("CNI_LOG_FORMAT").or_else(|| logging::setting_in(&plugin.run_dir, logging::FORMAT_FILE));
    logging::init(&level, format.as_deref() == Some("json"), &plugin.log_socket, &plugin.log_file);
    if let Some(e) = conf_error {
        tracing::warn!("{e}; removing with the default settings");
    }
    let pod = format!("{}/{}", env.arg("K8S_POD_NAMESPACE"), env.arg("K8S_POD_NAME"));
    let span = tracing::info_span!("cni", cmd = %env.command.as_str(), pod = %pod, container = %env.container_id);
    let _entered = span.enter();
    let started = Instant::now();
    let result = match env.command {
        Command::Add => add(&env, &conf, &plugin, &mut trail.seen).map(Some),
        Command::Check => check(&env, &conf, &plugin, &mut trail.seen).map(|()| None),
        Command::Del => {
            del(&env, &conf, &plugin);
            Ok(None)
        }
        Command::Status => status(&plugin).map(|()| None),
        Command::Gc => {
            // The state kept: what ADD applied (or could not), per attachment, until DEL;
            // in eBPF mode the registrations.
            applied::gc(&plugin.run_dir, &conf.name, &conf.raw);
            pending::gc(&plugin.run_dir, &conf.name, &conf.raw);
            if let Some(bpffs) = &plugin.ebpf_bpffs {
                ebpf::gc(bpffs);
            }
            Ok(None)
        }
        Command::Version => unreachable!("answered above"),
    };
    tracing::debug!(took = ?started.elapsed(), "done");
    result.map_err(|e| (e, version))
}

/// Who told us what the pod is.
#[derive(Debug, Clone, Copy)]
enum Source {
    NodeAgent,
    ApiServer,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::NodeAgent => "node agent",
            Source::ApiServer => "API server",
        }
    }
}

/// What the pod object says, or why there is none to ask.
enum Verdict {
    /// The config, the annotations it was built from (remembered for DEL), and who
    /// gave the pod.
    Intercept(Box<Config>, std::collections::BTreeMap<String, String>, Source),
    PassThrough(String),
    /// The API server could not say, and `on_api_error: pass-through` lets the pod start.
    Unanswered(String),
}

/// The decision for the pod of this call: the checks that need no API call first,
/// then the lookup and the pod decision.
fn verdict(env: &Env, plugin: &PluginConf, seen: &mut record::Seen) -> Result<Verdict, CniError> {
    let (namespace, name) = (env.arg("K8S_POD_NAMESPACE"), env.arg("K8S_POD_NAME"));
    if let Some(reason) = kuma::pod::pre_lookup(namespace, name, &plugin.exclude_namespaces) {
        seen.pass = Some(record::Reason::of(&reason));
        return Ok(Verdict::PassThrough(reason.to_string()));
    }
    // Checked before they go into a request path: `web?watch=true` must not read as `web`.
    // Names of this form need no escaping in a URL.
    for (key, value, check) in [
        ("K8S_POD_NAMESPACE", namespace, kuma::pod::dns1123_label as fn(&str) -> bool),
        ("K8S_POD_NAME", name, kuma::pod::dns1123_subdomain),
    ] {
        if !check(value) {
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                "invalid environment variables",
                format!("CNI_ARGS {key} {value:?} is not a Kubernetes object name (DNS-1123)"),
            ));
        }
    }
    // The node agent first: it answers from its watch of this node's pods, in
    // microseconds and while the API server is away; the API server when it cannot.
    let uid = Some(env.arg("K8S_POD_UID")).filter(|u| !u.is_empty());
    let asked = ask::pod(&plugin.run_dir.join(crate::agent::SOCKET_NAME), namespace, name, uid);
    let source = match &asked {
        ask::Asked::Found(..) => Source::NodeAgent,
        _ => Source::ApiServer,
    };
    seen.lookup = Some(match &asked {
        ask::Asked::Found(_, false) => record::LookupPath::Agent,
        ask::Asked::Found(_, true) => record::LookupPath::WatchWait,
        _ => record::LookupPath::ApiServer,
    });
    let found = match asked {
        ask::Asked::Found(pod, _) => Lookup::Found(pod),
        // Said at warn: a run dir the installer does not share (a plugin run inside
        // another container's file system) would otherwise only show as slow ADDs.
        ask::Asked::Unreachable(why) => {
            tracing::warn!(reason = %why, "cannot reach the node agent (is the installer running, and is run_dir the host's?); asking the API server");
            api_lookup(plugin, namespace, name)
        }
        ask::Asked::Miss(why) => {
            tracing::debug!(reason = %why, "the node agent did not answer with the pod; asking the API server");
            api_lookup(plugin, namespace, name)
        }
    };
    let pod = match found {
        Lookup::Found(pod) => pod,
        Lookup::NotFound => {
            seen.pass = Some(record::Reason::PodGone);
            return Ok(Verdict::PassThrough("the pod no longer exists".to_owned()));
        }
        // No record for in-place repair: the installer reads pods with the same identity.
        Lookup::Forbidden(why) if plugin.on_api_error == OnApiError::PassThrough => {
            tracing::warn!(error = %why, "the API server does not let us read this pod (RBAC, or a namespace outside namespaceAllowList); letting it start without a redirect");
            seen.pass = Some(record::Reason::Forbidden);
            return Ok(Verdict::PassThrough("the pod may not be read".to_owned()));
        }
        Lookup::Unavailable(why) | Lookup::Forbidden(why) => {
            return match plugin.on_api_error {
                OnApiError::PassThrough => {
                    seen.pass = Some(record::Reason::ApiUnavailable);
                    Ok(Verdict::Unanswered(why))
                }
                OnApiError::Fail => {
                    Err(CniError::new(code::TRY_AGAIN_LATER, "cannot look the pod up (on_api_error: fail)", why))
                }
            };
        }
    };
    match kuma::pod::decide(&pod) {
        Ok(Decision::Intercept(cfg)) => {
            Ok(Verdict::Intercept(cfg, pod.metadata.annotations.unwrap_or_default(), source))
        }
        Ok(Decision::PassThrough(reason)) => {
            seen.pass = Some(record::Reason::of(&reason));
            Ok(Verdict::PassThrough(reason.to_string()))
        }
        Err(e) => Err(CniError::new(
            code::INVALID_CONFIG,
            format!("invalid transparent-proxy configuration of pod {namespace}/{name}"),
            e.to_string(),
        )),
    }
}

/// The pod from the API server, with the kubeconfig the installer wrote.
fn api_lookup(plugin: &PluginConf, namespace: &str, name: &str) -> Lookup {
    match &plugin.kubeconfig {
        Some(path) if path.exists() => runtime().block_on(lookup::pod(path, namespace, name, plugin.lookup_timeout)),
        Some(path) => {
            Lookup::Unavailable(format!("kubeconfig {} does not exist (is the installer running?)", path.display()))
        }
        None => Lookup::Unavailable("the configuration has no kubernetes.kubeconfig".to_owned()),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a current-thread runtime always builds")
}

fn options(plugin: &PluginConf, prev_result: Option<&Value>) -> Options {
    rule_options(plugin, prev_result.is_some_and(has_ipv6_address))
}

/// How the rules are programmed for a pod with these settings: ADD's way, which the node
/// agent's in-place repair follows too.
pub fn rule_options(plugin: &PluginConf, ipv6: bool) -> Options {
    Options {
        backend: plugin.iptables_backend,
        lock_dir: plugin.run_dir.clone(),
        deadline: Some(Instant::now() + APPLY_BUDGET),
        resolv_conf_paths: plugin.dns_resolv_conf_paths.clone(),
        ipv6,
        ..Options::default()
    }
}

/// Whether the previous plugin's result gave the pod an IPv6 address.
fn has_ipv6_address(prev_result: &Value) -> bool {
    let ips = prev_result.get("ips").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    ips.iter().filter_map(|ip| ip.get("address")?.as_str()).any(|a| a.contains(':'))
}

/// A rule-programming failure as the runtime sees it: a resolv.conf the pod may not use,
/// or a configuration yielding too many rules, is the pod's fault; anything else ours.
fn rules_error(what: &str, e: netfilter::FirewallError) -> CniError {
    match e {
        netfilter::FirewallError::ResolvConf { .. } => CniError::new(
            code::INVALID_CONFIG,
            format!("invalid annotation {} of the pod", kuma::TRANSPARENT_PROXY_CONFIG),
            format!("{e} (allowed by the plugin configuration's dns_resolv_conf_paths)"),
        ),
        netfilter::FirewallError::TooManyRules { .. } => {
            CniError::new(code::INVALID_CONFIG, "invalid transparent-proxy configuration of the pod", e.to_string())
        }
        e => CniError::new(code::RULES_FAILED, what, e.to_string()),
    }
}

fn open_netns(path: &str) -> Result<NetNs, CniError> {
    NetNs::open(path)
        .map_err(|e| CniError::new(code::RULES_FAILED, "cannot open the pod's network namespace", e.to_string()))
}

fn add(env: &Env, conf: &NetConf, plugin: &PluginConf, seen: &mut record::Seen) -> Result<Value, CniError> {
    let result = pass_on(conf.prev_result.as_ref(), &conf.cni_version)?;
    match verdict(env, plugin, seen)? {
        Verdict::PassThrough(reason) => tracing::info!("pass through: {reason}"),
        Verdict::Intercept(cfg, _, _) if let Some(bpffs) = &plugin.ebpf_bpffs => {
            ebpf::add(bpffs, &env.container_id, &open_netns(&env.netns)?, &cfg, conf.prev_result.as_ref())?;
            seen.backend = Some(record::Backend::Ebpf);
        }
        Verdict::Unanswered(why) => {
            tracing::warn!(error = %why, "cannot look the pod up; letting it start without a redirect (on_api_error: pass-through)");
            pending::write(&plugin.run_dir, &pending_record(env, conf));
        }
        Verdict::Intercept(cfg, annotations, source) => {
            // Before the rules: a DEL after a failed ADD must recognise what was applied.
            // Not for native nftables, whose DEL drops our tables whole: a file less to
            // write on the hot path.
            if plugin.iptables_backend != netfilter::BackendChoice::Forced(netfilter::BackendKind::Native) {
                applied::remember(&plugin.run_dir, &record_key(env, conf), &annotations);
            }
            let ns = open_netns(&env.netns)?;
            let report = netfilter::apply(&ns, &cfg, &options(plugin, conf.prev_result.as_ref()))
                .map_err(|e| rules_error("cannot program the transparent-proxy redirect", e))?;
            seen.backend = Some(record::Backend::of(report.backend));
            let families: Vec<&str> = report.families.iter().map(|f| f.as_str()).collect();
            tracing::info!(
                rules = report.rules,
                families = %families.join(","),
                backend = report.backend.as_str(),
                backend_reason = %report.backend_reason,
                pod_from = source.as_str(),
                "redirect programmed"
            );
        }
    }
    Ok(result)
}

fn check(env: &Env, conf: &NetConf, plugin: &PluginConf, seen: &mut record::Seen) -> Result<(), CniError> {
    pass_on(conf.prev_result.as_ref(), &conf.cni_version)?;
    let Verdict::Intercept(cfg, _, _) = verdict(env, plugin, seen)? else { return Ok(()) };
    let ns = open_netns(&env.netns)?;
    if let Some(bpffs) = &plugin.ebpf_bpffs {
        return ebpf::check(bpffs, &env.container_id, &ns, &cfg, conf.prev_result.as_ref());
    }
    let report = netfilter::verify(&ns, &cfg, &options(plugin, conf.prev_result.as_ref()))
        .map_err(|e| rules_error("cannot read the redirect rules", e))?;
    if report.missing.is_empty() {
        return Ok(());
    }
    Err(CniError::new(
        code::RULES_MISSING,
        format!("{} redirect rules are missing", report.missing.len()),
        report.missing.join("; "),
    ))
}

/// DEL succeeds whatever happens: the namespace may already be gone, and a pod that
/// cannot be deleted because of us is worse than rules left in a dying namespace.
/// The attachment this call is about, as the run dir's records are keyed.
fn record_key<'a>(env: &'a Env, conf: &'a NetConf) -> applied::Key<'a> {
    applied::Key { network: &conf.name, container_id: &env.container_id, ifname: &env.ifname }
}

/// What the node agent needs to program this attachment's redirect later, as ADD would.
fn pending_record(env: &Env, conf: &NetConf) -> pending::Record {
    let mut ours = conf.raw.clone();
    if let Some(fields) = ours.as_object_mut() {
        fields.remove("prevResult");
    }
    pending::Record {
        namespace: env.arg("K8S_POD_NAMESPACE").to_owned(),
        name: env.arg("K8S_POD_NAME").to_owned(),
        uid: Some(env.arg("K8S_POD_UID")).filter(|u| !u.is_empty()).map(str::to_owned),
        netns: env.netns.clone(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        network: conf.name.clone(),
        ipv6: conf.prev_result.as_ref().is_some_and(has_ipv6_address),
        conf: ours,
        since: pending::now(),
    }
}

fn del(env: &Env, conf: &NetConf, plugin: &PluginConf) {
    // The pod is going: nothing is left to repair in place.
    pending::remove(&plugin.run_dir, &record_key(env, conf));
    if let Some(bpffs) = &plugin.ebpf_bpffs {
        return ebpf::del(bpffs, &env.container_id);
    }
    if env.netns.is_empty() {
        return applied::forget(&plugin.run_dir, &record_key(env, conf));
    }
    let ns = match NetNs::open(&env.netns) {
        Ok(ns) => ns,
        Err(NetNsError::Open { .. } | NetNsError::NotNetwork { .. }) => {
            // The namespace is gone, and the rules with it.
            return applied::forget(&plugin.run_dir, &record_key(env, conf));
        }
        Err(e) => return tracing::warn!("{e}"),
    };
    // What ADD applied also identifies our rules that carry no comment.
    let applied = applied::recall(&plugin.run_dir, &record_key(env, conf));
    let opts = options(plugin, None);
    let removed = netfilter::remove(&ns, applied.as_ref(), &opts).or_else(|e| match applied {
        Some(_) => {
            tracing::warn!(error = %e, "removing with the remembered config failed; removing what is recognisable");
            netfilter::remove(&ns, None, &opts)
        }
        None => Err(e),
    });
    match removed {
        Ok(report) => {
            applied::forget(&plugin.run_dir, &record_key(env, conf));
            if !report.removed.is_empty() {
                tracing::info!(removed = ?report.removed, "redirect removed");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not remove the redirect rules; the namespace is going away anyway"),
    }
}

/// From local state only: STATUS is called every few seconds on every node, and an
/// API outage must not mark every node's network not ready. Not ready only when ADD
/// would fail for every pod: with `on_api_error: fail` and no usable kubeconfig.
fn status(plugin: &PluginConf) -> Result<(), CniError> {
    let problem = match &plugin.kubeconfig {
        None => Some("the configuration has no kubernetes.kubeconfig".to_owned()),
        Some(path) => lookup::read_kubeconfig(path).err(),
    };
    match (problem, plugin.on_api_error) {
        (None, _) => Ok(()),
        (Some(why), OnApiError::PassThrough) => {
            tracing::debug!("{why}; pods start without a redirect until it is back (on_api_error: pass-through)");
            Ok(())
        }
        (Some(why), OnApiError::Fail) => Err(CniError::new(
            code::NOT_AVAILABLE,
            "the plugin is not available",
            format!("{why} (on_api_error: fail)"),
        )),
    }
}
