//! Entering real network namespaces (needs root; fails loudly under CI when not root).

use std::process::Command;

use netns::{NetNs, NetNsError};
use testkit::net::{NamedNetns, require_root};

fn link_names() -> String {
    String::from_utf8(Command::new("ip").args(["-o", "link"]).output().unwrap().stdout).unwrap()
}

#[test]
fn work_runs_inside_and_the_caller_stays_outside() {
    if !require_root() {
        return;
    }
    let ns = NamedNetns::new("run");
    let handle = NetNs::open(ns.path()).unwrap();
    let host = NetNs::current().unwrap().inode().unwrap();
    assert_ne!(handle.inode().unwrap(), host);

    // Children spawned from the work thread inherit its namespace: only `lo` is there.
    let inside = handle.run(link_names).unwrap();
    assert_eq!(inside.lines().count(), 1, "{inside}");
    assert!(inside.contains(": lo:"), "{inside}");
    let seen = handle.run(|| NetNs::current().unwrap().inode().unwrap()).unwrap();
    assert_eq!(seen, handle.inode().unwrap());

    // The calling thread never moved.
    assert_eq!(NetNs::current().unwrap().inode().unwrap(), host);
}

/// The works run at the same time (each waits to hear from the other), each inside the
/// namespace, results in order; the caller stays outside.
#[test]
fn run_each_runs_the_works_at_once_inside() {
    if !require_root() {
        return;
    }
    let ns = NamedNetns::new("each");
    let handle = NetNs::open(ns.path()).unwrap();
    let host = NetNs::current().unwrap().inode().unwrap();
    let (to_b, from_a) = std::sync::mpsc::channel();
    let (to_a, from_b) = std::sync::mpsc::channel();
    let wait = std::time::Duration::from_secs(5);
    let works: Vec<Box<dyn FnOnce() -> (u64, bool) + Send>> = vec![
        Box::new(move || {
            to_b.send(()).unwrap();
            (NetNs::current().unwrap().inode().unwrap(), from_b.recv_timeout(wait).is_ok())
        }),
        Box::new(move || {
            to_a.send(()).unwrap();
            (NetNs::current().unwrap().inode().unwrap() + 1, from_a.recv_timeout(wait).is_ok())
        }),
    ];
    let results = handle.run_each(works).unwrap();
    let inode = handle.inode().unwrap();
    assert_eq!(results, vec![(inode, true), (inode + 1, true)], "one after the other, or outside");
    assert_eq!(NetNs::current().unwrap().inode().unwrap(), host);
}

#[test]
fn errors_name_the_path() {
    match NetNs::open("/nonexistent/netns") {
        Err(NetNsError::Open { path, .. }) => assert_eq!(path.to_str(), Some("/nonexistent/netns")),
        other => panic!("unexpected {other:?}"),
    }
    match NetNs::open("/proc/self/ns/uts") {
        Err(e @ NetNsError::NotNetwork { .. }) => assert!(e.to_string().contains("/proc/self/ns/uts")),
        other => panic!("unexpected {other:?}"),
    }
    match NetNs::open("/etc/hostname") {
        Err(NetNsError::NotNetwork { .. }) => {}
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_panic_in_the_work_reaches_the_caller() {
    if !require_root() {
        return;
    }
    let ns = NamedNetns::new("panic");
    let handle = NetNs::open(ns.path()).unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handle.run(|| panic!("boom"))));
    assert!(caught.is_err());
    assert_eq!(handle.run(|| 7).unwrap(), 7, "the handle is still usable");
}

#[test]
fn a_fifo_as_the_namespace_path_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("netns");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let started = std::time::Instant::now();
    assert!(matches!(NetNs::open(&fifo), Err(NetNsError::NotNetwork { .. })));
    assert!(started.elapsed() < std::time::Duration::from_secs(2), "the open did not wait for a writer");
}

#[test]
fn ipv6_enabled_is_read_in_the_namespace_not_from_addresses() {
    if !require_root() {
        return;
    }
    let (on, off) = (NamedNetns::new("v6on"), NamedNetns::new("v6off"));
    off.exec("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    // Neither has an IPv6 address on anything but lo: the sysctl decides.
    assert!(on.open().run(netns::ipv6_enabled).unwrap());
    assert!(!off.open().run(netns::ipv6_enabled).unwrap());
}
