//! Executable goldens (issue 23): every recorded real-world net dir of
//! `crates/installer/tests/golden` is merged by the installer's planner (as the golden
//! test does), then the reference CNI runtime (libcni, loading the net dir as containerd
//! does) attaches a mesh pod and a plain pod through the merged file, at the cniVersion
//! the file declares, with real plugins: the reference plugins v1.10.0 and the flannel
//! meta plugin v0.9.1 (`scripts/testenv-build.sh`). A vendor plugin that cannot be built
//! here (calico, cilium-cni, aws-cni, egress-cni, azure-vnet, multus) is replaced, for
//! that entry only, by the nearest reference plugin; every other entry runs as recorded,
//! with host paths and host network names (IPAM data dirs, subnets, bridge names, the
//! flannel subnet file) pointed at the test's own. Each test prints what ran for real,
//! what was replaced and what was rewritten.
//!
//! Each run: the validator passes in the mesh pod, outbound traffic lands on the
//! sidecar's listener with its original destination, the plain pod has no rule, and DEL
//! leaves no rule (pod or host), no IPAM lease and no host link.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use installer::plan::{self, FileOp, Plan, Snapshot};
use installer::template::{DEFAULT_TEMPLATE, Ours};
use serde_json::{Value, json};
use testkit::net::{NamedNetns, accept_within, connect_tcp, listen_tcp, read_exact};
use testkit::{Attachment, CniRuntime, Plugins, bin_dir, test_subnet, unique_suffix};
use validator::original_destination;

mod support;
use support::{BIN, fixture, our_entry, saved_rules};

/// Kuma's default sidecar UID: the `kuma-validation` init container runs as it.
const SIDECAR_UID: &str = "5678";
/// What the flannel subnet file says the cluster network is (flannel adds a route to it).
const FLANNEL_NETWORK: &str = "198.18.0.0/15";

/// CNI versions the flannel meta plugin v0.9.1 speaks.
const FLANNEL_VERSIONS: [&str; 5] = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0"];

/// What ran, what was replaced, what was pointed elsewhere: printed with each test.
#[derive(Default)]
struct Notes {
    real: BTreeSet<String>,
    substituted: BTreeSet<String>,
    rewritten: BTreeSet<String>,
}

/// The test's own host-side places for one case.
struct Places {
    state: tempfile::TempDir,
    subnet: String,
    bridge: String,
}

impl Places {
    fn new() -> Places {
        let state = tempfile::Builder::new().prefix("kmc-primary-").tempdir().unwrap();
        Places { state, subnet: test_subnet(), bridge: format!("kmc-br-{}", unique_suffix()) }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.state.path().join(name)
    }

    fn host_local(&self, routes: Value) -> Value {
        json!({"type": "host-local", "dataDir": self.path("ipam"), "ranges": [[{"subnet": self.subnet}]], "routes": routes})
    }

    /// The nearest reference plugin for a vendor's own: a veth with host routes.
    fn ptp(&self) -> Value {
        json!({"type": "ptp", "ipMasq": false, "ipam": self.host_local(json!([{"dst": "0.0.0.0/0"}]))})
    }
}

/// Deletes the host bridge a case's chain created (the bridge plugin never does), and,
/// when the firewall plugin created its chains in this test, those.
struct HostCleanup {
    bridge: String,
    firewall_chains: bool,
}

impl Drop for HostCleanup {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "delete", &self.bridge]).output();
        if self.firewall_chains {
            let ipt = |args: &[&str]| Command::new("iptables").arg("-w").args(args).output();
            let _ =
                ipt(&["-D", "FORWARD", "-m", "comment", "--comment", "CNI firewall plugin rules", "-j", "CNI-FORWARD"]);
            let _ = ipt(&["-D", "FORWARD", "-j", "CNI-FORWARD"]);
            for chain in ["CNI-FORWARD", "CNI-ADMIN"] {
                let _ = ipt(&["-F", chain]);
                let _ = ipt(&["-X", chain]);
            }
        }
    }
}

fn iptables_chain_exists(chain: &str) -> bool {
    Command::new("iptables").args(["-w", "-S", chain]).output().is_ok_and(|o| o.status.success())
}

