//! `kong-mesh-cni validate` inside real pod namespaces: passes only when the redirect is
//! there, with the contract's exit code (97) otherwise, for both probes (as an
//! application's UID: outbound; as the sidecar's UID: loopback to the inbound port),
//! over IPv4 and IPv6.

use std::process::Output;
use std::time::{Duration, Instant};

use netfilter::Options;
use testkit::net::{Topology, require_root};

const BIN: &str = env!("CARGO_BIN_EXE_kong-mesh-cni");
const NOT_REDIRECTED: i32 = 97;

fn validate(topo: &Topology, as_uid: Option<u32>, extra: &[&str]) -> (Output, Duration) {
    let mut args: Vec<&str> = vec!["netns", "exec", &topo.pod.name];
    let uid_arg;
    if let Some(uid) = as_uid {
        uid_arg = uid.to_string();
        args.extend(["setpriv", "--reuid", &uid_arg, "--regid", &uid_arg, "--clear-groups"]);
    }
    args.extend([BIN, "validate"]);
    args.extend_from_slice(extra);
    let start = Instant::now();
    let out = std::process::Command::new("ip").args(&args).env_remove("CNI_COMMAND").output().unwrap();
    (out, start.elapsed())
}

fn apply(topo: &Topology) {
    let opts =
        Options { lock_dir: std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("locks"), ..Options::default() };
    netfilter::apply(&topo.pod.open(), &kuma::Config::default(), &opts).unwrap();
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn passes_with_the_rules_for_both_probes_and_families() {
    if !require_root() {
        return;
    }
    for ipv6 in [false, true] {
        let topo = Topology::new("val", ipv6);
        apply(&topo);
        for uid in [None, Some(5678)] {
            let (out, _) = validate(&topo, uid, &["--timeout", "5s"]);
            let text = stdout(&out);
            assert!(out.status.success(), "ipv6={ipv6} uid={uid:?}: {}{}", text, stderr(&out));
            let expect_listener = match uid {
                None => ":15001 (original destination",
                Some(_) => ":15006 (original destination",
            };
            assert!(text.contains("ipv4: redirected to") && text.contains(expect_listener), "{text}");
            assert_eq!(
                text.contains("ipv6: redirected to"),
                ipv6,
                "IPv6 is probed exactly when the pod has it: {text}"
            );
            if uid.is_some() {
                assert!(text.contains("original destination 127.0.0.6:"), "{text}");
            } else {
                assert!(text.contains("original destination 10.255.255.254:"), "{text}");
            }
        }
    }
}

#[test]
fn fails_with_the_contract_code_without_rules() {
    if !require_root() {
        return;
    }
    for ipv6 in [false, true] {
        let topo = Topology::new("valno", ipv6);
        let family = if ipv6 { "ipv6" } else { "ipv4" };
        // As an application: the SYN leaves for nowhere, so this is the timeout case.
        let (out, took) = validate(&topo, None, &["--timeout", "1s", "--family", family]);
        assert_eq!(out.status.code(), Some(NOT_REDIRECTED), "{}", stderr(&out));
        assert!(stderr(&out).contains(&format!("{family} traffic is not redirected")), "{}", stderr(&out));
        assert!(took < Duration::from_secs(4), "gave up after {took:?}");
        // As the sidecar: refused at once, retried until the timeout.
        let (out, took) = validate(&topo, Some(5678), &["--timeout", "600ms", "--family", family]);
        assert_eq!(out.status.code(), Some(NOT_REDIRECTED), "{}", stderr(&out));
        assert!(took < Duration::from_secs(3), "gave up after {took:?}");
    }
}

#[test]
fn a_busy_probe_port_is_another_failure() {
    if !require_root() {
        return;
    }
    let topo = Topology::new("valbusy", false);
    apply(&topo);
    let _occupied = testkit::net::listen_tcp(&topo.pod.open(), false, 15001);
    let (out, _) = validate(&topo, None, &["--timeout", "1s"]);
    assert_eq!(out.status.code(), Some(1), "not 97: the redirect is not known to be missing");
    assert!(stderr(&out).contains("cannot listen on 0.0.0.0:15001"), "{}", stderr(&out));
}
