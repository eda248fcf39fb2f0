//! File edges: atomic writes, the net dir snapshot, the binary copy.
//!
//! Every write goes to a temp file in the target's directory, is fsynced, renamed over
//! the target (a configuration file: exchanged with it, see [`apply`]) and the directory
//! fsynced: a reader (a CNI runtime, or the primary CNI's
//! agent) sees the old file or the new one, never a partial one, and a crash (or
//! SIGKILL) at any instant leaves one or the other. Temp names start with
//! [`TEMP_PREFIX`] and end in digits, never in `.conf`, `.conflist` or `.json`, so
//! runtimes ignore them and a restarted installer can clean up what a crash left.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::plan::{FileOp, Snapshot};

pub const TEMP_PREFIX: &str = ".kong-mesh-cni.tmp.";

/// Mode of a configuration file we create (one we rewrite keeps its own).
const CONF_MODE: u32 = 0o644;

/// Writes `dir/name` atomically with `mode`; `fill` writes the content.
pub fn write_atomic(
    dir: &Path,
    name: &str,
    mode: u32,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let temp = write_temp(dir, name, mode, fill)?;
    let result = fs::rename(&temp, dir.join(name)).and_then(|()| sync_dir(dir));
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// A new temp file next to `dir/name` with `mode` and the content `fill` writes, synced.
fn write_temp(
    dir: &Path,
    name: &str,
    mode: u32,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let temp =
        dir.join(format!("{TEMP_PREFIX}{name}.{}.{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&temp)?;
        fill(&mut file)?;
        // The umask may have narrowed the mode at creation.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()
    })();
    match result {
        Ok(()) => Ok(temp),
        Err(e) => {
            let _ = fs::remove_file(&temp);
            Err(e)
        }
    }
}

/// Renames `dir/name` to `dir/name<suffix>` durably (over an older copy set aside
/// under that name) and returns the new name.
pub fn set_aside(dir: &Path, name: &str, suffix: &str) -> io::Result<String> {
    let aside = format!("{name}{suffix}");
    fs::rename(dir.join(name), dir.join(&aside))?;
    sync_dir(dir)?;
    Ok(aside)
}

/// Removes `dir/name` durably; a file that is already gone is fine.
pub fn remove(dir: &Path, name: &str) -> io::Result<()> {
    match fs::remove_file(dir.join(name)) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes the temp files a crashed installer left in `dir`. Returns how many.
pub fn remove_stale_temps(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Reads the configuration files `wanted` names (`None`: every `.conf`/`.conflist`) in
/// `dir`, the host's net dir `host_dir` as mounted here. A symlink is read where it
/// points (see [`mounted_target`]); one we cannot follow is an error entry naming it.
pub fn snapshot(dir: &Path, host_dir: &Path, wanted: Option<Vec<String>>) -> io::Result<Snapshot> {
    let names = match wanted {
        Some(names) => names,
        None => fs::read_dir(dir)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| crate::conflist::is_conf_name(n))
            .collect(),
    };
    let mut snap = Snapshot::new();
    for name in names {
        match resolve_link(dir, host_dir, &name).and_then(fs::read) {
            Ok(bytes) => snap.insert(name, Ok(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => snap.insert(name, Err(e.to_string())),
        };
    }
    Ok(snap)
}

/// How often a write is redone because the file changed under it, before giving up
/// (the watch brings us back once the other writer is done).
const MAX_REMERGES: usize = 8;

/// Applies the plan's edits in order, each atomic. A rewritten file keeps its mode.
///
/// `base` is what the plan was made from. A write never replaces content that was not
/// merged: the new file is swapped in with `renameat2(RENAME_EXCHANGE)`, and when what
/// comes back is not `base` (another agent wrote in between) `remerge(name, theirs)`
/// gives the content to write over it instead, until what comes back is what was
/// merged. When it gives none (their content is nothing we edit, e.g. a file caught
/// half-written), their file itself is swapped back in place, not a copy of what was
/// read: a writer still writing into it then finishes into the file in place. A file
/// that is a symlink is edited where it points (see [`snapshot`]).
pub fn apply(
    dir: &Path,
    host_dir: &Path,
    ops: &[FileOp],
    base: &Snapshot,
    remerge: impl Fn(&str, &[u8]) -> Option<Vec<u8>>,
) -> io::Result<()> {
    for op in ops {
        match op {
            FileOp::Write { name, content } => {
                let real = resolve_link(dir, host_dir, name)?;
                let real_dir = real.parent().unwrap_or(dir).to_path_buf();
                let real_name = real.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let expected = match base.get(name) {
                    Some(Ok(bytes)) => Some(bytes.clone()),
                    _ => None,
                };
                replace_merged(&real_dir, &real_name, content.as_bytes().to_vec(), expected, |theirs| {
                    remerge(name, theirs)
                })?;
            }
            FileOp::Remove { name } => remove(dir, name)?,
        }
    }
    Ok(())
}

/// Where `dir/name` really is: itself, or the file its symlinks lead to. A relative
/// link is followed as it is; an absolute one names a host path, followed through the
/// mount when it lies under the host's net dir (see [`mounted_target`]), else refused.
fn resolve_link(dir: &Path, host_dir: &Path, name: &str) -> io::Result<PathBuf> {
    let mut path = dir.join(name);
    for _ in 0..8 {
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = fs::read_link(&path)?;
                path = match target.is_absolute() {
                    false => path.parent().unwrap_or(dir).join(target),
                    true => mounted_target(&target, host_dir, dir).ok_or_else(|| {
                        io::Error::other(format!(
                            "{} is a symlink to {}, outside the host's net dir {} (mounted here at {}): \
                             this container cannot see it",
                            path.display(),
                            target.display(),
                            host_dir.display(),
                            dir.display()
                        ))
                    })?,
                };
            }
            _ => return Ok(path),
        }
    }
    Err(io::Error::other(format!("{} is a chain of too many symlinks", dir.join(name).display())))
}

/// The absolute link target `target`, a host path, as this process sees it: under
/// `mounted_dir` when it lies under `host_dir` (the host's net dir, mounted there),
/// else `None`: the host path names nothing we can see (our own `/etc` is not the
/// host's). A `..` in what follows `host_dir` could climb out of the mount: `None`.
pub fn mounted_target(target: &Path, host_dir: &Path, mounted_dir: &Path) -> Option<PathBuf> {
    let rest = target.strip_prefix(host_dir).ok()?;
    let inside = rest.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    (inside && !rest.as_os_str().is_empty()).then(|| mounted_dir.join(rest))
}

/// Writes `content` as `dir/name`, which held `expected` (`None`: did not exist), by
/// exchange; re-merges whatever else it finds there (see [`apply`]).
fn replace_merged(
    dir: &Path,
    name: &str,
    mut content: Vec<u8>,
    mut expected: Option<Vec<u8>>,
    remerge: impl Fn(&[u8]) -> Option<Vec<u8>>,
) -> io::Result<()> {
    let target = dir.join(name);
    let mode = fs::metadata(&target).map_or(CONF_MODE, |m| m.permissions().mode() & 0o7777);
    for _ in 0..MAX_REMERGES {
        let temp = write_temp(dir, name, mode, |f| io::Write::write_all(f, &content))?;
        let swapped = match &expected {
            Some(_) => rename2(&temp, &target, libc::RENAME_EXCHANGE),
            None => rename2(&temp, &target, libc::RENAME_NOREPLACE),
        };
        let theirs = match swapped {
            // Created where nothing was: nothing to compare.
            Ok(()) if expected.is_none() => return sync_dir(dir),
            // Theirs is at `temp` now, until it is settled below.
            Ok(()) => match fs::read(&temp) {
                Ok(theirs) => theirs,
                Err(e) => {
                    let _ = fs::remove_file(&temp);
                    return Err(e);
                }
            },
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                let _ = fs::remove_file(&temp);
                let theirs = fs::read(&target)?;
                match remerge(&theirs) {
                    Some(merged) => content = merged,
                    // Created meanwhile by another agent, as nothing we edit: theirs stays.
                    None => return sync_dir(dir),
                }
                expected = Some(theirs);
                continue;
            }
            // A filesystem without renameat2 flags: a plain rename, as before.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let renamed = fs::rename(&temp, &target);
                if renamed.is_err() {
                    let _ = fs::remove_file(&temp);
                }
                return renamed.and_then(|()| sync_dir(dir));
            }
            Err(e) => {
                let _ = fs::remove_file(&temp);
                return Err(e);
            }
        };
        if expected.as_deref() == Some(&theirs[..]) {
            let _ = fs::remove_file(&temp);
            return sync_dir(dir);
        }
        // Another writer got in between: what is in place now is our merge of their
        // older content; write our merge of what they wrote over it.
        tracing::info!(path = %target.display(), "the file changed while we wrote it; merging again");
        match remerge(&theirs) {
            Some(merged) => {
                let _ = fs::remove_file(&temp);
                expected = Some(std::mem::replace(&mut content, merged));
            }
            None => return give_back(dir, &temp, &target, &content),
        }
    }
    sync_dir(dir)?;
    Err(io::Error::other(format!("{} kept changing while we wrote it", target.display())))
}

