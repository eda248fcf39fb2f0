//! The repair controller's decision (pure): a mesh pod whose validator reported that its
//! traffic is not redirected. Such a pod started before the CNI was ready on its node:
//! the redirect is programmed only when the sandbox is created, so restarting its
//! containers cannot fix it; a new pod can. Unless the node agent programmed it in place
//! since (it says so in an annotation): then the validator passes on its next run.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::jiff::Timestamp;
use kuma::pod::{Decision, REDIRECT_REPAIRED_AT, VALIDATION_CONTAINER, VALIDATOR_EXIT_NOT_REDIRECTED};

/// Set on a pod by the `label` action; a labelled pod is not acted on again.
pub const REDIRECT_MISSING_LABEL: &str = "kong-mesh-cni/redirect-missing";
/// The reason of the Events we record.
pub const EVENT_REASON: &str = "RedirectMissing";
/// What Kuma's own validator runs as (`kumactl install transparent-proxy-validator`):
/// Kong Mesh injects it in CNI mode, and it exits 1 when the redirect is missing.
const KUMA_VALIDATOR: &str = "transparent-proxy-validator";

/// The validator's exit code that makes the pod need repair, if it does. Only a pod our
/// plugin would intercept qualifies (the same decision the plugin makes): non-mesh pods
/// are never touched, whatever their containers are named. A pod already being deleted
/// or already labelled is done.
pub fn needs_repair(pod: &Pod) -> Option<i32> {
    if pod.metadata.deletion_timestamp.is_some()
        || pod.metadata.labels.as_ref().is_some_and(|l| l.contains_key(REDIRECT_MISSING_LABEL))
    {
        return None;
    }
    let code = validator_reported_no_redirect(pod)?;
    matches!(kuma::pod::decide(pod), Ok(Decision::Intercept(_))).then_some(code)
}

/// The validator's last run or the one before (the kubelet restarts a failed init
/// container, which moves that run to `lastState`) ended saying the redirect is missing,
/// after any in-place repair: our validator with its own code, Kuma's with any failure.
fn validator_reported_no_redirect(pod: &Pod) -> Option<i32> {
    let kumas = kumas_validator(pod);
    let repaired_at = repaired_at(pod);
    let statuses = pod.status.as_ref().and_then(|s| s.init_container_statuses.as_deref()).unwrap_or_default();
    statuses.iter().filter(|s| s.name == VALIDATION_CONTAINER).flat_map(terminations).find_map(|(code, finished)| {
        let missing = code == VALIDATOR_EXIT_NOT_REDIRECTED || (kumas && code != 0);
        // A run that ended before the repair (or whose end is unknown) is not news.
        let since_repair = match (repaired_at, finished) {
            (None, _) => true,
            // The API keeps whole seconds: a run ending in the second of the repair counts.
            (Some(repaired), Some(finished)) => {
                finished >= repaired.round(k8s_openapi::jiff::Unit::Second).unwrap_or(repaired)
            }
            (Some(_), None) => false,
        };
        (missing && since_repair).then_some(code)
    })
}

/// Whether the pod's `kuma-validation` init container runs Kuma's validator (ours runs
/// `kong-mesh-cni validate`).
fn kumas_validator(pod: &Pod) -> bool {
    let init = pod.spec.as_ref().and_then(|s| s.init_containers.as_deref()).unwrap_or_default();
    init.iter()
        .filter(|c| c.name == VALIDATION_CONTAINER)
        .any(|c| c.command.iter().chain(&c.args).flatten().any(|word| word == KUMA_VALIDATOR))
}

/// Whether a pod first seen needing repair at `seen` is due at `now`, given since when
/// its node's CNI pod has been Ready (`None`: no Ready CNI pod there). Both must have
/// lasted `settle`: the node agent repairs in place what the plugin let through while it
/// could not ask the API server, and says so on the pod, within a second of getting the
/// API back or of starting; a node without a Ready CNI pod (just rebooted, say) cannot
/// have done it yet, and deleting its pods there would bring them back no better.
pub fn due<T: Copy + Ord + std::ops::Add<std::time::Duration, Output = T>>(
    seen: T,
    cni_ready_since: Option<T>,
    now: T,
    settle: std::time::Duration,
) -> bool {
    cni_ready_since.is_some_and(|ready| ready + settle <= now) && seen + settle <= now
}

fn repaired_at(pod: &Pod) -> Option<Timestamp> {
    pod.metadata.annotations.as_ref()?.get(REDIRECT_REPAIRED_AT)?.parse().ok()
}

