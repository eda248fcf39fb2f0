//! The event loop driven by injected events (no inotify, no timers, no signals): what
//! it does is decided by the events it is given, and by the files it then reads.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use installer::health::{State, Status};
use installer::{Event, InstallArgs, Installer, Settings};
use tokio::sync::mpsc;

const CALICO: &str = include_str!("golden/calico/input/10-calico.conflist");
const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.secret-token-never-logged";

struct Node {
    _root: tempfile::TempDir,
    net: PathBuf,
    bin: PathBuf,
    ready: PathBuf,
    settings: Settings,
}

fn node(extra: &[&str]) -> Node {
    let root = tempfile::tempdir().unwrap();
    let p = |name: &str| root.path().join(name);
    for dir in ["net", "bin", "sa"] {
        std::fs::create_dir(p(dir)).unwrap();
    }
    std::fs::write(p("sa/token"), TOKEN).unwrap();
    std::fs::write(p("sa/ca.crt"), "CA").unwrap();
    std::fs::write(p("plugin"), "#!/bin/false\n").unwrap();
    std::fs::write(p("net/10-calico.conflist"), CALICO).unwrap();
    let s = |path: PathBuf| path.to_string_lossy().into_owned();
    let mut argv: Vec<String> = ["install", "--kubernetes-service-host", "fd00::1"].map(String::from).to_vec();
    for (flag, value) in [
        ("--mounted-cni-net-dir", s(p("net"))),
        ("--mounted-cni-bin-dir", s(p("bin"))),
        ("--secondary-bin-dir", s(p("none"))),
        ("--kube-ca-file", s(p("sa/ca.crt"))),
        ("--kube-service-account-token-path", s(p("sa/token"))),
        ("--cni-ready-file", s(p("ready"))),
    ] {
        argv.extend([flag.to_string(), value]);
    }
    argv.extend(extra.iter().map(|a| a.to_string()));
    let mut settings = Settings::from_args(InstallArgs::try_parse_from(argv).unwrap()).unwrap();
    settings.binary_source = p("plugin");
    Node { net: p("net"), bin: p("bin"), ready: p("ready"), settings, _root: root }
}

fn chained(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.contains("\"type\": \"kong-mesh-cni\""))
}

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within 5s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Logs of the installer, captured at debug level.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn run_captured(test: impl AsyncFnOnce() -> ()) -> String {
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    tracing::subscriber::with_default(subscriber, || runtime.block_on(test()));
    String::from_utf8(logs.0.lock().unwrap().clone()).unwrap()
}

#[test]
fn injected_events_drive_install_repair_and_removal() {
    // Shutdown as an uninstall, without asking the API server (tests/upgrade.rs asks).
    let n = node(&["--uninstall-on-sigterm", "always"]);
    let conflist = n.net.join("10-calico.conflist");
    let status = Arc::new(Status::default());
    let logs = run_captured(async || {
        let (tx, rx) = mpsc::channel(8);
        let installer = tokio::spawn(Installer::new(n.settings.clone(), status.clone()).run(rx));
        // The first pass needs no event.
        eventually("installed", || n.ready.exists()).await;
        assert!(chained(&conflist) && n.bin.join("kong-mesh-cni").exists());
        assert_eq!(status.state().0, State::Ready);
        let kubeconfig = std::fs::read_to_string(n.net.join("ZZZ-kuma-cni-kubeconfig")).unwrap();
        let config = kube::config::Kubeconfig::from_yaml(&kubeconfig).unwrap();
        let server = config.clusters[0].cluster.as_ref().and_then(|c| c.server.as_deref());
        assert!(server == Some("https://[fd00::1]:443") && kubeconfig.contains(TOKEN), "{kubeconfig}");

        // The primary rewrites its file: nothing happens until an event says so...
        std::fs::write(&conflist, CALICO).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!chained(&conflist));
        // ...and then it is repaired.
        tx.send(Event::NetDir).await.unwrap();
        eventually("repaired", || chained(&conflist)).await;
        assert!(status.metrics().contains("kong_mesh_cni_installer_repairs_total 1\n"));

        tx.send(Event::Shutdown).await.unwrap();
        installer.await.unwrap().unwrap();
        assert_eq!(std::fs::read_to_string(&conflist).unwrap(), CALICO);
        assert!(
            !n.ready.exists()
                && !n.bin.join("kong-mesh-cni").exists()
                && !n.net.join("ZZZ-kuma-cni-kubeconfig").exists()
        );
    });
    assert!(logs.contains("DEBUG") || logs.contains("INFO"), "{logs}");
    assert!(logs.contains("put our entry back"), "{logs}");
    assert!(!logs.contains("secret-token-never-logged"), "the token is in the logs:\n{logs}");
}

#[test]
fn a_fight_is_throttled_warned_about_and_repaired_when_due() {
    let n = node(&["--repair-limit", "2", "--repair-window", "1s"]);
    let conflist = n.net.join("10-calico.conflist");
    let logs = run_captured(async || {
        let (tx, rx) = mpsc::channel(8);
        let status = Arc::new(Status::default());
        let installer = tokio::spawn(Installer::new(n.settings.clone(), status.clone()).run(rx));
        eventually("installed", || chained(&conflist)).await;
        for _ in 0..2 {
            std::fs::write(&conflist, CALICO).unwrap();
            tx.send(Event::NetDir).await.unwrap();
            eventually("repaired", || chained(&conflist)).await;
        }
        // Third revert within the window: held back (not ready meanwhile), then due.
        std::fs::write(&conflist, CALICO).unwrap();
        tx.send(Event::NetDir).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!chained(&conflist) && !n.ready.exists());
        assert_eq!(status.state().0, State::Degraded);
        // Events in between are not even looked at; the loop wakes by itself when due.
        let started = Instant::now();
        eventually("held-back repair", || chained(&conflist)).await;
        assert!(started.elapsed() > Duration::from_millis(200), "{:?}", started.elapsed());
        eventually("ready again", || n.ready.exists()).await;
        tx.send(Event::Shutdown).await.unwrap();
        installer.await.unwrap().unwrap();
    });
    assert_eq!(logs.matches("keeps losing our entry").count(), 1, "{logs}");
    assert!(
        logs.contains("10-calico.conflist keeps losing our entry") && logs.contains("calico, portmap, bandwidth"),
        "{logs}"
    );
}

#[test]
fn closing_the_event_stream_leaves_everything_in_place() {
    let n = node(&[]);
    run_captured(async || {
        let (tx, rx) = mpsc::channel(8);
        let installer = tokio::spawn(Installer::new(n.settings.clone(), Arc::new(Status::default())).run(rx));
        eventually("installed", || n.ready.exists()).await;
        drop(tx);
        installer.await.unwrap().unwrap();
    });
    assert!(chained(&n.net.join("10-calico.conflist")) && n.ready.exists());
}
