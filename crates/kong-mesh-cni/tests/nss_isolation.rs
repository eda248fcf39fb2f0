//! iptables' owner match calls getpwnam(), which on some nodes goes to LDAP/SSSD and can
//! hang. A hung directory service cannot be produced here for real, so this test uses
//! a FAKE: an NSS module (`kmcslow`, built with gcc) whose getpwnam sleeps 30 s,
//! enabled through nsswitch.conf in a private mount namespace of the test. It first
//! shows that plain iptables-restore stalls with it, then that our apply does not.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use testkit::net::{NamedNetns, require_root, sh};

const BIN: &str = env!("CARGO_BIN_EXE_kong-mesh-cni");

const SLOW_MODULE: &str = r#"
#include <nss.h>
#include <pwd.h>
#include <stddef.h>
#include <unistd.h>
enum nss_status _nss_kmcslow_getpwnam_r(const char *n, struct passwd *p, char *b, size_t l, int *e) {
    (void)n; (void)p; (void)b; (void)l; (void)e;
    sleep(30);
    return NSS_STATUS_NOTFOUND;
}
"#;

/// Runs `program args` in a private mount namespace where the fake module is installed
/// and nsswitch.conf sends passwd lookups to it.
fn with_slow_nss(dir: &Path, program: &str, args: &[&str]) -> (std::process::Output, Duration) {
    let setup = format!(
        "mount -t overlay overlay -o lowerdir={d}/lib:/usr/lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu && \
         mount --bind {d}/nsswitch.conf /etc/nsswitch.conf && exec \"$@\"",
        d = dir.display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &setup, "sh", program]).args(args);
    let start = Instant::now();
    let out = cmd.output().unwrap();
    (out, start.elapsed())
}

#[test]
fn a_hanging_user_database_does_not_stall_apply() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("lib")).unwrap();
    std::fs::write(dir.join("slow.c"), SLOW_MODULE).unwrap();
    let lib = dir.join("lib/libnss_kmcslow.so.2");
    sh("gcc", &["-shared", "-fPIC", "-o", lib.to_str().unwrap(), dir.join("slow.c").to_str().unwrap()]);
    std::fs::write(dir.join("nsswitch.conf"), "passwd: kmcslow files\ngroup: files\n").unwrap();
    let payload = dir.join("payload");
    std::fs::write(&payload, "*nat\n-A OUTPUT -p tcp -m owner --uid-owner 5678 -j RETURN\nCOMMIT\n").unwrap();
    let ns = NamedNetns::new("nss");

    // The fake works: plain iptables-restore hangs in getpwnam.
    let (out, took) = with_slow_nss(
        dir,
        "timeout",
        &["3", "ip", "netns", "exec", &ns.name, "iptables-nft-restore", "--noflush", payload.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(124), "plain iptables-restore should have stalled ({took:?})");

    // Ours applies the whole rule set quickly under the same conditions.
    let pod = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mesh-pod.yaml");
    let (out, took) = with_slow_nss(
        dir,
        BIN,
        &["rules", "--pod", pod.to_str().unwrap(), "--netns", &ns.path(), "--apply", "--iptables-backend", "nft"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(took < Duration::from_secs(5), "apply took {took:?}");
}
