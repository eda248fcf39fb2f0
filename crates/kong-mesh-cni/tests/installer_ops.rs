//! Operating a running installer without restarting it: the log level followed from a
//! mounted ConfigMap key. The real binary against temporary host dirs.

mod installer_host;

use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use installer_host::*;

const CALICO: &str = r#"{"cniVersion":"0.3.1","name":"k8s-pod-network","plugins":[{"type":"calico"}]}"#;
const STARTUP: Duration = Duration::from_secs(30);
/// A level change must reach us within this: inotify, plus a loaded two-core machine.
const APPLIED: Duration = Duration::from_secs(5);

/// A ConfigMap volume as the kubelet lays it out: `logLevel` -> `..data/logLevel`, and
/// an update is a new timestamped dir with `..data` renamed over to it.
struct ConfigVolume {
    dir: PathBuf,
    generation: u32,
}

impl ConfigVolume {
    fn new(dir: PathBuf, level: &str) -> ConfigVolume {
        std::fs::create_dir(&dir).unwrap();
        let mut volume = ConfigVolume { dir, generation: 0 };
        volume.update(level);
        symlink("..data/logLevel", volume.file()).unwrap();
        volume
    }

    fn file(&self) -> PathBuf {
        self.dir.join("logLevel")
    }

    fn update(&mut self, level: &str) {
        self.generation += 1;
        let name = format!("..2026_12_07_22_00_00.{}", self.generation);
        std::fs::create_dir(self.dir.join(&name)).unwrap();
        std::fs::write(self.dir.join(&name).join("logLevel"), level).unwrap();
        let old = std::fs::read_link(self.dir.join("..data")).ok();
        symlink(&name, self.dir.join("..data_tmp")).unwrap();
        std::fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data")).unwrap();
        if let Some(old) = old {
            std::fs::remove_dir_all(self.dir.join(old)).unwrap();
        }
    }
}

/// One plugin call as the runtime makes it (GC: no pod needed), with a conf at `info`
/// that points its log socket and run dir at this host; returns when it has exited.
fn plugin_gc(host: &Host) {
    let run = host.root.path().join("run");
    let conf = serde_json::json!({
        "cniVersion": "1.1.0", "name": "kuma-cni", "type": "kong-mesh-cni", "log_level": "info",
        "log_socket": host.log_socket(), "log_file": host.root.path().join("cni.log"), "run_dir": run,
    });
    let mut child = Command::new(BINARY)
        .env_clear()
        .env("CNI_COMMAND", "GC")
        .env("CNI_PATH", &host.bin)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
}

fn plugin_debug_lines(log: &str) -> usize {
    log.lines().filter(|l| l.starts_with("[plugin") && l.contains("DEBUG") && l.contains("done")).count()
}

/// Lines of the installer's own at debug.
fn own_debug_lines(log: &str) -> usize {
    log.lines().filter(|l| !l.starts_with("[plugin") && l.contains(" DEBUG ")).count()
}

fn wait_log(installer: &Installer, what: &str, condition: impl Fn(&str) -> bool) {
    if wait_for(APPLIED, || condition(&installer.log())).is_none() {
        panic!("{what} within {APPLIED:?}; log:\n{}", installer.log());
    }
}

fn level_file(host: &Host) -> String {
    std::fs::read_to_string(host.root.path().join("run/log-level")).unwrap_or_default()
}