/// The runs in `state` and `lastState` that ended: exit code and end time.
fn terminations(status: &ContainerStatus) -> impl Iterator<Item = (i32, Option<Timestamp>)> + '_ {
    [status.state.as_ref(), status.last_state.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|s| s.terminated.as_ref())
        .map(|t| (t.exit_code, t.finished_at.as_ref().map(|t| t.0)))
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
    fn due_once_the_pod_and_its_nodes_cni_pod_settled() {
        let settle = std::time::Duration::from_secs(2);
        let base = std::time::Instant::now();
        let at = |s: u64| base + std::time::Duration::from_secs(s);
        let (seen, now) = (at(0), at(10));
        assert!(due(seen, Some(at(0)), now, settle));
        assert!(!due(seen, None, now, settle), "no Ready CNI pod on the node");
        assert!(!due(seen, Some(at(9)), now, settle), "the CNI pod just became Ready");
        assert!(!due(at(9), Some(at(0)), now, settle), "the pod was just seen");
        assert!(due(seen, Some(at(8)), now, settle), "exactly settled");
    }

    #[test]
    fn exit_97_in_state_or_last_state_needs_repair() {
        assert_eq!(needs_repair(&pod(97, false)), Some(97));
        assert_eq!(needs_repair(&pod(97, true)), Some(97));
    }

    /// `pod(code, last)` with the validator as Kong Mesh injects it: Kuma's.
    fn kumas(code: i32, last: bool) -> Pod {
        let mut p = pod(code, last);
        let validator = &mut p.spec.as_mut().unwrap().init_containers.as_mut().unwrap()[0];
        validator.command = Some(["/usr/bin/kumactl", "install", KUMA_VALIDATOR].map(String::from).to_vec());
        validator.args = Some(vec!["--ip-family-mode=ipv4".into(), "--validation-server-port=15055".into()]);
        p
    }

    #[test]
    fn kumas_validator_failing_with_any_code_needs_repair() {
        for code in [1, 2, 97] {
            assert_eq!(needs_repair(&kumas(code, false)), Some(code));
            assert_eq!(needs_repair(&kumas(code, true)), Some(code));
        }
        assert!(needs_repair(&kumas(0, false)).is_none());
    }

    /// `p` with its validator's run ending at `finished`, and the agent's repair at `repaired`.
    fn timed(mut p: Pod, finished: &str, repaired: Option<&str>) -> Pod {
        let status = &mut p.status.as_mut().unwrap().init_container_statuses.as_mut().unwrap()[0];
        let state = status
            .state
            .as_mut()
            .unwrap()
            .terminated
            .as_mut()
            .or(status.last_state.as_mut().and_then(|s| s.terminated.as_mut()));
        state.unwrap().finished_at = Some(Time(finished.parse().unwrap()));
        if let Some(at) = repaired {
            p.metadata.annotations.as_mut().unwrap().insert(REDIRECT_REPAIRED_AT.into(), at.into());
        }
        p
    }

    #[test]
    fn failures_before_an_in_place_repair_do_not_count_later_ones_do() {
        let (before, repair, after) = ("2026-12-02T01:00:00Z", "2026-12-02T01:00:05Z", "2026-12-02T01:00:09Z");
        for last in [false, true] {
            assert!(needs_repair(&timed(kumas(1, last), before, Some(repair))).is_none());
            assert!(needs_repair(&timed(pod(97, last), before, Some(repair))).is_none());
            assert_eq!(needs_repair(&timed(kumas(1, last), after, Some(repair))), Some(1));
            assert_eq!(needs_repair(&timed(kumas(1, last), before, None)), Some(1));
            // An annotation that is not a time is not a repair.
            assert_eq!(needs_repair(&timed(kumas(1, last), before, Some("soon"))), Some(1));
        }
    }

    #[test]
    fn other_exit_codes_do_not() {
        for code in [0, 1, 2, 137] {
            assert!(needs_repair(&pod(code, false)).is_none(), "{code}");
            assert!(needs_repair(&pod(code, true)).is_none(), "{code}");
        }
    }

    #[test]
    fn non_mesh_pods_are_never_touched() {
        let mut no_sidecar = pod(97, false);
        no_sidecar.spec.as_mut().unwrap().containers.retain(|c| c.name != kuma::pod::SIDECAR_CONTAINER);
        assert!(needs_repair(&no_sidecar).is_none());
        let mut not_injected = pod(97, false);
        not_injected.metadata.annotations = None;
        assert!(needs_repair(&not_injected).is_none());
        let mut injected_false = pod(97, false);
        injected_false.metadata.annotations =
            Some([(kuma::pod::SIDECAR_INJECTED.to_owned(), "false".to_owned())].into());
        assert!(needs_repair(&injected_false).is_none());
    }

    #[test]
    fn a_native_sidecar_counts_as_the_sidecar() {
        let mut native = pod(97, false);
        let spec = native.spec.as_mut().unwrap();
        spec.containers.retain(|c| c.name != kuma::pod::SIDECAR_CONTAINER);
        let sidecar = Container { restart_policy: Some("Always".into()), ..container(kuma::pod::SIDECAR_CONTAINER) };
        spec.init_containers.get_or_insert_default().push(sidecar);
        assert!(needs_repair(&native).is_some());
    }

    #[test]
    fn another_container_exiting_97_does_not_count() {
        let mut other = pod(97, false);
        other.status.as_mut().unwrap().init_container_statuses.as_mut().unwrap()[0].name = "setup".into();
        assert!(needs_repair(&other).is_none());
    }

    #[test]
    fn a_pod_already_handled_is_done() {
        let mut deleting = pod(97, false);
        deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert!(needs_repair(&deleting).is_none());
        let mut labelled = pod(97, false);
        labelled.metadata.labels = Some([(REDIRECT_MISSING_LABEL.to_owned(), "true".to_owned())].into());
        assert!(needs_repair(&labelled).is_none());
    }
}
