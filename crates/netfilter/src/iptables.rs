//! The iptables backends (nft and legacy): one `*-restore` transaction per family.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rules::Family;

use crate::facts::{NsFacts, OUR_TABLES, index};
use crate::{BackendKind, FirewallError, exec};

/// Where iptables lives on the distributions we meet, after `$PATH`.
const SEARCH_DIRS: [&str; 6] = ["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin", "/bin", "/usr/local/bin"];

#[derive(Debug, Clone)]
struct Tools {
    restore: PathBuf,
    save: PathBuf,
}

/// iptables through `iptables-{nft,legacy}-{restore,save}` (or a plain `iptables-restore`
/// that is a link to the matching multi-call binary).
#[derive(Debug, Clone)]
pub struct Iptables {
    kind: BackendKind,
    tools: [Tools; 2],
}

fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    for d in SEARCH_DIRS {
        if !dirs.iter().any(|x| x == Path::new(d)) {
            dirs.push(d.into());
        }
    }
    dirs
}

fn find(dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Whether a generic `iptables-restore` is the given flavour: Debian's alternatives and
/// most distributions link it to `xtables-{nft,legacy}-multi`.
fn links_to(path: &Path, kind: BackendKind) -> bool {
    let multi = match kind {
        BackendKind::Nft => "xtables-nft-multi",
        BackendKind::Legacy => "xtables-legacy-multi",
        BackendKind::Native => return false,
    };
    std::fs::canonicalize(path).is_ok_and(|p| p.file_name().is_some_and(|n| n == multi))
}

impl Iptables {
    /// Finds the tools of `kind` for both families.
    pub fn discover(kind: BackendKind) -> Result<Self, FirewallError> {
        let dirs = search_dirs();
        let mut tools = Vec::with_capacity(2);
        for family in [Family::V4, Family::V6] {
            let base = match family {
                Family::V4 => "iptables",
                Family::V6 => "ip6tables",
            };
            let specific = |op: &str| find(&dirs, &format!("{base}-{}-{op}", kind.as_str()));
            let generic = |op: &str| find(&dirs, &format!("{base}-{op}")).filter(|p| links_to(p, kind));
            match (specific("restore").or_else(|| generic("restore")), specific("save").or_else(|| generic("save"))) {
                (Some(restore), Some(save)) => tools.push(Tools { restore, save }),
                _ => {
                    return Err(FirewallError::NoTools {
                        backend: kind.as_str(),
                        family,
                        wanted: format!(
                            "{base}-{0}-restore/-save or {base}-restore/-save linked to xtables-{0}-multi",
                            kind.as_str()
                        ),
                        searched: dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(":"),
                    });
                }
            }
        }
        let [v4, v6]: [Tools; 2] = tools.try_into().expect("two families");
        Ok(Iptables { kind, tools: [v4, v6] })
    }
}

/// How a tool is run: time bound, xtables lock wait, and the lock file (legacy only).
#[derive(Debug, Clone)]
pub struct ExecContext {
    pub timeout: Duration,
    pub wait_seconds: u32,
    pub wait_interval_us: u32,
    pub lock_file: Option<PathBuf>,
}

impl Iptables {
    fn command(&self, path: &Path, ctx: &ExecContext) -> Command {
        let mut cmd = Command::new(path);
        cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        if self.kind == BackendKind::Legacy {
            // The legacy tools serialise on a lock file; a lock per pod namespace means
            // pods never wait for each other (nft needs no lock: the kernel serialises).
            if let Some(lock) = &ctx.lock_file {
                cmd.env("XTABLES_LOCKFILE", lock);
            }
        }
        cmd
    }
}

/// The two primitives the iptables operations are built on; both run in the calling
/// thread's network namespace.
impl Iptables {
    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// Whether the namespace described by `facts` has tables of this backend that our
    /// rules could be in; when not, a plain install needs no `save` first.
    pub(crate) fn has_tables(&self, facts: &NsFacts, family: Family) -> bool {
        let tables = match self.kind {
            BackendKind::Nft => &facts.nft[index(family)],
            BackendKind::Legacy => &facts.legacy[index(family)],
            BackendKind::Native => return false,
        };
        OUR_TABLES.iter().any(|t| tables.contains(*t))
    }

    /// Applies `payload` (iptables-restore syntax, `--noflush`) as one transaction.
    pub(crate) fn restore(&self, family: Family, payload: &str, ctx: &ExecContext) -> Result<(), FirewallError> {
        let tools = &self.tools[index(family)];
        let mut cmd = self.command(&tools.restore, ctx);
        cmd.arg("--noflush").arg(format!("--wait={}", ctx.wait_seconds));
        if ctx.wait_interval_us > 0 {
            cmd.arg(format!("--wait-interval={}", ctx.wait_interval_us));
        }
        exec::run(cmd, payload, ctx.timeout).map(drop)
    }

    /// The current rules of the family, as iptables-save prints them.
    pub(crate) fn save(&self, family: Family, ctx: &ExecContext) -> Result<String, FirewallError> {
        let tools = &self.tools[index(family)];
        let output = exec::run(self.command(&tools.save, ctx), "", ctx.timeout)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// The iptables-nft version whose form `nftables::xt` writes (the form was learned from
/// it and is proven against it): another version's tool may write other expressions.
pub(crate) const NETLINK_FORM_VERSION: &str = "1.8.9";

/// `1.8.9` of `iptables-nft-restore v1.8.9 (nf_tables)`.
fn parse_version(out: &str) -> Option<&str> {
    out.split_whitespace().find_map(|w| w.strip_prefix('v')).filter(|v| v.starts_with(|c: char| c.is_ascii_digit()))
}

impl Iptables {
    /// The version of this backend's IPv4 restore tool, as `-V` prints it. Cached in
    /// `cache_dir` under the tool's identity (inode, size, change time: an upgrade
    /// changes it), so that an ADD pays one stat and one small read, not a process.
    pub(crate) fn version(&self, cache_dir: &Path, ctx: &ExecContext) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let tool = &self.tools[0].restore;
        let meta = std::fs::metadata(tool).ok()?;
        let identity =
            format!("{} {} {} {}.{}", tool.display(), meta.ino(), meta.size(), meta.ctime(), meta.ctime_nsec());
        let cache = cache_dir.join(format!("{}-version", self.kind.label()));
        if let Ok(text) = std::fs::read_to_string(&cache)
            && let Some((id, version)) = text.rsplit_once('\n').and_then(|(first, _)| first.rsplit_once('\t'))
            && id == identity
        {
            return Some(version.to_owned());
        }
        let mut cmd = self.command(tool, ctx);
        cmd.arg("-V");
        let out = exec::run(cmd, "", ctx.timeout).ok()?;
        let version = parse_version(&String::from_utf8_lossy(&out.stdout))?.to_owned();
        // Best effort, atomic: a torn or lost cache only means the tool is asked again.
        let tmp = cache.with_extension(format!("{}.tmp", std::process::id()));
        let written = std::fs::create_dir_all(cache_dir)
            .and_then(|()| std::fs::write(&tmp, format!("{identity}\t{version}\n")))
            .and_then(|()| std::fs::rename(&tmp, &cache));
        if let Err(error) = written {
            tracing::debug!(path = %cache.display(), %error, "cannot cache the iptables version");
        }
        Some(version)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_version;

    #[test]
    fn reads_the_version_the_tools_print() {
        assert_eq!(parse_version("iptables-nft-restore v1.8.9 (nf_tables)\n"), Some("1.8.9"));
        assert_eq!(parse_version("ip6tables-restore v1.8.11 (nf_tables)"), Some("1.8.11"));
        assert_eq!(parse_version("iptables-restore v1.8.4 (legacy)"), Some("1.8.4"));
        assert_eq!(parse_version("verbose output"), None);
        assert_eq!(parse_version(""), None);
    }
}