#[test]
fn the_log_level_follows_the_configmap_file_without_a_restart() {
    let host = Host::new();
    std::fs::write(host.net_file("10-calico.conflist"), CALICO).unwrap();
    let mut volume = ConfigVolume::new(host.root.path().join("config"), "info\n");
    let file = volume.file();
    // The backstop tick (every 200 ms) makes the loop log "woke up" at debug, when debug is on.
    let mut installer = Installer::start(
        &host,
        &[("CNI_LOG_LEVEL", "info"), ("CFGCHECK_INTERVAL", "200ms"), ("KMC_LOG_LEVEL_FILE", file.to_str().unwrap())],
    );
    assert!(wait_for(STARTUP, || host.ready.exists()).is_some(), "not ready:\n{}", installer.log());
    assert_eq!(level_file(&host), "info\n", "the plugin is told the level:\n{}", installer.log());

    // At info: neither our debug lines nor a plugin call's.
    plugin_gc(&host);
    let sent = relay_marker(&host, &installer, "first");
    let log = installer.log();
    assert_eq!((own_debug_lines(&log), plugin_debug_lines(&log)), (0, 0), "{log}");
    assert!(!log.contains(&format!("DEBUG {sent}-debug")), "the relay drops debug lines at info:\n{log}");

    // Edit the ConfigMap: debug, for us, the relay and the next plugin call.
    let pid = installer.pid();
    volume.update("debug\n");
    wait_log(&installer, "the change logged", |log| log.contains("log level changed") && log.contains("to=debug"));
    wait_log(&installer, "our own debug lines", |log| own_debug_lines(log) > 0);
    assert_eq!(level_file(&host), "debug\n");
    plugin_gc(&host);
    wait_log(&installer, "the plugin call's debug line relayed", |log| plugin_debug_lines(log) == 1);
    let sent = relay_marker(&host, &installer, "second");
    assert!(installer.log().contains(&format!("DEBUG {sent}-debug")), "{}", installer.log());

    // A bad value: named with the file, the level kept.
    volume.update("verbose\n");
    wait_log(&installer, "the bad value named", |log| {
        log.lines().any(|l| l.contains("ERROR") && l.contains(file.to_str().unwrap()) && l.contains("\"verbose\""))
    });
    assert_eq!(level_file(&host), "debug\n");
    plugin_gc(&host);
    wait_log(&installer, "debug kept after a bad value", |log| plugin_debug_lines(log) == 2);

    // Back to info: quiet again.
    volume.update("info");
    wait_log(&installer, "the change back logged", |log| log.contains("to=info"));
    let quiet_from = installer.log().len();
    plugin_gc(&host);
    relay_marker(&host, &installer, "third");
    std::thread::sleep(Duration::from_millis(500));
    let after = &installer.log()[quiet_from..];
    assert_eq!((own_debug_lines(after), plugin_debug_lines(after)), (0, 0), "{after}");
    assert_eq!(installer.pid(), pid);
    let exited = installer.child.try_wait().unwrap();
    assert!(exited.is_none(), "never restarted:\n{}", installer.log());
}

/// Writes a debug line then an info line on one relay connection and waits for the info
/// one: whether the debug line was relayed is settled by then (one connection is in order).
fn relay_marker(host: &Host, installer: &Installer, name: &str) -> String {
    let mut stream = std::os::unix::net::UnixStream::connect(host.log_socket()).unwrap();
    let marker = format!("marker-{name}");
    write!(
        stream,
        "2026-12-07T22:00:00.000000Z DEBUG {marker}-debug\n2026-12-07T22:00:00.000001Z  INFO {marker}-info\n"
    )
    .unwrap();
    drop(stream);
    wait_log(installer, "the relay's info line", |log| log.contains(&format!("{marker}-info")));
    marker
}

