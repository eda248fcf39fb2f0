//! The installer against what other agents do to the node's directories while it runs
//! (issue 26): our binary deleted or replaced (Kuma's Go installer's SIGTERM cleanup
//! deletes `kuma-cni`, our binary in its slot), a stale configuration of our network
//! left beside ours (the Go installer's `YYY-kuma-cni.conflist`), and a log pipeline
//! that stops reading. The real binary against temporary host dirs; every repair must
//! come from a watch, so CFGCHECK_INTERVAL is far beyond the deadlines.

mod installer_host;

use std::path::Path;
use std::time::{Duration, Instant};

use installer_host::*;

const PLUGIN: &str = "kong-mesh-cni";
/// Repairs and readiness changes must happen within this (they take milliseconds; this
/// only has to hold on a loaded two-core machine).
const DEADLINE: Duration = Duration::from_secs(2);
const STARTUP: Duration = Duration::from_secs(30);
const NO_POLLING: (&str, &str) = ("CFGCHECK_INTERVAL", "3600");

fn wait_ready(host: &Host, installer: &Installer) {
    assert!(
        wait_for(STARTUP, || host.ready.exists()).is_some(),
        "not ready within {STARTUP:?}; log:\n{}",
        installer.log()
    );
}

/// Our binary in the bin dir, whole: its size and mode (the bytes are compared once at
/// the end of a test; comparing them on every poll would measure the test).
fn binary_in_place(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let want = std::fs::metadata(BINARY).unwrap().len();
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == want && m.permissions().mode() & 0o777 == 0o755)
}

fn same_bytes(path: &Path) -> bool {
    std::fs::read(path).ok() == std::fs::read(BINARY).ok()
}

