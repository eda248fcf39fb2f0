//! The installer as the DaemonSet runs it: the real binary against temporary host dirs.
//! Repairs must come from the file watch, so most tests set CFGCHECK_INTERVAL far
//! beyond their deadlines.

mod installer_host;

use std::time::Duration;

use installer_host::*;
use serde_json::Value;

const PLUGIN: &str = "kong-mesh-cni";
/// Our entry must be back within this after a rewrite (the benchmark measures the real
/// figure; this only has to hold on a loaded two-core machine).
const REPAIR_DEADLINE: Duration = Duration::from_secs(2);
const STARTUP: Duration = Duration::from_secs(30);
const NO_POLLING: (&str, &str) = ("CFGCHECK_INTERVAL", "3600");

fn wait_ready(host: &Host, installer: &Installer) {
    if wait_for(STARTUP, || host.ready.exists()).is_none() {
        panic!("not ready within {STARTUP:?}; log:\n{}", installer.log());
    }
}

#[test]
fn installs_then_sigterm_restores_the_conflist_byte_for_byte() {
    let host = Host::new();
    let conflist = host.net_file("10-calico.conflist");
    std::fs::write(&conflist, CALICO).unwrap();
    let mut installer = Installer::start(&host, &[UNINSTALL]);
    wait_ready(&host, &installer);

    assert!(chained(&conflist, PLUGIN));
    let binary = host.bin.join(PLUGIN);
    assert_eq!(std::fs::metadata(&binary).unwrap().len(), std::fs::metadata(BINARY).unwrap().len());
    assert_eq!(mode(&binary), 0o755);
    let kubeconfig = host.net_file(KUBECONFIG);
    assert_eq!(mode(&kubeconfig), 0o600);
    let ours = json(&conflist).unwrap()["plugins"][3].clone();
    assert_eq!(ours["kubernetes"]["kubeconfig"], format!("/etc/cni/net.d/{KUBECONFIG}"));

    let status = installer.terminate();
    assert!(status.success(), "{status}; log:\n{}", installer.log());
    assert_eq!(std::fs::read_to_string(&conflist).unwrap(), CALICO);
    for gone in [&kubeconfig, &binary, &host.ready] {
        assert!(!gone.exists(), "{} left behind", gone.display());
    }
    assert_eq!(std::fs::read_dir(&host.net).unwrap().count(), 1, "only the primary's file is left");
}

#[test]
fn a_conf_is_wrapped_into_a_conflist_and_restored_on_sigterm() {
    let host = Host::new();
    let conf = host.net_file("10-flannel.conf");
    std::fs::write(&conf, FLANNEL_CONF).unwrap();
    let mut installer = Installer::start(&host, &[UNINSTALL]);
    wait_ready(&host, &installer);
    let list = host.net_file("10-flannel.conflist");
    assert!(!conf.exists(), "runtimes would read the .conf first, as one plugin");
    assert!(chained(&list, PLUGIN));
    assert_eq!(json(&list).unwrap()["plugins"][0], serde_json::from_str::<Value>(FLANNEL_CONF).unwrap());

    assert!(installer.terminate().success());
    assert!(!list.exists());
    assert_eq!(json(&conf).unwrap(), serde_json::from_str::<Value>(FLANNEL_CONF).unwrap(), "JSON-equal");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), FLANNEL_CONF, "and here even byte for byte");
}

