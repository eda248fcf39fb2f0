//! What the controller reports about itself: Prometheus metrics, readiness, and the one
//! place where errors are logged and counted.

use std::sync::Mutex;

use ops::Registry;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tracing::{debug, info, warn};

use crate::Error;

/// Each part that must have synced before the controller is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The leadership state is known (leader or not).
    Leadership,
    /// Nodes and CNI pods are cached.
    Taint,
    /// The NetworkAttachmentDefinition CRD's presence is known (and, when present,
    /// namespaces and our NADs are cached).
    Nad,
    /// The pod watch has listed every pod once.
    Repair,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChangeLabels {
    change: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    controller: &'static str,
    kind: String,
}

/// Shared by every task of one controller process (or of one in-process instance in
/// tests, which is why this is not a global registry).
pub struct Status {
    registry: Registry,
    leader: Gauge,
    taint_changes: Family<ChangeLabels, Counter>,
    nad_changes: Family<ChangeLabels, Counter>,
    repair_actions: Family<ActionLabels, Counter>,
    events: Family<ChangeLabels, Counter>,
    conflicts: Family<ControllerLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    pending: Mutex<Vec<Part>>,
}

impl Status {
    /// Readiness waits for each of `parts`.
    pub fn new(parts: &[Part]) -> Status {
        let (leader, taint_changes, nad_changes) = (Gauge::default(), Family::default(), Family::default());
        let (repair_actions, events, conflicts, errors) =
            (Family::default(), Family::default(), Family::default(), Family::default());
        let mut registry = Registry::with_prefix("kong_mesh_cni_controller");
        registry.register("leader", "1 while this replica holds the Lease and acts", leader.clone());
        registry.register(
            "taint_changes",
            "NodeReadiness taints added (change=add) or removed (change=remove)",
            taint_changes.clone(),
        );
        registry.register("nad_changes", "NetworkAttachmentDefinitions created or deleted", nad_changes.clone());
        registry.register(
            "repair_actions",
            "Pods without redirect deleted or labelled (action=delete|label)",
            repair_actions.clone(),
        );
        registry.register(
            "events",
            "Kubernetes Events recorded (change=recorded) or lost (change=failed)",
            events.clone(),
        );
        registry.register(
            "conflicts",
            "Writes refused because the object changed meanwhile, retried from a fresh read",
            conflicts.clone(),
        );
        registry.register(
            "errors",
            "Failed API calls and watches, by controller and kind (HTTP status, timeout, conflicts: retries exhausted, other)",
            errors.clone(),
        );
        Status {
            registry,
            leader,
            taint_changes,
            nad_changes,
            repair_actions,
            events,
            conflicts,
            errors,
            pending: Mutex::new(parts.to_vec()),
        }
    }

    pub fn synced(&self, part: Part) {
        let mut pending = self.lock_pending();
        let was_pending = pending.contains(&part);
        pending.retain(|p| *p != part);
        if was_pending && pending.is_empty() {
            info!("ready: caches synced, leadership known");
        }
    }

    /// What readiness still waits for; empty when ready.
    pub fn pending(&self) -> Vec<Part> {
        self.lock_pending().clone()
    }

    pub fn is_ready(&self) -> bool {
        self.lock_pending().is_empty()
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Vec<Part>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    pub fn taint_changed(&self, change: &'static str) {
        self.taint_changes.get_or_create(&ChangeLabels { change }).inc();
    }

    pub fn nad_changed(&self, change: &'static str) {
        self.nad_changes.get_or_create(&ChangeLabels { change }).inc();
    }

    pub fn repaired(&self, action: &'static str) {
        self.repair_actions.get_or_create(&ActionLabels { action }).inc();
    }

    pub fn event(&self, recorded: bool) {
        let change = if recorded { "recorded" } else { "failed" };
        self.events.get_or_create(&ChangeLabels { change }).inc();
    }

    /// Counts a write that met a newer version of its object (the optimistic-concurrency
    /// protocol at work, not an error).
    pub fn conflict(&self, controller: &'static str) {
        self.conflicts.get_or_create(&ControllerLabels { controller }).inc();
        debug!(controller, "conflict: deciding again on a fresh read");
    }

    /// Logs and counts an error of `controller`. Every error of the crate ends here.
    pub fn report(&self, controller: &'static str, error: &Error) {
        self.errors.get_or_create(&ErrorLabels { controller, kind: error.kind() }).inc();
        warn!(controller, %error, "failed");
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        ops::render(&self.registry)
    }
}

impl ops::Report for Status {
    fn readiness(&self) -> Result<(), String> {
        match self.pending() {
            pending if pending.is_empty() => Ok(()),
            pending => Err(format!("waiting for {pending:?}")),
        }
    }

    fn metrics(&self) -> String {
        self.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_every_part_synced() {
        let status = Status::new(&[Part::Leadership, Part::Taint]);
        assert!(!status.is_ready());
        status.synced(Part::Taint);
        assert_eq!(status.pending(), vec![Part::Leadership]);
        status.synced(Part::Leadership);
        assert!(status.is_ready());
    }

    #[test]
    fn metrics_are_rendered_with_the_prefix_and_labels() {
        let status = Status::new(&[]);
        status.taint_changed("add");
        status.repaired("delete");
        status.set_leader(true);
        let timeout = Error::Timeout { what: "get".into(), after: std::time::Duration::from_secs(1) };
        status.report("taint", &timeout);
        let text = status.render();
        for line in [
            "kong_mesh_cni_controller_taint_changes_total{change=\"add\"} 1",
            "kong_mesh_cni_controller_repair_actions_total{action=\"delete\"} 1",
            "kong_mesh_cni_controller_leader 1",
            "kong_mesh_cni_controller_errors_total{controller=\"taint\",kind=\"timeout\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
    }
}
