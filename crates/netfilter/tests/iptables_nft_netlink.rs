//! iptables-nft over netlink: for every golden rule set, the rules written in
//! iptables-nft-restore's own form without running it must be exactly what the tool
//! writes, as `iptables-nft-save` prints them and as the kernel lists their
//! expressions (`nft --debug=netlink`: the same expressions, xt compat ones included,
//! in the same order, with the same handles); the xt extensions' own data shows in
//! the save output (ports, UIDs, comments, redirect ports). A rule set with a shape
//! not written that way must say so and leave it to the tool.

use netfilter::{BackendChoice, BackendKind, Options, apply};
use testkit::net::{Topology, require_root};

mod common;
use common::golden_configs;

fn options(netlink: bool) -> Options {
    Options {
        backend: BackendChoice::Forced(BackendKind::Nft),
        lock_dir: std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("xtables-locks"),
        iptables_nft_netlink: netlink,
        ..Options::default()
    }
}

/// What the kernel holds for the family, both ways of reading it.
fn state(topo: &Topology, v6: bool) -> String {
    let (save, family) = if v6 { ("ip6tables-nft-save", "ip6") } else { ("iptables-nft-save", "ip") };
    let text = topo.pod.exec(save, &[]);
    let saved: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    // stderr too: nft warns of a table iptables-nft manages.
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", topo.pod.name.as_str(), "nft", "--debug=netlink", "list", "ruleset", family])
        .output()
        .unwrap();
    assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
    let (stderr, stdout) = (String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    // The debug part shows the rules of every family nft fetched, in the kernel's
    // table order (which family's table came first is a race of the two threads):
    // each rule's block (a line naming family, table, chain and handle, then its
    // expressions) is kept for this family.
    let (debug, text) = stdout.split_at(stdout.find("\ntable ").map_or(stdout.len(), |i| i + 1));
    let prefix = format!("{family} ");
    let mut blocks: Vec<String> = Vec::new();
    let mut keep = false;
    for line in debug.lines().filter(|l| !l.trim().is_empty()) {
        if !line.starts_with(' ') {
            keep = line.starts_with(&prefix);
            if keep {
                blocks.push(String::new());
            }
        }
        if let (true, Some(block)) = (keep, blocks.last_mut()) {
            block.push_str(line);
            block.push('\n');
        }
    }
    format!("{}\n{stderr}{}{}", saved.join("\n"), blocks.concat(), text.trim_end())
}

#[test]
fn netlink_writes_exactly_what_iptables_nft_restore_writes() {
    if !require_root() {
        return;
    }
    let (mut written, mut left) = (Vec::new(), Vec::new());
    let mut failures = Vec::new();
    for (name, cfg, ipv6) in golden_configs() {
        let by_tool = Topology::new("xtex", ipv6);
        let report = apply(&by_tool.pod.open(), &cfg, &options(false)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!report.backend_reason.contains("netlink"), "{name}: {}", report.backend_reason);
        let by_us = Topology::new("xtnl", ipv6);
        let report = apply(&by_us.pod.open(), &cfg, &options(true)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let over_netlink = report.backend_reason.matches("written over netlink in iptables-nft's form").count();
        if over_netlink == report.families.len() {
            written.push(name.clone());
        } else {
            assert!(
                report.backend_reason.contains("iptables-nft-restore run for"),
                "{name}: {}",
                report.backend_reason
            );
            left.push(format!("{name}: {}", report.backend_reason));
        }
        for v6 in [false, true].into_iter().filter(|v6| !v6 || ipv6) {
            let (want, got) = (state(&by_tool, v6), state(&by_us, v6));
            if want != got {
                failures.push(format!("{name} v6={v6}:\n--- iptables-nft-restore\n{want}\n+++ ours\n{got}"));
            }
        }
    }
    println!("written over netlink: {written:?}\nleft to the tool:\n{}", left.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    // The defaults and the common exclusions go over netlink: the check above is no
    // comparison of the tool with itself.
    for case in ["defaults-legacy-dualstack", "exclusions", "gateway", "port-sets", "dns-per-nameserver"] {
        assert!(written.iter().any(|w| w == case), "{case} was not written over netlink: {left:#?}");
    }
}

/// The form is the one of the installed tool's version only: the version is asked once
/// (`-V`) and cached under the tool's identity in the run dir. Another version is a
/// FAKE here (this host has one iptables): the cache is edited to name it, as an
/// upgrade of the package would make `-V` say; then the tool writes the rules.
#[test]
fn only_the_proven_iptables_nft_version_is_written_over_netlink() {
    if !require_root() {
        return;
    }
    let run_dir = tempfile::tempdir().unwrap();
    let opts = Options { lock_dir: run_dir.path().to_owned(), ..options(true) };
    let cfg = kuma::Config::default();
    let first = apply(&Topology::new("xtv1", false).pod.open(), &cfg, &opts).unwrap();
    assert!(first.backend_reason.contains("ipv4: written over netlink"), "{}", first.backend_reason);
    let cache = run_dir.path().join("iptables-nft-version");
    let cached = std::fs::read_to_string(&cache).unwrap();
    assert!(cached.ends_with("\t1.8.9\n"), "{cached:?}");

    std::fs::write(&cache, cached.replace("\t1.8.9\n", "\t1.8.10\n")).unwrap();
    let other = apply(&Topology::new("xtv2", false).pod.open(), &cfg, &opts).unwrap();
    assert!(
        other.backend_reason.contains("ipv4: iptables-nft-restore run: the installed iptables-nft is v1.8.10"),
        "{}",
        other.backend_reason
    );

    // A cache of another tool (its identity differs) is not believed: the tool is asked.
    std::fs::write(&cache, cached.replacen("/", "/x", 1).replace("\t1.8.9\n", "\t1.8.10\n")).unwrap();
    let again = apply(&Topology::new("xtv3", false).pod.open(), &cfg, &opts).unwrap();
    assert!(again.backend_reason.contains("ipv4: written over netlink"), "{}", again.backend_reason);
    assert_eq!(std::fs::read_to_string(&cache).unwrap(), cached);
}
