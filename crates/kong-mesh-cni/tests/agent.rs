//! The installer as the node agent, and the plugin asking it: the real binary as both,
//! the real API server, the reference libcni runtime with real plugins. Which lookups
//! reached the API server is read from the server's own request counter
//! (`apiserver_request_total`), so the tests of this file run one at a time.
//!
//! The agent reaches the API server through a TCP relay of the test's own, which can
//! hold back traffic (a watch event delayed in the network) or cut it (an outage of the
//! API server as this node sees it); TLS passes through it untouched.

mod agent_node;
mod installer_host;
mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_node::NodeAgent;
use cni::plugin::ask::Asked;
use cni::plugin::record;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{DeleteParams, PostParams};
use serde_json::{Value, json};
use testkit::net::NamedNetns;
use testkit::{ApiServer, Attachment, CniRuntime, Plugins, TestNamespace, pod, request_count};

use support::{BIN, Fixture, fixture, our_entry, saved_rules};

/// The agent's first list of a fresh node; generous for a loaded two-core machine.
const SYNC: Duration = Duration::from_secs(30);

/// The request counter is server-wide: one test at a time in this binary.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn chain(entry: Value) -> CniRuntime {
    let mut rt = CniRuntime::bridge(Plugins::Upstream);
    rt.prepend_plugin_dir(Path::new(BIN).parent().unwrap());
    rt.append_plugin(entry);
    rt
}

fn node_name() -> String {
    format!("kmc-node-{}", testkit::unique_suffix())
}

fn mesh(name: &str, node: &str) -> Pod {
    pod(name)
        .container("app")
        .container("kuma-sidecar")
        .annotation("kuma.io/sidecar-injected", "true")
        .node_name(node)
        .build()
}

fn plain(name: &str, node: &str) -> Pod {
    pod(name).container("app").node_name(node).build()
}

/// The runtime's view of the pod: its netns, and CNI_ARGS with the pod's real UID.
fn attachment(netns: &NamedNetns, created: &Pod) -> Attachment {
    let mut a = Attachment::new(
        netns,
        created.metadata.namespace.as_deref().unwrap(),
        created.metadata.name.as_deref().unwrap(),
    );
    a.pod_uid = created.metadata.uid.clone().unwrap();
    a
}

fn uid(p: &Pod) -> &str {
    p.metadata.uid.as_deref().unwrap()
}

fn redirected(netns: &NamedNetns) -> bool {
    saved_rules(netns).contains("-A KUMA_MESH_OUTBOUND ")
}

async fn pod_gets(ns: &TestNamespace) -> u64 {
    request_count(&ns.client(), "GET", "pods").await
}

/// The plugin's chain entry with its run dir where the agent listens, reading pods
/// directly from the API server with a `get pods`-only identity when it falls back.
fn plugin_entry(f: &Fixture, extra: Value) -> Value {
    our_entry(&f.kubeconfig, f.scratch.path(), extra)
}

async fn agent_for(f: &Fixture, node: &str, via: Option<u16>) -> NodeAgent {
    NodeAgent::start(ApiServer::shared(), f.ns.name(), node, &f.scratch.path().join("run"), via).await
}