/// Puts their file (at `temp`, swapped out by our write of `ours`) back at `target`.
/// If `target` was replaced again meanwhile, the newest file is the one left in place.
fn give_back(dir: &Path, temp: &Path, target: &Path, ours: &[u8]) -> io::Result<()> {
    tracing::info!(path = %target.display(), "the file changed while we wrote it into nothing we edit; put it back as it is");
    let back = rename2(temp, target, libc::RENAME_EXCHANGE);
    if back.is_ok() && fs::read(temp).is_ok_and(|now| now != ours) {
        // Someone replaced our write before the exchange: theirs, the newest, goes back.
        rename2(temp, target, libc::RENAME_EXCHANGE)?;
    }
    let _ = fs::remove_file(temp);
    back.and_then(|()| sync_dir(dir))
}

fn rename2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(io::Error::other);
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths, resolved against the working directory.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), flags) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Makes `dir/name` hold `content` with `mode`; writes only when it does not already.
/// Returns whether it wrote.
pub fn ensure_file(dir: &Path, name: &str, content: &[u8], mode: u32) -> io::Result<bool> {
    let path = dir.join(name);
    if let Ok(meta) = fs::metadata(&path)
        && meta.permissions().mode() & 0o7777 == mode
        && fs::read(&path).is_ok_and(|c| c == content)
    {
        return Ok(false);
    }
    write_atomic(dir, name, mode, |f| io::Write::write_all(f, content))?;
    Ok(true)
}

