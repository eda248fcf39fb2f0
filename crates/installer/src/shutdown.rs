//! What SIGTERM removes (pure): everything on an uninstall, nothing on a rolling update.
//! A missing chain entry lets mesh pods start without their redirect, while a stale one
//! (with the binary, which lets pods that are not ours through) is harmless: so when the
//! API server cannot tell which it is, everything stays.

use k8s_openapi::api::apps::v1::DaemonSet;

use crate::api::ApiFailure;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Remove the chain entry, the kubeconfig and the binary; the reason for the log.
    Uninstall(String),
    /// Leave everything in place for the next pod to adopt; the reason for the log.
    Keep(String),
}

/// The verdict from what the API server said about our DaemonSet `namespace/name`.
pub fn decide(namespace: &str, name: &str, answer: Result<Option<DaemonSet>, ApiFailure>) -> Verdict {
    let ds = format!("DaemonSet {namespace}/{name}");
    match answer {
        Ok(None) => Verdict::Uninstall(format!("{ds} is gone")),
        Ok(Some(d)) if d.metadata.deletion_timestamp.is_some() => Verdict::Uninstall(format!("{ds} is being deleted")),
        Ok(Some(_)) => Verdict::Keep(format!(
            "{ds} is still there (a rolling update, or this pod was evicted): the next pod takes over"
        )),
        // An uninstall deletes our ServiceAccount and RBAC with the DaemonSet, often before
        // the kubelet stops this pod: a token no longer accepted, or a permission withdrawn,
        // means the chart is going away.
        Err(ApiFailure::Status(code @ (401 | 403), message)) => Verdict::Uninstall(format!(
            "the API server refuses to tell us about {ds} ({code}: {message}): our ServiceAccount or its RBAC was removed"
        )),
        Err(e) => Verdict::Keep(format!(
            "cannot tell whether {ds} is being removed ({e}); keeping the chain entry (a stale one passes pods that are not ours, a missing one would let mesh pods start without their redirect)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn ds(deleting: bool) -> DaemonSet {
        let deletion_timestamp = deleting.then_some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        DaemonSet { metadata: ObjectMeta { deletion_timestamp, ..Default::default() }, ..Default::default() }
    }

    #[test]
    fn uninstall_only_when_the_daemonset_is_going() {
        let decide = |answer| decide("kube-system", "kong-mesh-cni", answer);
        assert!(
            matches!(decide(Ok(None)), Verdict::Uninstall(why) if why.contains("kube-system/kong-mesh-cni is gone"))
        );
        assert!(matches!(decide(Ok(Some(ds(true)))), Verdict::Uninstall(why) if why.contains("being deleted")));
        assert!(matches!(decide(Ok(Some(ds(false)))), Verdict::Keep(why) if why.contains("still there")));
        for code in [401, 403] {
            let refused = Err(ApiFailure::Status(code, "forbidden".into()));
            assert!(matches!(decide(refused), Verdict::Uninstall(why) if why.contains("RBAC")), "{code}");
        }
        for unknown in [ApiFailure::Status(503, "unavailable".into()), ApiFailure::Other("connection refused".into())] {
            assert!(matches!(decide(Err(unknown)), Verdict::Keep(why) if why.contains("cannot tell")));
        }
    }
}