#[test]
fn rewrites_by_the_primary_are_repaired_from_the_watch() {
    let host = Host::new();
    let conflist = host.net_file("10-calico.conflist");
    std::fs::write(&conflist, CALICO).unwrap();
    let installer = Installer::start(&host, &[NO_POLLING]);
    wait_ready(&host, &installer);

    let rewrites: [(&str, &dyn Fn()); 3] = [
        ("plain write", &|| write_in_place(&conflist, CALICO)),
        ("rename over", &|| rename_over(&conflist, CALICO)),
        ("delete, then recreate", &|| {
            std::fs::remove_file(&conflist).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            write_in_place(&conflist, CALICO);
        }),
    ];
    for (how, rewrite) in rewrites {
        rewrite();
        match wait_for(REPAIR_DEADLINE, || chained(&conflist, PLUGIN)) {
            Some(took) => eprintln!("{how}: our entry back after {took:?}"),
            None => panic!("{how}: our entry is not back within {REPAIR_DEADLINE:?}; log:\n{}", installer.log()),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(installer.log().contains("put our entry back"));
}

#[test]
fn the_primary_may_start_after_us() {
    let host = Host::new();
    let installer = Installer::start(&host, &[NO_POLLING, ("CNI_CONF_NAME", "10-calico.conflist")]);
    let waiting = || installer.log().contains("waiting for the primary CNI's configuration");
    assert!(wait_for(STARTUP, waiting).is_some(), "{}", installer.log());
    // Other events (its own kubeconfig write, a few more) must not repeat the line.
    std::fs::write(host.net_file("README.txt"), "not a conf").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!host.ready.exists());
    let log = installer.log();
    assert_eq!(log.matches("waiting for the primary CNI's configuration").count(), 1, "one clear line:\n{log}");
    assert!(log.contains("10-calico.conflist does not exist yet"), "{log}");

    rename_over(&host.net_file("10-calico.conflist"), CALICO);
    assert!(wait_for(REPAIR_DEADLINE, || host.ready.exists()).is_some(), "{}", installer.log());
    assert!(chained(&host.net_file("10-calico.conflist"), PLUGIN));
}

#[test]
fn bad_input_is_never_overwritten_and_readiness_stays_off() {
    let cases = [
        ("not JSON", "this is not json\n", "not valid JSON"),
        ("truncated", &CALICO[..CALICO.len() / 2], "not valid JSON"),
        (
            "no plugins",
            "{\"cniVersion\": \"0.3.1\", \"name\": \"k8s-pod-network\", \"plugins\": []}\n",
            "\"plugins\" list is empty",
        ),
    ];
    for (what, content, reason) in cases {
        let host = Host::new();
        let conflist = host.net_file("10-calico.conflist");
        std::fs::write(&conflist, content).unwrap();
        let installer =
            Installer::start(&host, &[("CNI_CONF_NAME", "10-calico.conflist"), ("CFGCHECK_INTERVAL", "100ms")]);
        let refused = || installer.log().contains("not touching");
        assert!(wait_for(STARTUP, refused).is_some(), "{what}: {}", installer.log());
        // Several backstop passes, and a few more rewrites of the same bad content
        // (renamed over: written in place, a pass could catch the file half-written,
        // a different reason, rightly logged).
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(300));
            rename_over(&conflist, content);
        }
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(std::fs::read_to_string(&conflist).unwrap(), content, "{what}: overwritten");
        assert!(!host.ready.exists(), "{what}: ready");
        let log = installer.log();
        assert!(
            log.contains(&format!("not touching {}", conflist.display())) && log.contains(reason),
            "{what}: reason not logged:\n{log}"
        );
        assert_eq!(log.matches("not touching").count(), 1, "{what}: logged once, not on every pass:\n{log}");

        // Fixed: it chains, without a restart.
        rename_over(&conflist, CALICO);
        assert!(
            wait_for(REPAIR_DEADLINE, || chained(&conflist, PLUGIN) && host.ready.exists()).is_some(),
            "{what}: {}",
            installer.log()
        );
    }
}

#[test]
fn kill_9_during_a_storm_of_rewrites_leaves_valid_json() {
    let host = Host::new();
    let conflist = host.net_file("10-calico.conflist");
    std::fs::write(&conflist, CALICO).unwrap();
    for round in 0..30 {
        // A restarted container starts with a fresh /tmp, without the old ready file.
        let _ = std::fs::remove_file(&host.ready);
        // No throttling: we want the installer writing as often as it can.
        let installer = Installer::start(&host, &[("KMC_REPAIR_LIMIT", "1000000")]);
        wait_ready(&host, &installer);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match n % 2 {
                        0 => rename_over(&conflist, CALICO),
                        _ => write_in_place(&conflist, CALICO),
                    }
                    n += 1;
                    std::thread::sleep(Duration::from_micros(300));
                }
            });
            std::thread::sleep(Duration::from_millis(20 + (round * 7) % 40));
            installer.signal(libc::SIGKILL);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        drop(installer);
        for entry in std::fs::read_dir(&host.net).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".conflist") || name.ends_with(".conf") {
                assert!(
                    json(&path).is_some(),
                    "round {round}: {name} is not valid JSON: {:?}",
                    std::fs::read_to_string(&path)
                );
            }
        }
    }
    // A new installer cleans up whatever temp files the kills left, and chains again.
    let _ = std::fs::remove_file(&host.ready);
    let installer = Installer::start(&host, &[]);
    wait_ready(&host, &installer);
    let leftovers: Vec<String> = std::fs::read_dir(&host.net)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".kong-mesh-cni.tmp."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(chained(&conflist, PLUGIN));
}

