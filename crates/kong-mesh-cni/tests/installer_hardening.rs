//! The installer on a bad day: a primary writing while we write (fsync slowed by strace
//! fault injection, so the window is wide and the run deterministic), a conflist that
//! is a symlink, a net dir that cannot be written at SIGTERM.

mod installer_host;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use installer_host::*;
use testkit::net::require_root;

const PLUGIN: &str = "kong-mesh-cni";
const STARTUP: Duration = Duration::from_secs(60);
const NO_POLLING: (&str, &str) = ("CFGCHECK_INTERVAL", "3600");

fn wait_ready(host: &Host, installer: &Installer) {
    if wait_for(STARTUP, || host.ready.exists()).is_none() {
        panic!("not ready within {STARTUP:?}; log:\n{}", installer.log());
    }
}

/// What a primary CNI agent does: write a temp file, rename it over its conflist.
fn primary_writes(path: &Path, text: &str) {
    let temp = path.with_extension("primary-tmp");
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

/// Item 5: the primary writes twice, the second time while our merge of its first write
/// is being fsynced. Its second write must end up in the file (with our entry), and
/// SIGTERM must restore exactly that, not the first.
#[test]
fn a_primary_write_during_our_write_is_never_lost() {
    let host = Host::new();
    let conflist = host.net_file("10-calico.conflist");
    std::fs::write(&conflist, CALICO).unwrap();
    let strace = ["-f", "-qq", "-o", "/dev/null", "-e", "trace=fsync", "-e", "inject=fsync:delay_exit=500000"];
    let args: Vec<&str> = strace.iter().copied().chain([BINARY, "install"]).collect();
    let mut installer = Installer::start_program(Path::new("strace"), &args, &host, &[NO_POLLING, UNINSTALL]);
    wait_ready(&host, &installer);
    assert!(chained(&conflist, PLUGIN));

    let first = CALICO.replace("\"mtu\": 0", "\"mtu\": 1400");
    let second = CALICO.replace("\"mtu\": 0", "\"mtu\": 1500");
    assert_ne!(first, CALICO, "the fixture has an mtu to change");
    primary_writes(&conflist, &first);
    // Our repair of `first` is now in its 0.5 s fsync; the primary writes again.
    std::thread::sleep(Duration::from_millis(250));
    primary_writes(&conflist, &second);
    let settled = wait_for(Duration::from_secs(15), || {
        std::fs::read_to_string(&conflist).is_ok_and(|t| t.contains("\"mtu\": 1500")) && chained(&conflist, PLUGIN)
    });
    assert!(
        settled.is_some(),
        "the primary's second write was lost: {}\nlog:\n{}",
        std::fs::read_to_string(&conflist).unwrap(),
        installer.log()
    );
    // Nothing more happens on its own: the file stays that way.
    std::thread::sleep(Duration::from_secs(2));
    assert!(std::fs::read_to_string(&conflist).unwrap().contains("\"mtu\": 1500"));
    // SIGTERM goes to the installer itself, strace's child (strace would not pass it on).
    let pid = installer.pid();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let tracee: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    // SAFETY: kill has no memory-safety preconditions; the pid is our grandchild.
    unsafe { libc::kill(tracee, libc::SIGTERM) };
    let status = installer.wait(Duration::from_secs(30)).expect("exits after SIGTERM");
    assert!(status.success(), "{status}: {}", installer.log());
    assert_eq!(std::fs::read_to_string(&conflist).unwrap(), second, "SIGTERM restores the primary's latest");
}

/// Item 9: the conflist is a symlink: we edit the file it points to and the link stays.
#[test]
fn a_symlinked_conflist_is_edited_at_its_target() {
    let host = Host::new();
    let real_dir = host.root.path().join("real");
    std::fs::create_dir(&real_dir).unwrap();
    let real = real_dir.join("10-calico.conflist");
    std::fs::write(&real, CALICO).unwrap();
    let link = host.net_file("10-calico.conflist");
    std::os::unix::fs::symlink("../real/10-calico.conflist", &link).unwrap();
    // The watch is on the net dir, where the link is: the periodic check sees the target.
    let mut installer = Installer::start(&host, &[("CFGCHECK_INTERVAL", "1"), UNINSTALL]);
    wait_ready(&host, &installer);
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link is still a link");
    assert!(chained(&real, PLUGIN), "the target holds our entry");

    // The primary rewrites its real file: seen through the link, repaired there.
    let newer = CALICO.replace("\"mtu\": 0", "\"mtu\": 1450");
    primary_writes(&real, &newer);
    let repaired = wait_for(Duration::from_secs(10), || chained(&real, PLUGIN));
    assert!(repaired.is_some(), "{}", installer.log());
    assert!(installer.terminate().success(), "{}", installer.log());
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_to_string(&real).unwrap(), newer, "restored where it lives");
}

