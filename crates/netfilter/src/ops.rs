//! apply / verify / remove: the operations on a pod namespace, through the chosen
//! backend; and the iptables backends' side of them, built on their primitives
//! (restore, save) and the pure rule functions.

use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kuma::Config;
use netns::NetNs;
use rules::restore::{install_payload, missing, parse_save, replace_payload};
use rules::{Family, RuleSet, dns, families, generate};

use crate::facts::NsFacts;
use crate::iptables::{ExecContext, Iptables, NETLINK_FORM_VERSION};
use crate::select::{BackendChoice, Prepared, Selection, select};
use crate::{Backend, BackendKind, FirewallError, netlink};

/// How operations run.
#[derive(Debug, Clone)]
pub struct Options {
    pub backend: BackendChoice,
    /// Bound on each iptables process.
    pub tool_timeout: Duration,
    /// Directory of the per-namespace xtables lock files (legacy backend).
    pub lock_dir: PathBuf,
    /// No retry starts after this instant.
    pub deadline: Option<Instant>,
    /// The files a config may name as `redirect.dns.resolvConfigPath` (the node
    /// operator's choice: the path comes from a pod annotation, and we run as root).
    pub resolv_conf_paths: Vec<PathBuf>,
    /// The caller knows the pod has IPv6 (the CNI previous result lists an IPv6
    /// address), whatever the namespace says yet.
    pub ipv6: bool,
    /// iptables-nft into a namespace without iptables-nft tables of the family: write
    /// the rules over netlink in iptables-nft-restore's own form (no process), where
    /// every rule has a shape written that way; otherwise, or when false, the tool runs.
    pub iptables_nft_netlink: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            backend: BackendChoice::Auto,
            tool_timeout: Duration::from_secs(10),
            lock_dir: PathBuf::from("/run/kong-mesh-cni"),
            deadline: None,
            resolv_conf_paths: vec![PathBuf::from(kuma::DEFAULT_RESOLV_CONF)],
            ipv6: false,
            iptables_nft_netlink: true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApplyReport {
    pub backend: BackendKind,
    pub backend_reason: String,
    pub families: Vec<Family>,
    pub rules: usize,
    /// Whether rules of ours (or others') were already there and had to be merged with.
    pub replaced_existing: bool,
}

#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub backend: BackendKind,
    pub families: Vec<Family>,
    /// Each missing chain or rule, prefixed with its family (`ipv4: -t nat -A ...`).
    pub missing: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct RemoveReport {
    /// (backend, family) pairs where something of ours was found and removed.
    pub removed: Vec<(BackendKind, Family)>,
}

/// resolv.conf files are a few lines; anything this large is not one.
const MAX_RESOLV_CONF: u64 = 64 * 1024;

/// What a backend's apply did.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// Rules of ours (or others') were already there and had to be merged with.
    pub replaced_existing: bool,
    /// How the rules were written, where that is not the backend's usual way.
    pub notes: Vec<String>,
}

/// What a backend operation works with.
pub(crate) struct Env<'a> {
    pub ns: &'a NetNs,
    pub facts: &'a NsFacts,
    pub ctx: &'a ExecContext,
    /// Retries come from it; `None` (remove without a config) means no retries.
    pub cfg: Option<&'a Config>,
    pub opts: &'a Options,
}

/// Envoy's inbound passthrough connects from ::6, which must be a local address; run
/// in the pod's namespace before IPv6 rules go in.
pub(crate) fn add_passthrough_address() -> Result<(), FirewallError> {
    netlink::add_ipv6_host_address(1, Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6)).map_err(FirewallError::LoopbackAddress)
}

/// The rule sets a config yields for a namespace with these facts.
pub fn plan(cfg: &Config, facts: &NsFacts, opts: &Options) -> Result<Vec<RuleSet>, FirewallError> {
    let nameservers = nameservers(cfg, &opts.resolv_conf_paths)?;
    let ipv6 = facts.has_ipv6 || opts.ipv6;
    let families = families(cfg, ipv6);
    // The one part whose size multiplies: refused before any rule is built.
    let uid_rules = rules::uid_exclusion_rule_count(cfg);
    if let (true, Some(&family)) = (uid_rules > rules::MAX_RULES, families.first()) {
        return Err(FirewallError::TooManyRules { family, count: uid_rules });
    }
    let sets: Vec<RuleSet> = families.into_iter().map(|f| generate(cfg, f, &nameservers)).collect();
    match sets.iter().find(|s| s.rule_count() > rules::MAX_RULES) {
        Some(set) => Err(FirewallError::TooManyRules { family: set.family, count: set.rule_count() }),
        None => Ok(sets),
    }
}