#[test]
fn json_format_makes_every_line_an_object_relayed_plugin_lines_included() {
    let host = Host::new();
    std::fs::write(host.net_file("10-calico.conflist"), CALICO).unwrap();
    let volume = ConfigVolume::new(host.root.path().join("config"), "debug");
    let file = volume.file();
    let installer =
        Installer::start(&host, &[("CNI_LOG_FORMAT", "json"), ("KMC_LOG_LEVEL_FILE", file.to_str().unwrap())]);
    assert!(wait_for(STARTUP, || host.ready.exists()).is_some(), "not ready:\n{}", installer.log());
    // The plugin's conf says nothing of the format (nor debug): it learns both from the run dir.
    plugin_gc(&host);
    let objects = |log: &str| -> Vec<serde_json::Value> {
        log.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}\n{log}")))
            .collect()
    };
    let relayed = |o: &serde_json::Value| o["source"] == "plugin" && o["level"] == "DEBUG" && o["message"] == "done";
    wait_log(&installer, "the plugin's debug line", |log| log.lines().any(|l| l.contains(r#""source":"plugin""#)));
    let all = objects(&installer.log());
    let plugin = all.iter().find(|o| relayed(o)).unwrap_or_else(|| panic!("{}", installer.log()));
    assert_eq!(plugin["span"]["cmd"], "GC", "the call's span as fields: {plugin}");
    assert!(plugin["pid"].as_u64().is_some_and(|p| p > 0), "who wrote it: {plugin}");
    let ready = all.iter().find(|o| o["message"].as_str().is_some_and(|m| m.starts_with("ready:")));
    assert!(ready.is_some_and(|o| o["level"] == "INFO" && o["timestamp"].is_string()), "{}", installer.log());
}

/// `kong-mesh-cni status` in the installer's environment, as `kubectl exec` runs it.
fn status(host: &Host, extra: &[(&str, &str)], output: &str) -> (i32, String) {
    let out = Command::new(BINARY)
        .args(["status", "--output", output])
        .env_clear()
        .envs(host.env())
        .envs(extra.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn status_shows_the_node_and_exits_non_zero_naming_why_when_not_ready() {
    let host = Host::new();
    let port = free_port().to_string();
    let extra = [("KMC_HEALTH_PORT", port.as_str()), ("CFGCHECK_INTERVAL", "200ms")];
    let installer = Installer::start(&host, &extra);
    // No primary CNI configuration yet: the installer waits, and status says so.
    wait_log(&installer, "waiting", |log| log.contains("waiting for the primary CNI's configuration"));
    let (code, text) = status(&host, &extra, "text");
    assert_eq!(code, 1, "{text}");
    let first = text.lines().next().unwrap();
    assert!(
        first.starts_with("node              NOT READY: not chained: no primary CNI configuration in")
            && first.contains("installer waiting"),
        "{text}"
    );

    let conflist = host.net_file("10-calico.conflist");
    std::fs::write(&conflist, CALICO).unwrap();
    assert!(wait_for(STARTUP, || host.ready.exists()).is_some(), "not ready:\n{}", installer.log());
    let (code, text) = status(&host, &extra, "text");
    assert_eq!(code, 0, "{text}");
    for want in [
        "node              READY\n".to_owned(),
        format!("chained in        {} (plugin 2 of 2: calico -> kong-mesh-cni)\n", conflist.display()),
        format!("binary            {} (current)\n", host.bin.join("kong-mesh-cni").display()),
        format!("kubeconfig        {} (current)\n", host.net_file(KUBECONFIG).display()),
        "installer         ready\n".to_owned(),
        "repairs           0 (last: none)\n".to_owned(),
        "fighting          no\n".to_owned(),
    ] {
        assert!(text.contains(&want), "{want:?} in:\n{text}");
    }

    // Another agent drops our entry; once the installer has put it back, the repair shows.
    std::fs::write(&conflist, CALICO).unwrap();
    let repaired = || status(&host, &extra, "json");
    let mut last = String::new();
    let seen = wait_for(APPLIED, || {
        let (code, json) = repaired();
        last = json;
        let v: serde_json::Value = serde_json::from_str(&last).unwrap_or_default();
        code == 0 && v["installer"]["repairs"] == 1 && v["installer"]["last_repair_unix"].is_u64()
    });
    assert!(seen.is_some(), "{last}\n{}", installer.log());
    let v: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(
        (v["ready"].clone(), v["chain"]["position"].clone()),
        (true.into(), serde_json::json!([2, 2])),
        "{last}"
    );
    assert_eq!(v["chain"]["entry"]["type"], "kong-mesh-cni");
}