/// Makes `entry` (a plugin of the file the runtime uses) runnable here: a recorded
/// reference plugin keeps every field but host places; a vendor plugin is replaced.
fn adapt(entry: &mut Value, list_version: &str, places: &Places, notes: &mut Notes) {
    let kind = entry["type"].as_str().expect("a plugin entry has a type").to_owned();
    let replace = |entry: &mut Value, with: Value, why: &str, notes: &mut Notes| {
        let by = with["type"].as_str().unwrap().to_owned();
        notes.substituted.insert(format!("{kind} -> {by} ({why})"));
        if with.get("ipam").is_some() {
            notes.rewritten.insert(format!("the {by} substitute: host-local in a temp dataDir on {}", places.subnet));
        }
        if let Some(bridge) = with.get("bridge") {
            notes.rewritten.insert(format!("the bridge substitute's bridge: {bridge}"));
        }
        notes.real.insert(by);
        *entry = with;
    };
    match kind.as_str() {
        "ptp" => {
            let ipam = &mut entry["ipam"];
            assert_eq!(ipam["type"], "host-local", "recorded ptp entries use host-local");
            let recorded = ipam.get("dataDir").map_or("the default /var/lib/cni/networks".into(), Value::to_string);
            ipam["dataDir"] = json!(places.path("ipam"));
            for range in ipam["ranges"].as_array_mut().unwrap().iter_mut().flat_map(|r| r.as_array_mut().unwrap()) {
                notes.rewritten.insert(format!("host-local subnet {} -> {}", range["subnet"], places.subnet));
                range["subnet"] = json!(places.subnet);
            }
            notes.rewritten.insert(format!("host-local dataDir {recorded} -> a temp dir"));
            notes.real.extend(["ptp".to_string(), "host-local".to_string()]);
        }
        "portmap" | "bandwidth" | "firewall" | "tuning" => {
            notes.real.insert(kind);
        }
        "flannel" if FLANNEL_VERSIONS.contains(&list_version) => {
            entry["subnetFile"] = json!(places.path("subnet.env"));
            entry["dataDir"] = json!(places.path("flannel"));
            entry["ipam"] = json!({"dataDir": places.path("ipam")});
            entry["delegate"]["bridge"] = json!(places.bridge);
            notes.rewritten.insert(format!(
                "flannel subnetFile /run/flannel/subnet.env, dataDir /var/lib/cni/flannel, its host-local dataDir -> temp \
                 (subnet.env written as flanneld would: subnet {}), delegate bridge cni0 -> {}",
                places.subnet, places.bridge
            ));
            notes.real.extend(["flannel v0.9.1".to_string(), "bridge".to_string(), "host-local".to_string()]);
        }
        "flannel" => {
            // What flannel hands its delegate: the recorded delegate's fields, the bridge
            // type, the subnet file's subnet with a route to the cluster network.
            let mut bridge = entry["delegate"].clone();
            bridge["type"] = json!("bridge");
            bridge["bridge"] = json!(places.bridge);
            bridge["isGateway"] = json!(true);
            bridge["ipMasq"] = json!(false);
            bridge["mtu"] = json!(1450);
            bridge["ipam"] = places.host_local(json!([{"dst": FLANNEL_NETWORK}]));
            let why = format!(
                "the flannel plugin built here speaks CNI <= 0.4.0, the file {list_version}; its delegate as flannel writes it"
            );
            replace(entry, bridge, &why, notes);
            notes.real.insert("host-local".into());
        }
        "calico" | "cilium-cni" | "aws-cni" => {
            replace(entry, places.ptp(), "the vendor's plugin needs its agent or datastore", notes);
            notes.real.insert("host-local".into());
        }
        "multus" => {
            replace(entry, places.ptp(), "multus is not built by this branch; its calico delegate -> ptp", notes);
            notes.real.insert("host-local".into());
        }
        "azure-vnet" => {
            let bridge = json!({"type": "bridge", "bridge": places.bridge, "isGateway": false, "ipMasq": false,
                                "ipam": places.host_local(json!([]))});
            replace(entry, bridge, "azure-vnet needs Azure's CNS and wireserver", notes);
            notes.real.insert("host-local".into());
        }
        "egress-cni" => {
            assert_eq!(entry["enabled"], "false", "recorded disabled: a pass-through");
            replace(
                entry,
                json!({"type": "tuning"}),
                "disabled egress-cni passes the result through; so does tuning",
                notes,
            );
        }
        other => panic!("no decision for the plugin type {other}: run it for real or name its substitute"),
    }
}

fn read_dir(dir: &Path) -> Snapshot {
    let mut snap = Snapshot::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let entry = entry.unwrap();
        snap.insert(entry.file_name().into_string().unwrap(), Ok(std::fs::read(entry.path()).unwrap()));
    }
    snap
}

/// Every file under `dir` whose name is an IP address: a host-local lease.
fn leases(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .flat_map(|e| match e.file_type().unwrap().is_dir() {
            true => leases(&e.path()),
            false => Vec::from_iter(
                e.file_name().to_str().is_some_and(|n| n.parse::<std::net::IpAddr>().is_ok()).then(|| e.path()),
            ),
        })
        .collect()
}