/// The nameservers of the config's resolv.conf: only a path on the allowed list (taken
/// as written: `/etc/../etc/shadow` is not `/etc/resolv.conf`), a regular file read
/// without blocking and of bounded size.
fn nameservers(cfg: &Config, allowed: &[PathBuf]) -> Result<Vec<IpAddr>, FirewallError> {
    if !cfg.dns.enabled || cfg.dns.capture_all {
        return Ok(Vec::new());
    }
    let path = PathBuf::from(&cfg.dns.resolv_conf_path);
    if !allowed.contains(&path) {
        let list: Vec<String> = allowed.iter().map(|p| p.display().to_string()).collect();
        let reason = format!("not one of the files the node allows ({})", list.join(", "));
        return Err(FirewallError::ResolvConf { path, reason });
    }
    let text = netns::hostfile::read_regular_text(&path, MAX_RESOLV_CONF)
        .map_err(|e| FirewallError::ResolvConf { path: path.clone(), reason: e.to_string() })?;
    Ok(dns::nameservers(&text))
}

fn exec_context(ns: &NetNs, cfg: Option<&Config>, opts: &Options) -> ExecContext {
    let lock_file = ns.inode().ok().map(|ino| opts.lock_dir.join(format!("xtables-{ino}.lock")));
    ExecContext {
        timeout: opts.tool_timeout,
        wait_seconds: cfg.map_or(5, |c| c.wait),
        wait_interval_us: cfg.map_or(0, |c| c.wait_interval),
        lock_file,
    }
}

/// Prepares the lock directory; the lock file goes when the operation is over.
struct LockGuard(Option<PathBuf>);