#[test]
fn two_primaries_fighting_us_get_a_warning_and_bounded_cpu() {
    let host = Host::new();
    let conflist = host.net_file("05-cilium.conflist");
    std::fs::write(&conflist, CILIUM).unwrap();
    let port = free_port();
    let installer = Installer::start(&host, &[NO_POLLING, ("KMC_HEALTH_PORT", &port.to_string())]);
    wait_ready(&host, &installer);
    let repairs = || {
        let metrics = http_get(port, "/metrics").map(|(_, body)| body).unwrap_or_default();
        let line = metrics.lines().find_map(|l| l.strip_prefix("kong_mesh_cni_installer_repairs_total "));
        line.and_then(|n| n.parse::<u64>().ok()).unwrap_or_else(|| panic!("no repairs counter:\n{metrics}"))
    };

    let fight = Duration::from_secs(4);
    let before = repairs();
    let cpu = fight_over(&installer, &conflist, CILIUM, fight);
    let repaired = repairs() - before;
    let log = installer.log();
    eprintln!("installer during a {fight:?} fight: {repaired} repairs, {cpu:?} of CPU");
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("keeps losing our entry"))
        .unwrap_or_else(|| panic!("no warning:\n{log}"));
    assert!(
        warning.contains("05-cilium.conflist")
            && warning.contains("cilium-cni")
            && warning.contains("cni.exclusive=false"),
        "{warning}"
    );
    // Throttled (the defaults: 10 repairs at once in 30 s, then one each 3 s), the
    // installer repairs a dozen times whatever the fighters do; unthrottled it would
    // follow each of their ~4,000 writes and burn a core. The CPU bound only catches such
    // a busy loop: CPU time grows with the machine's load.
    assert!(repaired <= 10 + 2 + 1, "{repaired} repairs in {fight:?}:\n{log}");
    assert!(cpu < fight / 2, "installer used {cpu:?} of CPU in {fight:?}");
    assert!(log.matches("keeps losing our entry").count() <= 2, "warned at most once per window:\n{log}");

    // When the fight stops, the held-back repair puts our entry back.
    assert!(wait_for(Duration::from_secs(10), || chained(&conflist, PLUGIN)).is_some(), "{}", installer.log());
}

#[test]
fn kubeconfig_is_private_follows_token_rotation_and_never_logs_the_token() {
    let host = Host::new();
    std::fs::write(host.net_file("10-calico.conflist"), CALICO).unwrap();
    let secret_one = "eyJhbGciOiJSUzI1NiJ9.first-token-do-not-log";
    let secret_two = "eyJhbGciOiJSUzI1NiJ9.second-token-do-not-log";
    host.rotate_token(secret_one, b"CA-ONE\n");
    // The periodic re-read is an hour away: only the watch can pick up the rotation.
    let installer =
        Installer::start(&host, &[NO_POLLING, ("REFRESH_SA_TOKEN_INTERVAL", "3600"), ("CNI_LOG_LEVEL", "debug")]);
    wait_ready(&host, &installer);
    let kubeconfig = host.net_file(KUBECONFIG);
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    let config = kube::config::Kubeconfig::from_yaml(&text).unwrap();
    let server = config.clusters[0].cluster.as_ref().and_then(|c| c.server.as_deref());
    assert!(text.contains(secret_one) && server == Some("https://127.0.0.1:6443"), "{text}");
    assert_eq!(mode(&kubeconfig), 0o600);

    host.rotate_token(secret_two, b"CA-TWO\n");
    let took = wait_for(REPAIR_DEADLINE, || std::fs::read_to_string(&kubeconfig).is_ok_and(|t| t.contains(secret_two)));
    assert!(took.is_some(), "rotation not picked up; log:\n{}", installer.log());
    assert_eq!(mode(&kubeconfig), 0o600);
    // And the plugin's copy must not die with the pod's: CA and token are embedded.
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    assert!(!text.contains(&host.sa.to_string_lossy().into_owned()) && text.contains("certificate-authority-data"));

    // Deleting it is repaired too.
    std::fs::remove_file(&kubeconfig).unwrap();
    assert!(wait_for(REPAIR_DEADLINE, || kubeconfig.exists()).is_some());

    let log = installer.log();
    assert!(log.contains("DEBUG") && log.contains("rewrote the plugin's kubeconfig"), "debug logging is on:\n{log}");
    for secret in [secret_one, secret_two, "do-not-log"] {
        assert!(!log.contains(secret), "the token is in the log:\n{log}");
    }
}

