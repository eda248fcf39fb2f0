//! `kong-mesh-cni rules` on hostile or unlucky input (hardening issue items 2 and 15).
//!
//! Item 2: IPv6 is decided from whether the namespace has IPv6
//! enabled, not from its addresses, which may appear after ADD (eth0's link-local comes
//! only once the other end of the veth is up).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use testkit::net::{NamedNetns, require_root, unique_name};

const BIN: &str = env!("CARGO_BIN_EXE_kong-mesh-cni");

fn rules(args: &[&str], run_dir: &Path) -> (bool, String) {
    let out = Command::new(BIN).arg("rules").args(args).env("KMC_RUN_DIR", run_dir).env_remove("CNI_COMMAND").output();
    let out = out.unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn ipv6_rules_are_applied_before_the_link_local_address_appears() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pod_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mesh-pod.yaml");
    for backend in ["nft", "legacy"] {
        let (pod, peer) = (NamedNetns::new("v6late"), NamedNetns::new("v6peer"));
        // The veth is made inside the pod namespace, its other end moved to the peer (the
        // node side) and left down there: eth0 has no carrier, so no link-local yet.
        let other = unique_name("p");
        pod.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", &other]);
        pod.ip(&["link", "set", &other, "netns", &peer.name]);
        pod.ip(&["link", "set", "eth0", "up"]);
        let v6_addrs = || pod.ip(&["-6", "addr", "show", "dev", "eth0"]);
        assert!(!v6_addrs().contains("fe80"), "no link-local before the node side is up: {}", v6_addrs());

        let args = |action: &str| {
            let pod_file = pod_file.to_string_lossy().into_owned();
            [["--pod", &pod_file, "--netns", &pod.path(), action, "--iptables-backend", backend].map(String::from)]
                .concat()
        };
        let run = |action: &str| rules(&args(action).iter().map(String::as_str).collect::<Vec<_>>(), tmp.path());
        let (ok, out) = run("--apply");
        assert!(ok, "{backend}: {out}");
        assert!(out.contains("ipv6"), "{backend}: IPv6 rules applied although no address is there yet: {out}");
        peer.ip(&["link", "set", &other, "up"]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !v6_addrs().contains("fe80") {
            assert!(Instant::now() < deadline, "the link-local address never came: {}", v6_addrs());
            std::thread::sleep(Duration::from_millis(50));
        }
        let (ok, out) = run("--verify");
        assert!(ok, "{backend}: rules missing once the address came: {out}");
        let (ok, out) = run("--remove");
        assert!(ok, "{backend}: {out}");
    }
}

/// Item 15: each list is capped, but a YAML alias repeats a 1,024-port entry 1,024
/// times in 16 KiB: ~141k rules per family. The total is capped, with a named error.
#[test]
fn nested_lists_cannot_multiply_into_hundreds_of_thousands_of_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let ports: Vec<String> = (1..=1024).map(|p| p.to_string()).collect();
    let mut yaml =
        format!("redirect:\n  outbound:\n    excludePortsForUIDs:\n    - &e \"tcp,udp:{}:1000\"\n", ports.join(","));
    yaml.push_str(&"    - *e\n".repeat(1023));
    let fixture = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mesh-pod.yaml"));
    let annotation = format!("    traffic.kuma.io/transparent-proxy-config: {:?}\n", yaml);
    let pod = fixture.unwrap().replacen("  annotations:\n", &format!("  annotations:\n{annotation}"), 1);
    let path = tmp.path().join("pod.yaml");
    std::fs::write(&path, pod).unwrap();
    let started = Instant::now();
    let (ok, out) = rules(&["--pod", path.to_str().unwrap(), "--ipv6=false"], tmp.path());
    assert!(!ok, "{}", &out[..out.len().min(300)]);
    assert!(out.contains("rules; at most 20000 are allowed"), "{}", &out[..out.len().min(300)]);
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
}
