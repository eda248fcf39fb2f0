//! In-place repair, the decision (pure): a pod the plugin let through without a redirect
//! because the API server could not be asked left a [`Record`]; once the pod can be seen,
//! it gets the redirect ADD would have programmed, in its still-running sandbox, so that
//! its validator passes on its next restart and nothing is deleted.

use std::collections::BTreeMap;

use cni::plugin::pending::Record;
use k8s_openapi::api::core::v1::Pod;
use kuma::Config;
use kuma::pod::Decision;

/// What the API server said about the record's pod.
#[derive(Debug)]
pub enum PodAnswer {
    Found(Box<Pod>),
    /// 404: the pod is gone.
    Gone,
    /// No answer (yet): the reason, for the log.
    Unavailable(String),
}

#[derive(Debug, PartialEq)]
pub enum Action {
    /// Program this config (built from these annotations, remembered for DEL).
    Program(Box<Config>, BTreeMap<String, String>),
    /// Nothing to do for this record, ever: drop it, saying why.
    Drop(String),
    /// Ask again soon.
    Retry(String),
}

/// What to do with `record`, given the API server's answer: exactly ADD's decision, for
/// the very pod ADD was called for.
pub fn decide(record: &Record, answer: PodAnswer) -> Action {
    let pod = match answer {
        PodAnswer::Found(pod) => pod,
        PodAnswer::Gone => return Action::Drop("the pod no longer exists".into()),
        PodAnswer::Unavailable(why) => return Action::Retry(why),
    };
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    if let Some(wanted) = &record.uid
        && wanted != uid
    {
        return Action::Drop(format!("the pod was recreated under its name (UID {uid}, not {wanted})"));
    }
    match kuma::pod::decide(&pod) {
        Ok(Decision::Intercept(cfg)) => Action::Program(cfg, pod.metadata.annotations.clone().unwrap_or_default()),
        Ok(Decision::PassThrough(reason)) => Action::Drop(format!("not ours to redirect: {reason}")),
        // ADD would have failed this pod; it is running now, and only its validator and
        // the repair controller can say so.
        Err(e) => Action::Drop(format!("invalid transparent-proxy configuration: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn record(uid: Option<&str>) -> Record {
        Record {
            namespace: "shop".into(),
            name: "web".into(),
            uid: uid.map(str::to_owned),
            netns: "/var/run/netns/cni-1".into(),
            container_id: "abc".into(),
            ifname: "eth0".into(),
            network: "k8s-pod-network".into(),
            ipv6: false,
            conf: serde_json::json!({}),
            since: 0,
        }
    }

    fn pod(uid: &str, annotations: &[(&str, &str)], sidecar: bool) -> PodAnswer {
        let mut containers = vec![Container { name: "app".into(), ..Default::default() }];
        if sidecar {
            containers.push(Container { name: kuma::pod::SIDECAR_CONTAINER.into(), ..Default::default() });
        }
        PodAnswer::Found(Box::new(Pod {
            metadata: ObjectMeta {
                uid: Some(uid.into()),
                annotations: Some(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            },
            spec: Some(PodSpec { containers, ..Default::default() }),
            status: None,
        }))
    }

    const MESH: &[(&str, &str)] = &[(kuma::pod::SIDECAR_INJECTED, "true")];

    #[test]
    fn a_mesh_pod_gets_what_add_would_program() {
        let Action::Program(cfg, annotations) = decide(&record(Some("u1")), pod("u1", MESH, true)) else { panic!() };
        assert_eq!(cfg.inbound.port, 15006);
        assert_eq!(annotations.get(kuma::pod::SIDECAR_INJECTED).map(String::as_str), Some("true"));
        // Without K8S_POD_UID the name is all there is.
        assert!(matches!(decide(&record(None), pod("u2", MESH, true)), Action::Program(..)));
    }

    #[test]
    fn another_pod_under_the_name_or_no_pod_or_not_ours_drops_the_record() {
        let dropped = |a: Action| match a {
            Action::Drop(why) => why,
            other => panic!("{other:?}"),
        };
        assert!(dropped(decide(&record(Some("u1")), pod("u2", MESH, true))).contains("recreated"));
        assert!(dropped(decide(&record(Some("u1")), PodAnswer::Gone)).contains("no longer exists"));
        assert!(dropped(decide(&record(Some("u1")), pod("u1", &[], true))).contains("not ours"));
        assert!(dropped(decide(&record(Some("u1")), pod("u1", MESH, false))).contains("not ours"));
        let bad = [(kuma::pod::SIDECAR_INJECTED, "true"), ("traffic.kuma.io/exclude-inbound-ports", "80,http")];
        assert!(dropped(decide(&record(Some("u1")), pod("u1", &bad, true))).contains("exclude-inbound-ports"));
    }

    #[test]
    fn no_answer_is_asked_again() {
        let answer = PodAnswer::Unavailable("connection refused".into());
        assert_eq!(decide(&record(Some("u1")), answer), Action::Retry("connection refused".into()));
    }
}