#[test]
fn standalone_mode_keeps_our_own_conf() {
    let host = Host::new();
    let multus = "{\"cniVersion\": \"0.3.1\", \"name\": \"multus\", \"type\": \"multus\"}\n";
    std::fs::write(host.net_file("00-multus.conf"), multus).unwrap();
    let mut installer = Installer::start(&host, &[NO_POLLING, UNINSTALL, ("CHAINED_CNI_PLUGIN", "false")]);
    wait_ready(&host, &installer);
    let ours = host.net_file("kuma-cni.conf");
    let written = std::fs::read_to_string(&ours).unwrap();
    assert_eq!(json(&ours).unwrap()["type"], PLUGIN);
    assert_eq!(
        std::fs::read_to_string(host.net_file("00-multus.conf")).unwrap(),
        multus,
        "the primary's file is not ours to touch"
    );

    std::fs::remove_file(&ours).unwrap();
    assert!(wait_for(REPAIR_DEADLINE, || std::fs::read_to_string(&ours).is_ok_and(|t| t == written)).is_some());
    write_in_place(&ours, "{\"type\": \"something-else\"}");
    assert!(wait_for(REPAIR_DEADLINE, || std::fs::read_to_string(&ours).is_ok_and(|t| t == written)).is_some());

    assert!(installer.terminate().success());
    assert!(!ours.exists() && host.net_file("00-multus.conf").exists());
}

#[test]
fn invoked_as_install_cni_it_installs_and_with_sleep_false_exits() {
    let host = Host::new();
    std::fs::write(host.net_file("10-kindnet.conflist"), CALICO).unwrap();
    let entrypoint = host.root.path().join("install-cni");
    std::os::unix::fs::symlink(BINARY, &entrypoint).unwrap();
    std::fs::create_dir(host.root.path().join("secondary")).unwrap();
    let template = r#"{"cniVersion":"0.3.1","name":"kuma-cni","type":"kuma-cni","kubernetes":{"kubeconfig":"__KUBECONFIG_FILEPATH__"}}"#;
    let mut installer = Installer::start_program(
        &entrypoint,
        &[],
        &host,
        &[("SLEEP", "false"), ("CNI_NETWORK_CONFIG", template), ("CNI_NET_DIR", "/var/lib/cni/net.d")],
    );
    let status = installer.wait(STARTUP).expect("SLEEP=false exits once installed");
    assert!(status.success(), "{status}: {}", installer.log());
    // The template's type names the binary, in both bin dirs.
    assert!(host.bin.join("kuma-cni").exists() && host.root.path().join("secondary/kuma-cni").exists());
    let list = json(&host.net_file("10-kindnet.conflist")).unwrap();
    assert_eq!(list["plugins"][3]["type"], "kuma-cni");
    assert_eq!(list["plugins"][3]["kubernetes"]["kubeconfig"], format!("/var/lib/cni/net.d/{KUBECONFIG}"));
    assert!(host.ready.exists(), "left installed");
}