/// `start` with the health port on a port free a moment ago: another process on this
/// shared host may bind it first, and then the installer exits and starts again on
/// another one.
fn with_health_port(mut start: impl FnMut(&str) -> Installer) -> (Installer, u16) {
    for _ in 0..5 {
        let port = free_port();
        let mut installer = start(&port.to_string());
        let up =
            wait_for(STARTUP, || http_get(port, "/healthz").is_some() || installer.child.try_wait().unwrap().is_some());
        if up.is_some() && installer.child.try_wait().unwrap().is_none() {
            return (installer, port);
        }
        let _ = installer.wait(Duration::from_secs(1));
    }
    panic!("no free port for the health endpoints after 5 tries");
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

#[test]
fn a_deleted_or_replaced_binary_is_back_from_the_watch() {
    let host = Host::new();
    std::fs::write(host.net_file("10-calico.conflist"), CALICO).unwrap();
    let installer = Installer::start(&host, &[NO_POLLING]);
    wait_ready(&host, &installer);
    let binary = host.bin.join(PLUGIN);

    // Deleted, as Go's SIGTERM cleanup deletes it: back from the watch, not the backstop.
    let rounds: usize = std::env::var("KMC_BINARY_ROUNDS").ok().and_then(|n| n.parse().ok()).unwrap_or(5);
    let mut took = Vec::new();
    for round in 0..rounds {
        std::fs::remove_file(&binary).unwrap();
        let started = Instant::now();
        let back = wait_for(DEADLINE, || binary_in_place(&binary));
        assert!(back.is_some(), "round {round}: not back within {DEADLINE:?}; log:\n{}", installer.log());
        took.push(started.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("binary deleted -> back: median {:?} of {rounds} (all: {took:?})", median(took.clone()));
    assert!(same_bytes(&binary));

    // Replaced by another binary renamed over it (an installer copying its own).
    let theirs = host.bin.join(".theirs");
    std::fs::copy("/bin/true", &theirs).unwrap();
    std::fs::rename(&theirs, &binary).unwrap();
    assert!(wait_for(DEADLINE, || binary_in_place(&binary)).is_some(), "replaced: not back; log:\n{}", installer.log());
    assert!(same_bytes(&binary));

    // Rewritten in place with other bytes of the same size: the size says nothing, the
    // bytes are compared.
    {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&binary).unwrap();
        f.seek(std::io::SeekFrom::Start(64)).unwrap();
        f.write_all(b"not our bytes").unwrap();
    }
    assert!(wait_for(DEADLINE, || same_bytes(&binary)).is_some(), "rewritten: not restored; log:\n{}", installer.log());

    // A chmod: the runtime could not execute it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(
        wait_for(DEADLINE, || binary_in_place(&binary)).is_some(),
        "chmod: not restored; log:\n{}",
        installer.log()
    );
    assert!(same_bytes(&binary));
    assert!(host.ready.exists());
    assert!(installer.log().contains("put the plugin binary back"), "{}", installer.log());
}

#[test]
fn readiness_follows_the_binary_and_the_kubeconfig() {
    let host = Host::new();
    std::fs::write(host.net_file("10-calico.conflist"), CALICO).unwrap();
    let (installer, port) = with_health_port(|port| Installer::start(&host, &[NO_POLLING, ("KMC_HEALTH_PORT", port)]));
    wait_ready(&host, &installer);
    let readyz = || http_get(port, "/readyz");
    assert_eq!(readyz().map(|r| r.0), Some(200));
    let binary = host.bin.join(PLUGIN);

    // A directory in the binary's place (what a hostPath volume of type DirectoryOrCreate
    // naming the file does) cannot be replaced: not ready, saying why, until it goes.
    loop {
        std::fs::remove_file(&binary).unwrap();
        match std::fs::create_dir(&binary) {
            Ok(()) => break,
            // The installer put it back in between: again.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("{e}"),
        }
    }
    std::fs::write(binary.join("x"), "").unwrap();
    let not_ready =
        || !host.ready.exists() && readyz().is_some_and(|(c, body)| c == 503 && body.contains("plugin binary"));
    assert!(wait_for(DEADLINE, not_ready).is_some(), "still ready: {:?}; log:\n{}", readyz(), installer.log());
    std::fs::remove_dir_all(&binary).unwrap();
    let ready = || host.ready.exists() && binary_in_place(&binary) && readyz().is_some_and(|(c, _)| c == 200);
    assert!(wait_for(DEADLINE, ready).is_some(), "not ready again: {:?}; log:\n{}", readyz(), installer.log());

    // The token gone from the projected volume: no kubeconfig can be written.
    let data = host.sa.join("..data");
    let dir = host.sa.join(std::fs::read_link(&data).unwrap());
    std::fs::remove_file(dir.join("token")).unwrap();
    let empty = host.sa.join("..empty");
    std::fs::create_dir(&empty).unwrap();
    std::os::unix::fs::symlink("..empty", host.sa.join("..data_tmp")).unwrap();
    std::fs::rename(host.sa.join("..data_tmp"), &data).unwrap();
    assert!(
        wait_for(DEADLINE, || !host.ready.exists()).is_some(),
        "still ready without a token; log:\n{}",
        installer.log()
    );
    assert_eq!(readyz().map(|r| r.0), Some(503));
    host.rotate_token("token-two", b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n");
    assert!(wait_for(DEADLINE, || host.ready.exists()).is_some(), "not ready again; log:\n{}", installer.log());
    assert_eq!(readyz().map(|r| r.0), Some(200));
}

#[test]
fn a_stale_conf_of_our_network_is_set_aside_never_deleted() {
    let host = Host::new();
    let multus = "{\"cniVersion\": \"0.3.1\", \"name\": \"multus\", \"type\": \"multus\"}\n";
    std::fs::write(host.net_file("00-multus.conf"), multus).unwrap();
    // Kuma's Go installer in Multus mode with CNI_CONF_NAME unset, killed with -9: its
    // standalone conf stays, and sorts before ours (Multus takes the first).
    let go = r#"{"cniVersion":"0.3.1","name":"kuma-cni","plugins":[{"type":"kuma-cni","log_level":"info","kubernetes":{"kubeconfig":"/etc/cni/net.d/ZZZ-kuma-cni-kubeconfig"}}]}"#;
    let stale = host.net_file("YYY-kuma-cni.conflist");
    std::fs::write(&stale, go).unwrap();
    let other = "{\"cniVersion\": \"0.3.1\", \"name\": \"macvlan-net\", \"type\": \"macvlan\"}\n";
    std::fs::write(host.net_file("50-macvlan.conf"), other).unwrap();
    let mut installer = Installer::start(&host, &[NO_POLLING, UNINSTALL, ("CHAINED_CNI_PLUGIN", "false")]);
    wait_ready(&host, &installer);

    let aside = host.net_file("YYY-kuma-cni.conflist.disabled-by-kong-mesh-cni");
    let set_aside = || !stale.exists() && std::fs::read_to_string(&aside).is_ok_and(|t| t == go);
    assert!(wait_for(DEADLINE, set_aside).is_some(), "at start; log:\n{}", installer.log());
    // Written again later (another Go pod, killed again): from the watch.
    std::fs::write(&stale, go).unwrap();
    assert!(wait_for(DEADLINE, set_aside).is_some(), "from the watch; log:\n{}", installer.log());
    let log = installer.log();
    assert!(log.contains("set aside a stale configuration of our network"), "{log}");
    assert!(log.contains(&stale.display().to_string()), "names the file:\n{log}");

    // Ours and the other networks' files are untouched.
    assert_eq!(json(&host.net_file("kuma-cni.conf")).unwrap()["type"], PLUGIN);
    assert_eq!(std::fs::read_to_string(host.net_file("00-multus.conf")).unwrap(), multus);
    assert_eq!(std::fs::read_to_string(host.net_file("50-macvlan.conf")).unwrap(), other);
    // The uninstall removes our conf and leaves what was set aside (not ours to delete).
    assert!(installer.terminate().success());
    assert!(!host.net_file("kuma-cni.conf").exists() && aside.exists());
}

#[test]
fn a_stalled_stderr_stops_neither_repairs_nor_healthz() {
    use std::io::Write;
    let host = Host::new();
    let conflist = host.net_file("10-calico.conflist");
    std::fs::write(&conflist, CALICO).unwrap();
    let (installer, port) = with_health_port(|port| {
        Installer::start_with_unread_stderr(
            &host,
            &[
                NO_POLLING,
                ("KMC_HEALTH_PORT", port),
                ("CNI_LOG_LEVEL", "debug"),
                // Every round is a repair: not a fight to throttle.
                ("KMC_REPAIR_LIMIT", "100000"),
            ],
        )
    });
    assert!(wait_for(STARTUP, || host.ready.exists()).is_some(), "not ready");

    // Plugin lines through the log socket until the pipe is full.
    let line = format!("INFO ADD pod=shop/web container=abc: {}\n", "x".repeat(200));
    let mut plugin = std::os::unix::net::UnixStream::connect(host.log_socket()).unwrap();
    let full = wait_for(Duration::from_secs(10), || {
        for _ in 0..100 {
            plugin.write_all(line.as_bytes()).unwrap();
        }
        installer.unread_stderr() >= 60 * 1024
    });
    assert!(full.is_some(), "the pipe did not fill: {} bytes", installer.unread_stderr());

    let healthz = |deadline: Duration| {
        let asked = Instant::now();
        let answer = http_get(port, "/healthz");
        answer.is_some_and(|(c, _)| c == 200) && asked.elapsed() < deadline
    };
    // Every rewrite is repaired within a second, and /healthz answers meanwhile; more
    // log lines than the queue holds are dropped and counted.
    let started = Instant::now();
    let mut round = 0;
    loop {
        rename_over(&conflist, CALICO);
        let repaired = wait_for(Duration::from_secs(1), || chained(&conflist, PLUGIN));
        assert!(repaired.is_some(), "round {round}: not repaired within 1s with stderr stalled");
        assert!(healthz(Duration::from_secs(1)), "round {round}: /healthz did not answer within 1s");
        // Wake the loop without a repair, for more lines (debug logs every turn).
        for _ in 0..200 {
            write_in_place(&host.net_file("99-other.conf"), "{\"cniVersion\":\"0.3.1\",\"name\":\"o\",\"type\":\"o\"}");
        }
        round += 1;
        let dropped = http_get(port, "/metrics")
            .and_then(|(_, m)| {
                m.lines()
                    .find_map(|l| l.strip_prefix("kong_mesh_cni_installer_log_lines_dropped_total "))
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .unwrap_or(0);
        if dropped > 0 && round >= 3 {
            eprintln!("{round} rounds, {dropped} log lines dropped, in {:?}", started.elapsed());
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no dropped line counted after {round} rounds");
    }
}