/// Which file stands at a path, and whether it changed: anything that replaces it
/// (a rename over it, delete and recreate) or writes or chmods it changes one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mode: u32,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileId {
    fn of(meta: &fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mode: meta.mode(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// Makes `dir/name` a copy of `source`, mode 0755, and returns the file's identity and
/// whether it copied. A file whose identity is still `trusted` (the copy this returned
/// last time) is not read again; any other file is compared byte for byte, so that a
/// binary replaced by another of the same size (another installer's) is put back too.
pub fn ensure_binary(source: &Path, dir: &Path, name: &str, trusted: Option<FileId>) -> io::Result<(FileId, bool)> {
    let path = dir.join(name);
    if let Ok(meta) = fs::metadata(&path)
        && meta.is_file()
    {
        let id = FileId::of(&meta);
        if trusted == Some(id) {
            return Ok((id, false));
        }
        if meta.permissions().mode() & 0o7777 == 0o755
            && meta.len() == fs::metadata(source)?.len()
            && same_content(source, &path)?
        {
            return Ok((id, false));
        }
    }
    write_atomic(dir, name, 0o755, |f| io::copy(&mut File::open(source)?, f).map(drop))?;
    Ok((FileId::of(&fs::metadata(&path)?), true))
}

pub(crate) fn same_content(a: &Path, b: &Path) -> io::Result<bool> {
    let (mut a, mut b) = (File::open(a)?, File::open(b)?);
    let (mut buf_a, mut buf_b) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let n = a.read(&mut buf_a)?;
        if n == 0 {
            return Ok(b.read(&mut buf_b)? == 0);
        }
        if b.read_exact(&mut buf_b[..n]).is_err() || buf_a[..n] != buf_b[..n] {
            return Ok(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_sets_mode_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.conflist"), "old").unwrap();
        write_atomic(dir.path(), "a.conflist", 0o600, |f| io::Write::write_all(f, b"new")).unwrap();
        assert_eq!(fs::read_to_string(dir.path().join("a.conflist")).unwrap(), "new");
        assert_eq!(fs::metadata(dir.path().join("a.conflist")).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn failed_fill_leaves_target_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.conf"), "old").unwrap();
        let err = write_atomic(dir.path(), "a.conf", 0o644, |_| Err(io::Error::other("boom")));
        assert!(err.is_err());
        assert_eq!(fs::read_to_string(dir.path().join("a.conf")).unwrap(), "old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn temp_names_are_ignored_by_runtimes_and_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let stale = format!("{TEMP_PREFIX}10-calico.conflist.123.0");
        assert!(!crate::conflist::is_conf_name(&stale) && !stale.ends_with(".json"));
        fs::write(dir.path().join(&stale), "{").unwrap();
        fs::write(dir.path().join("10-calico.conflist"), "{}").unwrap();
        assert_eq!(remove_stale_temps(dir.path()).unwrap(), 1);
        assert_eq!(snapshot(dir.path(), dir.path(), None).unwrap().keys().collect::<Vec<_>>(), ["10-calico.conflist"]);
    }

    #[test]
    fn rewrite_keeps_mode_and_ensure_skips_identical() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.conflist");
        fs::write(&p, "x").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        let base = Snapshot::from([("a.conflist".to_string(), Ok(b"x".to_vec()))]);
        let ops = [FileOp::Write { name: "a.conflist".into(), content: "y".into() }];
        apply(dir.path(), dir.path(), &ops, &base, |_, _| unreachable!("nothing changed meanwhile")).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(ensure_file(dir.path(), "k", b"1", 0o600).unwrap());
        assert!(!ensure_file(dir.path(), "k", b"1", 0o600).unwrap());
        assert!(ensure_file(dir.path(), "k", b"2", 0o600).unwrap());
    }

    /// A file caught half-written by another agent (here: truncated, as `>` does) is
    /// nothing we edit: the file itself goes back in place (same inode, so a writer still
    /// writing into it finishes there), never a copy of the bytes read mid-write.
    #[test]
    fn a_file_changed_into_nothing_we_edit_is_given_back_itself() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("10-calico.conflist");
        fs::write(&p, "").unwrap();
        let theirs = fs::metadata(&p).unwrap().ino();
        let base = Snapshot::from([("10-calico.conflist".to_string(), Ok(b"{\"old\":1}".to_vec()))]);
        let ops = [FileOp::Write { name: "10-calico.conflist".into(), content: "{\"ours\":1}".into() }];
        apply(dir.path(), dir.path(), &ops, &base, |_, t| {
            assert_eq!(t, b"", "what came back is theirs");
            None
        })
        .unwrap();
        assert_eq!(fs::metadata(&p).unwrap().ino(), theirs, "their file, not a copy");
        assert_eq!(fs::read_to_string(&p).unwrap(), "");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temp left");
    }

    #[test]
    fn absolute_links_are_followed_through_the_mount_only_under_the_host_net_dir() {
        let (host, mounted) = (Path::new("/etc/cni/net.d"), Path::new("/host/etc/cni/net.d"));
        let t = |target: &str| mounted_target(Path::new(target), host, mounted);
        assert_eq!(t("/etc/cni/net.d/real/x.conflist"), Some(mounted.join("real/x.conflist")));
        assert_eq!(t("/etc/cni/net.d/./x.conflist"), Some(mounted.join("x.conflist")));
        assert_eq!(t("/etc/cni/net.d//x.conflist"), Some(mounted.join("x.conflist")));
        for outside in [
            "/etc/calico/x.conflist",
            "/etc/cni/net.d.bak/x.conflist",
            "/etc/cni/net.d/../x.conflist",
            "/etc/cni/net.d/real/../../../../x.conflist",
            "/etc/cni/net.d",
            "/etc/cni",
        ] {
            assert_eq!(t(outside), None, "{outside}");
        }
        // An installer run on the host itself sees the dir where it is.
        assert_eq!(mounted_target(Path::new("/etc/cni/net.d/a"), host, host), Some(host.join("a")));
    }

    #[test]
    fn binary_copy_is_skipped_only_when_identical() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::write(&src, b"binary-1").unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        let (id, copied) = ensure_binary(&src, &bin, "kong-mesh-cni", None).unwrap();
        assert!(copied);
        assert_eq!(fs::metadata(bin.join("kong-mesh-cni")).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(ensure_binary(&src, &bin, "kong-mesh-cni", Some(id)).unwrap(), (id, false));
        // Compared, not trusted, when unknown: the same bytes are kept as they are.
        assert_eq!(ensure_binary(&src, &bin, "kong-mesh-cni", None).unwrap(), (id, false));
        // Another binary of the same size renamed over ours is replaced.
        fs::write(dir.path().join("theirs"), b"binary-2").unwrap();
        fs::rename(dir.path().join("theirs"), bin.join("kong-mesh-cni")).unwrap();
        fs::set_permissions(bin.join("kong-mesh-cni"), fs::Permissions::from_mode(0o755)).unwrap();
        let (id2, copied) = ensure_binary(&src, &bin, "kong-mesh-cni", Some(id)).unwrap();
        assert!(copied && id2 != id);
        assert_eq!(fs::read(bin.join("kong-mesh-cni")).unwrap(), b"binary-1");
        // A directory in its place cannot be replaced: an error, not a panic.
        fs::remove_file(bin.join("kong-mesh-cni")).unwrap();
        fs::create_dir(bin.join("kong-mesh-cni/")).unwrap();
        fs::write(bin.join("kong-mesh-cni/x"), b"").unwrap();
        assert!(ensure_binary(&src, &bin, "kong-mesh-cni", Some(id2)).is_err());
    }
}