#[test]
fn health_endpoints_report_readiness_and_repairs() {
    let host = Host::new();
    let conflist = host.net_file("10-calico.conflist");
    let port = free_port();
    let installer = Installer::start(
        &host,
        &[NO_POLLING, ("CNI_CONF_NAME", "10-calico.conflist"), ("KMC_HEALTH_PORT", &port.to_string())],
    );
    let get = |path: &str| http_get(port, path);
    assert!(wait_for(STARTUP, || get("/healthz").is_some_and(|(c, _)| c == 200)).is_some(), "{}", installer.log());
    assert_eq!(get("/readyz").unwrap().0, 503);
    assert!(get("/metrics").unwrap().1.contains("kong_mesh_cni_installer_state{state=\"waiting\"} 1"));

    rename_over(&conflist, CALICO);
    wait_ready(&host, &installer);
    rename_over(&conflist, CALICO);
    assert!(
        wait_for(REPAIR_DEADLINE, || get("/metrics")
            .is_some_and(|(_, m)| m.contains("kong_mesh_cni_installer_repairs_total 1\n")))
        .is_some()
    );
    let (code, metrics) = get("/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("kong_mesh_cni_installer_ready 1")
            && metrics.contains("kong_mesh_cni_installer_state{state=\"ready\"} 1"),
        "{metrics}"
    );
    assert!(!metrics.contains("kong_mesh_cni_installer_last_repair_timestamp_seconds 0\n"), "{metrics}");
    assert_eq!(get("/readyz").unwrap().0, 200);
}

#[test]
fn plugin_log_lines_reach_the_installers_stderr() {
    use std::io::Write;
    let host = Host::new();
    std::fs::write(host.net_file("10-calico.conflist"), CALICO).unwrap();
    let mut installer = Installer::start(&host, &[]);
    wait_ready(&host, &installer);
    // Two plugin calls at once, as the runtime makes them; each writes whole lines.
    let mut first = std::os::unix::net::UnixStream::connect(host.log_socket()).unwrap();
    let mut second = std::os::unix::net::UnixStream::connect(host.log_socket()).unwrap();
    first.write_all(b"INFO ADD pod=shop/web-1 container=abc: intercept\n").unwrap();
    second.write_all(b"INFO ADD pod=shop/db-0 container=def: pass through (not in the mesh)\n").unwrap();
    first.write_all(b"INFO ADD pod=shop/web-1 container=abc: rules applied\n").unwrap();
    drop((first, second));
    let all_there = || {
        let log = installer.log();
        [
            "shop/web-1 container=abc: intercept\n",
            "shop/db-0 container=def: pass through",
            "container=abc: rules applied\n",
        ]
        .iter()
        .all(|l| log.contains(l))
    };
    assert!(wait_for(REPAIR_DEADLINE, all_there).is_some(), "{}", installer.log());
    assert!(installer.terminate().success());
    assert!(!host.log_socket().exists(), "the socket is removed on exit");
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn the_kubeconfig_authenticates_against_a_real_api_server() {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, PostParams};

    if testkit::skip_heavy("the installer's kubeconfig against a real API server") {
        return;
    }
    let server = testkit::ApiServer::shared();
    let host = Host::new();
    std::fs::write(host.net_file("10-calico.conflist"), CALICO).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let ns = server.namespace("kmc-installer").await;
        let sa = "kong-mesh-cni";
        // A real bound token and the server's CA, as the kubelet would project them.
        let creds = tempfile::tempdir().unwrap();
        let projected = server.project_service_account(ns.name(), sa, creds.path()).await;
        ns.grant(sa, "pod-reader", vec![testkit::policy_rule(&[""], &["pods"], &["get", "list"])]).await;
        host.rotate_token(
            &std::fs::read_to_string(&projected.token_file).unwrap(),
            &std::fs::read(&projected.ca_file).unwrap(),
        );
        let (address, port) = (projected.host.as_str(), projected.port.as_str());

        let installer =
            Installer::start(&host, &[("KUBERNETES_SERVICE_HOST", address), ("KUBERNETES_SERVICE_PORT", port)]);
        wait_ready(&host, &installer);
        let written = kube::config::Kubeconfig::read_from(host.net_file(KUBECONFIG)).unwrap();
        let config = kube::Config::from_custom_kubeconfig(written, &Default::default()).await.unwrap();
        let client = kube::Client::try_from(config).unwrap();

        // Authenticated as the service account, not anonymous...
        let review = Api::<SelfSubjectReview>::all(client.clone())
            .create(&PostParams::default(), &SelfSubjectReview::default())
            .await
            .unwrap();
        let user = review.status.and_then(|s| s.user_info).and_then(|u| u.username);
        assert_eq!(user.as_deref(), Some(format!("system:serviceaccount:{}:{sa}", ns.name()).as_str()));
        // ...and able to do what the plugin does: read pods.
        Api::<Pod>::namespaced(client, ns.name()).list(&Default::default()).await.unwrap();
    });
}
