//! The reference CNI runtime (libcni) driving real reference plugins against fresh
//! network namespaces.

use std::path::Path;

use serde_json::{Value, json};
use testkit::{Attachment, CniRuntime, NamedNetns, Plugins, skip_heavy, unique_suffix};

/// The IPv4 address (CIDR) of the result's first IP.
fn first_ip(result: &Value) -> String {
    result["ips"][0]["address"].as_str().unwrap_or_else(|| panic!("no IP in result {result}")).to_string()
}

/// host-local's lease files (one per IP) for this runtime's network.
fn leases(rt: &CniRuntime) -> Vec<String> {
    let name = rt.conflist()["name"].as_str().unwrap().to_string();
    let dir = rt.state_dir().join("ipam").join(name);
    let mut ips: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    ips.retain(|f| f.parse::<std::net::IpAddr>().is_ok());
    ips.sort();
    ips
}

fn bridge_add_check_del(plugins: Plugins) {
    let rt = CniRuntime::bridge(plugins);
    let ns = NamedNetns::new("cni");
    let a = Attachment::new(&ns, "default", "pod-a");

    let result = rt.add(&a).expect("ADD");
    assert_eq!(result["cniVersion"], plugins.cni_version());
    let ip = first_ip(&result);
    let addr = ns.ip(&["-4", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains(&format!("inet {ip}")), "{ip} not on eth0 in {}: {addr}", ns.name);
    let host = testenv_ip_link(rt.bridge_name().unwrap());
    assert!(host.contains("state UP") || host.contains("UP"), "bridge not up: {host}");
    let bare_ip = ip.split('/').next().unwrap().to_string();
    assert_eq!(leases(&rt), [bare_ip], "host-local lease");

    rt.check(&a).expect("CHECK");
    rt.del(&a).expect("DEL");

    let links = ns.ip(&["link", "show"]);
    assert!(!links.contains("eth0"), "eth0 still in {} after DEL: {links}", ns.name);
    assert!(!ns.ip(&["-4", "addr"]).contains(&ip), "{ip} still in {} after DEL", ns.name);
    assert!(leases(&rt).is_empty(), "lease not released by DEL: {:?}", leases(&rt));
    // DEL is idempotent, as the spec demands.
    rt.del(&a).expect("second DEL");
}

fn testenv_ip_link(dev: &str) -> String {
    let out = std::process::Command::new("ip").args(["link", "show", "dev", dev]).output().unwrap();
    assert!(out.status.success(), "host link {dev} missing");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn host_link_exists(dev: &str) -> bool {
    Path::new("/sys/class/net").join(dev).exists()
}

#[test]
fn bridge_host_local_with_debian_plugins() {
    if testkit::skip_privileged("bridge_host_local_with_debian_plugins") {
        return;
    }
    bridge_add_check_del(Plugins::Debian);
}

#[test]
fn bridge_host_local_with_upstream_plugins() {
    if testkit::skip_privileged("bridge_host_local_with_upstream_plugins") {
        return;
    }
    bridge_add_check_del(Plugins::Upstream);
}

#[test]
fn ptp_host_local_with_upstream_plugins() {
    if testkit::skip_privileged("ptp_host_local_with_upstream_plugins") {
        return;
    }
    let rt = CniRuntime::ptp(Plugins::Upstream);
    let ns = NamedNetns::new("cni");
    let a = Attachment::new(&ns, "default", "pod-ptp");
    let ip = first_ip(&rt.add(&a).expect("ADD"));
    assert!(ns.ip(&["-4", "addr", "show", "dev", "eth0"]).contains(&ip));
    rt.del(&a).expect("DEL");
    assert!(!ns.ip(&["link", "show"]).contains("eth0"));
}

#[test]
fn guards_remove_netns_bridge_and_state() {
    if testkit::skip_privileged("guards_remove_netns_bridge_and_state") {
        return;
    }
    let rt = CniRuntime::bridge(Plugins::Upstream);
    let ns = NamedNetns::new("cni");
    let a = Attachment::new(&ns, "default", "pod-leak");
    rt.add(&a).expect("ADD");
    let (bridge, state, netns) =
        (rt.bridge_name().unwrap().to_string(), rt.state_dir().to_path_buf(), std::path::PathBuf::from(ns.path()));
    assert!(host_link_exists(&bridge) && state.exists() && netns.exists());
    // No DEL: the guards must clean up as after a failed test.
    drop(rt);
    drop(ns);
    assert!(!host_link_exists(&bridge), "bridge {bridge} left behind");
    assert!(!state.exists(), "{} left behind", state.display());
    assert!(!netns.exists(), "{} left behind", netns.display());
}

/// STATUS goes through libcni to the plugins of a 1.1.0 list: the bridge plugin asks its
/// IPAM plugin, so a missing IPAM plugin makes the network not ready, and the plugin's
/// error (code and message) comes back to the runtime.
#[test]
fn status_reaches_the_plugins() {
    if skip_heavy("status_reaches_the_plugins") {
        return;
    }
    let rt = CniRuntime::bridge(Plugins::Upstream);
    rt.status().expect("STATUS of a healthy chain");

    let mut conf = rt.conflist();
    conf["plugins"][0]["ipam"]["type"] = json!("kmc-no-such-ipam");
    rt.set_conflist(&conf);
    let err = rt.status().expect_err("STATUS with a missing IPAM plugin");
    assert_eq!(err.code, Some(999), "{err}"); // the bridge plugin's internal error
    assert!(err.msg.contains("kmc-no-such-ipam"), "{err}");

    // A pre-1.1.0 list has no STATUS: libcni does not call the plugins at all.
    conf["cniVersion"] = json!("1.0.0");
    rt.set_conflist(&conf);
    rt.status().expect("STATUS is skipped below 1.1.0");
}

/// GC (CNI 1.1.0) reaches host-local with the valid attachments: it releases the stale
/// reservation and keeps the valid one.
#[test]
fn gc_reaches_host_local() {
    if skip_heavy("gc_reaches_host_local") {
        return;
    }
    let net = format!("kmc-gc-{}", unique_suffix());
    let rt = CniRuntime::custom(vec![Plugins::Upstream.dir()], |dir| {
        json!({
            "cniVersion": "1.1.0",
            "name": net,
            "plugins": [{
                "type": "host-local",
                "ipam": {"type": "host-local", "dataDir": dir.join("ipam"), "ranges": [[{"subnet": "198.18.255.0/24"}]]},
            }],
        })
    });
    // Reservations as host-local writes them: file named by IP, "CONTAINER_ID\r\nIFNAME".
    let leases = rt.state_dir().join("ipam").join(&net);
    std::fs::create_dir_all(&leases).unwrap();
    std::fs::write(leases.join("198.18.255.10"), "live-container\r\neth0").unwrap();
    std::fs::write(leases.join("198.18.255.11"), "stale-container\r\neth0").unwrap();

    let live = Attachment {
        netns: "/nonexistent".into(),
        container_id: "live-container".into(),
        ifname: "eth0".into(),
        pod_namespace: "default".into(),
        pod_name: "live".into(),
        pod_uid: String::new(),
    };
    rt.gc(&[&live]).expect("GC");
    assert!(leases.join("198.18.255.10").exists(), "valid reservation released");
    assert!(!leases.join("198.18.255.11").exists(), "stale reservation kept: GC did not reach host-local");
}

/// GC also makes libcni DEL every attachment it cached that the runtime no longer
/// lists, through the whole chain.
#[test]
fn gc_deletes_stale_attachments_through_the_chain() {
    if testkit::skip_privileged("gc_deletes_stale_attachments_through_the_chain") {
        return;
    }
    let rt = CniRuntime::bridge(Plugins::Upstream);
    let (ns_live, ns_stale) = (NamedNetns::new("cni"), NamedNetns::new("cni"));
    let live = Attachment::new(&ns_live, "default", "live");
    let stale = Attachment::new(&ns_stale, "default", "stale");
    let live_ip = first_ip(&rt.add(&live).expect("ADD live"));
    rt.add(&stale).expect("ADD stale");

    rt.gc(&[&live]).expect("GC");
    assert!(!ns_stale.ip(&["link", "show"]).contains("eth0"), "stale attachment not deleted");
    assert!(ns_live.ip(&["-4", "addr", "show", "dev", "eth0"]).contains(&live_ip));
    assert_eq!(leases(&rt), [live_ip.split('/').next().unwrap()]);
    rt.del(&live).expect("DEL live");
}

/// A plugin's CNI error reaches the test with its code.
#[test]
fn plugin_errors_carry_their_code() {
    if testkit::skip_privileged("plugin_errors_carry_their_code") {
        return;
    }
    let rt = CniRuntime::bridge(Plugins::Upstream);
    let ns = NamedNetns::new("cni");
    let mut a = Attachment::new(&ns, "default", "pod-err");
    a.netns = "/var/run/netns/kmc-test-does-not-exist".into();
    let err = rt.add(&a).expect_err("ADD into a missing netns");
    assert!(err.code.is_some(), "not a plugin error: {err}");
    assert!(err.msg.contains("netns") || err.msg.contains("kmc-test-does-not-exist"), "{err}");
}

/// `--net-dir` loads the config the way kubelet/containerd do: files in sorted order,
/// unparsable ones skipped, the first valid one wins, a `.conf` wrapped into a list.
/// Each candidate names a different missing IPAM plugin, so the STATUS error tells
/// which one was loaded.
#[test]
fn net_dir_loads_the_first_valid_config() {
    if skip_heavy("net_dir_loads_the_first_valid_config") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let conf = |ipam: &str| json!({"type": "bridge", "bridge": "kmc-unused", "ipam": {"type": ipam}});
    let list = |ipam: &str| json!({"cniVersion": "1.1.0", "name": "n", "plugins": [conf(ipam)]});
    let write = |name: &str, v: &Value| std::fs::write(dir.path().join(name), v.to_string()).unwrap();
    std::fs::write(dir.path().join("00-broken.conflist"), "{not json").unwrap();
    write("10-a.conflist", &list("kmc-missing-a"));
    write("20-b.conflist", &list("kmc-missing-b"));
    std::fs::write(dir.path().join("05-notes.txt"), "ignored: not a config extension").unwrap();

    let status = || {
        let out = std::process::Command::new(testkit::bin_dir().join("cni-runtime"))
            .arg("--net-dir")
            .arg(dir.path())
            .arg("--bin-dir")
            .arg(Plugins::Upstream.dir())
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .arg("status")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(status().contains("kmc-missing-a"), "{}", status());

    // A single-plugin .conf sorted first is wrapped into a list and wins.
    let mut single = conf("kmc-missing-c");
    single["cniVersion"] = json!("1.1.0");
    single["name"] = json!("c");
    write("07-c.conf", &single);
    assert!(status().contains("kmc-missing-c"), "{}", status());
}
