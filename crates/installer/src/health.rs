//! What the installer reports about itself: readiness (also as the ready file), a
//! heartbeat of the event loop, and metrics; served on `/readyz`, `/healthz` and
//! `/metrics` by [`ops::admin`].

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ops::Heartbeat;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

/// The install state, one of these at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Starting,
    /// The primary CNI's configuration is not there yet.
    Waiting,
    /// The configuration the runtime uses cannot be chained into (invalid, foreign).
    Refused,
    /// The binary or the kubeconfig is not in place, or our entry is out (a repair is
    /// held back by the throttle).
    Degraded,
    Ready,
    Removing,
}

const STATES: [(State, &str); 6] = [
    (State::Starting, "starting"),
    (State::Waiting, "waiting"),
    (State::Refused, "refused"),
    (State::Degraded, "degraded"),
    (State::Ready, "ready"),
    (State::Removing, "removing"),
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// Probes and scrapes are quick; a client still connected after this is dropped.
pub const SERVE_OPTIONS: ops::ServeOptions =
    ops::ServeOptions { connection_deadline: Duration::from_secs(2), max_connections: 512 };

/// A loop that has not beaten for this long is stuck, unless told otherwise ([`Status::new`]).
const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(10);

/// Shared between the event loop (writer) and the admin endpoints (reader).
#[derive(Debug)]
pub struct Status {
    state: Mutex<(State, String)>,
    heartbeat: Heartbeat,
    registry: ops::Registry,
    repairs: Counter,
    last_repair: Gauge,
    ready: Gauge,
    fighting: Gauge,
    states: Family<StateLabel, Gauge>,
    ebpf_pods: Gauge,
    ebpf_load_errors: Counter,
    plugin: Option<crate::requests::PluginMetrics>,
}

impl Default for Status {
    fn default() -> Status {
        Status::new(DEFAULT_STALE_AFTER)
    }
}

impl Status {
    /// `/healthz` fails once the event loop has not beaten for `stale_after`.
    pub fn new(stale_after: Duration) -> Status {
        let mut registry = ops::Registry::with_prefix("kong_mesh_cni_installer");
        let (repairs, last_repair, ready, fighting) = <(Counter, Gauge, Gauge, Gauge)>::default();
        let states = Family::<StateLabel, Gauge>::default();
        registry.register("repairs", "Times our entry was put back after something else took it out.", repairs.clone());
        registry.register(
            "last_repair_timestamp_seconds",
            "Unix time of the last repair (0: none yet).",
            last_repair.clone(),
        );
        registry.register(
            "ready",
            "1 while the binary, the kubeconfig and our CNI configuration are in place.",
            ready.clone(),
        );
        registry.register(
            "fighting",
            "1 while repairs are spaced out because another agent keeps reverting our entry.",
            fighting.clone(),
        );
        registry.register("state", "Install state: 1 for the current one.", states.clone());
        ops::register_log_metrics(&mut registry);
        let status = Status {
            state: Mutex::new((State::Starting, "starting".into())),
            heartbeat: Heartbeat::new(stale_after),
            registry,
            repairs,
            last_repair,
            ready,
            fighting,
            states,
            ebpf_pods: Gauge::default(),
            ebpf_load_errors: Counter::default(),
            plugin: None,
        };
        status.set(State::Starting, "starting");
        status
    }

    pub fn set(&self, state: State, detail: impl Into<String>) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (state, detail.into());
        self.ready.set(i64::from(state == State::Ready));
        // Every state is shown, the current one as 1.
        for (s, name) in STATES {
            self.states.get_or_create(&StateLabel { state: name }).set(i64::from(s == state));
        }
    }

    pub fn state(&self) -> (State, String) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn repaired(&self) {
        self.repairs.inc();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.last_repair.set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    /// eBPF mode: its metrics are shown (in iptables mode they would only ever be 0).
    pub fn register_ebpf(&mut self) {
        self.registry.register(
            "ebpf_registered_pods",
            "Mesh pods registered with the eBPF redirect on this node (pinned registrations).",
            self.ebpf_pods.clone(),
        );
        self.registry.register(
            "ebpf_load_errors",
            "Times loading or attaching the eBPF programs failed (the log says why).",
            self.ebpf_load_errors.clone(),
        );
    }

    /// With the node agent: the pods in its cache are shown.
    pub fn register_agent(&mut self) -> Gauge {
        let cached = Gauge::default();
        self.registry.register(
            "agent_cached_pods",
            "Pods of this node in the node agent's cache (what it can answer the plugin from).",
            cached.clone(),
        );
        cached
    }

    /// With the plugin's record socket in `run_dir`: its calls are counted.
    pub fn register_plugin(&mut self, run_dir: &std::path::Path) -> crate::requests::PluginMetrics {
        self.plugin.get_or_insert_with(|| crate::requests::PluginMetrics::register(&mut self.registry, run_dir)).clone()
    }

    pub fn set_ebpf_pods(&self, pods: usize) {
        self.ebpf_pods.set(i64::try_from(pods).unwrap_or(i64::MAX));
    }

    pub fn ebpf_load_failed(&self) {
        self.ebpf_load_errors.inc();
    }

    pub fn set_fighting(&self, fighting: bool) {
        self.fighting.set(i64::from(fighting));
    }

    /// The event loop is alive (it beats at least every `CFGCHECK_INTERVAL`).
    pub fn beat(&self) {
        self.heartbeat.beat();
    }

    /// The metrics in the Prometheus text format.
    pub fn metrics(&self) -> String {
        ops::render(&self.registry)
    }
}

impl ops::Report for Status {
    fn readiness(&self) -> Result<(), String> {
        match self.state() {
            (State::Ready, _) => Ok(()),
            (_, detail) => Err(format!("not ready: {detail}")),
        }
    }

    fn liveness(&self) -> Result<(), String> {
        self.heartbeat.check("event loop")
    }

    fn metrics(&self) -> String {
        Status::metrics(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ops::Report;

    #[test]
    fn metrics_show_repairs_and_one_state() {
        let s = Status::default();
        s.repaired();
        s.set(State::Ready, "chained");
        let m = s.metrics();
        assert!(m.contains("kong_mesh_cni_installer_repairs_total 1\n"), "{m}");
        assert!(m.contains("kong_mesh_cni_installer_ready 1\n"));
        assert!(m.contains("kong_mesh_cni_installer_state{state=\"ready\"} 1\n"));
        assert!(m.contains("kong_mesh_cni_installer_state{state=\"waiting\"} 0\n"));
        assert!(m.contains("kong_mesh_cni_installer_fighting 0\n"));
        assert!(m.contains("kong_mesh_cni_installer_log_lines_dropped_total 0\n"), "{m}");
        assert!(!m.contains("kong_mesh_cni_installer_last_repair_timestamp_seconds 0\n"));
    }

    #[test]
    fn ebpf_metrics_only_in_ebpf_mode() {
        assert!(!Status::default().metrics().contains("ebpf"));
        let mut s = Status::default();
        s.register_ebpf();
        s.set_ebpf_pods(3);
        s.ebpf_load_failed();
        let m = s.metrics();
        assert!(m.contains("kong_mesh_cni_installer_ebpf_registered_pods 3\n"), "{m}");
        assert!(m.contains("kong_mesh_cni_installer_ebpf_load_errors_total 1\n"), "{m}");
    }

    #[test]
    fn readyz_follows_state_and_healthz_the_heartbeat() {
        let s = Status::new(Duration::from_millis(30));
        s.set(State::Waiting, "10-calico.conflist does not exist yet");
        assert_eq!(s.readiness(), Err("not ready: 10-calico.conflist does not exist yet".into()));
        assert!(s.liveness().is_ok());
        std::thread::sleep(Duration::from_millis(60));
        assert!(s.liveness().unwrap_err().contains("event loop stalled"));
        s.beat();
        assert!(s.liveness().is_ok());
        s.set(State::Ready, "");
        assert_eq!(s.readiness(), Ok(()));
    }
}