/// Issue 23: the conflist is an absolute symlink, as the host sees it
/// (`/etc/cni/net.d/10-calico.conflist -> /etc/cni/net.d/real/10-calico.conflist`), while
/// the installer sees the host's dir at MOUNTED_CNI_NET_DIR. A target under the host's
/// net dir is followed through the mount and edited there; one outside it is refused
/// with a message naming the link and its target, and the node stays not ready.
#[test]
fn an_absolute_symlink_under_the_host_net_dir_is_followed_through_the_mount() {
    // A host path that exists nowhere on this machine: reading it as this process sees
    // the filesystem (what the old code did) finds nothing.
    let host_net_dir = format!("/kmc-host-{}/etc/cni/net.d", testkit::unique_suffix());
    let host = Host::new();
    std::fs::create_dir(host.net.join("real")).unwrap();
    let real = host.net.join("real/10-calico.conflist");
    std::fs::write(&real, CALICO).unwrap();
    let link = host.net_file("10-calico.conflist");
    std::os::unix::fs::symlink(format!("{host_net_dir}/real/10-calico.conflist"), &link).unwrap();
    // The watch is on the net dir, where the link is: the periodic check sees the target.
    let mut installer =
        Installer::start(&host, &[("CNI_NET_DIR", &host_net_dir), ("CFGCHECK_INTERVAL", "1"), UNINSTALL]);
    wait_ready(&host, &installer);
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link is still a link");
    assert!(chained(&real, PLUGIN), "the target holds our entry; log:\n{}", installer.log());
    let ours = json(&real).unwrap()["plugins"][3]["kubernetes"]["kubeconfig"].clone();
    assert_eq!(ours, format!("{host_net_dir}/{KUBECONFIG}"), "paths in our entry are host paths");

    // The primary rewrites its real file: seen through the link, repaired there.
    let newer = CALICO.replace("\"mtu\": 0", "\"mtu\": 1450");
    primary_writes(&real, &newer);
    let repaired = wait_for(Duration::from_secs(10), || chained(&real, PLUGIN));
    assert!(repaired.is_some(), "{}", installer.log());
    assert!(installer.terminate().success(), "{}", installer.log());
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_to_string(&real).unwrap(), newer, "restored where it lives");
}

#[test]
fn an_absolute_symlink_outside_the_host_net_dir_is_refused_by_name() {
    let host = Host::new();
    let outside = format!("/kmc-host-{}/etc/calico/10-calico.conflist", testkit::unique_suffix());
    let link = host.net_file("10-calico.conflist");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let installer = Installer::start(&host, &[NO_POLLING]);
    let named = wait_for(STARTUP, || {
        let log = installer.log();
        log.contains(&link.display().to_string()) && log.contains(&outside)
    });
    assert!(named.is_some(), "the log names the link and its target:\n{}", installer.log());
    std::thread::sleep(Duration::from_millis(500));
    assert!(!host.ready.exists(), "not ready while the only configuration cannot be read");
    assert_eq!(std::fs::read_link(&link).unwrap().to_string_lossy(), outside, "the link is untouched");
}

/// Unmounts on drop: the test's read-only bind mount never outlives it.
struct BindMount(std::path::PathBuf);

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Item 3: at SIGTERM the net dir cannot be written: our entry stays in the conflist, so
/// the binary (and its kubeconfig) must stay too, or every pod ADD on the node fails.
#[test]
fn sigterm_with_a_read_only_net_dir_keeps_the_binary() {
    if !require_root() {
        return;
    }
    let host = Host::new();
    let conflist = host.net_file("10-calico.conflist");
    std::fs::write(&conflist, CALICO).unwrap();
    let mut installer = Installer::start(&host, &[NO_POLLING, UNINSTALL]);
    wait_ready(&host, &installer);
    let net = host.net.to_str().unwrap();
    assert!(Command::new("mount").args(["--bind", net, net]).status().unwrap().success());
    let _mount = BindMount(host.net.clone());
    assert!(Command::new("mount").args(["-o", "remount,bind,ro", net]).status().unwrap().success());

    let status = installer.terminate();
    assert!(!status.success(), "removal failed, and says so");
    assert!(chained(&conflist, PLUGIN), "our entry is still in");
    assert!(host.bin.join(PLUGIN).exists(), "the binary the conflist chains is still there");
    assert!(host.net_file(KUBECONFIG).exists(), "and so is its kubeconfig");
    assert!(installer.log().contains("keeping the plugin binary"), "{}", installer.log());
}
