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