/// Host links an ADD result names outside the pod (veth ends; the bridge, which stays).
fn host_links(result: &Value, bridge: &str) -> Vec<String> {
    result["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i.get("sandbox").is_none_or(|s| s.as_str() == Some("")))
        .filter_map(|i| i["name"].as_str().filter(|n| *n != bridge).map(str::to_owned))
        .collect()
}

fn link_exists(name: &str) -> bool {
    Command::new("ip").args(["link", "show", "dev", name]).output().is_ok_and(|o| o.status.success())
}

/// The host's IPv4 rules (both backends) that name `ip`.
fn host_rules_naming(ip: &str) -> Vec<String> {
    let needle = format!("{ip}/32");
    ["iptables-nft-save", "iptables-legacy-save"]
        .iter()
        .filter_map(|tool| Command::new(tool).output().ok())
        .flat_map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_owned).collect::<Vec<_>>())
        .filter(|l| l.contains(&needle))
        .collect()
}

fn address(result: &Value) -> String {
    let cidr = result["ips"][0]["address"].as_str().unwrap_or_else(|| panic!("no address in {result}"));
    cidr.split('/').next().unwrap().to_owned()
}

/// The `kuma-validation` init container: our validator in the pod, as the sidecar's UID.
fn validate(netns: &NamedNetns) -> std::process::Output {
    let args = ["netns", "exec", netns.name.as_str(), "setpriv", "--reuid", SIDECAR_UID, "--regid", SIDECAR_UID];
    Command::new("ip")
        .args(args)
        .args(["--clear-groups", BIN, "validate", "--family", "ipv4"])
        .env_remove("CNI_COMMAND")
        .output()
        .unwrap()
}