impl LockGuard {
    fn new(ctx: &ExecContext, kind: BackendKind) -> Self {
        match (&ctx.lock_file, kind) {
            (Some(file), BackendKind::Legacy) => {
                if let Some(dir) = file.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                LockGuard(Some(file.clone()))
            }
            _ => LockGuard(None),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(file) = &self.0 {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// The backend for a namespace whose facts are `facts`; on a thread in that namespace.
fn choose(ns: &NetNs, prepared: Prepared, facts: &NsFacts, ctx: &ExecContext) -> Result<Selection, FirewallError> {
    let selection = select(prepared, facts, ctx)?;
    tracing::debug!(netns = %ns.path().display(), backend = selection.backend.kind().as_str(), reason = %selection.reason, "firewall backend");
    Ok(selection)
}

/// Programs the config's rules into the namespace. Idempotent: rules of ours already
/// there are replaced in the same transaction, and nothing of others is touched.
pub fn apply(ns: &NetNs, cfg: &Config, opts: &Options) -> Result<ApplyReport, FirewallError> {
    let ctx = exec_context(ns, Some(cfg), opts);
    let prepared = Prepared::new(opts.backend, &ctx);
    // One hop into the namespace for the facts, the choice and the programming: each
    // thread started and entered costs a scheduling round on a loaded node.
    ns.run(|| {
        let facts = NsFacts::read();
        let Selection { backend, reason } = choose(ns, prepared, &facts, &ctx)?;
        let sets = plan(cfg, &facts, opts)?;
        let env = Env { ns, facts: &facts, ctx: &ctx, cfg: Some(cfg), opts };
        let Applied { replaced_existing, notes } = backend.apply(&env, &sets)?;
        if backend.kind() == BackendKind::Native {
            take_over_from_iptables(&env, &sets);
        }
        let backend_reason = notes.into_iter().fold(reason, |r, note| format!("{r}; {note}"));
        Ok(ApplyReport {
            backend: backend.kind(),
            backend_reason,
            families: sets.iter().map(|s| s.family).collect(),
            rules: sets.iter().map(RuleSet::rule_count).sum(),
            replaced_existing,
        })
    })?
}

/// Once the native rules are in, our iptables rules of an older version (if the
/// namespace has iptables tables at all) go: the redirect never lapses, and nothing
/// is spawned in the common case of a namespace without iptables tables.
fn take_over_from_iptables(env: &Env<'_>, sets: &[RuleSet]) {
    for kind in [BackendKind::Nft, BackendKind::Legacy] {
        let present = match kind {
            BackendKind::Nft => env.facts.any_nft(),
            _ => env.facts.any_legacy(),
        };
        if !present {
            continue;
        }
        let removed = Iptables::discover(kind).and_then(|b| b.remove(env, sets));
        match removed {
            Ok(families) if !families.is_empty() => {
                tracing::info!(backend = kind.as_str(), ?families, "removed our iptables rules of an older version")
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(backend = kind.as_str(), %error, "cannot clean up our old iptables rules"),
        }
    }
}

impl Backend for Iptables {
    fn kind(&self) -> BackendKind {
        Iptables::kind(self)
    }

    /// All rules of a family in one restore transaction (its retries too), both
    /// families at once: the first on this thread, the others each on a thread started
    /// from it, which starts in this thread's namespace (the pod's), entering nothing.
    fn apply(&self, env: &Env<'_>, sets: &[RuleSet]) -> Result<Applied, FirewallError> {
        let _lock = LockGuard::new(env.ctx, self.kind());
        let form = OnceLock::new();
        // A new pod (the common case): both families in one netlink batch from this
        // thread, no other thread.
        if sets.iter().all(|s| !self.has_tables(env.facts, s.family))
            && let Some(Ok(())) = form.get_or_init(|| netlink_form(self, env))
        {
            if sets.iter().any(|s| s.family == Family::V6) {
                add_passthrough_address()?;
            }
            let all: Vec<&RuleSet> = sets.iter().collect();
            if let Ok(()) = crate::nftables::write_iptables_nft(&all)? {
                let notes = sets.iter().map(|s| written_over_netlink(s.family)).collect();
                return Ok(Applied { replaced_existing: false, notes });
            }
            // A family has a shape written only by the tool: each family its own way.
        }
        let work = |set| with_retries(env, || apply_family(self, env, set, &form));
        let Some((first, others)) = sets.split_first() else { return Ok(Applied::default()) };
        type Outcome = Result<(bool, Option<String>), FirewallError>;
        let results = std::thread::scope(|scope| -> Result<Vec<Outcome>, FirewallError> {
            let mut handles = Vec::with_capacity(others.len());
            for set in others {
                let spawned = std::thread::Builder::new().name("netns".into()).spawn_scoped(scope, move || work(set));
                handles
                    .push(spawned.map_err(|source| netns::NetNsError::Thread { path: env.ns.path().into(), source })?);
            }
            let mut results = vec![work(first)];
            results.extend(handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))));
            Ok(results)
        })?;
        let mut applied = Applied::default();
        for result in results {
            let (replaced, note) = result?;
            applied.replaced_existing |= replaced;
            applied.notes.extend(note);
        }
        Ok(applied)
    }

    fn missing(&self, env: &Env<'_>, sets: &[RuleSet]) -> Result<Vec<String>, FirewallError> {
        let _lock = LockGuard::new(env.ctx, self.kind());
        let mut out = Vec::new();
        for set in sets {
            let saved = if self.has_tables(env.facts, set.family) {
                env.ns.run(|| self.save(set.family, env.ctx))??
            } else {
                String::new()
            };
            out.extend(missing(&parse_save(&saved), set).into_iter().map(|m| format!("{}: {m}", set.family)));
        }
        Ok(out)
    }

    fn remove(&self, env: &Env<'_>, expected: &[RuleSet]) -> Result<Vec<Family>, FirewallError> {
        let _lock = LockGuard::new(env.ctx, self.kind());
        let mut removed = Vec::new();
        for family in [Family::V4, Family::V6] {
            if !self.has_tables(env.facts, family) {
                continue;
            }
            let old = expected.iter().find(|s| s.family == family);
            let done = env.ns.run(|| -> Result<bool, FirewallError> {
                let saved = parse_save(&self.save(family, env.ctx)?);
                match replace_payload(&saved, old, None) {
                    Some(payload) => self.restore(family, &payload, env.ctx).map(|()| true),
                    None => Ok(false),
                }
            })??;
            if done {
                removed.push(family);
            }
        }
        Ok(removed)
    }
}

/// Returns whether existing tables had to be merged with, and how the rules were
/// written when not by the tool in the usual way. Runs in the pod's namespace.
fn apply_family(
    backend: &Iptables,
    env: &Env<'_>,
    set: &RuleSet,
    form: &OnceLock<Option<Result<(), String>>>,
) -> Result<(bool, Option<String>), FirewallError> {
    if set.family == Family::V6 {
        add_passthrough_address()?;
    }
    if !backend.has_tables(env.facts, set.family) {
        // A fresh namespace (the common case): one transaction, no save first; with
        // iptables-nft, over netlink in the tool's own form where every rule allows.
        let mut note = None;
        match form.get_or_init(|| netlink_form(backend, env)) {
            None => {}
            Some(Err(why)) => note = Some(format!("{}: iptables-nft-restore run: {why}", set.family)),
            Some(Ok(())) => match crate::nftables::write_iptables_nft(&[set])? {
                Ok(()) => return Ok((false, Some(written_over_netlink(set.family)))),
                Err(shape) => note = Some(format!("{}: iptables-nft-restore run for {shape}", set.family)),
            },
        }
        backend.restore(set.family, &install_payload(set), env.ctx)?;
        return Ok((false, note));
    }
    let saved = parse_save(&backend.save(set.family, env.ctx)?);
    let payload = replace_payload(&saved, Some(set), Some(set)).expect("a rule set always has rules to add");
    backend.restore(set.family, &payload, env.ctx)?;
    Ok((true, None))
}

fn written_over_netlink(family: Family) -> String {
    format!("{family}: written over netlink in iptables-nft's form")
}

/// Whether the iptables-nft rules may be written over netlink (`None`: not asked for):
/// only where the installed tool is the version whose form `nftables::xt` writes.
fn netlink_form(backend: &Iptables, env: &Env<'_>) -> Option<Result<(), String>> {
    if backend.kind() != BackendKind::Nft || !env.opts.iptables_nft_netlink {
        return None;
    }
    Some(match backend.version(&env.opts.lock_dir, env.ctx) {
        Some(v) if v == NETLINK_FORM_VERSION => Ok(()),
        Some(v) => Err(format!("the installed iptables-nft is v{v}, the netlink form is v{NETLINK_FORM_VERSION}'s")),
        None => Err("the installed iptables-nft's version is unknown".to_owned()),
    })
}

fn with_retries<T>(env: &Env<'_>, mut attempt: impl FnMut() -> Result<T, FirewallError>) -> Result<T, FirewallError> {
    let mut tries = 0;
    loop {
        match attempt() {
            Ok(v) => return Ok(v),
            Err(e) => {
                let Some(cfg) = env.cfg else { return Err(e) };
                let sleep = cfg.retry.sleep_between_retries;
                let out_of_time = env.opts.deadline.is_some_and(|d| Instant::now() + sleep >= d);
                let retriable = matches!(e, FirewallError::Failed { .. } | FirewallError::Timeout { .. });
                if tries >= cfg.retry.max_retries || out_of_time || !retriable {
                    return Err(e);
                }
                tries += 1;
                tracing::warn!(error = %e, attempt = tries, "applying rules failed; retrying");
                std::thread::sleep(sleep);
            }
        }
    }
}

/// Checks that every rule the config yields is present.
pub fn verify(ns: &NetNs, cfg: &Config, opts: &Options) -> Result<VerifyReport, FirewallError> {
    let ctx = exec_context(ns, Some(cfg), opts);
    let prepared = Prepared::new(opts.backend, &ctx);
    let (facts, selection) = ns.run(|| {
        let facts = NsFacts::read();
        let selection = choose(ns, prepared, &facts, &ctx);
        (facts, selection)
    })?;
    let Selection { backend, .. } = selection?;
    let sets = plan(cfg, &facts, opts)?;
    let env = Env { ns, facts: &facts, ctx: &ctx, cfg: Some(cfg), opts };
    let missing = backend.missing(&env, &sets)?;
    Ok(VerifyReport { backend: backend.kind(), families: sets.iter().map(|s| s.family).collect(), missing })
}

/// Removes every chain and rule of ours, with whichever backend holds them, leaving the
/// rest alone. `cfg`, when known, also recognises our rules that carry no comment.
pub fn remove(ns: &NetNs, cfg: Option<&Config>, opts: &Options) -> Result<RemoveReport, FirewallError> {
    let facts = ns.run(NsFacts::read)?;
    let ctx = exec_context(ns, cfg, opts);
    let expected = match cfg {
        Some(cfg) => plan(cfg, &NsFacts { has_ipv6: true, ..facts.clone() }, opts)?,
        None => Vec::new(),
    };
    let env = Env { ns, facts: &facts, ctx: &ctx, cfg, opts };
    let mut report = RemoveReport::default();
    let kinds: Vec<BackendKind> = match opts.backend {
        BackendChoice::Forced(kind) => vec![kind],
        BackendChoice::Auto => [BackendKind::Native, BackendKind::Nft, BackendKind::Legacy]
            .into_iter()
            .filter(|k| match k {
                BackendKind::Nft => facts.any_nft(),
                BackendKind::Legacy => facts.any_legacy(),
                BackendKind::Native => facts.native.iter().any(|n| *n),
            })
            .collect(),
    };
    for kind in kinds {
        let backend = crate::select::backend(kind)?;
        for family in backend.remove(&env, &expected)? {
            report.removed.push((kind, family));
        }
    }
    Ok(report)
}
