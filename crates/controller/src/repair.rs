//! The repair controller's decision (pure): a mesh pod whose validator reported that its
//! traffic is not redirected. Such a pod started before the CNI was ready on its node:
//! the redirect is programmed only when the sandbox is created, so restarting its
//! containers cannot fix it; a new pod can.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kuma::pod::{Decision, VALIDATION_CONTAINER, VALIDATOR_EXIT_NOT_REDIRECTED};

/// Set on a pod by the `label` action; a labelled pod is not acted on again.
pub const REDIRECT_MISSING_LABEL: &str = "kong-mesh-cni/redirect-missing";
/// The reason of the Events we record.
pub const EVENT_REASON: &str = "RedirectMissing";

/// Whether the pod needs repair. Only a pod our plugin would intercept qualifies (the
/// same decision the plugin makes): non-mesh pods are never touched, whatever their
/// containers are named. A pod already being deleted or already labelled is done.
pub fn needs_repair(pod: &Pod) -> bool {
    if pod.metadata.deletion_timestamp.is_some()
        || pod.metadata.labels.as_ref().is_some_and(|l| l.contains_key(REDIRECT_MISSING_LABEL))
    {
        return false;
    }
    if !validator_reported_no_redirect(pod) {
        return false;
    }
    matches!(kuma::pod::decide(pod), Ok(Decision::Intercept(_)))
}

/// The validator's last run or the one before ended with the not-redirected code (the
/// kubelet restarts a failed init container, which moves that run to `lastState`).
fn validator_reported_no_redirect(pod: &Pod) -> bool {
    let statuses = pod.status.as_ref().and_then(|s| s.init_container_statuses.as_deref()).unwrap_or_default();
    statuses
        .iter()
        .filter(|s| s.name == VALIDATION_CONTAINER)
        .any(|s| exit_codes(s).any(|code| code == VALIDATOR_EXIT_NOT_REDIRECTED))
}

fn exit_codes(status: &ContainerStatus) -> impl Iterator<Item = i32> + '_ {
    [status.state.as_ref(), status.last_state.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|s| s.terminated.as_ref())
        .map(|t| t.exit_code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, ContainerState, ContainerStateTerminated, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn container(name: &str) -> Container {
        Container { name: name.into(), ..Default::default() }
    }

    fn terminated(code: i32) -> Option<ContainerState> {
        Some(ContainerState {
            terminated: Some(ContainerStateTerminated { exit_code: code, ..Default::default() }),
            ..Default::default()
        })
    }

    /// A mesh pod (injected, with the sidecar) whose validator ended with `code`, in
    /// `state` or, if `last` is set, in `lastState` while it runs again.
    fn pod(code: i32, last: bool) -> Pod {
        let mut status = ContainerStatus { name: VALIDATION_CONTAINER.into(), ..Default::default() };
        if last {
            status.last_state = terminated(code);
            status.state = Some(ContainerState::default());
        } else {
            status.state = terminated(code);
        }
        Pod {
            metadata: ObjectMeta {
                annotations: Some([(kuma::pod::SIDECAR_INJECTED.to_owned(), "true".to_owned())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                init_containers: Some(vec![container(VALIDATION_CONTAINER)]),
                containers: vec![container("app"), container(kuma::pod::SIDECAR_CONTAINER)],
                ..Default::default()
            }),
            status: Some(PodStatus { init_container_statuses: Some(vec![status]), ..Default::default() }),
        }
    }

    #[test]
    fn exit_97_in_state_or_last_state_needs_repair() {
        assert!(needs_repair(&pod(97, false)));
        assert!(needs_repair(&pod(97, true)));
    }

    #[test]
    fn other_exit_codes_do_not() {
        for code in [0, 1, 2, 137] {
            assert!(!needs_repair(&pod(code, false)), "{code}");
            assert!(!needs_repair(&pod(code, true)), "{code}");
        }
    }

    #[test]
    fn non_mesh_pods_are_never_touched() {
        let mut no_sidecar = pod(97, false);
        no_sidecar.spec.as_mut().unwrap().containers.retain(|c| c.name != kuma::pod::SIDECAR_CONTAINER);
        assert!(!needs_repair(&no_sidecar));
        let mut not_injected = pod(97, false);
        not_injected.metadata.annotations = None;
        assert!(!needs_repair(&not_injected));
        let mut injected_false = pod(97, false);
        injected_false.metadata.annotations =
            Some([(kuma::pod::SIDECAR_INJECTED.to_owned(), "false".to_owned())].into());
        assert!(!needs_repair(&injected_false));
    }

    #[test]
    fn a_native_sidecar_counts_as_the_sidecar() {
        let mut native = pod(97, false);
        let spec = native.spec.as_mut().unwrap();
        spec.containers.retain(|c| c.name != kuma::pod::SIDECAR_CONTAINER);
        let sidecar = Container { restart_policy: Some("Always".into()), ..container(kuma::pod::SIDECAR_CONTAINER) };
        spec.init_containers.get_or_insert_default().push(sidecar);
        assert!(needs_repair(&native));
    }

    #[test]
    fn another_container_exiting_97_does_not_count() {
        let mut other = pod(97, false);
        other.status.as_mut().unwrap().init_container_statuses.as_mut().unwrap()[0].name = "setup".into();
        assert!(!needs_repair(&other));
    }

    #[test]
    fn a_pod_already_handled_is_done() {
        let mut deleting = pod(97, false);
        deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert!(!needs_repair(&deleting));
        let mut labelled = pod(97, false);
        labelled.metadata.labels = Some([(REDIRECT_MISSING_LABEL.to_owned(), "true".to_owned())].into());
        assert!(!needs_repair(&labelled));
    }
}