async fn run_case(case: &str) {
    if testkit::skip_privileged(case) {
        return;
    }
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../installer/tests/golden").join(case);
    let f = fixture().await;
    f.ns.create_pod(testkit::mesh_pod("mesh").build()).await;
    f.ns.create_pod(testkit::pod("plain").build()).await;

    // The installer's template (the case's own, or the default) with the plugin's log
    // and run dirs in the test's scratch dir, as CNI_NETWORK_CONFIG would set them.
    let mut template: Value = serde_json::from_str(
        &std::fs::read_to_string(golden.join("template.json")).unwrap_or_else(|_| DEFAULT_TEMPLATE.into()),
    )
    .unwrap();
    let test_entry = our_entry(&f.kubeconfig, f.scratch.path(), json!({}));
    for field in ["log_level", "log_file", "log_socket", "run_dir"] {
        template[field] = test_entry[field].clone();
    }
    let ours = Ours::render(&template.to_string(), &f.kubeconfig.to_string_lossy()).unwrap();

    let input = read_dir(&golden.join("input"));
    let Plan::Apply { file, ops, .. } = plan::chain(None, &input, &ours) else {
        panic!("{case}: the installer wants to write into the recorded net dir");
    };
    let mut merged = input.clone();
    for op in ops {
        match op {
            FileOp::Write { name, content } => merged.insert(name, Ok(content.into_bytes())),
            FileOp::Remove { name } => merged.remove(&name),
        };
    }

    let places = Places::new();
    let mut notes = Notes::default();
    let mut list: Value = serde_json::from_slice(merged[&file].as_ref().unwrap()).unwrap();
    let version = list["cniVersion"].as_str().unwrap().to_owned();
    for entry in list["plugins"].as_array_mut().unwrap() {
        if !ours.is_ours(entry) {
            adapt(entry, &version, &places, &mut notes);
        }
    }
    let net = places.path("net");
    std::fs::create_dir(&net).unwrap();
    for (name, content) in &merged {
        let content = match name == &file {
            true => serde_json::to_vec_pretty(&list).unwrap(),
            false => content.clone().unwrap(),
        };
        std::fs::write(net.join(name), content).unwrap();
    }
    std::fs::write(
        places.path("subnet.env"),
        format!(
            "FLANNEL_NETWORK={FLANNEL_NETWORK}\nFLANNEL_SUBNET={}\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
            places.subnet.replace(".0/24", ".1/24")
        ),
    )
    .unwrap();
    // Our binary under the name the template gives it.
    let ours_dir = places.path("bin");
    std::fs::create_dir(&ours_dir).unwrap();
    std::os::unix::fs::symlink(BIN, ours_dir.join(&ours.binary)).unwrap();

    let uses_firewall = list["plugins"].as_array().unwrap().iter().any(|p| p["type"] == "firewall");
    let _cleanup = HostCleanup {
        bridge: places.bridge.clone(),
        firewall_chains: uses_firewall && !iptables_chain_exists("CNI-FORWARD"),
    };
    let rt = CniRuntime::net_dir(&net, vec![ours_dir, Plugins::Upstream.dir(), bin_dir().join("primaries")]);
    let (mesh_ns, plain_ns) = (NamedNetns::new("prm"), NamedNetns::new("prp"));
    let mesh = Attachment::new(&mesh_ns, f.ns.name(), "mesh");
    let plain = Attachment::new(&plain_ns, f.ns.name(), "plain");

    let mesh_result = rt.add(&mesh).unwrap_or_else(|e| panic!("{case}: ADD of the mesh pod through {file}: {e}"));
    let plain_result = rt.add(&plain).unwrap_or_else(|e| panic!("{case}: ADD of the plain pod: {e}"));
    for result in [&mesh_result, &plain_result] {
        assert_eq!(result["cniVersion"], version.as_str(), "{case}: the result is at the file's version");
    }
    let (mesh_ip, plain_ip) = (address(&mesh_result), address(&plain_result));
    assert!(saved_rules(&mesh_ns).contains("KUMA_MESH_OUTBOUND"), "{case}: the mesh pod is redirected");
    assert_eq!(saved_rules(&plain_ns), "", "{case}: the plain pod is untouched");

    let validated = validate(&mesh_ns);
    assert!(
        validated.status.success(),
        "{case}: the validator fails in the mesh pod ({}): {}{}",
        validated.status,
        String::from_utf8_lossy(&validated.stdout),
        String::from_utf8_lossy(&validated.stderr)
    );

    // The app's outbound connection to the plain pod lands on the sidecar's listener.
    let pod = mesh_ns.open();
    let outbound = listen_tcp(&pod, false, 15001);
    let dest = format!("{plain_ip}:443").parse().unwrap();
    let _c = connect_tcp(&pod, None, dest, b"out").unwrap();
    let mut conn = accept_within(&outbound, Duration::from_secs(2)).expect("outbound redirected to the sidecar");
    assert_eq!(read_exact(&mut conn, 3), b"out");
    assert_eq!(original_destination(&conn).unwrap(), dest, "{case}: the original destination");
    drop((conn, outbound));

    // What DEL must take away is there now: the checks below can see it.
    let links: Vec<String> = [&mesh_result, &plain_result].iter().flat_map(|r| host_links(r, &places.bridge)).collect();
    assert_eq!(links.len(), 2, "{case}: a host veth per pod: {mesh_result}");
    assert!(links.iter().all(|l| link_exists(l)), "{case}: {links:?}");
    assert_eq!(leases(places.state.path()).len(), 2, "{case}: a lease per pod");
    if uses_firewall {
        assert!(!host_rules_naming(&mesh_ip).is_empty(), "{case}: the firewall plugin let the pod's traffic through");
    }
    rt.del(&mesh).unwrap_or_else(|e| panic!("{case}: DEL of the mesh pod: {e}"));
    rt.del(&plain).unwrap_or_else(|e| panic!("{case}: DEL of the plain pod: {e}"));
    assert_eq!(saved_rules(&mesh_ns), "", "{case}: DEL removed our rules");
    assert_eq!(leases(places.state.path()), Vec::<PathBuf>::new(), "{case}: DEL released every IPAM lease");
    let flannel_data = std::fs::read_dir(places.path("flannel")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(flannel_data, 0, "{case}: flannel forgot the pods");
    for link in &links {
        assert!(!link_exists(link), "{case}: DEL left the host link {link}");
    }
    for ip in [&mesh_ip, &plain_ip] {
        assert_eq!(host_rules_naming(ip), Vec::<String>::new(), "{case}: DEL left host rules naming {ip}");
    }

    let list = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(", ");
    eprintln!(
        "{case} ({file}, cniVersion {version}): real: {}, {}; substituted: {}; rewritten: {}",
        list(&notes.real),
        ours.binary,
        match notes.substituted.is_empty() {
            true => "nothing".into(),
            false => list(&notes.substituted),
        },
        list(&notes.rewritten)
    );
}

macro_rules! cases {
    ($($name:ident => $dir:literal),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread")]
        async fn $name() {
            run_case($dir).await;
        }
    )*};
}

cases! {
    kindnet => "kindnet",
    kindnet_kuma_cni_type => "kindnet-kuma-cni-type",
    gke_ptp => "gke-ptp",
    calico => "calico",
    calico_with_go_entry => "calico-with-go-entry",
    cilium => "cilium",
    cilium_conf => "cilium-conf",
    aws_vpc_cni => "aws-vpc-cni",
    azure => "azure",
    azure_overlay => "azure-overlay",
    k3s_flannel => "k3s-flannel",
    flannel_conf => "flannel-conf",
    multus => "multus",
}

#[test]
fn every_recorded_net_dir_is_a_case() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../installer/tests/golden");
    let mut dirs: Vec<String> =
        std::fs::read_dir(root).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    dirs.sort();
    let this = include_str!("primaries.rs");
    for dir in dirs {
        assert!(this.contains(&format!("=> \"{dir}\"")), "the golden case {dir} has no executable test here");
    }
}