#[tokio::test(flavor = "multi_thread")]
async fn add_is_answered_by_the_agent_without_a_request_to_the_api_server() {
    if testkit::skip_privileged("ADD answered by the node agent") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let f = fixture().await;
    let node = node_name();
    let agent = agent_for(&f, &node, None).await;
    let web = f.ns.create_pod(mesh("web", &node)).await;
    let db = f.ns.create_pod(plain("db", &node)).await;
    agent.wait_known(f.ns.name(), "web", uid(&web), SYNC);
    agent.wait_known(f.ns.name(), "db", uid(&db), SYNC);
    let rt = chain(plugin_entry(&f, json!({})));
    let (web_ns, db_ns) = (NamedNetns::new("agw"), NamedNetns::new("agd"));

    let before = pod_gets(&f.ns).await;
    rt.add(&attachment(&web_ns, &web)).expect("ADD of the mesh pod");
    rt.add(&attachment(&db_ns, &db)).expect("ADD of the plain pod");
    let after = pod_gets(&f.ns).await;

    assert!(redirected(&web_ns), "the mesh pod is redirected: {}", saved_rules(&web_ns));
    assert_eq!(saved_rules(&db_ns), "", "the plain pod is untouched");
    assert_eq!(after - before, 0, "pod GETs during the two ADDs; the agent should have answered both");
    // The socket is root's only.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(agent.socket()).unwrap().permissions().mode() & 0o777, 0o600);

    // Clients that never finish their request, or send a bad one, hold nobody up.
    use std::os::unix::net::UnixStream;
    let hung: Vec<UnixStream> = (0..20).map(|_| UnixStream::connect(agent.socket()).unwrap()).collect();
    let answer_to = |request: &[u8]| {
        let mut s = UnixStream::connect(agent.socket()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(request);
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    };
    let oversized = answer_to(&vec![b'{'; cni::agent::MAX_REQUEST + 100]);
    assert!(oversized.contains("refused") && oversized.contains("longer than"), "{oversized}");
    let garbage = answer_to(b"GET / HTTP/1.1\r\n\r\n");
    assert!(garbage.contains("refused") && garbage.contains("not a lookup request"), "{garbage}");
    let started = Instant::now();
    assert!(matches!(agent.ask(f.ns.name(), "web", Some(uid(&web))), Asked::Found(..)));
    assert!(started.elapsed() < Duration::from_millis(200), "answered in {:?} beside hung clients", started.elapsed());
    drop(hung);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_namespace_allow_list_the_agent_watches_those_namespaces_and_answers() {
    if testkit::skip_privileged("the node agent under namespaceAllowList") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let f = fixture().await;
    let node = node_name();
    // Pod reads granted in the test's namespace only, as the chart's RoleBindings do.
    let agent = NodeAgent::start_allowed_in(ApiServer::shared(), &f.ns, &node, &f.scratch.path().join("run")).await;
    let web = f.ns.create_pod(mesh("web", &node)).await;
    agent.wait_known(f.ns.name(), "web", uid(&web), SYNC);
    let rt = chain(plugin_entry(&f, json!({})));
    let web_ns = NamedNetns::new("agl");

    let before = pod_gets(&f.ns).await;
    rt.add(&attachment(&web_ns, &web)).expect("ADD of the mesh pod");
    assert_eq!(pod_gets(&f.ns).await - before, 0, "pod GETs during the ADD; the agent should have answered");
    assert!(redirected(&web_ns), "the mesh pod is redirected: {}", saved_rules(&web_ns));
    // A namespace outside the list is not the agent's to answer: the plugin asks the
    // API server, as without an agent.
    match agent.ask("kube-system", "coredns", None) {
        Asked::Miss(why) => assert!(why.contains("not watched"), "{why}"),
        other => panic!("answered {other:?} for a namespace it may not read"),
    }
    let log = agent.installer.log();
    assert!(!log.contains("watch of this node's pods failed"), "no watch was refused:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_agent_the_plugin_asks_the_api_server() {
    if testkit::skip_privileged("fallback when the node agent is stopped") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let f = fixture().await;
    let node = node_name();
    let mut agent = agent_for(&f, &node, None).await;
    let web = f.ns.create_pod(mesh("web", &node)).await;
    agent.wait_known(f.ns.name(), "web", uid(&web), SYNC);
    let rt = chain(plugin_entry(&f, json!({})));

    // Stopped cleanly: the socket is gone.
    assert!(agent.installer.terminate().success(), "{}", agent.installer.log());
    assert!(!agent.socket().exists(), "SIGTERM removes the agent's socket");
    let netns = NamedNetns::new("agf");
    let before = pod_gets(&f.ns).await;
    rt.add(&attachment(&netns, &web)).expect("ADD with the agent stopped");
    assert!(pod_gets(&f.ns).await > before, "the plugin asked the API server");
    assert!(redirected(&netns));

    // Killed: its socket file is left, and nobody listens on it.
    let mut agent = agent_for(&f, &node, None).await;
    agent.wait_known(f.ns.name(), "web", uid(&web), SYNC);
    agent.installer.signal(libc::SIGKILL);
    agent.installer.wait(Duration::from_secs(10)).expect("killed");
    assert!(agent.socket().exists(), "a killed agent leaves its socket file");
    let netns = NamedNetns::new("agk");
    let before = pod_gets(&f.ns).await;
    let started = Instant::now();
    rt.add(&attachment(&netns, &web)).expect("ADD with a dead agent's socket");
    assert!(pod_gets(&f.ns).await > before, "the plugin asked the API server");
    assert!(redirected(&netns));
    assert!(started.elapsed() < Duration::from_secs(3), "a dead socket is refused at once: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_created_just_before_its_add_is_answered_by_the_agent() {
    if testkit::skip_privileged("a pod created milliseconds before its ADD") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let f = fixture().await;
    let node = node_name();
    let agent = agent_for(&f, &node, None).await;
    // The agent has listed this node's pods once (the first one is there).
    let first = f.ns.create_pod(plain("first", &node)).await;
    agent.wait_known(f.ns.name(), "first", uid(&first), SYNC);
    let rt = chain(plugin_entry(&f, json!({})));
    let netns = NamedNetns::new("agn");

    let before = pod_gets(&f.ns).await;
    let created_at = Instant::now();
    let web = f.ns.create_pod(mesh("web", &node)).await;
    let created = created_at.elapsed();
    rt.add(&attachment(&netns, &web)).expect("ADD right after the pod was created");
    let after = pod_gets(&f.ns).await;

    assert!(redirected(&netns));
    eprintln!("pod created in {created:?}, ADD started right after");
    assert_eq!(
        after - before,
        0,
        "the agent waited for the watch event instead of sending the plugin to the API server"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recreated_pod_is_not_answered_from_the_stale_entry() {
    if testkit::skip_privileged("pod deleted and recreated under the same name") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let f = fixture().await;
    let node = node_name();
    let relay = Relay::start(api_port());
    let agent = agent_for(&f, &node, Some(relay.port)).await;
    let old = f.ns.create_pod(mesh("web", &node)).await;
    agent.wait_known(f.ns.name(), "web", uid(&old), SYNC);

    // The agent's watch stalls (its connection holds), and meanwhile the mesh pod is
    // replaced by a plain pod of the same name: the agent still has the old one.
    relay.hold(true);
    let pods = f.ns.api::<Pod>();
    pods.delete("web", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await.unwrap();
    let new = pods.create(&PostParams::default(), &plain("web", &node)).await.unwrap();
    assert_ne!(uid(&old), uid(&new));
    assert!(matches!(agent.ask(f.ns.name(), "web", Some(uid(&old))), Asked::Found(..)), "the stale entry is there");

    let rt = chain(plugin_entry(&f, json!({})));
    let netns = NamedNetns::new("agr");
    let before = pod_gets(&f.ns).await;
    rt.add(&attachment(&netns, &new)).expect("ADD of the recreated pod");
    let after = pod_gets(&f.ns).await;
    relay.hold(false);

    assert_eq!(saved_rules(&netns), "", "decided from the new (plain) pod, not the cached mesh pod");
    assert!(after > before, "the UID mismatch sent the plugin to the API server");
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_the_agent_knows_are_decided_while_the_api_server_is_unreachable() {
    if testkit::skip_privileged("pods decided from the agent's cache during an API outage") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let f = fixture().await;
    let node = node_name();
    let relay = Relay::start(api_port());
    let agent = agent_for(&f, &node, Some(relay.port)).await;
    let web = f.ns.create_pod(mesh("web", &node)).await;
    let db = f.ns.create_pod(plain("db", &node)).await;
    agent.wait_known(f.ns.name(), "web", uid(&web), SYNC);
    agent.wait_known(f.ns.name(), "db", uid(&db), SYNC);
    // The plugin uses the kubeconfig the installer wrote: the API server through the
    // relay, as the whole node sees it.
    let lookup_timeout = Duration::from_secs(2);
    let entry = our_entry(
        &agent.plugin_kubeconfig(),
        f.scratch.path(),
        json!({"kubernetes": {"kubeconfig": agent.plugin_kubeconfig(), "lookup_timeout_ms": lookup_timeout.as_millis() as u64}}),
    );
    let rt = chain(entry);

    relay.cut();
    // The agent notices: an unknown pod is no longer waited for.
    let noticed = Instant::now() + SYNC;
    while !matches!(agent.ask(f.ns.name(), "nobody", None), Asked::Miss(why) if why.starts_with("NotSynced")) {
        assert!(Instant::now() < noticed, "the agent did not notice the outage; log:\n{}", agent.installer.log());
        std::thread::sleep(Duration::from_millis(20));
    }

    for (created, mesh_pod) in [(&web, true), (&db, false)] {
        let netns = NamedNetns::new("ago");
        let started = Instant::now();
        rt.add(&attachment(&netns, created)).expect("ADD during the outage");
        let took = started.elapsed();
        assert_eq!(redirected(&netns), mesh_pod, "{:?}", created.metadata.name);
        eprintln!("{:?} during the outage: ADD in {took:?}", created.metadata.name);
        assert!(took < lookup_timeout / 4, "decided from the cache, not after the API lookup: {took:?}");
    }
    // A pod the agent does not know waits for the API server's retries (which stop
    // short of the lookup timeout), as without the agent.
    let stranger = f.ns.create_pod(mesh("stranger", &node)).await;
    let netns = NamedNetns::new("agu");
    let started = Instant::now();
    rt.add(&attachment(&netns, &stranger)).expect("pass-through (on_api_error)");
    let took = started.elapsed();
    eprintln!("unknown pod during the outage: ADD in {took:?}");
    assert!(took >= lookup_timeout / 2, "the unknown pod was looked up at the API server: {took:?}");
    assert_eq!(saved_rules(&netns), "", "let through without a redirect");
}

#[tokio::test(flavor = "multi_thread")]
async fn plugin_calls_are_counted_on_the_installers_metrics() {
    if testkit::skip_privileged("plugin request metrics") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let f = fixture().await;
    let node = node_name();
    let relay = Relay::start(api_port());
    let port = installer_host::free_port();
    let run_dir = f.scratch.path().join("run");
    let health = [("KMC_HEALTH_PORT", port.to_string())];
    let health: Vec<(&str, &str)> = health.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let agent =
        NodeAgent::start_with(ApiServer::shared(), f.ns.name(), &node, &run_dir, Some(relay.port), &health).await;
    let web = f.ns.create_pod(mesh("web", &node)).await;
    let db = f.ns.create_pod(plain("db", &node)).await;
    let mut bad = mesh("bad", &node);
    bad.metadata
        .annotations
        .get_or_insert_default()
        .insert("traffic.kuma.io/exclude-outbound-ports".into(), "80,eighty".into());
    let bad = f.ns.create_pod(bad).await;
    for p in [&web, &db, &bad] {
        agent.wait_known(f.ns.name(), p.metadata.name.as_deref().unwrap(), uid(p), SYNC);
    }
    // `status` shows the agent's cache, in both outputs.
    let status = |output: &str| {
        let out = std::process::Command::new(BIN)
            .args(["status", "--output", output])
            .env_clear()
            .envs(agent.host.env())
            .envs(agent.env.iter().cloned())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = status("text");
    assert!(text.contains("node agent        synced, 3 pods cached\n"), "{text}");
    let json: Value = serde_json::from_str(&status("json")).unwrap();
    assert_eq!(json["installer"]["agent_cached_pods"], 3, "{json}");
    let entry = our_entry(
        &agent.plugin_kubeconfig(),
        f.scratch.path(),
        json!({"kubernetes": {"kubeconfig": agent.plugin_kubeconfig(), "lookup_timeout_ms": 2000}}),
    );
    let rt = chain(entry);

    let web_ns = NamedNetns::new("amw");
    let web_at = attachment(&web_ns, &web);
    rt.add(&web_at).expect("ADD of the mesh pod");
    rt.add(&attachment(&NamedNetns::new("amd"), &db)).expect("ADD of the plain pod");
    // The same failure twice.
    let bad_ns = [NamedNetns::new("amb"), NamedNetns::new("amb")];
    for netns in &bad_ns {
        let err = rt.add(&attachment(netns, &bad)).unwrap_err();
        assert_eq!(err.code, Some(7), "{err}");
    }
    // A pod whose watch event is held back a little: the agent waits for it.
    relay.hold(true);
    let late = f.ns.create_pod(mesh("late", &node)).await;
    let late_ns = NamedNetns::new("aml");
    std::thread::scope(|s| {
        let adding = s.spawn(|| rt.add(&attachment(&late_ns, &late)));
        // Released once the plugin is connected to the agent (so asking or about to):
        // a fixed sleep lost the race to a slow exec, and the event came first.
        let socket = agent.socket();
        let connected = Instant::now() + Duration::from_secs(10);
        while connections_to(&socket) == 0 {
            assert!(Instant::now() < connected, "the plugin never connected to {}", socket.display());
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(50));
        relay.hold(false);
        adding.join().unwrap().expect("ADD of a pod whose watch event came late");
    });
    // The API server away: a mesh pod the agent does not know is let through.
    relay.cut();
    let noticed = Instant::now() + SYNC;
    while !matches!(agent.ask(f.ns.name(), "nobody", None), Asked::Miss(why) if why.starts_with("NotSynced")) {
        assert!(Instant::now() < noticed, "the agent did not notice the outage; log:\n{}", agent.installer.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let stranger = f.ns.create_pod(mesh("stranger", &node)).await;
    let stranger_ns = NamedNetns::new("ams");
    rt.add(&attachment(&stranger_ns, &stranger)).expect("pass-through (on_api_error)");
    rt.del(&web_at).expect("DEL of the mesh pod");

    let metrics = || installer_host::http_get(port, "/metrics").map(|(_, m)| m).unwrap_or_default();
    // The records arrive after each answer: wait for the last one.
    let all_in = |m: &str| m.contains("plugin_request_duration_seconds_count{command=\"DEL\"} 1\n");
    installer_host::wait_for(Duration::from_secs(10), || all_in(&metrics()));
    let text = metrics();
    let requests = samples(&text, "kong_mesh_cni_installer_plugin_requests_total{");
    let backend = requests
        .keys()
        .find_map(|k| k.split("outcome=\"redirected\"").nth(1)?.split("backend=\"").nth(1)?.split('"').next())
        .unwrap_or_else(|| panic!("no redirect counted:\n{text}"))
        .to_owned();
    assert!(["iptables-nft", "iptables-legacy", "nftables"].contains(&backend.as_str()), "{backend}");
    let series = |name: &str, labels: &str| format!("kong_mesh_cni_installer_plugin_{name}{{{labels}}}");
    let req = |labels: &str| series("requests_total", labels);
    let expected: BTreeMap<String, u64> = [
        (req(&format!(r#"command="ADD",outcome="redirected",reason="",code="",backend="{backend}""#)), 2),
        (req(r#"command="ADD",outcome="passed-through",reason="no-sidecar",code="",backend="""#), 1),
        (req(r#"command="ADD",outcome="failed",reason="",code="7",backend="""#), 2),
        (req(r#"command="ADD",outcome="passed-through",reason="api-unavailable",code="",backend="""#), 1),
        (req(r#"command="DEL",outcome="ok",reason="",code="",backend="""#), 1),
    ]
    .into();
    assert_eq!(requests, expected, "{text}");
    let lookups = samples(&text, "kong_mesh_cni_installer_plugin_pod_lookups_total{");
    let expected: BTreeMap<String, u64> = [
        (series("pod_lookups_total", r#"command="ADD",path="agent""#), 4),
        (series("pod_lookups_total", r#"command="ADD",path="api-server""#), 1),
        (series("pod_lookups_total", r#"command="ADD",path="watch-wait""#), 1),
    ]
    .into();
    assert_eq!(lookups, expected, "{text}");
    let counts = samples(&text, "kong_mesh_cni_installer_plugin_request_duration_seconds_count{");
    assert_eq!(counts.into_values().collect::<Vec<_>>(), [6, 1], "ADD then DEL:\n{text}");
    // The stranger's API lookup took its retries; the agent's answers did not.
    let fast =
        samples(&text, r#"kong_mesh_cni_installer_plugin_request_duration_seconds_bucket{le="1.0",command="ADD""#);
    assert_eq!(fast.into_values().collect::<Vec<_>>(), [5], "{text}");
    assert!(text.contains("kong_mesh_cni_installer_plugin_records_dropped_total 0\n"), "{text}");
    assert!(text.contains("kong_mesh_cni_installer_plugin_records_invalid_total 0\n"), "{text}");

    // Back: the events held back are sent, and the stranger is repaired in place.
    relay.restore();
    let expected: BTreeMap<(String, String), (String, i32)> = [
        (("bad", "MeshRedirectFailed"), ("Warning", 2)),
        (("stranger", "MeshRedirectSkipped"), ("Warning", 1)),
        (("stranger", "MeshRedirectRepaired"), ("Normal", 1)),
    ]
    .into_iter()
    .map(|((pod, reason), (kind, count))| ((pod.to_owned(), reason.to_owned()), (kind.to_owned(), count)))
    .collect();
    let events = f.ns.api::<Event>();
    let deadline = Instant::now() + SYNC;
    let seen = loop {
        let listed = events.list(&Default::default()).await.unwrap().items;
        let seen: BTreeMap<(String, String), (String, i32)> = listed
            .iter()
            .filter(|e| e.source.as_ref().and_then(|s| s.component.as_deref()) == Some("kong-mesh-cni"))
            .map(|e| {
                let key = (e.involved_object.name.clone().unwrap(), e.reason.clone().unwrap());
                (key, (e.type_.clone().unwrap(), e.count.unwrap()))
            })
            .collect();
        if seen == expected || Instant::now() > deadline {
            break (seen, listed);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(seen.0, expected, "events: {:#?}\nlog:\n{}", seen.1, agent.installer.log());
    let failed = seen.1.iter().find(|e| e.reason.as_deref() == Some("MeshRedirectFailed")).unwrap();
    let message = failed.message.as_deref().unwrap();
    assert!(message.contains("code 7") && message.contains("80,eighty"), "{message}");
    assert_eq!(failed.involved_object.uid.as_deref(), Some(uid(&bad)));
    assert!(redirected(&stranger_ns), "repaired in place: {}", saved_rules(&stranger_ns));

    // With the installer stopped, a record has nobody to take it: the plugin counts it.
    let mut agent = agent;
    assert!(agent.installer.terminate().success(), "{}", agent.installer.log());
    assert!(!run_dir.join(record::SOCKET_NAME).exists(), "SIGTERM removes the record socket");
    rt.del(&attachment(&bad_ns[0], &bad)).expect("DEL without the installer");
    let dropped = std::fs::read(run_dir.join(record::DROPPED_FILE)).unwrap_or_default();
    assert_eq!(dropped, b".", "one record dropped, and counted");
}

/// The samples of `text` whose line starts with `prefix`, by series.
fn samples(text: &str, prefix: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The shared API server's port (its address is 127.0.0.1).
fn api_port() -> u16 {
    let admin = kube::config::Kubeconfig::read_from(ApiServer::shared().kubeconfig_path()).unwrap();
    let server = admin.clusters[0].cluster.as_ref().and_then(|c| c.server.clone()).unwrap();
    server.rsplit(':').next().unwrap().parse().unwrap()
}

/// A TCP relay on 127.0.0.1 to the API server's port: `hold` keeps what each side sends
/// until released (connections stay up: a stalled path); `cut` closes every connection
/// and every later one at once (the server unreachable).
struct Relay {
    port: u16,
    state: Arc<RelayState>,
}

#[derive(Default)]
struct RelayState {
    held: AtomicBool,
    cut: AtomicBool,
    /// The relay is dropped: its accept loop ends.
    closed: AtomicBool,
    streams: Mutex<Vec<TcpStream>>,
}

impl Relay {
    fn start(upstream: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(RelayState::default());
        let shared = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if shared.closed.load(Ordering::SeqCst) {
                    return;
                }
                if shared.cut.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                {
                    let mut streams = shared.streams.lock().unwrap();
                    streams.push(client.try_clone().unwrap());
                    streams.push(server.try_clone().unwrap());
                }
                for (from, to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                    let shared = shared.clone();
                    std::thread::spawn(move || pump(from, to, &shared));
                }
            }
        });
        Relay { port, state }
    }

    fn hold(&self, held: bool) {
        self.state.held.store(held, Ordering::SeqCst);
    }

    /// The server reachable again (after [`Relay::cut`]), for new connections.
    fn restore(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }

    fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        for s in self.state.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.hold(false);
        self.cut();
        self.state.closed.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees `closed`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, state: &RelayState) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while state.held.load(Ordering::SeqCst) && !state.cut.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if state.cut.load(Ordering::SeqCst) || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// Connected unix stream sockets bound to `path` (/proc/net/unix: the accepted side of
/// each connection to a listener carries its path; the listener itself is unconnected).
fn connections_to(path: &std::path::Path) -> usize {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let path = path.to_string_lossy();
    // Num RefCount Protocol Flags Type St Inode Path; St 03 = connected.
    table.lines().filter(|l| l.ends_with(&*path) && l.split_whitespace().nth(5) == Some("03")).count()
}
